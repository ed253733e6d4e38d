"""Options shared by several subcommands, defined once (with their parsers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

_WORDS = {"none": None, "null": None, "true": True, "false": False}


def parse_value(text: str) -> Any:
    """A --set value: JSON (numbers, true/false/null, lists), None/True/False
    spelled the Python way, or else the bare string (``mode=gaussian``)."""
    lowered = text.strip().lower()
    if lowered in _WORDS:
        return _WORDS[lowered]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _parse_sets(ctx: click.Context, param: click.Parameter,
                values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        out[key.strip()] = parse_value(raw)
    return out


def _parse_shapes(ctx: click.Context, param: click.Parameter,
                  values: Sequence[str]) -> dict[str, tuple[int, ...]] | None:
    if not values:
        return None
    out: dict[str, tuple[int, ...]] = {}
    for item in values:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name.strip() or not shape or min(shape) < 1:
            raise click.BadParameter(
                f"expected NAME=N,C,H,W with positive integers, got {item!r}", ctx, param
            )
        out[name.strip()] = shape
    return out


def _decorate(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


block_option = click.option(
    "--block", "-b", metavar="BLOCK", help="Block name (see `refattn list`)."
)
preset_option = click.option(
    "--preset", "-p", metavar="PRESET", help="Named anchor preset of the block."
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", callback=_parse_sets,
    help="Override a config key (JSON value, or a bare string); repeatable.",
)
shape_option = click.option(
    "--shape", "shapes", multiple=True, metavar="NAME=N,C,H,W", callback=_parse_shapes,
    help="Input shape, e.g. x=2,16,7,7; repeatable (default: the block's fixture shapes).",
)
seed_option = click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True,
    help="Seed of the host random generator.",
)
backend_option = click.option(
    "--backend", type=click.Choice(["numpy", "cupy"]), default="numpy",
    show_default=True, help="Array backend that runs the forward and backward.",
)

config_options = _decorate(block_option, preset_option, set_option, shape_option,
                           seed_option)


def resolve_backend(name: str) -> tuple[Any, Any]:
    """(xp, device) for --backend; a one-line error when CuPy cannot run."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp, None
    try:
        import cupy
    except ImportError:
        raise click.UsageError(
            "--backend cupy needs CuPy: pip install 'refattn[cuda13]' (or [cuda12])"
        ) from None
    if not cupy.is_available():
        raise click.UsageError("--backend cupy: no CUDA GPU is visible to CuPy")
    import array_api_compat.cupy as xp

    return xp, None


def check_report_path(path: Path, option: str) -> None:
    """An output report may replace an earlier refattn JSON report, never any
    other file (a mistyped path must not overwrite a manifest or notes)."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, list)
            and all(isinstance(r, dict) and {"case", "ok"} <= set(r) for r in old)):
        raise click.BadParameter(
            f"{path} exists and is not a refattn JSON report; refusing to overwrite "
            "it (remove it first)", param_hint=option)


def write_report(path: Path, text: str) -> None:
    """Write a report atomically: a crash never leaves half of it."""
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode: umask
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def require_block(block: str | None) -> str:
    if not block:
        raise click.UsageError("Missing option '--block' (see `refattn list`).")
    from refattn.blocks.registry import BLOCKS

    BLOCKS[block]  # a one-line ValueError for unknown names
    return block
