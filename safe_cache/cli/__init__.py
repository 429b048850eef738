"""The `safe-cache` command line: a thin click layer over library functions.

Each command parses options, calls one library function, and renders its result (a rich table,
or JSON with `--json`). app.py holds the group, its error handling and the shared options; each
other module registers the commands of one panel of the help.
"""

from __future__ import annotations

from . import backbones, datasets, outputs, stages, stores, study  # noqa: F401  (each registers its commands)
from .app import main

__all__ = ["main"]
