"""`datasets fetch` against hostile input: names and paths that would leave the root, local sources,
archives left by another run, corrupt archives and bombs, damaged folders (--repair), wrong-typed
sources fields; after each, what lies outside the root is still there, byte for byte."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from fetchserver import Mirror, mirror_dataset, pack, serve, write_sources
from miniatures import write_split_zhou

from safe_cache import ArchiveBombError, ArchiveError, DatasetError, FetchError
from safe_cache.cli import main
from safe_cache.data.datasets import load_spec, open_dataset
from safe_cache.data.fetch import WORK_DIR, fetch
from safe_cache.data.unpack import UnpackLimits, unpack
from safe_cache.study import load_study, plan_study

SPLIT = "split_zhou_EuroSAT.json"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """EuroSAT's miniature served (split file + EuroSAT.zip); `entry` is its sources entry."""
    mini = tmp_path_factory.mktemp("mini")
    mirror = Mirror()
    server = serve(mirror)
    write_split_zhou(mini, "eurosat", classes=2)
    mirror.entry = mirror_dataset(mirror, "eurosat", mini)
    mirror.mini = mini
    yield mirror
    server.shutdown()


def _sources(mirror: Mirror, folder: Path, index: int = -1, **change) -> Path:
    """A sources file for eurosat with `change` applied to source `index` (the archive)."""
    entry = json.loads(json.dumps(mirror.entry))
    entry["sources"][index].update(change)
    folder.mkdir(parents=True, exist_ok=True)
    return write_sources(folder / "sources.json", {"eurosat": entry})


@pytest.fixture
def victim(tmp_path):
    """A file and a folder beside the data root that no fetch may touch."""
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "keep.txt").write_bytes(b"precious\n")
    (outside / "x.tar.gz").write_bytes(b"mine, not fetch's\n")
    return outside


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["datasets", "fetch", *args])
    return result.exit_code, result.output


# --- names and paths that would leave the root --------------------------------------------------

def test_a_source_file_that_is_an_absolute_path_is_refused_before_any_work(mirror, tmp_path,
                                                                         victim):
    before = _snapshot(victim)
    target = victim / "victim" / "keep.txt"
    sources = _sources(mirror, tmp_path / "s", file=str(target))
    root = tmp_path / "data"
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 2 and "field 'file' holds a path separator" in output
    assert output.count("error:") == 1 and "Traceback" not in output
    assert _snapshot(victim) == before and not root.exists()


@pytest.mark.parametrize("file", ["../../../../x.tar.gz", "..", "~x.zip", "a\\b.zip"])
def test_a_source_file_leaving_the_downloads_is_refused(mirror, tmp_path, victim, file):
    before = _snapshot(victim)
    with pytest.raises(DatasetError, match=r"\[eurosat\]: source .* field 'file'"):
        fetch(["eurosat"], tmp_path / "data", sources=_sources(mirror, tmp_path / "s",
                                                                file=file))
    assert _snapshot(victim) == before and not (tmp_path / "data").exists()


@pytest.mark.parametrize("field, value, message", [
    ("name", "../../victim", "field 'name' holds a path separator"),
    ("name", "..", "field 'name' is a path, not a name"),
    ("folder", "../outside", "field 'folder' has a part '..'"),
    ("folder", "/tmp/elsewhere", "field 'folder' is an absolute path"),
    ("image_dir", "../../x", "field 'image_dir' has a part '..'"),
    ("split_file", "../x.json", "field 'split_file' has a part '..'"),
])
def test_a_spec_naming_paths_outside_the_root_is_refused(mirror, tmp_path, victim, field, value,
                                                         message):
    raw = json.loads(Path(load_spec("eurosat").path).read_text())
    raw[field] = value
    spec = tmp_path / "evil.json"
    spec.write_text(json.dumps(raw))
    before = _snapshot(victim)
    root = tmp_path / "data"
    code, output = _cli(str(spec), "--root", str(root))
    assert code == 2 and message in output and str(spec) in output, output
    assert _snapshot(victim) == before and not root.exists()


