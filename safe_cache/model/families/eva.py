"""EVA towers (EVA02-B-16, EVA02-L-14, EVA02-E-14, EVA01-g-14): timm's `Eva` pooled by its
class token, wrapped by open_clip's TimmModel.

As for open_clip's own ViTs (families/vit.py), the class token's attention in the last block is
the pooling: the trunk is the patch embedding, the position embeddings and every block but the
last; the head is the last block (or the last N, cut 'lastN'), timm's final norm, the class
token, fc_norm and timm's head, then open_clip's head. Parameter names stay relative to
`model.visual` (`trunk.blocks.11.attn.q_proj.weight`, `trunk.norm.weight`, `trunk.head.weight`).

The fast head evaluates the last block for the class token only, with one difference from the
ViT's: EVA02 rotates every patch token's key by its position (RoPE), so the key projection
cannot move onto the query (`q . R_j Wk x_j` needs `Wk x_j` per token). Keys are projected per
token; the values still fold (`sum_j a_j (Wv x_j + bv) = Wv (sum_j a_j x_j) + bv`) and
everything after the attention runs on one token, which saves the value, output and MLP
products of every other token: about 11 of the block's 12 C x C products per token. Both block
forms are covered: pre-norm (EVA01, EVA02-B/L) and post-norm (EVA02-E), fused or separate q/k/v.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import apply_rot_embed_cat, global_pool_nlc
from timm.models import is_model, model_entrypoint, register_model
from timm.models.eva import Eva as TimmEva
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn
from torch.func import functional_call

from .. import towers
from ..heads import (
    GridHead,
    Params,
    _Namespace,
    _per_config_tokens,
    _project_values,
    _strip,
    _token_pool,
    keep_prefix,
)
from ..latent_heads import _call
from .base import Config, Family, Trunk, last_blocks
from .registry import register_family

# Modules whose timm entrypoints build an Eva: timm's, and this file (the tiny towers below).
_EVA_MODULES = ("timm.models.eva", __name__)

EvaTower = towers.TimmModel[TimmEva]  # open_clip's TimmModel around a timm Eva


def _tower(visual: nn.Module) -> EvaTower:
    """The typed view of a tower this family claims (open_clip ships no types)."""
    return cast(EvaTower, visual)


class _Rope(Protocol):
    """timm's rotary embeddings (RotaryEmbeddingCat, ...), as timm's `_pos_embed` calls them."""

    def get_embed(self, shape: list[int] | None = None) -> torch.Tensor: ...


# --- the trunk ----------------------------------------------------------------------------------

class EvaTrunk(Trunk):
    """timm's forward_features, stopped before the head's blocks (and before the final norm)."""

    def __init__(self, visual: EvaTower, blocks_in_head: int) -> None:
        super().__init__()
        self.timm = visual.trunk
        self.depth = len(visual.trunk.blocks) - blocks_in_head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.timm
        x: torch.Tensor  # the blocks' outputs (a module's call types as Any)
        x, rope = trunk._pos_embed(trunk.patch_embed(images))  # timm's own: tokens and RoPE
        x = trunk.norm_pre(x)
        for block in trunk.blocks[: self.depth]:
            x = block(x, rope=rope)
        return x


def _rope_embed(trunk: TimmEva) -> torch.Tensor | None:
    """The rotary embedding timm's `_pos_embed` hands every block, for the tower's fixed grid
    (eval mode: no coordinate augmentation). A constant, so the head keeps it as a buffer."""
    rope = cast("_Rope | None", trunk.rope)  # timm types it nn.Module (create_rope_embed)
    if rope is None:
        return None
    if hasattr(rope, "feat_shape"):
        return rope.get_embed().detach().clone()
    return rope.get_embed(shape=trunk.patch_embed.grid_size).detach().clone()


# --- the single-query last block ----------------------------------------------------------------

_QKV = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor,
             torch.Tensor | None]


def _qkv(p: Params, attn: EvaAttention) -> _QKV:
    """(Wq, bq, Wk, bk, Wv, bv) of EvaAttention: one fused weight with q/v biases and a zero
    key-bias buffer (EVA01, EVA02-E), or three projections (EVA02-B/L)."""
    if attn.qkv is not None:
        w_q, w_k, w_v = p["attn.qkv.weight"].chunk(3)
        if attn.q_bias is None:
            return w_q, None, w_k, None, w_v, None
        return w_q, p["attn.q_bias"], w_k, attn.k_bias, w_v, p["attn.v_bias"]
    return (p["attn.q_proj.weight"], p.get("attn.q_proj.bias"), p["attn.k_proj.weight"],
            p.get("attn.k_proj.bias"), p["attn.v_proj.weight"], p.get("attn.v_proj.bias"))


def _class_token_scores(q: torch.Tensor, keys: torch.Tensor, attn: EvaAttention,
                        rope: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """Scaled scores of the class token's query (B, A) against every key (B, T, A) -> (H, B, T).

    RoPE rotates the patch tokens' keys only; the class token is a prefix token, so its query
    is never rotated (timm skips the first `num_prefix_tokens` tokens).
    """
    batch, tokens, width = keys.shape
    heads = attn.num_heads
    k = keys.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, T, d)
    if rope is not None:
        rotated = apply_rot_embed_cat(k[:, :, prefix:], rope, half=attn.rotate_half)
        k = torch.cat([k[:, :, :prefix], rotated], dim=2).type_as(keys)
    query = (q * attn.scale).view(batch, heads, 1, width // heads)
    scores: torch.Tensor = (query @ k.transpose(-2, -1))[:, :, 0].transpose(0, 1)
    return scores


def _scaled(x: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    gamma = p.get(name)  # EvaBlock's layer scale, where the tower has one
    return x if gamma is None else gamma * x


def _block_rest(block: EvaBlock | EvaBlockPostNorm, p: Params, cls: torch.Tensor,
                attended: torch.Tensor) -> torch.Tensor:
    """The block after its attention, on the class token: residuals, norms and the MLP."""
    if isinstance(block, EvaBlock):  # pre-norm: x + ls(attn(norm1 x)), then x + ls(mlp(norm2 x))
        cls = cls + _scaled(attended, p, "gamma_1")
        hidden = _call(block.mlp, p, "mlp.", _call(block.norm2, p, "norm2.", cls))
        return cls + _scaled(hidden, p, "gamma_2")
    cls = cls + _call(block.norm1, p, "norm1.", attended)  # post-norm: x + norm1(attn x), ...
    return cls + _call(block.norm2, p, "norm2.", _call(block.mlp, p, "mlp.", cls))


def eva_block_grid(configs: Sequence[Params], x: torch.Tensor,
                   block: EvaBlock | EvaBlockPostNorm, prefix: str, rope: torch.Tensor | None,
                   prefix_tokens: int, keep: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An EvaBlock / EvaBlockPostNorm for the class token only, for every configuration.

    `block` supplies the structure (heads, eps, MLP); its own parameters are not used.
    x: tokens entering the block, shared (B, T, C) or per configuration (G, B, T, C).
    Returns (class token leaving the block (G, B, C), attention weights (G, H, B, T)).
    `keep` (B, T) bool: the block on the kept tokens only (the class token must be kept); each
    kept key keeps its own position's rotation, as timm's block on the subset with their rope
    rows.
    """
    configs = _strip(configs, prefix)
    # timm types a block's attn as any of its attentions; module_problems refuses all but this.
    attn, pre_norm = cast(EvaAttention, block.attn), isinstance(block, EvaBlock)
    per_config = _per_config_tokens(x)
    # Pre-norm blocks attend over norm1(x): its normalisation is shared by every configuration,
    # its affine is each one's (on the keys, and on the pooled sum, as the ViT head does).
    base = F.layer_norm(x, x.shape[-1:], eps=block.norm1.eps) if pre_norm else x
    each: list[torch.Tensor] = []
    for g, p in enumerate(configs):
        tokens = base[g] if per_config else base
        if pre_norm:
            tokens = tokens * p["norm1.weight"] + p["norm1.bias"]
        w_q, b_q, w_k, b_k, _, _ = _qkv(p, attn)
        keys = F.linear(tokens, w_k, b_k)  # per token: RoPE rotates each key by its position
        q = F.linear(tokens[:, 0], w_q, b_q)
        scores = _class_token_scores(q, keys, attn, rope, prefix_tokens)
        if keep is not None:
            scores = scores.masked_fill(~keep.bool()[None], float("-inf"))
        each.append(scores.softmax(-1))
    weights = torch.stack(each)
    pooled = _token_pool(weights, base).unbind(0)  # unbind: see heads.attnpool_grid
    outputs = []
    for g, p in enumerate(configs):
        pooled_g = pooled[g] * p["norm1.weight"] + p["norm1.bias"] if pre_norm else pooled[g]
        _, _, _, _, w_v, b_v = _qkv(p, attn)
        attended = _call(attn.norm, p, "attn.norm.", _project_values(pooled_g, w_v, b_v))
        attended = F.linear(attended, p["attn.proj.weight"], p.get("attn.proj.bias"))
        cls = x[g, :, 0] if per_config else x[:, 0]
        outputs.append(_block_rest(block, p, cls, attended))
    return torch.stack(outputs), weights


