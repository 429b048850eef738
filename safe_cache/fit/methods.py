"""The methods a run holds, listed once: zero-shot and SAFE always run; the others are optional
(`fit --methods`). Kept apart from results.py so the config can name them without importing
the result record."""

from __future__ import annotations

ALWAYS = ("zero_shot", "safe")
OPTIONAL_METHODS = ("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe")
METHODS = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "safe", "safe_a")
METHOD_LABELS = {"zero_shot": "zero-shot", "linear_probe": "lin. probe", "tip_adapter": "Tip",
                 "tip_adapter_f": "Tip-F", "safe": "SAFE", "safe_a": "SAFE-A"}
