"""The device-resident training step (fit/step.py): equal to the reference loop (torch's AdamW
with float learning rates stepped by LambdaLR), its schedule table equal to LambdaLR's, its
reset exact (what a CUDA capture's warm-up relies on), and a refused capture leaving the run
eager and saying why."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_params

from safe_cache import load_backbone
from safe_cache.fit import FitConfig
from safe_cache.fit.grid import StackedHeads, grid_optimizer
from safe_cache.fit.recipe import PRESETS, Recipe
from safe_cache.fit.step import GridStep, lr_table
from safe_cache.fit.train import _capture

LRS, WDS = (1e-2, 1e-3, 1e-4), (0.0, 1e-1)
GRID = [(lr, wd) for lr in LRS for wd in WDS]
RECIPE = dataclasses.replace(PRESETS["safe"], warmup=5)  # warm-up and cosine both in 30 steps
STEPS, BATCH, CLASSES, SAMPLES, SCALE = 30, 4, 5, 16, 30.0


def problem(backbone):
    """float16 samples (as fit keeps them), labels, a classifier, one batch order."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(SAMPLES, backbone.card["tokens"], backbone.card["channels"],
                        generator=generator)
    dense = (dense.relu() if backbone.family_rules.nonnegative_dense else dense).half()
    labels = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    text = F.normalize(torch.randn(CLASSES, backbone.card["embed_dim"], generator=generator),
                       dim=-1)
    batches = [torch.randperm(SAMPLES, generator=generator)[:BATCH] for _ in range(STEPS)]
    return dense, labels, text, batches


def new_step(backbone, dense, labels, text) -> GridStep:
    stacked = StackedHeads(backbone.new_head(), len(GRID))
    return GridStep(stacked, dense, labels, text, SCALE, [g[0] for g in GRID],
                    [g[1] for g in GRID], STEPS, RECIPE, BATCH)


def reference_loop(backbone, dense, labels, text, batches) -> tuple[StackedHeads, torch.Tensor]:
    """What fit did before step.py: float lrs from LambdaLR, the batch gathered per step."""
    stacked = StackedHeads(backbone.new_head(), len(GRID))
    optimizer, scheduler = grid_optimizer(stacked, [g[0] for g in GRID], [g[1] for g in GRID],
                                          STEPS, recipe=RECIPE)
    running = torch.zeros(len(GRID))
    for rows in batches:
        x, y = dense[rows].float(), labels[rows]
        logits = SCALE * F.normalize(stacked(x), dim=-1) @ text.T
        per_config = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(GRID)),
                                     reduction="none").view(len(GRID), -1).mean(1)
        optimizer.zero_grad(set_to_none=True)
        per_config.sum().backward()
        optimizer.step()
        scheduler.step()
        running += per_config.detach()
    return stacked, running


def test_step_equals_the_reference_loop(tiny_costly):
    dense, labels, text, batches = problem(tiny_costly)
    reference, reference_loss = reference_loop(tiny_costly, dense, labels, text, batches)
    step = new_step(tiny_costly, dense, labels, text)
    for rows in batches:
        step.step(rows)
    # Outputs, not raw parameters: the key bias has an exactly-zero gradient (softmax ignores a
    # constant score), so Adam turns float noise into lr-sized steps of a parameter that
    # changes nothing; every other parameter agrees to float rounding.
    with torch.no_grad():
        ours, theirs = step.stacked(dense.float()), reference(dense.float())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    torch.testing.assert_close(step.take_running(), reference_loss, rtol=1e-5, atol=1e-6)
    assert step.running.abs().sum() == 0  # taken
    assert int(step.counter) == STEPS
    moved = [not torch.equal(a, b.detach()) for a, b in
             zip(step.stacked.stacked, StackedHeads(tiny_costly.new_head(), 1).stacked,
                 strict=True)]
    assert any(moved)  # it trained


@pytest.mark.parametrize("recipe", [RECIPE, PRESETS["views"], PRESETS["safe"]])
def test_schedule_table_is_lambdalrs(recipe: Recipe):
    iters = 200
    stacked = StackedHeads(load_backbone("safe-cache-tiny-rn").new_head(), len(GRID))
    optimizer, scheduler = grid_optimizer(stacked, [g[0] for g in GRID], [g[1] for g in GRID],
                                          iters, recipe=recipe)
    table = lr_table([g[0] for g in GRID], iters, recipe)
    assert table.shape == (iters, len(GRID)) and table.dtype == torch.float32
    for i in range(iters):
        expected = torch.tensor([group["lr"] for group in optimizer.param_groups])
        assert torch.equal(table[i], expected.float()), i
        optimizer.step()
        scheduler.step()


