"""analysis/published/workbench.json: published accuracies of the workbench's methods, one block per
(method, backbone), each with its source. Checks the file's structure and, where a source prints
an 11-dataset average at a shot count for which all 11 datasets are entered, that the average is
the mean of the 11 entered numbers (within 0.06: one entry wrong by 1 point or more, a units or
tens digit, moves the mean by at least 0.09; a wrong decimal digit can pass)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from safe_cache.analysis.report import ELEVEN
from safe_cache.fit.methods import METHODS

PATH = (Path(__file__).resolve().parent.parent / "safe_cache" / "analysis" / "published"
        / "workbench.json")
DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
SHOTS = ("1", "2", "4", "8", "16")
BACKBONES = ("RN50", "ViT-B-16")  # open_clip's names
TOLERANCE = 0.06  # printed averages are the mean of 2-decimal numbers, rounded to 2 decimals
ARXIV = re.compile(r"^\d{4}\.\d{4,5}$")


def load() -> dict:
    return json.loads(PATH.read_text())


def blocks() -> list[tuple[str, str, dict]]:
    return [(method, backbone, block) for method, by_backbone in load()["methods"].items()
            for backbone, block in by_backbone.items()]


def block_id(entry: tuple[str, str, dict]) -> str:
    return f"{entry[0]}/{entry[1]}"


def test_top_level():
    doc = load()
    assert set(doc) == {"about", "methods"}
    assert isinstance(doc["about"], str) and doc["about"].strip()
    assert doc["methods"], "no method"
    assert set(DATASETS) == set(ELEVEN), "the 11 datasets drifted from report's"
    assert set(doc["methods"]) <= set(METHODS), "a method fit does not know"
    for method, by_backbone in doc["methods"].items():
        assert by_backbone and set(by_backbone) <= set(BACKBONES), method


def check_reference(ref: dict, where: str) -> None:
    """A document a number comes from: a URL or an arXiv id, and the table (or file) in it."""
    url, arxiv = ref.get("url"), ref.get("arxiv")
    assert url or arxiv, f"{where}: neither url nor arxiv"
    if url is not None:
        assert isinstance(url, str) and url.startswith("https://"), f"{where}: url {url!r}"
    if arxiv is not None:
        assert isinstance(arxiv, str) and ARXIV.match(arxiv), f"{where}: arxiv {arxiv!r}"
    table = ref.get("table")
    assert isinstance(table, str) and table.strip(), f"{where}: no table"


@pytest.mark.parametrize("entry", blocks(), ids=block_id)
def test_source(entry):
    method, backbone, block = entry
    where = f"{method}/{backbone}"
    assert set(block) == {"source", "numbers"}, where
    source = block["source"]
    assert set(source) <= {"paper", "arxiv", "table", "url", "protocol", "note", "also"}, where
    for key in ("paper", "protocol"):
        assert isinstance(source.get(key), str) and source[key].strip(), f"{where}: no {key}"
    assert ARXIV.match(source.get("arxiv", "")), f"{where}: the method's paper needs its arXiv id"
    check_reference(source, where)
    if "note" in source:
        assert isinstance(source["note"], str) and source["note"].strip(), where
    for i, also in enumerate(source.get("also", [])):
        assert set(also) <= {"what", "url", "arxiv", "table"}, f"{where}: also[{i}]"
        assert isinstance(also.get("what"), str) and also["what"].strip(), f"{where}: also[{i}]"
        check_reference(also, f"{where}: also[{i}]")


@pytest.mark.parametrize("entry", blocks(), ids=block_id)
def test_numbers(entry):
    method, backbone, block = entry
    numbers = block["numbers"]
    assert numbers, f"{method}/{backbone}: no numbers"
    assert set(numbers) <= {*DATASETS, "average"}, f"{method}/{backbone}: {set(numbers)}"
    for dataset, by_shots in numbers.items():
        assert by_shots and set(by_shots) <= set(SHOTS), f"{method}/{backbone}/{dataset}"
        for shots, value in by_shots.items():
            where = f"{method}/{backbone}/{dataset}/{shots}"
            assert type(value) is float, f"{where}: {value!r} is not a float"
            assert math.isfinite(value) and 0.0 < value <= 100.0, f"{where}: {value}"


def averaged(numbers: dict) -> list[str]:
    """The shot counts at which the source prints an average and all 11 datasets are entered."""
    return [s for s in numbers.get("average", {}) if all(s in numbers.get(d, {}) for d in DATASETS)]


@pytest.mark.parametrize("entry", blocks(), ids=block_id)
def test_printed_average_is_the_mean_of_the_eleven(entry):
    method, backbone, block = entry
    numbers = block["numbers"]
    for shots in averaged(numbers):
        mean = sum(numbers[d][shots] for d in DATASETS) / len(DATASETS)
        printed = numbers["average"][shots]
        assert abs(mean - printed) <= TOLERANCE, (
            f"{method}/{backbone} {shots}-shot: the 11 entered numbers average {mean:.3f},"
            f" the source prints {printed}")


def test_the_average_check_has_something_to_check():
    """The consistency check is not vacuous: some blocks hold all 11 datasets and an average."""
    checked = [(m, b) for m, b, block in blocks() if averaged(block["numbers"])]
    assert len(checked) >= 3, checked


def test_a_mistyped_digit_fails_the_average_check():
    """The tolerance is tight enough that one entry off by a whole point is caught."""
    method, backbone, block = next(e for e in blocks() if averaged(e[2]["numbers"]))
    numbers = json.loads(json.dumps(block["numbers"]))
    shots = averaged(numbers)[0]
    numbers["imagenet"][shots] += 1.0  # e.g. 63.82 typed as 64.82
    mean = sum(numbers[d][shots] for d in DATASETS) / len(DATASETS)
    assert abs(mean - numbers["average"][shots]) > TOLERANCE, (method, backbone)
