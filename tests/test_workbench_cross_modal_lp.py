"""Cross-Modal linear probing (workbench/cross_modal_lp.py) against independent computations of
their training: the text samples enter the loss as train.py feeds them (images then texts, one
nn.Linear head behind LogitHead, CrossEntropyLoss), every configuration of the grid trained by a
plain torch.optim.AdamW loop on autograd's gradient with their warmup + cosine schedule and
their val early stopping, and with zero iterations the head is zero-shot CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import check_workbench_contract
from textstore import synthetic_inputs, zero_shot_accuracy

from safe_cache.errors import RecipeError
from safe_cache.fit.adapters import Split
from safe_cache.fit.workbench import MethodInputs, registry
from safe_cache.fit.workbench.cross_modal_lp import (
    CrossModalRecipe,
    all_samples,
    batch_loss,
    choose,
    fit_cross_modal,
    loss_gradient,
    minibatches,
    train_heads,
    training_samples,
)

SHORT = CrossModalRecipe(iterations=230)  # evaluated after the updates of 0, 100 and 200


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> MethodInputs:
    """4 classes x 5 templates (20 text samples), 4 shots (32 image samples): both batch sizes
    valid, so the grid is their whole 12."""
    return synthetic_inputs(tmp_path_factory.mktemp("cm") / "s.zarr", templates=5, noise=1.2,
                            offset=1.0)


def their_lr(base: float, i: int, total: int, warmup: int = 50, floor: float = 1e-5) -> float:
    """LinearWarmupScheduler(warmup_iter 50, min_lr 1e-5) around CosineAnnealingLR(total), as
    train.py steps it once per iteration."""
    if i < warmup:
        return floor if i == 0 else base * i / warmup
    return base * (1 + math.cos(math.pi * (i - warmup) / total)) / 2


def logit_head_loss(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """train.py's criterion on LogitHead(nn.Linear(bias=False)): normalise the input, the
    linear map (nn.Linear's own F.linear), times exp(logit)."""
    logits = F.linear(F.normalize(x, dim=1), weight) * torch.tensor([math.log(scale)]).exp()
    return torch.nn.CrossEntropyLoss()(logits, y)


def test_the_samples_are_their_datasets(inputs):
    samples = training_samples(inputs)
    flips = inputs.store.read_rows("train", "flip_pooled", inputs.train_rows)
    expected = F.normalize(torch.cat([inputs.center, torch.from_numpy(flips)]), dim=-1)
    torch.testing.assert_close(samples.images, expected)
    assert samples.image_labels.tolist() == inputs.labels.tolist() * 2
    raw, counts = inputs.store.sentence_embeddings("hand")
    torch.testing.assert_close(samples.texts, F.normalize(torch.from_numpy(raw), dim=-1))
    assert samples.text_labels.tolist() == [c for c, n in enumerate(counts) for _ in range(n)]
    assert samples.image_views == "center+flip"


def test_one_step_loss_and_gradient_are_their_criterions(inputs):
    """A batch of 4 images and 4 sentences, two heads: each head's loss and gradient are
    autograd's on train.py's LogitHead + CrossEntropyLoss of torch.cat([image, text])."""
    samples = training_samples(inputs)
    x = torch.cat([samples.images[[0, 5, 17, 30]], samples.texts[[2, 3, 11, 19]]])
    y = torch.cat([samples.image_labels[[0, 5, 17, 30]], samples.text_labels[[2, 3, 11, 19]]])
    generator = torch.Generator().manual_seed(0)
    weights = inputs.classifier + 0.2 * torch.randn(2, *inputs.classifier.shape,
                                                    generator=generator)
    losses = batch_loss(x, y, weights, inputs.scale)
    gradients = loss_gradient(x, y, weights, inputs.scale)
    for g in range(2):
        weight = torch.nn.Parameter(weights[g].clone())
        loss = logit_head_loss(weight, x, y, inputs.scale)
        loss.backward()
        assert weight.grad is not None
        torch.testing.assert_close(losses[g], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gradients[g], weight.grad, rtol=1e-4, atol=1e-5)
    # the raw text embedding is what the head normalises: feeding it unnormalised is the same
    raw = torch.from_numpy(inputs.store.sentence_embeddings("hand")[0])[[2, 3, 11, 19]]
    direct = logit_head_loss(weights[0].clone(), torch.cat([x[:4], raw]), y, inputs.scale)
    torch.testing.assert_close(losses[0], direct, rtol=1e-5, atol=1e-6)


def reference_run(samples, rows: torch.Tensor, init: torch.Tensor, val: Split, scale: float,
                  lr: float, wd: float, recipe: CrossModalRecipe) -> tuple[torch.Tensor, float,
                                                                          int]:
    """train.py's `train` for one configuration: torch.optim.AdamW and their scheduler, the
    minibatches `rows` (iterations, batch) of `all_samples`, validate every 100 iterations
    from 0 and keep the strictly best; (best weight, its val accuracy, its iteration)."""
    features, labels = all_samples(samples)
    weight = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=wd, betas=(0.9, 0.999))
    best: tuple[torch.Tensor, float, int] | None = None
    for i in range(recipe.iterations):
        optimizer.param_groups[0]["lr"] = their_lr(lr, i, recipe.iterations)
        loss = logit_head_loss(weight, features[rows[i]], labels[rows[i]], scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i % 100 == 0:
            with torch.no_grad():
                acc = (F.normalize(val.features, dim=1) @ weight.T).argmax(1).eq(val.labels)
            if best is None or acc.float().mean().item() > best[1]:
                best = (weight.detach().clone(), acc.float().mean().item(), i)
    assert best is not None
    return best


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_every_configuration_is_their_training_loop(inputs):
    """The stacked, closed-form, fused training equals 12 independent runs of theirs on the
    same minibatches, and the choice is eval.py's (the first best in lr, wd, batch order)."""
    samples = training_samples(inputs)
    grid = SHORT.grid(len(samples.texts), len(samples.images))
    assert [b for _, _, b in grid] == [8, 32] * 6 and grid[:2] == [(1e-3, 0.0, 8),
                                                                   (1e-3, 0.0, 32)]
    generator = torch.Generator().manual_seed(inputs.seed)
    trained = train_heads(samples, inputs.classifier, inputs.val.features, inputs.val.labels,
                          inputs.scale, SHORT, grid, generator)
    generator = torch.Generator().manual_seed(inputs.seed)  # the plans as train_heads drew them
    plans = {b: minibatches(samples, SHORT, b, SHORT.iterations, generator) for b in (8, 32)}
    assert plans[8].shape == (SHORT.iterations, 8)
    assert bool((plans[8][:, 4:] >= len(samples.images)).all())  # the last 4 are texts
    accuracies = []
    for g, (lr, wd, batch) in enumerate(grid):
        weight, acc, iteration = reference_run(samples, plans[batch], inputs.classifier,
                                               inputs.val, inputs.scale, lr, wd, SHORT)
        torch.testing.assert_close(trained.weights[g], weight, rtol=1e-4, atol=1e-5)
        assert trained.val_acc[g].item() == pytest.approx(acc)
        assert trained.best_iter[g].item() == iteration
        accuracies.append(acc)
    assert choose(trained) == int(np.argmax(accuracies))
    assert len(set(accuracies)) > 1  # the grid is a real choice here
    assert float((trained.weights - inputs.classifier).norm(dim=(1, 2)).max()) > 1e-1
    assert set(trained.best_iter.tolist()) == {0, 100, 200}  # kept at each evaluation


def test_zero_iterations_is_zero_shot(inputs):
    outcome = fit_cross_modal(inputs, CrossModalRecipe(iterations=0))
    assert outcome.summary["val_acc"] == pytest.approx(zero_shot_accuracy(inputs, inputs.val))
    assert outcome.summary["test_acc"] == pytest.approx(zero_shot_accuracy(inputs, inputs.test))
    assert outcome.summary["best_iter"] == -1
    assert outcome.predictor is not None
    raw = inputs.test.features * 7.0
    torch.testing.assert_close(outcome.predictor(raw, raw),
                               inputs.scale * inputs.test.features @ inputs.classifier.T)


def test_the_batch_sizes_they_keep():
    recipe = CrossModalRecipe()
    assert recipe.split(8) == (4, 4) and recipe.split(32) == (16, 16)
    assert {b for *_, b in recipe.grid(texts=17, images=17)} == {8, 32}
    assert {b for *_, b in recipe.grid(texts=16, images=100)} == {8}  # 16 texts: not < 16
    assert {b for *_, b in recipe.grid(texts=100, images=16)} == {8}
    assert len(recipe.grid(texts=100, images=100)) == 12
    with pytest.raises(RecipeError, match="no valid batch size"):
        recipe.grid(texts=4, images=100)


@pytest.mark.slow
def test_test_labels_never_matter_and_the_predictor_reproduces_test_acc(inputs):
    check_workbench_contract(lambda i: fit_cross_modal(i, SHORT), inputs)


def test_a_store_without_flips_trains_on_the_centers(tmp_path):
    inputs = synthetic_inputs(tmp_path / "noflip.zarr", templates=5, flip=False)
    samples = training_samples(inputs)
    torch.testing.assert_close(samples.images, F.normalize(inputs.center, dim=-1))
    assert fit_cross_modal(inputs, CrossModalRecipe(iterations=1)).summary["image_views"] == \
        "center"


def test_cross_modal_lp_is_registered_with_their_recipe():
    assert registry()["cross_modal_lp"].__module__ == "safe_cache.fit.workbench.cross_modal_lp"
    recipe = CrossModalRecipe()
    assert (recipe.lrs, recipe.weight_decays, recipe.batch_sizes, recipe.iterations) == \
        ((1e-3, 1e-4), (0.0, 1e-2, 1e-4), (8, 32), 12800)
