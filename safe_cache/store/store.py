"""The feature store: one Zarr v3 group per (dataset, backbone), readable without torch.

Layout (a contract: other tools and team members read these names):

    zarr.json                         attribute `safe_cache`: the store manifest (schema version,
                                      backbone card + fingerprint, dataset description, views
                                      recipe, dtype, layout, tool version, timestamps)
    lease/                            the writer lease (attributes only), see lease.py
    train|val|test/path   (image,)                  image path relative to the image folder
                  /label  (image,)                  class index; -1 marks padding rows
                  /dense  (image, token, channel)   float16 center-view dense map
                  /pooled (image, embed)            float32 original head output
                  /complete (unit,)                 1 once write unit u (rows u*R..u*R+R-1)
                                                    is fully written (chunks of one element,
                                                    so concurrent writers never share one)
    train/aug_dense  (image, view, token, channel)  V augmented views, row-aligned with dense,
    train/aug_pooled (image, view, embed)           one chunk per (unit, view)
    train/aug_complete (unit, view)                 1 once view v of unit u is written, so
                                                    views can be added to an existing store
    train/flip_dense, flip_pooled, flip_complete    the mirrored center view (manifest
                                                    `center_flip`), addable later too
    fewshot/seed<S>/shots<K>/{train_rows,val_rows}  row indices into train / val
    text/<prompt set>/classifier (class, embed)     the zero-shot classifier, templates in attrs

Rows are appended in whole write units (a chunk, or a shard on object stores): an append starts
at the next unit boundary, padding the gap with label -1, so no existing chunk is rewritten and
two writers never touch one chunk. Readers see only rows of complete units that are not padding.
Nothing here is a pickle: arrays and JSON attributes only. The split arrays are declared once, in
schema.py; this module creates and reads them from that table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import fsspec
import numpy as np
import numpy.typing as npt
import zarr
from numpy.typing import NDArray
from zarr.codecs import BloscCodec

from .._version import __version__
from ..errors import StoreError, StoreNotFoundError
from ..identity import SEAL_FIELD, canonical_sha256, card_fingerprint, manifest_seal
from ..names import plain_name
from ..records import StoreManifest
from .chunkcache import ChunkCache, cached_group
from .compat import READABLE_VERSIONS, current_manifest
from .lease import Lease, stored_holder
from .paths import OBJECT_STORE_SCHEMES, extract_command
from .schema import (
    ARRAYS,
    BOOKKEEPING,
    BY_NAME,
    FEATURES,
    MANIFEST_ATTRIBUTE,
    PARTS,
    SCHEMA_VERSION,
    SPLITS,
    ArraySpec,
    UnitPart,
    chunk_keys,
    optional_group,
    split_arrays,
)

if TYPE_CHECKING:
    import xarray as xr
    from zarr.core.indexing import Selection

T = TypeVar("T")
OpenMode = Literal["r", "r+", "w"]  # how the store opens its root group


@dataclass(frozen=True)
class StoreLayout:
    """How feature arrays are cut and compressed (chosen by benchmarks/store.py)."""

    chunk_images: int = 32
    shard_images: int | None = None  # v3 sharding codec: one object per shard, for object stores
    compression: str = "blosc-zstd-1"  # or "none"

    @property
    def unit(self) -> int:
        """Rows per write unit: what one writer writes at once and completion is recorded for."""
        return self.shard_images or self.chunk_images

    def compressors(self) -> list[BloscCodec]:
        if self.compression == "none":
            return []
        if self.compression == "blosc-zstd-1":
            return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]
        raise StoreError(f"Unknown compression '{self.compression}': use blosc-zstd-1 or none.")


def default_layout(url: str) -> StoreLayout:
    """Local disks: 32-image chunks, no sharding. Object stores: shards of 1,024 images, so a
    50k-image split is ~50 objects, not ~1,600."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme in OBJECT_STORE_SCHEMES:
        return StoreLayout(chunk_images=32, shard_images=1024)
    return StoreLayout()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zarr warns that consolidated metadata is not in the v3 spec: known and intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


@dataclass(frozen=True)
class UnitStatus:
    """Which parts (schema.PARTS) of each write unit of a split are written: `center` per unit,
    `views` per unit and view ((unit, 0) without views), `flip` per unit (None for a split
    without the mirrored view)."""

    center: NDArray[np.bool_]
    views: NDArray[np.bool_]
    flip: NDArray[np.bool_] | None

    @property
    def whole(self) -> NDArray[np.bool_]:
        """Per unit: every part the split holds is written (the unit is readable)."""
        done = self.center & self.views.all(axis=1)
        return done if self.flip is None else done & self.flip

    def first_missing_view(self) -> NDArray[np.intp]:
        """Per unit: 0 when the unit needs everything (the center view and all views), v when
        only views v.. are missing (added to the store later), the view count (or 1 without
        views) when none is."""
        views = self.views.shape[1]
        if not views:
            return np.where(self.center, 1, 0)
        first = np.where(self.views.all(axis=1), views, self.views.argmin(axis=1))
        return np.where(self.center, first, 0)

    def flip_missing(self) -> NDArray[np.bool_]:
        """Per unit: the mirrored center view is still to write (never, without one)."""
        return ~self.flip if self.flip is not None else np.zeros(len(self.center), dtype=bool)


def _part_flags(arrays: zarr.Group, part: UnitPart, units: int) -> NDArray[np.bool_] | None:
    """Per unit (and view): whether `part` is written; None for a part the split (or store)
    does not hold, but (units, 0) for a per-view one."""
    if part.flag.name not in arrays:
        return np.zeros((units, 0), dtype=bool) if part.per_view else None
    flags: NDArray[np.bool_] = read(array_at(arrays, part.flag.name)) == 1
    if flags.shape[0] != units:  # read while a writer grows the split's arrays one by one:
        # rows not yet there are not written
        grown = np.zeros((units, *flags.shape[1:]), dtype=bool)
        rows = min(units, flags.shape[0])
        grown[:rows] = flags[:rows]
        flags = grown
    return flags


