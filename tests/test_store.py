"""The store contract, run against a local folder, memory://, and s3:// on a local moto server."""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest
import xarray as xr
from factories import TOY_CARD as CARD
from factories import fill, random_features, raw_split, whole
from factories import new_store as make_store

from safe_cache import StoreError, StoreLockedError, card_fingerprint
from safe_cache.store import SCHEMA_VERSION, StoreLayout, open_store
from safe_cache.store.verify import verify_store

T, C, D, V = CARD["tokens"], CARD["channels"], CARD["embed_dim"], 2


# The fast loop keeps the local disk; fsspec's memory store and moto's S3 (the remote path) in CI
@pytest.fixture(params=["local", pytest.param("memory", marks=pytest.mark.slow),
                        pytest.param("s3", marks=pytest.mark.slow)])
def backend(request, tmp_path):
    """(url, storage_options) of an empty location on each backend."""
    name = uuid.uuid4().hex[:8]
    if request.param == "local":
        return str(tmp_path / f"{name}.zarr"), None
    if request.param == "memory":
        return f"memory://{name}.zarr", None
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://stores/{name}.zarr", {"client_kwargs": {"endpoint_url": endpoint},
                                         "skip_instance_cache": True}


def new_store(url, options, layout=None):
    return make_store(url, CARD, views=V, layout=layout, storage_options=options)


