"""Every dataset layout reads from its miniature; specs, errors, generated splits, user datasets."""

from __future__ import annotations

import json

import pytest
from miniatures import (
    IMAGENET_NAMES,
    SPLIT_COUNTS,
    WNIDS,
    classnames_for,
    write_every_layout,
    write_imagenet,
    write_split_zhou,
)

from safe_cache import DatasetError, SafeCacheWarning
from safe_cache.data.datasets import dataset_status, list_specs, load_spec, open_dataset

SPLIT_ZHOU = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
              "sun397", "dtd", "eurosat", "ucf101"]
ALL = [*SPLIT_ZHOU, "fgvc_aircraft", "imagenet", "imagenet_v2", "imagenet_sketch",
       "imagenet_a", "imagenet_r"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_every_layout(root)
    return root


def test_every_benchmark_has_a_spec_with_real_class_counts():
    specs = {spec.name: spec for spec in list_specs()}
    assert set(specs) == set(ALL)
    expected = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
                "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397,
                "dtd": 47, "eurosat": 10, "ucf101": 101, "imagenet_a": 200, "imagenet_r": 200}
    for name, classes in expected.items():
        assert specs[name].num_classes == classes, name
    assert specs["food101"].split_sizes == {"train": 50500, "val": 20200, "test": 30300}
    assert specs["food101"].templates == ("a photo of {}, a type of food.",)
    assert len(specs["imagenet"].templates) == 7
    assert specs["oxford_flowers"].tip_adapter["search_scale"] == [50, 50]
    assert specs["food101"].tip_adapter["init_alpha"] == 1.17


@pytest.mark.parametrize("name", ALL)
def test_every_layout_reads(data_root, name):
    dataset = open_dataset(name, data_root)
    for entries in dataset.splits.values():
        assert entries
        for entry in entries:
            assert dataset.image_path(entry).is_file(), entry
            assert 0 <= entry.label < len(dataset.classnames)
    card = dataset.describe()
    assert json.loads(json.dumps(card)) == card
    assert card["num_classes"] == len(dataset.classnames)


@pytest.mark.parametrize("name", SPLIT_ZHOU)
def test_split_zhou_keeps_file_order_and_cleans_classnames(data_root, name):
    dataset = open_dataset(name, data_root)
    raw = json.loads((data_root / dataset.spec.folder / dataset.spec.split_file).read_text())
    assert [e.path for e in dataset.splits["train"]] == [item[0] for item in raw["train"]]
    assert dataset.classnames == [c.replace("_", " ") for c in classnames_for(name, 4)]
    assert {len(dataset.splits[s]) for s in SPLIT_COUNTS} == {4 * n for n in SPLIT_COUNTS.values()}
    assert len(dataset.describe()["split_sha256"]) == 64


def test_fgvc_variants_with_spaces(data_root):
    dataset = open_dataset("fgvc_aircraft", data_root)
    assert dataset.classnames == ["Boeing 707-200", "Boeing 717-200", "Boeing 727-200"]
    assert len(dataset.splits["train"]) == 3 * SPLIT_COUNTS["train"]
    assert all(e.path.endswith(".jpg") for e in dataset.splits["test"])


def test_imagenet_val_comes_from_train_images(data_root):
    """Few-shot val is drawn from ImageNet's TRAIN images (split_ImageNet.json); test is the
    official val set, so nothing is ever selected on test."""
    dataset = open_dataset("imagenet", data_root)
    assert dataset.classnames == IMAGENET_NAMES
    assert all(e.path.startswith("train/") for e in dataset.splits["val"])
    assert all(e.path.startswith("val/") for e in dataset.splits["test"])
    assert not {e.path for e in dataset.splits["val"]} & {e.path for e in dataset.splits["train"]}
    assert len(dataset.splits["train"]) == 4 * len(WNIDS)
    assert len(dataset.splits["val"]) == len(WNIDS)
    assert dataset.split_source.name == "split_ImageNet.json" and not dataset.generated_split


def test_imagenet_without_its_split_file(tmp_path):
    write_imagenet(tmp_path, split_file=False)
    with pytest.raises(DatasetError, match=r"split_ImageNet\.json.*--make-split"):
        open_dataset("imagenet", tmp_path)
    with pytest.warns(SafeCacheWarning, match="not comparable"):
        dataset = open_dataset("imagenet", tmp_path, make_split=True)
    assert dataset.generated_split and dataset.describe()["generated_split"]
    train = {e.path for e in dataset.splits["train"]}
    val = {e.path for e in dataset.splits["val"]}
    assert all(p.startswith("train/") for p in train | val) and not train & val
    assert len(val) == len(WNIDS)  # round(5 * 0.2) = 1 per class
    assert all(e.path.startswith("val/") for e in dataset.splits["test"])


