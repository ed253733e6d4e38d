"""``refattn verify DIR``: re-check fixture cases (schema, files, digests)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from refattn.cli.common import BadInput  # also imported from here by cli/show.py
from refattn.golden.format import (
    MANIFEST_NAME,
    FixtureError,
    GoldenCase,
    VerifyResult,
    find_cases,
    read_case,
    verify_case,
)

_SHOWN = 3
"""Problems printed per failed case in text mode."""


def case_dirs(path_arg: str, what: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The case directories under a DIR argument (a case, a tree of cases, or
    a manifest.json file), and the entries of the tree that could not be
    searched (``(path, reason)``: a link loop, a dangling link, a link to a
    file, an unlistable directory; see ``find_cases``).  ``BadInput`` when
    there is neither a case nor such an entry."""
    if not path_arg:  # Path("") is the current directory: a likely unset variable
        raise BadInput(f"{what}: empty path")
    path = Path(path_arg)
    if path.is_file() and path.name == MANIFEST_NAME:
        path = path.parent
    if not path.exists():
        raise BadInput(f"{what}: no such file or directory: {path_arg}")
    if not path.is_dir():
        raise BadInput(f"{what}: not a directory: {path_arg}")
    problems: list[tuple[Path, str]] = []
    try:
        cases = find_cases(path, problems=problems)
    except FixtureError as err:
        raise BadInput(f"{what}: {err}") from None
    if not cases and not problems:
        raise BadInput(
            f"{what}: no fixture case (a directory holding {MANIFEST_NAME}) "
            f"under {path_arg}"
        )
    return cases, problems


def read_verified(path: Path, what: str) -> GoldenCase:
    """``read_case`` after ``verify_case``: every file of the case is checked
    (a damaged npz mirror too, though the tensors come from the safetensors
    file), so a command never uses a case that ``refattn verify`` fails.
    ``BadInput`` names the file (and tensor) of the first problem."""
    result = verify_case(path)
    if not result.ok:
        more = len(result.problems) - 1
        tail = f" (and {more} more problem(s); see refattn verify)" if more else ""
        raise BadInput(f"{what}: {result.problems[0]}{tail}")
    try:
        return read_case(path)
    except FixtureError as err:  # changed since it was verified
        raise BadInput(f"{what}: {err}") from None


@click.command("verify")
@click.argument("directory", metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead.")
@click.pass_context
def verify(ctx: click.Context, directory: str, as_json: bool) -> None:
    """Re-check every fixture case in DIR (a case or any tree of cases).

    For each case: the manifest's schema, fields and digest, and every tensor
    file it lists (header, shapes, dtypes, each tensor's sha256).  Prints one
    line per case, OK or FAILED with the problems.

    Directory links are followed.  An entry that cannot be searched (a link
    loop, a dangling link, a link to a file, an unreadable directory) is a
    failed entry, named, since it may hide a case.

    Exit status: 0 all cases OK, 1 any case or entry failed, 2 DIR does not
    exist or holds no case.
    """
    cases, unsearched = case_dirs(directory, "DIR")
    results = [verify_case(case) for case in cases]
    # what could not be searched might hide a case: a failed entry, by name
    results += [VerifyResult(path, False, (f"{path}: {reason}",), None)
                for path, reason in unsearched]
    results.sort(key=lambda r: r.path)
    failed = [r for r in results if not r.ok]
    if as_json:
        report = {"ok": not failed, "cases": [r.to_dict() for r in results]}
        click.echo(json.dumps(report, indent=2))
    else:
        for r in results:
            if r.ok:
                click.echo(f"OK      {r.path}  digest {str(r.digest)[:16]}")
            else:
                shown = "; ".join(r.problems[:_SHOWN])
                more = len(r.problems) - _SHOWN
                tail = f" (+{more} more; --json lists all)" if more > 0 else ""
                click.echo(f"FAILED  {r.path}: {shown}{tail}")
        click.echo(f"{len(results)} case(s) verified, {len(failed)} failed")
    if failed:
        ctx.exit(1)
