"""``refattn show CASE``: what a fixture case holds, at a glance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from refattn.cli.plot_options import plot_option, require_plot, wrote
from refattn.cli.verify import BadInput, read_verified
from refattn.golden.format import MANIFEST_NAME, GoldenCase, summarize_case

_COLUMNS = (
    "tensor",
    "role",
    "shape",
    "dtype",
    "min",
    "max",
    "mean_abs",
    "rtol",
    "atol",
    "check",
)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _cell(column: str, v: Any) -> str:
    if column == "shape":
        return str(tuple(v))
    if column in ("min", "max", "mean_abs", "rtol", "atol"):
        return _num(v)
    return str(v)


def show_text(case: GoldenCase, rows: list[dict[str, Any]]) -> list[str]:
    """The lines ``refattn show`` prints for a case."""
    m = case.manifest
    lines = [
        f"case     {case.path}",
        f"block    {m['block']}   preset: {m['preset'] or '-'}   "
        f"case_id: {m['case_id']}",
        f"dtype    {m['dtype']}   mode: {m['mode'] or '-'}   seed: {m['seed']}   "
        f"redraws: {m['redraws']}",
        f"config   {json.dumps(m['config'], sort_keys=True)}",
        f"formats  {', '.join(m['formats'])}",
        f"digest   {m['digest']}",
        "",
    ]
    header = [c.replace("mean_abs", "mean|x|") for c in _COLUMNS]
    table = [header] + [[_cell(c, row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    for r in table:
        cells = [
            s.ljust(w) if i < 4 else s.rjust(w)
            for i, (s, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    notes = {"zero": "note: {}: {}",
             "none": "warning: {} is NOT CHECKABLE in this dtype ({}); validate "
                     "reports it NOT CHECKED",
             "WEAK": "warning: {} has a tolerance that cannot reject a wrong result "
                     "({}); validate reports it NOT CHECKED"}
    extra = [notes[r["check"]].format(r["tensor"], r["check_reason"])
             for r in rows if r["check"] in notes]
    return lines + ([""] + extra if extra else [])


@click.command("show")
@click.argument("case", metavar="CASE")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@plot_option("Also draw the case's attention maps and gates to this PNG (blocks "
             "with a figure in the registry; `refattn list` marks them).")
def show(case: str, as_json: bool, plot_path: Path | None) -> None:
    """Summarize one fixture case: block, preset, config, dtype, mode, seed,
    digest, and per tensor its role, shape, dtype, min, max, mean |x|,
    tolerances and check kind (full; zero: absolute only; none: not
    checkable; WEAK: a tolerance that cannot fail, warned about below the
    table).  The case is fully verified first (``refattn verify``).

    Exit status: 0 shown, 2 CASE does not exist or is not a valid case (or
    --plot was given for a block without maps, or without matplotlib).
    """
    plot = None if plot_path is None else require_plot(plot_path)
    path = Path(case)
    if path.is_file() and path.name == MANIFEST_NAME:
        path = path.parent
    if not path.exists():
        raise BadInput(f"CASE: no such file or directory: {case}")
    if not (path / MANIFEST_NAME).is_file():
        raise BadInput(f"CASE: not a fixture case (no {MANIFEST_NAME}): {case}")
    golden = read_verified(path, "CASE")
    if plot is not None:
        try:
            plot.check_plottable(golden)
        except plot.NothingToPlot as err:
            raise BadInput(str(err)) from None
    rows = summarize_case(golden)
    if as_json:
        m = golden.manifest
        keys = ("block", "preset", "case_id", "config", "dtype", "mode", "seed",
                "redraws", "formats", "digest")  # the manifest's summary fields
        data = {
            "path": str(golden.path),
            **{k: m[k] for k in keys},
            "tensors": [{**r, "shape": list(r["shape"])} for r in rows],
        }
        click.echo(json.dumps(data, indent=2))
    else:
        for line in show_text(golden, rows):
            click.echo(line)
    if plot is not None:
        wrote(plot.write_case_plot(plot_path, golden), err=as_json)
