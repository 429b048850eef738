"""ModifiedResNet (RN50, RN101, RN50x4, ...): attnpool, pooled by its mean-token query.

The dense map is layer4's output (cut 'pool') or layer3's (cut 'layer4': the head owns layer4
too, the paper's "fine-tune layer4 + pooling" ablation), flattened channel-last.
"""

from __future__ import annotations

from typing import cast

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from .. import towers
from ..heads import GridHead, ResNetPoolHead, ResNetReferenceHead
from .base import Config, Family, Trunk
from .registry import register_family

_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool")
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class ResNetTrunk(Trunk):
    """The stem and the layers the head does not own; the map leaves channel-last."""

    def __init__(self, visual: nn.Module, stages: int) -> None:
        super().__init__()
        names = [*_STEM, *_LAYERS[: 5 - stages]]
        self.stages = nn.ModuleList([getattr(visual, n) for n in names])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in self.stages:
            x = stage(x)
        return x.flatten(2).transpose(1, 2)  # NCHW -> (N, H*W, C)


def _tower(visual: nn.Module) -> towers.ModifiedResNet:
    """The typed view of a tower this family claims (open_clip ships no types)."""
    return cast(towers.ModifiedResNet, visual)


@register_family
class ResNet(Family):
    name = "resnet"
    description = "ModifiedResNet with attention pooling (RN50, RN101, RN50x4, RN50x16, RN50x64)"
    tiny_models = ("safe-cache-tiny-rn",)
    example_models = ("RN50",)
    cuts = "'pool' or 'layer4'"
    nonnegative_dense = True  # post-ReLU
    extra_attention_keys = 1  # the mean token, key 0

    def claims_config(self, config: Config) -> bool:
        vision = config.get("vision_cfg", {})
        return "timm_model_name" not in vision and isinstance(vision.get("layers"), list | tuple)

    def claims_module(self, visual: nn.Module) -> bool:
        return isinstance(visual, ModifiedResNet)

    def more_cuts(self, cut: str) -> int | None:
        return 2 if cut == "layer4" else None

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        return ResNetTrunk(visual, stages)

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        side = _tower(visual).image_size // (32 if stages == 1 else 16)
        return (side, side)

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        return _tower(visual).attnpool.k_proj.in_features // (2 if stages == 2 else 1)

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        return ResNetPoolHead(_tower(visual), token_grid, stages)

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        return ResNetReferenceHead(_tower(visual), token_grid, stages)
