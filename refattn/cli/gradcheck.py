"""``refattn gradcheck``: check a block's hand-written backward numerically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from refattn.cli.options import (
    check_report_path,
    config_options,
    require_block,
    write_report,
)
from refattn.cli.plot_options import plot_option, require_plot, wrote
from refattn.cli.sizes import (
    DEFAULT_MAX_EVALS,
    check_full_mode,
    check_requests,
    full_mode_cost,
)


@click.command("gradcheck")
@config_options
@click.option("--mode", type=click.Choice(["fast", "full", "taylor"]), default="fast",
              show_default=True, help="Directional probes, every element, or the slope test.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the reports as JSON to this file; '-' prints the "
                   "JSON to stdout instead of the text (as --json does in the "
                   "other subcommands).")
@click.option("--max-evals", type=click.IntRange(min=1), default=DEFAULT_MAX_EVALS,
              show_default=True,
              help="--mode full refuses to make more forward evaluations than this "
                   "(it states the count and estimated time before it starts).")
@plot_option("Also draw the finite-difference error against the step size "
             "(h = 1e-1 ... 1e-14, float64 and float32 panels) to this PNG.")
@click.pass_context
def gradcheck_cmd(ctx: click.Context, block: str | None, preset: str | None,
                  overrides: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None,
                  seed: int, mode: str, max_evals: int, json_path: Path | None,
                  plot_path: Path | None) -> None:
    """Finite-difference check of BLOCK's backward in float64 (exit 1 on failure).

    The point checked is the float64 fixture case of the same options, so its
    inputs keep their margin from every kink and tie.

    With --plot, the same point is also probed along one random direction at
    every step size, in float64 and in float32: the error falls like h^2
    (truncation) and rises like eps/h (round-off) around h = cbrt(eps).
    """
    from refattn.blocks.registry import BLOCKS, gradcheck_block
    from refattn.blocks.spec import config_from_dict
    from refattn.golden.generate import expand_requests, generate_case, split_case

    name = require_block(block)
    spec = BLOCKS[name]
    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout:
        check_report_path(json_path, "--json")
    plot = None if plot_path is None else require_plot(plot_path)
    reports, curves = [], []
    requests = expand_requests(name, preset, overrides, shapes=shapes, seed=seed)
    check_requests(requests)  # refuse what cannot fit before drawing anything
    for req, cfg in requests:
        case = generate_case(req, cfg)
        inputs, params, state = split_case(case.tensors)
        config = config_from_dict(spec.config_cls, case.manifest["config"])
        resolved = spec.check_config(config)
        if mode == "full":
            cost = full_mode_cost(spec, resolved, inputs, params, state)
            click.echo(check_full_mode(f"{name}/{case.case_id}", cost, max_evals),
                       err=True)
        report = gradcheck_block(spec, resolved, inputs, params, state, mode=mode,
                                 seed=seed)
        if not to_stdout:
            click.echo(f"{name}/{case.case_id}")
            click.echo(report.to_text())
        reports.append({"case": f"{name}/{case.case_id}", **report.to_dict()})
        if plot is not None:
            curves.append((f"{name}/{case.case_id}", *(
                plot.step_error_curve(spec, resolved, inputs, params, state, dtype=dt,
                                      seed=seed) for dt in ("float64", "float32"))))
    if to_stdout:
        click.echo(json.dumps(reports, indent=2))
    elif json_path is not None:
        write_report(json_path, json.dumps(reports, indent=2))
    if plot is not None:
        wrote(plot.write_step_error_plot(plot_path, curves), err=to_stdout)
    if not all(r["ok"] for r in reports):
        ctx.exit(1)
