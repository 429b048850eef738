"""The command group, its error handling, and the options several commands share.

A `SafeCacheError` (and an I/O failure a user can fix) is printed as a one-paragraph message with
exit status 2, not a traceback; SafeCacheWarnings print as one line.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import rich_click as click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .._version import __version__
from ..errors import SafeCacheError, SafeCacheWarning

console = Console()
err_console = Console(stderr=True)

click.rich_click.TEXT_MARKUP = "rich"
click.rich_click.SHOW_ARGUMENTS = True
# The type goes after the help text, not in a column of its own: at 80 columns a metavar column
# ("INTEGER RANGE [x>=1]") squeezed the option names until rich folded them mid-word.
click.rich_click.OPTIONS_TABLE_COLUMN_TYPES = ["required", "opt_long", "opt_short", "help"]
click.rich_click.OPTIONS_TABLE_HELP_SECTIONS = ["help", "metavar", "required", "envvar", "default"]


_REPEATS: dict[tuple[str, int], list] = {}  # (file, line) -> [first message, how many more]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """SafeCacheWarnings as one readable line on stderr; the same warning again (one per class
    of a dataset, say) is counted, and said once at the end (`_say_repeats`); others as Python
    prints them."""
    if not issubclass(category, SafeCacheWarning):
        _default_showwarning(message, category, filename, lineno, file, line)
        return
    seen = _REPEATS.setdefault((filename, lineno), [str(message), 0])
    if seen[1] == 0 and seen[0] == str(message):
        seen[1] = 1
        err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False,
                          soft_wrap=True)
    else:
        seen[1] += 1


def _say_repeats() -> None:
    for first, count in _REPEATS.values():
        if count > 1:
            err_console.print(f"[bold yellow]warning:[/] {count - 1} more like: {escape(first)}",
                              highlight=False, soft_wrap=True)
    _REPEATS.clear()


_default_showwarning = warnings.showwarning


OBJECT_STORE_CLIENTS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs")  # their errors
_IO_FIXES = {
    errno.ENOSPC: "free some space (or write elsewhere) and run the command again: it resumes",
    errno.EDQUOT: "free some of your quota and run the command again: it resumes",
    errno.EACCES: "check the permissions, or write elsewhere",
    errno.EPERM: "check the permissions, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOTDIR: "a path that should be a folder is a file: choose another path",
    errno.EISDIR: "a path that should be a file is a folder: choose another path",
    errno.EEXIST: "the path exists and is not what is needed: choose another path",
    errno.ENAMETOOLONG: "the path is longer than the file system allows: choose a shorter one",
}


def io_message(exc: OSError) -> str | None:
    """One line for an I/O failure a user can fix (disk full, permissions, a file where a folder
    belongs), naming the file; None for anything else."""
    fix = _IO_FIXES.get(exc.errno)
    if fix is None:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    return f"{exc.strerror or exc}: {where}. {fix}."


class SafeCacheGroup(click.RichGroup):
    """Turns SafeCacheError, bad option values (click's UsageError) and I/O failures a user can
    fix into one clear line and exit status 2, warnings into one line."""

    def invoke(self, ctx: click.Context) -> Any:
        previous, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            return super().invoke(ctx)
        except SafeCacheError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            sys.exit(2)
        except click.UsageError as exc:  # a bad option value: one line too, not a box
            where = exc.ctx.command_path if exc.ctx is not None else "safe-cache"
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())} (`{where}"
                              f" -h` for help)", highlight=False, soft_wrap=True)
            sys.exit(2)
        except OSError as exc:
            message = io_message(exc)
            if message is None:
                raise
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in OBJECT_STORE_CLIENTS:
                raise
            reason = " ".join(str(exc).split())[:200]
            err_console.print(
                f"[bold red]error:[/] the object store refused the request"
                f" ({type(exc).__name__}: {escape(reason)}). Check its credentials (S3:"
                f" AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws), its endpoint, or pass"
                f" them with --storage-options '{{\"key\": ..., \"secret\": ...}}'.",
                highlight=False, soft_wrap=True)
            sys.exit(2)
        finally:
            _say_repeats()
            warnings.showwarning = previous


@click.group(cls=SafeCacheGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Examples:\n\nsafe-cache demo\n\nsafe-cache extract --dataset food101 --root"
             " ~/data\n\nsafe-cache fit --shots 1,2,4,8,16 && safe-cache report results/")
@click.command_panel("Backbones", commands=["backbone", "models"])
@click.command_panel("Start here", commands=["demo"])
@click.command_panel("Stage 1", commands=["extract"])
@click.command_panel("Stage 2", commands=["fit", "report"])
@click.command_panel("Use a model", commands=["export", "predict"])
@click.command_panel("Look inside", commands=["attention", "correspond"])
@click.command_panel("Datasets", commands=["datasets"])
@click.command_panel("Studies", commands=["study"])
@click.command_panel("Stores", commands=["info", "ls", "verify", "copy"])
@click.version_option(__version__, prog_name="safe-cache")
def main() -> None:
    """[bold]safe-cache[/]: few-shot CLIP adaptation with SAFE from cached dense features.

    Stage 1 runs the frozen trunk of a CLIP visual encoder once per image and stores the dense
    pre-pooling maps; stage 2 trains the attention-pooling head (SAFE) and the adapters (SAFE-A)
    straight from the store.
    """


SEPARATORS = "/-_.,:@ "  # a space too: a cell of words wraps between them


def break_at_separators(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters, broken after a list's ', ' where one is
    near, else only after a separator (a path's '/', a name's '-', '_' or '.'); a run without
    one longer than `width` stays whole."""
    lines, line = [], ""
    for item in re.split(r"(?<=, )", text):
        pieces = [item] if len(item.rstrip()) <= width else \
            re.split(f"(?<=[{re.escape(SEPARATORS)}])", item)
        for piece in pieces:
            if line and len(line) + len(piece.rstrip()) > width:
                lines.append(line.rstrip())
                line, piece = "", piece.lstrip()
            line += piece
    return "\n".join([*lines, line])


def keep_whole(table: Table, *headers: str, share: float = 0.45) -> Table:
    """Names and paths in these columns are never split mid-word: each column is as wide as
    its longest cell, up to `share` of the console's width, and a longer cell breaks only
    after a separator (rich's own folding splits anywhere). Call it after the rows are in."""
    budget = max(12, int(console.width * share))
    for column in table.columns:
        if column.header not in headers:
            continue
        cells = [_broken(cell, budget) for cell in column._cells]
        column._cells = cells  # rich keeps a column's cells here (Table.add_row appends)
        column.no_wrap = True
        column.min_width = max([len(str(column.header)),
                                *(len(line) for cell in cells for line in cell.plain.splitlines())])
    return table


def _broken(cell: Any, width: int) -> Text:
    """A cell (markup or Text) broken at separators by its visible text; a style that covers
    the whole cell (a status's colour) is kept."""
    text = cell if isinstance(cell, Text) else Text.from_markup(str(cell))
    lines = break_at_separators(text.plain, width)
    if lines == text.plain:
        return text
    whole = [span.style for span in text.spans if span.start == 0 and span.end >= len(text.plain)]
    return Text(lines, style=whole[0] if whole else text.style)


def examples(*commands: str) -> str:
    """A command's help epilog: two or three command lines a user can start from."""
    return "Examples:\n\n" + "\n\n".join(commands)


def byte_size(n: int | None, unknown: str = "unknown") -> str:
    """A byte count as people read it (GB from 0.1 GB, else MB); `unknown` when None."""
    if n is None:
        return unknown
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def json_object(ctx, param, raw: str | None) -> dict | None:
    """A JSON-object option (fsspec storage options) parsed, or one line naming the option."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at character {exc.pos}): {raw!r}."
                                 f" Quote it for the shell, e.g. '{{\"anon\": true}}'.") from exc
    if not isinstance(value, dict):
        raise click.BadParameter(f"expected a JSON object ({{...}}), got {raw!r}.")
    return value


STORAGE_OPTIONS = click.option(
    "--storage-options", default=None, metavar="JSON", callback=json_object,
    help='fsspec options for remote stores, e.g. \'{"client_kwargs": {"endpoint_url": ...}}\'.')


def cluster_options(command):
    """--scheduler / --local-workers: where extract and fit send their work (dask); the
    command turns them into one runtime.execution.Execution (`execution_of`)."""
    command = click.option("--local-workers", default=0, show_default=True, metavar="N",
                           help="Run on a LocalCluster of N worker processes.")(command)
    return click.option("--scheduler", default=None, metavar="ADDRESS",
                        help="Run on a running dask scheduler's workers, e.g."
                        " tcp://10.0.0.5:8786 (see docs/scaling.md).")(command)


def _set_threads(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--threads: checked, then handed on as SAFE_CACHE_THREADS, so this process's thread
    policies and the LocalCluster workers it starts (they inherit the environment) obey it."""
    if value is None:
        return None
    import os

    from click.core import ParameterSource

    from ..runtime.threads import ENV, requested_threads

    try:
        requested_threads(value)
    except SafeCacheError as exc:
        reason = str(exc).removeprefix(f"--threads {value!r}: ")
        if ctx.get_parameter_source("threads") == ParameterSource.ENVIRONMENT:
            reason = f"{ENV}={value!r}: {reason}"
        raise click.BadParameter(reason) from None
    os.environ[ENV] = value
    return None


THREADS = click.option(
    "--threads", default=None, metavar="N", callback=_set_threads, expose_value=False,
    envvar="SAFE_CACHE_THREADS", show_default="auto: the usable cores others leave idle",
    help="Torch threads; auto re-measures the idle cores every 2 s (docs/performance.md).")


def execution_of(options: dict[str, Any]) -> Any:
    """The Execution of a command's --scheduler / --local-workers (taken out of `options`)."""
    from ..runtime.execution import Execution

    return Execution(scheduler=options.pop("scheduler"),
                     local_workers=options.pop("local_workers"))


def default_of(config: type, name: str) -> Any:
    """A library config's default for `name`: the one source of the CLI's defaults (a test
    checks every option against it and against what --help shows)."""
    from ..defaults import default_of as library_default

    return library_default(config, name)


def listed(config: type, name: str) -> str:
    """A tuple default as the option's text: '1,2,4,8,16', '1e-04,...', or 'start:stop:step'
    for an evenly spaced range of more than three values."""
    values = default_of(config, name)
    if len(values) > 3 and all(isinstance(v, float) for v in values):
        step = round(values[1] - values[0], 10)
        if step > 0 and all(abs(b - a - step) < 1e-9 for a, b in itertools.pairwise(values)):
            return f"{values[0]:g}:{values[-1]:g}:{step:g}"
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def recipe_defaults(name: str) -> str:
    """What each recipe preset sets a recipe option to, for its [default: ...] in --help."""
    from ..fit.recipe import PRESETS

    def shown(value: Any) -> str:
        return "backbone" if value is None else f"{value:g}" if isinstance(value, float) \
            else str(value).lower() if isinstance(value, bool) else str(value)

    values = {preset: shown(getattr(recipe, name)) for preset, recipe in PRESETS.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "; ".join(f"{preset}: {value}" for preset, value in values.items())


def int_list(ctx, param, value: str) -> tuple[int, ...]:
    if not str(value).strip():
        return ()  # the config says "--shots is empty", naming the option
    parts = str(value).split(",")
    if any(not part.strip() for part in parts):
        raise click.BadParameter(f"'{value}' has an empty value; give comma-separated integers"
                                 f" such as 1,2,4")
    try:
        return tuple(int(v) for v in parts)
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from exc


STORE_ROOT = click.option(
    "--store-root", default=None, metavar="DIR",
    show_default="$SAFE_CACHE_STORES, else ./stores",
    help="Where default stores live.")


def store_filters(command):
    """--dataset / --model / --pretrained / --store-root: which stores a command uses when no
    store is named (those under the store root that match every filter given)."""
    for decorator in reversed((
        click.option("--dataset", default=None,
                     help="With no store named: the stores of this dataset (name or spec"
                     " file)."),
        click.option("--model", default=None, envvar="SAFE_CACHE_MODEL", show_envvar=True,
                     help="With no store named: the stores of this model."),
        click.option("--pretrained", default=None, envvar="SAFE_CACHE_PRETRAINED",
                     show_envvar=True,
                     help="With no store named: the stores of these weights (tag, file,"
                     " 'none')."),
        STORE_ROOT,
    )):
        command = decorator(command)
    return command


def default_stores(dataset: str | None = None, model: str | None = None,
                    pretrained: str | None = None, store_root: str | None = None,
                    storage_options: dict | None = None) -> list[str]:
    """The stores under the store root matching the filters given (an error lists what is
    there when none does)."""
    from ..data.datasets import load_spec
    from ..store.catalog import select_stores

    if dataset and (dataset.endswith(".json") or Path(dataset).is_file()):
        dataset = load_spec(dataset).name
    return select_stores(store_root, dataset=dataset, model=model, pretrained=pretrained,
                         storage_options=storage_options)


def one_store(**filters: Any) -> str:
    """The one store the filters select (several is an error that lists them)."""
    urls = default_stores(**filters)
    if len(urls) > 1:
        ctx = click.get_current_context(silent=True)
        names = {p.name for p in ctx.command.params} if ctx is not None else {"store"}
        how = "--store URL" if "store" in names else "STORE"
        raise click.UsageError(f"{len(urls)} stores match: {', '.join(urls)}. Name one ({how}),"
                               f" or narrow with --dataset / --model / --pretrained.")
    return urls[0]


MAX_RANGE = 1001  # values a start:stop:step range may give


def float_list(ctx, param, value: str) -> tuple[float, ...]:
    """'1e-4,1e-5' or a range 'start:stop:step' (stop included, step > 0, start <= stop, at
    most MAX_RANGE values); every value finite."""
    try:
        if ":" in value:
            start, stop, step = (float(v) for v in value.split(":"))
            if not all(math.isfinite(v) for v in (start, stop, step)) or not step > 0 \
                    or start > stop:
                raise click.BadParameter(f"a range start:stop:step needs finite numbers, step >"
                                         f" 0 and start <= stop, got '{value}'")
            count = round((stop - start) / step) + 1
            if count > MAX_RANGE:
                raise click.BadParameter(f"'{value}' is {count:,} values, at most {MAX_RANGE:,};"
                                         f" take a larger step")
            return tuple(round(start + i * step, 10) for i in range(count))
        values = tuple(float(v) for v in value.split(",") if v.strip())
        if not all(math.isfinite(v) for v in values):
            raise click.BadParameter(f"every value must be a finite number, got '{value}'")
        return values
    except ValueError as exc:
        raise click.BadParameter(f"expected numbers like 1e-4,1e-5 or 0:1:0.1, got '{value}'") \
            from exc
