"""The one rule for a name that becomes part of a path: a dataset name read from a manifest or a
spec, a source's file name, a result's recipe, a study or model label. It must be a plain name:
one path component, not `.` or `..`, no separator, no NUL or control character, not starting
with `~`, at most 200 characters. A relative path (a spec's `folder`, `image_dir`, split file,
an archive's inner path, an unpack target) is a sequence of plain names joined by '/'. Anything
else is refused before any read, write or delete, so an edited manifest (`"name":
"../../../x"`) can never make fit write outside its --out, nor a spec (`"folder": "../x"`) make
fetch lay a dataset out beside its root; `inside` then checks the resolved path, so a symlink
planted inside the root cannot lead outside it either.
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


def relative_path_problem(value: object, *, allow_dot: bool = False) -> str | None:
    """Why `value` is not a relative path of plain names (None when it is); `allow_dot` admits
    '.' alone (an unpack target meaning the folder itself)."""
    if allow_dot and value == ".":
        return None
    if not isinstance(value, str) or not value:
        return "is not a non-empty text"
    if value.startswith("/") or "\\" in value or (len(value) > 1 and value[1] == ":"):
        return "is an absolute path"
    for part in value.rstrip("/").split("/"):
        problem = plain_name_problem(part)
        if problem:
            return f"has a part {part!r} that {problem}"
    return None


def relative_path(value: object, what: str, error: type[Exception] = ConfigError, *,
                  allow_dot: bool = False) -> str:
    """`value` (trailing '/' dropped) if it is a relative path of plain names, else `error`."""
    problem = relative_path_problem(value, allow_dot=allow_dot)
    if problem:
        raise error(f"{what} {value!r} {problem}: it must be a relative path inside its folder"
                    f" (plain names joined by '/', no '..', not absolute).")
    return str(value).rstrip("/") or str(value)


def within(root: str | Path, relative: str, what: str = "path",
           error: type[Exception] = ConfigError, *, allow_dot: bool = False) -> Path:
    """`root / relative` with `relative` a relative path of plain names, checked to resolve
    inside `root` (a symlinked part leaving the root is refused)."""
    relative = relative_path(relative, what, error, allow_dot=allow_dot)
    path = Path(root) / relative if relative != "." else Path(root)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise error(f"{what}: {path} resolves outside {root} (a symbolic link?); nothing was"
                    f" read or written.")
    return path


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
