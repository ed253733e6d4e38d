"""``refattn golden``: write golden fixture cases."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from refattn.cli.common import signals_deferred
from refattn.cli.options import (
    backend_option,
    config_options,
    out_dir,
    require_block,
    resolve_backend,
)
from refattn.cli.sizes import check_requests
from refattn.golden.format import FORMATS


def _parse_formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    items = tuple(f.strip() for f in value.split(",") if f.strip())
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise click.BadParameter(
            f"expected a comma-separated subset of {', '.join(FORMATS)}, got {value!r}",
            ctx, param,
        )
    return items


@click.command()
@config_options
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True, help="Dtype of the stored tensors (reference math is float64).")
@click.option("--out", "out", type=click.Path(file_okay=False), callback=out_dir,
              default="refattn-golden", show_default=True,
              help="Root directory; cases go to OUT/<block>/<case-id>/.")
@click.option("--format", "formats", default=",".join(FORMATS), show_default=True,
              callback=_parse_formats, help="Tensor files to write.")
@click.option("--force", is_flag=True, help="Replace existing cases.")
@click.option("--all", "all_cases", is_flag=True,
              help="Every preset of every block, float64 and float32.")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print the written cases as JSON.")
def golden(block: str | None, preset: str | None, overrides: dict[str, Any],
           shapes: dict[str, tuple[int, ...]] | None, seed: int, dtype: str, out: Path,
           formats: tuple[str, ...], force: bool, all_cases: bool, backend: str,
           as_json: bool) -> None:
    """Generate golden fixture cases (inputs, parameters, outputs, gradients).

    BN-bearing presets get a train-mode and an eval-mode case unless --set
    fixes the mode.  Existing cases are kept unless --force.
    """
    from refattn.golden.format import write_case
    from refattn.golden.generate import all_requests, expand_requests, generate_case

    xp, device = resolve_backend(backend)
    if all_cases:
        if block or preset or overrides or shapes:
            raise click.UsageError("--all takes no --block, --preset, --set or --shape")
        requests = all_requests(seed=seed)
    else:
        requests = expand_requests(require_block(block), preset, overrides,
                                   shapes=shapes, dtype=dtype, seed=seed)
    check_requests(requests)  # refuse what cannot fit before drawing anything
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out: {out} exists and is not a directory")
    if (out / "manifest.json").exists():  # cases inside a case are never found
        raise click.UsageError(f"--out: {out} is a fixture case; give the root of "
                               "the fixture tree (cases go to OUT/<block>/<case-id>)")
    rows = []
    # the bar only on a terminal: piped, stderr carries nothing but an error line
    bar_or_not = (click.progressbar(requests, label="generating", file=sys.stderr,
                                    show_pos=True)
                  if sys.stderr.isatty() else contextlib.nullcontext(requests))
    with bar_or_not as bar:
        for req, cfg in bar:
            case = generate_case(req, cfg, xp=xp, device=device)
            for key, (kind, reason) in case.checks.items():
                if kind == "none":
                    click.echo(
                        f"warning: {case.block}/{case.case_id}: {key} is NOT CHECKABLE "
                        f"in {req.dtype} ({reason}); validate reports it NOT CHECKED "
                        "and --require all fails on it", err=True)
            with signals_deferred():  # a write completes before SIGTERM/SIGINT act
                path = write_case(out, case.block, case.case_id, case.tensors,
                                  case.manifest, tolerances=case.tolerances,
                                  accumulation=case.accumulation, checks=case.checks,
                                  formats=formats,
                                  force=force)
            manifest = json.loads((path / "manifest.json").read_text())
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            rows.append({"case": f"{case.block}/{case.case_id}", "path": str(path),
                         "tensors": len(case.tensors), "bytes": size,
                         "digest": manifest["digest"]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["case"]) for r in rows)
    click.echo(f"{'case':<{width}}  {'tensors':>7}  {'bytes':>9}  digest")
    for r in rows:
        click.echo(f"{r['case']:<{width}}  {r['tensors']:>7}  {r['bytes']:>9}  "
                   f"{r['digest'][:16]}")
    click.echo(f"wrote {len(rows)} case(s) under {out}")