def features(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return random_features(rows, CARD, V, seed)


def test_round_trip(backend):
    url, options = backend
    with new_store(url, options) as store:
        rows = fill(store, "test", 10)
        fill(store, "train", 4)
        fill(store, "val", 3)
        store.write_fewshot(1, 2, [0, 1], [2])
        store.write_classifier("hand", np.eye(4, D), [["a"], ["b"], ["c"], ["d"]])
    reader = open_store(url, storage_options=options)
    assert reader.manifest["schema_version"] == SCHEMA_VERSION
    assert reader.fingerprint == card_fingerprint(CARD)
    assert reader.readable_rows("test").tolist() == rows.tolist()
    view = reader.split("test")
    assert dict(view.sizes) == {"image": 10, "token": T, "channel": C, "embed": D}
    np.testing.assert_allclose(view["dense"].values, features(10)["dense"].astype(np.float16))
    assert view["dense"].dtype == np.float16 and view["pooled"].dtype == np.float32
    assert view["path"].values[3] == "test/3.jpg" and view["label"].values[3] == 3
    train, val = reader.fewshot(1, 2)
    assert train.tolist() == [0, 1] and val.tolist() == [2]
    assert reader.classifier("hand").shape == (4, D)
    assert verify_store(url, storage_options=options) == []


@pytest.mark.slow
def test_append_does_not_rewrite_existing_chunks(backend):
    url, options = backend
    with new_store(url, options) as store:
        first = fill(store, "train", 6)  # units 0 (full) and 1 (rows 4-5 + 2 padding rows)
    with open_store(url, "a", storage_options=options) as store:
        before = store.read_rows("train", "dense", np.arange(8))
        second = fill(store, "train", 3, seed=1)
        assert second[0] == 8  # the append starts at the next unit boundary
        np.testing.assert_array_equal(store.read_rows("train", "dense", np.arange(8)), before)
    reader = open_store(url, storage_options=options)
    assert reader.readable_rows("train").tolist() == [*first.tolist(), *second.tolist()]
    assert reader.split("train")["aug_dense"].shape == (9, V, T, C)


def test_readers_see_only_complete_rows(backend):
    url, options = backend
    with new_store(url, options) as store:
        store.append_rows("val", [f"{i}.jpg" for i in range(8)], [0] * 8)
        store.write_unit("val", 1, {"dense": np.ones((4, T, C)), "pooled": np.ones((4, D))})
    reader = open_store(url, storage_options=options)
    assert reader.readable_rows("val").tolist() == [4, 5, 6, 7]
    assert any("incomplete" in p for p in verify_store(url, storage_options=options))


def test_read_only_refuses_writes(backend):
    url, options = backend
    new_store(url, options).close()
    reader = open_store(url, storage_options=options)
    with pytest.raises(StoreError, match="read-only"):
        reader.append_rows("test", ["x.jpg"], [0])
    with pytest.raises(StoreError, match="already holds a store"):
        new_store(url, options)


def test_the_sealed_store_answers_what_extract_asks(backend):
    """What extract plans from, asked of the store (it hands out no zarr group): which splits
    it holds, their rows, what of each unit is written, and padding marked through it."""
    url, options = backend
    with new_store(url, options) as store:
        assert not hasattr(store, "group") and not store.has_split("train")
        assert store.row_count("train") == 0 and store.view_count("train") == 0
        assert store.lease_holder()["token"] == store.lease_token
        fill(store, "train", 4)  # unit 0: everything written
        store.append_rows("train", ["late.jpg"], [1])  # unit 1: reserved, nothing written
        store.write_parts("train", 1, {k: v[:, :1] if k.startswith("aug") else v for k, v in
                                       features(4).items() if k.startswith("aug")})
        assert store.has_split("train") and not store.has_split("fewshot")
        assert store.row_count("train") == 8 and store.view_count("train") == V
        assert store.row_paths("train")[4] == "late.jpg" and store.row_labels("train")[5] == -1
        status = store.unit_status("train")
        assert status.center.tolist() == [True, False] and status.flip is None
        assert status.views.tolist() == [[True, True], [True, False]]
        assert status.whole.tolist() == [True, False]
        assert status.first_missing_view().tolist() == [V, 0]  # unit 1 needs its center
        assert status.flip_missing().tolist() == [False, False]
        store.mark_padding("train", 3)
        assert store.readable_rows("train").tolist() == [0, 1, 2]
        with pytest.raises(StoreError, match="row 9 is not a reserved row of train"):
            store.mark_padding("train", 9)
    reader = open_store(url, storage_options=options)
    assert reader.lease_holder() is None
    with pytest.raises(StoreError, match="read-only"):
        reader.mark_padding("train", 0)


def test_lease_conflict_and_takeover(backend):
    url, options = backend
    writer = new_store(url, options)
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        open_store(url, "a", storage_options=options)
    open_store(url, storage_options=options)  # readers are never blocked
    # the writer dies: its heartbeat stops and ages
    writer.lease._stop.set()
    holder = dict(writer.lease.holder, heartbeat=time.time() - 10_000)
    raw_split(url, "lease", options, mode="r+").attrs["holder"] = holder
    with pytest.raises(StoreLockedError, match=r"stale.*--takeover"):
        open_store(url, "a", storage_options=options)
    with open_store(url, "a", storage_options=options, takeover=True) as store:
        fill(store, "test", 2)
    assert open_store(url, storage_options=options).readable_rows("test").size == 2


def test_job_workers_write_under_the_jobs_lease_only(backend):
    url, options = backend
    job = new_store(url, options)
    rows = job.append_rows("test", [f"{i}.jpg" for i in range(4)], [0] * 4)
    worker = open_store(url, "a", storage_options=options, job_token=job.lease_token)
    worker.write_unit("test", 0, {"dense": np.ones((4, T, C)), "pooled": np.ones((4, D))})
    worker.close()  # a worker neither consolidates nor releases anything
    assert job.lease_token and open_store(url, storage_options=options).readable_rows(
        "test").tolist() == rows.tolist()
    with pytest.raises(StoreLockedError, match="lease is gone"):
        open_store(url, "a", storage_options=options, job_token="another job")
    job.close()
    with pytest.raises(StoreLockedError, match="held by nobody"):
        open_store(url, "a", storage_options=options, job_token=job.lease_token or "x")


@pytest.mark.slow
def test_chunk_cache_serves_feature_chunks_and_never_stale_metadata(backend, tmp_path):
    url, options = backend
    cache = tmp_path / "cache"
    writer = new_store(url, options)
    fill(writer, "test", 6)
    cached = open_store(url, storage_options=options, cache=str(cache))
    first = whole(cached, "test", "dense")
    assert cached.cache_counts()["misses"] > 0 and cached.cache_counts()["hits"] == 0
    again = open_store(url, storage_options=options, cache=str(cache))
    assert np.array_equal(whole(again, "test", "dense"), first)
    assert again.cache_counts()["hits"] > 0 and again.cache_counts()["misses"] == 0
    assert open_store(url, storage_options=options).cache_counts() is None
    fill(writer, "test", 3, seed=1)  # the store grows: new rows, new completion flags
    writer.close()
    grown = open_store(url, storage_options=options, cache=str(cache))
    plain = open_store(url, storage_options=options)
    assert grown.readable_rows("test").tolist() == plain.readable_rows("test").tolist()
    assert np.array_equal(whole(grown, "test", "dense"), whole(plain, "test", "dense"))
    files = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()]
    assert files and all("/test/dense/c/" in f or "/test/pooled/c/" in f for f in files)
    with pytest.raises(StoreError, match="for reading"):
        open_store(url, "a", storage_options=options, cache=str(cache))


