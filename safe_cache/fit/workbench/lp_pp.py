"""LP++: a linear probe blended with the text classifier by learnable per-class multipliers.

Huang et al., "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP" (CVPR 2024); pinned
to github.com/FereshteShakeri/FewShot-CLIP-Strong-Baseline, methods/linear_probe_p2.py
(`LinearProbe_P2`, `calculate_lr_w`, `calculate_lr_alpha`, `calculate_init_alpha`) with
methods/utils.py (`compute_centroids`, `compute_centroids_alpha`) and configs/base.yaml. What
is pinned to their code:

- train features: one augmented view per train image (their train loader's single pass of
  RandomResizedCrop(0.5, 1) + flip; ours is the store's first view, data/views.py), val and
  test features, all L2-normalised;
- logits = f W^T + b + alpha_c * (f t_c), the text classifier T unscaled (no logit scale);
- init: W = each class's SUM of train features (their compute_centroids does not divide),
  b as nn.Linear initialises it, U(-1/sqrt(D), 1/sqrt(D)); every alpha_c = 250 * the mean over
  classes of the mean text similarity f . t_c of the class's own train features;
- full-batch training, 300 epochs (train_epoch), mean cross-entropy; (W, b) by SGD with
  momentum 0.9 at lr_w = 4 N / lambda_max(F^T F); alpha by plain gradient steps every 10th
  epoch at lr_alpha = N / (4 max_c sum_n (f_n . t_c)^2). As in their code, alpha's gradient is
  never zeroed: each alpha step takes the sum of every epoch's gradient since the start;
- after each epoch the val accuracy, keeping the state of the last best (>=) epoch.

Where we differ, and why:

- the epoch (their only choice made on data other than train) is chosen on OUR val set,
  MethodInputs.val (the min(K, 4)-shot val images); theirs is a K-shot val set. The
  workbench's one protocol (workbench/__init__.py): every method selects on the same val set.
- precision: their CLIP features, probe and multipliers are fp16; ours are float32, with the
  step sizes' sums in float64.
- the bias's random init draws from a generator seeded by the run's seed (theirs from the
  global torch state), so a run is deterministic given its seed.
- a class with no train image (their code assumes every class present) is left out of
  alpha's init mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluate import accuracy
from . import MethodInputs, MethodOutcome, register_method

EPOCHS = 300  # configs/base.yaml train_epoch
ALPHA_EVERY = 10  # alpha's step every 10th epoch
MOMENTUM = 0.9
ALPHA_INIT = 250.0  # init alpha = 250 / shots * (shots * mean text similarity)


@dataclass(frozen=True)
class Probe:
    """LP++'s classifier: f @ weight + bias + alpha * (f T^T)."""

    weight: torch.Tensor  # (D, C), the transpose of their nn.Linear weight
    bias: torch.Tensor  # (C,)
    alpha: torch.Tensor  # (C,) the per-class text multipliers

    def logits(self, features: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, features, self.weight) + self.alpha * text_logits


def step_sizes(features: torch.Tensor, text_logits: torch.Tensor) -> tuple[float, float]:
    """(lr_w, lr_alpha), their data-derived (Lipschitz) step sizes: 4 N / lambda_max(F^T F)
    and N / (4 max_c sum_n (f_n . t_c)^2). lambda_max from the smaller Gram matrix (the same
    nonzero eigenvalues)."""
    n, dim = features.shape
    x = features.double()
    gram = x @ x.T if n < dim else x.T @ x
    lambda_max = float(torch.linalg.eigvalsh(gram)[-1])
    text_energy = float(text_logits.double().pow(2).sum(0).max())
    return 4 * n / lambda_max, n / (4 * text_energy)


def init_alpha(text_logits: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """250 * the mean over classes of each class's mean f . t_c over its own features."""
    own = text_logits.double().gather(1, labels[:, None])[:, 0]
    sums = torch.zeros(classes, dtype=own.dtype, device=own.device).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=classes)
    present = counts > 0
    return ALPHA_INIT * float((sums[present] / counts[present]).mean())


