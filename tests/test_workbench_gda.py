"""GDA (workbench/gda.py) against the closed form computed directly in numpy float64, its alpha
search against a direct loop on val, and its behaviour: test labels never choose anything, a
separable task is solved, the OOD predictor reproduces test_acc."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import permute_test_labels

from safe_cache.fit.adapters import Split
from safe_cache.fit.workbench import MethodInputs, registry
from safe_cache.fit.workbench.gda import ALPHAS, fit_gaussian, fused_logits, gda
from safe_cache.store import FeatureStore

CLASSES, D, SCALE = 5, 12, 100.0


def problem(seed: int = 0, shots: int = 4, views: int = 3, spread: float = 0.8,
            noise: float = 1.0, text_noise: float = 2.0) -> tuple[MethodInputs, torch.Tensor]:
    """Small synthetic inputs (unnormalised train views, as stored) and the test split's
    unnormalised features (what the OOD predictor is applied to); the text classifier is the
    class centers plus `text_noise`."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(CLASSES, D, generator=g) + torch.randn(D, generator=g)

    def draw(labels: torch.Tensor, *shape: int) -> torch.Tensor:
        return centers[labels].reshape(len(labels), *[1] * len(shape), D) \
            + noise * torch.randn(len(labels), *shape, D, generator=g)

    labels = torch.arange(CLASSES).repeat_interleave(shots)
    train = 3.0 * draw(labels, views)  # unnormalised, a norm unlike 1
    val_labels = torch.arange(CLASSES).repeat_interleave(min(shots, 4))
    test_labels = torch.arange(CLASSES).repeat_interleave(30)
    test_raw = 2.0 * draw(test_labels)
    classifier = F.normalize(centers + text_noise * torch.randn(CLASSES, D, generator=g),
                             dim=-1)
    inputs = MethodInputs(
        train_views=train, center=train[:, 0], labels=labels,
        val=Split(F.normalize(draw(val_labels), dim=-1), val_labels),
        test=Split(F.normalize(test_raw, dim=-1), test_labels), classifier=classifier,
        scale=SCALE, seed=seed, device=torch.device("cpu"),
        store=cast(FeatureStore, None),  # GDA reads no store
        prompts="hand", train_rows=np.arange(len(labels)), val_rows=np.arange(len(val_labels)),
        test_rows=np.arange(len(test_labels)), test_chunk=256)
    return inputs, test_raw


def numpy_gda(inputs: MethodInputs) -> tuple[np.ndarray, np.ndarray]:
    """(W (D, C), b (C,)) from the published closed form, directly: normalised views as
    samples, class means, Sigma = ((N - 1) cov + tr(cov) I) / D with cov the unbiased
    covariance of the class-centred samples, W = Sigma^-1 mu, b = log(1/C) - mu Sigma^-1 mu / 2
    (their code's cov_inv is this Sigma's inverse)."""
    x = inputs.train_views.double().numpy()
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.repeat(inputs.labels.numpy(), x.shape[1])
    x = x.reshape(-1, D)
    mu = np.stack([x[y == c].mean(0) for c in range(CLASSES)])
    centred = x - mu[y]
    cov = np.cov(centred.T)  # unbiased, mean-subtracted, as torch.cov
    sigma = ((len(x) - 1) * cov + np.trace(cov) * np.eye(D)) / D
    precision = np.linalg.inv(sigma)
    np.testing.assert_allclose(precision, np.linalg.pinv(sigma), rtol=1e-8, atol=1e-8)
    weight = precision @ mu.T
    bias = math.log(1 / CLASSES) - 0.5 * np.einsum("cd,de,ce->c", mu, precision, mu)
    return weight, bias


