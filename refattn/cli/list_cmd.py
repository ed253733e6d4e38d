"""``refattn list``: blocks, presets, config keys with defaults, fixture shapes."""

from __future__ import annotations

import json
from typing import Any

import click


def describe_blocks(only: str | None = None) -> list[dict[str, Any]]:
    """What ``refattn list`` shows, as JSON-ready dicts (read from the registry)."""
    from refattn.blocks.registry import BLOCKS
    from refattn.blocks.spec import config_to_dict

    names = [only] if only else list(BLOCKS)
    out = []
    for name in names:
        spec = BLOCKS[name]
        cfg = spec.config()
        out.append({
            "block": name,
            "summary": spec.summary,
            "default_preset": spec.default_preset,
            "presets": {p: config_to_dict(c) for p, c in spec.presets.items()},
            "config": config_to_dict(cfg),
            "fixture_shapes": {k: list(v) for k, v in spec.fixture_shapes(cfg).items()},
            "plot": spec.figure is not None,
        })
    return out


@click.command("list")
@click.argument("block", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def list_cmd(block: str | None, as_json: bool) -> None:
    """List blocks, their presets, config keys (with defaults) and fixture shapes."""
    rows = describe_blocks(block)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['block']}: {row['summary']}")
        presets = ", ".join(
            p + (" (default)" if p == row["default_preset"] else "") for p in row["presets"]
        )
        click.echo(f"  presets: {presets or '-'}")
        shapes = ", ".join(f"{k}={tuple(v)}" for k, v in row["fixture_shapes"].items())
        click.echo(f"  fixture shapes: {shapes}")
        if row["plot"]:
            click.echo("  show --plot: draws its attention maps and gates")
        click.echo("  config keys (default):")
        for key, value in row["config"].items():
            click.echo(f"    {key} = {json.dumps(value)}")