def test_schema_version_mismatch_is_clear(backend):
    url, options = backend
    with new_store(url, options) as store:
        card = store.manifest
        card["schema_version"] = SCHEMA_VERSION + 1
        raw_split(url, "", options, mode="r+").attrs["safe_cache"] = card  # behind its back
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        open_store(url, storage_options=options)


def test_nan_is_refused_at_write(tmp_path):
    with new_store(str(tmp_path / "n.zarr"), None) as store:
        store.append_rows("test", ["a.jpg"], [0])
        bad = {"dense": np.full((4, T, C), np.nan), "pooled": np.zeros((4, D))}
        with pytest.raises(StoreError, match="NaN or Inf"):
            store.write_unit("test", 0, bad)
        overflow = {"dense": np.full((4, T, C), 1e6), "pooled": np.zeros((4, D))}
        with pytest.raises(StoreError, match="after the cast to float16"):
            store.write_unit("test", 0, overflow)  # finite in float32, inf in float16
        assert store.complete_units("test").size == 0
        assert not whole(store, "test", "dense").any()  # nothing of the unit was written


def test_one_table_holds_the_completion_map():
    """schema.ARRAYS says which arrays each completion flag covers: every feature array is in
    one part, each part has one flag, and a part's arrays share its flag's prefix."""
    from safe_cache.store.schema import ARRAYS, FEATURES, PARTS

    assert sorted(f.name for part in PARTS.values() for f in part.features) == sorted(FEATURES)
    assert {part.flag.name for part in PARTS.values()} == {
        spec.name for spec in ARRAYS if spec.role == "bookkeeping"}
    assert {name: part.prefix for name, part in PARTS.items()} == {
        "center": "", "views": "aug_", "flip": "flip_"}
    for part in PARTS.values():
        assert all(f.name.startswith(part.prefix) for f in part.features), part.name
        assert all(f.per_view == part.per_view for f in part.features), part.name
        assert all(f.splits == part.flag.splits and f.optional == part.flag.optional
                   for f in part.features), part.name


@pytest.mark.slow
def test_a_part_written_in_part_is_refused(tmp_path):
    """A flag vouches for every array of its part: half a part is refused before any write."""
    with new_store(str(tmp_path / "p.zarr"), None) as store:
        store.append_rows("train", ["a.jpg"], [0])
        whole = features(4)
        with pytest.raises(StoreError, match="aug_complete` flag covers them all"):
            store.write_unit("train", 0, {k: v for k, v in whole.items() if k != "aug_pooled"})
        with pytest.raises(StoreError, match="complete` flag covers"):
            store.write_unit("train", 0, {"dense": whole["dense"]})
        with pytest.raises(StoreError, match="no feature array 'flip_dense'"):
            store.write_parts("train", 0, {"flip_dense": whole["dense"]}, first_view=V)
        assert store.complete_units("train").size == 0
        store.write_unit("train", 0, whole)
        assert store.complete_units("train").tolist() == [0]