# --- the heads ------------------------------------------------------------------------------------

class _EvaTrunkModules(_Namespace):
    """`trunk.`: the head's blocks (under their index in the tower), timm's norm, fc_norm and
    head."""

    blocks: nn.ModuleDict
    norm: nn.Module
    fc_norm: nn.Module
    head: nn.Module


class _EvaHeadModules(nn.Module):
    """The modules both heads copy, under `model.visual`'s names: the head's blocks, timm's
    norm, fc_norm and head, open_clip's head; and the RoPE embedding as a buffer (not a
    parameter, not in the state dict)."""

    rope: torch.Tensor | None  # a buffer (register_buffer)

    def __init__(self, visual: EvaTower, head_stages: int) -> None:
        super().__init__()
        trunk = visual.trunk
        blocks = trunk.blocks
        self.trunk = _EvaTrunkModules()
        self.trunk.blocks = nn.ModuleDict({str(i): copy.deepcopy(blocks[i])
                                           for i in range(len(blocks) - head_stages, len(blocks))})
        for name in ("norm", "fc_norm", "head"):
            setattr(self.trunk, name, copy.deepcopy(getattr(trunk, name)))
        self.head = copy.deepcopy(visual.head)
        self.prefix_tokens = int(trunk.num_prefix_tokens)
        self.register_buffer("rope", _rope_embed(trunk), persistent=False)


