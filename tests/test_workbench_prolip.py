"""ProLIP (fit/workbench/prolip.py) and what it stands on, the heads' final projection
(`GridHead.projection`, `GridHead.pre_projection`): on tiny stores built from tiny backbones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import build_store

from safe_cache import load_backbone
from safe_cache.errors import RecipeError, UnsupportedModelError
from safe_cache.fit.adapters import Split
from safe_cache.fit.evaluate import accuracy
from safe_cache.fit.original import original_head
from safe_cache.fit.workbench import MethodInputs, registry
from safe_cache.fit.workbench.prolip import (
    ADAM_EPS,
    LOGIT_SCALE,
    fit_prolip,
    pre_projection_rows,
)
from safe_cache.store import StoreLayout, open_store

CLASSES, VIEWS, SHOTS, SEED = 4, 3, 4, 1
COUNTS = {"train": SHOTS, "val": 2, "test": 6}  # per class


def tiny_store(path: str, model: str, seed: int = 0) -> str:
    """A store of `model`'s tiny backbone: random maps (post-ReLU for a ResNet), each class a
    pattern added to every token (so training has something to find), pooled features from
    the original head as extract computes them. The maps are drawn float16-exact, so the
    stored (float16) maps are the ones the pooled features were computed from."""
    backbone = load_backbone(model)
    card = backbone.card
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((CLASSES, card["channels"]))

    def maps(labels: np.ndarray, *lead: int) -> np.ndarray:
        dense = rng.standard_normal((len(labels), *lead, card["tokens"], card["channels"]))
        dense += patterns[labels].reshape(len(labels), *[1] * len(lead), 1, -1)
        dense = np.abs(dense) if card["family"] == "resnet" else dense
        return dense.astype(np.float16).astype(np.float32)

    def pooled(dense: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(dense.reshape(-1, *dense.shape[-2:]))
        with torch.no_grad():
            return backbone.head(flat).numpy().reshape(*dense.shape[:-2], -1)

    labels = {s: np.repeat(np.arange(CLASSES), n) for s, n in COUNTS.items()}
    features = {}
    for split, split_labels in labels.items():
        dense = maps(split_labels)
        features[split] = {"dense": dense, "pooled": pooled(dense)}
        if split == "train":
            aug = maps(split_labels, VIEWS)
            features[split].update(aug_dense=aug, aug_pooled=pooled(aug))
    classifier = F.normalize(torch.from_numpy(rng.standard_normal(
        (CLASSES, card["embed_dim"]))).float(), dim=-1).numpy()
    train, val = np.arange(len(labels["train"])), np.arange(len(labels["val"]))
    return build_store(
        path, card, splits=labels, features=features, views=VIEWS, classifier=classifier,
        dataset={"name": "spots", "num_classes": CLASSES, "classnames": list("abcd")},
        layout=StoreLayout(chunk_images=8), fewshot={(SEED, SHOTS): (train, val)},
        head=({k: v.numpy() for k, v in backbone.head.state_dict().items()},
              backbone.model_config))


def method_inputs(url: str, shots: int = SHOTS, seed: int = SEED, chunk: int = 64
                  ) -> MethodInputs:
    """MethodInputs as fit's run_methods builds them (pooled features read from the store)."""
    store = open_store(url)
    train, val = (np.sort(r) for r in store.fewshot(seed, shots))
    test = store.readable_rows("test")

    def read(split: str, name: str, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(store.read_rows(split, name, rows))

    def split(name: str, rows: np.ndarray) -> Split:
        return Split(F.normalize(read(name, "pooled", rows), dim=-1),
                     read(name, "label", rows).long())

    return MethodInputs(
        train_views=read("train", "aug_pooled", train), center=read("train", "pooled", train),
        labels=read("train", "label", train).long(), val=split("val", val),
        test=split("test", test), classifier=torch.from_numpy(store.classifier()).float(),
        scale=float(store.manifest["backbone"]["logit_scale"]), seed=seed,
        device=torch.device("cpu"), store=store, prompts="hand", train_rows=train,
        val_rows=val, test_rows=test, test_chunk=chunk)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rn_url(tmp_path_factory) -> str:
    """The RN store, for the whole runs (300 epochs each) and as store_url's RN."""
    return tiny_store(str(tmp_path_factory.mktemp("prolip_rn") / "rn.zarr"),
                      "safe-cache-tiny-rn")


@pytest.fixture(scope="module", params=["safe-cache-tiny-rn", pytest.param(
    "safe-cache-tiny-vit", marks=pytest.mark.slow)])
def store_url(request, tmp_path_factory) -> str:
    """A tiny store of each family ProLIP's paper trains: c_proj with its bias, proj without."""
    if request.param == "safe-cache-tiny-rn":
        return request.getfixturevalue("rn_url")
    folder = tmp_path_factory.mktemp("prolip")
    return tiny_store(str(folder / "tiny.zarr"), request.param)


def zero_shot(inputs: MethodInputs) -> float:
    return accuracy(inputs.test.features @ inputs.classifier.T, inputs.test.labels)


# --- the heads' final projection -----------------------------------------------------------------

def test_pre_projection_through_the_projection_is_the_head(tiny):
    """Every family's head ends in its linear projection applied to `pre_projection`, or says
    it does not (SigLIP's MAP head ends in its MLP)."""
    head = tiny.head.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, tiny.card["tokens"], tiny.card["channels"], generator=generator).abs()
    with torch.no_grad():
        expected = head(x)
        if tiny.card["model"] == "safe-cache-tiny-map":
            with pytest.raises(UnsupportedModelError, match="MapPoolHead does not end in a"):
                head.projection()
            with pytest.raises(UnsupportedModelError):
                head.pre_projection(x)
            return
        weight, bias = head.projection()
        pre = head.pre_projection(x)
        out = F.linear(pre, weight, bias)
    assert weight.shape == (expected.shape[-1], pre.shape[-1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_the_projection_is_the_heads_own(load_cached):
    """projection() hands out the head's parameters (a ViT's proj transposed), not copies."""
    rn = load_cached("safe-cache-tiny-rn").head
    assert rn.projection()[0] is rn.attnpool.c_proj.weight
    assert rn.projection()[1] is rn.attnpool.c_proj.bias
    vit = load_cached("safe-cache-tiny-vit").head
    weight, bias = vit.projection()
    assert bias is None and weight.data_ptr() == vit.proj.data_ptr()
    assert torch.equal(weight, vit.proj.T)


@pytest.mark.slow
def test_pre_projection_reproduces_the_stored_pooled_features(store_url):
    """The pre-projection features prolip computes from the stored maps (train views, val,
    test), through the original projection, are the store's pooled features."""
    inputs = method_inputs(store_url)
    head = original_head(inputs.store).eval()
    weight, bias = head.projection()
    store = inputs.store
    train = pre_projection_rows(store, "train", inputs.train_rows, head, 5, inputs.device)
    assert train.shape[:2] == (len(inputs.train_rows), VIEWS)
    val = pre_projection_rows(store, "val", inputs.val_rows, head, 5, inputs.device,
                              views=False)
    test = pre_projection_rows(store, "test", inputs.test_rows, head, 5, inputs.device,
                               views=False)
    with torch.no_grad():
        for pre, split, name, rows in ((train, "train", "aug_pooled", inputs.train_rows),
                                       (val, "val", "pooled", inputs.val_rows),
                                       (test, "test", "pooled", inputs.test_rows)):
            stored = torch.from_numpy(store.read_rows(split, name, rows))
            torch.testing.assert_close(F.linear(pre, weight, bias), stored, rtol=1e-4,
                                       atol=1e-5)


# --- ProLIP ------------------------------------------------------------------------------------

@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_prolip_is_registered_and_reports_what_it_chose(rn_url):
    outcome = registry()["prolip"](method_inputs(rn_url))
    summary = outcome.summary
    assert outcome.predictor is None  # ProLIP has no predictor from pooled features
    assert summary["lambda"] == 1 / SHOTS and summary["epochs"] == 300
    assert summary["lr"] in (1e-2, 1e-3, 1e-4, 1e-5)
    assert summary["val_acc"] == max(summary["val_acc_per_lr"])
    assert summary["logit_scale"] == LOGIT_SCALE and summary["train_views"] == VIEWS
    assert 0 <= summary["test_acc"] <= 1


@pytest.mark.slow
def test_an_infinite_pull_leaves_the_projection_as_it_was(rn_url):
    """lambda huge: Adam's steps shrink with the cosine schedule while the pull undoes them;
    the projection ends where it began and ProLIP is zero-shot CLIP."""
    inputs = method_inputs(rn_url)
    outcome, weight = fit_prolip(inputs, lam=1e12, lrs=(1e-3,))
    weight0 = original_head(inputs.store).projection()[0]
    torch.testing.assert_close(weight, weight0.detach(), rtol=0, atol=1e-6)
    assert outcome.summary["test_acc"] == zero_shot(inputs)


def test_no_pull_is_an_unconstrained_fit(store_url):
    """lambda 0: the same weights as a plain cross-entropy loop, written here from their code
    (full batch, view (e + 1) mod V at epoch e, Adam eps 1e-4, cosine over the epochs), on
    the pre-projection features of the stored views."""
    inputs = method_inputs(store_url)
    epochs, lr = 12, 1e-2
    _, weight = fit_prolip(inputs, lam=0.0, lrs=(lr,), epochs=epochs)
    head = original_head(inputs.store).eval()
    w0, b0 = head.projection()
    train = pre_projection_rows(inputs.store, "train", inputs.train_rows, head,
                                inputs.test_chunk, inputs.device)  # the same features
    features = [train[:, v] for v in range(VIEWS)]
    proj = torch.nn.Linear(w0.shape[1], w0.shape[0])
    proj.weight = torch.nn.Parameter(w0.detach().clone())
    proj.bias = torch.nn.Parameter(b0.detach().clone(), requires_grad=False) \
        if b0 is not None else None
    optimizer = torch.optim.Adam([proj.weight], lr=lr, eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    cnt = 0
    for _ in range(epochs):
        cnt = 0 if (cnt + 1) % VIEWS == 0 else cnt + 1
        logits = 100.0 * F.normalize(proj(features[cnt]), dim=-1) @ inputs.classifier.T
        loss = F.cross_entropy(logits, inputs.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(weight, proj.weight.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weight, w0)  # it trained


@pytest.mark.slow
def test_hyperparameters_never_depend_on_test_labels(rn_url):
    inputs = method_inputs(rn_url)
    shuffled = torch.roll(inputs.test.labels, 1)
    other = dataclasses.replace(inputs, test=Split(inputs.test.features, shuffled))
    first, second = fit_prolip(inputs, epochs=30)[0], fit_prolip(other, epochs=30)[0]
    chosen = {k: v for k, v in first.summary.items() if k != "test_acc"}
    assert chosen == {k: v for k, v in second.summary.items() if k != "test_acc"}


@pytest.mark.slow
def test_prolip_refuses_a_family_without_a_linear_projection(tmp_path):
    """SigLIP's MAP head ends in its MLP: a clear refusal that names the family."""
    inputs = method_inputs(tiny_store(str(tmp_path / "siglip.zarr"), "safe-cache-tiny-map"))
    with pytest.raises(RecipeError, match=r"prolip does not support the map family"):
        fit_prolip(inputs)


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_fit_refuses_prolip_on_such_a_family_before_safe_trains(tmp_path, monkeypatch):
    from safe_cache.fit import FitConfig, fit
    from safe_cache.fit import train as train_module

    store = tiny_store(str(tmp_path / "siglip.zarr"), "safe-cache-tiny-map")
    trained = []
    monkeypatch.setattr(train_module, "train_grid", lambda *a, **k: trained.append(1))
    config = FitConfig(store=store, shots=(SHOTS,), seeds=(SEED,), iters=2, eval_every=1,
                       lrs=(1e-3,), wds=(0.0,), device="cpu", methods=("prolip",),
                       out=str(tmp_path / "results"))
    with pytest.raises(RecipeError, match=r"prolip does not support the map family"):
        fit(config)
    assert not trained and not (tmp_path / "results").exists()