def initial_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, alpha: float,
                  seed: int) -> Probe:
    """Their init: class sums of the features, nn.Linear's uniform bias, one alpha for all."""
    dim = features.shape[1]
    weight = torch.zeros(dim, classes, dtype=features.dtype, device=features.device)
    weight.index_add_(1, labels, features.T)
    bound = 1 / math.sqrt(dim)
    generator = torch.Generator().manual_seed(seed)
    bias = torch.empty(classes).uniform_(-bound, bound, generator=generator)
    alpha_vec = torch.full((classes,), alpha, dtype=features.dtype)
    return Probe(weight, bias.to(weight), alpha_vec.to(weight))


@dataclass(frozen=True)
class Task:
    """Normalised features, their labels and their (unscaled) text logits f T^T."""

    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    text_logits: torch.Tensor  # (N, C)

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> Task:
        return cls(features, labels, features @ text.T)


@dataclass
class Trained:
    probe: Probe  # the state after `epoch` epochs
    epoch: int  # 1-based: the number of updates the kept state had
    val_acc: float


def train(probe: Probe, task: Task, val: Task, lr_w: float, lr_alpha: float,
          epochs: int = EPOCHS) -> Trained:
    """Their loop with the gradients in closed form (vectorised, no autograd): mean
    cross-entropy's logit gradient G = (softmax - onehot) / N, dW = F^T G, db = sum_n G,
    dalpha = sum_n G * (F T^T); torch SGD's momentum (buf = 0.9 buf + grad; the first buf is
    the first grad) for (W, b). Keeps the state of the last epoch of best val accuracy."""
    target = F.one_hot(task.labels, task.text_logits.shape[1]).to(task.features.dtype)
    features_t = task.features.T.contiguous()
    weight, bias, alpha = (t.clone() for t in (probe.weight, probe.bias, probe.alpha))
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    alpha_grad = torch.zeros_like(alpha)
    best = Trained(probe, 0, -1.0)
    for epoch in range(epochs):
        logits = torch.addmm(bias, task.features, weight) + alpha * task.text_logits
        grad = (torch.softmax(logits, dim=-1) - target) / len(target)
        alpha_grad += (grad * task.text_logits).sum(0)  # never zeroed, as in their code
        buf_w.mul_(MOMENTUM).add_(features_t @ grad)
        buf_b.mul_(MOMENTUM).add_(grad.sum(0))
        weight.sub_(lr_w * buf_w)
        bias.sub_(lr_w * buf_b)
        if (epoch + 1) % ALPHA_EVERY == 0:
            alpha.sub_(lr_alpha * alpha_grad)
        state = Probe(weight, bias, alpha)
        acc = accuracy(state.logits(val.features, val.text_logits), val.labels)
        if acc >= best.val_acc:
            best = Trained(Probe(weight.clone(), bias.clone(), alpha.clone()), epoch + 1, acc)
    return best


@register_method("lp_pp")
@torch.no_grad()
def lp_pp(inputs: MethodInputs) -> MethodOutcome:
    """LP++ on one augmented view per train image; the epoch kept is chosen on val."""
    text, classes = inputs.classifier.float(), inputs.classes
    task = Task.of(F.normalize(inputs.train_views[:, 0].float(), dim=-1), inputs.labels, text)
    lr_w, lr_alpha = step_sizes(task.features, task.text_logits)
    alpha0 = init_alpha(task.text_logits, task.labels, classes)
    probe = initial_probe(task.features, task.labels, classes, alpha0, inputs.seed)
    trained = train(probe, task, Task.of(inputs.val.features, inputs.val.labels, text), lr_w,
                    lr_alpha)
    kept = trained.probe
    test = Task.of(inputs.test.features, inputs.test.labels, text)
    test_acc = accuracy(kept.logits(test.features, test.text_logits), test.labels)
    summary = {"val_acc": trained.val_acc, "test_acc": test_acc, "epoch": trained.epoch,
               "epochs": EPOCHS, "lr_w": lr_w, "lr_alpha": lr_alpha, "init_alpha": alpha0,
               "alpha_mean": float(kept.alpha.mean()), "train_view": 0}

    def predict(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        query = F.normalize(original.float(), dim=-1)
        return kept.logits(query, query @ text.T)

    return MethodOutcome(summary, predict)
