"""The one rule for a name that becomes part of a path: a dataset name read from a manifest, a
result's recipe, a study or model label. It must be a plain name: one path component, not
`.` or `..`, no separator, no NUL or control character, not starting with `~`, at most 200
characters. Anything else is refused before any read, write or delete, so an edited manifest
(`"name": "../../../x"`) can never make fit write outside its --out.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

MAX_NAME = 200


def plain_name_problem(value: object) -> str | None:
    """Why `value` is not a plain name (None when it is)."""
    if not isinstance(value, str) or not value:
        return "is not a non-empty text"
    if value in (".", "..") or value.startswith("~"):
        return "is a path, not a name"
    if "/" in value or "\\" in value:
        return "holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "holds a control character"
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    return None


def plain_name(value: object, what: str, error: type[Exception] = ConfigError) -> str:
    """`value` if it is a plain name, else `error` naming `what` (where the name came from)."""
    problem = plain_name_problem(value)
    if problem:
        raise error(f"{what} {value!r} {problem}: it becomes a folder or file name, so it must"
                    f" be a plain name (letters, digits, '-', '_', '.', no '/' or '..').")
    return str(value)


def inside(root: str | Path, *parts: str, what: str = "name",
           error: type[Exception] = ConfigError) -> Path:
    """`root / parts...` with each part a plain name, checked to resolve inside `root`."""
    path = Path(root)
    for part in parts:
        path = path / plain_name(part, what, error)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):  # a symlinked part leaving the root
        raise error(f"{what}: {path} resolves outside {root}; nothing was written.")
    return path
