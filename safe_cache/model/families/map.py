"""timm towers pooled by a MAP head, timm's AttentionPoolLatent (SigLIP, SigLIP 2, PE-Core).

open_clip wraps them as a TimmModel: the trunk is timm's `forward_features` (every block and the
final norm), the head timm's `forward_head` (attn_pool, fc_norm, head) and open_clip's own head.
"""

from __future__ import annotations

from typing import cast

import torch
from open_clip.timm_model import TimmModel
from timm.layers import AttentionPoolLatent
from torch import nn

from .. import tiny_timm  # noqa: F401  (registers the tiny timm MAP towers)
from ..heads import GridHead
from ..latent_heads import MapPoolHead, MapReferenceHead, MapTower
from .base import Config, Family, Trunk
from .registry import register_family


def _tower(visual: nn.Module) -> MapTower:
    """The typed view of a tower this family claims (open_clip ships no types)."""
    return cast(MapTower, visual)


class MapTrunk(Trunk):
    """timm's forward_features: everything before attn_pool."""

    def __init__(self, visual: MapTower) -> None:
        super().__init__()
        self.timm = visual.trunk

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.timm.forward_features(images)


@register_family
class Map(Family):
    name = "map"
    description = ("timm towers pooled by a MAP head, timm's AttentionPoolLatent (SigLIP,"
                   " SigLIP 2, PE-Core: ViT-B-16-SigLIP2, ViT-SO400M-14-SigLIP2, PE-Core-B-16,"
                   " ...)")
    tiny_models = ("safe-cache-tiny-map", "safe-cache-tiny-map-cls")
    example_models = ("PE-Core-B-16", "ViT-B-16-SigLIP2")

    def claims_config(self, config: Config) -> bool:
        vision = config.get("vision_cfg", {})
        return "timm_model_name" in vision and vision.get("timm_pool", "avg") == "map"

    def claims_module(self, visual: nn.Module) -> bool:
        return (isinstance(visual, TimmModel)
                and isinstance(getattr(visual.trunk, "attn_pool", None), AttentionPoolLatent))

    def module_label(self, visual: nn.Module) -> str:
        return f"The MAP head of {type(_tower(visual).trunk).__name__}"

    def module_problems(self, visual: nn.Module) -> list[str]:
        """What map_pool_grid's single latent query form does not cover."""
        tower = _tower(visual)
        pool = tower.trunk.attn_pool
        problems = []
        if pool.pos_embed is not None:
            problems.append("its pool adds its own position embedding")
        if not isinstance(pool.q_norm, nn.Identity) or not isinstance(pool.k_norm, nn.Identity):
            problems.append("its pool normalises queries and keys (qk-norm)")
        if pool.latent_len > 1 and pool.pool != "token":
            problems.append(f"its pool averages {pool.latent_len} latent queries")
        if pool.mlp is not None and not isinstance(pool.mlp.norm, nn.Identity):
            problems.append("its pool's MLP has an inner norm")
        if tower.head is not None and any(isinstance(m, AttentionPoolLatent)
                                          for m in tower.head.modules()):
            problems.append("open_clip adds another attention pool after it")
        return problems

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        return MapTrunk(_tower(visual))

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        return tuple(_tower(visual).trunk.patch_embed.grid_size)

    def prefix_tokens(self, visual: nn.Module) -> int:
        return int(getattr(visual.trunk, "num_prefix_tokens", 0))  # class token, registers

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        return int(_tower(visual).trunk.num_features)

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        return MapPoolHead(_tower(visual))

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        return MapReferenceHead(_tower(visual))
