"""open_clip's VisionTransformer pooled by its class token (ViT-B-32, ViT-B-16, ViT-L-14, ...).

The class token's attention in the last block is the pooling: the head is that block, ln_post and
proj (cut 'pool'), or the last N blocks (cut 'lastN'). CoCa's towers are the same module with an
attentional pooler after the blocks (families/coca.py reuses this file's trunk and checks).
"""

from __future__ import annotations

from typing import cast

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from .. import towers
from ..heads import GridHead, ViTPoolHead, ViTReferenceHead
from .base import Config, Family, Trunk, last_blocks
from .registry import register_family

_CUSTOM_BLOCK_FLAGS = (
    "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
)


def transformer_config(config: Config) -> bool:
    """An open_clip VisionTransformer config (neither timm's tower nor a ModifiedResNet)."""
    vision = config.get("vision_cfg", {})
    return "timm_model_name" not in vision and not isinstance(vision.get("layers"), list | tuple)


def _tower(visual: nn.Module) -> towers.VisionTransformer:
    """The typed view of a tower this family claims (open_clip ships no types)."""
    return cast(towers.VisionTransformer, visual)


def transformer_problems(visual: nn.Module) -> list[str]:
    """What the single-query heads of open_clip's VisionTransformer cannot reproduce."""
    problems = []
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"it pools by '{visual.pool_type}', not by the class token")
    if visual.proj is None:
        problems.append("it has no output projection")
    if not all(isinstance(b, ResidualAttentionBlock) for b in _tower(visual).transformer.resblocks):
        problems.append("its blocks are custom (qk-norm / scaled attention)")
    if not getattr(visual.transformer, "batch_first", True):
        problems.append("its transformer is not batch-first")
    return problems


class _ViTEmbed(nn.Module):
    """Patch embedding + class token + positional embedding + ln_pre, as open_clip computes it."""

    def __init__(self, visual: towers.VisionTransformer) -> None:
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        tokens: torch.Tensor = self.ln_pre(self.patch_dropout(x))
        return tokens


class ViTTrunk(Trunk):
    """The embedding and every block but the last `blocks_in_head`; tokens (B, 1 + HW, C)."""

    def __init__(self, visual: towers.VisionTransformer, blocks_in_head: int) -> None:
        super().__init__()
        self.visual = _ViTEmbed(visual)
        blocks = visual.transformer.resblocks
        self.stages = nn.ModuleList(list(blocks[: len(blocks) - blocks_in_head]))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.visual(images)
        for block in self.stages:
            x = block(x)
        return x


@register_family
class ViT(Family):
    name = "vit"
    description = ("VisionTransformer with class-token pooling (ViT-B-32, ViT-B-16, ViT-L-14,"
                   " ViT-L-14-336, ViT-H-14, ...)")
    tiny_models = ("safe-cache-tiny-vit",)
    example_models = ("ViT-B-16",)
    cuts = "'pool' or 'lastN' (N blocks)"

    def claims_config(self, config: Config) -> bool:
        return transformer_config(config) and not config["vision_cfg"].get("attentional_pool")

    def config_problem(self, config: Config) -> str:
        vision = config["vision_cfg"]
        if vision.get("pool_type", "tok") != "tok":
            return f"'{vision['pool_type']}' pooling, not the class token"
        if vision.get("block_type") == "custom" or any(vision.get(f) for f in _CUSTOM_BLOCK_FLAGS):
            return "custom attention blocks"
        return ""

    def claims_module(self, visual: nn.Module) -> bool:
        return isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None

    def module_problems(self, visual: nn.Module) -> list[str]:
        return transformer_problems(visual)

    def more_cuts(self, cut: str) -> int | None:
        return last_blocks(cut)

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        return ViTTrunk(_tower(visual), stages)

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        return _tower(visual).grid_size

    def prefix_tokens(self, visual: nn.Module) -> int:
        return 1  # the class token

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        return _tower(visual).transformer.width

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        return ViTPoolHead(_tower(visual), stages)

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        return ViTReferenceHead(_tower(visual), stages)