def fused_numpy(features: np.ndarray, inputs: MethodInputs, alpha: float,
                closed: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    weight, bias = closed or numpy_gda(inputs)
    return SCALE * features @ inputs.classifier.double().numpy().T \
        + alpha * (features @ weight + bias)


def test_logits_are_the_closed_form():
    inputs, test_raw = problem()
    outcome = gda(inputs)
    test = test_raw.double().numpy()
    test /= np.linalg.norm(test, axis=-1, keepdims=True)
    assert outcome.predictor is not None
    ours = outcome.predictor(test_raw, torch.empty(0)).double().numpy()
    expected = fused_numpy(test, inputs, outcome.summary["alpha"])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    samples = F.normalize(inputs.train_views, dim=-1).flatten(0, 1)
    gaussian = fit_gaussian(samples, inputs.labels.repeat_interleave(3), CLASSES)
    closed = numpy_gda(inputs)
    for alpha in ALPHAS:  # every alpha the search compares, not only the chosen one
        expected = fused_numpy(test, inputs, alpha, closed)
        ours = fused_logits(inputs.test.features, inputs.classifier, gaussian, alpha, SCALE)
        np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())


def test_alpha_is_their_rule_on_our_val_set():
    """First strictly best on val over their grid, from best (0, 0.1); val_acc is its accuracy;
    the same from the registry as from the module."""
    for seed in range(4):
        inputs, _ = problem(seed, noise=2.5)
        summary = registry()["gda"](inputs).summary
        val, closed = inputs.val.features.double().numpy(), numpy_gda(inputs)
        labels = inputs.val.labels.numpy()
        accs = [float((fused_numpy(val, inputs, a, closed).argmax(-1) == labels).mean())
                for a in ALPHAS]
        best, alpha = 0.0, 0.1
        for acc, candidate in zip(accs, ALPHAS, strict=True):
            if acc > best:
                best, alpha = acc, candidate
        assert summary["alpha"] == alpha and summary["val_acc"] == pytest.approx(best)
        assert summary["samples"] == len(inputs.labels) * 3 and summary["views"] == 3


def test_test_labels_choose_nothing():
    inputs, _ = problem(1, noise=2.5)
    before = gda(inputs).summary
    after = gda(permute_test_labels(inputs)).summary
    assert {k: v for k, v in after.items() if k != "test_acc"} == \
        {k: v for k, v in before.items() if k != "test_acc"}
    assert after["test_acc"] != before["test_acc"]  # the labels did change what test measures


def test_a_separable_task_is_solved_and_the_predictor_gives_test_acc():
    inputs, test_raw = problem(2, spread=3.0, noise=0.3, text_noise=30.0)
    zero_shot = (inputs.test.features @ inputs.classifier.T).argmax(-1).eq(inputs.test.labels)
    outcome = gda(inputs)
    assert outcome.summary["test_acc"] == 1.0 > zero_shot.float().mean().item()
    for seed in (3, 4):  # a harder task: the predictor on raw features gives test_acc exactly
        inputs, test_raw = problem(seed, noise=2.0)
        outcome = gda(inputs)
        assert outcome.predictor is not None
        logits = outcome.predictor(test_raw, torch.empty(0))
        acc = logits.argmax(-1).eq(inputs.test.labels).float().mean().item()
        assert acc == outcome.summary["test_acc"] and 0 < acc < 1
        assert gda(inputs).summary == outcome.summary  # deterministic


def test_no_variation_gives_a_zero_precision():
    """One image of one view per class: every centred sample is 0, cov = 0, their pinv(0) is
    0, so GDA's logits are the log prior and the fusion ranks as zero-shot does."""
    inputs, _ = problem(shots=1, views=1)
    samples = F.normalize(inputs.train_views, dim=-1).flatten(0, 1)
    gaussian = fit_gaussian(samples, inputs.labels, CLASSES)
    assert gaussian.weight.abs().max() == 0
    assert torch.allclose(gaussian.bias, torch.full((CLASSES,), math.log(1 / CLASSES)))
    summary = gda(inputs).summary
    zero_shot = (inputs.test.features @ inputs.classifier.T).argmax(-1).eq(inputs.test.labels)
    assert summary["test_acc"] == zero_shot.float().mean().item()