@pytest.mark.slow
def test_verify_finds_a_deleted_and_a_truncated_chunk(tmp_path):
    url = str(tmp_path / "v.zarr")
    with new_store(url, None) as store:
        fill(store, "test", 12)
    (tmp_path / "v.zarr" / "test" / "dense" / "c" / "1" / "0" / "0").unlink()
    chunk = tmp_path / "v.zarr" / "test" / "pooled" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    problems = verify_store(url)
    assert any("test/dense: chunk of unit 1 is missing" in p for p in problems), problems
    assert any("test/pooled: chunk of unit 2 is unreadable" in p for p in problems), problems


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("tokens", T + 1), ("channels", C * 2)])
def test_verify_finds_a_hand_edited_card(tmp_path, field, value):
    url = str(tmp_path / "e.zarr")
    with new_store(url, None) as store:
        fill(store, "test", 4)
    meta = tmp_path / "e.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["safe_cache"]["backbone"][field] = value
    meta.write_text(json.dumps(doc))
    problems = verify_store(url)
    assert any("fingerprint" in p for p in problems)
    assert any("test/dense: shape" in p for p in problems), problems


def test_plain_xarray_opens_a_store(tmp_path):
    url = str(tmp_path / "x.zarr")
    with new_store(url, None) as store:
        fill(store, "test", 4)
    dataset = xr.open_zarr(url, group="test")  # no safe-cache involved
    assert dataset["dense"].dims == ("image", "token", "channel")


@pytest.mark.slow
def test_sharded_layout_for_object_stores(tmp_path):
    url = str(tmp_path / "sh.zarr")
    with new_store(url, None, StoreLayout(chunk_images=2, shard_images=4)) as store:
        fill(store, "test", 8)
    files = sorted(p.name for p in (tmp_path / "sh.zarr" / "test" / "dense" / "c").iterdir())
    assert files == ["0", "1"]  # one object per shard of 4 images, not per chunk of 2
    assert verify_store(url) == []
    assert open_store(url).split("test")["dense"].shape == (8, T, C)


@pytest.mark.slow
def test_no_pickles_in_a_store(tmp_path):
    url = tmp_path / "p.zarr"
    with new_store(str(url), None) as store:
        fill(store, "train", 4)
    for path in url.rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), path  # pickle protocol marker


