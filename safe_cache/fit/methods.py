"""The methods a run holds, listed once: zero-shot and SAFE always run; the others are optional
(`fit --methods`). Kept apart from results.py so the config can name them without importing
the result record."""

from __future__ import annotations

ALWAYS = ("zero_shot", "safe")
# The adapters fit runs unless told otherwise (adapters.py).
DEFAULT_METHODS = ("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe")
# The workbench (workbench/, one module each): opt-in, `fit --methods gda,lp_pp` or a study's
# `methods`; `workbench` names them all.
WORKBENCH_METHODS = ("gda", "lp_pp", "clap", "prolip", "cross_modal_lp", "clip_adapter")
OPTIONAL_METHODS = DEFAULT_METHODS + WORKBENCH_METHODS
METHODS = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "safe", "safe_a",
           *WORKBENCH_METHODS)
METHOD_LABELS = {"zero_shot": "zero-shot", "linear_probe": "lin. probe", "tip_adapter": "Tip",
                 "tip_adapter_f": "Tip-F", "safe": "SAFE", "safe_a": "SAFE-A", "gda": "GDA",
                 "lp_pp": "LP++", "clap": "CLAP", "prolip": "ProLIP",
                 "cross_modal_lp": "Cross-Modal LP", "clip_adapter": "CLIP-Adapter"}
# The methods whose authors' code selects differently from our protocol in a way that moves
# numbers; `fit --protocol reference` runs them that way (the others run as ours either way).
REFERENCE_METHODS = ("tip_adapter", "tip_adapter_f", "gda")
GROUPS = {"workbench": WORKBENCH_METHODS, "all": OPTIONAL_METHODS, "none": ()}


def expand_methods(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`fit --methods` and a study's `methods` as names: the groups (workbench, all, none)
    spelt out, zero-shot and SAFE (which always run) dropped, each name once, in order."""
    out: list[str] = []
    for name in names:
        out.extend(GROUPS.get(name, (name,)))
    return tuple(dict.fromkeys(m for m in out if m and m not in ALWAYS))