def test_imagenet_v2_numbered_folders(data_root):
    dataset = open_dataset("imagenet_v2", data_root)
    assert [e.label for e in dataset.splits["test"]] == list(range(len(WNIDS)))
    assert dataset.classnames == IMAGENET_NAMES


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_subsets_map_to_imagenet_rows(data_root, name):
    dataset = open_dataset(name, data_root)
    # sorted folder names -> labels; class_subset -> rows of the 1000-class classifier
    assert dataset.class_subset == [1, 2, 4]
    assert dataset.classnames == [IMAGENET_NAMES[i] for i in (1, 2, 4)]
    assert {e.label for e in dataset.splits["test"]} == {0, 1, 2}
    assert set(dataset.splits) == {"test"}


def test_path_escaping_the_image_folder_is_refused(tmp_path):
    split = write_split_zhou(tmp_path, "dtd")
    split["test"][0][0] = "../../etc/passwd"
    spec = load_spec("dtd")
    (tmp_path / spec.folder / spec.split_file).write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="leaves the image folder"):
        open_dataset("dtd", tmp_path)


def test_missing_split_file_names_path_and_source(tmp_path):
    spec = load_spec("eurosat")
    (tmp_path / spec.folder / spec.image_dir).mkdir(parents=True)
    with pytest.raises(DatasetError) as error:
        open_dataset("eurosat", tmp_path)
    message = str(error.value)
    assert str(tmp_path / spec.folder / spec.split_file) in message
    assert "CoOp" in message and "--make-split" in message


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(DatasetError, match=r"no folder .*food-101.*--root DIR"):
        open_dataset("food101", tmp_path)


def test_make_split_writes_a_seeded_split_and_warns(tmp_path):
    write_split_zhou(tmp_path, "eurosat", classes=3)
    spec = load_spec("eurosat")
    (tmp_path / spec.folder / spec.split_file).unlink()
    with pytest.warns(SafeCacheWarning, match="not comparable"):
        dataset = open_dataset("eurosat", tmp_path, make_split=True)
    assert dataset.generated_split and dataset.describe()["generated_split"]
    per_class = sum(SPLIT_COUNTS.values())
    assert len(dataset.splits["train"]) == 3 * round(per_class * 0.5)
    assert len(dataset.splits["val"]) == 3 * round(per_class * 0.2)
    assert dataset_status(spec, tmp_path) == "generated split"
    first = [e.path for e in dataset.splits["train"]]
    (tmp_path / spec.folder / "split_generated_eurosat.json").unlink()
    with pytest.warns(SafeCacheWarning):
        again = open_dataset("eurosat", tmp_path, make_split=True)
    assert [e.path for e in again.splits["train"]] == first  # seeded


def test_user_imagefolder_spec(tmp_path):
    spec_path = tmp_path / "shapes.json"
    spec_path.write_text(json.dumps({"name": "shapes", "kind": "imagefolder", "folder": "shapes",
                                     "image_dir": "images", "templates": ["a {} shape."]}))
    for name in ("circle", "square_box"):
        for i in range(10):
            from miniatures import _jpeg

            _jpeg(tmp_path / "shapes" / "images" / name / f"{i}.png", i)
    dataset = open_dataset(str(spec_path), tmp_path)
    assert dataset.classnames == ["circle", "square box"]
    assert len(dataset.splits["train"]) == 10 and len(dataset.splits["test"]) == 6


def test_user_csv_spec(tmp_path):
    from miniatures import _jpeg

    folder = tmp_path / "mine"
    for i in range(4):
        _jpeg(folder / "img" / f"{i}.jpg", i)
    for part in ("train", "val", "test"):
        (folder / f"{part}.csv").write_text("path,label\n0.jpg,dog\n1.jpg,cat\n2.jpg,dog\n")
    spec_path = tmp_path / "mine.json"
    spec_path.write_text(json.dumps({
        "name": "mine", "kind": "imagefolder", "folder": "mine", "image_dir": "img",
        "csv": {"train": "train.csv", "val": "val.csv", "test": "test.csv"}}))
    dataset = open_dataset(str(spec_path), tmp_path)
    assert dataset.classnames == ["cat", "dog"]
    assert [e.label for e in dataset.splits["train"]] == [1, 0, 1]


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"Unknown dataset 'nope'.*food101"):
        load_spec("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "kind": "mystery", "folder": "x"}))
    with pytest.raises(DatasetError, match="unknown kind 'mystery'"):
        load_spec(str(bad))
    bad.write_text(json.dumps({"name": "x", "kind": "imagefolder", "folder": "x", "colour": 1}))
    with pytest.raises(DatasetError, match="unknown fields"):
        load_spec(str(bad))


def test_status_for_the_table(data_root, tmp_path):
    assert dataset_status(load_spec("food101"), data_root) == "present"
    assert dataset_status(load_spec("food101"), tmp_path) == "missing"
    assert dataset_status(load_spec("food101"), None) == "-"