class EvaPoolHead(_EvaHeadModules, GridHead):
    """Head of an EVA tower: earlier head blocks (cut 'lastN') whole, once per configuration,
    the last block for the class token only, then everything after it on that one token."""

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(next(iter(configs[0].values())).dtype)
        *earlier, (last_name, last) = self.trunk.blocks.items()
        for position, (name, block) in enumerate(earlier):
            own = _strip(configs, f"trunk.blocks.{name}.")
            x = torch.stack([functional_call(block, p, (x if position == 0 else x[g],),
                                             {"rope": self.rope}) for g, p in enumerate(own)])
        cls, weights = eva_block_grid(configs, x, cast("EvaBlock | EvaBlockPostNorm", last),
                                      f"trunk.blocks.{last_name}.", self.rope, self.prefix_tokens)
        outputs = []
        for p, y in zip(configs, cls.unbind(0), strict=True):
            y = _call(self.trunk.norm, p, "trunk.norm.", y)  # per token: norm(x)[:, 0] == norm(x0)
            y = _call(self.trunk.fc_norm, p, "trunk.fc_norm.", y)
            y = _call(self.trunk.head, p, "trunk.head.", y)
            outputs.append(_call(self.head, p, "head.", y))
        return torch.stack(outputs), weights

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The last block on the kept spatial tokens (the class token and any prefix stay),
        then the norms and heads; a cut with earlier head blocks mixes the tokens first."""
        *earlier, (last_name, last) = self.trunk.blocks.items()
        if earlier:
            return super().masked(x, keep)
        x = x.to(next(self.parameters()).dtype)
        params: Params = dict(self.named_parameters())
        cls, _ = eva_block_grid([params], x, cast("EvaBlock | EvaBlockPostNorm", last),
                                f"trunk.blocks.{last_name}.", self.rope, self.prefix_tokens,
                                keep=keep_prefix(keep, x.shape[1]))
        y = cls[0]
        for name in ("trunk.norm", "trunk.fc_norm", "trunk.head", "head"):
            y = _call(self.get_submodule(name), params, f"{name}.", y)
        return y

    def _tail(self) -> list[nn.Module]:
        return [self.trunk.norm, self.trunk.fc_norm, self.trunk.head, self.head]

    def _tail_input(self, x: torch.Tensor) -> torch.Tensor:
        """The class token leaving the last block (B, C), before timm's norms and heads."""
        x = x.to(next(self.parameters()).dtype)
        *earlier, (last_name, last) = self.trunk.blocks.items()
        for _, block in earlier:
            x = block(x, rope=self.rope)
        assert isinstance(last, EvaBlock | EvaBlockPostNorm)  # the tower's own last block
        cls: torch.Tensor = eva_block_grid([dict(self.named_parameters())], x, last,
                                           f"trunk.blocks.{last_name}.", self.rope,
                                           self.prefix_tokens)[0][0]
        return cls


