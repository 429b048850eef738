"""Prompt sets and the zero-shot text classifier.

A prompt set turns class names into sentences: `hand` (the dataset's hand-engineered templates,
the default), `classname` (the bare class name), `vanilla` (`a photo of a {}.`), `pool`
(Cross-Modal Fine-tuning's 180 templates, template_pool.json with its source), `mined` (the 21
of the pool that mining picks, per run: fit/text.py; a store holds the pool's sentences for it),
or the path of a JSON file mapping each class name to its own sentences (CuPL's format). The
classifier row of a class is the L2-normalised mean of its L2-normalised sentence embeddings
(Tip-Adapter, SAFE).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DatasetError

BUILTIN_PROMPT_SETS = ("hand", "classname", "vanilla", "pool", "mined")
VANILLA_TEMPLATE = "a photo of a {}."
POOL_FILE = Path(__file__).with_name("template_pool.json")
# Sets a store holds under another set's name: `mined` is chosen from the pool's sentences at fit.
STORED_AS = {"mined": "pool"}


@cache
def template_pool() -> tuple[str, ...]:
    """Cross-Modal Fine-tuning's 180 templates, in the order template_pool.json gives."""
    templates = json.loads(POOL_FILE.read_text())["templates"]
    return tuple(str(t) for t in templates)


def class_sentences(
    prompt_set: str, classnames: Sequence[str], templates: Sequence[str]
) -> list[list[str]]:
    """The sentences of every class, in class order."""
    if prompt_set == "hand":
        return [[t.format(name) for t in templates] for name in classnames]
    if prompt_set == "classname":
        return [[name] for name in classnames]
    if prompt_set == "vanilla":
        return [[VANILLA_TEMPLATE.format(name)] for name in classnames]
    if prompt_set in ("pool", "mined"):
        return [[t.format(name) for t in template_pool()] for name in classnames]
    path = Path(prompt_set)
    if not path.is_file():
        raise DatasetError(f"Unknown prompt set '{prompt_set}': use one of "
                           f"{', '.join(BUILTIN_PROMPT_SETS)} or the path of a JSON file mapping"
                           f" class names to sentences (CuPL format).")
    return _sentences_from_file(path, classnames)


def _sentences_from_file(path: Path, classnames: Sequence[str]) -> list[list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        raise DatasetError(f"Prompt file {path} is not readable JSON: {exc!s:.200}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"Prompt file {path} must map class names to lists of sentences.")
    by_key = {_key(name): sentences for name, sentences in raw.items()}
    missing = [name for name in classnames if not by_key.get(_key(name))]
    if missing:
        raise DatasetError(f"Prompt file {path} has no sentences for {len(missing)} classes,"
                           f" e.g. {missing[:5]}.")
    return [[str(s) for s in by_key[_key(name)]] for name in classnames]


def _key(name: str) -> str:
    """Class-name matching that ignores case and '_' vs ' ' (CuPL files differ on both)."""
    return name.replace("_", " ").strip().lower()


def check_prompt_set_name(prompt_set: str, error: type[Exception] = DatasetError) -> None:
    """Refuse a prompt file named like a built-in set (`hand.json`, `mined.json`): a store names
    a file's set by its stem, so it would stand in for the built-in one (`mined.json` for the
    pool mined ones are chosen from)."""
    path = Path(prompt_set)
    if prompt_set not in BUILTIN_PROMPT_SETS and path.stem in BUILTIN_PROMPT_SETS:
        raise error(f"--prompts {prompt_set}: a prompt file may not be named like the built-in"
                    f" set '{path.stem}' (a store names a file's sentences by its stem);"
                    f" rename it, e.g. {path.with_stem('my-' + path.stem)}.")


def prompt_set_name(prompt_set: str) -> str:
    """The name a prompt set goes by in results and identities (a file by its stem)."""
    return prompt_set if prompt_set in BUILTIN_PROMPT_SETS else Path(prompt_set).stem


def stored_prompt_set(prompt_set: str) -> str:
    """The name of the set a store holds for a prompt set: its own name, or for `mined` the
    pool it is chosen from."""
    if prompt_set in STORED_AS:  # the built-in name itself: a file's stem never maps
        return STORED_AS[prompt_set]
    return prompt_set_name(prompt_set)


@torch.no_grad()
def encode_sentences(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(sentences, D) float32 raw text embeddings of every class's sentences, in order.

    All sentences are encoded in batches regardless of class boundaries; `progress` is called
    with the number of sentences done after each batch.
    """
    flat = [s for group in sentences for s in group]
    device = next(model.parameters()).device
    embeddings = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start:start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens).float())
        if progress is not None:
            progress(min(start + batch_size, len(flat)))
    return torch.cat(embeddings).cpu()


def class_average(embeddings: torch.Tensor, counts: Sequence[int],
                  average: str = "normalised") -> torch.Tensor:
    """(classes, D): each class's `counts[c]` consecutive sentence embeddings averaged, then
    normalised. "normalised" normalises each sentence first (Tip-Adapter, SAFE's templates);
    "raw" averages the raw embeddings (Cross-Modal Fine-tuning)."""
    if average not in ("normalised", "raw"):
        raise ValueError(f"average must be 'normalised' or 'raw', not {average!r}")
    if sum(counts) != len(embeddings):
        raise DatasetError(f"{len(embeddings)} sentence embeddings for {sum(counts)} sentences.")
    if average == "normalised":
        embeddings = F.normalize(embeddings, dim=-1)
    rows, start = [], 0
    for count in counts:
        rows.append(embeddings[start:start + count].mean(dim=0))
        start += count
    return F.normalize(torch.stack(rows), dim=-1)


def text_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    average: str = "normalised",
) -> torch.Tensor:
    """(classes, D) float32: per class, normalise each sentence embedding, average, normalise
    (or, average="raw", average the raw embeddings, then normalise)."""
    encoded = encode_sentences(model, tokenizer, sentences, batch_size=batch_size,
                               progress=progress)
    return class_average(encoded, [len(group) for group in sentences], average)
