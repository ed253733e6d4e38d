"""``refattn validate``: check a third party's tensors against a golden case."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("case", type=click.Path(path_type=Path))
@click.option("--results", type=click.Path(path_type=Path),
              help="Their tensors: a .safetensors or .npz file with the fixture's keys.")
@click.option("--torch", "torch_factory", metavar="MODULE:FACTORY",
              help="A PyTorch module factory, called with the case's config dict.")
@click.option("--jax", "jax_factory", metavar="MODULE:FACTORY",
              help="A JAX factory returning (apply, params) or a Flax NNX module.")
@click.option("--keras", "keras_factory", metavar="MODULE:FACTORY",
              help="A Keras 3 layer factory (JAX or torch backend).")
@click.option("--data-format", type=click.Choice(["channels_first", "channels_last"]),
              default=None,
              help="The layout --jax/--keras code takes inputs in [default: "
                   "channels_first for --jax, Keras's image_data_format for --keras].")
@click.option("--names", default="canonical", show_default=True,
              metavar="canonical|anchor|MAP.json|JSON",
              help="How the model's names (torch state_dict keys, JAX pytree paths, "
                   "Keras variable paths) relate to the fixture's: a JSON map (a file, "
                   "or inline) of exact names and prefix rules ending in '.', e.g. "
                   "'{\"mlp.\": \"ChannelGate.mlp.\"}'; with --torch, "
                   "'aux.NAME': 'SUBMODULE' hooks an intermediate.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--require", type=click.Choice(["provided", "all"]), default="provided",
              show_default=True,
              help="provided: what is given must pass (a partial check is reported "
                   "PARTIAL, exit 0); all: every tensor of the case must be checked "
                   "and pass (for CI).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def validate(ctx: click.Context, case: Path, results: Path | None,
             torch_factory: str | None, jax_factory: str | None,
             keras_factory: str | None, data_format: str | None, names: str,
             device: str, require: str, as_json: bool) -> None:
    """Compare an implementation's outputs and gradients with CASE.

    The verdict is PASS (every tensor checked and passed), PARTIAL (what was
    checked passed, some tensor was not checked) or FAIL.  Exit 0 on PASS
    and PARTIAL, 1 on any mismatch (and on PARTIAL with --require all), 2 on
    bad input (results that are not real floats included; a module that
    calls sys.exit or raises KeyboardInterrupt gives no verdict: exit 2).
    What the --torch/--jax/--keras code prints goes to stderr, after the
    report, so stdout carries the report alone.
    """
    from refattn.cli.verify import read_verified
    from refattn.validate import load_results, validate_results, validate_run

    given = [o for o in (results, torch_factory, jax_factory, keras_factory) if o is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --results FILE or --torch MODULE:FACTORY"
                               " or --jax MODULE:FACTORY or --keras MODULE:FACTORY")
    if data_format is not None and (jax_factory or keras_factory) is None:
        raise click.UsageError("--data-format: applies to --jax and --keras only, got "
                               f"{data_format!r} without either")
    if not case.is_dir():
        raise click.UsageError(f"CASE: {case} is not a case directory")
    fixture = read_verified(case, "CASE")
    if results is not None:
        report = validate_results(fixture, load_results(results), subject=str(results),
                                  require=require)
    elif torch_factory is not None:
        from refattn.adapters.torch import load_factory, run_torch_case

        captured: list[str] = []
        ctx.call_on_close(lambda: _show_captured(torch_factory, captured))
        with _their_output(captured):
            factory = load_factory(torch_factory)
            report = validate_run(
                fixture, lambda: run_torch_case(fixture, factory, names=names,
                                                device=device),
                require=require,
                subject=f"torch module from {torch_factory} ({_names_label(names)} names)")
    else:
        report = _validate_jax_or_keras(ctx, fixture, jax_factory, keras_factory,
                                        names=names, data_format=data_format,
                                        require=require)
    click.echo(report.to_json() if as_json else report.to_text())
    if not report.ok:
        ctx.exit(1)


def _validate_jax_or_keras(ctx: click.Context, fixture: Any, jax_factory: str | None,
                           keras_factory: str | None, *, names: str,
                           data_format: str | None, require: str) -> Any:
    """--jax or --keras: run their code with its output captured, compare."""
    from refattn.validate import validate_results

    spec = jax_factory or keras_factory
    captured: list[str] = []
    ctx.call_on_close(lambda: _show_captured(spec, captured))
    with _their_output(captured):
        if jax_factory is not None:
            from refattn.adapters import jax as adapter

            factory = adapter.load_factory(jax_factory)
            layout = data_format or "channels_first"
            theirs = adapter.run_jax_case(fixture, factory, names=names, data_format=layout)
            subject = f"JAX model from {spec} ({_names_label(names)} names, {layout})"
        else:
            from refattn.adapters import keras as kadapter

            factory = kadapter.load_factory(keras_factory)  # type: ignore[arg-type]
            theirs = kadapter.run_keras_case(fixture, factory, names=names,
                                             data_format=data_format)
            subject = (f"Keras layer from {spec} ({kadapter.backend()} backend, "
                       f"{_names_label(names)} names)")
    return validate_results(fixture, theirs, require=require, subject=subject)


def _names_label(names: str) -> str:
    """--names as the report's subject line shows it (an inline map shortened)."""
    from refattn.golden.files import printable

    return "inline map" if names.lstrip().startswith("{") else printable(names, 80)


@contextlib.contextmanager
def _their_output(into: list[str]) -> Iterator[None]:
    """Keep what the user's code writes to standard output off stdout, which
    carries the report (``--json`` must parse), and append it to `into`.

    Both ``sys.stdout`` (``print``) and file descriptor 1 (``sys.__stdout__``,
    compiled code) go to one spool file, in the order written.
    """
    sys.stdout.flush()
    with tempfile.TemporaryFile() as spool:
        text = io.TextIOWrapper(io.FileIO(spool.fileno(), "w", closefd=False),
                                encoding="utf-8", errors="replace", write_through=True)
        saved = _redirect_fd1(spool.fileno())
        try:
            with contextlib.redirect_stdout(text):
                yield
        finally:
            text.close()
            if saved is not None:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.__stdout__.flush()  # type: ignore[union-attr]
                os.dup2(saved, 1)
                os.close(saved)
            spool.seek(0)
            into.append(spool.read().decode("utf-8", errors="replace"))


def _redirect_fd1(target: int) -> int | None:
    """Point descriptor 1 at `target`; a copy of the old one, or None when
    there is no descriptor 1 to redirect."""
    try:
        if sys.__stdout__ is not None:
            sys.__stdout__.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        return None
    os.dup2(target, 1)
    return saved


def _show_captured(spec: str | None, captured: list[str]) -> None:
    """Their output on stderr, after the report (or before the error line)."""
    text = "".join(captured)
    if text.strip():
        click.echo(f"output of {spec} (captured):", err=True)
        click.echo(text.rstrip("\n"), err=True)
