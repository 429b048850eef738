"""`datasets fetch` against a local HTTP mirror of miniature archives with the real layouts:
checksums, resuming, layouts the readers accept, UCF101's middle frames, dry runs, bad input."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fetchserver import Mirror, mirror_dataset, pack, serve, write_sources
from miniatures import UCF_FRAMES, write_fgvc, write_split_zhou, write_ucf101_videos
from PIL import Image

from safe_cache import DatasetError, FetchError
from safe_cache.cli import main
from safe_cache.data.datasets import list_specs, load_spec, open_dataset
from safe_cache.data.fetch import LEDGER, WORK_DIR, fetch, fetch_spec, plan_fetch, problems_of
from safe_cache.data.sources import load_overrides
from safe_cache.data.unpack import unpack

SPLIT_ZHOU = ("dtd", "eurosat", "caltech101", "oxford_pets", "oxford_flowers", "food101",
              "sun397")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Every downloadable dataset's miniature, served; the sources file pointing at it."""
    mini = tmp_path_factory.mktemp("mini")
    mirror = Mirror()
    server = serve(mirror)
    for name in SPLIT_ZHOU:
        write_split_zhou(mini, name, classes=3)
    write_fgvc(mini)
    write_ucf101_videos(mini)
    entries = {name: mirror_dataset(mirror, name, mini) for name in (*SPLIT_ZHOU, "fgvc_aircraft")}
    entries["ucf101"] = mirror_dataset(mirror, "ucf101", mini, rename={"UCF101.rar": "UCF101.zip"})
    mirror.sources = write_sources(mini / "sources.json", entries)
    mirror.entries = entries
    yield mirror
    server.shutdown()


def _sources_with(mirror: Mirror, tmp_path: Path, name: str, **change) -> Path:
    """A sources file whose archive entry of `name` (the last source) has `change` applied."""
    entries = json.loads(json.dumps(mirror.entries))
    entries[name]["sources"][-1].update(change)
    return write_sources(tmp_path / "sources.json", entries)


@pytest.mark.parametrize("name", [*SPLIT_ZHOU, "fgvc_aircraft"])
def test_fetch_lays_out_what_the_reader_takes(mirror, tmp_path, name):
    [report] = fetch([name], tmp_path, sources=mirror.sources)
    spec = load_spec(name)
    assert report.status == "fetched"
    assert problems_of(fetch_spec(name, load_overrides(mirror.sources)), tmp_path) == []
    dataset = open_dataset(spec, tmp_path)
    assert all(dataset.image_path(e).is_file() for entries in dataset.splits.values()
               for e in entries)
    assert json.loads((tmp_path / spec.folder / LEDGER).read_text())["dataset"] == name
    assert not (tmp_path / WORK_DIR).exists()  # nothing in flight is left behind


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_fetched_folder_extracts(mirror, tmp_path):
    from safe_cache.extract import ExtractConfig, extract
    from safe_cache.store import open_store

    fetch(["dtd"], tmp_path, sources=mirror.sources)
    config = ExtractConfig(dataset="dtd", root=str(tmp_path), model="safe-cache-tiny-rn",
                           pretrained=None, store=str(tmp_path / "dtd.zarr"), shots=(1,),
                           seeds=(1,), views=1, workers=0)
    extract(config)
    store = open_store(str(tmp_path / "dtd.zarr"))
    assert store.split("test").sizes["image"] == len(open_dataset("dtd", tmp_path).splits["test"])


def test_second_fetch_does_nothing(mirror, tmp_path):
    fetch(["eurosat"], tmp_path, sources=mirror.sources)
    before = len(mirror.requests)
    [report] = fetch(["eurosat"], tmp_path, sources=mirror.sources)
    assert report.status == "present" and len(mirror.requests) == before


def test_wrong_checksum_is_refused_naming_the_file(mirror, tmp_path):
    bad = _sources_with(mirror, tmp_path, "dtd", md5="0" * 32)
    with pytest.raises(FetchError, match=r"dtd-r1\.0\.1\.tar\.gz: md5 [0-9a-f]{32} is not the"):
        fetch(["dtd"], tmp_path, sources=bad)
    assert not (tmp_path / "dtd").exists()  # the reader finds no dataset
    downloads = tmp_path / WORK_DIR / "dtd" / "downloads"
    assert not list(downloads.glob("dtd-r1.0.1.tar.gz*"))  # the bad file is gone
    [report] = fetch(["dtd"], tmp_path, sources=mirror.sources)  # a good copy then works
    assert report.status == "fetched"


