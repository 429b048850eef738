"""What one backbone family owns, as a base class: its file subclasses `Family` and nothing else
in safe-cache needs to know the family exists.

A family is one way an open_clip visual tower pools its tokens. It recognises its towers twice,
from a model config (before anything is built or downloaded: `safe-cache models`, study specs)
and from a built module (the truth, after the weights are in), and for a tower it recognises it
says where the trunk ends (`head_stages`), builds the trunk, the fast head and the naive
reference head, and reports the dense map's shape (token grid, prefix tokens, channels).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ModelConfigError
from ..heads import GridHead

Config = dict[str, Any]  # an open_clip model config: {embed_dim, vision_cfg, text_cfg, ...}


class Trunk(nn.Module):
    """The frozen part of the visual tower: images (B, 3, H, W) -> dense tokens (B, T, C).

    Holds references to the model's own modules (no copies). Always runs without gradients:
    extract stores its output and nothing ever trains through it.
    """

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Family:
    """One family's rules. Subclasses set the class attributes and implement the methods below;
    `@register_family` (families/registry.py) makes them known.

    `stages` is what `head_stages(cut)` returned: how many of the tower's stages the head owns
    (1 for the paper's cut, 'pool'). Every method that takes `visual` takes open_clip's built
    `model.visual`, whose weights may or may not be loaded yet.
    """

    name: ClassVar[str]  # the backbone card's `family`: stores record it, so never rename one
    description: ClassVar[str]  # what `Supported: ...` messages and the docs say it covers
    tiny_models: ClassVar[tuple[str, ...]] = ()  # shipped configs (model_configs/), ms to build
    example_models: ClassVar[tuple[str, ...]] = ()  # real open_clip names the slow tests check
    cuts: ClassVar[str] = "'pool' (the attention pool and what follows it)"  # for the error
    # The dense map is post-ReLU (ResNets): tests draw non-negative maps, as extract stores them.
    nonnegative_dense: ClassVar[bool] = False
    # Attention keys beyond the dense map's tokens (a ResNet's mean token comes first).
    extra_attention_keys: ClassVar[int] = 0

    # --- detection: one rule from a config, one from a module -------------------------------

    def claims_config(self, config: Config) -> bool:
        """True when an open_clip config builds a tower of this family (split or not)."""
        raise NotImplementedError

    def config_problem(self, config: Config) -> str:
        """Why a claimed config cannot be split ('' when it can): the first reason found."""
        return ""

    def claims_module(self, visual: nn.Module) -> bool:
        """True when a built visual tower is of this family (split or not)."""
        raise NotImplementedError

    def module_problems(self, visual: nn.Module) -> list[str]:
        """Why a claimed tower cannot be split exactly (empty when it can)."""
        return []

    def module_label(self, visual: nn.Module) -> str:
        """How a refusal names the tower ('This VisionTransformer', 'The MAP head of ...')."""
        return f"This {type(visual).__name__}"

    # --- the split ----------------------------------------------------------------------------

    def head_stages(self, cut: str) -> int:
        """How many stages the head owns for `cut`; a clear error for a cut this family lacks."""
        stages = 1 if cut == "pool" else self.more_cuts(cut)
        if stages is None:
            raise ModelConfigError(f"Unknown cut '{cut}' for a {self.name} backbone: use"
                                   f" {self.cuts}.")
        return stages

    def more_cuts(self, cut: str) -> int | None:
        """The head's stages for a cut other than 'pool', or None for one this family lacks."""
        return None

    def trunk(self, visual: nn.Module, stages: int) -> Trunk:
        raise NotImplementedError

    def token_grid(self, visual: nn.Module, stages: int) -> tuple[int, int]:
        """(H, W) of the dense map's spatial tokens (prefix tokens come on top)."""
        raise NotImplementedError

    def prefix_tokens(self, visual: nn.Module) -> int:
        """Tokens of the dense map before the patch grid (class token, registers)."""
        return 0

    def dense_channels(self, visual: nn.Module, stages: int) -> int:
        raise NotImplementedError

    def fast_head(self, visual: nn.Module, token_grid: tuple[int, int], stages: int) -> GridHead:
        """The exact fast head (what fit trains): open_clip's parameter names, relative to
        `model.visual`, so a tuned state dict loads back into the model."""
        raise NotImplementedError

    def reference_head(self, visual: nn.Module, token_grid: tuple[int, int],
                       stages: int) -> nn.Module:
        """The naive reference: open_clip's (or timm's) own modules, copied, same state-dict
        keys as the fast head; what the exactness tests and the benchmarks compare against."""
        raise NotImplementedError


def last_blocks(cut: str) -> int | None:
    """N of a 'lastN' cut (N >= 1), the transformer families' ablation; None for anything else."""
    digits = cut[4:]
    if cut.startswith("last") and digits.isdigit() and int(digits) >= 1:
        return int(digits)
    return None
