"""ProLIP (Fahes et al., "Fine-Tuning CLIP's Last Visual Projector: A Few-Shot Cornucopia"):
fine-tune only the visual tower's last linear projection, pulled towards its initial weights.

Pinned to astra-vision/ProLIP at commit b43e795, methods/ProLIP.py (the recipe; their
`search_init_hp`, run on the same features, gives bitwise the weights `train_projections`
gives) and configs/base.yaml (its defaults):
- the trained map: RN's attention-pool output projection `c_proj` (its weight; the bias stays
  frozen, `requires_grad = False`), a ViT's `proj` after ln_post; its inputs, each view's
  pre-projection feature, computed once (their `save_features`: here from the stored dense maps
  with the store's original head, `GridHead.pre_projection`);
- the loss: cross-entropy of `100 * normalize(x W^T + b) @ text^T` (their fixed logit scale)
  plus `lambda * ||W - W0||^2` (`MSELoss(reduction='sum')` on the weight);
- full batch: one step per epoch on every train image's features of one view, views in their
  order (epoch e uses view (e + 1) mod V); 300 epochs (`train_epoch`), Adam(lr, eps=1e-4),
  CosineAnnealingLR(T_max=300) stepped once per epoch;
- lambda = 1/K for K shots (`lambda_funct_1_N: True`, their default rule); the test
  evaluation uses the final weights.

Where our protocol differs, and why:
- lr is chosen on MethodInputs.val (the min(K, 4)-shot val set, their "few-shot validation"
  setting, LP++'s) among the learning rates of their lambda = 1/N experiments
  (scripts/few_shot_no_val_lr{1e-2,1e-3,1e-4,1e-5}_lambda_1_N.sh); the first best in that
  order (their search keeps the first strictly better). Their few-shot-validation search also
  grid-searches lambda over 7 values and lr down to 1e-8: 49 trainings where 4 suffice with
  their own rule for lambda (their Table 2: lambda = 1/N is stable across lr).
- Their train features are 300 augmented views (one per epoch); a store holds V views
  (`aug_dense`, or the center view alone when it has none), each used 300/V times.
- The family must end in a linear projection: RN (c_proj), ViT and CoCa (proj after ln_post),
  and timm towers whose last op is an nn.Linear (EVA, PE-Core's MAP head); SigLIP's MAP head
  ends in its MLP, and prolip refuses it.

ProLIP has no OOD predictor from pooled features (`predictor=None`): it needs each image's
pre-projection feature, which the pooled features (original or SAFE's) do not hold. Nothing
is random (full batch, a fixed view order): `MethodInputs.seed` is not used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RecipeError, UnsupportedModelError
from ...model.heads import GridHead
from ...store import FeatureStore
from ..evaluate import accuracy, stream_split
from ..original import original_head
from . import MethodInputs, MethodOutcome, register_method

LOGIT_SCALE = 100.0  # their `100. * image_features @ text_weights`, whatever the backbone's
EPOCHS = 300  # configs/base.yaml train_epoch
ADAM_EPS = 1e-4
LRS = (1e-2, 1e-3, 1e-4, 1e-5)  # their lambda = 1/N learning rates, searched on val in order


@register_method("prolip")
def prolip(inputs: MethodInputs) -> MethodOutcome:
    """ProLIP with lambda = 1/K and lr chosen on val (module docstring)."""
    return fit_prolip(inputs)[0]


def fit_prolip(inputs: MethodInputs, *, lrs: tuple[float, ...] = LRS,
               lam: float | None = None, epochs: int = EPOCHS
               ) -> tuple[MethodOutcome, torch.Tensor]:
    """ProLIP's run and the chosen projection weight (D, P); `lam` None: their rule 1/K.
    (The tests set lam and lrs: an infinite pull, none at all.)"""
    if len(inputs.val.labels) != len(inputs.val_rows):  # its features come from val_rows
        raise RecipeError(f"prolip reads the val rows' dense maps: {len(inputs.val_rows)} rows,"
                          f" but the val set holds {len(inputs.val.labels)} labels.")
    head = original_head(inputs.store).to(inputs.device).eval()
    weight0, bias = _projection(head, inputs.store)
    shots = int(torch.bincount(inputs.labels).max().item())
    lam = 1.0 / shots if lam is None else lam
    train = pre_projection_rows(inputs.store, "train", inputs.train_rows, head,
                                inputs.test_chunk, inputs.device)
    val = pre_projection_rows(inputs.store, "val", inputs.val_rows, head, inputs.test_chunk,
                              inputs.device, views=False)
    weights = train_projections(train, inputs.labels, weight0, bias, inputs.classifier, lrs,
                                lam, epochs)
    val_accs = [accuracy(_logits(val, w, bias, inputs.classifier), inputs.val.labels)
                for w in weights]
    chosen = int(np.argmax(val_accs))  # the first best
    test_acc = _test_accuracy(inputs, head, weights[chosen], bias)
    summary = {"val_acc": val_accs[chosen], "test_acc": test_acc, "lr": lrs[chosen],
               "lambda": lam, "epochs": epochs, "logit_scale": LOGIT_SCALE,
               "train_views": int(train.shape[1]), "val_acc_per_lr": val_accs}
    return MethodOutcome(summary, predictor=None), weights[chosen]


def check_store_serves(store: FeatureStore) -> None:
    """Refuse, before anything runs, a store whose family's head ends in no linear
    projection (fit calls it with the other checks, so SAFE never trains for nothing)."""
    _projection(original_head(store), store)


def _projection(head: GridHead, store: FeatureStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's final projection, detached copies (weight (D, P), bias); a clear refusal for a
    family whose head ends otherwise."""
    try:
        weight, bias = head.projection()
    except UnsupportedModelError as exc:
        card = store.manifest["backbone"]
        raise RecipeError(f"prolip does not support the {card['family']} family"
                          f" ({card['model']}): ProLIP fine-tunes the tower's last linear"
                          f" projection, and {exc} Fit without prolip in --methods.") from None
    return weight.detach().clone(), None if bias is None else bias.detach().clone()


