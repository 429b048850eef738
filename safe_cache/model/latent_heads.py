"""Heads whose pooling query is a learned latent: SigLIP / PE-Core MAP heads and CoCa's pooler.

timm's `AttentionPoolLatent` (SigLIP, SigLIP 2, PE-Core: `trunk.attn_pool`) and open_clip's
`AttentionalPooler` (CoCa: `attn_pool`) attend over every patch token with a query that does not
depend on the image: q = Wq latent + bq (MAP), q = Wq ln_q(query_0) + bq (CoCa; only query 0
reaches the contrastive embedding: the others are per-query outputs that `_global_pool` drops).
The single-query algebra of heads.py applies, with one more saving: per training step the key
projection folds into ONE vector per head, Wk_h^T q_h / sqrt(d), shared by the whole batch, so no
token is ever key-projected, and values are projected after pooling:

    score_hj = (Wk_h^T q_h) . x_j / sqrt(d) + q_h . bk_h / sqrt(d)
    out_h    = Wv_h (sum_j a_hj x_j) + bv_h

CoCa keys pass through ln_k first; as for the ViT block, its affine moves onto the query and the
pooled sum (`q.(w*n+b) = (q*w).n + q.b`; the weights sum to one). Everything after the attention
(MAP: proj, norm + MLP residual, fc_norm, timm's classifier and open_clip's projection; CoCa:
out_proj, ln_post, proj) acts on one vector per image and runs as the module itself
(`functional_call`), so it is exact by construction. Parameter names are relative to
`model.visual`, as for the other heads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call

from . import towers
from .heads import (
    GridHead,
    Params,
    _key_bias_score,
    _masked,
    _Namespace,
    _project_values,
    _query_keys,
    _split_bias,
    _strip,
    _token_pool,
    _token_scores,
    keep_prefix,
)

MapTower = towers.TimmModel[VisionTransformer]  # open_clip's TimmModel around a timm ViT


def _call(module: nn.Module, params: Params, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Run `module` with the configuration's parameters under `prefix` (none for Identity)."""
    [own] = _strip([params], prefix)
    out: torch.Tensor = functional_call(module, own, (x,)) if own else module(x)
    return out


