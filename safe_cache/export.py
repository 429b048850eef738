"""Use a trained model: `export` a fit result to a self-contained folder, `load_model` it and
`predict` new images; nothing is ever unpickled (safetensors and JSON only).

A model folder holds card.json (the backbone reference with its weights sha256, the architecture,
beta and blend, the method, Tip-Adapter's alpha and gamma, class names, the store fingerprint,
the result it came from and its accuracies, and the sha256 of every tensor file), head.safetensors
(the fine-tuned pooling head, open_clip's parameter names), classifier.safetensors (the text
classifier) and, for SAFE-A, cache.safetensors (the trained keys and their one-hot values).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, atomic_write_with
from .data.datasets import IMAGE_SUFFIXES
from .data.views import load_image
from .errors import ConfigError, ImageReadError, ModelFolderError
from .fit.results import cache_file, files_problem, head_file, load_result, store_differences
from .fit.text import result_classifier
from .identity import card_fingerprint, file_sha256
from .model.backbone import Backbone, head_from_config, load_backbone
from .model.inference import blend_features, tip_logits
from .names import plain_name
from .store import open_store
from .store.compat import current_card

CARD = "card.json"
FORMAT_VERSION = 1


def card_digest(card: dict[str, Any]) -> str:
    """sha256 of the card's own content (every field but this digest): an edited card (beta,
    class names) is refused like an edited tensor file."""
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def export_model(result_path: str | Path, out: str | Path, *, method: str = "safe",
                 merge: bool = False, weights: str | Path | None = None,
                 storage_options: dict | None = None, force: bool = False) -> Path:
    """Write the model folder of a fit result (`method` safe or safe_a). `merge` also writes
    an open_clip checkpoint, which needs the backbone's weights (its tag, or `weights`).

    The folder is written beside `out` and renamed into place whole (atomic.atomic_dir): a
    kill leaves the old folder or the new one, never a mix (the old one moved aside to
    `.<out>.<random>.old` if the kill falls between its two renames); an existing folder is
    replaced only with `force`."""
    result = load_result(result_path)
    assert result.path is not None, "a record read from a file"
    result_path = result.path
    if method not in ("safe", "safe_a") or method not in result.methods:
        raise ModelFolderError(f"{result_path} has no '{method}' result to export (it has"
                               f" {sorted(result.methods)}).")
    problem = files_problem(result)
    if problem:
        raise ModelFolderError(f"{result_path}: {problem}; fit it again with --force.")
    out = Path(out)
    if str(out) in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ModelFolderError(f"--out {str(out)!r} is not a folder of its own: name the model"
                               f" folder to write (e.g. models/food101-safe).")
    if out.exists() and not force:
        raise ModelFolderError(f"{out} already exists; choose another --out, or replace it with"
                               f" --force.")
    if out.exists() and not _replaceable(out):
        raise ModelFolderError(f"{out} exists and is not a model folder (no {CARD}): --force"
                               f" replaces model folders only, never other data. Choose another"
                               f" --out.")
    store = open_store(result.store["url"], storage_options=storage_options)
    changed = store_differences(result, store)
    if changed:
        raise ModelFolderError(f"{store.url} is not the store {result_path} was fitted on (its"
                               f" {', '.join(changed)} differs); fit it again from this store.")
    _, model_config = store.head_state()
    _check_head_loads(head_file(result_path), model_config, store.manifest["backbone"])
    with atomic_dir(out, replace=force) as staging:  # renamed in whole, or removed
        document = _write_folder(staging, result, method, store, model_config)
        if merge:
            _write_merged(staging, document, weights)
            for name in ("open_clip_merged.safetensors", "MERGED.txt"):
                document["sha256"][name] = file_sha256(staging / name)
        document["card_sha256"] = card_digest(document)  # last: it covers every file
        (staging / CARD).write_text(json.dumps(document, indent=2, allow_nan=False))
    return out


def _replaceable(out: Path) -> bool:
    """What --force may replace: a model folder (it holds a card) or an empty folder."""
    return out.is_dir() and not out.is_symlink() and ((out / CARD).is_file()
                                                      or not any(out.iterdir()))


def _check_head_loads(path: Path, model_config: dict[str, Any], card: dict[str, Any]) -> None:
    """Refuse a source head that does not load (truncated, foreign): never export it."""
    head = head_from_config(model_config, card)
    try:
        head.load_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own errors for a truncated file
        raise ModelFolderError(f"{path} does not load as {card['model']}'s pooling head"
                               f" ({exc!s:.160}); fit the result again with --force.") from exc


def _write_folder(folder: Path, result, method: str, store, model_config) -> dict[str, Any]:
    """The model's tensor files, and its card's content (export_model writes the card last,
    once every file it covers is there)."""
    config = result.config
    shutil.copyfile(head_file(result.path), folder / "head.safetensors")
    classifier = result_classifier(result, store)
    atomic_write_with(folder / "classifier.safetensors", lambda temporary: save_file(
        {"classifier": classifier.contiguous()}, str(temporary)))
    files = ["head.safetensors", "classifier.safetensors"]
    if method == "safe_a":
        shutil.copyfile(cache_file(result.path), folder / "cache.safetensors")
        files.append("cache.safetensors")
    manifest = store.manifest
    document = {
        "format_version": FORMAT_VERSION, "method": method,
        "backbone": manifest["backbone"], "model_config": model_config,
        "beta": config["beta"], "blend": config["blend"],
        "tip": {k: result.methods[method].get(k) for k in ("alpha", "gamma")},
        "classnames": manifest["dataset"]["classnames"], "dataset": manifest["dataset"]["name"],
        "store_fingerprint": store.fingerprint, "result": str(result.path),
        "recipe": result.recipe_name,
        "accuracy": {k: {"val": v["val_acc"], "test": v["test_acc"]}
                     for k, v in result.methods.items()},
        "sha256": {name: file_sha256(folder / name) for name in files},
    }
    return document


def _write_merged(out: Path, document: dict[str, Any], weights) -> None:
    """A plain open_clip checkpoint whose pooling layer is the fine-tuned one (beta = 0: the
    blend with the original pooling is lost). The rest is the backbone's own weights."""
    backbone = _backbone_for(document, weights, "cpu")
    visual = backbone.model.get_submodule("visual")  # `.visual` types as Tensor | Module
    visual.load_state_dict(load_file(str(out / "head.safetensors")), strict=False)
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    atomic_write_with(out / "open_clip_merged.safetensors",
                      lambda temporary: save_file(state, str(temporary)))
    (out / "MERGED.txt").write_text(
        "open_clip_merged.safetensors is the open_clip model with the fine-tuned pooling layer\n"
        "in place of the original. It behaves like SAFE with beta = 0: the blend with the\n"
        "original pooling (and SAFE-A's cache) is lost. Every other weight is the backbone's.\n")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


