"""Prompt sets and the zero-shot text classifier.

A prompt set turns class names into sentences: `hand` (the dataset's hand-engineered templates,
the default), `classname` (the bare class name), `vanilla` (`a photo of a {}.`), or the path of a
JSON file mapping each class name to its own sentences (CuPL's format). The classifier row of a
class is the L2-normalised mean of its L2-normalised sentence embeddings (Tip-Adapter, SAFE).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DatasetError

BUILTIN_PROMPT_SETS = ("hand", "classname", "vanilla")
VANILLA_TEMPLATE = "a photo of a {}."


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
    path = Path(prompt_set)
    if not path.is_file():
        raise DatasetError(f"Unknown prompt set '{prompt_set}': use one of "
                           f"{', '.join(BUILTIN_PROMPT_SETS)} or the path of a JSON file mapping"
                           f" class names to sentences (CuPL format).")
    return _sentences_from_file(path, classnames)


def _sentences_from_file(path: Path, classnames: Sequence[str]) -> list[list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"Prompt file {path} is not readable JSON: {exc}") from exc
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


def prompt_set_name(prompt_set: str) -> str:
    """The name a store uses for a prompt set (a file is named by its stem)."""
    return prompt_set if prompt_set in BUILTIN_PROMPT_SETS else Path(prompt_set).stem


@torch.no_grad()
def text_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    sentences: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(classes, D) float32: per class, normalise each sentence embedding, average, normalise.

    All sentences are encoded in batches regardless of class boundaries; `progress` is called
    with the number of sentences done after each batch.
    """
    flat = [s for group in sentences for s in group]
    device = next(model.parameters()).device
    embeddings = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start:start + batch_size]).to(device)
        embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        if progress is not None:
            progress(min(start + batch_size, len(flat)))
    encoded = torch.cat(embeddings)
    rows, start = [], 0
    for group in sentences:
        rows.append(encoded[start:start + len(group)].mean(dim=0))
        start += len(group)
    return F.normalize(torch.stack(rows), dim=-1).cpu()
