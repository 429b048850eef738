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
    for paragraph in (command.help or "").split("\n\n"):
        assert " ".join(paragraph.split()) in flat, (path, paragraph[:60])
    stray = re.search(r".{40} [.,;](\s|$)", flat)  # markup eaten leaves a stray " ."
    assert stray is None, stray.group(0)


# --- advice that works: every option a message names exists where it says ---------------------

def _options() -> dict[str, set[str]]:
    """Each command's option names (both forms of a flag), by its path ('datasets fetch')."""
    found = {}
    for path, command in COMMANDS:
        names = set()
        for param in command.params:
            if isinstance(param, click.Option):
                names.update(param.opts + param.secondary_opts)
        found[" ".join(path)] = names
    return found


def _message_texts():
    """Every string the package can print: each literal, and each f-string's literal parts
    joined (with a placeholder where a value goes), with where it is."""
    import ast
    from pathlib import Path

    import safe_cache

    root = Path(safe_cache.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name == "examples.py":  # a developer's script with its own argparse options
            continue
        tree = ast.parse(path.read_text())
        docstring = ast.get_docstring(tree, clean=False)  # a module's docstring is never printed
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == docstring:
                continue  # (it may cite another tool's options: cross_modal_lp's their train.py)
            if isinstance(node, ast.JoinedStr):
                yield path.name, node.lineno, "".join(
                    v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path.name, node.lineno, node.value


OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
COMMAND_SPAN = re.compile(r"`(?:safe-cache |python cli\.py )?(datasets fetch|study run|study list|"
                          r"extract|fit|report|export|predict|attention|correspond|info|verify|"
                          r"copy|ls|backbone|models|demo|datasets)\b([^`]*)`")


@pytest.mark.slow
def test_every_option_a_message_names_exists():
    options = _options()
    every = set().union(*options.values()) | {"--help"}
    unknown = [(file, line, name) for file, line, text in _message_texts()
               for name in OPTION.findall(text) if name not in every]
    assert unknown == [], unknown


@pytest.mark.slow
def test_a_command_a_message_names_has_the_options_it_names():
    options = _options()
    wrong = []
    for file, line, text in _message_texts():
        for command, rest in COMMAND_SPAN.findall(text):
            wrong += [(file, line, command, name) for name in OPTION.findall(rest)
                      if name not in options[command]]
    assert wrong == [], wrong


# --- the checks of the list, each on the command that printed it ------------------------

def _run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_extract_checks_the_dataset_then_the_prompts_before_the_weights(tmp_path):
    from miniatures import write_split_zhou

    code, output = _run("extract", "--dataset", "food10", "--root", str(tmp_path),
                        "--pretrained", "no-such-tag", "--store", str(tmp_path / "s.zarr"))
    assert code == 2 and "Unknown dataset 'food10'. Did you mean food101?" in output
    assert "tag" not in output
    write_split_zhou(tmp_path, "dtd", classes=2)
    code, output = _run("extract", "--dataset", "dtd", "--root", str(tmp_path),
                        "--pretrained", "no-such-tag", "--prompts", "nosuch.json",
                        "--store", str(tmp_path / "s.zarr"))
    assert code == 2 and "Unknown prompt set 'nosuch.json'" in output, output
    assert not (tmp_path / "s.zarr").exists()  # refused before any work


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_quick_gelu_reaches_the_card_from_extract(tmp_path):
    from factories import extract_miniature

    from safe_cache.store import open_store

    for flag in (True, False):  # tiny-map's config has no QuickGELU of its own
        url = extract_miniature(tmp_path / str(flag), "safe-cache-tiny-map",
                                tmp_path / f"{flag}.zarr", dataset="dtd", classes=2,
                                quick_gelu=flag)
        assert open_store(str(url)).manifest["backbone"]["quick_gelu"] is flag


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_fit_on_a_store_without_the_prompt_set_names_the_extract_command(tmp_path):
    from factories import extract_miniature

    url = extract_miniature(tmp_path, "safe-cache-tiny-rn", tmp_path / "s.zarr", dataset="dtd",
                            classes=2)
    code, output = _run("fit", "--store", str(url), "--shots", "1", "--seeds", "1",
                        "--iters", "2", "--prompts", "vanilla", "--out", str(tmp_path / "r"),
                        "--methods", "safe")  # SAFE always runs: naming it is fine
    assert code == 2, output
    assert "has no text classifier for prompt set 'vanilla' (it holds: hand)" in output
    assert f"safe-cache extract --dataset dtd --root DATA --model safe-cache-tiny-rn" \
        f" --pretrained none --store {url} --views 1" in output
    assert "--shots 1 --seeds 1 --prompts vanilla" in output  # the draws the store holds


def test_backbone_takes_none_for_random_weights():
    code, output = _run("backbone", "safe-cache-tiny-rn", "--pretrained", "none", "--json")
    assert code == 0, output


def test_export_given_the_head_file_points_at_the_json(tmp_path):
    head = tmp_path / "shots1_seed1_safe.safetensors"
    head.write_bytes(b"x")
    head.with_suffix(".json").write_text("{}")
    code, output = _run("export", str(head), "--out", str(tmp_path / "m"))
    assert code == 2 and "pass the result JSON beside it" in output and "remove" not in output


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_ends_its_help_with_examples_that_parse(path, command):
    assert command.epilog and command.epilog.startswith("Examples:"), path
    lines = [line for line in command.epilog.split("\n\n")[1:] if line.strip()]
    assert 2 <= len(lines) <= 3, lines
    options = _options()
    for line in lines:
        assert line.startswith("safe-cache " + " ".join(path)), line
        words = line.split()[1:]
        deepest = max((k for k in options if words[:len(k.split())] == k.split()), key=len)
        assert all(option in options[deepest] for option in OPTION.findall(line)), line
    assert "Examples:" in _help(path)


def _pieces(name: str) -> list[str]:
    """A name's runs between separators: each must reach the screen whole."""
    return [p for p in re.split(r"[/\-_.,:]", name) if len(p) > 1]


@pytest.mark.slow
def test_names_and_paths_are_never_split_mid_word_at_80_columns(tmp_path):
    from factories import build_store

    from safe_cache.study import list_studies

    runner = CliRunner()
    listed = runner.invoke(main, ["study", "list"], env={"COLUMNS": "80"}, terminal_width=80)
    assert listed.exit_code == 0, listed.output
    for study in list_studies():
        assert all(piece in listed.output for piece in _pieces(study.name)), study.name
        for backbone in study.backbones:
            assert all(piece in listed.output for piece in _pieces(backbone.name)), backbone
    root = tmp_path / "a-rather-long-folder-name" / "stores-of-the-team"
    url = build_store(str(root / "toy" / "safe-cache-tiny-rn-random0.zarr"),
                      splits={"test": [0, 1, 2, 3]})
    shown = runner.invoke(main, ["ls", str(root)], env={"COLUMNS": "80"}, terminal_width=80)
    assert shown.exit_code == 0, shown.output
    assert f"stores under {root}" in shown.output  # the root on a line of its own, whole
    relative = url.removeprefix(str(root) + "/")
    assert all(piece in shown.output for piece in _pieces(relative)), shown.output


@pytest.mark.parametrize("shots", ["1,,2", "1,2,", ",4"])
def test_an_empty_value_in_a_list_is_refused(shots):
    code, output = _run("fit", "--shots", shots, "--store", "x.zarr")
    assert code == 2 and "has an empty value" in output



def _narrow(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_at_80_columns_shows_every_option_name_and_choice_whole(path, command):
    """rich folds a cell anywhere: a metavar column once squeezed '--center-flip/--no-center-
    flip' into '--cen' / 'ter-flip'. Every option name, its negative and its choices must reach
    the screen on one line."""
    shown = _narrow(*path, "--help")
    lines = shown.splitlines()
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        names = [*param.opts, *param.secondary_opts]
        if param.secondary_opts:
            names.append("/".join([param.opts[0], param.secondary_opts[0]]))
        choices = list(getattr(param.type, "choices", ()))
        for name in [*names, *choices]:
            assert any(name in line for line in lines), (name, shown)
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_the_listing_commands_fit_80_columns_without_cutting_a_name(tmp_path):
    from safe_cache.model.backbone import list_architectures

    models = _narrow("models")
    assert "…" not in models
    for row in list_architectures():
        if row["family"] == "unsupported":
            continue
        assert all(piece in models for piece in _pieces(row["model"])), row["model"]
        for tag in row["tags"]:
            assert all(piece in models for piece in _pieces(tag)), tag
    card = _narrow("backbone", "RN50", "--pretrained", "none")
    assert "…" not in card and "model_config_sha256" in card and "fingerprint" in card
    (tmp_path / "dtd" / "images").mkdir(parents=True)  # present folder, no split file
    listing = _narrow("datasets", "--root", str(tmp_path))
    assert "…" not in listing and "no split file" in listing
    for text in (models, card, listing):
        assert all(len(line) <= 80 for line in text.splitlines())


def test_a_file_given_as_the_store_is_named_as_a_file(tmp_path):
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("hello")
    for args in (["info", str(not_a_store)], ["fit", "--store", str(not_a_store)],
                 ["verify", str(not_a_store)]):
        code, output = _run(*args)
        assert code != 0 and f"{not_a_store} is a file, not a store" in output, (args, output)
    assert not_a_store.read_text() == "hello"


def test_a_study_key_spelt_as_the_cli_option_names_the_field(tmp_path):
    from safe_cache.errors import ConfigError
    from safe_cache.study import load_study

    study = tmp_path / "s.toml"
    study.write_text('name = "s"\ndatasets = ["dtd"]\n'
                     'backbones = [{model = "RN50", pretrained = "openai"}]\n[fit]\nlr = [0.001]\n')
    with pytest.raises(ConfigError, match=r"unknown fit key 'lr' \(the CLI's --lr is 'lrs'"):
        load_study(study)
    study.write_text(study.read_text().replace("lr =", "iter ="))
    with pytest.raises(ConfigError, match=r"did you mean 'iters'\?"):
        load_study(study)


def test_the_extract_command_names_a_users_own_dataset_by_its_spec_file():
    """A store of a shipped dataset is named by it; one of a user's spec file (the demo's
    shapes) by a placeholder: `--dataset shapes` would be refused as an unknown dataset."""
    from safe_cache.store.paths import extract_command

    manifest = {"dataset": {"name": "food101"}, "center_flip": True,
                "backbone": {"model": "RN50", "pretrained": "openai"}}
    assert extract_command(manifest, "s.zarr").startswith(
        "safe-cache extract --dataset food101 --root DATA --model RN50")
    manifest["dataset"]["name"] = "shapes"
    assert extract_command(manifest, "s.zarr").startswith(
        "safe-cache extract --dataset <the spec file of shapes> --root DATA")
