"""Load an open_clip visual encoder as a frozen trunk plus a trainable pooling head.

`load_backbone("RN50", "openai")` gives a `Backbone` whose `trunk` maps images to the dense
pre-pooling map (B, T, C) and whose `head` maps that map to the pooled embedding (B, D), with
`head(trunk(x)) == model.encode_image(x)`. Stage 1 (extract) runs only the trunk; stage 2 (fit)
trains only copies of the head. The split follows timm's `forward_features` / `forward_head`.

What differs between towers (where the trunk ends, the heads, the dense map's shape, which
towers are supported at all) is asked of the tower's family (families/); this module resolves
names, loads weights and writes the backbone card, the same way for every family.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from ..errors import ModelConfigError, UnsupportedModelError
from ..identity import card_fingerprint
from ..records import BackboneCard
from . import families, towers
from .families import FAMILIES, Family, Trunk, config_family, supported_text
from .heads import GridHead
from .hub import ModelSource, parse_source, source_config
from .weights import ResolvedWeights, load_weights_into, resolve_weights

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # the shipped tiny configs become open_clip names

CARD_SCHEMA = 2  # 2: tokens/channels/embed_dim/token_grid, not T/C/D/grid (store/compat.py)
# What each family covers (families/): the card's `family` values, in the registry's order.
SUPPORTED_FAMILIES = {name: f.description for name, f in FAMILIES.items()}


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip architecture resolved from a name, a config JSON file, or a hub repo /
    folder (`hf-hub:` / `local-dir:`)."""

    name: str  # the name open_clip's registry knows it by
    config: dict[str, Any]
    preprocess_override: dict[str, Any] | None  # `preprocess_cfg` carried by a config file
    source: ModelSource | None = None  # where an hf-hub: / local-dir: model lives

    @property
    def label(self) -> str:
        """The model's name on its backbone card (the hub id or folder for sourced models)."""
        return self.source.label if self.source else self.name

    @property
    def config_sha256(self) -> str:
        canonical = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> ModelSpec:
    """Resolve an open_clip model name, a shipped tiny name, a path to a model config JSON, or
    an `hf-hub:ORG/NAME` / `local-dir:PATH` name (model.hub).

    A config file may be open_clip's plain format ({embed_dim, vision_cfg, text_cfg}) or the
    hub format ({model_cfg, preprocess_cfg}); the latter carries its own preprocessing.
    """
    text = str(model)
    source = parse_source(text)
    if source is not None:
        config, preprocess = source_config(source, cache_dir)
        name = source.local_name
        if open_clip.get_model_config(name) != config:
            open_clip.add_model_config(_registry_copy(name, config))
        return ModelSpec(name, config, preprocess, source)
    if text.endswith(".json") or Path(text).is_file():
        return _resolve_config_file(Path(text))
    name = text.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelConfigError(
            f"Unknown model '{text}'. Use an open_clip model name (see `open_clip.list_models()`;"
            f" e.g. RN50, ViT-B-16, safe-cache-tiny-rn) or a path to a model config JSON file."
        )
    return ModelSpec(name=name, config=config, preprocess_override=None)


