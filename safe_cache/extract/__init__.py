"""Stage 1: the frozen trunk once per image into a store.

config (ExtractConfig, ExtractReport), pipeline (reader -> trunk -> writer, in process),
distributed (the same as dask tasks of whole write units), job (`extract`: the store, the rows,
then the few-shot rows, text classifier and original head). Never imports fit/.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {"ExtractConfig": "config", "ExtractReport": "config", "extract": "job",
            "few_shot_subsets": "job"}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