def test_a_symlink_in_the_root_leading_out_is_not_followed(mirror, tmp_path, victim):
    root = tmp_path / "data"
    root.mkdir()
    (root / WORK_DIR).symlink_to(victim)  # ROOT/.fetch -> outside
    before = _snapshot(victim)
    with pytest.raises(FetchError, match=r"the fetch folder: .* resolves outside"):
        fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"))
    (root / WORK_DIR).unlink()
    (victim / "EuroSAT.zip").mkdir()  # what a clean-up through the link would remove
    (victim / "EuroSAT.zip" / "keep.txt").write_text("mine\n")
    before = _snapshot(victim)
    for scratch in ("unpacked", "downloads", "stage"):  # ROOT/.fetch/eurosat/<scratch> -> out
        work = root / WORK_DIR / "eurosat"
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / scratch, ignore_errors=True)
        (work / scratch).symlink_to(victim)
        with pytest.raises(FetchError, match=r"resolves outside"):
            fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"))
        (work / scratch).unlink()
        assert _snapshot(victim) == before, scratch
    shutil.rmtree(root / WORK_DIR)
    (root / "eurosat").symlink_to(victim / "victim")  # the dataset folder -> outside
    with pytest.raises(FetchError, match=r"the dataset folder: .* resolves outside"):
        fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"))
    assert _snapshot(victim) == before


# --- local sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["file_url", "absolute_path"])
def test_local_sources_are_copied_and_checked_never_removed(mirror, tmp_path, form):
    local = tmp_path / "mirror"
    local.mkdir()
    entry = json.loads(json.dumps(mirror.entry))
    for source in entry["sources"]:
        name = source["url"].rsplit("/", 1)[1]
        path = local / name
        path.write_bytes(mirror.files[f"eurosat/{name}"])
        source["url"] = path.as_uri() if form == "file_url" else str(path)
    sources = write_sources(tmp_path / "sources.json", {"eurosat": entry})
    originals = _snapshot(local)
    [report] = fetch(["eurosat"], tmp_path / "data", sources=sources)
    assert report.status == "fetched" and open_dataset("eurosat", tmp_path / "data").splits
    assert _snapshot(local) == originals  # read, not moved or removed
    (local / "EuroSAT.zip").write_bytes(b"not the archive")
    entry["sources"][-1]["md5"] = "0" * 32
    write_sources(sources, {"eurosat": entry})
    with pytest.raises(FetchError, match=r"EuroSAT\.zip: md5 [0-9a-f]{32} is not the expected"):
        fetch(["eurosat"], tmp_path / "data2", sources=sources)
    assert (local / "EuroSAT.zip").read_bytes() == b"not the archive"  # checked, kept


def test_a_missing_local_source_is_one_line(tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"eurosat": {"sources": [
        {"url": str(tmp_path / "nowhere.zip"), "unpack": {"2750": "2750"}}]}}))
    code, output = _cli("eurosat", "--root", str(tmp_path / "data"), "--sources", str(sources))
    assert code == 2 and "the local source" in output and "nowhere.zip is not a file" in output


# --- downloads are reused only for today's checksum -------------------------------------------

def test_a_kept_archive_of_another_checksum_is_downloaded_again(mirror, tmp_path):
    root = tmp_path / "data"
    fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"), keep_archives=True)
    downloads = root / WORK_DIR / "eurosat" / "downloads"
    assert (downloads / "EuroSAT.zip").is_file()
    # the source now serves another archive (one class less), with its checksum
    import hashlib

    other = pack({"2750/eurosat_class_a/train_0.jpg": b"x"}, "EuroSAT.zip")
    mirror.files["eurosat/EuroSAT2.zip"] = other
    url = mirror.entry["sources"][-1]["url"].replace("EuroSAT.zip", "EuroSAT2.zip")
    sources = _sources(mirror, tmp_path / "s2", url=url, file="EuroSAT.zip",
                       md5=hashlib.md5(other).hexdigest())
    asked = len(mirror.asked("eurosat/EuroSAT2.zip"))
    shutil.rmtree(root / "eurosat")
    with pytest.raises(FetchError, match="not complete yet"):  # laid out from the new archive
        fetch(["eurosat"], root, sources=sources, keep_archives=True)
    assert len(mirror.asked("eurosat/EuroSAT2.zip")) == asked + 1  # not the stale copy
    assert (downloads / "EuroSAT.zip").read_bytes() == other


