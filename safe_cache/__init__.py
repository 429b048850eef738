"""safe-cache: SAFE few-shot CLIP adaptation from cached dense feature maps.

Stage 1 (`extract`) runs the frozen trunk once per image into a Zarr store; stage 2 (`fit`) trains
the pooling head from the store. The library calls behind every CLI command are importable here;
they load on first use, so reading a store never pays for importing torch. (No module of the
package imports this root: it is the public face only. The stage functions live in their
subpackages: `safe_cache.extract.extract`, `safe_cache.fit.fit`.)
"""

from __future__ import annotations

from ._lazy import lazy_exports
from ._version import __version__
from .errors import *  # noqa: F403  (every error class, listed in errors.__all__)
from .errors import __all__ as _errors
from .identity import card_fingerprint

_LAZY = {
    "load_backbone": "model.backbone", "Backbone": "model.backbone",
    "load_model": "export", "export_model": "export",
    "open_store": "store.store", "create_store": "store.store", "FeatureStore": "store.store",
    "verify_store": "store.verify", "copy_store": "store.transfer",
    "ExtractConfig": "extract.config", "FitConfig": "fit.config", "fit_stores": "fit.runs",
    "RunResult": "fit.results", "load_result": "fit.results", "load_results": "fit.results",
}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = [*_errors, "__version__", "card_fingerprint", *sorted(_LAZY)]
