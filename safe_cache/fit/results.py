"""The result record: one JSON per (dataset, backbone, shots, seed) run, as CLIP_benchmark keeps
one per run, written by fit and read by report, export, attention and the tests.

`<out>/<dataset>/<model>-<weights>/shots<K>_seed<S>_<recipe>.json` (`..._test-selected` when
Tip-Adapter-F and SAFE-A chose their epoch on test, then `_o<8 hex>` when other options than a
default fit's made it: fit/identity.options_suffix), beside it the fine-tuned head
(`.safetensors`) and SAFE-A's trained cache (`.safe_a.safetensors`). The JSON is written last
and by rename, so a result that exists is whole. `RunResult.from_json` checks the shape on every
read: a malformed or foreign file is an error naming the file, never a KeyError deep in report.
Results of safe-cache 0.1 (never released on its own: no recipe block, run id, identity or
checksums) are refused with one line (ResultFormatError; fit recomputes a run over one); what
the 0.2 line wrote differently and is still read lives in compat.py.

Every result carries its run's identity (fit/identity.py) and is checked on read: strict types,
finite numbers, its name and folders equal to its content. The methods it may hold are listed
in methods.py.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import ConfigError, ResultError, ResultFormatError, SafeCacheWarning
from ..identity import canonical_sha256
from ..names import plain_name
from ..store.paths import backbone_label
from . import identity as run_id
from .compat import OOD_PREDICTORS_ADDED
from .config import FitConfig
from .methods import ALWAYS, METHOD_LABELS, METHODS, OPTIONAL_METHODS

__all__ = ["ALWAYS", "METHODS", "METHOD_LABELS", "OPTIONAL_METHODS", "RunResult",
           "load_result", "load_results", "result_path", "write_result"]
FILE_PATTERN = "shots*_seed*.json"
# The names fit writes: shots<K>_seed<S>_<recipe>[_test-selected][_o<8 hex>].json. A recipe
# name holds no dot or space (recipe._short), so a copy such as `... copy.json` or `.bak.json`
# is not one of them. The plain shots<K>_seed<S>.json (safe-cache 0.1's name) matches too, so
# such a file is refused by its content (ResultFormatError), never skipped as a copy.
NAME_SCHEME = re.compile(r"^shots(\d+)_seed(\d+)(?:_([A-Za-z0-9_+=-]+))?\.json$")
# Fields a run writes only when there is something to say: OOD variants asked for, a test split
# evaluated incomplete. Every other field is in every result of this safe-cache.
OPTIONAL_FIELDS = ("ood", "partial", "text")
CONTENT_FIELD = "content_sha256"
TRANSIENT_FIELDS = ("path", "skipped", "note", "classifier_weights")  # never written
# What a result of safe-cache 0.1 lacks (its checksums): a file without them is of a format no
# longer read (ResultFormatError), not an edited result of this one.
CHECKSUM_FIELDS = ("identity_sha256", CONTENT_FIELD)


@dataclass
class RunResult:
    """One fit run. `methods[name]` holds at least val_acc and test_acc (fractions) and the
    method's chosen hyperparameters; `grid` every lr x wd configuration's best val accuracy;
    `beta_curve` SAFE's accuracy over beta; `ood` the ImageNet-variant accuracies (optional)."""

    dataset: str
    shots: int
    seed: int
    backbone: dict[str, Any]  # model, pretrained, cut
    store: dict[str, Any]  # url, fingerprint
    methods: dict[str, dict[str, Any]]
    beta_curve: list[dict[str, float]]
    grid: list[dict[str, float]]
    config: dict[str, Any]
    versions: dict[str, str]
    timings: dict[str, Any]  # seconds; methods_s: {method: seconds}
    train_samples: int
    test_images: int
    norm_ratio_finetuned_over_original: float
    recipe: dict[str, Any]  # fit.recipe.Recipe.record() and the loss_logit_scale it used
    curves: dict[str, list[Any]]  # per evaluation: iters, val_acc[G], train_loss[G]
    execution: dict[str, Any]  # device, graphed (CUDA graph), why_eager
    ood: dict[str, dict[str, Any]] | None = None
    # Set once the run is done (fit_one, fit_and_save, write_result): every file has them.
    run_id: str | None = None  # also in the head's and cache's metadata: files of one run
    identity: dict[str, Any] | None = None  # fit/identity.py: all that changes the numbers
    identity_sha256: str | None = None
    partial: dict[str, int] | None = None  # a test split evaluated incomplete: rows, expected
    content_sha256: str | None = None  # every other field: a number edited by hand is refused
    # A classifier made by the run (mined templates, --classifier linear: fit/text.py), saved
    # beside the result (classifier_file); None: the prompt set's, as the store holds it.
    text: dict[str, Any] | None = None
    # Not written: where the record was read from, whether fit found it already done, and what
    # fit says about it (a new result beside one of other options).
    path: Path | None = field(default=None, compare=False)
    skipped: bool = field(default=False, compare=False)
    note: str | None = field(default=None, compare=False)
    classifier_weights: Any = field(default=None, compare=False, repr=False)  # fit to runs.py

    @property
    def recipe_name(self) -> str:
        """The recipe that made the run (its recipe block's name)."""
        name: str = self.recipe["name"]  # checked a text on reading
        return name

    @property
    def selected_on(self) -> str:
        """Where Tip-Adapter-F and SAFE-A chose their epoch: "val", or "test" (reference)."""
        select_on: str = self.config["select_on"]  # checked by FitConfig.from_dict on reading
        return select_on

    @property
    def backbone_label(self) -> str:
        """`<model>-<weights>`: the results folder the run lives in."""
        return self.path.parent.name if self.path else self.backbone["label"]

    @property
    def run_identity(self) -> dict[str, Any]:
        """This run's identity, from what the record says."""
        return run_id.run_identity(self.store, self.dataset, self.shots, self.seed, self.config,
                                   self.recipe, self.ood, self.backbone)

    @property
    def group(self) -> str:
        """The identity of the run's group (all but the seed): what report averages."""
        return run_id.group_sha256(self.run_identity)

    @property
    def options(self) -> dict[str, Any]:
        """The run's options (fit/identity.OPTION_FIELDS), normalised."""
        return run_id.options_of(self.config)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for transient in TRANSIENT_FIELDS:
            data.pop(transient)
        for optional in OPTIONAL_FIELDS:
            if data[optional] is None:
                data.pop(optional)
        return data

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "<result>") -> RunResult:
        """A record from its JSON, checked: every field present with the right type (a bool is
        not a number), every number finite, accuracies in [0, 1], the beta a blend weight, and
        the identity it carries equal to the one its content gives."""
        if not isinstance(data, dict):
            raise ResultError(f"{source} is not a fit result (a JSON object is expected).")
        names = {f.name for f in fields(cls)} - set(TRANSIENT_FIELDS)
        required = names - set(OPTIONAL_FIELDS)
        missing = sorted(required - set(data))
        if set(CHECKSUM_FIELDS) & set(missing):
            raise ResultFormatError(
                f"{source} lacks {', '.join(missing)}: a result of safe-cache 0.1 (or edited),"
                f" which this safe-cache no longer reads; fit it again with --force, or remove"
                f" it.")
        if missing:
            raise ResultError(f"{source} is not a fit result of this safe-cache: it lacks"
                              f" {', '.join(missing)}. Fit it again (--force) to rewrite it.")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ResultError(f"{source}: field '{unknown[0]}' is not a fit result field"
                              f" (edited, or from a newer safe-cache); fit it again (--force).")
        _refuse_non_finite(data, source)
        record = cls(**{name: data[name] for name in names if name in data})
        record._check(source)
        if record.content_sha256 != content_sha256(data):
            raise ResultError(f"{source}: its content does not match its content_sha256 (a"
                              f" number or field was edited by hand); fit it again (--force).")
        return record

    def _check(self, source: str | Path) -> None:
        for name, kind in (("dataset", str), ("backbone", dict), ("store", dict),
                           ("methods", dict), ("beta_curve", list), ("grid", list),
                           ("config", dict), ("recipe", dict), ("execution", dict),
                           ("identity", dict), ("run_id", str), ("identity_sha256", str),
                           ("content_sha256", str)):
            if not isinstance(getattr(self, name), kind):
                raise ResultError(f"{source}: '{name}' is {getattr(self, name)!r:.60}, not"
                                  f" {'a text' if kind is str else 'a JSON ' + kind.__name__}.")
        for block, name in (("recipe", "name"), ("backbone", "model"), ("backbone", "label")):
            if not isinstance(getattr(self, block).get(name), str):
                raise ResultError(f"{source}: '{block}.{name}' is"
                                  f" {getattr(self, block).get(name)!r:.60}, not a text.")
        for name in run_id.STORE_FIELDS:  # what the run read: part of its identity
            value = self.store.get(name)
            wanted: type[int] | type[str] = int if name == "test_rows" else str
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ResultError(f"{source}: 'store.{name}' is {value!r:.60}, not"
                                  f" {'an integer' if wanted is int else 'a text'}; fit it again"
                                  f" (--force).")
        plain_name(self.dataset, f"{source}: dataset", ResultError)
        for name, low in (("shots", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ResultError(f"{source}: {name} is {value!r}, not an integer >= {low}.")
        if not self.methods:
            raise ResultError(f"{source}: 'methods' holds no method.")
        for name, values in self.methods.items():
            if name not in METHODS:
                raise ResultError(f"{source}: method '{name}' is not one this safe-cache"
                                  f" writes ({', '.join(METHODS)}).")
            for key in ("val_acc", "test_acc"):
                value = values.get(key) if isinstance(values, dict) else None
                _accuracy(value, f"{source}: methods.{name}.{key}")
        for index, point in enumerate(self.beta_curve):
            where = f"{source}: beta_curve[{index}]"
            if not isinstance(point, dict):
                raise ResultError(f"{where} is not an object.")
            _number(point.get("beta"), f"{where}.beta", 0)
            for key in ("val_acc", "test_acc"):
                _accuracy(point.get(key), f"{where}.{key}")
        _check_timing_block(self.timings, source)
        if not self.grid:
            raise ResultError(f"{source}: 'grid' holds no configuration.")
        for index, point in enumerate(self.grid):
            if not isinstance(point, dict):
                raise ResultError(f"{source}: grid[{index}] is not an object.")
            _accuracy(point.get("val_acc"), f"{source}: grid[{index}].val_acc")
            for key in ("lr", "wd"):
                _number(point.get(key), f"{source}: grid[{index}].{key}", 0)
        if not (isinstance(self.curves, dict) and all(isinstance(self.curves.get(k), list)
                                                      for k in ("iters", "val_acc",
                                                                "train_loss"))):
            raise ResultError(f"{source}: 'curves' must hold the lists iters, val_acc and"
                              f" train_loss.")
        if self.partial is not None and not (
                isinstance(self.partial, dict) and all(_is_int(self.partial.get(k))
                                                       for k in ("rows", "expected"))):
            raise ResultError(f"{source}: 'partial' must hold the integers rows and expected.")
        _check_text_block(self.text, self.config, source)
        for name, variant in (self.ood or {}).items():
            for method, value in variant.items():
                if method in self.methods:
                    _accuracy(value, f"{source}: ood.{name}.{method}")
            _check_ood_curve(variant.get("beta_curve"), f"{source}: ood.{name}.beta_curve")
        try:  # the config whole: every fit option, each in range
            FitConfig.from_dict(self.config, str(source))
        except ConfigError as exc:
            raise ResultError(f"{exc}; fit it again (--force).") from None
        # The identity as written (a later safe-cache may compute identities with more
        # fields: fit then runs such a result again; here only its own hash is checked).
        assert isinstance(self.identity, dict)  # checked above
        if self.identity_sha256 != run_id.identity_sha256(self.identity):
            raise ResultError(f"{source}: its identity does not match its identity_sha256"
                              f" (edited by hand); fit it again (--force).")


def content_sha256(data: dict[str, Any]) -> str:
    """The digest of a result's JSON form, all but this digest itself."""
    return canonical_sha256({k: v for k, v in data.items() if k != CONTENT_FIELD})


def _check_text_block(text: Any, config: dict[str, Any], source: str | Path) -> None:
    """A run-made classifier's record, there exactly when the config says the run made one
    (--prompts mined, --classifier linear): the mined templates (texts) and their val
    accuracies, the linear head's choice and its val accuracy, the saved file's digest."""
    mined, linear = config.get("prompts") == "mined", config.get("classifier") == "linear"
    made = mined or linear
    if made != (text is not None):
        raise ResultError(f"{source}: its config {'makes' if made else 'does not make'} its own"
                          f" classifier (prompts, classifier), and it {'lacks' if made else 'has'}"
                          f" the 'text' block that records one (edited); fit it again"
                          f" (--force).")
    if text is None:
        return
    if not isinstance(text, dict) or mined != ("templates" in text) \
            or linear != isinstance(text.get("linear"), dict) \
            or not re.fullmatch(r"[0-9a-f]{64}", str(text.get("classifier_sha256"))):
        raise ResultError(f"{source}: 'text' must record what its config made (the mined"
                          f" templates for --prompts mined, the linear head for --classifier"
                          f" linear) and the saved file's digest; fit it again (--force).")
    if mined:
        templates, accuracies = text["templates"], text.get("val_acc")
        if not (isinstance(templates, list) and templates
                and all(isinstance(t, str) for t in templates)
                and isinstance(accuracies, list) and len(accuracies) == len(templates)):
            raise ResultError(f"{source}: text.templates must list the mined templates and"
                              f" text.val_acc their val accuracies; fit it again (--force).")
        for index, value in enumerate(accuracies):
            _accuracy(value, f"{source}: text.val_acc[{index}]")
    if linear:
        for key in ("val_acc", "test_acc"):
            _accuracy(text["linear"].get(key), f"{source}: text.linear.{key}")


def _check_timing_block(timings: Any, source: str | Path) -> None:
    """Seconds as the study page's cost table reads them: an object of finite numbers >= 0,
    `methods_s` an object of such numbers per method."""
    if not isinstance(timings, dict):
        raise ResultError(f"{source}: 'timings' is not an object.")
    for key, value in timings.items():
        if key == "methods_s":
            if not isinstance(value, dict):
                raise ResultError(f"{source}: timings.methods_s is not an object.")
            for method, seconds in value.items():
                _number(seconds, f"{source}: timings.methods_s.{method}", 0)
        else:
            _number(value, f"{source}: timings.{key}", 0)


def _check_ood_curve(curve: Any, where: str) -> None:
    """An OOD variant's beta curve (absent in results of 0.2): how it was made, and points of
    a finite beta and an accuracy each."""
    if curve is None:
        return
    if not (isinstance(curve, dict) and isinstance(curve.get("made"), str)
            and isinstance(curve.get("points"), list)):
        raise ResultError(f"{where} must hold 'made' (text) and 'points' (a list).")
    for index, point in enumerate(curve["points"]):
        if not isinstance(point, dict):
            raise ResultError(f"{where}.points[{index}] must be an object.")
        _number(point.get("beta"), f"{where}.points[{index}].beta", 0)
        _accuracy(point.get("test_acc"), f"{where}.points[{index}].test_acc")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, where: str, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < low:
        raise ResultError(f"{where} is {value!r}, not a finite number >= {low:g}.")
    return value


def _accuracy(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= 1:  # NaN fails both comparisons
        raise ResultError(f"{where} is {value!r}, not an accuracy in [0, 1].")


def _refuse_non_finite(value: Any, source: str | Path, where: str = "") -> None:
    """Any NaN or infinite number anywhere in the record (1e999 reads as inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ResultError(f"{source}: {where.lstrip('.') or 'a value'} is {value}, not a finite"
                          f" number; the result cannot be trusted. Fit it again (--force).")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, source, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_non_finite(item, source, f"{where}[{index}]")


def result_path(out: str | Path, manifest: dict[str, Any], shots: int, seed: int,
                recipe: str = "safe", select_on: str = "val", suffix: str = "") -> Path:
    """Where the run of a store (its manifest) for (shots, seed) and a recipe is written;
    `suffix` tells runs of other options apart (identity.options_suffix). Every part is a
    plain name: a manifest whose dataset name is a path never leads outside `out`."""
    selected = "" if select_on == "val" else "_test-selected"
    dataset = plain_name(manifest["dataset"]["name"], "the store's dataset name", ResultError)
    backbone = plain_name(backbone_label(manifest["backbone"]), "the backbone label",
                          ResultError)
    name = plain_name(f"shots{shots}_seed{seed}_{recipe}{selected}{suffix}.json",
                      "the result name", ResultError)
    return Path(out) / dataset / backbone / name


def expected_name(record: RunResult, *, suffixed: bool = True) -> str:
    """The file name fit gives this record's run (`suffixed=False`: without the options'
    suffix, the name runs of other options share)."""
    selected = "" if record.selected_on == "val" else "_test-selected"
    suffix = run_id.options_suffix(record.options) if suffixed else ""
    return f"shots{record.shots}_seed{record.seed}_{record.recipe_name}{selected}{suffix}.json"


def check_path(record: RunResult, path: Path) -> None:
    """A result is what its path says: shots, seed, recipe, selection and options in its name,
    its dataset and backbone in its folders."""
    name = expected_name(record)
    if path.name != name:
        raise ResultError(f"{path}: its content is the run {name}, not {path.name} (renamed or"
                          f" edited by hand); move it back, or fit it again (--force).")
    dataset, backbone = path.parent.parent.name, path.parent.name
    label = record.backbone["label"]
    if dataset != record.dataset or backbone != label:
        raise ResultError(f"{path}: it holds {record.dataset} / {label}, not the"
                          f" {dataset} / {backbone} its folders say; move it back, or fit it"
                          f" again.")


def head_file(path: Path) -> Path:
    """The fine-tuned head saved beside a result JSON."""
    return path.with_suffix(".safetensors")


def cache_file(path: Path) -> Path:
    """SAFE-A's trained cache saved beside a result JSON."""
    return path.with_suffix(".safe_a.safetensors")


def store_differences(record: RunResult, store: Any) -> list[str]:
    """What differs between the store a result was fitted on and `store` (empty: the same
    store, its content and the run's prompt set unchanged): the checks export and the analyses
    make before they use the result's head on the store's maps."""
    from ..data.prompts import stored_prompt_set

    now = {"fingerprint": store.fingerprint, "store_sha256": store.content_sha256}
    if record.text is None:  # the run's classifier is the store's prompt set's
        now["prompts_sha256"] = store.classifier_sha256(stored_prompt_set(
            record.config["prompts"]))
    return [name for name, value in now.items() if record.store.get(name, value) != value]


def classifier_file(path: Path) -> Path:
    """The classifier a run made (mined templates, a fine-tuned linear head), beside its JSON."""
    return path.with_suffix(".classifier.safetensors")


def files_problem(record: RunResult) -> str | None:
    """Why the files beside a result are not the ones its run wrote (None when they are): a
    run killed between writing its head and its JSON leaves a new head beside an old JSON;
    each file carries the run's id."""
    from safetensors import safe_open

    assert record.path is not None, "a record read from a file"
    wanted = [head_file(record.path)] + ([cache_file(record.path)] if "safe_a" in
                                         record.methods else []) \
        + ([classifier_file(record.path)] if record.text is not None else [])
    for path in wanted:
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            with safe_open(str(path), framework="numpy") as handle:
                run_id = (handle.metadata() or {}).get("run_id")
        except Exception as exc:  # a truncated or foreign file
            return f"{path.name} is not a readable safetensors file ({exc!s:.80})"
        if run_id != record.run_id:
            return f"{path.name} belongs to another run than {record.path.name}"
    return None


def load_result(path: str | Path) -> RunResult:
    """Read and check one result JSON; a missing, malformed or misnamed file is a
    ResultError. Files named by fit's scheme are checked against their name and folders."""
    path = Path(path)
    record_path = path.with_name(path.name.split(".")[0] + ".json")
    if path.suffix != ".json" and record_path.is_file():  # a head or SAFE-A cache file
        raise ResultError(f"{path} is not a result record: pass the result JSON beside it,"
                          f" {record_path}.")
    try:
        data = json.loads(path.read_text(), parse_constant=_no_constant)
    except FileNotFoundError as exc:
        raise ResultError(f"No fit result at {path}.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ResultError(f"{path} is not readable JSON ({type(exc).__name__}: {exc!s:.100});"
                          f" fit it again with --force, or remove it.") from None
    except ValueError as exc:  # NaN / Infinity
        raise ResultError(f"{path}: {exc}; the result cannot be trusted. Fit it again"
                          f" (--force).") from exc
    record = RunResult.from_json(data, path)
    if NAME_SCHEME.match(path.name):
        check_path(record, path)
    record.path = path
    return record


def _no_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, not a finite number")


def ood_gaps(record: RunResult) -> list[str]:
    """The methods of an OOD-tested result that gained an OOD predictor since it was written
    (compat.OOD_PREDICTORS_ADDED) and that it has no OOD accuracy for: such a result is run
    again rather than reused without them."""
    if not record.ood:
        return []
    return [m for m in OOD_PREDICTORS_ADDED if m in record.methods
            and any(m not in variant for variant in record.ood.values())]


def whole_result(path: str | Path) -> RunResult | None:
    """The run at `path` when its result and every file it names are there (a run to skip),
    None when it is still to do; a malformed JSON stays a ResultError (a result of
    safe-cache 0.1: ResultFormatError, which fit takes for another run's)."""
    path = Path(path)
    existing = load_result(path) if path.is_file() else None
    return existing if existing is not None and files_problem(existing) is None else None


def load_results(folder: str | Path) -> list[RunResult]:
    """Every run's record under `folder` (<dataset>/<backbone>/shots<K>_seed<S>_....json),
    each run once. A file that is not named by fit's scheme (a copy, `... (1).json`) is
    skipped with a warning; a file that is, but whose content disagrees, is refused."""
    records: dict[str, RunResult] = {}
    for path in sorted(Path(folder).rglob(FILE_PATTERN)):
        if not NAME_SCHEME.match(path.name):
            warnings.warn(f"{path} is not named as fit names its results: skipped (a copy?).",
                          SafeCacheWarning, stacklevel=2)
            continue
        record = load_result(path)
        key = run_id.identity_sha256(record.run_identity)
        if key in records:
            first = records[key].path
            assert first is not None  # set by load_result
            warnings.warn(f"{path} is the same run as {first.name}: counted once.",
                          SafeCacheWarning, stacklevel=2)
            continue
        records[key] = record
    return list(records.values())


def write_result(record: RunResult, path: Path) -> None:
    """Write the JSON last and whole (atomic.py: a temporary of this writer's own, renamed;
    the umask's mode, so a team can read it): a result file that exists is whole."""
    data = record.to_json()
    record.content_sha256 = data[CONTENT_FIELD] = content_sha256(data)
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False))
    record.path = path
