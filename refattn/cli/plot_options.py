"""The ``--plot FILE.png`` option of ``refattn gradcheck`` and ``refattn show``.

Drawing lives in :mod:`refattn.plot`; this module only turns its errors into
the CLI's one-line ``Error: ...`` with exit status 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from refattn.cli.common import BadInput


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
    return plot


def wrote(plot_path: Path, *, err: bool = False) -> None:
    click.echo(f"wrote {plot_path}", err=err)
