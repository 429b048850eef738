"""CoCa's VisionTransformer (coca_ViT-B-32, coca_ViT-L-14): an attentional pooler after the blocks.

Only the pooler's first query reaches the contrastive embedding, so the head is attn_pool (that
query), ln_post and proj, and every transformer block belongs to the trunk.
"""

from __future__ import annotations

from typing import cast

from open_clip.transformer import AttentionalPooler, VisionTransformer
from torch import nn

from .. import towers
from ..heads import GridHead
from ..latent_heads import CocaPoolHead, CocaReferenceHead
from .base import Config, Family, Trunk
from .registry import register_family
from .vit import ViTTrunk, transformer_config, transformer_problems


def _tower(visual: nn.Module) -> towers.CocaVisionTransformer:
    """The typed view of a tower this family claims (open_clip ships no types)."""
    return cast(towers.CocaVisionTransformer, visual)


@register_family
class Coca(Family):
    name = "coca"
    description = ("CoCa's VisionTransformer with an attentional pooler (coca_ViT-B-32,"
                   " coca_ViT-L-14)")
    tiny_models = ("safe-cache-tiny-coca",)
    example_models = ("coca_ViT-B-32",)

    def claims_config(self, config: Config) -> bool:
        return transformer_config(config) and bool(config["vision_cfg"].get("attentional_pool"))

    def config_problem(self, config: Config) -> str:
        if isinstance(config["vision_cfg"]["attentional_pool"], str):  # 'parallel' / 'cascade'
            return "a second (contrastive) attentional pooler"
        return ""

    def claims_module(self, visual: nn.Module) -> bool:
        return (isinstance(visual, VisionTransformer)
                and getattr(visual, "attn_pool", None) is not None)

    def module_problems(self, visual: nn.Module) -> list[str]:
        problems = []
        if not isinstance(visual.attn_pool, AttentionalPooler):
            problems.append(f"its attention pool is a {type(visual.attn_pool).__name__}")
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            problems.append("it pools with a second (contrastive) attentional pooler")
        return problems + transformer_problems(visual)

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        return ViTTrunk(_tower(visual), blocks_in_head=0)  # the pooler follows the last block

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        return _tower(visual).grid_size

    def prefix_tokens(self, visual: nn.Module) -> int:
        return 1  # the class token, which the pooler reads too

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        return _tower(visual).transformer.width

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        return CocaPoolHead(_tower(visual))

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        return CocaReferenceHead(_tower(visual))
