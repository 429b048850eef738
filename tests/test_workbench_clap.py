"""CLAP (workbench/clap.py) against independent computations of its published objective: the
multipliers by their formula in numpy, the closed-form gradient against autograd, the trained
prototypes against a plain torch.optim.SGD loop on autograd's gradient (constraint on, and off:
ZS-LP), and the first-order conditions of the penalised objective at its solution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import check_workbench_contract
from textstore import synthetic_inputs, text_store

from safe_cache.fit.workbench import MethodInputs, registry
from safe_cache.fit.workbench.clap import (
    ClapRecipe,
    batches_per_epoch,
    fit_clap,
    lagrange_multipliers,
    penalised_gradient,
    train_prototypes,
    zero_shot_prototypes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> MethodInputs:
    return synthetic_inputs(tmp_path_factory.mktemp("clap") / "s.zarr", templates=3)


def numpy_multipliers(features: np.ndarray, labels: np.ndarray, prototypes: np.ndarray,
                      scale: float) -> np.ndarray:
    """init_lagrangian_multipliers: diag(softmax(logits)^T onehot) / onehot.sum(0)."""
    x = features / np.linalg.norm(features, axis=-1, keepdims=True)
    w = prototypes / np.linalg.norm(prototypes, axis=-1, keepdims=True)
    logits = scale * x @ w.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    onehot = np.eye(prototypes.shape[0])[labels]
    return np.diag(probs.T @ onehot) / onehot.sum(0)


def objective(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
              lam: torch.Tensor, scale: float, weight: float) -> torch.Tensor:
    """The penalised objective as the paper writes it, from scratch: mean cross-entropy of
    scale * cos(x, w_c), plus weight / C * sum_c lambda_c |w_c - t_c|^2."""
    cos = (x / x.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T
    logits = scale * cos
    nll = torch.logsumexp(logits, -1) - logits.gather(1, y[:, None])[:, 0]
    return nll.mean() + weight * (lam * ((w - t) ** 2).sum(-1)).sum() / w.shape[0]


def dassl_lrs(recipe: ClapRecipe) -> list[float]:
    """The lr of each epoch as Dassl's ConstantWarmupScheduler around torch's CosineAnnealingLR
    gives it: the warmup epoch at the constant lr, then the cosine recounted from epoch 1."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=recipe.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(recipe.epochs))
    lrs = [recipe.warmup_lr]
    for _ in range(1, recipe.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    return lrs


def reference_prototypes(inputs: MethodInputs, recipe: ClapRecipe) -> torch.Tensor:
    """CLAP's training as their code runs it, with torch.optim.SGD on autograd's gradient of
    `objective` (multipliers from numpy), the same permutations of the same generator."""
    images, views, _ = inputs.train_views.shape
    x = F.normalize(inputs.train_views, dim=-1).reshape(images * views, -1)
    y = inputs.labels[:, None].expand(images, views).reshape(-1)
    t = zero_shot_prototypes(inputs)
    lam = torch.from_numpy(numpy_multipliers(x.numpy(), y.numpy(), t.numpy(), inputs.scale))
    w = torch.nn.Parameter(t.clone())
    optimizer = torch.optim.SGD([w], lr=recipe.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(inputs.seed)
    per_epoch = max(images // recipe.batch_size, 1)
    for lr in dassl_lrs(recipe):
        optimizer.param_groups[0]["lr"] = lr
        order = torch.randperm(len(x), generator=generator)
        for b in range(per_epoch):
            batch = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            loss = objective(w, x[batch], y[batch], t, lam.float(), inputs.scale,
                             recipe.constraint)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return w.detach()


def test_multipliers_are_their_formula(inputs):
    _, views, dim = inputs.train_views.shape
    x = F.normalize(inputs.train_views, dim=-1).reshape(-1, dim)
    y = inputs.labels.repeat_interleave(views)
    t = zero_shot_prototypes(inputs)
    expected = numpy_multipliers(x.numpy().astype(np.float64), y.numpy(),
                                 t.numpy().astype(np.float64), inputs.scale)
    got = lagrange_multipliers(x, y, t, inputs.scale)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert got.max() - got.min() > 0.1  # class-adaptive: a real spread between classes
    assert fit_clap(inputs, ClapRecipe(epochs=1)).summary["multiplier_mean"] == \
        pytest.approx(expected.mean(), rel=1e-5)


def test_prototypes_are_the_classifier_at_the_raw_mean_norm(inputs, tmp_path):
    raw, counts = inputs.store.sentence_embeddings("hand")
    means = raw.reshape(len(counts), counts[0], -1).mean(1)
    prototypes = zero_shot_prototypes(inputs)
    np.testing.assert_allclose(prototypes.norm(dim=-1).numpy(), np.linalg.norm(means, axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(F.normalize(prototypes, dim=-1).numpy(),
                               inputs.classifier.numpy(), atol=1e-6)
    # one template per class: exactly their base_text_features, the raw embedding
    single = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32) * 3
    store = text_store(tmp_path / "one.zarr", single, [1] * 4)
    one = MethodInputs(**{**inputs.__dict__, "store": store,
                          "classifier": torch.from_numpy(store.classifier("hand"))})
    np.testing.assert_allclose(zero_shot_prototypes(one).numpy(), single, rtol=1e-5)


def test_gradient_is_autograds(inputs):
    generator = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(9, 8, generator=generator, dtype=torch.float64), dim=-1)
    y = torch.randint(0, 4, (9,), generator=generator)
    t = torch.randn(4, 8, generator=generator, dtype=torch.float64) * 2
    w = (t + 0.3 * torch.randn(4, 8, generator=generator, dtype=torch.float64)).requires_grad_()
    lam = torch.rand(4, generator=generator, dtype=torch.float64)
    for weight in (0.0, 1.0, 2.5):
        objective(w, x, y, t, lam, 100.0, weight).backward()
        assert w.grad is not None
        np.testing.assert_allclose(
            penalised_gradient(w.detach(), x, y, t, lam, 100.0, weight).numpy(),
            w.grad.numpy(), rtol=1e-9, atol=1e-12)
        w.grad = None


@pytest.mark.parametrize("constraint", [1.0, 0.0])
def test_training_is_their_sgd_loop(inputs, constraint):
    """constraint 1: CLAP; 0: ZS-LP (their CONSTRAINT none), the same loop without the
    penalty. 130 images per class make two batches of 256 an epoch."""
    recipe = ClapRecipe(epochs=4, constraint=constraint)
    big = synthetic_inputs_like(inputs, shots=130)
    assert batches_per_epoch(len(big.labels), recipe.batch_size) == 2
    expected = reference_prototypes(big, recipe)
    outcome = fit_clap(big, recipe)
    assert outcome.predictor is not None
    logits = outcome.predictor(big.test.features * 3.0, big.test.features)
    reference = big.scale * big.test.features @ F.normalize(expected, dim=-1).T
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-3)
    assert outcome.summary["constraint"] == ("l2" if constraint else "none")


def synthetic_inputs_like(inputs: MethodInputs, shots: int) -> MethodInputs:
    """`inputs` with `shots` synthetic train images per class (views and text kept)."""
    generator = torch.Generator().manual_seed(5)
    classes, (_, views, dim) = inputs.classes, inputs.train_views.shape
    labels = torch.arange(classes).repeat_interleave(shots)
    centers = F.normalize(inputs.classifier + 0.5 * torch.randn(classes, dim,
                                                                generator=generator), dim=-1)
    train = centers[labels][:, None] + 0.4 * torch.randn(len(labels), views, dim,
                                                         generator=generator)
    return MethodInputs(**{**inputs.__dict__, "train_views": train * 2,
                           "center": train.mean(1), "labels": labels,
                           "train_rows": np.arange(len(labels))})


@pytest.mark.slow
def test_the_solution_meets_the_first_order_conditions(inputs):
    """Full-batch (fewer samples than a batch): after training twice as long on a small problem the
    gradient of the penalised objective (independent autograd, float64), for the fixed
    multipliers, vanishes: grad_c CE = -2 lambda_c (w_c - t_c) / C."""
    images, views, dim = inputs.train_views.shape
    x = F.normalize(inputs.train_views.double(), dim=-1).reshape(-1, dim)
    y = inputs.labels.repeat_interleave(views)
    t = zero_shot_prototypes(inputs).double()
    lam = lagrange_multipliers(x, y, t, inputs.scale)
    recipe = ClapRecipe(epochs=600)
    w = train_prototypes(x, y, images, t, lam, inputs.scale, recipe,
                         torch.Generator().manual_seed(0)).requires_grad_()
    start = t.clone().requires_grad_()
    for point in (start, w):
        objective(point, x, y, t, lam, inputs.scale, 1.0).backward()
    assert start.grad is not None and w.grad is not None
    assert w.grad.norm() < 1e-9 * start.grad.norm()
    ce = w.detach().clone().requires_grad_()
    objective(ce, x, y, t, lam, inputs.scale, 0.0).backward()
    assert ce.grad is not None
    penalty = -2 * lam[:, None] * (w.detach() - t) / inputs.classes
    torch.testing.assert_close(ce.grad, penalty, rtol=1e-4, atol=1e-9)
    assert (w.detach() - t).norm() > 1e-3  # the data moved it: the constraint is not all


def test_the_lr_schedule_is_dasslss():
    recipe = ClapRecipe(epochs=7)
    expected = dassl_lrs(recipe)
    assert [recipe.epoch_lr(e) for e in range(7)] == pytest.approx(expected, rel=1e-12)
    assert recipe.epoch_lr(1) == 0.1 and math.isclose(ClapRecipe().epoch_lr(299),
                                                      0.1 * (1 + math.cos(math.pi * 298 / 300))
                                                      / 2)


def test_test_labels_never_matter_and_the_predictor_reproduces_test_acc(inputs):
    recipe = ClapRecipe(epochs=20)
    check_workbench_contract(lambda i: fit_clap(i, recipe), inputs)


def test_clap_is_registered_and_runs_its_recipe(inputs):
    assert registry()["clap"].__module__ == "safe_cache.fit.workbench.clap"
    summary = registry()["clap"](inputs).summary
    assert {"val_acc", "test_acc", "lr", "epochs", "batch_size", "views"} <= set(summary)
    assert (summary["lr"], summary["epochs"], summary["batch_size"]) == (0.1, 300, 256)
    assert summary["views"] == inputs.train_views.shape[1]
    assert 0 <= summary["val_acc"] <= 1 and 0 <= summary["test_acc"] <= 1


@pytest.mark.slow  # a whole fit: SAFE's grid, then Cross-Modal's 12,800 iterations x 6 heads
def test_fit_runs_clap_and_cross_modal_lp(tmp_path):
    """`fit --methods clap,cross_modal_lp` through fit_one on a tiny real store (test_fit's,
    with three sentences per class): both land in the result's methods, with their seconds."""
    from test_fit import CLASSES, synthetic_store

    from safe_cache.data.prompts import class_average
    from safe_cache.fit import FitConfig, fit
    from safe_cache.fit.results import load_result
    from safe_cache.store import open_store

    url = synthetic_store(str(tmp_path / "spots.zarr"))
    with open_store(url, "a") as store:
        classifier = store.classifier("hand")
        rng = np.random.default_rng(0)
        raw = (np.repeat(classifier, 3, axis=0) * 4
               + rng.standard_normal((3 * CLASSES, classifier.shape[1]))).astype(np.float32)
        average = class_average(torch.from_numpy(raw), [3] * CLASSES).numpy()
        store.write_classifier("hand", average, [[f"{c} {t}" for t in range(3)]
                                                 for c in range(CLASSES)], raw)
    config = FitConfig(store=url, shots=(8,), seeds=(1,), lrs=(1e-3,), wds=(0.0,), iters=50,
                       eval_every=25, methods=("clap", "cross_modal_lp"),
                       out=str(tmp_path / "results"))
    result = fit(config)[0]
    assert {"clap", "cross_modal_lp"} <= set(result.methods)
    assert set(result.timings["methods_s"]) == {"clap", "cross_modal_lp"}
    assert result.methods["clap"]["views"] == 2 and result.methods["clap"]["epochs"] == 300
    assert result.methods["cross_modal_lp"]["image_views"] == "center+flip"
    assert result.methods["cross_modal_lp"]["configurations"] == 6  # batch 32: 16 texts > 12
    saved = sorted((tmp_path / "results").rglob("*.json"))
    assert saved and load_result(saved[0]).methods == result.methods
