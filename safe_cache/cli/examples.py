"""The examples README and docs/ show, made by one script from one demo run.

`python -m safe_cache.cli.examples --docs docs --work /tmp/examples` runs the commands the README
tours (demo, report, attention, gradcam, correspond) in a fresh folder, as a user would type
them, at a fixed terminal width; writes each command's output to docs/examples/<name>.txt and
copies the images the docs show into docs/. tests/test_docs.py checks that every snippet marked
`<!-- example: NAME -->` in README.md and docs/*.md is that file, and (slow) that running this
script again today prints the same, timings aside; so no example can go stale unnoticed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner

from . import main

WIDTH = 100
RESULTS = "stores/demo-data/results"
STORE = "stores/shapes/safe-cache-tiny-vit-random0.zarr"
RUN = "shots4_seed1_safe_o52e6f092"  # the demo's options differ from a default fit's: suffixed
HEAD = f"{RESULTS}/shapes/safe-cache-tiny-vit-random0/{RUN}.json"
IMAGES = "stores/demo-data/shapes/images"
# name -> the command line the docs show (run in the work folder, in this order)
COMMANDS = {
    "demo": "demo",
    "report": f"report {RESULTS}",
    "attention": f"attention --store {STORE} --head {HEAD} --images 0,13,30 --image-root"
                 f" {IMAGES} --out maps/",
    "gradcam": f"gradcam --store {STORE} --head {HEAD} --images 13 --image-root {IMAGES}"
               f" --out cams/",
    "correspond": f"correspond --store {STORE} --source 13 --point 40,30 --targets 14,15,16"
                  f" --image-root {IMAGES} --out corr/",
}
# image the docs show -> where the run writes it (relative to the work folder)
IMAGES_SHOWN = {
    "accuracy_vs_shots_shapes.png": "stores/demo-data/plots/accuracy_vs_shots_shapes.png",
    "beta_curve_shapes.png": "stores/demo-data/plots/beta_curve_shapes.png",
    "curves_shapes.png": f"stores/demo-data/plots/curves_shapes_safe-cache-tiny-vit-random0_"
                         f"{RUN}.png",
    "attention_shapes.png": "maps/attention_001_034.png",  # row 13, a blue square
    "gradcam_shapes.png": "cams/gradcam_000_034.png",  # the same image
    "correspond_shapes.png": "corr/correspond_grid.png",
}
TIMING = re.compile(r"\d[\d,]*(\.\d+)?(?= ?(s|ms|min)\b)")


def mask_timings(text: str) -> str:
    """The output with its timings replaced (they differ run to run; nothing else may)."""
    return TIMING.sub("#", text)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_examples(work: Path) -> dict[str, str]:
    """Each command's stdout, run in `work` (created empty) at WIDTH columns."""
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: the examples start from nothing.")
    work.mkdir(parents=True, exist_ok=True)
    outputs = {}
    with _inside(work):
        runner = CliRunner()
        for name, command in COMMANDS.items():
            result = runner.invoke(main, command.split(), env={"COLUMNS": str(WIDTH)},
                                   terminal_width=WIDTH)
            if result.exit_code != 0:
                raise SystemExit(f"`safe-cache {command}` failed:\n{result.output}")
            outputs[name] = f"$ safe-cache {command}\n{result.stdout}".rstrip() + "\n"
    return outputs


SNIPPET = re.compile(r"(<!-- (example|generated): ([\w ]+) -->\n)(.*?)(<!-- /\2 -->)", re.S)


def generated() -> dict[str, str]:
    """The docs' blocks made from the code rather than from a run."""
    from ..store.schema import describe_arrays

    return {"store arrays": describe_arrays()}


def fill(text: str, examples: dict[str, str]) -> str:
    """`text` with every marked block replaced by its example (a text block) or its generated
    table."""
    made = generated()

    def block(match: re.Match) -> str:
        kind, name = match.group(2), match.group(3)
        body = f"```text\n{examples[name]}```\n" if kind == "example" else made[name]
        return f"{match.group(1)}{body}{match.group(5)}"

    return SNIPPET.sub(block, text)


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def write_examples(docs: Path, work: Path) -> list[Path]:
    """Run the examples in `work` and write their outputs and images under `docs`."""
    outputs = run_examples(work)
    folder = docs / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in outputs.items():
        path = folder / f"{name}.txt"
        path.write_text(text)
        written.append(path)
    for shown, made in IMAGES_SHOWN.items():
        written.append(Path(shutil.copyfile(work / made, docs / shown)))
    for page in pages(docs.parent):
        page.write_text(fill(page.read_text(), outputs))
        written.append(page)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--work", type=Path, required=True)
    arguments = parser.parse_args()
    for path in write_examples(arguments.docs.resolve(), arguments.work.resolve()):
        print(path)