def _resolve_config_file(path: Path) -> ModelSpec:
    if not path.is_file():
        raise ModelConfigError(f"Model config file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"Model config {path} is not valid JSON: {exc}") from exc
    config = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
    if not isinstance(config, dict) or not all(
        key in config for key in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise ModelConfigError(
            f"Model config {path} must hold 'embed_dim', 'vision_cfg' and 'text_cfg' (open_clip's"
            f" format), optionally wrapped as {{'model_cfg': ..., 'preprocess_cfg': ...}}."
        )
    name = path.stem
    known = open_clip.get_model_config(name)
    if known is not None and known != config:
        raise ModelConfigError(
            f"Model config {path} is named '{name}', which open_clip already knows with a different"
            f" architecture. Rename the file."
        )
    if known is None:
        registered = _registry_copy(name, config)
        open_clip.add_model_config(registered)
    return ModelSpec(name=name, config=config, preprocess_override=raw.get("preprocess_cfg"))


def _registry_copy(name: str, config: dict[str, Any]) -> Path:
    """Write the plain config where open_clip's registry can read it (it reads files by stem)."""
    folder = Path.home() / ".cache" / "safe-cache" / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.json"
    target.write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


def family_of(visual: nn.Module) -> str:
    """The family of a supported visual tower; a clear error for anything else."""
    return families.module_family(visual).name


@dataclass
class Backbone:
    """A frozen open_clip visual encoder split at its pooling layer.

    `trunk(images) -> (B, T, C)`, `head(dense) -> (B, D)` (the original head, frozen),
    `new_head()` a trainable copy of it (SAFE's AttnPool_F), `card` a JSON-able identity.
    """

    model: nn.Module
    preprocess: Any
    card: dict[str, Any]
    trunk: Trunk
    head: nn.Module
    family: str
    token_grid: tuple[int, int]  # (H, W) of the dense map's spatial tokens (card key 'token_grid')
    stages_in_head: int
    model_config: dict[str, Any] | None = None  # the open_clip architecture (for stores)
    open_clip_name: str | None = None  # the name open_clip's registry knows (tokenizer)

    @property
    def fingerprint(self) -> str:
        return card_fingerprint(self.card)

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        dense: torch.Tensor = self.trunk(images)
        return dense

    def forward_head(self, dense: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.head(dense)
        return pooled

    def new_head(self) -> nn.Module:
        """A trainable copy of the original head (same names, shapes and values)."""
        head = copy.deepcopy(self.head)
        head.requires_grad_(True)
        return head

    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        """open_clip's tokenizer for this model (for text classifiers)."""
        return _tokenizer(self.open_clip_name or self.card["model"])

    @property
    def family_rules(self) -> Family:
        """The family's rules (families/): what its dense map and heads look like."""
        return families.family(self.family)

    def naive_head(self) -> nn.Module:
        """open_clip's own modules composed as a head: the slow reference, same state-dict keys."""
        visual = cast(towers.Clip, self.model).visual
        return self.family_rules.reference_head(visual, self.token_grid, self.stages_in_head)


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """One tokenizer per model name and process: building open_clip's BPE tables takes about
    0.2 s, and a tokenizer keeps no state between calls that changes what it returns."""
    tokenize: Callable[[list[str]], torch.Tensor] = open_clip.get_tokenizer(name)
    return tokenize


def load_backbone(
    model: str | Path,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    init_seed: int = 0,
    cut: str = "pool",
    quick_gelu: bool | None = None,
    cache_dir: str | Path | None = None,
) -> Backbone:
    """Load `model` (open_clip name or config JSON) with `pretrained` weights, split for SAFE.

    pretrained: an open_clip tag ('openai', 'laion2b_s34b_b79k', ...), a local checkpoint file
    (open_clip state dict, safetensors, or an original OpenAI TorchScript .pt), 'repo' (the
    weights of an hf-hub: / local-dir: model's own repository), or None for a random
    initialisation seeded by `init_seed` (tests, demos). quick_gelu: None infers it (tags
    know it; OpenAI TorchScript archives need it); True/False forces it. The model is returned in
    eval mode with every parameter frozen: open_clip returns train mode, where BatchNorm statistics
    and patch dropout would change the features.
    """
    spec = resolve_model(model, cache_dir)
    _check_config_family(spec)
    weights = resolve_weights(spec.name, spec.config, pretrained, quick_gelu, cache_dir,
                              source=spec.source)
    preprocess_cfg = {**(spec.preprocess_override or {}), **weights.preprocess}
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(init_seed)
        clip = open_clip.create_model(
            spec.name,
            pretrained=None,
            force_quick_gelu=weights.quick_gelu,
            force_preprocess_cfg=preprocess_cfg or None,
        )
    if weights.path is not None:
        load_weights_into(clip, weights)
    clip.eval().requires_grad_(False)
    clip.to(device)
    rules = families.module_family(clip.visual)
    stages = rules.head_stages(cut)
    trunk = rules.trunk(clip.visual, stages)
    token_grid = rules.token_grid(clip.visual, stages)
    head = rules.fast_head(clip.visual, token_grid, stages).requires_grad_(False)
    card = _make_card(spec, weights, clip, rules, cut, stages, token_grid, head, init_seed)
    pp_cfg = open_clip.get_model_preprocess_cfg(clip)
    preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    return Backbone(clip, preprocess, card, trunk, head, rules.name, token_grid, stages,
                    spec.config, spec.name)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning: safe-cache loads the weights itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def head_from_config(model_config: dict[str, Any], card: dict[str, Any]) -> GridHead:
    """The head module of a backbone card's architecture, built without its weights or text
    tower: fit rebuilds the original head from the weights a store keeps, export from a model
    folder's (the model layer never reads either itself)."""
    vision_only = {**model_config, "text_cfg": {"width": 8, "heads": 1, "layers": 1,
                                                 "context_length": 2, "vocab_size": 2}}
    vision_only["quick_gelu"] = bool(card.get("quick_gelu"))
    for key in ("custom_text", "multimodal_cfg"):
        vision_only.pop(key, None)
    with torch.random.fork_rng(devices=[]):
        visual = open_clip.model.CLIP(**vision_only).visual.eval()
    rules = families.module_family(visual)
    stages = rules.head_stages(card["cut"])
    return rules.fast_head(visual, tuple(card["token_grid"]), stages)


def _check_config_family(spec: ModelSpec) -> None:
    """Refuse unsupported towers before building (and downloading) anything."""
    reason = families.config_refusal(spec.config)
    if reason:
        raise UnsupportedModelError(
            f"{spec.name} cannot be split for SAFE ({reason}). Supported: {supported_text()}."
        )


def list_architectures() -> list[dict[str, Any]]:
    """Every open_clip architecture with its family, image size and pretrained tags."""
    rows = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        family, _ = config_family(config)
        rows.append({
            "model": name,
            "family": family,
            "image_size": config["vision_cfg"].get("image_size"),
            "tags": open_clip.list_pretrained_tags_by_model(name),
        })
    return rows


def _make_card(
    spec: ModelSpec,
    weights: ResolvedWeights,
    clip: towers.Clip,
    rules: Family,
    cut: str,
    stages: int,
    token_grid: tuple[int, int],
    head: nn.Module,
    init_seed: int,
) -> dict[str, Any]:
    pp = open_clip.get_model_preprocess_cfg(clip)
    size = pp["size"]
    tokens = token_grid[0] * token_grid[1] + rules.prefix_tokens(clip.visual)
    channels = rules.dense_channels(clip.visual, stages)
    with torch.no_grad():
        out_dim = head(torch.zeros(1, tokens, channels, device=_device_of(head))).shape[-1]
    card = {
        "schema": CARD_SCHEMA,
        "model": spec.label,
        "hub_id": spec.source.ident if spec.source and spec.source.schema == "hf-hub" else None,
        "model_config_sha256": spec.config_sha256,
        "family": rules.name,
        "pretrained": weights.label,
        "weights_sha256": weights.sha256,
        "init_seed": None if weights.path is not None else init_seed,
        "quick_gelu": bool(weights.quick_gelu or spec.config.get("quick_gelu", False)),
        "image_size": list(size) if isinstance(size, (tuple, list)) else [size, size],
        "mean": [float(v) for v in pp["mean"]],
        "std": [float(v) for v in pp["std"]],
        "interpolation": pp["interpolation"],
        "resize_mode": pp["resize_mode"],
        "cut": cut,
        "tokens": tokens,
        "channels": channels,
        "embed_dim": int(out_dim),
        "token_grid": list(token_grid),
        "logit_scale": float(clip.logit_scale.detach().exp().item()),
        # sigmoid-trained models (SigLIP): a constant added to every class's logit, so it cancels
        # in softmax and argmax (zero-shot, Tip-Adapter, SAFE's loss); recorded, not used
        "logit_bias": _logit_bias(clip),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    # The card as every reader of a store will check it (records.BackboneCard): refused here,
    # before any image is extracted, if a new architecture's card would not be read back.
    return BackboneCard.from_dict(card, f"the backbone card of {spec.label}",
                                  UnsupportedModelError).to_dict()


def card_problems(card: dict[str, Any]) -> list[str]:
    """Why a backbone card does not describe the open_clip model it names (empty when it does,
    or when the model is not one open_clip knows by name): what `verify --seal` checks before
    it seals a store a person vouches for."""
    name = str(card.get("model", ""))
    if name.startswith(("hf-hub:", "local-dir:")) or open_clip.get_model_config(name) is None:
        return []
    spec = resolve_model(name)
    if spec.config_sha256 != card.get("model_config_sha256"):
        return [f"card: model {name}, but its architecture digest is not {name}'s (an edited"
                f" model name?)"]
    return []


def _logit_bias(clip: towers.Clip) -> float | None:
    bias = getattr(clip, "logit_bias", None)
    return None if bias is None else float(bias.detach().reshape(-1)[0].item())


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


__all__ = [
    "SUPPORTED_FAMILIES",
    "Backbone",
    "ModelSpec",
    "Trunk",
    "card_fingerprint",
    "config_family",
    "head_from_config",
    "list_architectures",
    "load_backbone",
    "resolve_model",
]
