"""Pooling heads: the trainable part of SAFE, in the exact single-query form.

Both CLIP pooling layers attend with exactly ONE query that matters: the mean token (ResNet
`attnpool`) or the class token (ViT's last block). For one query q and tokens x_j, per head h:

    score_hj = q_h . (Wk_h x_j + bk_h) / sqrt(d) = (Wk_h^T q_h) . x_j / sqrt(d) + const_h
    out_h    = sum_j a_hj (Wv_h x_j + bv_h)       = Wv_h (sum_j a_hj x_j) + bv_h

so the per-token key and value projections (T x C x C multiply-adds per image) are never formed:
the cost drops to four C x C matrix-vector products plus 2 x heads x T x C for scores and the
weighted sum. This is exact algebra; outputs and gradients equal open_clip's modules (tests).

Parameter names and shapes are those of the open_clip modules each head replaces, and state-dict
keys are relative to `model.visual` (`attnpool.q_proj.weight`, `ln_post.weight`, `proj`,
`transformer.resblocks.11.ln_1.weight`), so
`model.visual.load_state_dict(head.state_dict(), strict=False)` puts a fine-tuned head back into
an open_clip model, and a state dict moves between the fast head and the naive reference head
(`ResNetReferenceHead`, `ViTReferenceHead`) unchanged. Which head a tower gets is its family's
choice (model/families/).

Every fast head also evaluates a whole grid of configurations at once: `forward_grid(configs, x)`
takes one parameter dict per configuration (see `fit.grid.StackedHeads`) and the shared dense map
and returns (G, B, D); the single head is the G = 1 case of the same code. Everything that touches
tokens is batched over all configurations: the ResNet positional embedding and the ViT ln_1
affine are folded into each configuration's query (`q.(w*x+b) = (q*w).x + q.b`), so the per-token
work is one product of the shared map with all G x heads queries. The ResNet pool's weight
products are one batched op over the configurations' stacked storage (model/stacked.py: 13%
off a 12-configuration RN50 step on 2 cores, measured beside the per-configuration products);
elsewhere they stay per configuration, in the orientation whose gradients torch writes without
copies (a copied C x C gradient costs more than the product itself on a 2-core CPU, measured).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import UnsupportedModelError
from . import towers
from .stacked import stacked_product

Params = dict[str, torch.Tensor]  # one configuration: open_clip names and shapes


def _per_config_tokens(keys: torch.Tensor) -> bool:
    """True for (G, B, T, C) keys (one map per configuration), False for a shared (B, T, C)."""
    return keys.dim() == 4


def _token_scores(query_keys: Sequence[torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
    """Each configuration's q_k (H, B, C) . keys_j for every token j -> (G, H, B, T).

    All G x H queries meet the shared map in one product; they are stacked straight into the
    layout that product needs (one copy).
    """
    grid = len(query_keys)
    heads, batch, channels = query_keys[0].shape
    if _per_config_tokens(keys):
        lhs = torch.stack([q.transpose(0, 1) for q in query_keys])  # (G, B, H, C)
        scores = torch.bmm(lhs.view(grid * batch, heads, channels),
                           keys.flatten(0, 1).transpose(1, 2))
        return scores.view(grid, batch, heads, -1).transpose(1, 2)
    lhs = torch.stack([q.transpose(0, 1) for q in query_keys], dim=1)  # (B, G, H, C)
    scores = torch.bmm(lhs.view(batch, grid * heads, channels), keys.transpose(1, 2))
    return scores.view(batch, grid, heads, -1).permute(1, 2, 0, 3)


def _token_pool(weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """sum_j weights_j keys_j: weights (G, H, B, T) -> (G, H, B, C)."""
    grid, heads, batch, tokens = weights.shape
    if _per_config_tokens(keys):
        lhs = weights.transpose(1, 2).reshape(grid * batch, heads, tokens)
        pooled = torch.bmm(lhs, keys.flatten(0, 1))
        return pooled.view(grid, batch, heads, -1).transpose(1, 2)
    lhs = weights.permute(2, 0, 1, 3).reshape(batch, grid * heads, tokens)
    pooled = torch.bmm(lhs, keys)
    return pooled.view(batch, grid, heads, -1).permute(1, 2, 0, 3)


def _query_keys(q: torch.Tensor, w_k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Move the key projection onto the query: per head Wk_h^T q_h / sqrt(d). (B, E) -> (H, B, C)
    for a key projection w_k (E, C) (E = C except where keys come from another width: CoCa).

    The weight is the untransposed second operand: its gradient q^T @ grad has its own layout.
    """
    batch = q.shape[0]
    width, channels = w_k.shape
    head_dim = width // num_heads
    q_heads = q.view(batch, num_heads, head_dim).transpose(0, 1)
    query_keys: torch.Tensor = (torch.bmm(q_heads, w_k.view(num_heads, head_dim, channels))
                                * head_dim**-0.5)
    return query_keys


