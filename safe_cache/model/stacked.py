"""Weight products of a whole grid of configurations in one batched op, gradients to each leaf.

`fit.grid.StackedHeads` keeps parameter i of every configuration as one (G, ...) storage and
hands out one leaf per configuration, a view of its row: the optimizer's param groups (one lr
and weight decay per configuration) need separate tensors. A head that multiplies each
configuration's tokens by its own weight then runs G small products; at the protocol's batch
of 8 each is a skinny GEMM whose speed on the CPU is set by how it streams the weight. One
batched product over the storage streams every configuration's weight in one op:

    measured (12 RN50 attention-pool weights of 2048 x 2048, batch 8, 2 cores, glibc heap kept
    by runtime/allocator.py): forward 38.7 ms as 12 F.linear, 22.8 ms as one bmm; the input's
    gradient 48 ms as 12 mm, 26 ms as one bmm; the weight's gradient 23 ms either way.

`stacked_product` takes the leaves themselves, so autograd writes each configuration's weight
gradient into its own leaf (views of one buffer the batched backward writes once); the weight
it multiplies is the leaves' shared storage seen as (G, ...) when they are its rows (always in
fit), else a stack of them (a copy, the same numbers: a head of one configuration, or dicts a
caller built).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def rows_of_one_storage(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (G, *shape) tensor whose row g is `leaves[g]`: a view of their storage when they are
    its evenly spaced rows, else a stacked copy. Detached: gradients go to the leaves."""
    first = leaves[0].detach()
    if len(leaves) == 1:
        return first.unsqueeze(0)
    row = leaves[1].storage_offset() - first.storage_offset()
    same = all(
        leaf.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and leaf.storage_offset() == first.storage_offset() + g * row
        and leaf.shape == first.shape and leaf.stride() == first.stride()
        for g, leaf in enumerate(leaves))
    if not same or row <= 0 or not first.is_contiguous() or row < first.numel():
        return torch.stack([leaf.detach() for leaf in leaves])
    return first.as_strided((len(leaves), *first.shape), (row, *first.stride()))


class _StackedProduct(torch.autograd.Function):
    """out = a @ W^T (or a @ W) in one bmm, W the leaves' (G * groups, rows / groups, m) view."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, transposed: bool, groups: int,
                *leaves: torch.Tensor) -> torch.Tensor:
        stacked = rows_of_one_storage(leaves)
        count, rows, width = stacked.shape
        weight = stacked.reshape(count * groups, rows // groups, width)
        ctx.save_for_backward(a, weight)
        ctx.transposed, ctx.stacked_shape = transposed, stacked.shape
        return torch.bmm(a, weight.transpose(1, 2) if transposed else weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, weight = ctx.saved_tensors
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.bmm(grad, weight if ctx.transposed else weight.transpose(1, 2))
        if ctx.transposed:  # out = a W^T: dW = grad^T a
            grad_w = torch.bmm(grad.transpose(1, 2), a)
        else:  # out = a W: dW = a^T grad
            grad_w = torch.bmm(a.transpose(1, 2), grad)
        return (grad_a, None, None, *grad_w.reshape(ctx.stacked_shape).unbind(0))


def stacked_product(a: torch.Tensor, leaves: Sequence[torch.Tensor], *, transposed: bool = True,
                    groups: int = 1) -> torch.Tensor:
    """Per configuration g and block k of its weight's rows (`groups` blocks: attention heads):
    a[g * groups + k] @ W_gk^T (`transposed`) or a[...] @ W_gk, for leaves W_g (rows, m).
    a: (G * groups, B, m) or (G * groups, B, rows / groups). Returns (G * groups, B, ...)."""
    out: torch.Tensor = _StackedProduct.apply(a, transposed, groups, *leaves)
    return out
