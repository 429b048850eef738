"""Where a backbone's weights come from: an open_clip tag, a local file, or a seeded random init.

Every failure here becomes a `WeightsUnavailableError` that says what was tried, where open_clip
caches downloads, and how to pass a local file instead, never a raw traceback from the hub client.
Checkpoints are read with `weights_only=True` (no arbitrary unpickling); the original OpenAI `.pt`
files are TorchScript archives, which torch refuses under that flag, so they are opened with
`torch.jit.load` (TorchScript's own restricted format) and converted to a state dict.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from ..errors import SafeCacheWarning, WeightsUnavailableError
from ..identity import file_sha256
from .hub import REPO_WEIGHTS, ModelSource, _offline_reason, hub_host, repo_weights

# Preprocessing fields a pretrained tag may set (open_clip merges them the same way).
PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
# Non-parameter entries of OpenAI's TorchScript state dicts.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights decision for one load: label for the card, file, hash and model overrides."""

    label: str | None  # the tag, "file:<name>", or None for random init
    path: Path | None
    sha256: str | None
    quick_gelu: bool  # force QuickGELU on the architecture
    torchscript: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)


def is_torchscript_archive(path: str | Path) -> bool:
    """True for TorchScript zips (OpenAI's original CLIP .pt files), which carry constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def resolve_weights(
    name: str,
    config: dict[str, Any],
    pretrained: str | Path | None,
    quick_gelu: bool | None,
    cache_dir: str | Path | None,
    source: ModelSource | None = None,
) -> ResolvedWeights:
    """Decide where the weights of `name` come from, downloading a tag if it is not cached."""
    config_gelu = bool(config.get("quick_gelu", False))
    if pretrained is None:
        return ResolvedWeights(None, None, None, quick_gelu if quick_gelu is not None else False)
    text = str(pretrained)
    if text == REPO_WEIGHTS:
        if source is None:
            raise WeightsUnavailableError(
                f"pretrained 'repo' means the weights in an hf-hub: or local-dir: model's own"
                f" repository; {name} is an open_clip name: pass one of its tags"
                f" ({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}) or a"
                f" checkpoint file.")
        path = repo_weights(source, cache_dir)
        gelu = quick_gelu if quick_gelu is not None else config_gelu
        return ResolvedWeights(REPO_WEIGHTS, path, file_sha256(path, memo=True), gelu)
    tag_cfg = open_clip.get_pretrained_cfg(name, text) if not Path(text).is_file() else {}
    if tag_cfg:
        path = _download(name, text, tag_cfg, cache_dir)
        gelu = quick_gelu if quick_gelu is not None else bool(tag_cfg.get("quick_gelu", False))
        preprocess = {key: tag_cfg[key] for key in PREPROCESS_KEYS if key in tag_cfg}
        return ResolvedWeights(
            text, path, file_sha256(path, memo=True), gelu, is_torchscript_archive(path),
            preprocess,
        )
    path = Path(text).expanduser()
    if not path.is_file() and source is not None:
        raise WeightsUnavailableError(
            f"'{text}' is not a weights choice for {source.label}: its weights are in its"
            f" repository (pretrained 'repo', --pretrained repo); or pass a checkpoint file, or"
            f" none for random weights.")
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"Known tags for {name}: {', '.join(tags)}" if tags else \
            f"{name} has no pretrained tags"
        raise WeightsUnavailableError(
            f"'{text}' is neither a pretrained tag of {name} nor an existing file. {known}. Pass"
            f" a tag, the path of a checkpoint file, or none (random weights)."
        )
    torchscript = is_torchscript_archive(path)
    if quick_gelu is None:
        quick_gelu = torchscript or config_gelu
        if not torchscript and not config_gelu:
            warnings.warn(
                f"Loading {name} from the local file {path.name}: safe-cache cannot tell whether"
                f" it was trained with QuickGELU. OpenAI weights need it (features are wrong"
                f" without it): pass --quick-gelu (extract, backbone; quick_gelu = true in a"
                f" study's [[backbones]]; quick_gelu=True in Python) or use"
                f" '{name}-quickgelu'. --no-quick-gelu silences this warning.",
                SafeCacheWarning,
                stacklevel=3,
            )
    return ResolvedWeights(f"file:{path.name}", path, file_sha256(path, memo=True), quick_gelu,
                           torchscript)


def _cache_location(tag_cfg: dict[str, Any], cache_dir: str | Path | None) -> str:
    if cache_dir:
        return str(cache_dir)
    if tag_cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    return str(Path("~/.cache/clip").expanduser())


def _cached_copy(tag_cfg: dict[str, Any], cache_dir: str | Path | None) -> Path | None:
    """The already-downloaded checkpoint of a tag, looked up without any network access."""
    hub = tag_cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        names = [*_safetensors_names(filename), filename]
        for candidate in names:
            found = try_to_load_from_cache(
                repo, candidate, cache_dir=str(cache_dir) if cache_dir else None
            )
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None
    url = tag_cfg.get("url", "")
    if url:
        local = Path(cache_dir or Path("~/.cache/clip").expanduser()) / os.path.basename(url)
        return local if local.is_file() else None
    return None


def _safetensors_names(filename: str) -> list[str]:
    """The safetensors files open_clip prefers over a .bin/.pth of the same hub repo."""
    if filename == open_clip.pretrained.HF_WEIGHTS_NAME:
        return [open_clip.pretrained.HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _source_host(tag_cfg: dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        return hub_host()
    return urlparse(tag_cfg.get("url", "")).hostname or "huggingface.co"


def _download(
    name: str, tag: str, tag_cfg: dict[str, Any], cache_dir: str | Path | None
) -> Path:
    """Find the checkpoint of a tag in the cache, or fetch it; a clear error when offline."""
    cached = _cached_copy(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    reason = _offline_reason(_source_host(tag_cfg))
    target = None
    if reason is None:
        try:
            target = open_clip.download_pretrained(
                tag_cfg, cache_dir=str(cache_dir) if cache_dir else None
            )
        except Exception as exc:  # the hub client raises many types; all mean "not available"
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if reason is not None:
        where = _cache_location(tag_cfg, cache_dir)
        source = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "its download address"
        raise WeightsUnavailableError(
            f"Could not fetch the pretrained weights '{tag}' of {name} from {source} ({reason})."
            f" open_clip caches downloaded weights in {where}, and no usable copy is there."
            f" Either run once with network access (the weights are then cached), point"
            f" --cache-dir (extract, backbone; cache_dir= in Python) at a folder that holds"
            f" them, or pass a local checkpoint file instead of the tag: --pretrained"
            f" /path/to/weights.safetensors (an open_clip .pt/.bin, or OpenAI's original"
            f" {name}.pt; --quick-gelu where it was trained with QuickGELU)."
        ) from None
    if not target or not Path(target).is_file():
        raise WeightsUnavailableError(f"open_clip resolved '{tag}' of {name} to no file.")
    return Path(target)


def load_weights_into(clip: nn.Module, weights: ResolvedWeights) -> None:
    """Load a checkpoint into an open_clip model, refusing anything but tensors."""
    assert weights.path is not None
    path = weights.path
    try:
        if weights.torchscript:
            with warnings.catch_warnings():  # deprecated, but the only reader of these archives
                warnings.simplefilter("ignore", FutureWarning)
                # torch.jit.load is unannotated in torch
                archive = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
                state = archive.state_dict()
            for key in _OPENAI_EXTRA_KEYS:
                state.pop(key, None)
            clip.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(clip, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsUnavailableError(
            f"{path} holds pickled Python objects beyond tensors; safe-cache does not unpickle"
            f" them. Save the state dict as safetensors (safetensors.torch.save_file) and pass"
            f" that file."
        ) from exc
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:600]
        raise WeightsUnavailableError(
            f"{path} does not fit this architecture ({first}). Check that the model name matches"
            f" the checkpoint (e.g. RN50 vs RN101, ViT-B-16 vs ViT-B-32)."
        ) from exc
    except (KeyError, ValueError, EOFError, OSError, AttributeError, TypeError) as exc:
        raise WeightsUnavailableError(
            f"{path} is not a checkpoint torch or safetensors can read ({type(exc).__name__}:"
            f" {str(exc)[:120]}). Pass an open_clip state dict (.safetensors, .pt/.bin saved"
            f" with torch.save) or an OpenAI TorchScript archive."
        ) from exc
