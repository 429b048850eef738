"""Where stores live and what they are called, from a backbone card alone (no store is opened).

The default store of a dataset and backbone is `<store root>/<dataset>/<model>-<weights>.zarr`,
where <weights> is the pretrained tag, `file-<sha256 prefix>` for a local checkpoint, or
`random<seed>` for a seeded random initialisation. Fit results use the same `<model>-<weights>`
folder name.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_STORE_ROOT = "stores"
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "http", "https")


def absolute_url(url: str) -> str:
    """A local path made absolute (what another process, with another working directory, needs);
    URLs unchanged."""
    return url if "://" in url else os.path.abspath(url)


def weights_label(card: dict[str, Any]) -> str:
    """The pretrained part of a default store name: the tag, the file's hash, or random<seed>."""
    if card["pretrained"] is None:
        return f"random{card['init_seed']}"
    if str(card["pretrained"]).startswith("file:"):
        return f"file-{card['weights_sha256'][:12]}"
    return str(card["pretrained"])


def backbone_label(card: dict[str, Any]) -> str:
    """`<model>-<weights>`: a backbone's folder name in store roots and results folders."""
    return f"{card['model']}-{weights_label(card)}"


def default_store_url(dataset: str, card: dict[str, Any], root: str = DEFAULT_STORE_ROOT) -> str:
    return f"{root}/{dataset}/{backbone_label(card)}.zarr"
