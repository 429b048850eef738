"""The few-shot sampler reproduces CoOp/Dassl's procedure exactly."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from safe_cache import SafeCacheWarning
from safe_cache.data.fewshot import sample_few_shot


class Datum:
    """Dassl's data item: what its sampler sees (identity matters, not the index)."""

    def __init__(self, impath: str, label: int) -> None:
        self.impath, self.label = impath, label


def dassl_fewshot(train: list[Datum], val: list[Datum], shots: int, seed: int):
    """Dassl's generate_fewshot_dataset as CoOp calls it: the global `random` seeded once
    (set_random_seed), train with K shots, then val with min(K, 4), repeat=False."""
    random.seed(seed)
    output = []
    for source, k in ((train, shots), (val, min(shots, 4))):
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        dataset = []
        for _, items in tracker.items():
            dataset.extend(random.sample(items, k) if len(items) >= k else items)
        output.append(dataset)
    return output


def make_split(n_classes: int, per_class: int, seed: int, prefix: str) -> list[Datum]:
    items = [Datum(f"{prefix}/{c}/{i}.jpg", c) for c in range(n_classes) for i in range(per_class)]
    random.Random(seed).shuffle(items)  # not grouped by label: first appearance != sorted
    return items


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_dassl(shots, seed):
    train = make_split(7, 20, seed=10, prefix="train")
    val = make_split(7, 9, seed=11, prefix="val")
    ours = sample_few_shot([d.label for d in train], [d.label for d in val], shots, seed)
    expected_train, expected_val = dassl_fewshot(train, val, shots, seed)
    assert [train[i] for i in ours.train] == expected_train
    assert [val[i] for i in ours.val] == expected_val
    assert len(ours.train) == 7 * shots and len(ours.val) == 7 * min(shots, 4)


def test_first_appearance_order_matters():
    train = make_split(5, 10, seed=3, prefix="t")
    labels = [d.label for d in train]
    assert sorted(dict.fromkeys(labels)) != list(dict.fromkeys(labels))  # the case under test
    ours = sample_few_shot(labels, labels, 2, seed=1)
    # a sampler that visits labels in sorted order draws different images
    random.seed(1)
    groups = defaultdict(list)
    for index, label in enumerate(labels):
        groups[label].append(index)
    sorted_order = [i for label in sorted(groups) for i in random.sample(groups[label], 2)]
    assert ours.train != sorted_order
    assert [labels[i] for i in ours.train] == [lab for lab in dict.fromkeys(labels)
                                               for _ in range(2)]


def test_val_is_drawn_after_train_from_one_stream():
    train = make_split(3, 10, seed=5, prefix="t")
    labels = [d.label for d in train]
    both = sample_few_shot(labels, labels, 4, seed=2)
    val_alone = sample_few_shot([], labels, 4, seed=2).val
    assert both.val != val_alone


def test_short_classes_take_everything_without_repetition():
    labels = [0] * 10 + [1] * 2 + [2] * 10
    with pytest.warns(SafeCacheWarning, match="class 1 'ship' has 2 images"):
        result = sample_few_shot(labels, labels, 4, seed=1, classnames=["car", "ship", "bus"])
    chosen = [labels[i] for i in result.train]
    assert chosen.count(1) == 2 and len(set(result.train)) == len(result.train)


def test_pure_function_of_inputs():
    labels = [i % 4 for i in range(40)]
    state = random.getstate()
    first = sample_few_shot(labels, labels, 8, seed=3)
    assert random.getstate() == state  # the global stream is untouched
    assert sample_few_shot(labels, labels, 8, seed=3) == first
    assert sample_few_shot(labels, labels, 8, seed=4) != first
