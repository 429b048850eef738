"""The stacked grid equals independent runs of torch's AdamW + CosineAnnealingLR."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from safe_cache.fit.grid import BestState, StackedHeads, grid_optimizer

# Each configuration its own lr and weight decay (two of each: the stacking is the same for the
# paper's 4 x 3; 12 configurations of 25 steps through open_clip's module cost 4.6 s a family)
LRS = [1e-2, 1e-4]
WDS = [0.0, 1e-1]
GRID = list(itertools.product(LRS, WDS))
STEPS, BATCH, CLASSES = 15, 4, 5


def problem(backbone, samples: int = 16):
    """Dense maps, labels, a fixed text classifier and one minibatch order shared by all runs."""
    generator = torch.Generator().manual_seed(0)
    shape = (samples, backbone.card["tokens"], backbone.card["channels"])
    dense = torch.randn(shape, generator=generator, dtype=torch.float64)
    dense = dense.relu() if backbone.family_rules.nonnegative_dense else dense
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    text = F.normalize(torch.randn(CLASSES, backbone.card["embed_dim"], generator=generator,
                                   dtype=torch.float64), dim=-1)
    batches = [torch.randperm(samples, generator=generator)[:BATCH] for _ in range(STEPS)]
    return dense, labels, text, batches


def loss_of(pooled: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the normalised pooled features; summed over configurations if stacked."""
    logits = 20.0 * F.normalize(pooled, dim=-1) @ text.T
    logits = logits if logits.dim() == 3 else logits[None]
    return sum(F.cross_entropy(per_config, labels) for per_config in logits)


def independent_runs(backbone, dense, labels, text, batches) -> list[dict[str, torch.Tensor]]:
    """The reference: open_clip's module, one torch AdamW + cosine schedule per configuration."""
    results = []
    for lr, wd in GRID:
        head = backbone.naive_head().double().requires_grad_(True)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
        for rows in batches:
            optimizer.zero_grad()
            loss_of(head(dense[rows]), labels[rows], text).backward()
            optimizer.step()
            scheduler.step()
        results.append({k: v.detach() for k, v in head.state_dict().items()})
    return results


def stacked_run(backbone, dense, labels, text, batches) -> StackedHeads:
    stacked = StackedHeads(backbone.new_head().double(), len(GRID))
    lrs, wds = zip(*GRID, strict=True)
    optimizer, scheduler = grid_optimizer(stacked, lrs, wds, total_steps=STEPS)
    for rows in batches:
        optimizer.zero_grad()
        pooled = stacked(dense[rows])
        assert pooled.shape == (len(GRID), BATCH, backbone.card["embed_dim"])
        loss_of(pooled, labels[rows], text).backward()
        optimizer.step()
        scheduler.step()
    return stacked


def test_stacked_grid_equals_independent_runs(tiny_costly):
    dense, labels, text, batches = problem(tiny_costly)
    reference = independent_runs(tiny_costly, dense, labels, text, batches)
    start = tiny_costly.head.state_dict()
    for expected, (lr, _) in zip(reference, GRID, strict=True):
        moved = max((expected[k] - start[k].double()).abs().max().item() for k in expected)
        assert moved > 1e-6 or lr < 1e-4  # the comparison below is not vacuous
    stacked = stacked_run(tiny_costly, dense, labels, text, batches)
    for index, expected in enumerate(reference):
        actual = stacked.config_state_dict(index)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            error = (actual[name] - value).abs().max().item()
            assert error <= 1e-8, (GRID[index], name, error)
            # the stacked storage holds the same values as the per-configuration leaves
            assert torch.equal(stacked.stacked[stacked.names.index(name)][index], actual[name])


def test_config_head_is_a_working_standalone_head(tiny):
    stacked = StackedHeads(tiny.new_head(), 3)
    with torch.no_grad():  # a random edit: adding a constant to the ViT's proj would be
        # invisible (ln_post's output sums to zero over channels)
        noise = torch.randn(stacked.stacked[0][1].shape, generator=torch.Generator().manual_seed(0))
        stacked.stacked[0][1].add_(0.5 * noise)  # storage edits are seen by the leaves
    assert torch.equal(stacked.configs[1][stacked.names[0]], stacked.stacked[0][1])
    x = torch.randn(2, tiny.card["tokens"], tiny.card["channels"],
                    generator=torch.Generator().manual_seed(1))
    together = stacked(x)
    for index in range(3):
        assert torch.allclose(stacked.config_head(index)(x), together[index], atol=1e-5)
    assert not torch.allclose(together[0], together[1])
    weights = stacked.attention(x)
    assert weights.shape[:3] == (3, 2, tiny.head.attention(x).shape[1])
    assert torch.allclose(weights[0], tiny.head.attention(x), atol=1e-6)


def test_stacked_heads_accept_only_fast_heads(tiny):
    with pytest.raises(TypeError, match="GridHead"):
        StackedHeads(tiny.naive_head(), 2)


def test_best_state_keeps_strictly_better_configs():
    params = [torch.zeros(3, 2)]
    best = BestState(params)
    params[0].fill_(1.0)
    best.update(torch.tensor([0.5, 0.5, 0.5]), step=100)
    params[0].fill_(2.0)
    improved = best.update(torch.tensor([0.6, 0.5, 0.4]), step=200)  # equal is not better
    assert improved.tolist() == [True, False, False]
    assert best.step.tolist() == [200, 100, 100]
    assert best.best[0][:, 0].tolist() == [2.0, 1.0, 1.0]
    best.restore()
    assert params[0][:, 0].tolist() == [2.0, 1.0, 1.0]
