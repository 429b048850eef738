"""Compatibility with earlier result formats: the one module that reads what an earlier
safe-cache wrote differently from today's results.

Only the 0.2 line is read. safe-cache 0.1.0 was never released on its own (CHANGELOG.md), so no
0.1 result can exist outside this repository, and nothing here reads one. A result without the
checksums every 0.2 result carries (0.1's lack `identity`, `identity_sha256` and
`content_sha256`; its first ones also the `recipe` block and `run_id`, under the plain name
`shots<K>_seed<S>.json`) is refused on read with one line naming the file and the fix
(results.py: ResultFormatError), and fit takes such a file at a run's path for another run's:
it recomputes the run, with a note (runs.py).

What the 0.2 line wrote differently and is still read here, and why each is kept:

- `RETIRED_FIELDS`: `scheduler` and `local_workers` in a result's `config` block. Results
  written by 0.2.0 before the one executor (runtime/execution.py) recorded them as fit options;
  where runs execute is now one `Execution` for a whole command, not a `FitConfig` field.
  `FitConfig.from_dict` drops them: they never changed a number (they are in no run identity),
  and the result's `content_sha256` still covers them as they were written.
- `ADDED_FIELDS`: fit options added after 0.2.0, with the value every 0.2.0 run had
  (`protocol`: "ours"; `classifier`: "text", the prompt set's frozen classifier, from before
  Linear Fine-tuning). `FitConfig.from_dict` fills them in, and a run's identity holds such an
  option only when it differs from that value (identity.py), so an earlier result keeps its
  identity and is neither refused nor recomputed.
- `OOD_PREDICTORS_ADDED`: methods that had no OOD predictor in earlier results and have one
  now (the training-free Tip-Adapter). An `--eval-ood` result holding such a method without
  its OOD accuracies is run again (results.ood_gaps), not reused without them; its identity
  is unchanged (the numbers it holds are right), so nothing else about it is refused.
"""

from __future__ import annotations

from typing import Any

RETIRED_FIELDS = ("scheduler", "local_workers")


def without_retired(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded `config` block less the fields fit no longer takes (RETIRED_FIELDS)."""
    return {name: value for name, value in config.items() if name not in RETIRED_FIELDS}


ADDED_FIELDS: dict[str, Any] = {"protocol": "ours", "classifier": "text"}


def with_added(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded `config` block with the options added since 0.2.0 at their 0.2.0 value."""
    return {**ADDED_FIELDS, **config}


OOD_PREDICTORS_ADDED = ("tip_adapter",)
