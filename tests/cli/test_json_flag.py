"""``--json`` means the same in every subcommand: the report as one JSON
document on stdout and nothing else there.  gradcheck's ``--json`` takes a
PATH (it also writes the text report); ``--json -`` is the stdout form."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from refattn.cli import main

PATH_VALUED = {"gradcheck"}
"""Subcommands whose --json takes a PATH rather than being a flag."""


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_every_subcommand_has_a_json_option_of_a_known_kind():
    flags, paths = set(), set()
    for name, cmd in main.commands.items():
        (opt,) = [p for p in cmd.params if "--json" in getattr(p, "opts", [])]
        (flags if opt.is_flag else paths).add(name)
        if not opt.is_flag:
            assert isinstance(opt.type, click.Path)
            assert "'-' prints the JSON to stdout" in " ".join(opt.help.split())
    assert paths == PATH_VALUED
    assert flags == set(main.commands) - PATH_VALUED


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("g")
    assert run("golden", "--block", "gap", "--out", str(root)).exit_code == 0
    return root / "gap" / "default-float64"


def _results(case: Path, tmp: Path) -> Path:
    import numpy as np

    with np.load(case / "tensors.npz") as z:
        keep = {k: z[k] for k in z.files if k.startswith(("output.", "grad."))}
    path = tmp / "results.npz"
    np.savez(path, **keep)
    return path


def test_stdout_is_one_json_document_in_every_subcommand(case: Path, tmp_path: Path):
    commands = {
        "info": ["info", "--json"],
        "list": ["list", "gap", "--json"],
        "golden": ["golden", "--block", "gap", "--out", str(tmp_path / "o"), "--json"],
        "gradcheck": ["gradcheck", "--block", "gap", "--json", "-"],
        "verify": ["verify", str(case), "--json"],
        "show": ["show", str(case), "--json"],
        "validate": ["validate", str(case), "--results", str(_results(case, tmp_path)),
                     "--json"],
    }
    assert set(commands) == set(main.commands)
    for name, args in commands.items():
        result = run(*args)
        assert result.exit_code == 0, (name, result.output)
        json.loads(result.stdout)  # the whole of stdout, nothing around it


def test_gradcheck_json_path_and_dash_hold_the_same_report(tmp_path: Path):
    target = tmp_path / "r.json"
    text = run("gradcheck", "--block", "gap", "--json", str(target))
    assert text.exit_code == 0 and "gap/default-float64" in text.stdout
    dashed = json.loads(run("gradcheck", "--block", "gap", "--json", "-").stdout)
    written = json.loads(target.read_text())
    for report in dashed + written:
        report.pop("seconds")  # a timing: the one field two runs differ in
    assert dashed == written
    assert dashed and dashed[0]["ok"] is True


def test_a_json_flag_given_a_value_is_a_one_line_usage_error(case: Path):
    """`verify --json out.json` does not write a file: the flag takes no value,
    so the extra argument is refused (exit 2), never silently ignored."""
    result = run("show", "--json", "out.json", str(case))
    assert result.exit_code == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output


def test_gradcheck_json_dash_on_failure_still_exits_1(monkeypatch):
    """A planted wrong backward (gradients doubled): exit 1, and the JSON on
    stdout says which check failed."""
    from refattn.blocks.registry import BLOCKS

    spec = BLOCKS["gap"]
    real = spec.backward

    def wrong(douts, cache):
        dinputs, dparams = real(douts, cache)
        return {k: 2 * v for k, v in dinputs.items()}, dparams

    monkeypatch.setitem(spec.__dict__, "backward", wrong)
    result = run("gradcheck", "--block", "gap", "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report[0]["ok"] is False
    assert report[0]["tensors"][0]["status"] != "pass"
