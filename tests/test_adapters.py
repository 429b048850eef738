"""Tip-Adapter(-F), SAFE-A's machinery and the linear probe, against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safe_cache.fit.adapters import (
    DEFAULT_TIP,
    Split,
    cache_model,
    linear_probe,
    search_alpha_gamma,
    search_grid,
    tip_adapter,
    tip_adapter_f,
    tip_logits,
)

CLASSES, D, SCALE = 5, 16, 100.0


def problem(seed: int = 0, n_train: int = 4, views: int = 3, n_eval: int = 40):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(CLASSES, D, generator=g), dim=-1)
    classifier = F.normalize(centers + 0.8 * torch.randn(CLASSES, D, generator=g), dim=-1)

    def sample(count, noise):
        labels = torch.arange(CLASSES).repeat_interleave(count)
        feats = centers[labels] + noise * torch.randn(len(labels), D, generator=g)
        return F.normalize(feats, dim=-1), labels

    train_labels = torch.arange(CLASSES).repeat_interleave(n_train)
    train = centers[train_labels][:, None] + 0.5 * torch.randn(len(train_labels), views, D,
                                                               generator=g)
    val, test = Split(*sample(n_eval // CLASSES, 0.6)), Split(*sample(n_eval // CLASSES, 0.6))
    return train, train_labels, val, test, classifier


def test_tip_logits_match_the_formula():
    train, labels, val, _, classifier = problem()
    keys, values = cache_model(train, labels, CLASSES)
    f = val.features
    expected = np.zeros((len(f), CLASSES))
    for i, j in itertools.product(range(len(f)), range(CLASSES)):
        zero_shot = SCALE * float(f[i] @ classifier[j])
        cache = sum(np.exp(-2.0 * (1 - float(f[i] @ keys[n]))) * float(values[n, j])
                    for n in range(len(keys)))
        expected[i, j] = zero_shot + 1.5 * cache
    actual = tip_logits(f, classifier, keys, values, alpha=1.5, gamma=2.0, scale=SCALE)
    # float32 logits of magnitude up to SCALE against a float64 loop: an absolute tolerance
    # of float32's rounding at that scale too (a small logit missed rtol alone on this machine)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-5, atol=SCALE * 1e-7)
    mean_view = F.normalize(F.normalize(train, dim=-1).mean(1), dim=-1)
    assert torch.allclose(keys, mean_view) and values.sum(1).eq(1).all()


@pytest.mark.parametrize("alphas_per_op", [None, 2])
@pytest.mark.parametrize("n_eval", [40, 8])  # 8: many alphas tie, the first must win
def test_alpha_gamma_search_matches_a_direct_loop(alphas_per_op, n_eval, monkeypatch):
    """Tip-Adapter's loop, one (alpha, gamma) at a time; the search batches the alphas (in blocks
    of 2 here too, as it does where the logits are large)."""
    import safe_cache.fit.adapters as adapters

    train, labels, val, _, classifier = problem(1, n_eval=n_eval)
    if alphas_per_op:
        monkeypatch.setattr(adapters, "_SEARCH_ELEMENTS", alphas_per_op * len(val.labels)
                            * CLASSES)
    keys, values = cache_model(train, labels, CLASSES)
    tip = {**DEFAULT_TIP, "search_step": [12, 5]}
    gammas, alphas = search_grid(tip["search_scale"], tip["search_step"])
    assert gammas[0] == pytest.approx(0.1) and gammas[1] == pytest.approx(0.1 + 6.9 / 12)
    best = (-1, None, None)
    for gamma in gammas:
        for alpha in alphas:
            logits = tip_logits(val.features, classifier, keys, values, alpha, gamma, SCALE)
            acc = logits.argmax(-1).eq(val.labels).float().mean().item()
            if acc > best[0]:
                best = (acc, alpha, gamma)
    alpha, gamma, acc = search_alpha_gamma(val, classifier, keys, values, SCALE, tip)
    assert (acc, alpha, gamma) == best


def test_tip_adapter_beats_zero_shot_here():
    train, labels, val, test, classifier = problem(2)
    result = tip_adapter(train, labels, val, test, classifier, SCALE, DEFAULT_TIP)
    zero_shot = (test.features @ classifier.T).argmax(-1).eq(test.labels).float().mean().item()
    assert result["test_acc"] >= zero_shot and set(result) >= {"alpha", "gamma", "val_acc"}


@pytest.mark.parametrize("keys_average", ["normalised", "raw"])
def test_tip_adapter_returns_the_cache_its_test_accuracy_was_made_with(keys_average):
    """The OOD predictor's model: the cache as built from the train views and the alpha/gamma
    the search chose give the reported test accuracy again; the summary is unchanged."""
    train, labels, val, test, classifier = problem(5)
    summary, (keys, values) = tip_adapter(train, labels, val, test, classifier, SCALE,
                                          DEFAULT_TIP, keys_average, return_cache=True)
    assert summary == tip_adapter(train, labels, val, test, classifier, SCALE, DEFAULT_TIP,
                                  keys_average)
    built = cache_model(train, labels, CLASSES, keys_average)
    assert torch.equal(keys, built[0]) and torch.equal(values, built[1])
    logits = tip_logits(test.features, classifier, keys, values, summary["alpha"],
                        summary["gamma"], SCALE)
    assert logits.argmax(-1).eq(test.labels).float().mean().item() == summary["test_acc"]


def test_tip_adapter_f_chooses_its_epoch_on_val_not_test(monkeypatch):
    """Make val and test disagree: test labels are val's mirror image, so the epoch that is best
    on test is not the one that is best on val; the chosen epoch must follow val."""
    train, labels, val, _, classifier = problem(3)
    test = Split(val.features, (CLASSES - 1) - val.labels)
    seen: list[float] = []
    import safe_cache.fit.adapters as adapters

    real_accuracy = adapters.accuracy

    def spy(logits, target):
        value = real_accuracy(logits, target)
        if target is val.labels:
            seen.append(value)
        return value

    monkeypatch.setattr(adapters, "accuracy", spy)
    result = tip_adapter_f(train, labels, val, test, classifier, SCALE,
                           {**DEFAULT_TIP, "search_step": [4, 3]}, epochs=6)
    per_epoch = seen[:6]
    assert result["best_epoch"] == 1 + int(np.argmax(per_epoch))


def test_linear_probe_picks_c_on_val():
    train, labels, val, test, _ = problem(4, n_train=6)
    flat = Split(F.normalize(train.mean(1), dim=-1), labels)
    result = linear_probe(flat, val, test, CLASSES, cs=(1e-4, 1.0, 1e3))
    assert result["C"] in (1e-4, 1.0, 1e3) and result["test_acc"] > 0.5
