"""A local cache of a remote store's feature chunks (`fit --cache DIR`).

Fitting reads the same test split and few-shot views for every (shots, seed) run; from an object
store that is the same bytes downloaded again each time. Feature chunks are immutable once their
write unit is complete (a unit is written once, and readers only read complete units), so they
can be kept locally without any invalidation. Everything else (metadata, labels, paths,
completion flags) can change while a store grows and is always read from the source.

The cache folder is keyed by the store's URL, creation time and fingerprint: a store deleted and
extracted again at the same URL gets a fresh folder. Objects are written to a temporary name and
renamed, so processes sharing the folder (a machine's dask workers) never read half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore

from ..atomic import atomic_write_bytes
from .schema import is_cacheable


class ChunkCache(WrapperStore[Store]):
    """Serves feature chunks from a local folder, fetching each whole object once."""

    def __init__(self, store: Any, folder: str | os.PathLike[str],
                 counts: dict[str, int] | None = None) -> None:
        super().__init__(store)
        self.folder = Path(folder)
        self.local = LocalStore(self.folder, read_only=False)
        # Shared with the copies zarr and xarray make (with_read_only): one count per cache.
        self.counts = counts if counts is not None else {"hits": 0, "misses": 0}

    def _with_store(self, store: Any) -> ChunkCache:
        return type(self)(store, self.folder, self.counts)

    @property
    def hits(self) -> int:
        return self.counts["hits"]

    @property
    def misses(self) -> int:
        """Objects fetched from the source (and kept)."""
        return self.counts["misses"]

    def __str__(self) -> str:
        return f"{self._store} (chunks cached in {self.folder})"

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not is_cacheable(key):
            return await self._store.get(key, prototype, byte_range)
        if not (self.folder / key).is_file():
            whole = await self._store.get(key, default_buffer_prototype())
            if whole is None:  # never written: the reader uses the fill value; nothing to keep
                return None
            self._keep(key, whole.to_bytes())
            self.counts["misses"] += 1
        else:
            self.counts["hits"] += 1
        return await self.local.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    def _keep(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.folder / key, data)


def cache_folder(root: str, url: str, manifest: dict[str, Any]) -> Path:
    """One folder per store identity (URL, creation time, backbone fingerprint)."""
    identity = f"{url}\n{manifest.get('created')}\n{manifest.get('backbone_fingerprint')}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:60]
    return Path(root).expanduser() / f"{name}-{digest}"


def cached_group(group: zarr.Group, root: str, url: str,
                 manifest: dict[str, Any]) -> zarr.Group:
    """The same group, read through a chunk cache under `root`."""
    folder = cache_folder(root, url, manifest)
    folder.mkdir(parents=True, exist_ok=True)
    store = ChunkCache(group.store, folder)
    return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
