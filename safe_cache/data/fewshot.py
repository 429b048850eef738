"""The CoOp-compatible few-shot sampler.

Published few-shot CLIP numbers are comparable only on the same images. CoOp (through Dassl)
draws them as follows, and so does this module, so seeds 1-3 give the same subsets:

1. seed Python's `random` with the seed, one stream for the whole procedure;
2. train: group the split's entries by label, labels in order of FIRST APPEARANCE (not sorted);
   per label take `random.sample(group, K)`, or the whole group when it has fewer than K items
   (no repetition);
3. then val, from the same stream, with min(K, 4) shots.

The result lists indices into the split's entry lists, grouped by label in first-appearance
order and within a label in sampling order: the order CoOp's few-shot lists have.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SafeCacheWarning


@dataclass(frozen=True)
class FewShot:
    """Row indices of one (shots, seed) subset into the train and val entry lists."""

    shots: int
    seed: int
    train: list[int]
    val: list[int]


def _sample_per_label(
    labels: Sequence[int], shots: int, rng: random.Random, split: str,
    classnames: Sequence[str] | None,
) -> list[int]:
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)  # dicts keep first-appearance order
    chosen: list[int] = []
    for label in range(len(classnames or [])):
        if label not in groups:
            warnings.warn(f"{split}: class {label} '{classnames[label]}' has no images; it gets"
                          f" 0 of its {shots} shots.", SafeCacheWarning, stacklevel=3)
    for label, group in groups.items():
        if len(group) >= shots:
            chosen.extend(rng.sample(group, shots))
        else:
            name = f" '{classnames[label]}'" if classnames else ""
            warnings.warn(
                f"{split}: class {label}{name} has {len(group)} images, fewer than {shots}"
                f" shots; all of them are used (no repetition).",
                SafeCacheWarning, stacklevel=3,
            )
            chosen.extend(group)
    return chosen


def sample_few_shot(
    train_labels: Sequence[int],
    val_labels: Sequence[int],
    shots: int,
    seed: int,
    classnames: Sequence[str] | None = None,
) -> FewShot:
    """The CoOp few-shot subset for (shots, seed): a pure function of the labels, K and seed."""
    if shots < 1:
        raise ValueError("shots must be >= 1")
    rng = random.Random(seed)
    train = _sample_per_label(train_labels, shots, rng, "train", classnames)
    val = _sample_per_label(val_labels, min(shots, 4), rng, "val", classnames)
    return FewShot(shots, seed, train, val)