class SafeModel:
    """An exported model, ready to classify images."""

    def __init__(self, folder: Path, card: dict[str, Any], backbone: Backbone,
                 head: torch.nn.Module, classifier: torch.Tensor,
                 cache: dict[str, torch.Tensor] | None) -> None:
        self.folder, self.card, self.backbone = folder, card, backbone
        self.head, self.classifier, self.cache = head, classifier, cache
        self.skipped: list[str] = []  # unreadable images passed over with skip_bad

    @property
    def classnames(self) -> list[str]:
        return self.card["classnames"]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> class logits (B, classes)."""
        device = self.backbone.device
        dense = self.backbone.forward_features(images.to(device))
        original, tuned = self.backbone.forward_head(dense), self.head(dense)
        features = blend_features(original, tuned, self.card["beta"], self.card["blend"])
        scale = self.backbone.card["logit_scale"]
        if self.cache is None:
            logits = scale * features @ self.classifier.T
        else:
            logits = tip_logits(features, self.classifier, self.cache["keys"],
                                self.cache["values"], self.card["tip"]["alpha"],
                                self.card["tip"]["gamma"], scale)
        if not torch.isfinite(logits).all():
            raise ModelFolderError(f"{self.folder}: the model gives non-finite logits (a tensor"
                                   f" file or card value out of range); export it again.")
        return logits

    def predict(self, images, *, top_k: int = 5, batch_size: int = 32,
                skip_bad: bool = False, progress=None) -> list[Prediction]:
        """Image files, folders (recursively) or PIL images -> top-k classes per image."""
        if top_k < 1:
            raise ConfigError(f"--top-k {top_k}: must be >= 1.")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be >= 1.")
        items = _expand(images)
        if not items:
            raise ConfigError(f"No images in {images}: give image files or folders holding"
                              f" {', '.join(sorted(IMAGE_SUFFIXES))} files.")
        out: list[Prediction] = []
        task = progress.start("predict", len(items)) if progress else None
        for start in range(0, len(items), batch_size):
            batch, names = [], []
            for offset, item in enumerate(items[start:start + batch_size]):
                try:
                    image = item if not isinstance(item, Path) else load_image(item)
                except ImageReadError as exc:
                    if not skip_bad:
                        raise ModelFolderError(f"{exc}. Pass --skip-bad to go on without it.") \
                            from exc
                    self.skipped.append(str(exc))
                    continue
                batch.append(self.backbone.preprocess(image))
                names.append(str(item) if isinstance(item, Path) else f"image {start + offset}")
            if batch:
                probabilities = F.softmax(self.logits(torch.stack(batch)), dim=-1).cpu()
                k = min(top_k, probabilities.shape[1])
                values, indices = probabilities.topk(k, dim=-1)
                for name, v, i in zip(names, values.tolist(), indices.tolist(), strict=True):
                    out.append(Prediction(name, [(self.classnames[c], p) for c, p in
                                                 zip(i, v, strict=True)]))
            if progress:
                progress.advance(task, len(items[start:start + batch_size]))
        return out


def _expand(images) -> list:
    items = images if isinstance(images, (list, tuple)) else [images]
    expanded = []
    for item in items:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            expanded += sorted(p for p in Path(item).rglob("*")
                               if p.suffix.lower() in IMAGE_SUFFIXES)
        elif isinstance(item, (str, Path)):
            expanded.append(Path(item))
        else:
            expanded.append(item)
    return expanded


def load_model(folder: str | Path, *, weights: str | Path | None = None,
               device: str = "cpu") -> SafeModel:
    """Load an exported model, checking every file against the card's sha256."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise ModelFolderError(f"{folder} is not a model folder (no {CARD}).")
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{folder}/{CARD} is not readable JSON ({exc}); export the"
                               f" model again.") from exc
    check_card(folder, card)  # its digest is over the card as written
    if isinstance(card.get("backbone"), dict):  # exported from a schema-1 store
        card = {**card, "backbone": current_card(card["backbone"])}
    backbone = _backbone_for(card, weights, device)
    head = head_from_config(card["model_config"], card["backbone"])
    try:
        head.load_state_dict(load_file(str(folder / "head.safetensors")))
    except RuntimeError as exc:
        raise ModelFolderError(f"{folder}: head.safetensors does not fit"
                               f" {card['backbone']['model']}: {str(exc)[:300]}") from exc
    classifier = load_file(str(folder / "classifier.safetensors"))["classifier"]
    if classifier.shape != (len(card["classnames"]), card["backbone"]["embed_dim"]):
        raise ModelFolderError(f"{folder}: classifier shape {tuple(classifier.shape)} does not"
                               f" match {len(card['classnames'])} classes x D.")
    cache = load_file(str(folder / "cache.safetensors")) if card["method"] == "safe_a" else None
    return SafeModel(folder, card, backbone, head.to(device).eval(), classifier.to(device),
                     {k: v.to(device) for k, v in cache.items()} if cache else None)


