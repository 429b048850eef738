"""Backbones: `backbone`, `models`."""

from __future__ import annotations

import json

import rich_click as click
from rich.table import Table

from .app import (
    console,
    examples,
    keep_whole,
    main,
    print_json,
)


@main.command(epilog=examples(
    "safe-cache backbone RN50",
    "safe-cache backbone ViT-B-16 --pretrained openai --json",
    "safe-cache backbone RN50 --cut layer4"))
@click.argument("model")
@click.option("--pretrained", default="none", show_default=True,
              help="open_clip tag (e.g. openai), a checkpoint file, or none for random weights.")
@click.option("--cut", default="pool", show_default=True,
              help="Where the trunk ends: pool, layer4 (ResNet), lastN (ViT).")
@click.option("--quick-gelu/--no-quick-gelu", default=None, show_default="from the weights",
              help="Force QuickGELU on or off (OpenAI's weights need it).")
@click.option("--cache-dir", default=None, metavar="DIR",
              show_default="open_clip's: ~/.cache/clip or the Hugging Face cache",
              help="Where open_clip caches downloaded weights.")
@click.option("--init-seed", default=0, show_default=True, help="Seed of a random initialisation.")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def backbone(
    model: str, pretrained: str | None, cut: str, quick_gelu: bool | None,
    cache_dir: str | None, init_seed: int, as_json: bool,
) -> None:
    """Load MODEL (open_clip name or config JSON) and show its backbone card and fingerprint."""
    from ..model.backbone import load_backbone

    loaded = load_backbone(
        model, None if pretrained.lower() == "none" else pretrained, cut=cut,
        quick_gelu=quick_gelu, cache_dir=cache_dir, init_seed=init_seed,
    )
    card = {**loaded.card, "fingerprint": loaded.fingerprint}
    if as_json:
        print_json(card)
        return
    table = Table(title=f"backbone {card['model']}", show_header=False)
    table.add_column("field", style="bold cyan")
    table.add_column("value", overflow="fold")  # digests fold; --json has them on one line
    for key, value in card.items():
        if key == "pretrained" and value is None:
            value = f"none (random weights, init seed {card.get('init_seed')})"
        table.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    console.print(keep_whole(table, "field", share=0.3))


@main.command(epilog=examples(
    "safe-cache models",
    "safe-cache models --all --json"))
@click.option("--all", "show_all", is_flag=True, help="Also list architectures SAFE cannot split.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(show_all: bool, as_json: bool) -> None:
    """List open_clip architectures, their family and pretrained tags."""
    from ..model.backbone import list_architectures

    rows = [row for row in list_architectures() if show_all or row["family"] != "unsupported"]
    if as_json:
        print_json(rows)
        return
    table = Table(title="open_clip architectures")
    for column in ("model", "family", "size", "pretrained tags"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], row["family"], str(row["image_size"]), ", ".join(row["tags"]))
    keep_whole(table, "family", "size", share=0.1)
    console.print(keep_whole(keep_whole(table, "model", share=0.3), "pretrained tags", share=0.34))
