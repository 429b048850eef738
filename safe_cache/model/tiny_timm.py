"""Tiny timm towers for the MAP family, registered with timm so open_clip configs can name them.

open_clip builds a timm tower by name only (`timm_model_name`), so a MAP tower small enough for
millisecond tests has to be a registered timm model: a 2-block VisionTransformer on 32-pixel
images whose head is timm's AttentionPoolLatent, in the two forms real models take (SigLIP: no
class token, no classifier; PE-Core: a class token the pool also attends to, and a linear
classifier projecting to the embedding). The model configs that use them are
model_configs/safe-cache-tiny-map*.json.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
_FACTORY_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm's, not the model's


def _build(**kwargs: Any) -> VisionTransformer:
    return VisionTransformer(**{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY})


@register_model
def safe_cache_tiny_map_siglip(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """SigLIP's form: patch tokens only, the MAP head's output is the embedding."""
    return _build(**{**_TINY, "class_token": False, "global_pool": "map", **kwargs})


@register_model
def safe_cache_tiny_map_cls(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """PE-Core's form: a class token the MAP head attends to as well, then a linear head."""
    return _build(**{**_TINY, "class_token": True, "pool_include_prefix": True,
                     "global_pool": "map", **kwargs})
