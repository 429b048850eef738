"""Where stores live and what they are called, from a backbone card alone (no store is opened).

The default store of a dataset and backbone is `<store root>/<dataset>/<model>-<weights>.zarr`
(the store root: --store-root, else $SAFE_CACHE_STORES, else ./stores), where <weights> is the
pretrained tag, `file-<sha256 prefix>` for a local checkpoint, or `random<seed>` for a seeded
random initialisation. Fit results use the same `<model>-<weights>` folder name.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

DEFAULT_STORE_ROOT = "stores"
STORE_ROOT_ENV = "SAFE_CACHE_STORES"
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "http", "https")


def store_root(root: str | None = None) -> str:
    """The store root: `root` if given, else $SAFE_CACHE_STORES, else ./stores."""
    return store_root_source(root)[0]


def store_root_source(root: str | None = None) -> tuple[str, str]:
    """(store root, where it came from: "--store-root", "SAFE_CACHE_STORES" or "default")."""
    if root:
        return root, "--store-root"
    if os.environ.get(STORE_ROOT_ENV):
        return os.environ[STORE_ROOT_ENV], STORE_ROOT_ENV
    return DEFAULT_STORE_ROOT, "default"


def absolute_url(url: str) -> str:
    """A local path made absolute (what another process, with another working directory, needs);
    URLs unchanged."""
    return url if "://" in url else os.path.abspath(url)


def weights_label(card: dict[str, Any]) -> str:
    """The pretrained part of a default store name: the tag, the file's hash, or random<seed>."""
    if card["pretrained"] is None:
        return f"random{card.get('init_seed') or 0}"
    if str(card["pretrained"]).startswith("file:"):
        return f"file-{card['weights_sha256'][:12]}"
    return str(card["pretrained"])


def card_model_name(model: str) -> str:
    """A model as typed (--model) -> as the backbone card names it: a config file by its stem,
    an open_clip name with '/' as '-' (model.backbone.resolve_model's rule), hf-hub: names as
    typed, local-dir: names with their folder made absolute (model.hub's rule)."""
    if model.startswith("hf-hub:"):
        return model
    if model.startswith("local-dir:"):
        return "local-dir:" + str(Path(model[len("local-dir:"):]).expanduser().resolve())
    return Path(model).stem if model.endswith(".json") else model.replace("/", "-")


def model_label(model: str) -> str:
    """A model name as a file-name part: `hf-hub:ORG/NAME` -> `hf-hub-ORG-NAME`,
    `local-dir:/a/b/NAME` -> `local-dir-NAME`; plain open_clip names unchanged."""
    if model.startswith("local-dir:"):
        model = "local-dir-" + PurePosixPath(model[len("local-dir:"):].rstrip("/")).name
    return model.replace(":", "-").replace("/", "-")


def backbone_label(card: dict[str, Any]) -> str:
    """`<model>-<weights>[-<cut>]`: a backbone's folder name in store roots and results folders
    (an ablation cut is part of it: its features differ from the pooling cut's)."""
    cut = card.get("cut", "pool")
    return f"{model_label(card['model'])}-{weights_label(card)}" + \
        ("" if cut == "pool" else f"-{cut}")


def default_store_url(dataset: str, card: dict[str, Any], root: str | None = None) -> str:
    """`<store root>/<dataset>/<model>-<weights>.zarr` (root: see `store_root`)."""
    return f"{store_root(root)}/{dataset}/{backbone_label(card)}.zarr"


def _dataset_option(name: str) -> str:
    """--dataset's value for a store's dataset: its name where safe-cache ships its spec
    (pipelines/<name>.json, where data/datasets.py finds them: in the package or beside it),
    else a placeholder for the user's own spec file (`--dataset shapes` would be refused)."""
    package = Path(__file__).resolve().parent.parent
    shipped = any((folder / f"{name}.json").is_file()
                  for folder in (package / "pipelines", package.parent / "pipelines"))
    return name if shipped else f"<the spec file of {name}>"


def extract_command(manifest: dict[str, Any], url: str, *extra: str) -> str:
    """The extract command that adds to (or finishes) the store at `url`, with the options
    that keep it the store it is (weights, cut, views, the flipped view); `extra` appended.
    DATA is the data root the store was made from (a dataset of one's own: --dataset names its
    spec file)."""
    backbone = manifest["backbone"]
    weights = backbone.get("pretrained") or "none"
    if weights.startswith("file:"):
        weights = f"<the checkpoint file {weights.removeprefix('file:')}>"
    parts = ["safe-cache extract --dataset", _dataset_option(manifest["dataset"]["name"]),
             "--root DATA",
             "--model", backbone["model"], "--pretrained", weights, "--store", url]
    if backbone.get("cut", "pool") != "pool":
        parts += ["--cut", backbone["cut"]]
    views = (manifest.get("views") or {}).get("count")
    if views is not None:
        parts += ["--views", str(views)]
    if not manifest.get("center_flip"):
        parts.append("--no-center-flip")
    return " ".join([*parts, *extra])
