"""One error hierarchy for everything safe-cache refuses to do.

Every error a user can trigger with bad input derives from `SafeCacheError`, so the CLI can print
its message (which names the thing and the fix) instead of a traceback, and a notebook user can
catch one class. Every class lives here, whatever layer raises it, and the package root exports
them all: `from safe_cache import StoreError`.
"""

from __future__ import annotations


class SafeCacheError(Exception):
    """Base class: a clear, user-facing refusal; the message says what is wrong and the fix."""


class ConfigError(SafeCacheError):
    """An option or config value out of range; the message names the option, the value and
    what is allowed."""


class UnsupportedModelError(SafeCacheError):
    """The open_clip model's visual tower is not one whose pooling layer SAFE can fine-tune."""


class WeightsUnavailableError(SafeCacheError):
    """Pretrained weights could be neither found locally nor fetched (offline, tag, bad file)."""


class ModelConfigError(SafeCacheError):
    """A model name or model config JSON could not be resolved to an open_clip architecture."""


class DatasetError(SafeCacheError):
    """A dataset spec, layout, split file or prompt source is missing or malformed."""


class FetchError(DatasetError):
    """A dataset download, checksum, unpacking or layout step failed; the message names the file
    and whether running the command again resumes it."""


class ArchiveError(FetchError):
    """A downloaded archive is corrupt or not an archive; its download is removed, so running
    the command again fetches it afresh."""


class ArchiveBombError(FetchError):
    """An archive expands past its limits (bytes or members): refused as a bomb."""


class ImageReadError(SafeCacheError):
    """An image could not be opened or decoded."""


class StoreError(SafeCacheError):
    """A feature store is missing, malformed, incompatible, or was asked for a refused write."""


class StoreNotFoundError(StoreError):
    """No store exists at the given location (yet)."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lease."""


class ExtractError(SafeCacheError):
    """Extraction stopped (an unreadable image, an incompatible store)."""


class RecipeError(SafeCacheError):
    """An unknown fit recipe preset, an out-of-range recipe value, or a recipe the store cannot
    serve (a view it lacks)."""


class ResultError(SafeCacheError):
    """A fit result file is missing, malformed, or not the shape this safe-cache writes."""


class ResultFormatError(ResultError):
    """A fit result file of a format no longer read (safe-cache 0.1's: no identity or
    checksums): refused on read; fit recomputes a run over one at its path."""


class ModelFolderError(SafeCacheError):
    """A model folder is incomplete, tampered with, or does not fit its backbone."""


class ClusterError(SafeCacheError):
    """The dask scheduler could not be reached, or a task failed on a worker."""


class DeviceMemoryError(SafeCacheError):
    """The device ran out of memory; the message names the options that lower the need, and
    what was finished is kept (a store stays resumable, written runs stay)."""


class SafeCacheWarning(UserWarning):
    """A situation that works but may silently give wrong numbers (e.g. QuickGELU unknown)."""


__all__ = [
    "ArchiveBombError",
    "ArchiveError",
    "ClusterError",
    "ConfigError",
    "DatasetError",
    "DeviceMemoryError",
    "ExtractError",
    "FetchError",
    "ImageReadError",
    "ModelConfigError",
    "ModelFolderError",
    "RecipeError",
    "ResultError",
    "ResultFormatError",
    "SafeCacheError",
    "SafeCacheWarning",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedModelError",
    "WeightsUnavailableError",
]
