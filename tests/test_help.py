"""--help for people: every option's default is the library's own (one source: the config
dataclasses) and appears in --help, and no help text loses words to rich's markup."""

from __future__ import annotations

import inspect
import re

import pytest
import rich_click as click
from click.testing import CliRunner

from safe_cache.cli import main
from safe_cache.extract.config import ExtractConfig
from safe_cache.fit.config import FitConfig
from safe_cache.fit.recipe import PRESETS


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands())


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], env={"COLUMNS": "250"},
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    return result.output


def _cli_value(command: click.Command, option: click.Option):
    """The option's default as the command receives it (type and callback applied)."""
    ctx = click.Context(command)
    return option.process_value(ctx, option.get_default(ctx))


@pytest.mark.parametrize("name, config, command", [
    ("extract", ExtractConfig, main.commands["extract"]),
    ("fit", FitConfig, main.commands["fit"]),
])
def test_stage_defaults_are_the_library_configs(name, config, command):
    fields = config.__dataclass_fields__
    checked = []
    for option in command.params:
        if not isinstance(option, click.Option) or option.name not in fields or \
                option.required:
            continue
        value = _cli_value(command, option)
        expected = fields[option.name].default
        if option.name == "pretrained":
            expected = expected or "none"
        if value is None and option.name in ("store", "root", "store_root", "dataset"):
            continue  # resolved from the environment, as the config's None is
        assert value == expected, (name, option.name, value, expected)
        checked.append(option.name)
    assert len(checked) >= (10 if name == "extract" else 15), checked


def test_fit_recipe_options_name_every_presets_value():
    text = " ".join(_help(("fit",)).split())
    for option, field in (("--warmup", "warmup"), ("--sampling", "sampling"),
                          ("--train-views", "train_views")):
        shown = "; ".join(f"{preset}: {getattr(recipe, field)}"
                          for preset, recipe in PRESETS.items())
        assert f"[default: ({shown})]" in text, option
    assert main.commands["fit"].params[[p.name for p in main.commands["fit"].params]
                                       .index("recipes")].default == FitConfig(
        store="x").recipe.name


def test_demo_defaults_are_run_demos():
    from safe_cache.demo import run_demo

    command = main.commands["demo"]
    signature = inspect.signature(run_demo).parameters
    for option in command.params:
        name = {"store_root": "store_root"}.get(option.name, option.name)
        if name in signature and option.name != "pretrained":
            assert _cli_value(command, option) == signature[name].default, option.name


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_every_default_and_every_word(path, command):
    text = _help(path)
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    for option in command.params:
        if not isinstance(option, click.Option) or option.hidden:
            continue
        if option.help:
            assert " ".join(option.help.split()) in flat, (path, option.name)
        if option.show_default and not option.is_flag and option.default is not None:
            shown = option.show_default if isinstance(option.show_default, str) else None
            expected = f"[default: ({shown})]" if shown else "[default: "
            assert expected in flat, (path, option.name)
    stray = re.search(r".{40} [.,;](\s|$)", flat)  # markup eaten leaves a stray " ."
    assert stray is None, stray.group(0)
