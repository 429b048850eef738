"""PartImageNet's annotations -> shapley's parts folder (analysis/partimagenet.py): polygons and
RLE rasterised pixel-exactly, PNG masks renumbered, classes from the synsets, bad input named."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from safe_cache.analysis.partimagenet import PARTS, convert, decode_rle, rasterise, rle_counts
from safe_cache.cli import main
from safe_cache.errors import ConfigError

WNIDS = [f"n0{i:07d}" for i in range(6)]  # tests/miniatures.py's ImageNet


def rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString: each run minus the run two before (from the third on), in
    5-bit groups, low first, 0x20 for more to come, offset by 48."""
    out = []
    for index, run in enumerate(counts):
        value = run - counts[index - 2] if index > 2 else run
        more = True
        while more:
            char, value = value & 0x1F, value >> 5
            more = value != -1 if char & 0x10 else value != 0
            out.append(chr(char + 48 + (0x20 if more else 0)))
    return "".join(out)


def runs_of(mask: np.ndarray) -> list[int]:
    """COCO's runs of a bool mask: column-major, starting with a run of 0."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_polygons_cover_the_pixels_whose_centers_they_hold():
    rectangle = rasterise([1, 1, 4, 1, 4, 3, 1, 3], 5, 6)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True
    assert (rectangle == expected).all()
    triangle = rasterise([20, 0, 36.5, 0, 20, 16.5], 40, 48)  # no center on its long edge
    ys, xs = np.mgrid[:40, :48]
    assert (triangle == ((xs >= 20) & (xs + ys <= 35))).all()
    clockwise = rasterise([20, 0, 20, 16.5, 36.5, 0], 40, 48)
    assert (clockwise == triangle).all()
    ring = rasterise([0, 0, 8, 0, 8, 8, 0, 8, 0, 0, 2, 2, 2, 6, 6, 6, 6, 2, 2, 2], 8, 8)
    assert ring.sum() == 64 - 16 and not ring[2:6, 2:6].any()  # even-odd: a hole


def test_both_rle_forms_decode_to_their_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9)) < 0.4
    mask[0, 0] = True  # the first run of 0 is empty
    runs = runs_of(mask)
    assert runs[0] == 0 and sum(runs) == 63
    assert rle_counts(rle_string(runs)) == runs
    for counts in (runs, rle_string(runs)):
        assert (decode_rle({"counts": counts, "size": [7, 9]}, 7, 9) == mask).all()
    long = [3000, 70000, 1, 2, 40000]  # runs of many groups, and negative differences
    assert rle_counts(rle_string(long)) == long


def head_and_body(image_id: int = 1) -> list[dict]:
    """Fish Head a rectangle (polygon), Fish Body a triangle over part of it (later: wins),
    Fish Fin as RLE, Fish Tail as compressed RLE; the image is 48 x 40."""
    fin = np.zeros((40, 48), dtype=bool)
    fin[30:35, 40:44] = True
    tail = np.zeros((40, 48), dtype=bool)
    tail[36:, :5] = True
    return [
        {"id": 10, "image_id": image_id, "category_id": 9, "iscrowd": 0,
         "segmentation": [[0, 0, 24, 0, 24, 20, 0, 20]], "area": 480, "bbox": [0, 0, 24, 20]},
        {"id": 11, "image_id": image_id, "category_id": 10, "iscrowd": 0,
         "segmentation": [[20, 0, 36.5, 0, 20, 16.5]], "area": 130, "bbox": [20, 0, 16, 16]},
        {"id": 12, "image_id": image_id, "category_id": 11, "iscrowd": 1,
         "segmentation": {"counts": runs_of(fin), "size": [40, 48]}},
        {"id": 13, "image_id": image_id, "category_id": 12, "iscrowd": 1,
         "segmentation": {"counts": rle_string(runs_of(tail)), "size": [40, 48]}}]


def annotation_file(tmp_path, images=None, annotations=None):
    """A split's JSON as PartImageNet ships it: every category, ids 0..39, supercategories."""
    data = {
        "info": {"description": "PartImageNet"}, "licenses": [],
        "images": images or [{"id": 1, "file_name": f"{WNIDS[1]}_0.JPEG", "width": 48,
                              "height": 40},
                             {"id": 2, "file_name": f"{WNIDS[4]}_1.JPEG", "width": 48,
                              "height": 40}],
        "annotations": head_and_body() if annotations is None else annotations,
        "categories": [{"id": i, "name": name, "supercategory": name.split()[0]}
                       for i, name in enumerate(PARTS)]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return path


def classnames(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("".join(f"{w} class {i}\n" for i, w in enumerate(WNIDS)))
    return path


def expected_mask() -> np.ndarray:
    ys, xs = np.mgrid[:40, :48]
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[:20, :24] = PARTS.index("Fish Head") + 1
    mask[(xs >= 20) & (xs + ys <= 35)] = PARTS.index("Fish Body") + 1
    mask[30:35, 40:44] = PARTS.index("Fish Fin") + 1
    mask[36:, :5] = PARTS.index("Fish Tail") + 1
    return mask


def test_a_json_split_becomes_a_parts_folder(tmp_path):
    out = tmp_path / "parts"
    record = convert(annotation_file(tmp_path), out, classnames(tmp_path))
    names = json.loads((out / "parts.json").read_text())["names"]
    assert names == list(PARTS) and len(names) == 40 and names[9] == "Fish Head"
    first, second = record["images"]
    assert first == {"file_name": f"{WNIDS[1]}_0.JPEG", "synset": WNIDS[1], "label": 1,
                     "path": f"train/{WNIDS[1]}/{WNIDS[1]}_0.JPEG",
                     "parts": ["Fish Head", "Fish Body", "Fish Fin", "Fish Tail"]}
    mask = np.asarray(Image.open(out / "train" / WNIDS[1] / f"{WNIDS[1]}_0.png"))
    assert mask.dtype == np.uint8 and (mask == expected_mask()).all()
    assert second["label"] == 4 and second["parts"] == []  # listed, nothing annotated
    assert not np.asarray(Image.open(out / second["path"].replace(".JPEG", ".png"))).any()


def test_segmentation_pngs_become_a_parts_folder(tmp_path):
    folder = tmp_path / "annotations" / "test"
    folder.mkdir(parents=True)
    raw = np.full((40, 48), 40, dtype=np.uint8)  # 40: background
    raw[:10, :10], raw[20:, 30:] = 0, 3  # Quadruped Head, Quadruped Tail
    Image.fromarray(raw).save(folder / f"{WNIDS[2]}_7.png")
    record = convert(folder, tmp_path / "parts", classnames(tmp_path))
    (entry,) = record["images"]
    assert entry["label"] == 2 and entry["parts"] == ["Quadruped Head", "Quadruped Tail"]
    mask = np.asarray(Image.open(tmp_path / "parts" / "train" / WNIDS[2] / f"{WNIDS[2]}_7.png"))
    assert (mask == np.where(raw == 40, 0, raw + 1)).all()
    whole = np.full((40, 48), 158, dtype=np.uint8)  # a *_whole folder's classes
    Image.fromarray(whole).save(folder / f"{WNIDS[2]}_7.png")
    with pytest.raises(ConfigError, match=r"category ids 0\.\.39 and 40 for the background"):
        convert(folder, tmp_path / "p2", classnames(tmp_path))


def test_bad_input_is_named_with_its_fix(tmp_path):
    names = classnames(tmp_path)
    with pytest.raises(ConfigError, match=r"No PartImageNet annotations at .*nothere\.json"):
        convert(tmp_path / "nothere.json", tmp_path / "p", names)
    shape = tmp_path / "list.json"
    shape.write_text(json.dumps([{"file_name": "x"}]))
    with pytest.raises(ConfigError, match=r"no 'images' list.*annotations/<split>/<split>\.json"):
        convert(shape, tmp_path / "p", names)
    beyond = [{**head_and_body()[0], "segmentation": [[0, 0, 60, 0, 60, 20, 0, 20]]}]
    with pytest.raises(ConfigError, match=r"annotation 10 of image n00000001_0\.JPEG: a polygon"
                                          r" reaches \(0\.\.60.*beyond the image's 48 x 40"):
        convert(annotation_file(tmp_path, annotations=beyond), tmp_path / "p", names)
    stray = [{"id": 1, "file_name": "n09999999_1.JPEG", "width": 48, "height": 40}]
    with pytest.raises(ConfigError, match=r"synset n09999999 is not in .*classnames\.txt"):
        convert(annotation_file(tmp_path, images=stray, annotations=[]), tmp_path / "p", names)
    unnamed = [{"id": 1, "file_name": "fish.JPEG", "width": 48, "height": 40}]
    with pytest.raises(ConfigError, match="starts with its ImageNet synset"):
        convert(annotation_file(tmp_path, images=unnamed, annotations=[]), tmp_path / "p", names)
    with pytest.raises(ConfigError, match="--classnames"):
        convert(annotation_file(tmp_path), tmp_path / "p", tmp_path / "none.txt")
    run = CliRunner().invoke(main, ["parts", "partimagenet", "--annotations",
                                    str(annotation_file(tmp_path)), "--out", str(tmp_path / "q"),
                                    "--root", str(tmp_path / "empty")])
    assert run.exit_code != 0 and "--classnames" in " ".join(run.output.split())


def cli(annotations, out, names, *extra):
    """`safe-cache parts partimagenet`, its message on one line."""
    run = CliRunner().invoke(main, ["parts", "partimagenet", "--annotations", str(annotations),
                                    "--out", str(out), "--classnames", str(names), *extra])
    return run.exit_code, " ".join(run.output.split())


def fish(file_name: str = f"{WNIDS[1]}_0.JPEG", image_id: int = 1, **fields) -> dict:
    return {"id": image_id, "file_name": file_name, "width": 48, "height": 40, **fields}


def square(image_id: int = 1, coordinates=(1, 1, 8, 1, 8, 8, 1, 8), annotation_id: int = 10):
    return {"id": annotation_id, "image_id": image_id, "category_id": 9,
            "segmentation": [list(coordinates)]}


@pytest.mark.parametrize(("image", "message"), [
    (fish(width=True), r"image 1 \('n00000001_0\.JPEG'\): its width True is not a whole number"
                       r" of pixels from 1 to 20,000 .* Fix the record's width and height"),
    (fish(height=-5), r"its height -5 is not a whole number of pixels from 1 to 20,000"),
    (fish(width=0), r"its width 0 is not a whole number"),
    (fish(width=10**6, height=10**6), r"its height 1000000 is not a whole number of pixels from"
                                      r" 1 to 20,000 \(the most a side may have here\)"),
    (fish(f"{WNIDS[1]}_0\x00.JPEG"), r"image 1 .*: its file_name cannot name a mask file: it"
                                     r" holds a control character \(a NUL byte"),
    (fish(f"{WNIDS[1]}_{'a' * 300}.JPEG"), r"its mask's name would be longer than the 255 bytes"),
])
def test_a_malformed_image_record_is_one_error_naming_it(tmp_path, image, message):
    """Booleans, negative, zero or huge sizes and unusable file names: one error, no traceback,
    nothing written (before: TypeError, ValueError, numpy's MemoryError)."""
    path = annotation_file(tmp_path, images=[image], annotations=[])
    code, output = cli(path, tmp_path / "parts", classnames(tmp_path))
    assert code == 2 and re.search(message, output), output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classnames.txt", "train.json"]


def test_json_nested_too_deeply_is_one_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code, output = cli(path, tmp_path / "parts", classnames(tmp_path))
    assert code == 2 and "deep.json is not a readable JSON file (it is nested too deeply)" in \
        output, output
    assert not (tmp_path / "parts").exists()


@pytest.mark.parametrize(("bad", "shown"), [("NaN", "nan"), ("null", "None"), ('"1"', "'1'"),
                                            ("Infinity", "inf")])
def test_coordinates_that_are_no_finite_number_are_refused(tmp_path, bad, shown):
    """NaN passed the range check and null or text were cast silently; now each is named."""
    path = annotation_file(tmp_path, images=[fish()], annotations=[square()])
    path.write_text(path.read_text().replace("[1, 1, 8, 1,", f"[{bad}, 1, 8, 1,"))
    with pytest.raises(ConfigError, match=rf"annotation 10 of image n00000001_0\.JPEG: a polygon"
                                          rf" holds the coordinate {re.escape(shown)}: each x and"
                                          rf" y is a finite number"):
        convert(path, tmp_path / "parts", classnames(tmp_path))
    assert not (tmp_path / "parts").exists()


def test_repeated_ids_and_file_names_are_refused(tmp_path):
    names = classnames(tmp_path)
    two = [fish(), fish(f"{WNIDS[1]}_1.JPEG")]  # both id 1
    with pytest.raises(ConfigError, match=r"two images have the id 1 \('n00000001_0\.JPEG' and"
                                          r" 'n00000001_1\.JPEG'\)"):
        convert(annotation_file(tmp_path, images=two, annotations=[]), tmp_path / "p", names)
    same = [fish(), fish(f"elsewhere/{WNIDS[1]}_0.JPEG", image_id=2)]  # one mask file
    with pytest.raises(ConfigError, match=r"images 1 and 2 are both 'n00000001_0\.JPEG': one mask"
                                          r" file each"):
        convert(annotation_file(tmp_path, images=same, annotations=[]), tmp_path / "p", names)
    path = annotation_file(tmp_path, images=[fish()], annotations=[square()])
    data = json.loads(path.read_text())
    data["categories"].append({"id": 9, "name": "Fish Tail", "supercategory": "Fish"})
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"two categories have the id 9 \('Fish Head' and"
                                          r" 'Fish Tail'\)"):
        convert(path, tmp_path / "p", names)
    data["categories"][-1]["id"] = True  # JSON's true is no id (it equalled 1)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"each record needs 'id'"):
        convert(path, tmp_path / "p", names)
    assert not (tmp_path / "p").exists()


def folder_files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_the_parts_folder_is_written_whole_or_not_at_all(tmp_path):
    """A failure in a later image leaves no folder (before: the earlier masks without
    parts.json) and an old parts folder as it was (before: new masks beside the old
    parts.json); a replacement leaves no stale mask; other folders are never replaced."""
    names, out = classnames(tmp_path), tmp_path / "parts"
    good = annotation_file(tmp_path, images=[fish(), fish(f"{WNIDS[2]}_5.JPEG", 2)],
                           annotations=[square(1), square(2, annotation_id=11)])
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps({**json.loads(good.read_text()), "images": [
        fish(), fish(f"{WNIDS[3]}_1.JPEG", 2), fish("n09999999_3.JPEG", 3)]}))
    code, output = cli(bad_path, out, names)  # the third image's synset is unknown
    assert code == 2 and "synset n09999999 is not in" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "classnames.txt",
                                                           "train.json"]  # no staging left

    assert cli(good, out, names)[0] == 0
    before = folder_files(out)
    assert sorted(before) == ["parts.json", f"train/{WNIDS[1]}/{WNIDS[1]}_0.png",
                              f"train/{WNIDS[2]}/{WNIDS[2]}_5.png"]
    code, output = cli(good, out, names)  # no --force: refused, not mixed
    assert code == 2 and "already holds a parts folder" in output and "--force" in output
    code, output = cli(bad_path, out, names, "--force")
    assert code == 2 and "synset n09999999" in output and folder_files(out) == before

    one = tmp_path / "one.json"
    one.write_text(json.dumps({**json.loads(good.read_text()), "images": [
        fish(f"{WNIDS[3]}_1.JPEG", 2)], "annotations": [square(2)]}))
    assert cli(one, out, names, "--force")[0] == 0  # replaced whole: no stale mask
    assert sorted(folder_files(out)) == ["parts.json", f"train/{WNIDS[3]}/{WNIDS[3]}_1.png"]
    assert [e["file_name"] for e in json.loads((out / "parts.json").read_text())["images"]] \
        == [f"{WNIDS[3]}_1.JPEG"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.json", "classnames.txt", "one.json", "parts", "train.json"]

    other = tmp_path / "other"
    (other / "keep").mkdir(parents=True)
    (other / "keep" / "precious.txt").write_text("data")
    for extra in ((), ("--force",)):
        code, output = cli(good, other, names, *extra)
        assert code == 2 and "is not a parts folder (no parts.json): --force replaces parts" \
            " folders only" in output, output
        assert folder_files(other) == {"keep/precious.txt": b"data"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(good, empty, names)[0] == 0 and (empty / "parts.json").is_file()
    code, output = cli(good, ".", names, "--force")
    assert code == 2 and "is not a folder of its own" in output


def test_store_paths_that_leave_the_folder_are_refused(tmp_path):
    from safe_cache.analysis.partimagenet import _mask_path

    for path in ("/tmp/x/n00000001_0.JPEG", "../n00000001_0.JPEG", "a/../../b.JPEG"):
        with pytest.raises(ConfigError, match="no path inside a parts folder"):
            _mask_path({"file_name": "n00000001_0.JPEG", "path": path}, "store.zarr")
    assert str(_mask_path({"file_name": "x", "path": "train/a/b.JPEG"}, "s")) == "train/a/b.png"


def test_an_unreadable_segmentation_png_is_named(tmp_path):
    folder = tmp_path / "annotations" / "test"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 48), 40, dtype=np.uint8)).save(folder / f"{WNIDS[2]}_7.png")
    (folder / f"{WNIDS[2]}_8.png").write_bytes(b"not a png")
    code, output = cli(folder, tmp_path / "parts", classnames(tmp_path))
    assert code == 2 and re.search(r"n00000002_8\.png is not a readable PNG"
                                   r" \(UnidentifiedImageError", output), output
    assert not (tmp_path / "parts").exists()