@torch.no_grad()
def pre_projection_rows(store: FeatureStore, split: str, rows: np.ndarray, head: GridHead,
                        chunk: int, device: torch.device, *, views: bool = True
                        ) -> torch.Tensor:
    """Each row's pre-projection features from its stored dense maps, read `chunk` maps at a
    time: train (`views`): (images, V, P) from aug_dense (V = 1, the center view, for a store
    without views); otherwise (rows, P) from the center view's dense."""
    name = "aug_dense" if views and store.view_count(split) else "dense"
    per_row = store.view_count(split) if name == "aug_dense" else 1
    step = max(1, chunk // per_row)
    parts = []
    for start in range(0, len(rows), step):
        dense = torch.from_numpy(store.read_rows(split, name, rows[start:start + step]))
        flat = dense.reshape(-1, *dense.shape[-2:]).to(device).float()
        parts.append(head.pre_projection(flat).reshape(len(dense), per_row, -1))
    features = torch.cat(parts)
    return features if views else features[:, 0]


def train_projections(features: torch.Tensor, labels: torch.Tensor, weight0: torch.Tensor,
                      bias: torch.Tensor | None, classifier: torch.Tensor,
                      lrs: tuple[float, ...], lam: float, epochs: int) -> list[torch.Tensor]:
    """ProLIP's training, one projection weight per learning rate, all on the same full-batch
    steps (features (images, V, P), the view of epoch e is (e + 1) mod V). Each weight is its
    own Adam parameter group, so one optimizer and one schedule serve them all."""
    weights = [nn.Parameter(weight0.clone()) for _ in lrs]
    optimizer = torch.optim.Adam([{"params": [w], "lr": lr} for w, lr in zip(weights, lrs,
                                                                          strict=True)],
                                 eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    views = features.shape[1]
    for epoch in range(epochs):
        x = features[:, (epoch + 1) % views]
        loss = torch.stack([prolip_loss(x, labels, w, weight0, bias, classifier, lam)
                            for w in weights]).sum()  # independent terms: each its own grad
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return [w.detach() for w in weights]


def prolip_loss(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                weight0: torch.Tensor, bias: torch.Tensor | None, classifier: torch.Tensor,
                lam: float) -> torch.Tensor:
    """Cross-entropy at their logit scale plus lambda times the squared distance of the weight
    to its initial value (a sum over entries, as their MSELoss(reduction='sum'))."""
    ce = F.cross_entropy(_logits(x, weight, bias, classifier), labels)
    return ce + lam * (weight - weight0).pow(2).sum()


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            classifier: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * F.normalize(F.linear(x, weight, bias), dim=-1) @ classifier.T


@torch.no_grad()
def _test_accuracy(inputs: MethodInputs, head: GridHead, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> float:
    """Test accuracy of the chosen projection, the test dense maps streamed once (a chunk's
    pre-projection features are dropped once it is classified)."""
    predictions = []
    for dense, _, _ in stream_split(inputs.store, "test", inputs.test_chunk, inputs.test_rows):
        pre = head.pre_projection(dense.to(inputs.device))
        predictions.append(_logits(pre, weight, bias, inputs.classifier).argmax(-1))
    predicted = torch.cat(predictions)
    if len(predicted) != len(inputs.test.labels):
        raise RecipeError(f"prolip read {len(predicted)} test rows, the run evaluates"
                          f" {len(inputs.test.labels)}.")
    return predicted.eq(inputs.test.labels).float().mean().item()
