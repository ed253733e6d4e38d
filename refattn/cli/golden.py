"""``refattn golden``: write golden fixture cases."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from refattn.cli.common import BadInput, signals_deferred
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
@click.option("--dtype", type=click.Choice(["float64", "float32", "all"]),
              default="float64", show_default=True,
              help="Dtype of the stored tensors (reference math is float64); 'all': "
                   "float64 and float32.")
@click.option("--out", "out", type=click.Path(file_okay=False), callback=out_dir,
              default="refattn-golden", show_default=True,
              help="Root directory; cases go to OUT/<block>/<case-id>/.")
@click.option("--format", "formats", default=",".join(FORMATS), show_default=True,
              callback=_parse_formats, help="Tensor files to write.")
@click.option("--mode", type=click.Choice(["train", "eval"]), default=None,
              help="Only the train-mode or the eval-mode case of a batch-norm "
                   "preset [default: both].")
@click.option("--force", is_flag=True,
              help="Replace an existing case that differs (an identical one is kept).")
@click.option("--all", "all_cases", is_flag=True,
              help="Every preset of every block, float64 and float32 (for every "
                   "case of one block: --block B --preset all --dtype all).")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print the written cases as JSON.")
def golden(block: str | None, preset: str | None, overrides: dict[str, Any],
           shapes: dict[str, tuple[int, ...]] | None, seed: int, dtype: str, out: Path,
           formats: tuple[str, ...], mode: str | None, force: bool, all_cases: bool,
           backend: str, as_json: bool) -> None:
    """Generate golden fixture cases (inputs, parameters, outputs, gradients).

    BN-bearing presets get a train-mode and an eval-mode case unless --mode
    or --set fixes the mode.  --preset all writes every preset of the block
    (with --set and --shape applied to each), --dtype all both dtypes: so
    `--block cbam --preset all --dtype all` writes every preset x dtype x BN
    mode of cbam.  A case with --set or --shape values has an id that spells
    them, then a hash: mmcv-float64-fusion_types.channel_add.channel_mul-b6c79be3.  Re-running a command is safe: a case that
    exists and is identical to the new one is kept (and reported "kept");
    a different one is refused unless --force.  Each case is printed as it
    is written.
    """
    from refattn.golden.generate import all_requests, expand_requests, generate_case

    xp, device = resolve_backend(backend)
    if all_cases:
        if block or preset or overrides or shapes:
            raise click.UsageError(
                "--all takes no --block, --preset, --set or --shape (every case of "
                "one block: --block B --preset all --dtype all)")
        requests = all_requests(seed=seed)
    else:
        name = require_block(block)
        dtypes = ("float64", "float32") if dtype == "all" else (dtype,)
        try:
            requests = [rc for p in _presets(name, preset) for dt in dtypes
                        for rc in expand_requests(name, p, overrides, shapes=shapes,
                                                  dtype=dt, seed=seed)]
        except ValueError as err:
            hinted = _with_list_hint(str(err), overrides)
            if hinted == str(err):
                raise
            raise BadInput(hinted) from None
    if mode is not None:
        requests = _of_mode(requests, mode)
    check_requests(requests)  # refuse what cannot fit before drawing anything
    # before the header: a path under a file fails here, with nothing on stdout
    found = next((p for p in (out, *out.parents) if os.path.lexists(p)), None)
    if found is not None and not found.is_dir():
        raise click.UsageError(f"--out: Not a directory: {found} is a file")
    if (out / "manifest.json").exists():  # cases inside a case are never found
        raise click.UsageError(f"--out: {out} is a fixture case; give the root of "
                               "the fixture tree (cases go to OUT/<block>/<case-id>)")
    rows: list[dict[str, Any]] = []
    width = max(len(_planned_name(req, cfg)) for req, cfg in requests)
    if not as_json:
        click.echo(f"{'case':<{width}}  {'tensors':>7}  {'bytes':>9}  digest            "
                   "status")
    # the bar only on a terminal: piped, stderr carries nothing but an error line
    bar_or_not = (click.progressbar(requests, label="generating", file=sys.stderr,
                                    show_pos=True)
                  if sys.stderr.isatty() and as_json else contextlib.nullcontext(requests))
    with bar_or_not as bar:
        for req, cfg in bar:
            case = generate_case(req, cfg, xp=xp, device=device)
            for key, (kind, reason) in case.checks.items():
                if kind == "none":
                    click.echo(
                        f"warning: {case.block}/{case.case_id}: {key} is NOT CHECKABLE "
                        f"in {req.dtype} ({reason}); validate reports it NOT CHECKED "
                        "and --require all fails on it", err=True)
            row = _write_or_keep(case, out, formats, force)
            rows.append(row)
            if not as_json:
                click.echo(f"{row['case']:<{width}}  {row['tensors']:>7}  "
                           f"{row['bytes']:>9}  {row['digest'][:16]}  {row['status']}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    click.echo(f"{len(rows)} case(s) under {out}: {done}")


STATUSES = ("written", "replaced", "kept (identical)")
"""What happened to each case: new, replaced (--force, it differed), or kept
because the existing case is identical to the new one."""


def _planned_name(req: Any, cfg: Any) -> str:
    from refattn.blocks.registry import BLOCKS
    from refattn.golden.generate import bn_mode_of

    return f"{req.block}/{req.case_id(bn_mode_of(BLOCKS[req.block], cfg))}"


ALL_PRESETS = "all"
"""--preset all: every preset of the block."""


def _presets(block: str, preset: str | None) -> list[str | None]:
    """The presets of --preset: one, or with ``all`` every preset of the block
    (the default config, None, for a block that has none)."""
    from refattn.blocks.registry import BLOCKS

    presets = list(BLOCKS[block].presets)
    if preset == ALL_PRESETS:
        return presets or [None]  # type: ignore[return-value]
    if preset is not None and presets and preset not in presets:
        raise BadInput(f"--preset: {block} has no preset {preset!r} (presets: "
                       f"{', '.join(presets)}; or {ALL_PRESETS} for every one)")
    return [preset]


def _of_mode(requests: list[tuple[Any, Any]], mode: str) -> list[tuple[Any, Any]]:
    """The requests whose case has BN mode `mode` (--mode); with several
    presets, the cases of the presets without a live batch norm stay too."""
    from refattn.blocks.registry import BLOCKS
    from refattn.golden.generate import bn_mode_of

    modes = [bn_mode_of(BLOCKS[req.block], cfg) for req, cfg in requests]
    kept = [rc for rc, m in zip(requests, modes) if m in (mode, None)]
    if not any(m == mode for m in modes):
        if all(m is None for m in modes):
            raise BadInput(f"--mode {mode}: these cases have no live batch norm, so "
                           "no train or eval mode; leave --mode out")
        raise BadInput(f"--mode {mode}: the --set values fix the mode to "
                       f"{', '.join(sorted({m for m in modes if m}))}")
    return kept


def _with_list_hint(message: str, overrides: dict[str, Any]) -> str:
    """A config error about a --set value given as a bare string: add how a
    list is written on the command line."""
    for key, value in overrides.items():
        if isinstance(value, str) and message.startswith(f"{key}:"):
            return (f"{message}; a list is given as --set {key}={value},... or in "
                    f"JSON, --set '{key}=[\"{value}\"]'")
    return message


def _write_or_keep(case: Any, out: Path, formats: tuple[str, ...], force: bool
                   ) -> dict[str, Any]:
    """Write `case`, or keep the existing one when it is identical (same case
    digest: tensors, tolerances, config, formats; provenance aside)."""
    from refattn.golden.format import (
        CaseExistsError,
        load_manifest,
        planned_manifest,
        verify_case,
        write_case,
    )

    path = out / case.block / case.case_id
    planned = planned_manifest(case.block, case.case_id, case.tensors, case.manifest,
                               tolerances=case.tolerances,
                               accumulation=case.accumulation, checks=case.checks,
                               formats=formats)
    status = "written"
    if os.path.lexists(path):
        verified = verify_case(path)
        old = load_manifest(path) if verified.ok else None
        if old is not None and old.get("digest") == planned["digest"]:
            return _row(case, path, "kept (identical)")
        if not force:
            why = (_differences(old, planned) if old is not None
                   else f"it does not verify ({verified.problems[0]})")
            raise BadInput(f"{path}: a different case exists there ({why}); add --force "
                           "to replace it")
        status = "replaced"
    try:
        with signals_deferred():  # a write completes before SIGTERM/SIGINT act
            path = write_case(out, case.block, case.case_id, case.tensors,
                              case.manifest, tolerances=case.tolerances,
                              accumulation=case.accumulation, checks=case.checks,
                              formats=formats, force=force)
    except CaseExistsError:  # written by another process meanwhile
        raise BadInput(f"{path}: a case exists there now (another run wrote it while this one was generated); "
                       "run again, or add --force to replace it") from None
    return _row(case, path, status)


def _row(case: Any, path: Path, status: str) -> dict[str, Any]:
    manifest = json.loads((path / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"case": f"{case.block}/{case.case_id}", "path": str(path),
            "tensors": len(case.tensors), "bytes": size, "digest": manifest["digest"],
            "status": status}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two manifests, briefly."""
    fields = sorted(k for k in set(old) | set(new)
                    if k not in ("digest", "provenance", "tensors")
                    and old.get(k) != new.get(k))
    tensors = sorted(k for k in set(old.get("tensors", {})) | set(new["tensors"])
                     if old.get("tensors", {}).get(k) != new["tensors"].get(k))
    parts = []
    if fields:
        parts.append("fields " + ", ".join(fields))
    if tensors:
        parts.append(f"{len(tensors)} tensor(s), e.g. {tensors[0]}")
    return "differs in " + ("; ".join(parts) or "its digest")
