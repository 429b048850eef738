"""What `safe-cache fit` takes: one frozen dataclass, defaults the paper's protocol.

`to_dict` is the `config` block a result records; `from_dict` reads one back strictly (a missing
or unknown field, a wrong type or an out-of-range value is an error naming the file and the
field; the fields 0.2.0 recorded and fit no longer takes are dropped: compat.py), checking the
values only: a result fitted on a GPU machine reads on a CPU one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RecipeError
from ..runtime import checks
from .compat import with_added, without_retired
from .methods import DEFAULT_METHODS, OPTIONAL_METHODS, REFERENCE_METHODS
from .recipe import PRESETS, Recipe

DEFAULT_BETAS = tuple(round(0.1 * i, 1) for i in range(11))
# Bounds of the values fit takes (FitConfig.__post_init__): generous, but finite.
MAX_SHOTS, MAX_LR, MAX_WD, MAX_BETA = 10_000, 1.0, 10.0, 1e6  # beta 1e6: the original alone
MAX_GRID, MAX_BETAS, MAX_ITERS, MAX_BATCH, MAX_TIP_EPOCHS = 64, 1001, 10_000_000, 65_536, 10_000


@dataclass(frozen=True)
class FitConfig:
    store: str
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    lrs: tuple[float, ...] = (1e-4, 1e-5, 1e-6, 1e-7)
    wds: tuple[float, ...] = (0.0, 1e-3, 1e-5)
    iters: int = 12_800
    batch_size: int = 8
    eval_every: int = 100
    beta: float = 0.5
    betas: tuple[float, ...] = DEFAULT_BETAS
    blend: str = "blend"  # or "each": normalise each branch, then blend
    prompts: str = "hand"
    classifier: str = "text"  # "linear": fine-tuned on the few-shot images first (fit/text.py)
    device: str = "auto"
    out: str = "results"
    force: bool = False
    test_chunk: int = 256
    methods: tuple[str, ...] = DEFAULT_METHODS  # besides zero-shot and SAFE, which always run
    tip_epochs: int | None = None  # Tip-Adapter-F / SAFE-A epochs (None: the dataset spec's)
    select_on: str = "val"  # where Tip-Adapter-F / SAFE-A choose their epoch ("test": reference)
    protocol: str = "ours"  # "reference": Tip-Adapter(-F) and GDA as their code runs (baselines)
    recipe: Recipe = field(default_factory=lambda: PRESETS["safe"])  # the unstated choices
    eval_ood: tuple[str, ...] = ()  # ImageNet variants (names or store URLs) to test on
    storage_options: dict | None = None
    cache: str | None = None  # a local folder keeping the feature chunks read from the store
    cuda_graph: bool = True  # on CUDA, replay the training step as one captured graph (step.py)
    partial: bool = False  # evaluate a test split with unwritten units on the rows it has

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The (lr, wd) configurations in training order: lr-major, as results list them."""
        return [(lr, wd) for lr in self.lrs for wd in self.wds]

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON holds it (tuples as lists, the recipe as its record)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> FitConfig:
        """A recorded config, checked as `__post_init__` checks a new one, less what depends on
        this machine (the device, the output folder)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the config is not a JSON object.")
        known = [f.name for f in fields(cls)]
        data = with_added(without_retired(data))  # compat.py: results of 0.2.0
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: config field '{unknown[0]}' is not a fit option.")
        missing = sorted(set(known) - set(data))
        if missing:  # every result of this safe-cache records every option
            raise ConfigError(f"{source}: the config lacks the field '{missing[0]}'.")
        config = cls.__new__(cls)
        for name in known:
            value = data[name]
            if name == "recipe" and isinstance(value, dict):
                try:
                    value = Recipe(**value)
                except TypeError as exc:
                    raise ConfigError(f"{source}: config.recipe: {exc}.") from None
            elif isinstance(value, list):
                value = tuple(value)
            object.__setattr__(config, name, value)
        try:
            config._check_values()
        except (ConfigError, RecipeError) as exc:
            raise ConfigError(f"{source}: config: {exc}") from None
        return config

    def __post_init__(self) -> None:
        """Every value finite and in range before any work (one line naming the option
        otherwise); the device exists, --out is not a file."""
        self._check_values()
        from ..data.prompts import check_prompt_set_name  # torch: only when a config is made

        check_prompt_set_name(self.prompts, ConfigError)
        if "://" not in self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder: choose another --out.")
        from ..runtime.device import resolve_device  # torch: only when a config is made

        resolve_device(self.device)

    def _check_values(self) -> None:
        """Types and ranges. The upper bounds are far beyond any sensible value: they catch
        typos (`--lr 1e308`) and runs that would never end (`--betas 0:1:1e-7`)."""
        for name in ("store", "prompts", "classifier", "device", "out"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{checks.option(name)} {getattr(self, name)!r}: must be a"
                                  f" text.")
        if not isinstance(self.recipe, Recipe):
            raise ConfigError(f"recipe {self.recipe!r:.60} is not a fit recipe.")
        checks.each("shots", self.shots, 1, example="1,2,4,8,16", high=MAX_SHOTS)
        checks.each("seeds", self.seeds, 0, example="1,2,3")
        checks.each("lr", self.lrs, 0, strict=True, example="1e-4,1e-5", high=MAX_LR,
                    most=MAX_GRID)
        checks.each("wd", self.wds, 0, example="0,1e-3", high=MAX_WD, most=MAX_GRID)
        if len(self.lrs) * len(self.wds) > MAX_GRID:
            raise ConfigError(f"--lr x --wd: {len(self.lrs) * len(self.wds)} configurations,"
                              f" at most {MAX_GRID} train at once; split the grid.")
        checks.each("betas", self.betas, 0, example="0:1:0.1", high=MAX_BETA, most=MAX_BETAS)
        checks.at_least("iters", self.iters, 1, high=MAX_ITERS)
        checks.at_least("batch_size", self.batch_size, 1, high=MAX_BATCH)
        checks.at_least("eval_every", self.eval_every, 1)
        checks.at_least("beta", self.beta, 0, high=MAX_BETA)
        checks.at_least("test_chunk", self.test_chunk, 1)
        if not self.out:
            raise ConfigError("--out is empty: name the results folder.")
        if self.tip_epochs is not None:
            checks.at_least("tip_epochs", self.tip_epochs, 1, high=MAX_TIP_EPOCHS)
        checks.whole_numbers(self, ("iters", "batch_size", "eval_every", "test_chunk"))
        checks.one_of("blend", self.blend, ("blend", "each"))
        checks.one_of("classifier", self.classifier, ("text", "linear"))
        checks.one_of("select_on", self.select_on, ("val", "test"))
        checks.one_of("protocol", self.protocol, ("ours", "reference"))
        if self.protocol == "reference" and not set(REFERENCE_METHODS) & set(self.methods):
            raise ConfigError(f"--protocol reference changes only {', '.join(REFERENCE_METHODS)},"
                              f" and --methods names none of them: add one, or drop"
                              f" --protocol (the run would be ours under another name).")
        checks.subset_of("methods", self.methods, OPTIONAL_METHODS)
        for name in ("force", "cuda_graph", "partial"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{checks.option(name)} {getattr(self, name)!r}: must be"
                                  f" true or false.")
        self.recipe.check()