def test_a_final_named_file_without_a_record_is_not_trusted(mirror, tmp_path):
    root = tmp_path / "data"
    downloads = root / WORK_DIR / "eurosat" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "EuroSAT.zip").write_bytes(b"left by something else")
    asked = len(mirror.asked("eurosat/EuroSAT.zip"))
    [report] = fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"),
                     keep_archives=True)
    assert report.status == "fetched" and len(mirror.asked("eurosat/EuroSAT.zip")) == asked + 1
    good = (downloads / "EuroSAT.zip").read_bytes()
    shutil.rmtree(root / "eurosat")
    (downloads / ".EuroSAT.zip.verified.json").unlink()  # placed by hand: no record
    [report] = fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"))
    assert len(mirror.asked("eurosat/EuroSAT.zip")) == asked + 1  # its md5 matched: adopted
    assert report.status == "fetched" and good


def test_a_part_of_another_checksum_is_never_continued(mirror, tmp_path):
    root = tmp_path / "data"
    downloads = root / WORK_DIR / "eurosat" / "downloads"
    downloads.mkdir(parents=True)
    stale = downloads / "EuroSAT.zip.0123456789ab.part"
    stale.write_bytes(b"half of another file")
    asked = len(mirror.asked("eurosat/EuroSAT.zip"))
    fetch(["eurosat"], root, sources=_sources(mirror, tmp_path / "s"))
    assert mirror.asked("eurosat/EuroSAT.zip")[asked:] == [None]  # from zero, no Range
    assert not stale.exists()


# --- corrupt archives and bombs ---------------------------------------------------------------

def _serve(mirror: Mirror, name: str, data: bytes, tmp_path: Path, **change) -> Path:
    mirror.files[f"eurosat/{name}"] = data
    url = mirror.entry["sources"][-1]["url"].rsplit("/", 1)[0] + f"/{name}"
    return _sources(mirror, tmp_path / name, url=url, file="EuroSAT.zip", md5=None, **change)


def _bad_crc_zip() -> bytes:
    data = bytearray(pack({"2750/a/x.jpg": b"y" * 5000}, "a.zip"))
    at = bytes(data).index(b"y" * 100)
    data[at] = ord("z")  # stored, not compressed: the CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize("kind", ["truncated", "not_an_archive", "bad_crc"])
