"""A study: one paper table (or ablation) as a TOML file, checked before any work.

A study names its datasets, backbones, shots, seeds, methods, fit recipes and prompt sets, the
extract options its stores need and the fit options its runs use (see studies/*.toml, the
shipped ones). Everything is checked when the file is read: an unknown key, dataset, model,
method, recipe or OOD variant is one error naming the file, the line and the allowed values, so
a typo never surfaces hours into a run.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.ood_table import OOD_COLUMNS
from ..data.prompts import BUILTIN_PROMPT_SETS
from ..defaults import default_of, settable
from ..errors import ConfigError, DatasetError
from ..extract.config import ExtractConfig
from ..fit.config import FitConfig
from ..fit.methods import ALWAYS, DEFAULT_METHODS, GROUPS, METHODS, expand_methods

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

STUDY_DIR = Path(__file__).parent / "studies"
BUILTIN_PROMPTS = BUILTIN_PROMPT_SETS  # hand, classname, vanilla, pool, mined
OOD_VARIANTS = OOD_COLUMNS[1:]  # the ImageNet variants (the first column is ImageNet)
TOP_KEYS = {"name", "description", "datasets", "backbones", "shots", "seeds", "methods",
            "recipes", "prompts", "linear", "ood", "extract", "fit", "paper"}
BACKBONE_KEYS = {"model", "pretrained", "cut", "label", "quick_gelu"}
# [extract] and [fit] take the configs' fields, less what a study says its own way (datasets,
# backbones, shots, seeds, prompts, linear (fit's classifier), methods, recipes, ood) or decides
# itself (where stores and results go) and what no study should set (taking over a lease,
# forcing, partial test splits).
EXTRACT_KEYS = settable(ExtractConfig, less={
    "dataset", "root", "model", "pretrained", "store", "store_root", "shots", "seeds", "prompts",
    "cut", "quick_gelu", "init_seed", "storage_options", "layout", "takeover"})
FIT_KEYS = settable(FitConfig, less={
    "store", "out", "shots", "seeds", "prompts", "classifier", "methods", "recipe", "eval_ood",
    "storage_options", "force", "partial"})


# A study's keys are the config fields (FitConfig.lrs); where the CLI spells one differently
# (--lr), a key written the CLI's way is pointed at the field.
CLI_SPELLINGS = {"lr": "lrs", "wd": "wds"}


def _did_you_mean(key: str, allowed: set[str]) -> str:
    if key in ("scheduler", "local_workers"):
        return (" (where runs execute is not the study's: `study run --scheduler ADDRESS` or"
                " `--local-workers N`)")
    if key == "classifier":
        return (" (a study fine-tunes the classifier per prompt set: linear = [\"<prompt set>\"]"
                " beside prompts runs those sets both ways)")
    if CLI_SPELLINGS.get(key) in allowed:
        return f" (the CLI's --{key} is '{CLI_SPELLINGS[key]}' here, as in FitConfig)"
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class StudyBackbone:
    """One backbone as a study names it: open_clip model, weights ('none': random), trunk cut.
    A name, not a model: model.backbone.Backbone is the loaded one."""

    model: str
    pretrained: str | None
    cut: str = "pool"
    quick_gelu: bool | None = None  # None: from the tag or the file (extract --quick-gelu)

    @property
    def name(self) -> str:
        weights = self.pretrained or "random0"  # as its stores are named (init seed 0)
        return f"{self.model}-{weights}" + ("" if self.cut == "pool" else f"-{self.cut}")


@dataclass(frozen=True)
class Study:
    """A parsed, checked study file."""

    name: str
    path: Path
    datasets: tuple[str, ...]
    backbones: tuple[StudyBackbone, ...]
    shots: tuple[int, ...] = default_of(FitConfig, "shots")
    seeds: tuple[int, ...] = default_of(FitConfig, "seeds")
    methods: tuple[str, ...] = (*ALWAYS, *DEFAULT_METHODS)
    recipes: tuple[str, ...] = (default_of(FitConfig, "recipe").name,)
    prompts: tuple[str, ...] = (default_of(FitConfig, "prompts"),)
    linear: tuple[str, ...] = ()  # prompt sets also run with their classifier fine-tuned
    ood: tuple[str, ...] = ()
    extract: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    paper: str = ""  # which published table the report compares with ("table_1", "table_3")
    spec_files: tuple[tuple[str, str], ...] = ()  # (name, spec file) of a user's own datasets

    def dataset_ref(self, name: str) -> str:
        """What extract and the readers take for a dataset of the study: its spec file where
        the study named one, else its name."""
        return dict(self.spec_files).get(name, name)

    @property
    def variants(self) -> list[tuple[str, str, str]]:
        """(recipe, prompt set, classifier) triples: each writes its own results folder. Every
        prompt set runs with its frozen text classifier ("text"), those of `linear` also with
        the classifier fine-tuned first (fit --classifier linear: the paper's Fig. 8)."""
        return [(r, p, c) for r in self.recipes for p in self.prompts
                for c in ("text", "linear") if c == "text" or p in self.linear]

    def variant_name(self, recipe: str, prompts: str, classifier: str = "text") -> str:
        """A variant's folder: the recipe, plus the prompt set where the study varies it, plus
        `-linear` for a fine-tuned classifier."""
        suffix = "" if classifier == "text" else f"-{classifier}"
        if len(self.prompts) == 1:
            return recipe + suffix
        return f"{recipe}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', prompt_label(prompts))}{suffix}"


def prompt_label(prompts: str) -> str:
    """A study's prompt set by a short name: a built-in's own, a per-dataset file template's
    folder (`cupl/{dataset}.json`: cupl), a file's stem."""
    return Path(prompts).parent.name if "{dataset}" in prompts else Path(prompts).stem


def resolve_prompts(prompts: str, dataset: str, root: str | Path) -> str:
    """A study's prompt set for one dataset: a built-in name, a file, or a per-dataset file
    template ('{dataset}' filled in, relative to the data root)."""
    if "{dataset}" not in prompts:
        return prompts
    path = Path(prompts.replace("{dataset}", dataset))
    return str(path if path.is_absolute() else Path(root) / path)


class _Checker:
    """Errors that name the study file, the line of the offending text, and the fix."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def line_of(self, needle: str) -> int | None:
        key = re.compile(rf"^\s*\[*\s*{re.escape(needle)}\s*[=\]]")
        for number, line in enumerate(self.lines, 1):
            if key.search(line) or f'"{needle}"' in line or f"'{needle}'" in line:
                return number
        return None

    def fail(self, needle: str, message: str) -> ConfigError:
        line = self.line_of(needle)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {message}")

    def keys(self, table: dict[str, Any], allowed: set[str], what: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(key, f"unknown {what} key '{key}'{_did_you_mean(key, allowed)};"
                                     f" allowed: {', '.join(sorted(allowed))}.")

    def among(self, values: list[Any], allowed: tuple[str, ...] | list[str], what: str) -> None:
        for value in values:
            if value not in allowed:
                raise self.fail(str(value), f"unknown {what} '{value}'; allowed: "
                                            f"{', '.join(allowed)}.")

    def ints(self, values: Any, what: str, minimum: int) -> tuple[int, ...]:
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int) and v >= minimum for v in values):
            raise self.fail(what, f"'{what}' must be a non-empty list of integers >= {minimum}.")
        if len(set(values)) != len(values):
            raise self.fail(what, f"'{what}' lists a value twice: {values}.")
        return tuple(values)


def _backbones(raw: Any, check: _Checker) -> tuple[StudyBackbone, ...]:
    from ..model.families import config_refusal
    from ..model.hub import SCHEMAS

    if not isinstance(raw, list) or not raw:
        raise check.fail("backbones", "'backbones' must be a non-empty list of"
                                      " [[backbones]] tables (model, pretrained, cut).")
    parsed = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise check.fail("backbones", "each backbone is a [[backbones]] table (model,"
                                          " pretrained, cut).")
        check.keys(entry, BACKBONE_KEYS, "backbone")
        model = entry.get("model")
        if not isinstance(model, str):
            raise check.fail("backbones", "each backbone needs a model name.")
        if not model.startswith(tuple(f"{s}:" for s in SCHEMAS)) and not Path(model).is_file():
            _check_model(model, check, config_refusal)
        pretrained = entry.get("pretrained", "openai")
        if not isinstance(pretrained, str) or not isinstance(entry.get("cut", "pool"), str):
            raise check.fail("pretrained", "a backbone's pretrained and cut are texts"
                                           " (pretrained = \"none\" for random weights).")
        pretrained = None if str(pretrained).lower() == "none" else str(pretrained)
        quick_gelu = entry.get("quick_gelu")
        if quick_gelu is not None and not isinstance(quick_gelu, bool):
            raise check.fail("quick_gelu", "a backbone's quick_gelu is true or false (leave it"
                                           " out to take it from the weights).")
        parsed.append(StudyBackbone(model, pretrained, entry.get("cut", "pool"), quick_gelu))
    names = [b.name for b in parsed]
    for name in names:
        if names.count(name) > 1:  # the same store twice: one would overwrite the other
            raise check.fail(name.split("-")[0], f"two backbones write the same store ({name});"
                                                 f" drop one, or change its pretrained or cut.")
    return tuple(parsed)


def _check_model(model: str, check: _Checker, config_refusal) -> None:
    import open_clip

    from ..model.backbone import MODEL_CONFIG_DIR  # noqa: F401  (registers the tiny configs)

    config = open_clip.get_model_config(model.replace("/", "-"))
    if config is None:
        known = [m for m in open_clip.list_models()
                 if not config_refusal(open_clip.get_model_config(m))]
        raise check.fail(model, f"unknown model '{model}'; allowed: open_clip names SAFE can"
                                f" split ({', '.join(known[:12])}, ...: `safe-cache models`),"
                                f" a config JSON, hf-hub:ORG/NAME or local-dir:PATH.")
    reason = config_refusal(config)
    if reason:
        raise check.fail(model, f"{model} cannot be split for SAFE ({reason}).")


def _datasets(values: Any, path: Path, check: _Checker, known: list[str]
              ) -> tuple[list[str], dict[str, str]]:
    """The study's datasets by name, and the spec file of each one given as a file (relative
    to the study file, else to the working folder), as extract takes them."""
    from ..data.datasets import load_spec

    if not isinstance(values, list) or not values or \
            not all(isinstance(v, str) and v for v in values):
        raise check.fail("datasets", "'datasets' must be a non-empty list of dataset names or"
                                     " spec files.")
    names, files = [], {}
    for value in values:
        if value in known:
            names.append(value)
            continue
        candidates = [path.parent / value, Path(value)]
        spec_file = next((c for c in candidates if c.is_file()), None)
        if spec_file is None:
            raise check.fail(value, f"unknown dataset '{value}'; allowed: {', '.join(known)},"
                                    f" or a dataset spec file (relative to the study file;"
                                    f" see pipelines/imagefolder.json).")
        try:
            spec = load_spec(spec_file)
        except DatasetError as exc:
            raise check.fail(value, str(exc)) from exc
        if spec.name in names:
            raise check.fail(value, f"dataset '{spec.name}' is named twice (a spec file's name"
                                    f" names its stores and results).")
        names.append(spec.name)
        files[spec.name] = str(spec_file.resolve())
    if len(set(names)) != len(names):
        raise check.fail("datasets", f"'datasets' lists a dataset twice: {names}.")
    return names, files


def parse_study(path: Path) -> Study:
    """Read and check a study file (see the module docstring)."""
    from ..data.datasets import list_specs
    from ..fit.recipe import PRESETS

    text = path.read_text()
    check = _Checker(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}).") from exc
    check.keys(raw, TOP_KEYS, "study")
    for table, allowed in (("extract", EXTRACT_KEYS), ("fit", FIT_KEYS)):
        if not isinstance(raw.get(table, {}), dict):
            raise check.fail(table, f"'{table}' must be a table: [{table}].")
        check.keys(raw.get(table, {}), allowed, table)
    for key in ("methods", "recipes", "prompts", "linear", "ood", "shots", "seeds",
                "backbones"):
        if key in raw and not isinstance(raw[key], list):
            raise check.fail(key, f"'{key}' must be a list (e.g. {key} = [...]).")
    for key in ("methods", "recipes", "prompts", "linear", "ood"):
        if not all(isinstance(v, str) for v in raw.get(key, [])):
            raise check.fail(key, f"every value of '{key}' must be a text.")
    datasets, spec_files = _datasets(raw.get("datasets"), path, check,
                                     [s.name for s in list_specs()])
    methods = raw.get("methods", [*ALWAYS, *DEFAULT_METHODS])
    check.among(methods, [*METHODS, *GROUPS], "method")
    methods = expand_methods(methods)
    recipes = raw.get("recipes", [default_of(FitConfig, "recipe").name])
    check.among(recipes, sorted(PRESETS), "recipe")
    ood = raw.get("ood", [])
    check.among(ood, OOD_VARIANTS, "OOD variant")
    if ood and "imagenet" not in datasets:
        raise check.fail("ood", "'ood' tests ImageNet runs on its variants: add imagenet to"
                                " 'datasets'.")
    prompts = raw.get("prompts", [default_of(FitConfig, "prompts")])
    for prompt_set in prompts:
        if prompt_set not in BUILTIN_PROMPTS and "{dataset}" not in prompt_set and \
                not (path.parent / prompt_set).is_file() and not Path(prompt_set).is_file():
            raise check.fail(prompt_set, f"unknown prompt set '{prompt_set}'; allowed:"
                                         f" {', '.join(BUILTIN_PROMPTS)}, a CuPL JSON file, or"
                                         f" a file per dataset ('cupl/{{dataset}}.json' under"
                                         f" the data root).")
    for prompt_set in prompts:
        if prompt_set not in BUILTIN_PROMPTS and Path(prompt_set).stem in BUILTIN_PROMPTS:
            raise check.fail(prompt_set, f"a prompt file may not be named like the built-in set"
                                         f" '{Path(prompt_set).stem}' (a store names a file's"
                                         f" sentences by its stem): rename it.")
    linear = raw.get("linear", [])
    for prompt_set in linear:
        if prompt_set not in prompts:
            raise check.fail(prompt_set, f"'linear' names prompt sets of 'prompts' whose"
                                         f" classifier is also fine-tuned; '{prompt_set}' is"
                                         f" not one of {prompts}.")

    def located(p: str) -> str:
        return p if p in BUILTIN_PROMPTS or "{dataset}" in p or Path(p).is_file() \
            else str(path.parent / p)

    prompts, linear = [located(p) for p in prompts], [located(p) for p in linear]
    study = Study(
        name=raw.get("name", path.stem), path=path, datasets=tuple(datasets),
        spec_files=tuple(sorted(spec_files.items())),
        backbones=_backbones(raw.get("backbones"), check),
        shots=check.ints(raw.get("shots", list(default_of(FitConfig, "shots"))), "shots", 1),
        seeds=check.ints(raw.get("seeds", list(default_of(FitConfig, "seeds"))), "seeds", 0),
        methods=tuple(dict.fromkeys(["zero_shot", "safe", *methods])),
        recipes=tuple(dict.fromkeys(recipes)), prompts=tuple(dict.fromkeys(prompts)),
        linear=tuple(dict.fromkeys(linear)),
        ood=tuple(ood), extract=dict(raw.get("extract", {})), fit=dict(raw.get("fit", {})),
        description=raw.get("description", ""), paper=raw.get("paper", ""))
    _check_values(study, check)
    folders = [study.variant_name(r, p, c) for r, p, c in study.variants]
    for folder in folders:
        if folders.count(folder) > 1:  # two variants would write the same result files
            raise check.fail("prompts", f"two recipe x prompt-set variants write the same"
                                        f" results ({folder}); give the prompt files distinct"
                                        f" names.")
    return study


def _check_values(study: Study, check: _Checker) -> None:
    """The [fit] and [extract] values checked as fit and extract will check them (finite, in
    range, the right type), now: `beta = nan` is refused with the study's line, not after its
    stores were extracted."""
    from ..errors import RecipeError

    for table, make in (("fit", lambda v: FitConfig(store="<study>", **v)),
                        ("extract", lambda v: ExtractConfig(dataset="<study>", **v))):
        values = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in getattr(study, table).items()}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise check.fail(key, f"[{table}] {key} = {value}: must be a finite number.")
        try:
            make(values)
        except (ConfigError, RecipeError, TypeError) as exc:
            key = next((k for k in values if k in str(exc).replace("-", "_")), table)
            raise check.fail(key, f"[{table}]: {exc}") from None


def list_studies() -> list[Study]:
    """The studies shipped with the package, by file name."""
    return [parse_study(path) for path in sorted(STUDY_DIR.glob("*.toml"))]


def load_study(name_or_path: str | Path) -> Study:
    """A shipped study by name (`table1-rn50`) or a study file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return parse_study(path)
    shipped = STUDY_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return parse_study(shipped)
    names = ", ".join(p.stem for p in sorted(STUDY_DIR.glob("*.toml")))
    raise ConfigError(f"No study '{name_or_path}': not a file, and the shipped studies are"
                      f" {names} (`safe-cache study list`).")
