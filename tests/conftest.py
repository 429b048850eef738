"""Shared fixtures: tiny real open_clip architectures with random weights (milliseconds each)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_MODELS = ("safe-cache-tiny-rn", "safe-cache-tiny-vit")


@functools.cache
def _cached_backbone(name: str, cut: str = "pool"):
    from safe_cache import load_backbone

    return load_backbone(name, cut=cut)


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """A tiny backbone (shared across tests: do not modify it in place)."""
    return _cached_backbone(request.param)


@pytest.fixture
def load_cached():
    """Load (and cache for the session) a backbone by name and cut."""
    return _cached_backbone


def images_for(backbone, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random normalised images of the backbone's input size."""
    generator = torch.Generator().manual_seed(seed)
    height, width = backbone.card["image_size"]
    return torch.randn(batch, 3, height, width, generator=generator)
