"""A run's identity: everything that changes its numbers, and the short name that tells runs of
different options apart on disk.

The identity of one (store, shots, seed) run is the store (its backbone fingerprint, the digest
of what a run reads from its manifest: card, dataset, views; the test rows it holds; the digests
of the run's few-shot rows and of the prompt set's classifier and sentences), the prompt set (by
its stored name) and whether its classifier is fine-tuned (`classifier`), the recipe, the grid,
iterations, batch, evaluation cadence, beta, betas, blend, the optional methods and their
settings, where Tip-F and SAFE-A select, and the OOD stores (by the same digest). Not in it:
the device, test-chunk size, cache folder, cluster and CUDA-graph settings, which change where
and how fast a run goes, not what it computes (float rounding aside), nor the images extract
skipped or the manifest's time stamps.

It is computed from what a result records (its `config`, `recipe`, `store` and `ood` blocks),
and every result carries it (`identity`, with its `identity_sha256`). fit compares the identity
it is asked for with the result's on disk: equal, the run is skipped; different, the old
numbers are never returned.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..data.prompts import prompt_set_name
from ..identity import canonical_sha256
from .compat import ADDED_FIELDS

# FitConfig fields that change a run's numbers (besides store, shots, seed and recipe).
OPTION_FIELDS = ("prompts", "classifier", "lrs", "wds", "iters", "batch_size", "eval_every",
                 "beta", "betas", "blend", "methods", "tip_epochs", "select_on", "eval_ood",
                 "protocol")
# (--partial is not one: the test rows a run evaluated are in its store block.)
# Options the result's file name already says (recipe name, `_test-selected`).
NAMED_FIELDS = ("select_on",)
UNORDERED = ("methods", "eval_ood")  # sets: their order changes nothing
# A result's store block: what the run read (every result records them: results.py checks).
STORE_FIELDS = ("fingerprint", "store_sha256", "test_rows", "fewshot_sha256",
                "prompts_sha256")


def default_options() -> dict[str, Any]:
    """The options of a default `fit` (FitConfig's defaults), normalised."""
    from .config import FitConfig

    defaults = {f.name: f.default for f in fields(FitConfig) if f.name in OPTION_FIELDS}
    return normalise(defaults)  # the added options' defaults are their ADDED_FIELDS values


def normalise(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON holds them: tuples as lists, sets sorted, ints of float options as
    floats (so 1 and 1.0 are one identity)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, (tuple, list)):
            value = sorted(value) if name in UNORDERED else list(value)
        if name in ("lrs", "wds", "betas"):
            value = [float(v) + 0.0 for v in value]  # + 0.0: -0.0 is 0.0
        if name == "beta":
            value = float(value) + 0.0
        if name == "prompts" and isinstance(value, str):
            value = prompt_set_name(value)  # a file by its stored name: its content has a digest
        out[name] = value
    return out


def options_of(config: dict[str, Any]) -> dict[str, Any]:
    """The identity options of a config block (a result's `config`, which records every fit
    option: FitConfig.from_dict checks), normalised. An option added after 0.2.0 counts only
    where it differs from the value every earlier run had (compat.ADDED_FIELDS): an earlier
    result keeps its identity."""
    return normalise({name: config[name] for name in OPTION_FIELDS
                      if name not in ADDED_FIELDS
                      or config.get(name, ADDED_FIELDS[name]) != ADDED_FIELDS[name]})


def changed_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that differ from a default fit, minus those the file name says."""
    defaults = default_options()
    return {name: value for name, value in options.items()
            if value != defaults.get(name) and name not in NAMED_FIELDS}


def options_suffix(options: dict[str, Any]) -> str:
    """`_o<8 hex>` when options differ from the defaults (a hash of those that differ), else
    "": results of other options live beside the default run, never in its file."""
    changed = changed_options(options)
    return f"_o{canonical_sha256(changed)[:8]}" if changed else ""


def run_identity(store: dict[str, Any], dataset: str, shots: int, seed: int,
                 config: dict[str, Any], recipe: dict[str, Any],
                 ood: dict[str, Any] | None = None,
                 backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of one run, as a JSON object; `store` is a result's store block
    (fingerprint, store_sha256, test_rows, the digests), `recipe` its recipe block, `ood` the
    variants' stores {name: {store_sha256}}, `backbone` the names it is reported under (the
    fingerprint identifies the features; these the row a report puts them in)."""
    return {
        "dataset": dataset, "shots": shots, "seed": seed,
        "backbone": {k: (backbone or {}).get(k) for k in ("model", "pretrained", "cut")},
        "store": {k: store.get(k) for k in STORE_FIELDS},
        "options": options_of(config),
        "recipe": {k: v for k, v in recipe.items() if k != "loss_logit_scale"},
        "ood": {name: (block or {}).get("store_sha256")
                for name, block in sorted((ood or {}).items())},
    }


def identity_sha256(identity: dict[str, Any]) -> str:
    return canonical_sha256(identity)


SEEDED = ("fewshot_sha256",)  # store-block fields that follow from the seed (its draw)


def group_sha256(identity: dict[str, Any]) -> str:
    """The identity of a run's group: all but the seed and what follows from it (the seed's
    few-shot draw): what report averages over."""
    store = {k: v for k, v in identity.get("store", {}).items() if k not in SEEDED}
    return canonical_sha256({**{k: v for k, v in identity.items() if k != "seed"},
                             "store": store})


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable names of what differs between two identities (`beta 0.5 -> 0.9`)."""
    out = []
    for block in ("options", "recipe"):
        for name in sorted(set(old.get(block, {})) | set(new.get(block, {}))):
            unset = ADDED_FIELDS.get(name) if block == "options" else None  # an added option
            a, b = old.get(block, {}).get(name, unset), new.get(block, {}).get(name, unset)
            if a != b:
                out.append(f"{name} {_short(a)} -> {_short(b)}")
    for name in STORE_FIELDS:
        a, b = old.get("store", {}).get(name), new.get("store", {}).get(name)
        if a != b:
            out.append(f"store {name} {_short(a)} -> {_short(b)}")
    if old.get("ood") != new.get("ood"):
        out.append("OOD stores")
    if old.get("backbone") != new.get("backbone"):
        out.append(f"backbone {old.get('backbone')} -> {new.get('backbone')}")
    for name in ("dataset", "shots", "seed"):
        if old.get(name) != new.get(name):
            out.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:8]
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(map(str, value[:3]))}, ... ({len(value)})]"
    return str(value)
