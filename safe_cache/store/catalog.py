"""Finding stores: every store under a root folder or bucket prefix (`safe-cache ls`), and the
stores a command uses when no store is named (`fit`, `info`, `verify`, `attention`, ...): those
under the store root that match the dataset, model and weights given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec

from ..errors import StoreError, StoreNotFoundError
from .paths import STORE_ROOT_ENV, backbone_label, card_model_name, store_root_source
from .store import open_store


def find_stores(root: str, *, storage_options: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """Every store directly under `root` or one level down (stores/<dataset>/<name>.zarr).
    A local root that does not exist is an error (an empty listing would hide a typo)."""
    if "://" not in root and not Path(root).is_dir():
        raise StoreNotFoundError(f"No folder {root} to list stores under"
                                 f" ({'a file' if Path(root).exists() else 'it does not exist'}).")
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    path = path.rstrip("/")
    candidates = sorted(set(fs.glob(f"{path}/*.zarr") + fs.glob(f"{path}/*/*.zarr")))
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    rows = []
    for candidate in candidates:
        url = protocol + candidate if protocol else candidate
        try:
            store = open_store(url, storage_options=storage_options)
        except StoreError:
            continue
        summary, backbone = store.summary(), store.manifest["backbone"]
        rows.append({
            "url": url, "dataset": store.manifest["dataset"].get("name"),
            "backbone": backbone_label(backbone),
            "model": backbone.get("model"), "pretrained": backbone.get("pretrained"),
            "label": backbone_label(backbone),
            "readable_rows": {s: v["readable_rows"] for s, v in summary.items()},
            "complete": all(v["complete_units"] == v["units"] for v in summary.values()),
        })
    return rows


def _weights_match(stored: str | None, wanted: str) -> bool:
    """--pretrained as typed (a tag, 'none', or a checkpoint file) against a card's."""
    if wanted.lower() == "none":
        return stored is None
    if stored is not None and stored.startswith("file:"):
        return stored == f"file:{Path(wanted).name}"
    return stored == wanted


def select_stores(root: str | None = None, *, dataset: str | None = None,
                  model: str | None = None, pretrained: str | None = None,
                  storage_options: dict[str, Any] | None = None) -> list[str]:
    """The URLs of the stores under the store root (see paths.store_root) holding `dataset`,
    `model` and `pretrained` where given; none is an error listing what is there and the
    extract command that would make one."""
    root, source = store_root_source(root)
    missing = "://" not in root and not Path(root).is_dir()
    found = [] if missing else find_stores(root, storage_options=storage_options)
    chosen = [row["url"] for row in found
              if (dataset is None or row["dataset"] == dataset)
              and (model is None or row["model"] == card_model_name(model))
              and (pretrained is None or _weights_match(row["pretrained"], pretrained))]
    if chosen:
        return chosen
    wanted = ", ".join(f"{k} {v}" for k, v in (("dataset", dataset), ("model", model),
                                                ("pretrained", pretrained)) if v) or "any"
    there = "; ".join(f"{row['url']} ({row['dataset']}, {row['label']})" for row in found)
    origin = "the default" if source == "default" else f"from {source}"
    command = "safe-cache extract --dataset " + (dataset or "NAME") + \
        (f" --model {model}" if model else "") + (f" --pretrained {pretrained}" if pretrained
                                                  else "")
    raise StoreNotFoundError(
        f"No store matching {wanted} under the store root {root} ({origin}; in order:"
        f" --store-root, ${STORE_ROOT_ENV}, ./stores). Stores found there:"
        f" {there or 'none'}. Make one with `{command}`, or name the store itself.")
