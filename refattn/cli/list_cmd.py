"""``refattn list``: blocks, presets, config keys with defaults, fixture shapes;
with a BLOCK, also each preset's changes and its parameter names."""

from __future__ import annotations

import json
from typing import Any

import click

from refattn.cli.common import BadInput


def _parameters(name: str, preset: str | None, cfg: Any) -> dict[str, dict[str, Any]]:
    """Canonical parameter/buffer name -> {"shape", "anchor"} at the fixture
    shapes of `cfg` (anchor: the preset's anchor state_dict name, or None)."""
    from refattn.blocks.registry import BLOCKS
    from refattn.golden.generate import CaseRequest, case_shapes

    spec = BLOCKS[name]
    shapes, resolved, params = case_shapes(CaseRequest(name, preset), cfg)
    anchors = spec.anchor_names(preset, resolved, shapes) if preset else {}
    return {k: {"shape": list(v), "anchor": anchors.get(k)} for k, v in params.items()}


def _inert(spec: Any, cfg: Any) -> frozenset[str]:
    return spec.inert_keys(cfg) if spec.inert_keys is not None else frozenset()


def describe_blocks(only: str | None = None) -> list[dict[str, Any]]:
    """What ``refattn list`` shows, as JSON-ready dicts (read from the registry).

    ``config``: the keys that matter in the block's default config (the
    default preset's) with their values; ``inert``: the keys it still
    accepts that change nothing there.  ``presets``: each preset's full
    config; ``preset_changes``: per preset, ``{key: [default, preset value]}``
    for the keys that differ from the default config and matter in the
    preset's; ``parameters``: per preset (``"default"`` for a block without
    presets), each canonical parameter name with its shape at the fixture
    shapes and the preset's anchor name (None when it has no anchor).
    """
    from refattn.blocks.registry import BLOCKS
    from refattn.blocks.spec import config_to_dict

    if only is not None and only not in BLOCKS:
        raise BadInput(f"list: no block {only!r} (blocks: {', '.join(BLOCKS)})")
    names = [only] if only else list(BLOCKS)
    out = []
    for name in names:
        spec = BLOCKS[name]
        cfg = spec.config()
        base = config_to_dict(cfg)
        inert = _inert(spec, cfg)
        changes, parameters = {}, {}
        for preset in list(spec.presets) or [None]:
            pcfg = spec.config(preset)
            values = config_to_dict(pcfg)
            live = set(values) - _inert(spec, pcfg)
            if preset is not None:
                changes[preset] = {k: [base[k], v] for k, v in values.items()
                                   if k in live and v != base[k]}
            parameters[preset or "default"] = _parameters(name, preset, pcfg)
        out.append({
            "block": name,
            "summary": spec.summary,
            "default_preset": spec.default_preset,
            "presets": {p: config_to_dict(c) for p, c in spec.presets.items()},
            "preset_changes": changes,
            "config": {k: v for k, v in base.items() if k not in inert},
            "inert": {k: v for k, v in base.items() if k in inert},
            "parameters": parameters,
            "fixture_shapes": {k: list(v) for k, v in spec.fixture_shapes(cfg).items()},
            "plot": spec.figure is not None,
        })
    return out


@click.command("list")
@click.argument("block", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def list_cmd(block: str | None, as_json: bool) -> None:
    """List blocks, their presets, config keys (with defaults) and fixture shapes.

    With BLOCK, also what each preset changes against the block's default
    config, and the parameter names: canonical, and each preset's anchor
    name.  Only the keys that matter are shown: a key that changes nothing
    in a config (the spatial keys of cbam_channel, say) is left out of the
    keys and the changes (--json lists them under "inert").
    """
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
        if block is not None:
            _show_presets(row)


def _show_presets(row: dict[str, Any]) -> None:
    """Each preset's changes from the default config and its parameters (the
    shapes at the preset's fixture shapes)."""
    for preset, params in row["parameters"].items():
        if preset == "default" and not row["presets"]:
            click.echo("  parameters (canonical name, shape):"
                       + ("" if params else " none"))
        else:
            default = " (default)" if preset == row["default_preset"] else ""
            click.echo(f"  preset {preset}{default}:")
            changes = row["preset_changes"][preset]
            if changes:
                click.echo("    changes: " + ", ".join(
                    f"{k}: {json.dumps(a)} -> {json.dumps(b)}"
                    for k, (a, b) in changes.items()))
            else:
                click.echo("    changes: none (the default config)")
            click.echo("    parameters (canonical name, shape -> anchor name):"
                       + ("" if params else " none"))
        width = max((len(k) for k in params), default=0)
        for key, info in params.items():
            anchor = f" -> {info['anchor']}" if info["anchor"] else ""
            click.echo(f"      {key:<{width}}  {tuple(info['shape'])}{anchor}")
