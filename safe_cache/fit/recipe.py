"""The training recipe: the choices the paper leaves unstated, pinned and selectable.

SAFE states AdamW, cosine over 12,800 iterations, batch 8, the lr x wd grid, early stopping every
100 iterations on the min(n, 4)-shot val set and beta 0.5, and says it follows Tip-Adapter and
Cross-Modal Fine-tuning (github.com/linzhiqiu/cross_modal_adaptation, whose partial fine-tuning
of attnpool / the last ViT block SAFE's grid, iterations, batch and early stopping copy). The
rest is fixed here, with its source:

- logit_scale: the loss's inverse temperature. Cross-Modal's LogitHead for partial fine-tuning:
  a fixed exp(4.0) ~ 54.6 on L2-normalised features (`None`: the backbone's own, CLIP's 100).
- warmup: Cross-Modal's LinearWarmupScheduler (`warmup_iter` 50, `warmup_min_lr` 1e-5) around
  CosineAnnealingLR(T_max = iterations): 0-based iteration i trains at 1e-5 for i = 0 (whatever
  the base lr), base * i / 50 for i < 50, then base * (1 + cos(pi * (i - 50) / T)) / 2.
- train_views: Cross-Modal trains on the center crop and its horizontal flip ("center+flip", 2
  samples per image); "stored" is the store's augmented views (random resized crops, 10 per
  image), "all" both.
- sampling: Cross-Modal's shuffled DataLoader, re-iterated each epoch, dropping the last partial
  batch ("epoch"); "replace" draws every batch with replacement.
- eval_first: Cross-Modal evaluates after the update of every iteration i with i % 100 == 0
  from i = 0 (the last iteration is not evaluated unless it falls on that schedule); False
  evaluates after 100, 200, ... updates and after the last one.
- text_average: Tip-Adapter (whose templates SAFE uses) normalises each sentence's embedding,
  averages and normalises ("normalised"); Cross-Modal averages the raw embeddings and then
  normalises ("raw"). Only ImageNet has several templates per class, so only ImageNet differs.

SAFE's Algorithm 1 updates only AttnPool_F, so the text classifier stays frozen in every recipe
(Cross-Modal also trains its text-initialised linear head). Presets: `safe` (the default: the
paper's stated values, Cross-Modal's for the rest) and `views` (safe-cache 0.1's behaviour, for
comparison).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import RecipeError

TRAIN_VIEWS = ("center+flip", "stored", "all")
SAMPLING = ("epoch", "replace")
TEXT_AVERAGE = ("normalised", "raw")
CROSS_MODAL_LOGIT_SCALE = math.exp(4.0)


@dataclass(frozen=True)
class Recipe:
    name: str = "safe"
    logit_scale: float | None = CROSS_MODAL_LOGIT_SCALE  # None: the backbone's own
    warmup: int = 50  # iterations of linear warmup (0: none)
    warmup_min_lr: float = 1e-5  # the lr of iteration 0 when warming up
    train_views: str = "center+flip"
    sampling: str = "epoch"
    eval_first: bool = True
    text_average: str = "normalised"

    def check(self) -> Recipe:
        """One line naming the bad value and the choices, for anything out of range."""
        for name, value, choices in (("train_views", self.train_views, TRAIN_VIEWS),
                                     ("sampling", self.sampling, SAMPLING),
                                     ("text_average", self.text_average, TEXT_AVERAGE)):
            if value not in choices:
                raise RecipeError(f"--{name.replace('_', '-')} {value!r} is not one of"
                                  f" {', '.join(choices)}.")
        for name, value, low, high in (("logit_scale", self.logit_scale, 0, 1e4),
                                       ("warmup_min_lr", self.warmup_min_lr, 0, 1.0)):
            if value is None and name == "logit_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not low < value <= high:
                raise RecipeError(f"--{name.replace('_', '-')} {value!r} must be a finite"
                                  f" number in ({low:g}, {high:g}]"
                                  f"{' (or backbone)' if name == 'logit_scale' else ''}.")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) \
                or not 0 <= self.warmup <= 1_000_000:
            raise RecipeError(f"--warmup {self.warmup!r} must be a whole number of iterations"
                              f" >= 0.")
        if not isinstance(self.eval_first, bool):
            raise RecipeError(f"eval_first {self.eval_first!r} must be true or false.")
        return self

    def record(self) -> dict[str, Any]:
        """The `recipe` block of a result."""
        return asdict(self)

    def lr_factor(self, base_lr: float, total: int):
        """The multiplier of `base_lr` at 0-based iteration i (a LambdaLR lambda)."""
        warmup, floor = self.warmup, self.warmup_min_lr

        def factor(i: int) -> float:
            if i < warmup:
                return floor / base_lr if i == 0 else i / warmup
            return (1 + math.cos(math.pi * (i - warmup) / total)) / 2

        return factor


PRESETS = {
    "safe": Recipe(),
    "views": Recipe(name="views", logit_scale=None, warmup=0, train_views="stored",
                    sampling="replace", eval_first=False, text_average="normalised"),
}


def make_recipe(preset: str = "safe", **overrides: Any) -> Recipe:
    """A preset with some values changed (None: not given; logit_scale "backbone": the
    backbone's own); a changed preset is named `<preset>+<field>=<value>` so its results never
    overwrite the preset's own."""
    if preset not in PRESETS:
        raise RecipeError(f"--recipe {preset!r} is not one of {', '.join(PRESETS)}.")
    base = PRESETS[preset]
    known = {f.name for f in fields(Recipe)} - {"name"}
    unknown = set(overrides) - known
    if unknown:
        raise RecipeError(f"Unknown recipe fields {sorted(unknown)}; known: {sorted(known)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("logit_scale") == "backbone":
        given["logit_scale"] = None
    changed = {k: v for k, v in given.items() if getattr(base, k) != v}
    name = preset + "".join(f"+{k}={_short(v)}" for k, v in sorted(changed.items()))
    return replace(base, name=name, **changed).check()


def _short(value: Any) -> str:
    """A value as file names can hold it (no dots: result files are named by recipe)."""
    if value is None:
        return "backbone"
    return (f"{value:g}" if isinstance(value, float) else str(value)).replace(".", "p")


def recipe_of(record: Any) -> Recipe:
    """The recipe a result was made with: its `recipe` block, less what the run adds to it
    (`loss_logit_scale`, the scale its loss used)."""
    known = {f.name for f in fields(Recipe)}
    return Recipe(**{k: v for k, v in record.recipe.items() if k in known})
