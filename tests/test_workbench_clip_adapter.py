"""CLIP-Adapter (fit/workbench/clip_adapter.py) on a tiny store, against their objective written
here from their code, and through fit_one beside ProLIP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_workbench_prolip import (
    SEED,
    SHOTS,
    method_inputs,
    tiny_store,
    zero_shot,
)
from torch import nn

from safe_cache.fit.adapters import Split
from safe_cache.fit.evaluate import accuracy
from safe_cache.fit.workbench import registry
from safe_cache.fit.workbench.clip_adapter import (
    LR,
    RATIOS,
    WARMUP_LR,
    Adapters,
    adapter_loss,
    coop_epochs,
    epoch_lr,
    fit_clip_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_adapter")
    return method_inputs(tiny_store(str(folder / "tiny.zarr"), "safe-cache-tiny-rn"))


class TheirAdapter(nn.Module):
    """Their `Adapter` (clip_adapter.py): Linear, ReLU, Linear, ReLU, no biases."""

    def __init__(self, c_in: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_in // reduction, bias=False), nn.ReLU(),
                                nn.Linear(c_in // reduction, c_in, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def their_logits(adapter: nn.Module, image_features: torch.Tensor, text: torch.Tensor,
                 ratio: float, logit_scale: float) -> torch.Tensor:
    """CustomCLIP.forward on the image encoder's (unnormalised) output."""
    x = adapter(image_features)
    image_features = ratio * x + (1 - ratio) * image_features
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return logit_scale * image_features @ text.t()


def test_one_step_loss_and_gradient_are_their_objectives(inputs):
    """Our stacked adapters on normalised features: each ratio's loss and gradients equal
    their module's on the raw (unnormalised) features of the same batch."""
    ratios = (0.2, 0.7)
    adapters = Adapters.init(inputs.train_views.shape[-1], ratios, 3, inputs.device)
    down, up = (nn.Parameter(w.clone()) for w in (adapters.down, adapters.up))
    adapters.down, adapters.up = down, up
    raw = inputs.train_views[:, 1] * 7.0  # any positive scale: the adapter is homogeneous
    loss = adapter_loss(adapters, F.normalize(raw, dim=-1), inputs.labels, inputs.classifier,
                        inputs.scale)
    loss.backward()
    total = 0.0
    for g, ratio in enumerate(ratios):
        theirs = TheirAdapter(raw.shape[-1])
        theirs.fc[0].weight.data.copy_(adapters.down[g].detach())
        theirs.fc[2].weight.data.copy_(adapters.up[g].detach())
        their_loss = F.cross_entropy(
            their_logits(theirs, raw, inputs.classifier, ratio, inputs.scale), inputs.labels)
        their_loss.backward()
        total += their_loss.item()
        torch.testing.assert_close(down.grad[g], theirs.fc[0].weight.grad, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(up.grad[g], theirs.fc[2].weight.grad, rtol=1e-4, atol=1e-6)
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_their_initialisation_and_schedule():
    """Their Adapter's nn.Linear initialisation under the seed (the same for every ratio),
    and Dassl's constant warmup then cosine, replayed with torch's scheduler."""
    torch.manual_seed(5)
    theirs = TheirAdapter(16)
    adapters = Adapters.init(16, (0.1, 0.5), 5, torch.device("cpu"))
    for g in range(2):
        assert torch.equal(adapters.down[g], theirs.fc[0].weight)
        assert torch.equal(adapters.up[g], theirs.fc[2].weight)
    epochs = 7
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
    lrs = [WARMUP_LR, cosine.get_last_lr()[0]]  # epoch 0: the warmup; 1: the cosine's start
    for _ in range(epochs - 2):
        optimizer.step()
        cosine.step()
        lrs.append(cosine.get_last_lr()[0])
    assert [epoch_lr(e, epochs) for e in range(epochs)] == pytest.approx(lrs, rel=1e-12)
    assert [coop_epochs(k, "dtd") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop_epochs(16, "imagenet") == 50


def test_residual_ratio_zero_is_zero_shot(inputs):
    outcome = fit_clip_adapter(inputs, ratios=(0.0,), epochs=3)
    assert outcome.summary["test_acc"] == zero_shot(inputs)
    assert outcome.predictor is not None
    logits = outcome.predictor(inputs.test.features * 3.0, inputs.test.features)
    torch.testing.assert_close(logits, inputs.scale * inputs.test.features @ inputs.classifier.T)


def test_registered_run_chooses_on_val_and_its_predictor_reproduces_test(inputs):
    outcome = registry()["clip_adapter"](inputs)
    summary = outcome.summary
    assert summary["epochs"] == coop_epochs(SHOTS, "spots") == 100
    assert summary["ratio"] in RATIOS
    assert summary["val_acc"] == max(summary["val_acc_per_ratio"])
    assert outcome.predictor is not None
    raw = torch.from_numpy(inputs.store.read_rows("test", "pooled", inputs.test_rows))
    assert accuracy(outcome.predictor(raw, raw), inputs.test.labels) == summary["test_acc"]


def test_deterministic_and_never_from_test_labels(inputs):
    first = fit_clip_adapter(inputs, epochs=4).summary
    assert fit_clip_adapter(inputs, epochs=4).summary == first
    shuffled = Split(inputs.test.features, torch.roll(inputs.test.labels, 1))
    other = fit_clip_adapter(dataclasses.replace(inputs, test=shuffled), epochs=4).summary
    assert {k: v for k, v in other.items() if k != "test_acc"} == \
        {k: v for k, v in first.items() if k != "test_acc"}
    dim = inputs.train_views.shape[-1]  # the seed is what draws the initialisation
    assert not torch.equal(Adapters.init(dim, (0.5,), SEED, inputs.device).down,
                           Adapters.init(dim, (0.5,), SEED + 1, inputs.device).down)


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_fit_one_runs_both_beside_safe(tmp_path):
    """Through fit: both methods land in the result's methods, with their seconds in
    timings.methods_s; CLIP-Adapter's predictor is what the OOD evaluation would apply."""
    from safe_cache.fit import FitConfig
    from safe_cache.fit.recipe import PRESETS
    from safe_cache.fit.train import fit_one
    from safe_cache.store import open_store

    url = tiny_store(str(tmp_path / "tiny.zarr"), "safe-cache-tiny-vit")
    config = FitConfig(store=url, shots=(SHOTS,), seeds=(SEED,), lrs=(1e-3,), wds=(0.0,),
                       iters=4, eval_every=2, device="cpu", recipe=PRESETS["views"],
                       methods=("prolip", "clip_adapter"), out=str(tmp_path / "results"))
    record, _, _ = fit_one(open_store(url), SHOTS, SEED, config)
    for name in ("prolip", "clip_adapter"):
        assert 0 <= record.methods[name]["test_acc"] <= 1
        assert record.timings["methods_s"][name] > 0
    assert record.methods["prolip"]["lambda"] == 1 / SHOTS
    alone = fit_clip_adapter(method_inputs(url))
    assert record.methods["clip_adapter"] == alone.summary  # the same inputs as fit's