def test_interrupted_download_resumes(mirror, tmp_path):
    archive = "oxford_pets/images.tar.gz"
    mirror.cut_once.add(archive)
    asked = len(mirror.asked(archive))
    with pytest.raises(FetchError, match=r"images\.tar\.gz: .*stopped at .* run the command"
                                         r" again|images\.tar\.gz: .*Run the command again"):
        fetch(["oxford_pets"], tmp_path, sources=mirror.sources)
    assert not (tmp_path / "oxford_pets" / "images").exists()
    [part] = (tmp_path / WORK_DIR / "oxford_pets" / "downloads").glob("images.tar.gz.*.part")
    have = part.stat().st_size
    assert 0 < have < len(mirror.files[archive])
    plan = plan_fetch(["oxford_pets"], tmp_path, sources=mirror.sources)[0]
    assert [(s.source.file, s.state) for s in plan.sources if s.state == "partial"] == \
        [("images.tar.gz", "partial")]
    [report] = fetch(["oxford_pets"], tmp_path, sources=mirror.sources)
    assert report.status == "fetched"
    assert mirror.asked(archive)[asked:] == [None, f"bytes={have}-"]  # continued, not restarted


@pytest.mark.slow
def test_ucf101_frames_are_the_videos_middle_frames(mirror, tmp_path):
    [report] = fetch(["ucf101"], tmp_path, sources=mirror.sources, workers=2)
    assert report.status == "fetched"
    dataset = open_dataset("ucf101", tmp_path)
    assert not (tmp_path / "ucf101" / "UCF-101").exists()  # the frames are the dataset
    for entries in dataset.splits.values():
        for entry in entries:
            grey = np.asarray(Image.open(dataset.image_path(entry))).mean()
            assert abs(grey - 20 * (UCF_FRAMES // 2)) < 8  # frame 4 of 9, not 3 or 5


def test_dry_run_lists_sources_and_disk_touching_nothing(mirror, tmp_path):
    plans = {p.spec.name: p for p in plan_fetch(["food101", "stanford_cars", "imagenet"],
                                                 tmp_path)}
    food = plans["food101"]
    assert food.status == "fetch" and [s.state for s in food.sources] == ["to download"] * 2
    assert food.sources[1].source.url.startswith("http://data.vision.ee.ethz.ch/")
    assert food.disk_bytes is not None and food.disk_bytes > 2 * 4e9
    assert plans["stanford_cars"].manual and "cars_train" in plans["stanford_cars"].manual
    assert plans["imagenet"].status == "manual" and not plans["imagenet"].sources
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(main, ["datasets", "fetch", "food101,imagenet", "--root",
                                       str(tmp_path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert [row["status"] for row in json.loads(result.stdout)] == ["fetch", "manual"]


def test_cli_fetch_then_present(mirror, tmp_path):
    args = ["datasets", "fetch", "caltech101", "--root", str(tmp_path), "--sources",
            str(mirror.sources), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)[0]["status"] == "fetched"
    again = CliRunner().invoke(main, args)
    assert json.loads(again.stdout)[0]["status"] == "present"


def test_unknown_dataset_lists_known_ones(tmp_path):
    with pytest.raises(DatasetError, match=r"Unknown dataset\(s\) food102\. Known: caltech101,"):
        fetch(["food102"], tmp_path)
    result = CliRunner().invoke(main, ["datasets", "fetch", "food102", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "Known:" in result.output


def test_unreachable_host_is_one_line(mirror, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nowhere = _sources_with(mirror, tmp_path, "eurosat",
                            url=f"http://127.0.0.1:{port}/EuroSAT.zip")
    with pytest.raises(FetchError, match=rf"EuroSAT\.zip: cannot reach 127\.0\.0\.1:{port}"):
        fetch(["eurosat"], tmp_path, sources=nowhere)
    assert not (tmp_path / "eurosat" / "2750").exists()


def test_manual_dataset_says_where_to_put_what(tmp_path):
    with pytest.raises(FetchError, match=r"imagenet: no public download; .*images/train/n\*/"):
        fetch(["imagenet"], tmp_path)


def test_stanford_cars_fetches_the_split_then_asks_for_the_images(mirror, tmp_path):
    mini = tmp_path / "mini"
    write_split_zhou(mini, "stanford_cars", classes=2)
    entry = mirror_dataset(mirror, "stanford_cars", mini)
    sources = write_sources(tmp_path / "sources.json", {"stanford_cars": entry})
    root = tmp_path / "data"
    with pytest.raises(FetchError, match=r"stanford_cars: .* not complete yet: .*images listed"
                                         r" by the split are missing.*cars_train/"):
        fetch(["stanford_cars"], root, sources=sources)
    assert (root / "stanford_cars" / "split_zhou_StanfordCars.json").is_file()
    for path in (mini / "stanford_cars").iterdir():  # the user puts the images in place
        if path.is_dir():
            path.rename(root / "stanford_cars" / path.name)
    asked = len(mirror.requests)
    [report] = fetch(["stanford_cars"], root, sources=sources)
    assert report.status == "present" and len(mirror.requests) == asked  # checked, not fetched
    assert not (root / WORK_DIR).exists()


def test_tar_member_leaving_the_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    path = tmp_path / "evil.tar"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(FetchError, match=r"evil\.tar: member '\.\./escaped\.txt' has a part"
                                         r" '\.\.' .* outside its folder"):
        unpack(path, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_and_tar_round_trip(tmp_path):
    for name in ("a.zip", "a.tar", "a.tar.gz"):
        path = tmp_path / name
        path.write_bytes(pack({"x/y.txt": b"yes"}, name))
        unpack(path, tmp_path / f"out-{name}")
        assert (tmp_path / f"out-{name}" / "x" / "y.txt").read_bytes() == b"yes"


def test_shipped_sources_are_consistent_with_the_layouts():
    """Every spec's sources provide its split file and its image folder, checksummed where the
    archive's checksum is published (torchvision's md5s)."""
    for spec in list_specs():
        targets = [t for s in spec.sources for t in s.targets]
        if spec.split_file and spec.sources:
            assert spec.split_file in targets, spec.name
        if spec.sources and spec.name != "stanford_cars":
            image_dir = spec.image_dir.split("/")[0]
            assert image_dir in targets or "." in targets or spec.build, spec.name
        if not spec.sources or spec.name == "stanford_cars":
            assert spec.manual, spec.name  # says where to put what
    known_md5 = {"dtd", "eurosat", "food101", "oxford_flowers", "oxford_pets", "caltech101",
                 "sun397"}
    for name in known_md5:
        archives = [s for s in load_spec(name).sources if s.unpack]
        assert archives and all(s.md5 and len(s.md5) == 32 for s in archives), name


def test_bad_sources_file_is_refused_before_any_download(tmp_path):
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"dtd": {"sources": [{"url": "ftp://x/y.tar", "to": "y"}]}}))
    with pytest.raises(DatasetError, match=r"sources file .*\[dtd\]: source url 'ftp://x/y.tar'"):
        fetch(["dtd"], tmp_path, sources=path)
    path.write_text(json.dumps({"dtd": {"sources": [{"url": "http://x/y.tar", "unpack": {
        "../up": "images"}}]}}))
    with pytest.raises(DatasetError, match=r"\[dtd\]: source http://x/y\.tar field 'unpack' has"
                                           r" an inner path '\.\./up'"):
        fetch(["dtd"], tmp_path, sources=path)


def test_full_disk_is_one_line_naming_the_file_and_resumes(mirror, tmp_path, monkeypatch):
    import errno

    import safe_cache.data.download as download

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", lambda *a, **k: FullDisk(), raising=False)
    result = CliRunner().invoke(main, ["datasets", "fetch", "eurosat", "--root", str(tmp_path),
                                       "--sources", str(mirror.sources)])
    assert result.exit_code == 2
    assert "No space left on device: " in result.output and ".part" in result.output
    assert "run the command again: it resumes" in result.output
    assert not (tmp_path / "eurosat" / "2750").exists()
    monkeypatch.undo()
    [report] = fetch(["eurosat"], tmp_path, sources=mirror.sources)
    assert report.status == "fetched"


def test_keep_archives_keeps_the_checked_downloads(mirror, tmp_path):
    fetch(["eurosat"], tmp_path, sources=mirror.sources, keep_archives=True)
    downloads = tmp_path / WORK_DIR / "eurosat" / "downloads"
    assert sorted(p.name for p in downloads.iterdir()) == [
        ".EuroSAT.zip.verified.json", ".split_zhou_EuroSAT.json.verified.json", "EuroSAT.zip",
        "split_zhou_EuroSAT.json"]
    record = json.loads((downloads / ".EuroSAT.zip.verified.json").read_text())
    assert record["verdict"] == "unpacked" and record["checksum"][0] == "md5"
    assert not (tmp_path / WORK_DIR / "eurosat" / "stage").exists()


def test_rar_without_a_rar_tool_says_which_to_install(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    archive = tmp_path / "UCF101.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x00")
    with pytest.raises(FetchError, match=r"UCF101\.rar is a RAR archive and no RAR tool is"
                                         r" installed \(unrar, bsdtar or 7z: e\.g\. `apt install"
                                         r" libarchive-tools`\)"):
        unpack(archive, tmp_path / "out")
