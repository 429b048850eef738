"""Stage 1: run the frozen trunk once per image and write the dense maps to a store.

`extract` opens (or creates) the store under its writer lease, reserves rows for the images not
yet in it, runs the pipeline (pipeline.py) in this process or its tasks on dask workers
(tasks.py), and then writes what the store needs besides the maps: the few-shot rows, the
text classifier and the original head. Everything is resumable: run it again to finish it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.datasets import Dataset, open_dataset
from ..data.fewshot import FewShot, sample_few_shot
from ..data.prompts import class_average, class_sentences, encode_sentences, stored_prompt_set
from ..data.views import ViewRecipe
from ..errors import ExtractError, SafeCacheError, StoreNotFoundError
from ..model.backbone import Backbone, load_backbone
from ..names import plain_name
from ..runtime.device import resolve_device
from ..runtime.execution import IN_PROCESS, Execution
from ..runtime.progress import ProgressSink, null_progress
from ..store import FeatureStore, check_fingerprint, create_store, default_store_url, open_store
from .config import ExtractConfig, ExtractReport
from .pipeline import plan_split, row_index
from .tasks import extract_plans


def few_shot_subsets(dataset: Dataset, shots, seeds) -> dict[tuple[int, int], FewShot]:
    if "train" not in dataset.splits:
        return {}
    train = [e.label for e in dataset.splits["train"]]
    val = [e.label for e in dataset.splits["val"]]
    return {(seed, k): sample_few_shot(train, val, k, seed, dataset.classnames)
            for seed in seeds for k in shots}


def wanted_entries(dataset: Dataset, subsets: dict[tuple[int, int], FewShot],
                   full_val: bool = False) -> dict:
    """Entry indices to extract per split: all of test, the few-shot union of train and val
    (`full_val`: all of val)."""
    wanted = {"test": list(range(len(dataset.splits["test"])))}
    if subsets:
        wanted["train"] = sorted({i for s in subsets.values() for i in s.train})
        wanted["val"] = sorted({i for s in subsets.values() for i in s.val})
    if full_val and "val" in dataset.splits:
        wanted["val"] = list(range(len(dataset.splits["val"])))
    return wanted



def extract(config: ExtractConfig, progress: ProgressSink = null_progress,
            execution: Execution = IN_PROCESS, client: Any = None) -> ExtractReport:
    """Extract (or complete) a store for one dataset and backbone; see the module docstring.

    With a dask `execution` (or `client`) the trunk runs on the cluster's workers, task by task
    (tasks.py); this process holds the store's lease, reserves the rows, and writes the
    classifier, the head and the few-shot rows.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    # every check before any work, cheapest first: the dataset, the prompts, then the weights
    dataset = open_dataset(config.dataset, config.root, make_split=config.make_split)
    plain_name(dataset.spec.name, "the dataset spec's name", ExtractError)  # names folders
    prompts = PromptSet.of(config.prompts, dataset)
    backbone = load_backbone(config.model, config.pretrained, device=device, cut=config.cut,
                             init_seed=config.init_seed, quick_gelu=config.quick_gelu,
                             cache_dir=config.cache_dir)
    subsets = few_shot_subsets(dataset, config.shots, config.seeds)
    decode = "pil" if config.decode == "workers" else f"torchvision-{device.type}"
    recipe = ViewRecipe(count=config.views, seed=config.view_seed, decode=decode)
    url = config.store or default_store_url(dataset.spec.name, backbone.card, config.store_root)
    store = _open_or_create(url, backbone, dataset, recipe, config)
    recipe = ViewRecipe(count=store.manifest["views"]["count"], seed=recipe.seed,
                        decode=decode)  # never fewer views than stored
    report = ExtractReport(store=url)
    try:
        plans = {split: plan_split(store, dataset, split, entries, recipe)
                 for split, entries in wanted_entries(dataset, subsets,
                                                      config.full_val).items()}
        extract_plans(store, backbone, plans, recipe, config, progress, report, execution,
                      client)
        _write_fewshot(store, dataset, subsets)
        _write_classifier(store, backbone, prompts)
        if not store.has_head():
            state = {k: v.detach().cpu().float().numpy() for k, v in
                     backbone.head.state_dict().items()}
            store.write_head(state, backbone.model_config or {})
        report.rows = {s: int(store.readable_rows(s).size) for s in store.splits()}
    finally:
        _record_skipped(store, report.skipped)
        store.close()
    report.seconds = time.perf_counter() - start
    return report


