"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU; any other name is torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
