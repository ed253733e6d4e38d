"""The ``--plot FILE.png`` option of ``refattn gradcheck`` and ``refattn show``.

Drawing lives in :mod:`refattn.plot`; this module only turns its errors into
the CLI's one-line ``Error: ...`` with exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from refattn.cli.common import BadInput
from refattn.golden.files import display_path, open_regular


def plot_option(help_text: str) -> Callable[[Any], Any]:
    return click.option("--plot", "plot_path", metavar="FILE.png",
                        type=click.Path(dir_okay=False, path_type=Path),
                        help=f"{help_text} Needs matplotlib: "
                        "pip install 'refattn[plot]'.")


def require_plot(plot_path: Path) -> Any:
    """The ``refattn.plot`` module, checked before any work is done: exit 2
    when matplotlib is missing or FILE cannot be written."""
    from refattn import plot

    try:
        plot.require_matplotlib()
    except plot.PlotUnavailable as err:
        raise BadInput(f"--plot: {err}") from None
    if plot_path.suffix.lower() != ".png":
        raise BadInput(f"--plot: expected a .png file name, got {str(plot_path)!r}")
    if not plot_path.parent.is_dir():
        raise BadInput(f"--plot: no such directory: {str(plot_path.parent)!r}")
    if os.path.lexists(plot_path) and not _written_by_refattn(plot_path):
        raise BadInput(f"--plot: {display_path(plot_path)} exists and is not a plot "
                       "refattn wrote; refusing to overwrite it (remove it first)")
    return plot


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD = 65536
"""Bytes of an existing PNG searched for refattn's ``Software`` text chunk
(matplotlib writes its text chunks right after the image header)."""


def _written_by_refattn(path: Path) -> bool:
    """Is `path` a regular PNG file whose ``tEXt`` chunk ``Software`` names
    refattn (``refattn.plot.SOFTWARE``)?  Read: its first 64 KiB at most."""
    from refattn.plot import SOFTWARE

    try:
        with open_regular(path) as f:
            head = f.read(_PNG_HEAD)
    except (OSError, ValueError):
        return False
    if not head.startswith(_PNG_SIGNATURE):
        return False
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(head):
        length = int.from_bytes(head[at:at + 4], "big")
        kind, data = head[at + 4:at + 8], head[at + 8:at + 8 + length]
        if kind == b"tEXt" and data.startswith(b"Software\0" + SOFTWARE.encode()):
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        at += 12 + length
    return False


def wrote(plot_path: Path, *, err: bool = False) -> None:
    click.echo(f"wrote {plot_path}", err=err)