class EvaReferenceHead(_EvaHeadModules):
    """The naive reference: timm's blocks whole on every token, then timm's forward_head
    (norm, class-token pool, fc_norm, head) and open_clip's head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.trunk.blocks.values():
            x = block(x, rope=self.rope)
        x = global_pool_nlc(self.trunk.norm(x), pool_type="token",
                            num_prefix_tokens=self.prefix_tokens)
        embedding: torch.Tensor = self.head(self.trunk.head(self.trunk.fc_norm(x)))
        return embedding


# --- the family -----------------------------------------------------------------------------------

@register_family
class Eva(Family):
    name = "eva"
    description = ("timm's Eva pooled by its class token (EVA02-B-16, EVA02-L-14, EVA02-E-14,"
                   " EVA01-g-14)")
    tiny_models = ("safe-cache-tiny-eva", "safe-cache-tiny-eva-post")
    example_models = ("EVA02-B-16",)
    cuts = "'pool' or 'lastN' (N blocks)"

    def claims_config(self, config: Config) -> bool:
        vision = config.get("vision_cfg", {})
        name = vision.get("timm_model_name")
        if name is None or vision.get("timm_pool", "avg") != "token" or not is_model(name):
            return False
        return model_entrypoint(name).__module__ in _EVA_MODULES

    def claims_module(self, visual: nn.Module) -> bool:
        trunk = getattr(visual, "trunk", None)
        return (isinstance(visual, TimmModel) and isinstance(trunk, TimmEva)
                and trunk.attn_pool is None and trunk.global_pool == "token")

    def module_label(self, visual: nn.Module) -> str:
        return f"The timm tower {type(_tower(visual).trunk).__name__}"

    def module_problems(self, visual: nn.Module) -> list[str]:
        """What eva_block_grid does not reproduce."""
        trunk, problems = _tower(visual).trunk, []
        block = trunk.blocks[-1]
        if not isinstance(block, EvaBlock | EvaBlockPostNorm):
            problems.append(f"its last block is a {type(block).__name__}")
        elif not isinstance(block.attn, EvaAttention):
            problems.append(f"its attention is a {type(block.attn).__name__}, not EvaAttention")
        elif not (isinstance(block.attn.q_norm, nn.Identity)
                  and isinstance(block.attn.k_norm, nn.Identity)):
            problems.append("its attention normalises queries and keys (qk-norm)")
        elif block.attn.gate is not None:
            problems.append("its attention is gated")
        if trunk.rope_mixed:
            problems.append("its rotary embedding differs per block (mixed RoPE)")
        if trunk.dynamic_img_size:
            problems.append("it resizes its position embeddings per image (dynamic_img_size)")
        return problems

    def more_cuts(self, cut: str) -> int | None:
        return last_blocks(cut)

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        return EvaTrunk(_tower(visual), stages)

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        return tuple(_tower(visual).trunk.patch_embed.grid_size)

    def prefix_tokens(self, visual: nn.Module) -> int:
        return int(_tower(visual).trunk.num_prefix_tokens)  # the class token, registers

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        return int(_tower(visual).trunk.embed_dim)

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        return EvaPoolHead(_tower(visual), stages)

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        return EvaReferenceHead(_tower(visual), stages)


# --- tiny towers for the tests (model_configs/safe-cache-tiny-eva*.json name them) ---------------

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_FACTORY_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm's, not Eva's


def _tiny(**kwargs: Any) -> TimmEva:
    model = TimmEva(**{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY})
    # as timm's builder sets (open_clip reads it); torch types Module.__setattr__'s value
    # as Tensor | Module, though it takes any value
    model.pretrained_cfg = model.default_cfg = {}  # type: ignore[assignment]
    return model


@register_model
def safe_cache_tiny_eva(pretrained: bool = False, **kwargs: Any) -> TimmEva:
    """EVA02-B/L's form (separate q/k/v, RoPE on the patch tokens, an attention inner norm,
    SwiGLU with its inner norm), plus a register token and layer scale, so the fast tests
    also cover those."""
    return _tiny(**{**_TINY, "qkv_fused": False, "mlp_ratio": 4 * 2 / 3, "swiglu_mlp": True,
                    "scale_mlp": True, "scale_attn_inner": True, "use_rot_pos_emb": True,
                    "num_reg_tokens": 1, "init_values": 0.5, "global_pool": "token", **kwargs})


@register_model
def safe_cache_tiny_eva_post(pretrained: bool = False, **kwargs: Any) -> TimmEva:
    """EVA02-E's form: post-norm blocks, fused q/k/v with q and v biases, a GELU MLP, no RoPE."""
    return _tiny(**{**_TINY, "use_post_norm": True, "mlp_ratio": 2.0, "global_pool": "token",
                    **kwargs})