REQUIRED_FILES = {"safe": ("head.safetensors", "classifier.safetensors"),
                  "safe_a": ("head.safetensors", "classifier.safetensors", "cache.safetensors")}


def check_card(folder: Path, card: Any) -> None:
    """Refuse a model folder whose card or files are not the ones export wrote: the card's own
    digest must be there and match, its sha256 map must cover every file the method needs and
    every other file in the folder, and beta must be a finite blend weight."""
    if not isinstance(card, dict) or not isinstance(card.get("card_sha256"), str):
        raise ModelFolderError(f"{folder}/{CARD} carries no card_sha256 (removed, or not made by"
                               f" export); export the model again.")
    if card_digest(card) != card["card_sha256"]:
        raise ModelFolderError(f"{folder}/{CARD} was modified after export (its content does"
                               f" not match its card_sha256); export the model again.")
    digests, method = card.get("sha256"), card.get("method")
    if method not in REQUIRED_FILES or not isinstance(digests, dict):
        raise ModelFolderError(f"{folder}/{CARD}: method {method!r} or its sha256 map is not"
                               f" what export writes; export the model again.")
    uncovered = sorted(set(REQUIRED_FILES[method]) - set(digests))
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CARD
                   and p.name not in digests)
    if uncovered or extra:
        raise ModelFolderError(f"{folder}: {(uncovered or extra)[0]} is not covered by the"
                               f" card's sha256 map (edited folder); export the model again.")
    for name, digest in digests.items():
        path = folder / plain_name(name, f"{folder}/{CARD}: file", ModelFolderError)
        if not path.is_file():
            raise ModelFolderError(f"{folder}: {name} is missing; export the model again.")
        if file_sha256(path) != digest:
            raise ModelFolderError(f"{folder}: {name} does not match its sha256 in {CARD}"
                                   f" (modified or corrupted); export the model again.")
    _check_card_values(folder, card)


