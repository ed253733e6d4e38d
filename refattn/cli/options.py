"""Options shared by several subcommands, defined once (with their parsers)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from refattn.golden.files import display_path, read_regular, shown

_WORDS = {"none": None, "null": None, "true": True, "false": False}


def parse_value(text: str) -> Any:
    """A --set value: JSON (numbers, true/false/null, lists), None/True/False
    spelled the Python way, a comma-separated list (``avg,max``, the same as
    ``'["avg","max"]'``), or else the bare string (``mode=gaussian``)."""
    lowered = text.strip().lower()
    if lowered in _WORDS:
        return _WORDS[lowered]
    if _nesting(text) > MAX_SET_NESTING:
        raise ValueError(f"nested more than {MAX_SET_NESTING} levels deep (no config "
                         "value is)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        items = text.split(",")
        if len(items) > 1 and all(i.strip() for i in items):  # avg,max: a list
            return tuple(parse_value(i.strip()) for i in items)
        return text
    return tuple(value) if isinstance(value, list) else value


MAX_SET_NESTING = 8
"""Deepest list/object nesting of a --set value (config values nest 2 at most)."""


def _nesting(text: str) -> int:
    """The deepest bracket nesting of `text` (counted without parsing it, so
    a 50,000-deep list costs nothing; brackets inside strings count too,
    which only errs on the side of refusing a value no config takes)."""
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _parse_sets(ctx: click.Context, param: click.Parameter,
                values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {shown(item)}", ctx, param)
        try:
            out[key.strip()] = parse_value(raw)
        except ValueError as err:
            raise click.BadParameter(f"{shown(key.strip())}: {err}", ctx, param) from None
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
                f"expected NAME=N,C,H,W with positive integers, got {shown(item)}", ctx,
                param)
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
    help="Override a config key (JSON value, a comma-separated list such as "
         "pool_types=avg,max, or a bare string); repeatable.",
)
shape_option = click.option(
    "--shape", "shapes", multiple=True, metavar="NAME=N,C,H,W", callback=_parse_shapes,
    help="Input shape, e.g. x=2,16,7,7; repeatable (default: the block's fixture shapes).",
)
MAX_SEED = 2**63 - 1
"""The largest --seed: 63 bits, which the case id (``-s<seed>``) holds."""

seed_option = click.option(
    "--seed", type=click.IntRange(min=0, max=MAX_SEED), default=0, show_default=True,
    help="Seed of the host random generator (0 to 2**63-1).",
)
backend_option = click.option(
    "--backend", type=click.Choice(["numpy", "cupy"]), default="numpy",
    show_default=True, help="Array backend that runs the forward and backward.",
)

config_options = _decorate(block_option, preset_option, set_option, shape_option,
                           seed_option)


def out_dir(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    """An output root: a non-empty path (``''`` would silently mean the
    current directory, as an unset shell variable often does)."""
    if not value:
        raise click.BadParameter("empty path (an unset variable?); give a directory",
                                 ctx, param)
    return Path(value)


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


REPORT_KEYS = frozenset({"case", "ok", "mode", "tensors", "evaluations"})
"""Keys of every entry of a ``gradcheck --json`` report."""


def check_report_path(path: Path, option: str) -> None:
    """An output report may replace an earlier refattn JSON report, never any
    other file (a mistyped path must not overwrite a manifest or notes).  An
    earlier report is a regular file holding a non-empty JSON list of report
    entries (``REPORT_KEYS``); an empty list ``[]`` is not one."""
    if not os.path.lexists(path):
        return
    try:
        old = json.loads(read_regular(path, limit=REPORT_LIMIT, what=option))
    except (OSError, ValueError, RecursionError):
        old = None
    if not (isinstance(old, list) and old
            and all(isinstance(r, dict) and REPORT_KEYS <= set(r) for r in old)):
        raise click.BadParameter(
            f"{display_path(path)} exists and is not a refattn JSON report; refusing "
            "to overwrite it (remove it first)", param_hint=option)


REPORT_LIMIT = 256 * 2**20
"""The largest earlier report read to recognize it (reports are kilobytes)."""


def write_report(path: Path, text: str) -> None:
    """Write a report atomically: a crash never leaves half of it."""
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