def _latent_attention(query_keys: list[torch.Tensor], extra: list[torch.Tensor],
                      keys: torch.Tensor, keep: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Softmax over tokens of every configuration's image-independent query, and the pooled
    keys: (weights (G, H, B, T), pooled per configuration (H, B, C)). `keep` (B, T) bool: only
    those tokens are keys and values; an image with none kept pools nothing (zero weights:
    the sum over an empty set, so the value projection gives its bias alone)."""
    batch = keys.shape[-3]
    expanded = [q.expand(-1, batch, -1) for q in query_keys]
    scores = (_token_scores(expanded, keys)
              + torch.stack([e.expand(-1, batch, -1) for e in extra]))
    if keep is None:
        weights = scores.softmax(-1)
    else:
        weights = _masked(scores, keep).softmax(-1).nan_to_num(0.0)  # none kept: 0/0
    return weights, _token_pool(weights, keys).unbind(0)  # unbind: see heads.attnpool_grid


def map_pool_grid(configs: Sequence[Params], x: torch.Tensor, pool: AttentionPoolLatent,
                  prefix: str, keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's AttentionPoolLatent (first latent, `pool='token'`) for every configuration.

    `pool` supplies the structure (heads, norm, MLP); x (B, T, C) or (G, B, T, C).
    Returns (pooled (G, B, C), attention weights (G, H, B, T)). `keep` (B, T) bool: the pool
    on the kept tokens only, as timm's module on that subset (Shapley's coalitions).
    """
    configs = _strip(configs, prefix)
    x = x.to(configs[0]["kv.weight"].dtype)
    heads, channels = pool.num_heads, x.shape[-1]
    query_keys, extra = [], []
    for p in configs:
        latent = p["latent"][:, 0]  # (1, latent_dim): the first latent is the pooled one
        q = F.linear(latent, p["q.weight"], p.get("q.bias")) if "q.weight" in p else latent
        w_k, _ = torch.split(p["kv.weight"], channels)
        b_k = torch.split(p["kv.bias"], channels)[0] if "kv.bias" in p else None
        query_keys.append(_query_keys(q, w_k, heads))  # (H, 1, C): once per step, not per image
        extra.append(_key_bias_score(q, b_k, heads))
    weights, pooled = _latent_attention(query_keys, extra, x, keep)
    outputs = []
    for p, pooled_g in zip(configs, pooled, strict=True):
        _, w_v = torch.split(p["kv.weight"], channels)
        b_v = torch.split(p["kv.bias"], channels)[1] if "kv.bias" in p else None
        y = _call(pool.proj, p, "proj.", _project_values(pooled_g, w_v, b_v))
        if pool.mlp is not None:
            y = y + _call(pool.mlp, p, "mlp.", _call(pool.norm, p, "norm.", y))
        outputs.append(y)
    return torch.stack(outputs), weights


def coca_pool_grid(configs: Sequence[Params], x: torch.Tensor,
                   pooler: towers.AttentionalPooler, prefix: str,
                   keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's AttentionalPooler for its first query only (the one CoCa's contrastive
    embedding keeps), every configuration. Returns ((G, B, width), weights (G, H, B, T)).
    `keep` (B, T) bool: the pooler on the kept tokens only (ln_k is per token)."""
    configs = _strip(configs, prefix)
    attn = pooler.attn
    x = x.to(configs[0]["ln_k.weight"].dtype)
    heads, width = attn.num_heads, attn.embed_dim
    normed = F.layer_norm(x, x.shape[-1:], eps=pooler.ln_k.eps)  # ln_k without its affine
    query_keys, extra, projections = [], [], []
    for p in configs:
        w_q, w_k, w_v = _mha_weights(p, width)
        b_q, b_k, b_v = _split_bias(p.get("attn.in_proj_bias"), width)
        query = F.layer_norm(p["query"][:1], (width,), p["ln_q.weight"], p["ln_q.bias"],
                             pooler.ln_q.eps)
        q = F.linear(query, w_q, b_q)  # (1, width)
        q_k = _query_keys(q, w_k, heads)  # (H, 1, C)
        query_keys.append(q_k * p["ln_k.weight"])
        extra.append(torch.matmul(q_k, p["ln_k.bias"]).unsqueeze(-1)
                     + _key_bias_score(q, b_k, heads))
        projections.append((w_v, b_v))
    weights, pooled = _latent_attention(query_keys, extra, normed, keep)
    outputs = []
    for p, pooled_g, (w_v, b_v) in zip(configs, pooled, projections, strict=True):
        pooled_g = pooled_g * p["ln_k.weight"] + p["ln_k.bias"]
        values = _project_values(pooled_g, w_v, b_v)
        outputs.append(F.linear(values, p["attn.out_proj.weight"], p.get("attn.out_proj.bias")))
    return torch.stack(outputs), weights


def _mha_weights(p: Params, width: int) -> tuple[torch.Tensor, ...]:
    """(Wq, Wk, Wv) of nn.MultiheadAttention, packed (same widths) or separate (kdim != width)."""
    if "attn.in_proj_weight" in p:
        return torch.split(p["attn.in_proj_weight"], width)
    return p["attn.q_proj_weight"], p["attn.k_proj_weight"], p["attn.v_proj_weight"]


class _MapTrunkModules(_Namespace):
    """`trunk.`: the modules of timm's forward_head, under timm's names."""

    attn_pool: AttentionPoolLatent
    fc_norm: nn.Module
    head: nn.Module


class MapPoolHead(GridHead):
    """Head of an open_clip TimmModel whose timm trunk pools with a MAP head (SigLIP, PE-Core):
    trunk.attn_pool, trunk.fc_norm, trunk.head (timm's forward_head), then open_clip's head.

    Input: the trunk's `forward_features` tokens (B, T, C); prefix tokens are dropped first where
    timm drops them (`pool_include_prefix=False`). Attention keys: the pooled tokens.
    """

    def __init__(self, visual: MapTower) -> None:
        super().__init__()
        trunk = visual.trunk
        self.skip_tokens = 0 if getattr(trunk, "pool_include_prefix", True) \
            else int(getattr(trunk, "num_prefix_tokens", 0))
        self.trunk = _MapTrunkModules()
        for name in ("attn_pool", "fc_norm", "head"):
            setattr(self.trunk, name, copy.deepcopy(getattr(trunk, name)))
        self.head = copy.deepcopy(visual.head)

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[..., self.skip_tokens:, :]
        pooled, weights = map_pool_grid(configs, x, self.trunk.attn_pool, "trunk.attn_pool.")
        outputs = []
        for p, y in zip(configs, pooled.unbind(0), strict=True):
            y = _call(self.trunk.fc_norm, p, "trunk.fc_norm.", y)
            y = _call(self.trunk.head, p, "trunk.head.", y)
            outputs.append(_call(self.head, p, "head.", y))
        return torch.stack(outputs), weights

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The MAP pool on the kept spatial tokens (and the prefix tokens it pools, which
        always stay); its query is a learned latent, so nothing else changes."""
        x = x[..., self.skip_tokens:, :]
        params: Params = dict(self.named_parameters())
        pooled, _ = map_pool_grid([params], x, self.trunk.attn_pool, "trunk.attn_pool.",
                                  keep=keep_prefix(keep, x.shape[-2]))
        y = _call(self.trunk.fc_norm, params, "trunk.fc_norm.", pooled[0])
        y = _call(self.trunk.head, params, "trunk.head.", y)
        return _call(self.head, params, "head.", y)

    def _tail(self) -> list[nn.Module]:
        return [self.trunk.fc_norm, self.trunk.head, self.head]

    def _tail_input(self, x: torch.Tensor) -> torch.Tensor:
        """The MAP pool's output (B, C), before fc_norm and the heads."""
        pooled: torch.Tensor = map_pool_grid([dict(self.named_parameters())],
                                             x[..., self.skip_tokens:, :], self.trunk.attn_pool,
                                             "trunk.attn_pool.")[0][0]
        return pooled


class CocaPoolHead(GridHead):
    """Head of CoCa's VisionTransformer: attn_pool (first query), ln_post, proj. Input: all
    tokens (B, T, C) leaving the transformer; attention keys: those tokens (class token first)."""

    def __init__(self, visual: towers.CocaVisionTransformer) -> None:
        super().__init__()
        self.attn_pool = copy.deepcopy(visual.attn_pool)
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = coca_pool_grid(configs, x, self.attn_pool, "attn_pool.")
        outputs = [_call(self.ln_post, p, "ln_post.", y) @ p["proj"]
                   for p, y in zip(configs, pooled.unbind(0), strict=True)]
        return torch.stack(outputs), weights

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The pooler on the kept spatial tokens (the class token, first, always stays); its
        queries are learned, so nothing else changes."""
        params: Params = dict(self.named_parameters())
        pooled, _ = coca_pool_grid([params], x, self.attn_pool, "attn_pool.",
                                   keep=keep_prefix(keep, x.shape[-2]))
        out: torch.Tensor = _call(self.ln_post, params, "ln_post.", pooled[0]) @ params["proj"]
        return out

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """proj (width, D) as a linear map's weight (D, width), a view; no bias."""
        return self.proj.T, None

    def pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post of the pooler's first query (B, width): what proj projects."""
        pooled = coca_pool_grid([dict(self.named_parameters())], x, self.attn_pool,
                                "attn_pool.")[0][0]
        normed: torch.Tensor = self.ln_post(pooled)
        return normed


class MapReferenceHead(nn.Module):
    """The naive reference for MapPoolHead: timm's forward_head and open_clip's head, copied."""

    def __init__(self, visual: MapTower) -> None:
        super().__init__()
        fast = MapPoolHead(visual)
        self.skip_tokens, self.trunk, self.head = fast.skip_tokens, fast.trunk, fast.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk.attn_pool(x[:, self.skip_tokens:])
        embedding: torch.Tensor = self.head(self.trunk.head(self.trunk.fc_norm(x)))
        return embedding


class CocaReferenceHead(nn.Module):
    """The naive reference for CocaPoolHead: all 256 queries, ln_post, the first one, proj."""

    def __init__(self, visual: towers.CocaVisionTransformer) -> None:
        super().__init__()
        self.attn_pool = copy.deepcopy(visual.attn_pool)
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first: torch.Tensor = self.ln_post(self.attn_pool(x))[:, 0]
        return first @ self.proj
