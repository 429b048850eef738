"""What `safe-cache extract` takes and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..runtime import checks

if TYPE_CHECKING:  # the CLI reads these defaults for --help without zarr or torch
    from ..store import StoreLayout


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `safe-cache extract` takes; defaults are the paper's protocol."""

    dataset: str
    root: str | None = None  # the data root (None: $SAFE_CACHE_DATA, else ./data)
    model: str = "RN50"
    pretrained: str | None = "openai"
    store: str | None = None
    store_root: str | None = None  # where default stores live (None: $SAFE_CACHE_STORES, stores)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    views: int = 10
    center_flip: bool = True  # also the mirrored center view (the `safe` fit recipe trains on it)
    full_val: bool = False  # the whole val split, not only the few-shot val rows (fit's
    # --protocol reference searches on it, as the reference code of Tip-Adapter and GDA do)
    view_seed: int = 0
    prompts: str = "hand"
    device: str = "auto"
    batch_size: int = 32
    workers: int | str = "auto"  # image-decoding processes; "auto": cores - 1
    writer_threads: int = 1  # threads compressing and writing units (blosc and I/O free the GIL)
    precision: str = "fp32"
    decode: str = "workers"  # or "device": JPEGs decoded and cropped on the trunk's device
    skip_bad: bool = False
    max_pixels: int | None = None  # larger images are unreadable (None: PIL's bomb limit)
    make_split: bool = False
    takeover: bool = False
    cut: str = "pool"
    init_seed: int = 0
    quick_gelu: bool | None = None  # force QuickGELU on / off (None: from the tag or the file)
    cache_dir: str | None = None  # where open_clip caches downloaded weights (None: its own)
    storage_options: dict | None = None
    layout: StoreLayout | None = None  # a new store's chunking (None: default_layout(url))
    task_images: int = 256  # images per distributed task, rounded up to whole write units

    def __post_init__(self) -> None:
        """Every value in range before any work (one line naming the option otherwise)."""
        if isinstance(self.pretrained, str) and self.pretrained.lower() == "none":
            object.__setattr__(self, "pretrained", None)  # as the CLI takes it: random weights
        checks.each("shots", self.shots, 1, example="1,2,4,8,16")
        checks.each("seeds", self.seeds, 0, example="1,2,3")
        from ..data.prompts import check_prompt_set_name  # torch: only when a config is made
        from ..errors import ConfigError

        check_prompt_set_name(self.prompts, ConfigError)
        checks.at_least("views", self.views, 0)
        checks.at_least("batch_size", self.batch_size, 1)
        if self.workers != "auto":  # another text is refused by checks.number
            checks.at_least("workers", checks.number("workers", self.workers), 0)
        checks.at_least("writer_threads", self.writer_threads, 1)
        checks.at_least("task_images", self.task_images, 1)
        if self.max_pixels is not None:
            checks.at_least("max_pixels", self.max_pixels, 1)
        checks.whole_numbers(self, ("views", "batch_size", "writer_threads", "task_images",
                                    "view_seed", "init_seed"))
        checks.at_least("views", self.views, 0, high=1000)
        checks.one_of("precision", self.precision, ("fp32", "fp16", "bf16"))
        checks.one_of("decode", self.decode, ("workers", "device"))
        from ..runtime.device import resolve_device  # torch: only when a config is made

        resolve_device(self.device)


@dataclass
class ExtractReport:
    store: str
    rows: dict[str, int] = field(default_factory=dict)
    extracted: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # the whole call: loading the backbone, the classifier, the store
    pipeline_seconds: dict[str, float] = field(default_factory=dict)  # per split: read->write
