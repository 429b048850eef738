"""The result record: one JSON per (dataset, backbone, shots, seed) run, as CLIP_benchmark keeps
one per run, written by fit and read by report, export, attention and the tests.

`<out>/<dataset>/<model>-<weights>/shots<K>_seed<S>_<recipe>.json` (`..._test-selected.json`
when Tip-Adapter-F and SAFE-A chose their epoch on test), beside it the fine-tuned head
(`.safetensors`) and SAFE-A's trained cache (`.safe_a.safetensors`). Files of safe-cache 0.1
(`shots<K>_seed<S>.json`, no recipe block) were made by the `views` recipe and are read as such.
The JSON is written last and by rename, so a result that exists is whole. `RunResult.from_json`
checks the shape on every read: a malformed or foreign file is an error naming the file, never a
KeyError deep in report.

The methods a run holds are listed here, once: zero-shot and SAFE always run; the others are
optional (`fit --methods`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ResultError
from ..store.paths import backbone_label

ALWAYS = ("zero_shot", "safe")
OPTIONAL_METHODS = ("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe")
METHODS = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "safe", "safe_a")
METHOD_LABELS = {"zero_shot": "zero-shot", "linear_probe": "lin. probe", "tip_adapter": "Tip",
                 "tip_adapter_f": "Tip-F", "safe": "SAFE", "safe_a": "SAFE-A"}
FILE_PATTERN = "shots*_seed*.json"
OPTIONAL_FIELDS = ("ood", "recipe", "curves", "run_id", "execution")  # absent in older results


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
    timings: dict[str, float]
    train_samples: int
    test_images: int
    norm_ratio_finetuned_over_original: float
    ood: dict[str, dict[str, Any]] | None = None
    recipe: dict[str, Any] | None = None  # fit.recipe.Recipe.record(); None: safe-cache 0.1
    curves: dict[str, list] | None = None  # per evaluation: iters, val_acc[G], train_loss[G]
    run_id: str | None = None  # also in the head's and cache's metadata: files of one run
    execution: dict[str, Any] | None = None  # device, graphed (CUDA graph), why_eager
    # Not written: where the record was read from, and whether fit found it already done.
    path: Path | None = field(default=None, compare=False)
    skipped: bool = field(default=False, compare=False)

    @property
    def recipe_name(self) -> str:
        """The recipe that made the run (results without a recipe block: `views`)."""
        return (self.recipe or {}).get("name", "views")

    @property
    def selected_on(self) -> str:
        """Where Tip-Adapter-F and SAFE-A chose their epoch: "val", or "test" (reference)."""
        return self.config.get("select_on", "val")

    @property
    def backbone_label(self) -> str:
        """`<model>-<weights>`: the results folder the run lives in."""
        return self.path.parent.name if self.path else self.backbone["model"]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path"), data.pop("skipped")
        for optional in OPTIONAL_FIELDS:
            if data[optional] is None:
                data.pop(optional)
        return data

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "<result>") -> RunResult:
        """A record from its JSON, checked: every field present with the right type, every
        method with val_acc and test_acc in [0, 1]."""
        if not isinstance(data, dict):
            raise ResultError(f"{source} is not a fit result (a JSON object is expected).")
        names = {f.name for f in fields(cls)} - {"path", "skipped"}
        required = names - set(OPTIONAL_FIELDS)
        missing = sorted(required - set(data))
        if missing:
            raise ResultError(f"{source} is not a fit result of this safe-cache: it lacks"
                              f" {', '.join(missing)}. Fit it again (--force) to rewrite it.")
        record = cls(**{name: data[name] for name in names if name in data})
        record._check(source)
        return record

    def _check(self, source: str | Path) -> None:
        if not isinstance(self.methods, dict) or not self.methods:
            raise ResultError(f"{source}: 'methods' holds no method.")
        for name, values in self.methods.items():
            for key in ("val_acc", "test_acc"):
                value = values.get(key) if isinstance(values, dict) else None
                if not isinstance(value, (int, float)) or not 0 <= value <= 1 \
                        or math.isnan(value):
                    raise ResultError(f"{source}: methods.{name}.{key} is {value!r}, not an"
                                      f" accuracy in [0, 1].")
        if not isinstance(self.shots, int) or not isinstance(self.seed, int):
            raise ResultError(f"{source}: shots and seed must be integers.")


def result_path(out: str | Path, manifest: dict[str, Any], shots: int, seed: int,
                recipe: str = "safe", select_on: str = "val") -> Path:
    """Where the run of a store (its manifest) for (shots, seed) and a recipe is written."""
    selected = "" if select_on == "val" else "_test-selected"
    return (Path(out) / manifest["dataset"]["name"] / backbone_label(manifest["backbone"])
            / f"shots{shots}_seed{seed}_{recipe}{selected}.json")


def head_file(path: Path) -> Path:
    """The fine-tuned head saved beside a result JSON."""
    return path.with_suffix(".safetensors")


def cache_file(path: Path) -> Path:
    """SAFE-A's trained cache saved beside a result JSON."""
    return path.with_suffix(".safe_a.safetensors")


def files_problem(record: RunResult) -> str | None:
    """Why the files beside a result are not the ones its run wrote (None when they are): a
    run killed between writing its head and its JSON leaves a new head beside an old JSON;
    each file carries the run's id."""
    from safetensors import safe_open

    wanted = [head_file(record.path)] + ([cache_file(record.path)] if "safe_a" in
                                         record.methods else [])
    for path in wanted:
        if not path.is_file():
            return f"{path.name} is missing"
        if record.run_id is None:  # safe-cache 0.1 results carry no run id
            continue
        try:
            with safe_open(str(path), framework="numpy") as handle:
                run_id = (handle.metadata() or {}).get("run_id")
        except Exception as exc:  # a truncated or foreign file
            return f"{path.name} is not a readable safetensors file ({exc!s:.80})"
        if run_id != record.run_id:
            return f"{path.name} belongs to another run than {record.path.name}"
    return None


def load_result(path: str | Path) -> RunResult:
    """Read and check one result JSON; a missing or malformed file is a ResultError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ResultError(f"No fit result at {path}.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} is not readable JSON ({exc}); fit it again with"
                          f" --force, or remove it.") from exc
    record = RunResult.from_json(data, path)
    record.path = path
    return record


def whole_result(path: str | Path) -> RunResult | None:
    """The run at `path` when its result and every file it names are there (a run to skip),
    None when it is still to do; a malformed JSON stays a ResultError."""
    path = Path(path)
    existing = load_result(path) if path.is_file() else None
    return existing if existing is not None and files_problem(existing) is None else None


def load_results(folder: str | Path) -> list[RunResult]:
    """Every run's record under `folder` (results/<dataset>/<backbone>/shots<K>_seed<S>.json)."""
    return [load_result(path) for path in sorted(Path(folder).rglob(FILE_PATTERN))]


def write_result(record: RunResult, path: Path) -> None:
    """Write the JSON last and by rename: a result file that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.part")
    temporary.write_text(json.dumps(record.to_json(), indent=2))
    temporary.replace(path)
    record.path = path
