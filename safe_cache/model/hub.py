"""Models named by where they live: `hf-hub:ORG/NAME` and `local-dir:PATH`, as open_clip accepts.

Many of today's models (SigLIP 2, PE-Core variants, fine-tunes) exist only as a hub repository
or a folder holding `open_clip_config.json` (the architecture and its preprocessing) and
`open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`). safe-cache reads the config,
registers it with open_clip under a plain local name (so building, tokenizers and stores never go
back to the hub), and reads the weights when asked for them with `pretrained="repo"`. Files are
looked up in the hub cache first, with no network access (`try_to_load_from_cache`); only a miss
goes to the network, after a quick reachability probe, so offline use fails in seconds with a
message saying where the cache is and how to use a folder instead.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip

from ..errors import ModelConfigError, WeightsUnavailableError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
REPO_WEIGHTS = "repo"  # the pretrained value meaning "the weights in the model's own repo/folder"
SCHEMAS = ("hf-hub", "local-dir")


_PROBE_TIMEOUT_S = 5.0


def _offline_reason(host: str) -> str | None:
    """Why `host` cannot be reached right now, or None; answers in seconds, not minutes.

    Without this check the hub client retries for most of a minute before it gives up.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no network connection to {host}: {exc}"
    return None


def hub_host() -> str:
    """The Hugging Face hub's host name (its endpoint can be a mirror: $HF_ENDPOINT)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


@dataclass(frozen=True)
class ModelSource:
    """A hub repository or a local folder holding an open_clip model."""

    schema: str  # "hf-hub" or "local-dir"
    ident: str  # ORG/NAME, or the folder (absolute)

    @property
    def label(self) -> str:
        """How the backbone card names the model (the name as open_clip takes it)."""
        return f"{self.schema}:{self.ident}"

    @property
    def local_name(self) -> str:
        """The plain name its config is registered under with open_clip."""
        ident = Path(self.ident).name if self.schema == "local-dir" else self.ident
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.schema}-{ident}")


def parse_source(model: str) -> ModelSource | None:
    """The source of an `hf-hub:` / `local-dir:` name, None for any other model name."""
    try:
        schema, ident = open_clip.factory.parse_model_name(model)
    except ValueError as exc:
        raise ModelConfigError(f"Model name '{model}': {exc}") from exc
    if schema is None:
        return None
    if schema == "local-dir":
        folder = Path(ident).expanduser()
        if not folder.is_dir():
            raise ModelConfigError(f"{model}: no folder {folder}. local-dir: names a folder"
                                   f" holding {CONFIG_FILE} (and the weights).")
        ident = str(folder.resolve())
    return ModelSource(schema, ident)


def _cached(source: ModelSource, filename: str, cache_dir: str | Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.ident, filename,
                                   cache_dir=str(cache_dir) if cache_dir else None)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _hub_file(source: ModelSource, filename: str, cache_dir: str | Path | None) -> Path | None:
    """A file of a hub repo: from the cache, else downloaded; None when the repo lacks it."""
    from huggingface_hub import constants, hf_hub_download

    cache = str(cache_dir) if cache_dir else None
    cached = _cached(source, filename, cache_dir)
    if cached is not None:
        return cached
    reason = _offline_reason(hub_host())
    if reason is None:
        try:
            return Path(hf_hub_download(source.ident, filename, cache_dir=cache))
        except Exception as exc:  # the hub client raises many types: missing file, auth, 404
            if "404" in str(exc) or "EntryNotFound" in type(exc).__name__:
                return None
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    where = cache or constants.HF_HUB_CACHE
    raise _unavailable(source, filename, reason, where)


def _unavailable(source: ModelSource, filename: str, reason: str, where: str
                 ) -> WeightsUnavailableError | ModelConfigError:
    error = WeightsUnavailableError if filename in WEIGHT_FILES else ModelConfigError
    return error(
        f"Could not fetch {filename} of {source.label} ({reason}). The hub cache is {where}, and"
        f" it holds no copy. Run once with network access (the files are then cached), point"
        f" --cache-dir at a hub cache that holds the repo, or download the repo's files into a"
        f" folder and use local-dir:PATH.")


def find_file(source: ModelSource, filename: str, cache_dir: str | Path | None) -> Path | None:
    """`filename` of the model's repo or folder, or None when it has none."""
    if source.schema == "local-dir":
        path = Path(source.ident) / filename
        return path if path.is_file() else None
    return _hub_file(source, filename, cache_dir)


def source_config(source: ModelSource,
                  cache_dir: str | Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(open_clip model config, preprocess config or None) from the repo's open_clip_config."""
    import json

    path = find_file(source, CONFIG_FILE, cache_dir)
    if path is None:
        raise ModelConfigError(f"{source.label} has no {CONFIG_FILE}: it is not an open_clip"
                               f" model repository.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path} ({source.label}) is not valid JSON: {exc}") from exc
    config = raw.get("model_cfg", raw)
    if not isinstance(config, dict) or "vision_cfg" not in config:
        raise ModelConfigError(f"{path} ({source.label}) holds no open_clip model config.")
    return config, raw.get("preprocess_cfg")


def repo_weights(source: ModelSource, cache_dir: str | Path | None) -> Path:
    """The checkpoint in the model's own repo or folder (safetensors preferred; a cached copy of
    either before any download)."""
    if source.schema == "hf-hub":
        for filename in WEIGHT_FILES:
            if (path := _cached(source, filename, cache_dir)) is not None:
                return path
    for filename in WEIGHT_FILES:
        path = find_file(source, filename, cache_dir)
        if path is not None:
            return path
    raise WeightsUnavailableError(f"{source.label} holds no weights ({' or '.join(WEIGHT_FILES)})."
                                  f" Pass a checkpoint file as --pretrained, or none for random"
                                  f" weights.")