class FeatureStore:
    """An open store. `mode="r"` (the default for shared stores) refuses every write.

    Sealed: its zarr group is its own (`_group`, no public accessor), so the store's invariants
    (the writer lease, completion flags written after their data, the refusal of a missing
    chunk, the sealed manifest) cannot be bypassed. Readers and writers call its methods; only
    verify.py, the store's own auditor in this package, looks at the raw arrays. A test that
    damages a store on purpose opens the zarr group itself (zarr.open_group).
    """

    def __init__(self, url: str, group: zarr.Group, mode: str,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url, self._group, self.mode = url, group, mode
        self.storage_options = storage_options or {}
        self.lease: Lease | None = None
        # Completion flags of many units share a chunk: writer threads update them one at a time
        self._bookkeeping = threading.Lock()

    # --- reading ------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The store's manifest: backbone card and fingerprint, dataset, views, layout, ...
        (in today's schema: an earlier one is read through compat.py)."""
        return current_manifest(dict(attribute(self._group, MANIFEST_ATTRIBUTE, dict)))

    def stored_manifest(self) -> dict[str, Any]:
        """The manifest as stored, in its own schema: what its seal was computed over."""
        return dict(attribute(self._group, MANIFEST_ATTRIBUTE, dict))

    @property
    def fingerprint(self) -> str:
        fingerprint: str = self.manifest["backbone_fingerprint"]  # a text (records.py)
        return fingerprint

    @property
    def content_sha256(self) -> str:
        """The digest of what a run reads from the manifest: the backbone card, the dataset
        (names, split file, sizes, Tip-Adapter's settings), the views recipe and whether the
        mirrored view is there; not the time stamps, layout or the list of skipped images
        (which change no run's numbers: the rows a run reads have their own digests)."""
        manifest = self.manifest
        return canonical_sha256({k: manifest.get(k) for k in ("backbone", "dataset", "views",
                                                             "center_flip")})

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(**self.manifest["layout"])

    def splits(self) -> list[str]:
        return [name for name in SPLITS if name in self._group]

    def has_split(self, split: str) -> bool:
        """Whether the store holds rows (reserved or written) of `split`."""
        return split in SPLITS and split in self._group

    def _arrays(self, split: str) -> zarr.Group:
        """The split's zarr group: the store's own, never handed out."""
        try:  # one lookup, not a membership test and then the lookup: each is a round trip
            if split in SPLITS:
                return group_at(self._group, split)
        except KeyError:
            pass
        raise StoreError(f"{self.url} has no split '{split}' (it has {self.splits()}).")

    def row_count(self, split: str) -> int:
        """Rows reserved in the split, padding and unwritten units included (0 without it):
        where the next append starts, rounded up to a unit."""
        if not self.has_split(split):
            return 0
        return int(array_at(self._arrays(split), "label").shape[0])

    def row_paths(self, split: str) -> NDArray[Any]:
        """The image path of every reserved row ('' for the padding between appends)."""
        return read(array_at(self._arrays(split), "path"))

    def row_labels(self, split: str) -> NDArray[np.int32]:
        """The label of every reserved row (-1: padding, or an image extract skipped)."""
        return read(array_at(self._arrays(split), "label"))

    def view_count(self, split: str) -> int:
        """Augmented views the split's per-view arrays hold (0 for a split or store without
        them): what a reader may ask `read_rows` for along the view axis."""
        if not self.has_split(split):
            return 0
        arrays = self._arrays(split)
        present = [spec.name for spec in PARTS["views"].features if spec.name in arrays]
        return int(array_at(arrays, present[0]).shape[1]) if present else 0

    def unit_status(self, split: str) -> UnitStatus:
        """What of each write unit is written, from the split's completion flags: what extract
        plans from (a unit, a view or the mirrored view still to do)."""
        arrays = self._arrays(split)
        units = array_at(arrays, PARTS["center"].flag.name).shape[0]
        written = {name: _part_flags(arrays, part, units) for name, part in PARTS.items()}
        center, views = written["center"], written["views"]
        # never None: the center's flag is the one just read, a per-view part's is (units, 0)
        assert center is not None and views is not None
        return UnitStatus(center, views, written["flip"])

    def complete_units(self, split: str) -> NDArray[np.intp]:
        """Units whose every part (schema.PARTS: the center view, and for train every
        augmented view and the mirrored center view where the store has them) is written."""
        return np.flatnonzero(self.unit_status(split).whole)

    @property
    def center_flip(self) -> bool:
        """Whether the store holds the mirrored center view of its train images."""
        return bool(self.manifest.get("center_flip"))

    def readable_rows(self, split: str) -> NDArray[np.int64]:
        """Rows of complete write units that are not padding: what readers may use."""
        unit, complete = self.layout.unit, self.complete_units(split)
        labels = read(array_at(self._arrays(split), "label"))  # after the flags
        rows = np.concatenate([np.arange(u * unit, min((u + 1) * unit, len(labels)))
                               for u in complete] or [np.zeros(0, int)])
        return rows[labels[rows] >= 0] if rows.size else rows

    def object_keys(self, split: str) -> set[str]:
        """The keys (relative to the split) of every object the split holds, listed once: what
        readers check before trusting zarr's reads (a missing chunk reads as zeros)."""
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        prefix = f"{root.rstrip('/')}/{split}/"
        return {key[len(prefix):] for key in fs.find(prefix.rstrip("/"))}

    def check_rows(self, split: str, rows: npt.ArrayLike, names: Sequence[str] = FEATURES
                   ) -> None:
        """Refuse to read `rows` when a chunk object of their write units is missing: zarr
        would silently fill it with zeros (a deleted chunk of test/dense gave a wrong accuracy
        with exit 0). Lists the split's objects once."""
        arrays = self._arrays(split)
        units = np.unique(np.asarray(rows, dtype=np.int64) // self.layout.unit)
        present = self.object_keys(split)
        for name in (n for n in names if n in arrays):
            spec, array = BY_NAME[name], array_at(arrays, name)
            views = array.shape[1] if spec.per_view else 0
            for unit in units.tolist():
                for key in chunk_keys(spec, unit, views, array.ndim):
                    if f"{name}/{key}" not in present:
                        raise StoreError(
                            f"{self.url}: chunk {split}/{name}/{key} (write unit {unit}) is"
                            f" missing, so its rows would read as zeros. Run `safe-cache verify"
                            f" {self.url}`, then extract into the store again after removing"
                            f" the damaged units, or restore the store from a copy.")

    def readable_row_ids(self, split: str, rows: Sequence[int]) -> NDArray[np.int64]:
        """`rows` (ids a user typed) checked: each a readable row of the split, and their
        chunks present; an error names the bad id and the valid range."""
        readable = self.readable_rows(split)
        known = set(readable.tolist())
        bad = [int(r) for r in rows if int(r) not in known]
        if bad:
            low, high = (int(readable.min()), int(readable.max())) if readable.size else (0, -1)
            raise StoreError(f"{self.url}: row {bad[0]} is not a readable row of {split} (rows"
                             f" {low}..{high}, {readable.size} readable; padding and incomplete"
                             f" rows excluded).")
        order = np.asarray(list(rows), dtype=np.int64)
        if not order.size:
            raise StoreError(f"{self.url}: no rows given.")
        self.check_rows(split, order)
        return order

    def read_rows(self, split: str, name: str, rows: npt.ArrayLike) -> NDArray[Any]:
        """`name`'s values at `rows` (sorted or not); a chunk that fails to decode is an error
        naming the array and its rows' units, not a codec traceback. Feature values are
        checked finite: a NaN written behind the store's back never becomes an accuracy."""
        try:
            array = array_at(self._arrays(split), name)
            values = _as_ndarray(array.get_orthogonal_selection((np.asarray(rows),)), array)
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            raise StoreError(f"{self.url}: {split}/{name} could not be read for write units"
                             f" {self._units(rows)} ({type(exc).__name__}: {str(exc)[:120]}):"
                             f" a chunk is truncated or corrupt. Run `safe-cache verify"
                             f" {self.url}`.") from exc
        if name in FEATURES and not finite(values):
            raise StoreError(f"{self.url}: {split}/{name} holds NaN or Inf in write units"
                             f" {self._units(rows)} (written behind the store's back, or damaged)."
                             f" Run `safe-cache verify {self.url}`, then re-extract those units.")
        return values

    def _units(self, rows: npt.ArrayLike) -> list[int]:
        """The write units of `rows`, the first ten (for error messages)."""
        return sorted({int(r) // self.layout.unit for r in np.asarray(rows)})[:10]

    def expected_rows(self, split: str) -> int | None:
        """Rows the split must hold to be whole: its dataset size less the images extract
        skipped (None for a store that records no split sizes)."""
        dataset = self.manifest["dataset"]
        size: int | None = (dataset.get("split_sizes") or {}).get(split)  # ints (records.py)
        if size is None:
            return None
        skipped = {e["error"] for e in self.manifest.get("skipped_images", [])
                   if e.get("split") == split}
        return size - len(skipped)

    def check_complete(self, split: str) -> NDArray[np.int64]:
        """The split's readable rows, refused when fewer than the dataset holds: a test split
        with an unwritten unit would be evaluated on the rows that exist. The error names the
        incomplete units and the extract command that finishes them."""
        rows = self.readable_rows(split)
        expected = self.expected_rows(split)
        if expected is None or rows.size >= expected:
            return rows
        arrays = self._arrays(split)
        done = np.zeros(array_at(arrays, "complete").shape[0], dtype=bool)
        done[self.complete_units(split)] = True
        incomplete = np.flatnonzero(~done).tolist()
        raise StoreError(
            f"{self.url}: {split} is incomplete: {rows.size} of {expected} images readable"
            f" (incomplete write units {incomplete[:10]}{'...' if len(incomplete) > 10 else ''}"
            f"{'; images never extracted' if not incomplete else ''}). Finish it with"
            f" `{extract_command(self.manifest, self.url)}` (with the dataset's --root), or"
            f" evaluate on what is there with --partial (results are then labelled partial).")

    def split(self, name: str) -> xr.Dataset:
        """The split as a labelled xarray.Dataset backed by dask, complete rows only.

        Dims image, token, channel, embed (and view for train); coords path and label.
        """
        import xarray as xr

        # open_zarr carries no return type in xarray: it returns a Dataset
        dataset: xr.Dataset = xr.open_zarr(self._group.store, group=name, consolidated=False)
        bookkeeping = [v for v in BOOKKEEPING if v in dataset]
        dataset = dataset.drop_vars(bookkeeping).isel(image=self.readable_rows(name))
        return dataset.set_coords(["path", "label"])

    def fewshot(self, seed: int, shots: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        key = f"fewshot/seed{seed}/shots{shots}"
        if key not in self._group:
            raise StoreError(f"{self.url} holds no few-shot rows for seed {seed}, {shots} shots;"
                             f" extract them with --seeds {seed} --shots {shots}.")
        return self._small(f"{key}/train_rows"), self._small(f"{key}/val_rows")

    def fewshot_draws(self) -> tuple[list[int], list[int]]:
        """(shots, seeds) of the few-shot draws the store holds, sorted."""
        shots: set[int] = set()
        seeds: set[int] = set()
        if "fewshot" in self._group:
            for seed_key in group_at(self._group, "fewshot").group_keys():
                for shots_key in group_at(self._group, f"fewshot/{seed_key}").group_keys():
                    seeds.add(int(seed_key.removeprefix("seed")))
                    shots.add(int(shots_key.removeprefix("shots")))
        return sorted(shots), sorted(seeds)

    def fewshot_sha256(self, seed: int, shots: int) -> str:
        """The digest of a (seed, shots) draw's rows: part of a run's identity."""
        self.fewshot(seed, shots)  # checked
        key = f"fewshot/seed{seed}/shots{shots}"
        return canonical_sha256([self._group[f"{key}/{n}"].attrs[DIGEST]
                                 for n in ("train_rows", "val_rows")])

    def classifier_sha256(self, prompt_set: str = "hand") -> str:
        """The digest of a prompt set's classifier and sentences: part of a run's identity (a
        prompt set is stored by name; its content is what the numbers depend on)."""
        self.classifier(prompt_set)  # checked
        node = group_at(self._group,
                        f"text/{plain_name(prompt_set, 'the prompt set', StoreError)}")
        return canonical_sha256([node["classifier"].attrs[DIGEST], node.attrs["sentences"]])

    def classifier(self, prompt_set: str = "hand") -> NDArray[np.float32]:
        """The zero-shot classifier (class, embed): per class, the normalised mean of the
        normalised sentence embeddings."""
        plain_name(prompt_set, "the prompt set", StoreError)
        key = f"text/{prompt_set}/classifier"
        if key not in self._group:
            held = sorted(group_at(self._group, "text").keys()) if "text" in self._group else []
            shots, seeds = self.fewshot_draws()
            draws = ["--shots", ",".join(map(str, shots)), "--seeds",
                     ",".join(map(str, seeds))] if shots else []
            command = extract_command(self.manifest, self.url, *draws, "--prompts", prompt_set)
            raise StoreError(
                f"{self.url} has no text classifier for prompt set '{prompt_set}' (it holds:"
                f" {', '.join(held) or 'none'}). Add it (only the text is encoded; the images"
                f" are already there): `{command}`.")
        return self._small(key)

    def _small(self, key: str) -> NDArray[Any]:
        """A whole small array (text, head, few-shot rows), checked against the digest written
        with it (a deleted chunk reads as zeros, and would pass any other check) and finite."""
        problem, values = small_array_problem(array_at(self._group, key))
        if problem:
            raise StoreError(f"{self.url}: {key} {problem}. Run `safe-cache verify"
                             f" {self.url}`, or re-extract the store.")
        return values

    def sentence_embeddings(self, prompt_set: str = "hand"
                            ) -> tuple[NDArray[np.float32], list[int]]:
        """(raw sentence embeddings (sentence, embed), sentences per class): what other ways of
        averaging the templates need."""
        key = f"text/{prompt_set}/embeddings"
        if f"text/{prompt_set}/classifier" not in self._group:
            self.classifier(prompt_set)  # the set is absent: its error names the command
        if key not in self._group:
            raise StoreError(f"{self.url} keeps no sentence embeddings for prompt set"
                             f" '{prompt_set}' (stores written before safe-cache 0.2); run"
                             f" extract on it again to add them.")
        node = self._group[f"text/{prompt_set}"]
        return self._small(key), [len(group) for group in attribute(node, "sentences", list)]

    def has_prompt_set(self, prompt_set: str) -> bool:
        """Whether the prompt set was written whole (classifier, embeddings, sentences): what
        extract may skip."""
        key = f"text/{prompt_set}"
        return f"{key}/embeddings" in self._group and "sentences" in self._group[key].attrs and \
            all(DIGEST in self._group[f"{key}/{n}"].attrs for n in ("classifier", "embeddings"))

    def prompt_sentences(self, prompt_set: str) -> list[list[str]]:
        """The sentences of a stored prompt set, per class."""
        sentences = attribute(self._group[f"text/{prompt_set}"], "sentences", list)
        return [list(group) for group in sentences]

    def has_head(self) -> bool:
        """Whether the original head was written whole (its config is written last)."""
        return "head" in self._group and "model_config" in self._group["head"].attrs

    def small_arrays(self) -> list[str]:
        """Every small array's key: the text classifiers and embeddings, the head, the
        few-shot rows (what verify and --seal check as a whole)."""
        keys = []
        for top in ("text", "head", "fewshot"):
            if top not in self._group:
                continue
            for path, node in group_at(self._group, top).members(max_depth=None):
                if isinstance(node, zarr.Array):
                    keys.append(f"{top}/{path}")
        return sorted(keys)

    def summary(self) -> dict[str, Any]:
        """Sizes and completeness per split (what `safe-cache info` shows)."""
        out: dict[str, Any] = {}
        for split in self.splits():
            arrays = self._arrays(split)
            units = array_at(arrays, "complete").shape[0]
            out[split] = {
                "rows": int(array_at(arrays, "label").shape[0]),
                "readable_rows": int(self.readable_rows(split).size),
                "units": int(units),
                "complete_units": int(self.complete_units(split).size),
                "arrays": {name: list(array_at(arrays, name).shape)
                           for name in arrays.array_keys()},
            }
        return out

    # --- writing ------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.url} is open read-only; open it with mode='a' (one writer"
                             f" at a time) to write.")

    def ensure_split(self, split: str) -> None:
        """Create the split's arrays (empty), as schema.py declares them, if they do not exist."""
        self._writable()
        if split not in SPLITS:
            raise StoreError(f"{self.url}: '{split}' is not a split (splits: {list(SPLITS)}).")
        if split in self._group:
            return
        manifest = self.manifest
        group = self._group.create_group(split)
        for spec in split_arrays(split, manifest["views"]["count"], manifest):
            self._create_array(group, spec, spec.tail(manifest["shapes"],
                                                      manifest["views"]["count"]))

    def _create_array(self, group: zarr.Group, spec: ArraySpec, tail: tuple[int, ...]) -> None:
        """An empty array of the schema. Row and feature arrays are chunked along images only
        (whole maps per chunk; per-view arrays also one chunk per view, so views added later are
        new objects); bookkeeping arrays hold one flag per chunk."""
        dtype = str if spec.dtype == "str" else spec.dtype
        kwargs: dict[str, Any] = {"dimension_names": spec.dims}
        if spec.role == "bookkeeping":
            kwargs["chunks"] = (1,) * len(spec.dims)
        else:
            layout = self.layout
            chunk_tail = (1, *tail[1:]) if spec.per_view else tail
            kwargs.update(chunks=(layout.chunk_images, *chunk_tail),
                          config={"write_empty_chunks": True})
            if layout.shard_images:
                kwargs["shards"] = (layout.shard_images, *chunk_tail)
        if spec.compressed is not None:
            kwargs["compressors"] = self.layout.compressors() if spec.compressed else None
        group.create_array(spec.name, shape=(0, *tail), dtype=dtype, fill_value=spec.fill,
                           **kwargs)

    def append_rows(self, split: str, paths: Sequence[str], labels: Sequence[int]
                    ) -> NDArray[np.int64]:
        """Reserve rows for new images at the next write-unit boundary; returns their indices.

        Paths and labels are written at once; features are written per unit (`write_unit`).
        """
        self._writable()
        self.ensure_split(split)
        group = self._arrays(split)
        unit = self.layout.unit
        start = -(-array_at(group, "label").shape[0] // unit) * unit  # round up to a unit boundary
        stop = start + len(paths)
        units = -(-stop // unit)
        for name in group.array_keys():
            array = array_at(group, name)
            if name in BOOKKEEPING:
                array.resize((units, *array.shape[1:]))
            else:
                array.resize((units * unit, *array.shape[1:]))
        array_at(group, "path")[start:stop] = np.asarray(list(paths), dtype=object).astype(str)
        array_at(group, "label")[start:stop] = np.asarray(labels, dtype="int32")
        self.touch()
        return np.arange(start, stop)

    def mark_padding(self, split: str, row: int) -> None:
        """Make a reserved row padding (label -1): an image extract could not read, skipped
        with --skip-bad. Readers never see it, and its unit is written without it; the image
        is recorded with `record_skipped` by the lease holder."""
        self._writable()
        labels = array_at(self._arrays(split), "label")
        if not 0 <= row < labels.shape[0]:
            raise StoreError(f"{self.url}: row {row} is not a reserved row of {split} (rows"
                             f" 0..{labels.shape[0] - 1}); only a reserved row can be padding.")
        labels[row] = -1

    def write_unit(self, split: str, unit: int, features: dict[str, NDArray[Any]]) -> None:
        """Write every feature array of one write unit, then record it as complete.

        `features` maps array names (dense, pooled, aug_dense, aug_pooled, flip_dense,
        flip_pooled) to arrays whose first axis covers the unit's rows (shorter for the split's
        last unit). Non-finite values are refused: a NaN in a store poisons every fit that
        reads it.
        """
        center = PARTS["center"]
        missing = [spec.name for spec in center.features if spec.name not in features]
        if missing:
            raise StoreError(f"{self.url}: {split} unit {unit} is written without {missing}:"
                             f" its `{center.flag.name}` flag covers"
                             f" {[spec.name for spec in center.features]}, so write them"
                             f" together.")
        self.write_parts(split, unit, features)
        with self._bookkeeping:
            array_at(self._arrays(split), center.flag.name)[unit] = 1  # after the data is written

    def write_parts(self, split: str, unit: int, features: dict[str, NDArray[Any]],
                    first_view: int = 0) -> None:
        """Write some feature arrays of one unit (what an existing store lacks: views
        first_view.. of aug_*, the flip_* view) and record each part (schema.PARTS) complete
        after its data. The center view's `complete` flag is write_unit's."""
        self._writable()
        group = self._arrays(split)
        parts = self._parts_of(split, unit, features)
        start = unit * self.layout.unit
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            cast = {name: np.asarray(values).astype(array_at(group, name).dtype, copy=False)
                    for name, values in features.items()}
        for name, values in cast.items():  # after the cast: float16 overflows to inf
            if not np.isfinite(values).all():
                raise StoreError(f"{split}/{name}: unit {unit} holds NaN or Inf values after the"
                                 f" cast to {values.dtype}; nothing was recorded.")
        for name, values in cast.items():
            # Every chunk object is written, zeros too (zarr's config is per handle, not
            # stored): readers tell a missing chunk from a written one by its object.
            array = array_at(group, name).with_config({"write_empty_chunks": True})
            if BY_NAME[name].per_view:
                views = slice(first_view, first_view + values.shape[1])
                array[start:start + len(values), views] = values
            else:
                array[start:start + len(values)] = values
        with self._bookkeeping:
            for part in parts:
                if part.name == "center":
                    continue  # write_unit's, once every part it was given is written
                flag = array_at(group, part.flag.name)
                if part.per_view:
                    width = cast[part.features[0].name].shape[1]
                    flag[unit, first_view:first_view + width] = 1
                else:
                    flag[unit] = 1

    def _parts_of(self, split: str, unit: int, features: dict[str, NDArray[Any]]
                  ) -> list[UnitPart]:
        """The unit parts `features` write, each whole: an array the split lacks, or one part
        given only in part (aug_dense without aug_pooled, or another view count), is refused
        before anything is written, since the part's flag would vouch for arrays never written."""
        group = self._arrays(split)
        unknown = [name for name in features if name not in group or name not in FEATURES]
        if unknown:
            held = [name for name in FEATURES if name in group]
            raise StoreError(f"{self.url}: {split} holds no feature array {unknown[0]!r} (it"
                             f" holds {held}); write the split's own arrays.")
        parts: list[UnitPart] = []
        for part in PARTS.values():
            given = [spec.name for spec in part.features if spec.name in features]
            if not given:
                continue
            names = [spec.name for spec in part.features]
            if len(given) != len(names):
                raise StoreError(f"{self.url}: {split} unit {unit} writes {given} without the"
                                 f" rest of {names}: their `{part.flag.name}` flag covers them"
                                 f" all, so write them together.")
            if part.per_view and len({np.shape(features[name])[1] for name in names}) > 1:
                raise StoreError(f"{self.url}: {split} unit {unit} writes another number of"
                                 f" views to each of {names}; write the same views to all.")
            parts.append(part)
        return parts

    def add_center_flip(self) -> None:
        """Add the mirrored center view's arrays to train (unwritten: extract fills them)."""
        self._writable()
        manifest = self.manifest
        if manifest.get("center_flip"):
            return
        if "train" in self._group:
            group = group_at(self._group, "train")
            rows, units = array_at(group, "label").shape[0], array_at(group, "complete").shape[0]
            for spec in optional_group("center_flip"):
                tail = spec.tail(manifest["shapes"], manifest["views"]["count"])
                self._create_array(group, spec, tail)
                array_at(group, spec.name).resize((units if spec.role == "bookkeeping" else rows,
                                                   *tail))
        manifest["center_flip"] = True
        self._write_manifest(manifest)

    def add_views(self, count: int) -> None:
        """Grow the view axis of train's augmented arrays to `count` (new views unwritten)."""
        self._writable()
        manifest = self.manifest
        if count <= manifest["views"]["count"]:
            return
        if "train" in self._group:
            group = group_at(self._group, "train")
            for spec in (spec for spec in ARRAYS if spec.per_view and spec.name in group):
                array = array_at(group, spec.name)
                array.resize((array.shape[0], count, *array.shape[2:]))
        manifest["views"]["count"] = count
        self._write_manifest(manifest)

    def write_head(self, state: dict[str, NDArray[Any]], model_config: dict[str, Any]) -> None:
        """The original pooling head (AttnPool_O): what fit starts from, so fitting needs the
        store alone, not the backbone's weights file. Arrays named by open_clip's keys."""
        self._writable()
        node = self._group.require_group("head")
        for name, values in state.items():
            write_small(node, name, np.asarray(values), str(values.dtype))
        node.attrs["model_config"] = model_config
        self.touch()

    def head_state(self) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        """(state dict as numpy arrays, open_clip model config) of the original head."""
        if "head" not in self._group:
            raise StoreError(f"{self.url} holds no head weights; extract it again with this"
                             f" safe-cache to add them.")
        node = group_at(self._group, "head")
        return {name: self._small(f"head/{name}") for name in node.array_keys()}, dict(
            attribute(node, "model_config", dict))

    def write_fewshot(self, seed: int, shots: int, train_rows: npt.ArrayLike,
                      val_rows: npt.ArrayLike) -> None:
        self._writable()
        node = self._group.require_group(f"fewshot/seed{seed}/shots{shots}")
        for name, rows in (("train_rows", train_rows), ("val_rows", val_rows)):
            write_small(node, name, np.asarray(rows, dtype="int64"), "int64", ("sample",))
        self.touch()

    def write_classifier(self, prompt_set: str, weights: NDArray[Any],
                         sentences: list[list[str]], embeddings: NDArray[Any] | None = None
                         ) -> None:
        """The classifier of a prompt set, its sentences, and (optionally) every sentence's raw
        embedding, in class order."""
        self._writable()
        plain_name(prompt_set, "the prompt set", StoreError)
        node = self._group.require_group(f"text/{prompt_set}")
        write_small(node, "classifier", weights.astype("float32"), "float32", ("class", "embed"))
        if embeddings is not None:
            if len(embeddings) != sum(len(group) for group in sentences):
                raise StoreError(f"text/{prompt_set}: {len(embeddings)} embeddings for"
                                 f" {sum(len(group) for group in sentences)} sentences.")
            write_small(node, "embeddings", embeddings.astype("float32"), "float32",
                        ("sentence", "embed"))
        node.attrs["sentences"] = sentences
        self.touch()

    def touch(self) -> None:
        self._write_manifest(self.manifest)

    def record_skipped(self, skipped: list[dict[str, str]]) -> None:
        """Note images extract passed over (split, error), each once: the test split's
        expected size is its dataset size less these (`check_complete`)."""
        manifest = self.manifest
        known = manifest.setdefault("skipped_images", [])
        for entry in ({"split": s["split"], "error": s["error"]} for s in skipped):
            if entry not in known:
                known.append(entry)
        self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        """The one writer of the manifest: time-stamped and sealed (identity.manifest_seal),
        so a field edited by hand afterwards is refused by every reader."""
        self._writable()
        manifest = {**manifest, "updated": _now()}
        manifest[SEAL_FIELD] = manifest_seal(manifest)
        self._group.attrs[MANIFEST_ATTRIBUTE] = manifest

    def lease_holder(self) -> dict[str, Any] | None:
        """Who holds the writer lease, read afresh from the store (None when nobody does):
        what a copy checks before publishing a store someone may still be writing."""
        return stored_holder(self._group)

    def cache_counts(self) -> dict[str, int] | None:
        """Feature chunks served from the local chunk cache (hits) and fetched into it
        (misses) since this store was opened with `cache=`; None without a cache."""
        cache = self._group.store
        return dict(cache.counts) if isinstance(cache, ChunkCache) else None

    @property
    def lease_token(self) -> str | None:
        """The token of the lease this store holds: what a job hands its workers."""
        return None if self.lease is None else self.lease.holder["token"]

    def close(self) -> None:
        """Consolidate metadata (for fast opens and plain xarray) and release the lease.

        Only the lease holder consolidates: a job's workers write chunks, never the root."""
        if self.lease is not None:
            with _quiet():
                zarr.consolidate_metadata(self._group.store)
            self.lease.release()
            self.lease = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DIGEST = "sha256"  # the attribute of a small array holding its content's digest


def _where(node: zarr.Group | zarr.Array[Any], key: str = "") -> str:
    """A node's path in the store, for error messages ("the root group" for the root)."""
    return "/".join(part for part in (node.path, key) if part) or "the root group"


def array_at(group: zarr.Group, key: str) -> zarr.Array[Any]:
    """The array at `key` under `group`, where the store's schema puts an array (zarr types
    `group[key]` as an array or a group; a group there is a damaged store)."""
    node = group[key]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{_where(group, key)} is a group where the store keeps an array: the"
                         f" store is damaged. Run `safe-cache verify`, or re-extract it.")
    return node


def group_at(group: zarr.Group, key: str) -> zarr.Group:
    """The group at `key` under `group`, where the store's schema puts a group."""
    node = group[key]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{_where(group, key)} is an array where the store keeps a group: the"
                         f" store is damaged. Run `safe-cache verify`, or re-extract it.")
    return node


def read(array: zarr.Array[Any], selection: Selection = slice(None)) -> NDArray[Any]:
    """`array[selection]` (all of it by default): an ndarray for a slice or rows of a stored
    array (zarr types it as any of its scalars too)."""
    return _as_ndarray(array[selection], array)


def _as_ndarray(values: object, array: zarr.Array[Any]) -> NDArray[Any]:
    """What a read of `array` returned, as the ndarray it is: zarr types a read as an ndarray
    or any scalar; a 0-d array's whole value comes back as a numpy scalar (made a 0-d ndarray,
    which hashes the same)."""
    if isinstance(values, np.ndarray):
        return values
    if isinstance(values, np.generic):
        return np.asarray(values)
    raise StoreError(f"{_where(array)}: a read gave a {type(values).__name__}, not an array.")


def attribute(node: zarr.Group | zarr.Array[Any], key: str, kind: type[T]) -> T:
    """`node.attrs[key]` where the store writes a `kind` (zarr types an attribute as any JSON
    value; another is a hand-edited or damaged store)."""
    value = node.attrs[key]
    if not isinstance(value, kind):
        raise StoreError(f"{_where(node)}: attribute {key!r} is a {type(value).__name__}, not a"
                         f" {kind.__name__} (edited by hand?). Run `safe-cache verify`, or"
                         f" re-extract the store.")
    return value


def array_sha256(values: npt.ArrayLike) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    values = np.ascontiguousarray(values)
    head = f"{values.dtype.str}{values.shape}".encode()
    return hashlib.sha256(head + values.tobytes()).hexdigest()


def write_small(node: zarr.Group, name: str, values: NDArray[Any], dtype: str,
                dims: tuple[str, ...] | None = None) -> None:
    """A small array written whole (one chunk object, zeros too) with its digest."""
    kwargs: dict[str, Any] = {"dimension_names": dims} if dims else {}
    array = node.create_array(name, shape=values.shape, dtype=dtype, overwrite=True,
                              config={"write_empty_chunks": True}, **kwargs)
    array[...] = values
    array.attrs[DIGEST] = array_sha256(read(array, ...))


def small_array_problem(array: zarr.Array[Any]) -> tuple[str | None, NDArray[Any]]:
    """(why a small array cannot be trusted or None, its values): its digest must be there and
    match (a missing chunk reads as zeros), its values finite."""
    values = read(array, ...)
    if not finite(values):
        return "holds NaN or Inf (its logits would be NaN)", values
    digest = array.attrs.get(DIGEST)
    if digest is None:
        return ("carries no sha256 (written by an older safe-cache, or removed); `safe-cache"
                " verify --seal` records it for a store that verifies"), values
    if digest != array_sha256(values):
        return ("does not match its sha256 (a chunk is missing or was changed behind the"
                " store's back)"), values
    return None, values


def finite(values: npt.ArrayLike) -> bool:
    """Whether every value is finite (strings and integers always are)."""
    values = np.asarray(values)
    return not np.issubdtype(values.dtype, np.inexact) or bool(np.isfinite(values).all())


def _open_group(url: str, mode: OpenMode, storage_options: dict[str, Any] | None
                ) -> zarr.Group:
    kwargs: dict[str, Any] = {"zarr_format": 3}
    if storage_options and "://" in url:
        kwargs["storage_options"] = storage_options
    with _quiet():
        return zarr.open_group(url, mode=mode, use_consolidated=False, **kwargs)


def create_store(
    url: str,
    backbone_card: dict[str, Any],
    fingerprint: str,
    dataset: dict[str, Any],
    *,
    views: dict[str, Any],
    layout: StoreLayout | None = None,
    storage_options: dict[str, Any] | None = None,
    takeover: bool = False,
    center_flip: bool = False,
) -> FeatureStore:
    """Create a new store (refusing to overwrite one) and take its writer lease. `center_flip`:
    train also holds the mirrored center view of every image."""
    try:
        existing = _open_group(url, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        existing = None
    if existing is not None and MANIFEST_ATTRIBUTE in existing.attrs:
        raise StoreError(f"{url} already holds a store; open it with open_store(url, mode='a')"
                         f" to add to it.")
    layout = layout or default_layout(url)
    group = _open_group(url, "w", storage_options)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone_card,
        "backbone_fingerprint": fingerprint,
        "dataset": dataset,
        "views": views,
        "dtype": {"dense": "float16", "pooled": "float32"},
        "shapes": {k: backbone_card[k] for k in ("tokens", "channels", "embed_dim")},
        "layout": asdict(layout),
        "tool_version": __version__,
        "created": _now(),
        "updated": _now(),
        "center_flip": center_flip,
    }
    StoreManifest.from_dict(manifest, url)  # what every reader will check: refuse it now
    store = FeatureStore(url, group, "a", storage_options)
    store._write_manifest(manifest)
    store.lease = Lease.acquire(group, takeover=takeover)
    return store


def _refuse_a_file(url: str) -> None:
    """A local store is a folder: a file in its place is named as such, not as a missing store
    (open) or an opaque 'File exists' (create)."""
    if "://" in url and not url.startswith("file://"):
        return
    path = Path(url.removeprefix("file://")).expanduser()
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise StoreError(f"{url} is a file, not a store: a store is a folder (NAME.zarr). Pass"
                         f" the store's folder as --store, or a new path to create one there.")


def open_store(url: str, mode: str = "r", *, storage_options: dict[str, Any] | None = None,
               takeover: bool = False, job_token: str | None = None,
               cache: str | None = None, check_fingerprint: bool = True) -> FeatureStore:
    """Open an existing store: read-only by default; mode='a' takes the writer lease.

    A worker of a distributed job passes `job_token` (the job's `lease_token`) instead: it writes
    under the job's lease, which must still be held. `cache` (read-only opens): a local folder
    that keeps the feature chunks read from a remote store (chunkcache.py). The backbone card's
    fingerprint is recomputed and must match the recorded one: a hand-edited manifest would
    otherwise be copied into every result (`check_fingerprint=False` is verify's, which reports
    it among the other problems).
    """
    if mode not in ("r", "a"):
        raise StoreError(f"mode must be 'r' or 'a', not '{mode}'.")
    if cache is not None and mode != "r":
        raise StoreError("A chunk cache is for reading; open the store with mode='r'.")
    _refuse_a_file(url)
    try:
        group = _open_group(url, "r" if mode == "r" else "r+", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreNotFoundError(f"No store at {url}.") from exc
    except (ValueError, TypeError, KeyError) as exc:  # zarr.json that is not JSON, or not v3
        raise StoreError(f"{url}: its zarr.json is not readable Zarr v3 metadata ({exc!r:.160});"
                         f" the store is damaged. Restore it from a copy, or extract it again"
                         f" into a new --store.") from exc
    if MANIFEST_ATTRIBUTE not in group.attrs:
        if not dict(group.attrs) and not list(group.keys()):
            # An empty group is what a creation killed before its manifest leaves: no data,
            # nobody's store. Reported as missing, so the next extract creates it anew.
            raise StoreNotFoundError(f"No store at {url} (only an empty Zarr group: a creation"
                                     f" that was interrupted).")
        raise StoreError(f"{url} is a Zarr group but not a safe-cache store (no 'safe_cache'"
                         f" attribute).")
    manifest = attribute(group, MANIFEST_ATTRIBUTE, dict)
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{url} has store schema version {version}; this safe-cache ({__version__}) reads"
            f" version {SCHEMA_VERSION}. Use a matching safe-cache, or re-extract the store."
        )
    if check_fingerprint:
        check_manifest(url, manifest)
    if cache is not None:
        group = cached_group(group, cache, url, manifest)
    store = FeatureStore(url, group, mode, storage_options)
    if mode == "a" and job_token is not None:
        Lease.check_held(group, job_token)
    elif mode == "a":
        store.lease = Lease.acquire(group, takeover=takeover)
    return store


def manifest_problems(url: str, manifest: Any) -> list[str]:
    """Why a manifest as stored cannot be trusted (empty when it can): its typed form
    (records.py, in today's schema: compat.py), its card's fingerprint, and its seal over every
    other field of the stored form."""
    current = current_manifest(manifest) if isinstance(manifest, dict) else manifest
    try:
        StoreManifest.from_dict(current, "manifest")
    except StoreError as exc:
        return [str(exc)]
    problems = []
    if card_fingerprint(current["backbone"]) != manifest["backbone_fingerprint"]:
        problems.append("manifest: the backbone card does not match its fingerprint (edited by"
                        " hand?)")
    seal = manifest.get(SEAL_FIELD)
    if seal is None:
        problems.append(f"manifest: it carries no {SEAL_FIELD} (a store of an older safe-cache,"
                        f" or the seal was removed); check it with `safe-cache verify {url}"
                        f" --seal`, which seals a store whose data verifies")
    elif seal != manifest_seal(manifest):
        problems.append("manifest: its content does not match its manifest_sha256 (a field"
                        " was edited by hand)")
    return problems


def check_manifest(url: str, manifest: Any) -> None:
    """Refuse a store whose manifest is malformed, unsealed or edited: its card, dataset and
    logit scale would otherwise be copied into every result."""
    problems = manifest_problems(url, manifest)
    if problems:
        raise StoreError(f"{url}: {problems[0]}. Nothing read from it can be trusted to be"
                         f" what it names; run `safe-cache verify {url}`, or re-extract it.")


def seal_store(store: FeatureStore) -> None:
    """Seal the manifest of a store as it now is, and record the digest of every small array
    that lacks one (verify --seal, after verifying its data): what an older store, or one whose
    manifest a person has checked, needs to be read."""
    for key in store.small_arrays():
        array = array_at(store._group, key)
        if DIGEST not in array.attrs:
            array.attrs[DIGEST] = array_sha256(read(array, ...))
    store._write_manifest(store.manifest)


def check_fingerprint(store: FeatureStore, fingerprint: str, card: dict[str, Any]) -> None:
    """Refuse to mix features of another backbone into (or fit from) this store."""
    if store.fingerprint != fingerprint:
        theirs = store.manifest["backbone"]
        raise StoreError(
            f"{store.url} was extracted with backbone {theirs.get('model')}"
            f" ({theirs.get('pretrained')}, fingerprint {store.fingerprint[:12]}), not with"
            f" {card.get('model')} ({card.get('pretrained')}, fingerprint {fingerprint[:12]})."
            f" Use another store path for another backbone."
        )