class _HeadwiseProjection(torch.autograd.Function):
    """out[h] = pooled[h] @ W[h]^T for each attention head, (H, B, C) x (H, d, C) -> (H, B, d).

    torch's generic bmm backward returns this weight gradient transposed and then copies it into
    the weight's layout (a full C x C copy per step); here both gradients are computed directly
    in the layouts of their inputs.
    """

    @staticmethod
    def forward(ctx: Any, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pooled, weight)
        return torch.bmm(pooled, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pooled, weight = ctx.saved_tensors
        grad_pooled = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), pooled) if ctx.needs_input_grad[1] else None
        return grad_pooled, grad_weight


def _project_values(
    pooled: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None
) -> torch.Tensor:
    """Per-head value projection of the pooled tokens: (H, B, C) -> (B, E), w_v (E, C)."""
    heads, batch, channels = pooled.shape
    width = w_v.shape[0]
    out: torch.Tensor = _HeadwiseProjection.apply(pooled, w_v.view(heads, width // heads, channels))
    out = out.transpose(0, 1).reshape(batch, width)
    return out if b_v is None else out + b_v


def _key_bias_score(q: torch.Tensor, b_k: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """q_h . bk_h / sqrt(d) (H, B, 1): constant over tokens, so softmax ignores it; kept so the key
    bias gets its exact (zero) gradient as in open_clip."""
    batch, channels = q.shape
    if b_k is None:
        return q.new_zeros(num_heads, batch, 1)
    head_dim = channels // num_heads
    dot = (q.view(batch, num_heads, head_dim) * b_k.view(num_heads, head_dim)).sum(-1)
    score: torch.Tensor = dot.transpose(0, 1).unsqueeze(-1) * head_dim**-0.5
    return score


def _layer_norm(x: torch.Tensor, params: Params, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], params.get(prefix + "weight"),
                        params.get(prefix + "bias"), eps)


def _layer_scale(x: torch.Tensor, params: Params, name: str) -> torch.Tensor:
    gamma = params.get(name + ".gamma")
    return x if gamma is None else x * gamma


def _strip(configs: Sequence[Params], prefix: str) -> list[Params]:
    return [{k[len(prefix):]: v for k, v in c.items() if k.startswith(prefix)} for c in configs]


def attnpool_grid(configs: Sequence[Params], x: torch.Tensor, num_heads: int,
                  prefix: str = "", keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionPool2d for its mean-token query, for every configuration in `configs`.

    x: the channel-last map, shared (B, T, C) or per configuration (G, B, T, C).
    Returns (pooled (G, B, D), attention weights (G, H, B, 1 + T); key 0 is the mean token).
    A configuration without `c_proj.weight` pools to the values c_proj would project (B, E).
    Each weight product is one batched op over the configurations (model/stacked.py).
    `keep` (B, T) bool: the pool over the kept tokens only, as open_clip's pool on that subset
    (the mean token their mean, a zero vector when none is kept; the others neither keys nor
    values): what Shapley's coalitions evaluate (analysis/shapley.py).
    """
    configs = _strip(configs, prefix)
    x = x.to(configs[0]["positional_embedding"].dtype)
    grid, heads = len(configs), num_heads

    def leaves(name: str) -> list[torch.Tensor]:
        return [p[name] for p in configs]

    def biases(name: str) -> torch.Tensor | None:
        return torch.stack(leaves(name))[:, None] if name in configs[0] else None

    # Keys before the positional embedding: the mean token, then the spatial tokens; shared
    # across configurations unless the map itself is per configuration.
    if keep is None:
        mean = x.mean(dim=-2, keepdim=True)
    else:
        weight = keep.to(x.dtype)[..., None]  # (B, T, 1)
        mean = (x * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp(min=1)
    keys = torch.cat([mean, x], dim=-2)
    pos = torch.stack(leaves("positional_embedding"))  # (G, 1 + T, C)
    base = keys[..., 0, :]  # (B, C) or (G, B, C)
    q = stacked_product(base + pos[:, :1], leaves("q_proj.weight"))  # (G, B, E)
    q = q if (b_q := biases("q_proj.bias")) is None else q + b_q
    batch, width = q.shape[1:]
    head_dim = width // heads
    q_heads = q.view(grid, batch, heads, head_dim).transpose(1, 2).reshape(-1, batch, head_dim)
    query_keys = stacked_product(q_heads * head_dim**-0.5, leaves("k_proj.weight"),
                                 transposed=False, groups=heads).view(grid, heads, batch, -1)
    # unbind, not [g]: indexing one configuration at a time would make autograd zero-fill a
    # whole (G, ...) gradient per configuration.
    bias = torch.stack([_key_bias_score(q_g, p.get("k_proj.bias"), heads)
                        for q_g, p in zip(q.unbind(0), configs, strict=True)])
    # The positional part of each key and of the pooled token: one product per configuration
    # over its H x B queries (a broadcast matmul would copy pos once per head)
    pos_scores = torch.bmm(query_keys.flatten(1, 2), pos.transpose(1, 2)).view(
        grid, heads, batch, -1) + bias
    scores = _token_scores(query_keys.unbind(0), keys) + pos_scores
    if keep is not None:  # the mean token (key 0) always attends
        scores = _masked(scores, torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1))
    weights = scores.softmax(dim=-1)
    pooled = _token_pool(weights, keys) + torch.bmm(weights.flatten(1, 2), pos).view(
        grid, heads, batch, -1)  # (G, H, B, C)
    values = stacked_product(pooled.flatten(0, 1), leaves("v_proj.weight"), groups=heads)
    values = values.view(grid, heads, batch, head_dim).transpose(1, 2).reshape(grid, batch, -1)
    values = values if (b_v := biases("v_proj.bias")) is None else values + b_v
    if "c_proj.weight" not in configs[0]:
        return values, weights
    out = stacked_product(values, leaves("c_proj.weight"))
    return (out if (b_c := biases("c_proj.bias")) is None else out + b_c), weights


def keep_prefix(keep: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, tokens) bool: a spatial keep mask (B, H*W) over the map's last H*W tokens, the
    prefix tokens before them (class token, registers) always kept."""
    prefix = torch.ones(keep.shape[0], tokens - keep.shape[1], dtype=torch.bool,
                        device=keep.device)
    return torch.cat([prefix, keep.bool()], dim=1)


def _masked(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scores (G, H, B, K) with the keys not kept ((B, K) False) at -inf: softmax gives them no
    weight, as if they were not there."""
    return scores.masked_fill(~keep.bool()[None, None], float("-inf"))


def class_token_block_grid(
    configs: Sequence[Params], x: torch.Tensor, block: towers.ResidualAttentionBlock, prefix: str,
    keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ResidualAttentionBlock evaluated for the class token only, for every configuration.

    `block` supplies the structure (heads, eps, activation); its own parameters are not used.
    x: tokens entering the block, shared (B, T, C) or per configuration (G, B, T, C).
    Returns (class token leaving the block (G, B, C), attention weights (G, H, B, T)).
    `keep` (B, T) bool: the block on the kept tokens only (the class token must be kept).
    """
    configs = _strip(configs, prefix)
    x = x.to(configs[0]["attn.in_proj_weight"].dtype)
    heads, channels = block.attn.num_heads, x.shape[-1]
    normed = F.layer_norm(x, (channels,), eps=block.ln_1.eps)  # ln_1 without its affine: shared
    per_config = _per_config_tokens(x)
    scaled_keys, extra, queries = [], [], []
    for g, p in enumerate(configs):
        w_q, w_k, _ = torch.split(p["attn.in_proj_weight"], channels)
        b_q, b_k, _ = _split_bias(p.get("attn.in_proj_bias"), channels)
        ln_w, ln_b = p["ln_1.weight"], p["ln_1.bias"]
        first = normed[g, :, 0] if per_config else normed[:, 0]
        q = F.linear(first * ln_w + ln_b, w_q, b_q)  # query from ln_1(x)[class token]
        q_k = _query_keys(q, w_k, heads)
        # q_k . (w * x_j + b) = (q_k * w) . x_j + q_k . b: the ln_1 affine moves onto the query.
        scaled_keys.append(q_k * ln_w)
        extra.append(torch.matmul(q_k, ln_b).unsqueeze(-1) + _key_bias_score(q, b_k, heads))
        queries.append(q)
    scores = _token_scores(scaled_keys, normed) + torch.stack(extra)
    weights = (scores if keep is None else _masked(scores, keep)).softmax(-1)
    pooled = _token_pool(weights, normed).unbind(0)  # unbind: see attnpool_grid
    outputs = []
    for g, p in enumerate(configs):
        _, _, w_v = torch.split(p["attn.in_proj_weight"], channels)
        _, _, b_v = _split_bias(p.get("attn.in_proj_bias"), channels)
        # sum_j a_j (w * x_j + b) = w * (sum_j a_j x_j) + b, because the weights sum to one.
        pooled_g = pooled[g] * p["ln_1.weight"] + p["ln_1.bias"]
        attended = F.linear(_project_values(pooled_g, w_v, b_v), p["attn.out_proj.weight"],
                            p.get("attn.out_proj.bias"))
        cls = (x[g, :, 0] if per_config else x[:, 0]) + _layer_scale(attended, p, "ls_1")
        hidden = F.linear(_layer_norm(cls, p, "ln_2.", block.ln_2.eps), p["mlp.c_fc.weight"],
                          p.get("mlp.c_fc.bias"))
        hidden = F.linear(block.mlp.gelu(hidden), p["mlp.c_proj.weight"],
                          p.get("mlp.c_proj.bias"))
        outputs.append(cls + _layer_scale(hidden, p, "ls_2"))
    return torch.stack(outputs), weights


def _split_bias(bias: torch.Tensor | None, channels: int) -> tuple[torch.Tensor | None, ...]:
    return torch.split(bias, channels) if bias is not None else (None, None, None)


def _run_per_config(
    module: nn.Module, configs: Sequence[Params], prefix: str, x: torch.Tensor, shared: bool
) -> torch.Tensor:
    """Run a whole open_clip module (an ablation stage) once per configuration -> (G, B, ...).

    x is shared by every configuration, or (shared=False) has a leading grid axis.
    """
    return torch.stack([
        functional_call(module, p, (x if shared else x[g],))
        for g, p in enumerate(_strip(configs, prefix))
    ])


class _Namespace(nn.Module):
    """An empty module used only to reproduce open_clip's key prefixes (`transformer.resblocks`)."""


class _Transformer(_Namespace):
    """`transformer.`: the head's blocks, under their index in the tower (`resblocks.11.`)."""

    resblocks: nn.ModuleDict


class FastAttentionPool(nn.Module):
    """open_clip's `AttentionPool2d` (ModifiedResNet) evaluated for its mean-token query only.

    Same parameter names as AttentionPool2d. Input: the channel-last map (B, H*W, C).
    """

    def __init__(self, source: towers.AttentionPool2d) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(source.positional_embedding.detach().clone())
        self.k_proj = copy.deepcopy(source.k_proj)
        self.q_proj = copy.deepcopy(source.q_proj)
        self.v_proj = copy.deepcopy(source.v_proj)
        self.c_proj = copy.deepcopy(source.c_proj)
        self.num_heads = source.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attnpool_grid([dict(self.named_parameters())], x, self.num_heads)[0][0]


class FastClassTokenBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock` evaluated for the class token (index 0) only.

    Children keep the block's names (`ln_1`, `attn`, `ls_1`, `ln_2`, `mlp`, `ls_2`).
    """

    ln_1: nn.LayerNorm
    attn: nn.MultiheadAttention
    ls_1: nn.Module
    ln_2: nn.LayerNorm
    mlp: towers.BlockMlp
    ls_2: nn.Module

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        for name in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
            setattr(self, name, copy.deepcopy(getattr(source, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) tokens entering the block -> (B, C) class token leaving it."""
        return class_token_block_grid([dict(self.named_parameters())], x, self, "")[0][0]


class GridHead(nn.Module):
    """A head that can also evaluate several configurations of itself on one shared map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_grid([dict(self.named_parameters())], x)[0]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling attention weights (B, heads, keys) of the single query (sum to 1 over keys)."""
        return self.attention_grid([dict(self.named_parameters())], x)[0].transpose(0, 1)

    def forward_grid(self, configs: Sequence[Params], x: torch.Tensor) -> torch.Tensor:
        """(G, B, D) for G parameter dicts (this head's names and shapes) on one map."""
        return self._grid(configs, x)[0]

    def attention_grid(self, configs: Sequence[Params], x: torch.Tensor) -> torch.Tensor:
        """(G, heads, B, keys) attention weights of each configuration's query."""
        return self._grid(configs, x)[1]

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs (G, B, D), attention weights (G, heads, B, keys)) of every configuration."""
        raise NotImplementedError

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The head's output (B, D) with only the kept spatial tokens ((B, H*W) bool over the
        map's last H*W tokens) as the pooling's keys and values: parts removed for Shapley's
        coalitions. Heads whose pooling reads the tokens otherwise refuse."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot pool a subset of its tokens"
                                    f" (ResNet attention pools, MAP and CoCa pools, and the"
                                    f" ViT and EVA heads of one block can; a cut with earlier"
                                    f" head blocks mixes every token first).")

    # --- the final projection, what ProLIP fine-tunes ------------------------------------------

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's last op when it is a linear map, `out = pre @ weight.T + bias`: (weight
        (D, P), bias (D,) or None), the head's own tensors (a ViT's `proj` (P, D) transposed).
        A head that ends otherwise (an MLP, a norm, the pool itself) raises
        UnsupportedModelError: there is no projection to fine-tune apart from the pooling."""
        final = self._linear_tail()[1]
        return final.weight, final.bias

    def pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """What the final projection takes, from the dense map (B, T, C): (B, P), so that
        `pre_projection(x) @ weight.T + bias` is `self(x)` (eval mode: dropout is the identity).
        Computed once, it lets a method train the projection without the pooling."""
        before, _ = self._linear_tail()
        pooled = self._tail_input(x)
        for module in before:
            pooled = module(pooled)
        return pooled

    def _tail(self) -> list[nn.Module]:
        """Modules applied in turn to the one pooled vector at the head's end (timm towers:
        norms, timm's classifier, open_clip's head); empty for heads whose projection is a
        parameter of their own (they override projection and pre_projection)."""
        return []

    def _tail_input(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector entering `_tail()`, (B, C), with the head's own parameters."""
        raise NotImplementedError

    def _linear_tail(self) -> tuple[list[nn.Module], nn.Linear]:
        """`_tail()` split at its last op, which must be a linear map: (the ops before, it)."""
        ops = [m for m in _leaves(self._tail()) if not isinstance(m, nn.Identity | nn.Dropout)]
        if not ops or not isinstance(ops[-1], nn.Linear):
            last = type(ops[-1]).__name__ if ops else "its pooling"
            raise UnsupportedModelError(f"{type(self).__name__} does not end in a linear"
                                        f" projection (its last op is {last}).")
        return ops[:-1], ops[-1]


def _leaves(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The modules, nn.Sequential containers flattened into the modules they run in turn."""
    out: list[nn.Module] = []
    for module in modules:
        out.extend(_leaves(list(module)) if isinstance(module, nn.Sequential) else [module])
    return out


class ResNetPoolHead(GridHead):
    """Head of a ModifiedResNet: attnpool (head_stages=1) or layer4 + attnpool (head_stages=2).

    Input is the channel-last dense map (B, H*W, C) of the trunk; `token_grid` is its (H, W).
    Attention keys: index 0 is the mean token, then the H*W spatial positions.
    """

    def __init__(self, visual: towers.ModifiedResNet, token_grid: tuple[int, int],
                 head_stages: int = 1) -> None:
        super().__init__()
        self.token_grid = token_grid
        if head_stages == 2:
            self.layer4 = copy.deepcopy(visual.layer4)
        self.attnpool = FastAttentionPool(visual.attnpool)

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.attnpool.positional_embedding.dtype)
        if hasattr(self, "layer4"):
            batch, _, channels = x.shape
            fmap = x.transpose(1, 2).reshape(batch, channels, *self.token_grid)
            x = _run_per_config(self.layer4, configs, "layer4.", fmap, shared=True)
            x = x.flatten(3).transpose(2, 3)
        return attnpool_grid(configs, x, self.attnpool.num_heads, "attnpool.")

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "layer4"):
            return super().masked(x, keep)  # layer4's convolutions mix the tokens first
        x = x.to(self.attnpool.positional_embedding.dtype)
        out, _ = attnpool_grid([dict(self.named_parameters())], x, self.attnpool.num_heads,
                               "attnpool.", keep=keep)
        return out[0]

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attnpool's output projection c_proj (D, E) and its bias: the pool's last op."""
        c_proj: nn.Linear = self.attnpool.c_proj
        return c_proj.weight, c_proj.bias

    def pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled values (B, E) that c_proj projects: the head without c_proj."""
        own: Params = {k: v for k, v in self.named_parameters()
                       if not k.startswith("attnpool.c_proj.")}
        values: torch.Tensor = self._grid([own], x)[0][0]
        return values


class ViTPoolHead(GridHead):
    """Head of a class-token ViT: the last `head_stages` blocks + ln_post + proj, on (B, T, C).

    The final block runs in the single-query form; earlier head blocks (an ablation cut) run
    whole, once per configuration. Attention keys: index 0 is the class token.
    """

    def __init__(self, visual: towers.VisionTransformer, head_stages: int = 1) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        first = len(blocks) - head_stages
        self.transformer = _Transformer()
        self.transformer.resblocks = nn.ModuleDict()
        for index in range(first, len(blocks) - 1):
            self.transformer.resblocks[str(index)] = copy.deepcopy(blocks[index])
        self.transformer.resblocks[str(len(blocks) - 1)] = FastClassTokenBlock(blocks[-1])
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())

    def _grid(self, configs: Sequence[Params],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.proj.dtype)
        *earlier, (last_name, last) = self.transformer.resblocks.items()
        for position, (name, block) in enumerate(earlier):
            prefix = f"transformer.resblocks.{name}."
            x = _run_per_config(block, configs, prefix, x, shared=position == 0)
        prefix = f"transformer.resblocks.{last_name}."
        cls, weights = class_token_block_grid(configs, x, cast(FastClassTokenBlock, last), prefix)
        pooled = [_layer_norm(cls_g, p, "ln_post.", self.ln_post.eps) @ p["proj"]
                  for cls_g, p in zip(cls.unbind(0), configs, strict=True)]
        return torch.stack(pooled), weights

    def masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        *earlier, (last_name, last) = self.transformer.resblocks.items()
        if earlier:
            return super().masked(x, keep)  # earlier blocks mix the tokens first
        x = x.to(self.proj.dtype)
        params: Params = dict(self.named_parameters())
        cls, _ = class_token_block_grid([params], x, cast(FastClassTokenBlock, last),
                                        f"transformer.resblocks.{last_name}.",
                                        keep=keep_prefix(keep, x.shape[1]))
        return _layer_norm(cls[0], params, "ln_post.", self.ln_post.eps) @ params["proj"]

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """proj (width, D) as a linear map's weight (D, width), a view; no bias."""
        return self.proj.T, None

    def pre_projection(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post of the class token leaving the last block (B, width), what proj projects:
        `_grid`'s path for this head's own parameters, stopped before proj."""
        x = x.to(self.proj.dtype)
        *earlier, (last_name, last) = self.transformer.resblocks.items()
        for _, block in earlier:  # an ablation cut's whole blocks
            x = block(x)
        assert isinstance(last, FastClassTokenBlock)  # the head's own last block
        cls = class_token_block_grid([dict(self.named_parameters())], x, last,
                                     f"transformer.resblocks.{last_name}.")[0][0]
        normed: torch.Tensor = self.ln_post(cls)
        return normed


class ResNetReferenceHead(nn.Module):
    """The naive reference for ResNetPoolHead: open_clip's layer4 (cut 'layer4') and attnpool,
    copied, applied to every token: the full (T x C x C) projections the fast head avoids.

    Same state-dict keys as the fast head; used by the exactness tests and the benchmarks.
    """

    def __init__(self, visual: towers.ModifiedResNet, token_grid: tuple[int, int],
                 head_stages: int = 1) -> None:
        super().__init__()
        self.token_grid = token_grid
        if head_stages == 2:
            self.layer4 = copy.deepcopy(visual.layer4)
        self.attnpool = copy.deepcopy(visual.attnpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        fmap = x.transpose(1, 2).reshape(batch, channels, *self.token_grid)
        if hasattr(self, "layer4"):
            fmap = self.layer4(fmap)
        return self.attnpool(fmap)


class ViTReferenceHead(nn.Module):
    """The naive reference for ViTPoolHead: open_clip's last `head_stages` blocks, ln_post and
    proj, copied, every token through every block. Same state-dict keys as the fast head."""

    def __init__(self, visual: towers.VisionTransformer, head_stages: int = 1) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        self.transformer = _Transformer()
        first = len(blocks) - head_stages
        self.transformer.resblocks = nn.ModuleDict(
            {str(i): copy.deepcopy(blocks[i]) for i in range(first, len(blocks))}
        )
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())
        self.final_ln_after_pool = visual.final_ln_after_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer.resblocks.values():
            x = block(x)
        # open_clip applies ln_post to all tokens, or (final_ln_after_pool) to the pooled one.
        pooled: torch.Tensor = (self.ln_post(x[:, 0]) if self.final_ln_after_pool
                                else self.ln_post(x)[:, 0])
        return pooled @ self.proj
