"""``refattn validate``: check a third party's tensors against a golden case."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("case", type=click.Path(path_type=Path))
@click.option("--results", type=click.Path(path_type=Path),
              help="Their tensors: a .safetensors or .npz file with the fixture's keys.")
@click.option("--torch", "torch_factory", metavar="MODULE:FACTORY",
              help="A PyTorch module factory, called with the case's config dict.")
@click.option("--names", default="canonical", show_default=True,
              metavar="canonical|anchor|MAP.json",
              help="How the module's state_dict names relate to the fixture's.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def validate(ctx: click.Context, case: Path, results: Path | None,
             torch_factory: str | None, names: str, device: str, as_json: bool) -> None:
    """Compare an implementation's outputs and gradients with CASE.

    Exit 0 when every checked tensor passes, 1 on any mismatch, 2 on bad input.
    """
    from refattn.cli.verify import read_verified
    from refattn.validate import load_results, validate_results

    if (results is None) == (torch_factory is None):
        raise click.UsageError("give exactly one of --results FILE or --torch MODULE:FACTORY")
    if not case.is_dir():
        raise click.UsageError(f"CASE: {case} is not a case directory")
    fixture = read_verified(case, "CASE")
    if results is not None:
        report = validate_results(fixture, load_results(results), subject=str(results))
    else:
        from refattn.adapters.torch import load_factory, run_torch_case

        factory = load_factory(torch_factory)  # type: ignore[arg-type]
        theirs = run_torch_case(fixture, factory, names=names, device=device)
        report = validate_results(fixture, theirs,
                                  subject=f"torch module from {torch_factory} ({names} names)")
    click.echo(report.to_json() if as_json else report.to_text())
    if not report.ok:
        ctx.exit(1)