@pytest.mark.slow
def test_cli_info_ls_verify(tmp_path):
    from click.testing import CliRunner

    from safe_cache.cli import main

    url = tmp_path / "toy" / "tiny-none.zarr"
    url.parent.mkdir()
    with new_store(str(url), None) as store:
        fill(store, "test", 6)
    runner = CliRunner()
    info = runner.invoke(main, ["info", str(url), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["splits"]["test"]["readable_rows"] == 6
    assert "complete units" in runner.invoke(main, ["info", str(url)]).output
    listing = json.loads(runner.invoke(main, ["ls", str(tmp_path), "--json"]).output)
    assert [row["dataset"] for row in listing] == ["toy"] and listing[0]["complete"]
    assert runner.invoke(main, ["verify", str(url)]).exit_code == 0
    (url / "test" / "dense" / "c" / "0" / "0" / "0").unlink()
    failed = runner.invoke(main, ["verify", str(url)])
    assert failed.exit_code == 1 and "missing" in failed.output
    missing = runner.invoke(main, ["info", str(tmp_path / "nothing.zarr")])
    assert missing.exit_code == 2 and "No store" in missing.output


@pytest.mark.slow
def test_reading_a_store_never_imports_torch(tmp_path):
    import subprocess
    import sys

    url = str(tmp_path / "t.zarr")
    with new_store(url, None) as store:
        fill(store, "test", 4)
    code = ("import sys; from safe_cache import open_store; from safe_cache.store.verify import "
            f"verify_store; s = open_store({url!r}); s.split('test').load(); "
            f"assert verify_store({url!r}) == []; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _as_schema_1(manifest: dict) -> dict:
    """A manifest as safe-cache 0.2.0 first wrote it: T/C/D/grid keys, schema 1, sealed."""
    from safe_cache.identity import SEAL_FIELD, manifest_seal

    old = {"tokens": "T", "channels": "C", "embed_dim": "D", "token_grid": "grid"}
    backbone = {old.get(k, k): v for k, v in manifest["backbone"].items()}
    backbone["schema"] = 1
    shapes = {old.get(k, k): v for k, v in manifest["shapes"].items()}
    stored = {**manifest, "schema_version": 1, "backbone": backbone, "shapes": shapes}
    stored[SEAL_FIELD] = manifest_seal(stored)
    return stored


@pytest.mark.slow
def test_a_schema_1_store_reads_with_todays_keys_and_the_same_fingerprint(tmp_path):
    """store/compat.py: the card's keys were renamed in schema 2; a schema-1 store reads (its
    seal checked on the stored form), keeps its fingerprint, and is written as schema 2."""
    import hashlib

    url = str(tmp_path / "old.zarr")
    with make_store(url) as store:
        fill(store, "test", 3)
        fingerprint = store.fingerprint
        raw_split(url, "", None, mode="r+").attrs["safe_cache"] = _as_schema_1(store.manifest)
    assert raw_split(url, "", None).attrs["safe_cache"]["backbone"]["T"] == CARD["tokens"]
    old_labels = {"T": CARD["tokens"], "C": CARD["channels"], "D": CARD["embed_dim"],
                  "grid": CARD["token_grid"]}
    fields = ("family", "model_config_sha256", "weights_sha256", "init_seed", "quick_gelu",
              "image_size", "mean", "std", "interpolation", "resize_mode", "cut")
    by_hand = {**{k: CARD.get(k) for k in fields}, **old_labels}  # the hash as 0.2.0 took it
    assert fingerprint == hashlib.sha256(json.dumps(by_hand, sort_keys=True).encode()).hexdigest()
    store = open_store(url)
    card = store.manifest["backbone"]
    assert store.manifest["schema_version"] == SCHEMA_VERSION == 2
    assert (card["tokens"], card["channels"], card["embed_dim"], card["token_grid"]) == \
        (CARD["tokens"], CARD["channels"], CARD["embed_dim"], CARD["token_grid"])
    assert "T" not in card and store.fingerprint == fingerprint == card_fingerprint(card)
    assert verify_store(url) == []
    assert whole(store, "test", "pooled").shape[1] == CARD["embed_dim"]
    with open_store(url, "a") as writer:  # a manifest write stores today's schema
        writer.record_skipped([{"split": "test", "path": "x.jpg", "error": "unreadable"}])
    stored = raw_split(url, "", None).attrs["safe_cache"]
    assert stored["schema_version"] == 2 and stored["backbone"]["tokens"] == CARD["tokens"]
    assert verify_store(url) == []


def test_an_edited_schema_1_manifest_is_still_refused(tmp_path):
    url = str(tmp_path / "old.zarr")
    with make_store(url) as store:
        fill(store, "test", 3)
        old = _as_schema_1(store.manifest)
    old["backbone"]["C"] = old["backbone"]["C"] * 2  # edited after sealing
    raw_split(url, "", None, mode="r+").attrs["safe_cache"] = old
    with pytest.raises(StoreError, match=r"seal|edited"):
        open_store(url)