def test_a_corrupt_archive_is_one_line_removed_and_a_rerun_fetches_it_afresh(mirror, tmp_path,
                                                                            kind):
    good = mirror.files["eurosat/EuroSAT.zip"]
    data = {"truncated": good[: len(good) // 2], "not_an_archive": b"<html>moved</html>",
            "bad_crc": _bad_crc_zip()}[kind]
    name = f"broken-{kind}.zip"
    sources = _serve(mirror, name, data, tmp_path)
    root = tmp_path / "data"
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 2 and output.count("error:") == 1 and "Traceback" not in output
    assert "EuroSAT.zip" in output and "was removed" in output and \
        f"safe-cache datasets fetch eurosat --root {root} --sources" in output, output
    downloads = root / WORK_DIR / "eurosat" / "downloads"
    assert not (downloads / "EuroSAT.zip").exists()
    mirror.files[f"eurosat/{name}"] = good  # the server serves the good file again
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 0, output
    assert open_dataset("eurosat", root).splits["train"]


def _zeros_zip(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("2750/zeros.bin", b"\0" * size)
    return buffer.getvalue()


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_zip_bomb_is_refused_in_one_line_before_it_is_written(mirror, tmp_path):
    bomb = _zeros_zip(300 << 20)
    assert len(bomb) < 400_000
    sources = _serve(mirror, "bomb.zip", bomb, tmp_path)
    root = tmp_path / "data"
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 2 and output.count("error:") == 1
    assert "refused as an archive bomb" in output and "--unpack-margin" in output, output
    assert not (root / "eurosat" / "2750").exists()
    assert not list((root / WORK_DIR / "eurosat").rglob("zeros.bin"))


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_bombs_of_members_and_of_tar_bytes_are_refused(tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(10_001):
            archive.writestr(f"d/{i}", b"")
    with pytest.raises(ArchiveBombError, match=r"more than 10,000 members"):
        unpack(many, tmp_path / "out")
    assert not (tmp_path / "out" / "d").exists()  # what it had written is gone
    big = tmp_path / "big.tar.gz"
    with tarfile.open(big, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 80 << 20
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(ArchiveBombError, match=r"more than 67,108,864 bytes"):
        unpack(big, tmp_path / "out2")
    unpack(big, tmp_path / "out3", UnpackLimits.for_size(big.stat().st_size, margin=1e4))
    assert (tmp_path / "out3" / "zeros.bin").stat().st_size == 80 << 20  # raised: it unpacks


def test_archive_members_with_links_or_escapes_are_refused(tmp_path):
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("evil")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match=r"member 'evil' is a link"):
        unpack(link, tmp_path / "out")
    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as archive:
        archive.writestr("../../escaped.txt", b"x")
    with pytest.raises(ArchiveError, match=r"member '\.\./\.\./escaped\.txt'"):
        unpack(escape, tmp_path / "a" / "b" / "out")
    assert not list(tmp_path.rglob("escaped.txt"))
    dotted = tmp_path / "dotted.tar"
    with tarfile.open(dotted, "w") as tar:  # `tar cf x.tar .` writes "./" prefixes: fine
        info = tarfile.TarInfo("./a/b.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    unpack(dotted, tmp_path / "dots")
    assert (tmp_path / "dots" / "a" / "b.txt").read_bytes() == b"1"


# --- repair -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_repair_restores_deleted_images_and_a_truncated_split_leaving_the_rest(mirror,
                                                                              tmp_path):
    root = tmp_path / "data"
    sources = _sources(mirror, tmp_path / "s")
    fetch(["eurosat"], root, sources=sources)
    folder = root / "eurosat"
    images = sorted((folder / "2750").rglob("*.jpg"))
    good = {p: p.read_bytes() for p in images}
    split = (folder / SPLIT).read_bytes()
    images[0].unlink()
    images[1].unlink()
    images[2].write_bytes(images[2].read_bytes()[:50])  # a truncated image
    (folder / "2750" / "my_notes.txt").write_text("mine\n")  # the user's own file
    asked = len(mirror.requests)
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 2 and "2 images listed by the split are missing" in output
    assert f"safe-cache datasets fetch eurosat --root {root} --sources {sources} --repair" \
        in output, output
    [report] = fetch(["eurosat"], root, sources=sources, repair=True)
    assert report.status == "repaired" and report.added == 2 and report.replaced == 1
    assert {p: p.read_bytes() for p in images} == good
    assert (folder / "2750" / "my_notes.txt").read_text() == "mine\n"
    assert len(mirror.requests) > asked and not (root / WORK_DIR).exists()
    (folder / SPLIT).write_bytes(split[: len(split) // 3])  # a truncated split file
    with pytest.raises(FetchError, match=r"not complete yet: .*not a readable JSON split file.*"
                                         r"--repair"):
        fetch(["eurosat"], root, sources=sources)
    [report] = fetch(["eurosat"], root, sources=sources, repair=True)
    assert (folder / SPLIT).read_bytes() == split and report.replaced == 1
    assert report.downloaded == [SPLIT]  # the split file's source only: the images were fine


# --- wrong-typed sources fields -----------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"md5": 12345}, "field 'md5' is 12345, not a text"),
    ({"md5": "abc"}, "field 'md5' is 'abc', not 32 hex digits"),
    ({"unpack": ["2750"]}, "field 'unpack' is ['2750'], not an object"),
    ({"unpack": {"": "2750"}}, "field 'unpack' has an inner path ''"),
    ({"unpack": {}}, "field 'unpack' is empty"),
    ({"to": "x.json"}, "needs exactly one of 'unpack'"),
    ({"approx_bytes": -5}, "field 'approx_bytes' is -5, not a size in bytes"),
    ({"nested": "inner.zip"}, "field 'nested' is 'inner.zip', not a list"),
    ({"url": 7}, "source url 7 must be an http(s):// or file:// URL"),
])
def test_each_wrong_typed_sources_field_is_one_line(mirror, tmp_path, change, message):
    sources = _sources(mirror, tmp_path, **change)
    code, output = _cli("eurosat", "--root", str(tmp_path / "data"), "--sources", str(sources))
    assert code == 2 and output.count("error:") == 1 and "Traceback" not in output
    assert message in " ".join(output.split()) and "[eurosat]" in output, output
    assert not (tmp_path / "data").exists()


def test_wrong_split_sizes_in_a_sources_file_are_one_line(mirror, tmp_path):
    entry = dict(mirror.entry, split_sizes="5")
    sources = write_sources(tmp_path / "sources.json", {"eurosat": entry})
    code, output = _cli("eurosat", "--root", str(tmp_path), "--sources", str(sources))
    assert code == 2 and "field 'split_sizes' is '5', not an object" in output
    entry["split_sizes"] = {"train": -1}
    write_sources(sources, {"eurosat": entry})
    code, output = _cli("eurosat", "--root", str(tmp_path), "--sources", str(sources))
    assert code == 2 and "'train': -1" in output


@pytest.mark.parametrize("item, message", [
    (["a/x.jpg", "zero", "a"], r"train\[0\] is \['a/x\.jpg', 'zero', 'a'\], not \[path, label"),
    (["a/x.jpg"], r"train\[0\] is \['a/x\.jpg'\], not"),
    ("a/x.jpg", r"train\[0\] is 'a/x\.jpg', not"),
    (["a/x.jpg", True, "a"], r"train\[0\] is \['a/x\.jpg', True, 'a'\]"),
])
def test_a_damaged_split_file_is_one_line_naming_the_item(tmp_path, item, message):
    split = write_split_zhou(tmp_path, "eurosat", classes=2)
    split["train"][0] = item
    (tmp_path / "eurosat" / SPLIT).write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=message):
        open_dataset("eurosat", tmp_path)


# --- studies take spec files --------------------------------------------------------------------

def test_a_study_names_a_users_spec_file(tmp_path):
    from miniatures import _jpeg

    for name in ("circle", "square"):
        for i in range(10):
            _jpeg(tmp_path / "data" / "shapes" / "images" / name / f"{i}.png", i)
    (tmp_path / "myshapes.json").write_text(json.dumps({
        "name": "shapes", "kind": "imagefolder", "folder": "shapes", "image_dir": "images",
        "templates": ["a {} shape."]}))
    study = tmp_path / "s.toml"
    study.write_text('datasets = ["myshapes.json"]\nshots = [1]\nseeds = [1]\n'
                     '[[backbones]]\nmodel = "safe-cache-tiny-rn"\npretrained = "none"\n')
    loaded = load_study(study)
    assert loaded.datasets == ("shapes",)
    assert loaded.dataset_ref("shapes") == str((tmp_path / "myshapes.json").resolve())
    plan = plan_study(loaded, tmp_path / "data", stores=str(tmp_path / "stores"),
                      out=tmp_path / "out")
    assert plan.missing == [] and [s.status for s in plan.stores] == ["create"]
    assert plan.stores[0].url.endswith("/shapes/" + plan.stores[0].url.rsplit("/", 1)[1])
    study.write_text(study.read_text().replace("myshapes.json", "nothere.json"))
    with pytest.raises(Exception, match=r"unknown dataset 'nothere\.json'.*or a dataset spec"):
        load_study(study)


# --- from a hostile probe: links planted in the work folder, endless and malformed servers ------

def test_a_part_hard_linked_to_a_file_outside_is_never_written_into(mirror, tmp_path, victim):
    from safe_cache.data.download import part_path
    from safe_cache.data.fetch import fetch_spec
    from safe_cache.data.sources import load_overrides

    sources = _sources(mirror, tmp_path / "s")
    spec = fetch_spec("eurosat", load_overrides(sources))
    downloads = tmp_path / "data" / WORK_DIR / "eurosat" / "downloads"
    downloads.mkdir(parents=True)
    before = _snapshot(victim)
    for source in spec.sources:
        (downloads / part_path(source, downloads).name).hardlink_to(victim / "victim" / "keep.txt")
    [report] = fetch(["eurosat"], tmp_path / "data", sources=sources)
    assert report.status == "fetched" and _snapshot(victim) == before


def test_a_dry_run_writes_nothing_not_even_through_a_link(tmp_path, victim):
    from miniatures import _jpeg

    from safe_cache.data.fetch import plan_fetch

    for name in ("circle", "square"):
        for i in range(4):
            _jpeg(tmp_path / "data" / "shapes" / "images" / name / f"{i}.png", i)
    stale = victim / "split.json"
    stale.write_text(json.dumps({"train": [], "val": [], "test": [], "listing_sha256": "old"}))
    (tmp_path / "data" / "shapes" / "split_generated_shapes.json").symlink_to(stale)
    spec = tmp_path / "shapes.json"
    spec.write_text(json.dumps({"name": "shapes", "kind": "imagefolder", "folder": "shapes",
                                "image_dir": "images", "sources": [
                                    {"url": "http://127.0.0.1:9/x.zip", "unpack": {"a": "b"}}]}))
    before = _snapshot(victim)
    plan_fetch([str(spec)], tmp_path / "data")
    assert _snapshot(victim) == before


def test_a_source_serving_more_than_its_bound_is_refused_and_removed(mirror, tmp_path):
    from safe_cache.data.download import download
    from safe_cache.data.fetch import fetch_spec
    from safe_cache.data.sources import load_overrides

    spec = fetch_spec("eurosat", load_overrides(_sources(mirror, tmp_path / "s")))
    archive = spec.sources[-1]
    downloads = tmp_path / "downloads"
    with pytest.raises(FetchError, match=r"EuroSAT\.zip: the source serves more than 1,000"
                                         r" bytes.*the download was removed"):
        download(archive, downloads, limit=1000)
    assert list(downloads.iterdir()) == []
    local = tmp_path / "big.zip"
    local.write_bytes(b"0" * 5000)
    with pytest.raises(FetchError, match=r"serves more than 1,000 bytes"):
        download(dataclasses_replace(archive, url=str(local)), downloads, limit=1000)
    assert local.stat().st_size == 5000


def dataclasses_replace(source, **change):
    import dataclasses

    return dataclasses.replace(source, **change)


@pytest.mark.parametrize("url", ["http://[::1/x.zip", "http://127.0.0.1:abc/x.zip",
                                 "http:///x.zip", "http://a b/x.zip"])
def test_malformed_urls_are_one_line(tmp_path, url):
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"eurosat": {"sources": [{"url": url, "unpack": {"a": "b"}}]}}))
    code, output = _cli("eurosat", "--root", str(tmp_path / "d"), "--sources", str(sources))
    assert code == 2 and output.count("error:") == 1 and "must be an http(s)://" in output


