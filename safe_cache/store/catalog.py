"""Finding the stores under a root folder or bucket prefix (`safe-cache ls`)."""

from __future__ import annotations

from typing import Any

import fsspec

from ..errors import StoreError
from .store import open_store


def find_stores(root: str, *, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Every store directly under `root` or one level down (stores/<dataset>/<name>.zarr)."""
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
            "backbone": f"{backbone.get('model')}/{backbone.get('pretrained')}",
            "readable_rows": {s: v["readable_rows"] for s, v in summary.items()},
            "complete": all(v["complete_units"] == v["units"] for v in summary.values()),
        })
    return rows