# Not an equality with torch's loop but the step's own bookkeeping: one family fast is enough
@pytest.mark.parametrize("name", tiny_params(("safe-cache-tiny-coca",)))
def test_reset_returns_exactly_to_the_start(name, load_cached):
    """A capture's warm-up steps, then reset: training from there is bit-identical to a fresh
    step's (parameters, AdamW's moments and counts, the schedule's position, the loss)."""
    backbone = load_cached(name)
    dense, labels, text, batches = problem(backbone)
    warmed = new_step(backbone, dense, labels, text)
    saved = [p.detach().clone() for p in warmed.stacked.stacked]
    for rows in batches[:3]:
        warmed.step(rows[torch.randperm(BATCH)])  # other batches than the run's
    warmed.reset(saved)
    fresh = new_step(backbone, dense, labels, text)
    for rows in batches:
        warmed.step(rows)
        fresh.step(rows)
    for a, b in zip(warmed.stacked.stacked, fresh.stacked.stacked, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(warmed.take_running(), fresh.take_running())
    for (_, a), (_, b) in zip(warmed.optimizer.state.items(), fresh.optimizer.state.items(),
                              strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_lr_past_the_schedule_stays_at_its_last_row():
    backbone = load_backbone("safe-cache-tiny-rn")
    dense, labels, text, batches = problem(backbone)
    step = new_step(backbone, dense, labels, text)
    for rows in batches + batches[:2]:
        step.step(rows)
    assert torch.equal(step.lr, step.schedule[-1])


def test_a_refused_capture_leaves_the_run_eager_and_says_why(monkeypatch):
    """On CUDA, a step torch cannot capture trains eagerly; the result says why. (The capture
    itself is replaced here: this machine has no GPU.)"""
    backbone = load_backbone("safe-cache-tiny-rn")
    dense, labels, text, _ = problem(backbone)
    step = new_step(backbone, dense, labels, text)

    def refuse() -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(step, "capture", refuse)
    config = FitConfig(store="unused")
    execution = _capture(step, config, torch.device("cuda"))
    assert execution == {"device": "cuda", "graphed": False, "why_eager": "CUDA graph capture"
                         " failed: operation not permitted when stream is capturing"}
    assert _capture(step, dataclasses.replace(config, cuda_graph=False),
                    torch.device("cuda")) == {"device": "cuda", "graphed": False}
    assert _capture(step, config, torch.device("cpu")) == {"device": "cpu", "graphed": False}

    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step, "capture", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # fit's one-line error, not a quiet eager run
        _capture(step, config, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_step_equals_eager_on_cuda(tiny):
    cuda = torch.device("cuda")
    dense, labels, text, batches = problem(tiny)
    backbone = load_backbone(tiny.card["model"], device=cuda)
    results = []
    for graphed in (False, True):
        step = new_step(backbone, dense.to(cuda), labels.to(cuda), text.to(cuda))
        if graphed:
            step.capture()
        for rows in batches:
            step.step(rows.to(cuda))
        results.append([p.cpu() for p in step.stacked.stacked])
    for eager, graphed in zip(*results, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batches_drawn_with_replacement_may_outnumber_the_samples(tmp_path):
    """The `views` recipe draws 8 with replacement from fewer samples: the step's index buffer
    takes the sampler's batch size, not min(batch, samples)."""
    from factories import extract_miniature

    from safe_cache.fit import fit
    from safe_cache.fit.recipe import make_recipe
    from safe_cache.fit.train import BatchSampler

    assert BatchSampler(3, 8, "replace", seed=0).size == 8
    assert BatchSampler(3, 8, "epoch", seed=0).size == 3
    store = extract_miniature(tmp_path / "data", "safe-cache-tiny-rn", tmp_path / "s.zarr")
    config = FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=6, eval_every=3,
                       methods=(), out=str(tmp_path / "results"), recipe=make_recipe("views"))
    (record,) = fit(config)
    assert record.train_samples < config.batch_size
    assert record.curves["iters"] == [3, 6]
