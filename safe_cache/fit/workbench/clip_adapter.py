"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023): a bottleneck MLP on the image features, blended with them by a residual ratio.

Pinned to gaopengcuhk/CLIP-Adapter at commit 08d07f8, clip_adapter.py (the repository's only
code) for the model, and to the CoOp / Dassl configs it runs under ("follow CoOp's command")
for the training: KaiyangZhou/CoOp at 6979355 and KaiyangZhou/Dassl.pytorch at c61a1b5.
- the adapter: Linear(D, D/4, bias=False), ReLU, Linear(D/4, D, bias=False), ReLU (`Adapter`,
  reduction 4), on the frozen image features; `ratio * adapter(f) + (1 - ratio) * f`, then
  normalised, against the normalised text classifier at CLIP's logit scale
  (`logit_scale.exp()`); cross-entropy; only the adapter trains;
- the optimiser, CoOp's configs/trainers/CoOp/rn50*.yaml with Dassl's defaults
  (dassl/config/defaults.py, dassl/optim/): SGD lr 0.002, momentum 0.9, weight decay 5e-4,
  batch 32 (the last partial batch dropped unless there are fewer images, as
  dassl/data/data_manager.py does), cosine annealing over the epochs stepped once per epoch
  after a first epoch at the constant lr 1e-5; 200 epochs for 8 and 16 shots, 100 for 2 and
  4, 50 for 1, and 50 for ImageNet at every K (CoOp's COOP.md); the last epoch's adapter is
  evaluated (Dassl's last_step). Their CustomCLIP, trained by Dassl's own optimiser and
  scheduler builders on the same batches, ends within float rounding of `train_adapters`.
The adapter has no bias and ReLU is positively homogeneous, so `adapter(c f) = c adapter(f)`
for c > 0 and the normalised blend is the same for a feature and its normalised form: their
code feeds unnormalised features, ours feed normalised ones (the same logits, losses and
gradients), so val, test and the OOD predictor all take L2-normalised features.

Where our protocol differs, and why:
- The residual ratio (their code fixes 0.2; re-implementations search it per dataset) is
  chosen on MethodInputs.val (the min(K, 4)-shot val set, never test) among 0.1, 0.2, ..., 1.0
  (the search list of astra-vision/ProLIP methods/clip_adapter.py, which re-implements it);
  the first best wins. Every ratio trains on the same minibatches, all at once.
- Their data loader draws a fresh augmentation of each image every epoch; a store holds V
  augmented views, and epoch e uses view e mod V of every image (as Tip-Adapter-F's
  training in adapters.py does); the batches are a seeded permutation per epoch.
Deterministic given MethodInputs.seed (the adapter's initialisation and the batch order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate import accuracy
from . import MethodInputs, MethodOutcome, Predictor, register_method

REDUCTION = 4
RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 ... 1.0
LR, MOMENTUM, WEIGHT_DECAY, BATCH_SIZE = 0.002, 0.9, 5e-4, 32
WARMUP_LR = 1e-5  # the first epoch's constant lr (Dassl's constant warmup)


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's schedule: 50 epochs for 1 shot (and ImageNet), 100 for 2 and 4, 200 beyond."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def epoch_lr(epoch: int, epochs: int) -> float:
    """The lr of an epoch (0-based): the warmup's constant lr, then cosine annealing from LR
    (Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs): epoch e >= 1 runs at
    the cosine's step e - 1)."""
    if epoch == 0:
        return WARMUP_LR
    return LR * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


@dataclass
class Adapters:
    """One adapter per residual ratio, stacked: down (G, D/4, D), up (G, D, D/4) in
    nn.Linear's orientation; ratios (G,)."""

    down: torch.Tensor
    up: torch.Tensor
    ratios: torch.Tensor

    @classmethod
    def init(cls, dim: int, ratios: tuple[float, ...], seed: int,
             device: torch.device) -> Adapters:
        """nn.Linear's own initialisation, seeded; the same start for every ratio, so the
        ratio is all that differs."""
        generator = torch.Generator().manual_seed(seed)
        hidden = dim // REDUCTION
        down, up = torch.empty(hidden, dim), torch.empty(dim, hidden)
        for weight in (down, up):  # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        count = len(ratios)
        return cls(down.expand(count, -1, -1).clone().to(device),
                   up.expand(count, -1, -1).clone().to(device),
                   torch.tensor(ratios, dtype=down.dtype, device=device))

    def logits(self, features: torch.Tensor, classifier: torch.Tensor,
               scale: float) -> torch.Tensor:
        """(G, B, C): each ratio's `scale * normalize(r * adapter(f) + (1 - r) f) @ text^T`."""
        hidden = torch.relu(torch.matmul(features, self.down.transpose(1, 2)))
        adapted = torch.relu(torch.bmm(hidden, self.up.transpose(1, 2)))
        ratio = self.ratios[:, None, None]
        blended = ratio * adapted + (1 - ratio) * features
        return scale * F.normalize(blended, dim=-1) @ classifier.T

    def select(self, index: int) -> Adapters:
        return Adapters(self.down[index:index + 1].detach(), self.up[index:index + 1].detach(),
                        self.ratios[index:index + 1])


@register_method("clip_adapter")
def clip_adapter(inputs: MethodInputs) -> MethodOutcome:
    """CLIP-Adapter with its residual ratio chosen on val (module docstring)."""
    return fit_clip_adapter(inputs)


def fit_clip_adapter(inputs: MethodInputs, *, ratios: tuple[float, ...] = RATIOS,
                     epochs: int | None = None) -> MethodOutcome:
    """Train one adapter per ratio, choose the ratio on val, test it; `epochs` None: CoOp's
    schedule for the run's shots."""
    shots = int(torch.bincount(inputs.labels).max().item())
    epochs = epochs or coop_epochs(shots, inputs.store.manifest["dataset"]["name"])
    views = F.normalize(inputs.train_views.float(), dim=-1)
    adapters = Adapters.init(views.shape[-1], ratios, inputs.seed, inputs.device)
    train_adapters(adapters, views, inputs.labels, inputs.classifier, inputs.scale, epochs,
                   inputs.seed)
    with torch.no_grad():
        val_logits = adapters.logits(inputs.val.features, inputs.classifier, inputs.scale)
        val_accs = [accuracy(logits, inputs.val.labels) for logits in val_logits]
        chosen = int(np.argmax(val_accs))  # the first best
        best = adapters.select(chosen)
        predictor = _predictor(best, inputs.classifier, inputs.scale)
        test_acc = accuracy(predictor(inputs.test.features, inputs.test.features),
                            inputs.test.labels)
    summary = {"val_acc": val_accs[chosen], "test_acc": test_acc, "ratio": ratios[chosen],
               "epochs": epochs, "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
               "batch_size": BATCH_SIZE, "reduction": REDUCTION,
               "val_acc_per_ratio": val_accs}
    return MethodOutcome(summary, predictor)


def train_adapters(adapters: Adapters, views: torch.Tensor, labels: torch.Tensor,
                   classifier: torch.Tensor, scale: float, epochs: int, seed: int) -> None:
    """SGD on every ratio's adapter at once, in place: epoch e, view e mod V of each image in
    seeded minibatches; each ratio's loss is the mean cross-entropy of its batch."""
    images, view_count, _ = views.shape
    params = [nn.Parameter(adapters.down), nn.Parameter(adapters.up)]
    adapters.down, adapters.up = params
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                fused=True)  # one pass over the stacked weights, not four
    generator = torch.Generator().manual_seed(seed)
    size = min(BATCH_SIZE, images)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(epoch, epochs)
        features = views[:, epoch % view_count]
        order = torch.randperm(images, generator=generator).to(views.device)
        for start in range(0, images - size + 1, size):  # full batches only
            batch = order[start:start + size]
            loss = adapter_loss(adapters, features[batch], labels[batch], classifier, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    adapters.down, adapters.up = adapters.down.detach(), adapters.up.detach()


def adapter_loss(adapters: Adapters, features: torch.Tensor, labels: torch.Tensor,
                 classifier: torch.Tensor, scale: float) -> torch.Tensor:
    """The sum over ratios of each one's mean cross-entropy (independent terms: each ratio's
    adapter gets its own loss's gradient)."""
    logits = adapters.logits(features, classifier, scale)
    count, batch = logits.shape[:2]
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(count),
                           reduction="sum") / batch


def _predictor(adapter: Adapters, classifier: torch.Tensor, scale: float) -> Predictor:
    """(original pooled, fine-tuned pooled) -> logits over all classes: the chosen adapter on
    the normalised original features (SAFE's fine-tuned features are not used)."""
    def predict(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        features = F.normalize(original.float(), dim=-1)
        return adapter.logits(features, classifier, scale)[0]

    return predict
