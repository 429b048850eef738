"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU; any other name is torch's, checked
    against what this machine has (one line naming the fix, not a CUDA traceback later)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or"
                          f" cuda:N.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA GPU on this machine; use"
                              f" --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()}"
                              f" GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N.")
    return device


def out_of_memory_reason(exc: BaseException) -> str:
    """The first line of a device out-of-memory error (torch's run to several), for a
    one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else "out of memory"
