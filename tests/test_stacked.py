"""One batched weight product over a grid's stacked storage equals the per-configuration products,
outputs and each leaf's gradient (model/stacked.py)."""

from __future__ import annotations

import pytest
import torch

from safe_cache.model.stacked import rows_of_one_storage, stacked_product


def leaves_of(storage: torch.Tensor) -> list[torch.Tensor]:
    """One leaf per row, a view of the storage (as fit.grid.StackedHeads makes them)."""
    return [torch.nn.Parameter(storage[g]) for g in range(storage.shape[0])]


def test_rows_of_one_storage_is_a_view_and_anything_else_a_copy():
    storage = torch.randn(3, 4, 5)
    view = rows_of_one_storage(leaves_of(storage))
    assert view.data_ptr() == storage.data_ptr() and torch.equal(view, storage)
    apart = [torch.randn(4, 5) for _ in range(3)]  # separate tensors: stacked, same values
    copy = rows_of_one_storage(apart)
    assert torch.equal(copy, torch.stack(apart))
    shuffled = leaves_of(storage)[::-1]  # rows of one storage, but not in order
    assert torch.equal(rows_of_one_storage(shuffled), storage.flip(0))


@pytest.mark.parametrize("transposed, groups", [(True, 1), (False, 4), (True, 4)])
@pytest.mark.parametrize("shared_storage", [True, False])
def test_outputs_and_every_leafs_gradient_equal_the_per_configuration_products(
        transposed, groups, shared_storage):
    generator = torch.Generator().manual_seed(0)
    count, rows, width, batch = 3, 8, 6, 5
    storage = torch.randn(count, rows, width, generator=generator, dtype=torch.float64)
    leaves = leaves_of(storage) if shared_storage else [
        torch.nn.Parameter(storage[g].clone()) for g in range(count)]
    inner = width if transposed else rows // groups
    a = torch.randn(count * groups, batch, inner, generator=generator, dtype=torch.float64,
                    requires_grad=True)
    out = stacked_product(a, leaves, transposed=transposed, groups=groups)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    (out * upstream).sum().backward()

    expected, refs = [], [storage[g].clone().requires_grad_(True) for g in range(count)]
    a_ref = a.detach().clone().requires_grad_(True)
    for g, weight in enumerate(refs):
        for k, block in enumerate(weight.view(groups, rows // groups, width)):
            lhs = a_ref[g * groups + k]
            expected.append(lhs @ block.T if transposed else lhs @ block)
    (torch.stack(expected) * upstream).sum().backward()
    assert torch.allclose(out, torch.stack(expected), rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.grad, a_ref.grad, rtol=1e-12, atol=1e-12)
    for leaf, ref in zip(leaves, refs, strict=True):
        assert leaf.grad is not None and torch.allclose(leaf.grad, ref.grad, rtol=1e-12,
                                                        atol=1e-12)


def test_gradcheck():
    generator = torch.Generator().manual_seed(1)
    storage = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    leaves = [w.requires_grad_(True) for w in leaves_of(storage)]
    a = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, *w: stacked_product(a, w, transposed=True, groups=2), (a, *leaves))
