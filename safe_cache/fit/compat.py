"""Compatibility with earlier result formats: the one module that reads what an earlier
safe-cache wrote differently from today's results.

What is read here, and why each is kept:

- `RETIRED_FIELDS`: `scheduler` and `local_workers` in a result's `config` block. Results
  written by 0.2.0 before the one executor (runtime/execution.py) recorded them as fit options;
  where runs execute is now one `Execution` for a whole command, not a `FitConfig` field.
  `FitConfig.from_dict` drops them: they never changed a number (they are in no run identity),
  and the result's `content_sha256` still covers them as they were written.
"""

from __future__ import annotations

from typing import Any

RETIRED_FIELDS = ("scheduler", "local_workers")


def without_retired(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded `config` block less the fields fit no longer takes (RETIRED_FIELDS)."""
    return {name: value for name, value in config.items() if name not in RETIRED_FIELDS}
