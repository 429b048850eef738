"""CLAP: the zero-shot-initialised linear probe with its class-adaptive constraint.

Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language
Models" (CVPR 2024). Pinned to github.com/jusiro/CLAP (commit dbdf409): trainers/adapters.py
(`AdapterMethod` with INIT "ZS" and CONSTRAINT "l2", `CustomCLIP.forward_lp`,
`TrainerXCostume.run_epoch`, `ADAPTER.train` and `forward_backward`), the trainer config
configs/trainers/SGD_lr1e-1_B256_ep300.yaml as scripts/adapt.sh runs it (README: "CLAP" is
`adapt.sh ... ZS l2`), and the Dassl.pytorch defaults that config leaves (dassl/config/defaults.py:
SGD momentum 0.9; dassl/optim/lr_scheduler.py: the constant warmup around cosine).

ZS-LP: one prototype w_c per class, initialised to the zero-shot prototype t_c; the logits are
CLIP's, s * <x/|x|, w_c/|w_c|> with s CLIP's logit scale (`logit_scale.exp()`, 100).
CLAP adds to the cross-entropy the penalty

    (1/C) sum_c lambda_c |w_c - t_c|^2,

lambda_c the zero-shot model's mean softmax probability of class c over class c's training
samples (`init_lagrangian_multipliers`: diag(softmax(logits)^T onehot) / counts), computed once
on the augmented training features and then fixed: the released "l2" mode never runs the
augmented Lagrangian's outer step (only the "adaptative" modes do), so the multipliers are the
class-adaptive penalty weights, and a class the zero-shot model already gets right is held
closer to its text prototype. Training: SGD (lr 0.1, momentum 0.9, no weight decay) for 300
epochs, epoch 0 at the constant warmup lr 1e-5 and epoch e >= 1 at 0.1 (1 + cos(pi (e-1)/300))/2
(Dassl's ConstantWarmupScheduler, recounting); each epoch shuffles every (image, augmented view)
feature and takes as many batches of 256 as the image loader has (floor(images / 256), or 1
below 256 images: Dassl drops the last partial batch only when there is a full one). The last
epoch's prototypes are the model: CLAP selects nothing on a validation set (the paper's point:
few-shot adaptation should not assume one), so `val_acc` is reported, never used.

Where this differs from their code, and why:
- Views: they extract 20 random-resized-crop (scale 0.08-1) + flip passes per image
  (`epochs_aumentation`); we train on the store's V augmented views (Tip-Adapter's
  RandomResizedCrop 0.5-1 + flip), the only augmented features a store has.
- Prototypes: theirs are the raw mean of their templates' embeddings (one CoOp template per
  dataset, ImageNet 7 + 1). Ours point along the run's text classifier (its prompt set, as every
  workbench method starts from it) with the norm of the raw mean of the prompt set's sentence
  embeddings: the norm is part of their parametrisation (SGD on w moves w/|w| by lr/|w|, and the
  penalty is in those units), so it is kept. With one template per class the two coincide.
- Shuffling: a torch.Generator seeded from the run's seed, not numpy's global state.
- Nothing else: their temperature is fixed too (CLIP's `logit_scale` is an attribute of their
  adapter, so in its optimizer, but build_model freezes it by name: CustomCLIP registers it
  first), and their val split is never read in training either.

Their trainer itself (AdapterMethod, run_epoch, forward_backward with Dassl's SGD and scheduler),
run on the same features with the same permutations, gave prototypes within 3e-7 and the same
predictions. Cost: a 16-shot RN50-sized run (100 classes, 10 views: 1,800 steps of two
256 x 1024 x 100 matmuls) takes about 5 s on one thread of a shared 2-core machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluate import accuracy
from . import MethodInputs, MethodOutcome, Predictor, register_method, sentences


@dataclass(frozen=True)
class ClapRecipe:
    """configs/trainers/SGD_lr1e-1_B256_ep300.yaml with Dassl's defaults; `constraint` scales
    the class-adaptive penalty (1: CLAP, 0: ZS-LP)."""

    lr: float = 0.1
    momentum: float = 0.9  # Dassl OPTIM.MOMENTUM (the config leaves it)
    epochs: int = 300
    batch_size: int = 256
    warmup_lr: float = 1e-5  # WARMUP_EPOCH 1, WARMUP_TYPE constant, WARMUP_CONS_LR
    constraint: float = 1.0

    def epoch_lr(self, epoch: int) -> float:
        """The lr of 0-based epoch `epoch` under Dassl's constant warmup around cosine."""
        if epoch == 0:
            return self.warmup_lr
        return self.lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2


def zero_shot_prototypes(inputs: MethodInputs) -> torch.Tensor:
    """(C, D): the run's classifier, each row at the norm of its class's raw mean sentence
    embedding (their `base_text_features` when a class has one template)."""
    raw, labels, counts = sentences(inputs)
    means = torch.zeros(len(counts), raw.shape[1]).index_add_(0, labels, raw)
    norms = means.norm(dim=-1) / torch.tensor(counts, dtype=torch.float32)
    return inputs.classifier.float() * norms.to(inputs.classifier.device)[:, None]


