"""GDA: Gaussian discriminant analysis on CLIP's image features, fused with zero-shot CLIP.

Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation" (ICLR 2024);
pinned to github.com/mrflogs/ICLR24, main_few_shots.py (`run`; main_robustness.py is the same
estimator). What is pinned to their code:

- features: every augmented view of every train image, each L2-normalised, pooled together as
  samples (their `augment_epoch` passes of RandomResizedCrop(0.5, 1) + flip; ours are the
  store's views, made by the same recipe, data/views.py); val and test L2-normalised;
- class means of those samples; their shrunk shared precision (the "KS estimator" line),
  P = D * pinv((N - 1) * cov + tr(cov) * I) with cov the unbiased covariance of the
  class-centred samples (N of them, D dimensions);
- a uniform prior: W = P mu_c, b_c = log(1 / C) - mu_c^T P mu_c / 2;
- the fusion logits = scale * f T^T + alpha * (f W + b), `scale` CLIP's logit scale (their
  literal 100.), alpha searched over {1e-4, 1e-3, ..., 100} keeping the first strictly best
  accuracy, 0.1 if none beats 0.

Where we differ, and why:

- alpha is chosen on OUR val set (MethodInputs.val, the min(K, 4)-shot val images), never on
  test. Their code searches the whole val split (on ImageNet its test split): a val set larger
  than the K-shot train set is not few-shot, and test is never a selection set (the
  workbench's one protocol, workbench/__init__.py). `fit --protocol reference` hands this
  function their selection set as MethodInputs.val instead (fit/baselines.py), and marks it.
- precision: their features are CLIP's fp16 and the pinv runs in float32; ours are the stored
  float32 features, the scatter is summed in float32 and inverted in float64. The matrix is
  positive definite whenever the samples vary (its least eigenvalue is at least tr(cov) > 0),
  so the pinv is its inverse (a Cholesky solve); when nothing varies (one view of one image
  per class) cov = 0 and, as pinv(0) = 0, the precision is zero.
- a class with no train image (their code would divide by zero) gets a zero mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluate import accuracy
from . import MethodInputs, MethodOutcome, register_method

ALPHAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # their grid
DEFAULT_ALPHA = 0.1  # theirs, kept when no alpha beats accuracy 0


@dataclass(frozen=True)
class Gaussian:
    """The linear classifier of Gaussians with a shared precision: f @ weight + bias."""

    weight: torch.Tensor  # (D, C) = P mu^T
    bias: torch.Tensor  # (C,) log prior - mu P mu^T / 2

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight + self.bias


def class_means(samples: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(C, D) per-class means (zero for a class without samples), by one scatter-add."""
    sums = torch.zeros(classes, samples.shape[1], dtype=samples.dtype, device=samples.device)
    sums.index_add_(0, labels, samples)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1)
    return sums / counts[:, None].to(samples.dtype)


def shrunk_precision(centred: torch.Tensor) -> torch.Tensor:
    """Their estimator, D * pinv((N - 1) cov + tr(cov) I), in float64. The centred samples'
    mean is zero (each class centred on its own mean), so (N - 1) cov is the scatter X^T X."""
    count, dim = centred.shape
    scatter = (centred.T @ centred).double()
    trace_cov = scatter.trace() / max(count - 1, 1)
    if trace_cov <= 0:  # no variation at all: pinv of the zero matrix
        return torch.zeros_like(scatter)
    eye = torch.eye(dim, dtype=scatter.dtype, device=scatter.device)
    return dim * torch.cholesky_inverse(torch.linalg.cholesky(scatter + trace_cov * eye))


def fit_gaussian(samples: torch.Tensor, labels: torch.Tensor, classes: int) -> Gaussian:
    """GDA's classifier from normalised samples: class means, the shared shrunk precision,
    W = P mu, b = log(1/C) - mu P mu / 2."""
    means = class_means(samples, labels, classes)
    precision = shrunk_precision(samples - means[labels])
    means64 = means.double()
    weight = precision @ means64.T
    bias = math.log(1.0 / classes) - 0.5 * (means64 @ precision * means64).sum(-1)
    return Gaussian(weight.to(samples.dtype), bias.to(samples.dtype))


def fused_logits(features: torch.Tensor, classifier: torch.Tensor, gaussian: Gaussian,
                 alpha: float, scale: float) -> torch.Tensor:
    """Zero-shot CLIP's logits plus alpha times GDA's (their fusion)."""
    return scale * features @ classifier.T + alpha * gaussian.logits(features)


def search_alpha(inputs: MethodInputs, gaussian: Gaussian) -> tuple[float, float]:
    """(alpha, val accuracy): their grid and rule (first strictly best, 0.1 if none beats 0),
    on our val set."""
    zero_shot = inputs.scale * inputs.val.features @ inputs.classifier.T
    gda = gaussian.logits(inputs.val.features)
    best_acc, best_alpha = 0.0, DEFAULT_ALPHA
    for alpha in ALPHAS:
        acc = accuracy(zero_shot + alpha * gda, inputs.val.labels)
        if acc > best_acc:
            best_acc, best_alpha = acc, alpha
    return best_alpha, best_acc  # with none above 0, 0.1's accuracy is 0 too


@register_method("gda")
@torch.no_grad()
def gda(inputs: MethodInputs) -> MethodOutcome:
    """Training-free GDA: deterministic (no randomness: the seed only chose the train rows)."""
    views = inputs.train_views.shape[1]
    samples = F.normalize(inputs.train_views.float(), dim=-1).flatten(0, 1)
    labels = inputs.labels.repeat_interleave(views)
    gaussian = fit_gaussian(samples, labels, inputs.classes)
    alpha, val_acc = search_alpha(inputs, gaussian)
    classifier, scale = inputs.classifier, inputs.scale
    test_acc = accuracy(fused_logits(inputs.test.features, classifier, gaussian, alpha, scale),
                        inputs.test.labels)
    summary = {"val_acc": val_acc, "test_acc": test_acc, "alpha": alpha,
               "samples": len(samples), "views": int(views)}

    def predict(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        return fused_logits(F.normalize(original.float(), dim=-1), classifier, gaussian, alpha,
                            scale)

    return MethodOutcome(summary, predict)
