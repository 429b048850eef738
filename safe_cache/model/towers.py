"""Typed views of the open_clip modules safe-cache reads.

open_clip ships no type information: its classes come in as Any, and `model.visual` as an
nn.Module, whose attributes type as `Tensor | Module`. Each family casts the tower it is given
to one of these protocols once, where the tower enters (its Family methods), and the heads take
the view. A protocol lists only the attributes read here, with the types open_clip gives them;
nothing is checked at run time (the families' `module_problems` refuse the towers that differ).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from torch import nn

TrunkT = TypeVar("TrunkT")


class Clip(Protocol):
    """open_clip's CLIP (and CoCa, CustomTextCLIP): the visual tower and the logit scale."""

    visual: nn.Module
    logit_scale: nn.Parameter


class AttentionPool2d(Protocol):
    """ModifiedResNet's `attnpool` (open_clip.modified_resnet.AttentionPool2d)."""

    positional_embedding: nn.Parameter
    k_proj: nn.Linear
    q_proj: nn.Linear
    v_proj: nn.Linear
    c_proj: nn.Linear
    num_heads: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ModifiedResNet(Protocol):
    """open_clip.modified_resnet.ModifiedResNet (RN50, RN101, ...)."""

    image_size: int
    layer4: nn.Sequential
    attnpool: AttentionPool2d


class BlockMlp(Protocol):
    """A ResidualAttentionBlock's `mlp`: an nn.Sequential of c_fc, gelu and c_proj."""

    gelu: nn.Module


class ResidualAttentionBlock(Protocol):
    """open_clip.transformer.ResidualAttentionBlock, as the structure of a block (heads, eps,
    activation) that the single-query form reads."""

    ln_1: nn.LayerNorm
    attn: nn.MultiheadAttention
    ln_2: nn.LayerNorm
    mlp: BlockMlp


class Transformer(Protocol):
    """open_clip.transformer.Transformer: the blocks of a VisionTransformer."""

    width: int
    resblocks: nn.ModuleList


class VisionTransformer(Protocol):
    """open_clip.transformer.VisionTransformer, pooled by its class token (the proj of a tower
    without one is refused: vit.transformer_problems)."""

    grid_size: tuple[int, int]
    conv1: nn.Conv2d
    class_embedding: nn.Parameter
    positional_embedding: nn.Parameter
    patch_dropout: nn.Module
    ln_pre: nn.Module
    transformer: Transformer
    ln_post: nn.LayerNorm
    proj: nn.Parameter
    final_ln_after_pool: bool


class AttentionalPooler(Protocol):
    """open_clip.transformer.AttentionalPooler (CoCa's `attn_pool`)."""

    attn: nn.MultiheadAttention
    ln_q: nn.LayerNorm
    ln_k: nn.LayerNorm

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class CocaVisionTransformer(VisionTransformer, Protocol):
    """CoCa's VisionTransformer: an attentional pooler after the blocks."""

    attn_pool: AttentionalPooler


class TimmModel(Protocol[TrunkT]):
    """open_clip.timm_model.TimmModel: a timm tower (`trunk`, typed by timm) and open_clip's
    projection after it (`head`)."""

    trunk: TrunkT
    head: nn.Sequential