def clap_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """`forward_lp`: scale * normalise(features) @ normalise(prototypes)^T."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T


def lagrange_multipliers(features: torch.Tensor, labels: torch.Tensor,
                         prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """(C,): per class, the zero-shot model's mean softmax probability of that class over its
    training samples (a class without samples gets 0, where theirs would divide by zero)."""
    classes = prototypes.shape[0]
    probs = torch.softmax(clap_logits(features, prototypes, scale), dim=-1)
    onehot = F.one_hot(labels, classes).to(probs.dtype)
    return (probs * onehot).sum(0) / onehot.sum(0).clamp(min=1)


def penalised_gradient(prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                       anchors: torch.Tensor, multipliers: torch.Tensor, scale: float,
                       weight: float = 1.0) -> torch.Tensor:
    """The gradient in W of the batch's loss, their `forward_backward`: the mean cross-entropy
    of `clap_logits` plus weight * mean_c lambda_c |w_c - t_c|^2 (`zero_shot_constraint`). In
    closed form (two matmuls, no autograd graph: a 16-shot RN50 run is 1,800 steps): with
    G = scale / B (softmax - onehot)^T x, the cross-entropy's is (G_c - u_c <u_c, G_c>) / |w_c|
    (u_c = w_c / |w_c|), the penalty's 2 weight lambda_c (w_c - t_c) / C."""
    norms = prototypes.norm(dim=-1, keepdim=True).clamp_(min=1e-12)  # F.normalize's eps
    units = prototypes / norms
    delta = torch.softmax((features @ units.T).mul_(scale), dim=-1)
    delta[torch.arange(len(labels), device=labels.device), labels] -= 1
    outer = (delta.T @ features).mul_(scale / len(labels))
    radial = (units * outer).sum(-1, keepdim=True)
    gradient = outer.sub_(units.mul_(radial)).div_(norms)
    if weight:
        pull = multipliers[:, None] * (2 * weight / len(prototypes))
        gradient.add_((prototypes - anchors).mul_(pull))
    return gradient


def batches_per_epoch(images: int, batch_size: int) -> int:
    """len(train_loader_x): Dassl drops the last partial batch when there is a full one."""
    return images // batch_size if images >= batch_size else 1


def train_prototypes(features: torch.Tensor, labels: torch.Tensor, images: int,
                     anchors: torch.Tensor, multipliers: torch.Tensor, scale: float,
                     recipe: ClapRecipe, generator: torch.Generator) -> torch.Tensor:
    """The prototypes after `recipe.epochs` epochs of SGD from `anchors` on the (samples, D)
    normalised `features`: each epoch one permutation of every sample (drawn from
    `generator`), cut into `batches_per_epoch(images)` consecutive batches. The step is
    torch.optim.SGD's (momentum, dampening 0: the buffer starts at the first gradient),
    written out (tests check it against torch's SGD on autograd's gradient)."""
    prototypes, momentum = anchors.clone(), torch.zeros_like(anchors)
    batches = batches_per_epoch(images, recipe.batch_size)
    for epoch in range(recipe.epochs):
        lr = recipe.epoch_lr(epoch)
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for index in range(batches):
            batch = order[index * recipe.batch_size:(index + 1) * recipe.batch_size]
            gradient = penalised_gradient(prototypes, features.index_select(0, batch),
                                          labels[batch], anchors, multipliers, scale,
                                          recipe.constraint)
            first = epoch == 0 and index == 0
            momentum = gradient if first else momentum.mul_(recipe.momentum).add_(gradient)
            prototypes.add_(momentum, alpha=-lr)
    return prototypes


def fit_clap(inputs: MethodInputs, recipe: ClapRecipe = ClapRecipe()) -> MethodOutcome:
    """CLAP (or, `recipe.constraint` 0, ZS-LP) on the run's augmented train views."""
    images, views, _ = inputs.train_views.shape
    features = F.normalize(inputs.train_views.float(), dim=-1).flatten(0, 1)
    labels = inputs.labels.repeat_interleave(views)
    anchors = zero_shot_prototypes(inputs)
    generator = torch.Generator().manual_seed(inputs.seed)
    with torch.no_grad():
        multipliers = lagrange_multipliers(features, labels, anchors, inputs.scale)
        prototypes = train_prototypes(features, labels, images, anchors, multipliers,
                                      inputs.scale, recipe, generator)
        val_acc = accuracy(clap_logits(inputs.val.features, prototypes, inputs.scale),
                           inputs.val.labels)
        test_acc = accuracy(clap_logits(inputs.test.features, prototypes, inputs.scale),
                            inputs.test.labels)
    summary = {"val_acc": val_acc, "test_acc": test_acc, "lr": recipe.lr,
               "momentum": recipe.momentum, "epochs": recipe.epochs,
               "batch_size": recipe.batch_size, "views": views,
               "constraint": "l2" if recipe.constraint else "none",
               "constraint_weight": recipe.constraint,
               "multiplier_mean": float(multipliers.mean().item()), "selected_on": "none"}
    return MethodOutcome(summary, _predictor(prototypes, inputs.scale))


def _predictor(prototypes: torch.Tensor, scale: float) -> Predictor:
    def predict(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        return clap_logits(original.float(), prototypes, scale)

    return predict


@register_method("clap")
def clap(inputs: MethodInputs) -> MethodOutcome:
    """CLAP as released: the "l2" class-adaptive constraint, 300 epochs, nothing selected."""
    return fit_clap(inputs)