def _check_card_values(folder: Path, card: dict[str, Any]) -> None:
    """The card's numbers finite and in range, its names texts, its model a plain name."""
    def number(value: Any, what: str, low: float, high: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not low <= value <= high:
            raise ModelFolderError(f"{folder}/{CARD}: {what} {value!r} is not a finite number"
                                   f" in [{low:g}, {high:g}]; export the model again.")

    number(card.get("beta"), "beta", 0, 1e6)
    if card.get("blend") not in ("blend", "each"):
        raise ModelFolderError(f"{folder}/{CARD}: blend {card.get('blend')!r} is not blend or"
                               f" each; export the model again.")
    if card["method"] == "safe_a":
        tip = _block(card, "tip")
        number(tip.get("alpha"), "tip.alpha", 0, 1e4)
        number(tip.get("gamma"), "tip.gamma", 0, 1e4)
    names = card.get("classnames")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelFolderError(f"{folder}/{CARD}: classnames must be a list of texts; export"
                               f" the model again.")
    backbone = _block(card, "backbone")
    model = str(backbone.get("model", ""))
    if not model.startswith(("hf-hub:", "local-dir:")):
        plain_name(model, f"{folder}/{CARD}: backbone.model", ModelFolderError)


def _block(card: dict[str, Any], key: str) -> dict[str, Any]:
    """`card[key]` where it is a JSON object, else {} (its fields are then refused one by one)."""
    block = card.get(key)
    return block if isinstance(block, dict) else {}


def _backbone_for(card: dict[str, Any], weights, device) -> Backbone:
    spec = card["backbone"]
    pretrained = spec["pretrained"]
    if pretrained and str(pretrained).startswith("file:"):
        if weights is None:
            raise ModelFolderError(f"This model's backbone weights are the local file"
                                   f" {pretrained[5:]} (sha256 {spec['weights_sha256'][:12]});"
                                   f" pass it with --weights.")
        pretrained = str(weights)
    model: str | Path = spec["model"]
    sourced = str(spec["model"]).startswith(("hf-hub:", "local-dir:"))  # found as on extract
    with tempfile.TemporaryDirectory(prefix="safe-cache-config-") as scratch:
        if not sourced and open_clip.get_model_config(spec["model"]) is None:  # a user config
            name = plain_name(spec["model"], "the card's backbone.model", ModelFolderError)
            model = Path(scratch) / f"{name}.json"
            model.write_text(json.dumps(card["model_config"]))
        backbone = load_backbone(model, pretrained, device=device,
                                 init_seed=spec.get("init_seed") or 0, cut=spec["cut"],
                                 quick_gelu=spec["quick_gelu"])
    if card_fingerprint(backbone.card) != card_fingerprint(spec):
        raise ModelFolderError("The loaded backbone is not the one this model was trained on"
                               " (fingerprints differ): check --weights.")
    return backbone
