"""The fast single-query heads equal open_clip's modules: outputs AND gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import images_for, real_params, tiny_params

from safe_cache import load_backbone

# Every registered family's tiny configs (fast) and real architectures (slow): a new family
# file is checked here without an edit.
ARCHITECTURES = [*tiny_params(), *real_params()]


def perturbed(fast: torch.nn.Module, naive: torch.nn.Module, seed: int = 2) -> None:
    """The same random offsets on both heads' parameters: timm initialises some MAP-head
    weights to zero (latents, biases), where a wrong formula could still agree."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        others = dict(naive.named_parameters())
        for name, a in fast.named_parameters():
            b = others[name]
            offset = 0.05 * torch.randn(a.shape, generator=generator, dtype=torch.float64)
            a.add_(offset.to(a.dtype))
            b.add_(offset.to(b.dtype))


def dense_input(backbone, batch: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Realistic dense maps: non-negative for ResNets (post-ReLU), signed tokens for ViTs."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, backbone.card["tokens"], backbone.card["channels"])
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x.relu() if backbone.family_rules.nonnegative_dense else x  # post-ReLU maps
    return x.to(dtype)


def forward_backward(head: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor):
    """Output, d(probe . output)/d(input) and d/d(each parameter)."""
    x = x.clone().requires_grad_(True)
    out = head(x)
    (out * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_head_matches_open_clip_module(load_cached, name, dtype):
    backbone = load_cached(name)
    fast = backbone.new_head().to(dtype)
    naive = backbone.naive_head().to(dtype).requires_grad_(True)
    assert fast.state_dict().keys() == naive.state_dict().keys()
    perturbed(fast, naive)
    x = dense_input(backbone, batch=3, dtype=dtype)
    probe = torch.randn(3, backbone.card["embed_dim"], generator=torch.Generator().manual_seed(1),
                        dtype=dtype)
    out_fast, dx_fast, grads_fast = forward_backward(fast, x, probe)
    out_naive, dx_naive, grads_naive = forward_backward(naive, x, probe)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        if dtype == torch.float64:
            return (a - b).abs().max().item() <= 1e-10
        return (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1e-30)

    assert close(out_fast, out_naive)
    assert close(dx_fast, dx_naive)
    assert grads_fast.keys() == grads_naive.keys()
    scale = max(g.abs().max().item() for g in grads_naive.values())
    for key, grad in grads_naive.items():
        if dtype == torch.float32 and grad.abs().max() < 1e-6 * scale:
            # Analytically zero (the key bias: softmax is shift-invariant); float32 leaves
            # rounding noise in both implementations.
            assert grads_fast[key].abs().max() < 1e-5 * scale, key
        else:
            assert close(grads_fast[key], grad), key


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_head_gradients_equal_open_clips_own(name):
    """Through the whole open_clip model: d(probe . encode_image)/d(each head parameter) equals
    the fast head's on the trunk's map, in float64 (the contract fit relies on)."""
    backbone = load_backbone(name)
    backbone.model.double()
    visual = backbone.model.visual
    generator = torch.Generator().manual_seed(3)
    head_keys = list(backbone.head.state_dict())
    with torch.no_grad():  # off timm's zero initialisations (see perturbed)
        for key in head_keys:
            parameter = visual.get_parameter(key)
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator,
                                              dtype=parameter.dtype))
            parameter.requires_grad_(True)
    head = backbone.family_rules.fast_head(visual, backbone.token_grid,
                                           backbone.stages_in_head).requires_grad_(True)
    images = images_for(backbone).double()
    probe = torch.randn(images.shape[0], backbone.card["embed_dim"], generator=generator,
                        dtype=torch.float64)
    (backbone.model.encode_image(images, normalize=False) * probe).sum().backward()
    (head(backbone.trunk(images)) * probe).sum().backward()
    expected = {key: visual.get_parameter(key).grad for key, _ in head.named_parameters()}
    # One scale for all: the key bias's gradient is analytically zero (rounding noise only).
    scale = max(grad.abs().max().item() for grad in expected.values())
    for key, parameter in head.named_parameters():
        assert (parameter.grad - expected[key]).abs().max() <= 1e-10 * scale, key


@pytest.mark.parametrize("name, cut", [("safe-cache-tiny-rn", "layer4"),
                                       ("safe-cache-tiny-vit", "last2"),
                                       ("safe-cache-tiny-eva", "last2")])
def test_fast_head_with_earlier_cut(load_cached, name, cut):
    backbone = load_cached(name, cut)
    fast = backbone.new_head().double()
    naive = backbone.naive_head().double().requires_grad_(True)
    x = dense_input(backbone, 2, torch.float64)
    probe = torch.randn(2, backbone.card["embed_dim"], dtype=torch.float64)
    out_fast, dx_fast, _ = forward_backward(fast, x, probe)
    out_naive, dx_naive, _ = forward_backward(naive, x, probe)
    assert (out_fast - out_naive).abs().max() <= 1e-10
    assert (dx_fast - dx_naive).abs().max() <= 1e-10


@pytest.mark.slow
def test_fast_head_never_projects_every_token(load_cached):
    """No (B, T, C) x (C, C) product: count the multiply-adds of the matmuls torch runs."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = load_cached("RN50")
    x = dense_input(backbone, 1, torch.float32)
    fast, naive = backbone.new_head(), backbone.naive_head()
    with FlopCounterMode(display=False) as fast_count:
        fast(x)
    with FlopCounterMode(display=False) as naive_count:
        naive(x)
    t, c = backbone.card["tokens"], backbone.card["channels"]
    assert fast_count.get_total_flops() < 2 * t * c * c  # less than ONE token-wise projection
    assert naive_count.get_total_flops() / fast_count.get_total_flops() > 10


def test_attention_weights_are_a_distribution(tiny):
    x = dense_input(tiny, 2, torch.float32)
    weights = tiny.head.attention(x)
    tokens = tiny.card["tokens"] + tiny.family_rules.extra_attention_keys  # ResNet: the mean token
    assert weights.shape[0] == 2 and weights.shape[-1] == tokens
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6)
    assert (weights >= 0).all()


def test_head_accepts_float16_maps(tiny):
    """Stores keep dense maps in float16; the head computes in its own dtype."""
    x = dense_input(tiny, 2, torch.float32)
    expected = tiny.head(x.half().float())
    assert torch.allclose(tiny.head(x.half()), expected, atol=1e-6)
