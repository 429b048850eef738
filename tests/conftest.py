"""Shared fixtures: tiny real open_clip architectures with random weights (milliseconds each), and
the one store / result factory (tests/factories.py)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from safe_cache.model.families import FAMILIES

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# From the family registry, so a new family file is tested without editing the tests: one tiny
# config per family and form (fast), and the real architectures each family names (slow).
TINY_MODELS = tuple(name for f in FAMILIES.values() for name in f.tiny_models)
REAL_MODELS = tuple(name for f in FAMILIES.values() for name in f.example_models)
# The expensive equality tests (fit's step and grid against torch's reference loops) run two
# families in the fast loop, one pooled by an image-dependent query and one by a learned latent;
# the others are slow. The heads' own exactness is tests/test_heads.py's, for every family.
EQUALITY_MODELS = ("safe-cache-tiny-vit", "safe-cache-tiny-coca")  # the cheapest pair (measured)


def tiny_params(fast: tuple[str, ...] = TINY_MODELS) -> list:
    """Every tiny model as a pytest parameter; those outside `fast` marked slow."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow)
            for name in TINY_MODELS]


def real_params() -> list:
    return [pytest.param(name, marks=pytest.mark.slow) for name in REAL_MODELS]


@functools.cache
def _cached_backbone(name: str, cut: str = "pool"):
    from safe_cache import load_backbone

    return load_backbone(name, cut=cut)


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """A tiny backbone (shared across tests: do not modify it in place)."""
    return _cached_backbone(request.param)


@pytest.fixture(params=tiny_params(EQUALITY_MODELS))
def tiny_costly(request):
    """A tiny backbone for the expensive equality tests: two families fast, the rest slow."""
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


@pytest.fixture(scope="session")
def store_factory():
    """new_store, fill, build_store, result_record, write_record: every test builds stores and
    result files this way (module-level helpers import the same functions from factories)."""
    import factories

    return factories


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (never any other address), with a bucket."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("stores")
    yield endpoint
    server.stop()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the workbench's tests step tiny tensors thousands of
    times, and a second thread only waits on the first (on a shared machine, long)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
