"""Published numbers beside ours, each with its source: the SAFE paper's Tables I and III
(published/safe_paper.json) and the workbench methods' own papers (published/workbench.json).

A published number stands beside our row only where the run is its source's protocol apart from
the method (OpenAI weights, the attention-pool cut, hand prompts, the paper's options: see
report.paper_reasons) and of the backbone the source reports. Table I's methods that need the
full encoders (CuPL, WiSE-FT, CoOp, ProGrad, Cross-Modal fine-tuning), which a store of pooling
inputs cannot run, appear as published-only rows: a reader sees what the paper compared against,
marked published, never averaged with our numbers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fit.methods import METHOD_LABELS

FULL_ENCODER_METHODS = ("cupl", "wise_ft", "coop", "prograd", "cross_modal")
# Table III's (out of distribution), in its row order: published-only rows there (ood_table.py)
TABLE_III_FULL_ENCODER_METHODS = ("coop_m4", "coop_m16", "cocoop", "wise_ft", "cross_modal",
                                  "cross_modal_wise_ft", "calip_fs")
LABELS = {**METHOD_LABELS, "cupl": "CuPL", "wise_ft": "WiSE-FT", "coop": "CoOp",
          "prograd": "ProGrad", "cross_modal": "Cross-Modal FT", "coop_m4": "CoOp (M=4)",
          "coop_m16": "CoOp (M=16)", "cocoop": "CoCoOp",
          "cross_modal_wise_ft": "Cross-Modal FT + WiSE-FT", "calip_fs": "CALIP-FS"}
ZERO_SHOT_METHODS = ("zero_shot", "cupl")  # Table I lists them at 0 shots
_FOLDER = Path(__file__).parent / "published"


@functools.cache
def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((_FOLDER / name).read_text()))


def safe_paper() -> dict[str, Any]:
    """The SAFE paper's tables (Table I: RN50, per dataset and shots; Table III: OOD)."""
    return _load("safe_paper.json")


def workbench_papers() -> dict[str, Any]:
    """The workbench methods' own published numbers ({} when the file is absent)."""
    return _load("workbench.json") if (_FOLDER / "workbench.json").is_file() else {}


# Which of our protocols a method's own published numbers were made under (each block's
# `protocol` text says how): "reference", their selection as `fit --protocol reference` runs it
# (Tip-Adapter's and GDA's searches on the whole val split, Tip-F's epoch on test); "ours",
# nothing chosen on val or test either way (CLAP is validation-free, as ours is); None, neither
# (ProLIP's published average is over four learning rates, CLIP-Adapter's and GDA's ViT run of
# Tip-Adapter state no selection). A number stands beside our row only under the same protocol;
# elsewhere the row notes why it is left out.
PUBLISHED_PROTOCOL: dict[tuple[str, str], str | None] = {
    ("gda", "RN50"): "reference", ("gda", "ViT-B-16"): "reference",
    ("tip_adapter", "RN50"): "reference", ("tip_adapter", "ViT-B-16"): None,
    ("tip_adapter_f", "RN50"): "reference", ("clip_adapter", "RN50"): None,
    ("clap", "RN50"): "ours", ("prolip", "RN50"): None}
TABLE_I = "table_1"  # Table I's numbers stand beside the paper's setting (report.paper_reasons)


def published_number(method: str, model: str, dataset: str,
                     shots: int) -> tuple[float, str, str | None] | None:
    """(number %, its source, the protocol it was made under: TABLE_I or PUBLISHED_PROTOCOL's)
    a paper reports for the method on the backbone, dataset and shots, or None. Table I (RN50)
    first; then the method's own paper."""
    table = safe_paper()["table_1"]
    key = "0" if method in ZERO_SHOT_METHODS else str(shots)
    if model == table["backbone"]:
        value = table["methods"].get(method, {}).get(dataset, {}).get(key)
        if value is not None:
            return float(value), f"{safe_paper()['source']}, Table I", TABLE_I
    block = workbench_papers().get("methods", {}).get(method, {}).get(model)
    if not block:
        return None
    value = block["numbers"].get(dataset, {}).get(key)
    if value is None:
        return None
    source = block["source"]
    text = f"{source.get('paper', method)}, {source.get('table', '')}".rstrip(", ")
    return float(value), text, PUBLISHED_PROTOCOL.get((method, model))


def published_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Published-only rows (the full-encoder methods of Table I) for each dataset, backbone,
    setting and shots among `rows` whose runs are the papers' protocol apart from the backbone
    (each row stands in its setting's table, as the paper's numbers beside ours do)."""
    keys = sorted({(r["dataset"], r["backbone"], r["model"], r["setting"], r["shots"])
                   for r in rows if not r.get("protocol_reasons") and not r.get("published")})
    out = []
    for dataset, backbone, model, setting, shots in keys:
        for method in FULL_ENCODER_METHODS:
            found = published_number(method, model, dataset, shots)
            if found is None:
                continue
            out.append({"dataset": dataset, "backbone": backbone, "model": model,
                        "recipe": "published", "setting": setting, "group": None,
                        "shots": shots, "method": method, "mean": None, "std": None,
                        "seeds": 0, "reasons": [], "protocol_reasons": [],
                        "paper": found[0], "delta": None, "paper_note": None,
                        "published": True, "source": found[1]})
    return out