def _open_or_create(url: str, backbone: Backbone, dataset: Dataset, recipe: ViewRecipe,
                    config: ExtractConfig) -> FeatureStore:
    options = config.storage_options
    try:
        store = open_store(url, "a", storage_options=options, takeover=config.takeover)
    except StoreNotFoundError:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
        return create_store(url, backbone.card, backbone.fingerprint, dataset.describe(),
                            views=recipe.describe(), layout=config.layout,
                            storage_options=options, takeover=config.takeover,
                            center_flip=config.center_flip)
    try:
        check_fingerprint(store, backbone.fingerprint, backbone.card)
        stored = store.manifest
        if stored["dataset"]["name"] != dataset.spec.name or \
                stored["dataset"]["classnames"] != dataset.classnames:
            raise ExtractError(f"{url} holds dataset {stored['dataset']['name']}, not"
                               f" {dataset.spec.name} (or its classes differ).")
        described = dataset.describe()
        for key in ("split_sha256", "split_sizes"):
            if stored["dataset"].get(key) != described[key]:
                raise ExtractError(f"{url} was extracted from another split of"
                                   f" {dataset.spec.name} (its {key} differs from the data"
                                   f" under --root now): adding to it would mix two splits."
                                   f" Use another --store, or the data it was made from.")
        if stored["views"]["seed"] != recipe.seed or \
                stored["views"]["scale"] != list(recipe.scale):
            raise ExtractError(f"{url} holds views of another recipe ({stored['views']});"
                               f" use another --store for --views with seed {recipe.seed}.")
        made = stored["views"].get("decode", "pil")  # stores before --decode: PIL's
        if made != recipe.decode:
            raise ExtractError(f"{url} holds images decoded by {made}; this run would decode"
                               f" with {recipe.decode} (pixels differ slightly). Use"
                               f" {_decode_options(made)} to add to it, or another --store.")
        store.add_views(recipe.count)  # more views than stored: the new ones are extracted
        if config.center_flip:
            store.add_center_flip()  # a store written before it existed: extracted now
    except SafeCacheError:
        store.close()
        raise
    return store


def _decode_options(made: str) -> str:
    """The extract options that decode as a store's `views.decode` says."""
    if made == "pil":
        return "--decode workers"
    return f"--decode device --device {made.removeprefix('torchvision-')}"


def _record_skipped(store: FeatureStore, skipped: list[dict[str, str]]) -> None:
    """Note skipped images in the manifest: by the lease holder only, once, so a job's workers
    never write the root object at the same time."""
    if skipped:
        store.record_skipped(skipped)


def _write_fewshot(store: FeatureStore, dataset: Dataset, subsets) -> None:
    rows = {split: row_index(store, split, readable_only=True) for split in ("train", "val")
            if store.has_split(split)}
    for (seed, shots), subset in subsets.items():
        train = [rows["train"][p] for p in (dataset.splits["train"][i].path for i in subset.train)
                 if p in rows["train"]]
        val = [rows["val"][p] for p in (dataset.splits["val"][i].path for i in subset.val)
               if p in rows["val"]]
        store.write_fewshot(seed, shots, train, val)


@dataclass(frozen=True)
class PromptSet:
    """A prompt set read and checked before any image is extracted: its stored name, the
    sentences of each class, and where it came from."""

    name: str
    sentences: list[list[str]]
    source: str

    @classmethod
    def of(cls, prompts: str, dataset: Dataset) -> PromptSet:
        name = plain_name(stored_prompt_set(prompts), "the prompt set's name", ExtractError)
        return cls(name, class_sentences(prompts, dataset.classnames, dataset.spec.templates),
                   prompts)


def _write_classifier(store: FeatureStore, backbone: Backbone, prompts: PromptSet) -> None:
    """The prompt set's classifier and raw sentence embeddings (added to a store that has
    the classifier only)."""
    name, sentences = prompts.name, prompts.sentences
    if store.has_prompt_set(name):
        if store.prompt_sentences(name) != [list(group) for group in sentences]:
            raise ExtractError(f"{store.url} already holds a prompt set '{name}' with other"
                               f" sentences (from another {Path(prompts.source).name}?); fit"
                               f" would read them under one name. Rename the file (the set is"
                               f" named by its stem), or use another --store.")
        return
    embeddings = encode_sentences(backbone.model, backbone.tokenizer(), sentences)
    weights = class_average(embeddings, [len(group) for group in sentences], "normalised")
    store.write_classifier(name, weights.numpy(), sentences, embeddings.numpy())
