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
(`OpenClipHead`) unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def _single_query_attention(
    query: torch.Tensor,
    tokens: torch.Tensor,
    w_q: torch.Tensor,
    b_q: torch.Tensor | None,
    w_k: torch.Tensor,
    b_k: torch.Tensor | None,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights of one query token over `tokens`, without projecting the tokens.

    query (B, C), tokens (B, T, C) -> (weights (B, H, T), pooled tokens (B, H, C)) where
    pooled[b, h] = sum_j weights[b, h, j] * tokens[b, j].
    """
    batch, channels = query.shape
    head_dim = channels // num_heads
    scale = head_dim**-0.5
    q = F.linear(query, w_q, b_q).view(batch, num_heads, head_dim)
    # (B, H, d) x (H, d, C) -> (B, H, C): the key projection moved onto the single query.
    q_k = torch.einsum("bhd,hdc->bhc", q, w_k.view(num_heads, head_dim, channels)) * scale
    scores = torch.bmm(q_k, tokens.transpose(1, 2))
    if b_k is not None:
        # Constant over tokens, so softmax ignores it; kept so the bias gets its (zero) gradient
        # exactly as in open_clip's module.
        scores = scores + (q * b_k.view(num_heads, head_dim)).sum(-1, keepdim=True) * scale
    weights = scores.softmax(dim=-1)
    return weights, torch.bmm(weights, tokens)


def _project_values(
    pooled: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None, num_heads: int
) -> torch.Tensor:
    """Per-head value projection of the attention-pooled tokens: (B, H, C) -> (B, C)."""
    batch, _, channels = pooled.shape
    head_dim = channels // num_heads
    out = torch.einsum("bhc,hdc->bhd", pooled, w_v.view(num_heads, head_dim, channels))
    if b_v is not None:
        out = out + b_v.view(num_heads, head_dim)
    return out.reshape(batch, channels)


class FastAttentionPool(nn.Module):
    """open_clip's `AttentionPool2d` (ModifiedResNet) evaluated for its mean-token query only.

    Input is the channel-last dense map (B, H*W, C) that the trunk produces; output (B, D).
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(source.positional_embedding.detach().clone())
        self.k_proj = copy.deepcopy(source.k_proj)
        self.q_proj = copy.deepcopy(source.q_proj)
        self.v_proj = copy.deepcopy(source.v_proj)
        self.c_proj = copy.deepcopy(source.c_proj)
        self.num_heads = source.num_heads

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Mean token + spatial tokens with positional embedding: (B, T, C) -> (B, T+1, C)."""
        pos = self.positional_embedding.to(x.dtype)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pos

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling attention weights (B, heads, 1 + H*W); index 0 is the mean token itself."""
        tokens = self.tokens(x)
        weights, _ = self._attend(tokens)
        return weights

    def _attend(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _single_query_attention(
            tokens[:, 0], tokens, self.q_proj.weight, self.q_proj.bias,
            self.k_proj.weight, self.k_proj.bias, self.num_heads,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.positional_embedding.dtype)
        _, pooled = self._attend(self.tokens(x))
        values = _project_values(pooled, self.v_proj.weight, self.v_proj.bias, self.num_heads)
        return self.c_proj(values)


class FastClassTokenBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock` evaluated for the class token (index 0) only.

    Every token still goes through `ln_1` (keys and values need it), but only the class token goes
    through the attention output, both residuals, `ln_2` and the MLP. Children keep the block's
    names (`ln_1`, `attn`, `ls_1`, `ln_2`, `mlp`, `ls_2`).
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        for name in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
            setattr(self, name, copy.deepcopy(getattr(source, name)))

    def _weights(self) -> tuple[torch.Tensor, ...]:
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        bias = self.attn.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        return w_q, b_q, w_k, b_k, w_v, b_v

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token attention weights (B, heads, T) over all tokens (index 0 = class token)."""
        y = self.ln_1(x)
        w_q, b_q, w_k, b_k, _, _ = self._weights()
        weights, _ = _single_query_attention(y[:, 0], y, w_q, b_q, w_k, b_k, self.attn.num_heads)
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) tokens entering the block -> (B, C) class token leaving it."""
        y = self.ln_1(x)
        w_q, b_q, w_k, b_k, w_v, b_v = self._weights()
        heads = self.attn.num_heads
        _, pooled = _single_query_attention(y[:, 0], y, w_q, b_q, w_k, b_k, heads)
        attended = self.attn.out_proj(_project_values(pooled, w_v, b_v, heads))
        cls = x[:, 0] + self.ls_1(attended)
        return cls + self.ls_2(self.mlp(self.ln_2(cls)))


class _Namespace(nn.Module):
    """An empty module used only to reproduce open_clip's key prefixes (`transformer.resblocks`)."""


class ResNetPoolHead(nn.Module):
    """Head of a ModifiedResNet: attnpool (head_stages=1) or layer4 + attnpool (head_stages=2).

    Input is the channel-last dense map (B, H*W, C) of the trunk; `grid` is its (H, W).
    """

    def __init__(self, visual: nn.Module, grid: tuple[int, int], head_stages: int = 1) -> None:
        super().__init__()
        self.grid = grid
        if head_stages == 2:
            self.layer4 = copy.deepcopy(visual.layer4)
        self.attnpool = FastAttentionPool(visual.attnpool)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Dense tokens entering the pooling layer (after layer4 when the head owns it)."""
        if not hasattr(self, "layer4"):
            return x
        batch, _, channels = x.shape
        fmap = x.transpose(1, 2).reshape(batch, channels, *self.grid)
        return self.layer4(fmap).flatten(2).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling attention weights (B, heads, 1 + H*W) of the mean-token query."""
        return self.attnpool.attention(self.spatial(x.to(self.attnpool.positional_embedding.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.spatial(x.to(self.attnpool.positional_embedding.dtype)))


class ViTPoolHead(nn.Module):
    """Head of a class-token ViT: the last `head_stages` blocks + ln_post + proj, on (B, T, C).

    The final block runs in the single-query form; earlier head blocks (an ablation cut) run whole.
    """

    def __init__(self, visual: nn.Module, head_stages: int = 1) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        first = len(blocks) - head_stages
        self.transformer = _Namespace()
        self.transformer.resblocks = nn.ModuleDict()
        for index in range(first, len(blocks) - 1):
            self.transformer.resblocks[str(index)] = copy.deepcopy(blocks[index])
        self.transformer.resblocks[str(len(blocks) - 1)] = FastClassTokenBlock(blocks[-1])
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())

    def _last_input(self, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        *earlier, last = self.transformer.resblocks.values()
        x = x.to(self.proj.dtype)
        for block in earlier:
            x = block(x)
        return last, x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token attention weights (B, heads, T) in the last block (index 0 = class token)."""
        last, x = self._last_input(x)
        return last.attention(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last, x = self._last_input(x)
        return self.ln_post(last(x)) @ self.proj


class OpenClipHead(nn.Module):
    """The naive reference head: open_clip's own modules, copied, applied to every token.

    Same state-dict keys as the fast heads. Used by the exactness tests and the benchmarks; it
    computes the full (T x C x C) projections that the fast heads avoid.
    """

    def __init__(
        self, visual: nn.Module, family: str, *, grid: tuple[int, int], head_stages: int = 1
    ) -> None:
        super().__init__()
        self.family = family
        self.grid = grid
        if family == "resnet":
            if head_stages == 2:
                self.layer4 = copy.deepcopy(visual.layer4)
            self.attnpool = copy.deepcopy(visual.attnpool)
            return
        blocks = visual.transformer.resblocks
        self.transformer = _Namespace()
        first = len(blocks) - head_stages
        self.transformer.resblocks = nn.ModuleDict(
            {str(i): copy.deepcopy(blocks[i]) for i in range(first, len(blocks))}
        )
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())
        self.final_ln_after_pool = visual.final_ln_after_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "resnet":
            batch, _, channels = x.shape
            fmap = x.transpose(1, 2).reshape(batch, channels, *self.grid)
            if hasattr(self, "layer4"):
                fmap = self.layer4(fmap)
            return self.attnpool(fmap)
        for block in self.transformer.resblocks.values():
            x = block(x)
        # open_clip applies ln_post to all tokens, or (final_ln_after_pool) to the pooled one.
        pooled = self.ln_post(x[:, 0]) if self.final_ln_after_pool else self.ln_post(x)[:, 0]
        return pooled @ self.proj


def head_flops(family: str, tokens: int, channels: int, heads: int, out_dim: int) -> dict:
    """Multiply-adds per image of the naive and the fast pooling head (attention part), for docs."""
    naive = 3 * tokens * channels**2 + 2 * tokens * channels + channels * out_dim
    fast = 4 * channels**2 + 2 * heads * tokens * channels + channels * out_dim
    if family == "vit":
        naive += 8 * tokens * channels**2  # MLP on every token
        fast += 8 * channels**2  # MLP on the class token only
    return {"naive": naive, "fast": fast, "ratio": naive / fast if fast else math.inf}