def test_undecodable_and_nested_files_are_one_line(tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_bytes(b"\xff\xfe{")
    code, output = _cli("eurosat", "--root", str(tmp_path), "--sources", str(sources))
    assert code == 2 and "is not readable JSON" in output
    sources.write_text("[" * 100_000 + "]" * 100_000)
    code, output = _cli("eurosat", "--root", str(tmp_path), "--sources", str(sources))
    assert code == 2 and "is not readable JSON" in output
    spec = tmp_path / "spec.json"
    spec.write_bytes(b"\x80\x81")
    code, output = _cli(str(spec), "--root", str(tmp_path))
    assert code == 2 and "is not readable JSON" in output
    for margin in ("inf", "1e308", "0"):
        code, output = _cli("eurosat", "--root", str(tmp_path), "--unpack-margin", margin)
        assert code == 2 and "--unpack-margin" in output and output.count("error:") == 1


def _raw_server(reply: bytes):
    """A server that answers every connection with `reply`, whatever it was asked."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("reply", [
    b"GARBAGE\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 70_000 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
])
def test_a_malformed_server_is_one_line_and_a_rerun_starts_clean(tmp_path, reply):
    listener = _raw_server(reply)
    port = listener.getsockname()[1]
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"eurosat": {"sources": [
        {"url": f"http://127.0.0.1:{port}/EuroSAT.zip", "unpack": {"2750": "2750"}}]}}))
    for _ in range(2):
        code, output = _cli("eurosat", "--root", str(tmp_path / "d"), "--sources", str(sources))
        assert code == 2 and output.count("error:") == 1 and "Traceback" not in output, output
        assert "EuroSAT.zip" in output
    listener.close()


def test_a_nul_or_undecodable_text_in_the_users_folder_is_one_line(tmp_path):
    split = write_split_zhou(tmp_path, "eurosat", classes=2)
    split["test"][0][0] = "a\u0000.jpg"
    (tmp_path / "eurosat" / SPLIT).write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"test\[0\] is \['a\\x00\.jpg'"):
        open_dataset("eurosat", tmp_path)
    from miniatures import write_fgvc

    write_fgvc(tmp_path)
    (tmp_path / "fgvc_aircraft" / "variants.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match=r"variants\.txt is not a readable text file"):
        open_dataset("fgvc_aircraft", tmp_path)


def test_a_csv_row_without_a_label_is_one_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for part in ("train", "val", "test"):
        (folder / f"{part}.csv").write_text("path,label\n0.jpg\n")
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "mine", "kind": "imagefolder", "folder": "mine",
                                "csv": {"train": "train.csv", "val": "val.csv",
                                        "test": "test.csv"}}))
    with pytest.raises(DatasetError, match=r"train\.csv: line 2 is \['0\.jpg'\], not"):
        open_dataset(str(spec), tmp_path)


def test_members_that_collide_are_a_broken_archive_removed_for_a_fresh_download(mirror,
                                                                                tmp_path):
    data = pack({"2750": b"a file", "2750/eurosat_class_a/x.jpg": b"y"}, "c.zip")
    sources = _serve(mirror, "collide.zip", data, tmp_path)
    root = tmp_path / "data"
    code, output = _cli("eurosat", "--root", str(root), "--sources", str(sources))
    assert code == 2 and "is not a consistent archive: its members collide" in output, output
    assert "was removed" in output
    assert not (root / WORK_DIR / "eurosat" / "downloads" / "EuroSAT.zip").exists()


def test_a_tar_long_name_bomb_is_refused_before_it_is_read(tmp_path):
    import resource

    bomb = tmp_path / "longname.tar.gz"
    with tarfile.open(bomb, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a" * (8 << 20))  # an 8 MiB name: a GNU long-name header
        info.size = 0
        tar.addfile(info)
    assert bomb.stat().st_size < 100_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArchiveBombError, match=r"a tar header asks for [\d,]+ bytes") as error:
        unpack(bomb, tmp_path / "out")
    assert len(str(error.value)) < 400
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 << 10  # KiB: < 64 MiB


def test_a_dataset_folder_inside_the_work_folder_is_refused(mirror, tmp_path):
    raw = json.loads(Path(load_spec("eurosat").path).read_text())
    raw["folder"] = ".fetch/eurosat"
    spec = tmp_path / "evil.json"
    spec.write_text(json.dumps(raw))
    code, output = _cli(str(spec), "--root", str(tmp_path / "data"), "--sources",
                        str(_sources(mirror, tmp_path / "s")))
    assert code == 2 and "lies in .fetch/, fetch's work folder" in output
    assert not (tmp_path / "data").exists()
