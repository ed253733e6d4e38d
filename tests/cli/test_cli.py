"""CliRunner tests of every subcommand and its exit codes (0 / 1 / 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from refattn.cli import main


def run(*args: str, **kwargs):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)


def one_line_error(result) -> str:
    """Exit 2 with exactly one line on stderr and no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.mark.parametrize("cmd", ["info", "list", "golden", "gradcheck", "verify", "show",
                                 "validate"])
def test_help(cmd):
    result = run(cmd, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_version_and_info():
    assert run("--version").output.startswith("refattn, version")
    data = json.loads(run("info", "--json").stdout)
    assert data["backends"]["numpy"] is True
    assert "gpu" in data and "packages" in data


def test_list_reads_the_registry():
    from refattn.blocks.registry import BLOCKS

    rows = json.loads(run("list", "--json").stdout)
    assert [r["block"] for r in rows] == list(BLOCKS)
    cbam = next(r for r in rows if r["block"] == "cbam")
    assert {"jongchan", "luuuyi", "seed"} <= set(cbam["presets"])
    text = run("list", "cgnl").output
    assert "presets: yue" in text and "fixture shapes" in text


def test_golden_writes_verifies_and_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "g"
    first = run("golden", "--block", "cgnl", "--out", str(out))
    assert first.exit_code == 0, first.output
    assert "yue-float64" in first.output
    cases = sorted(p.name for p in (out / "cgnl").iterdir())
    assert cases == ["yue-float64"]
    before = (out / "cgnl" / "yue-float64" / "manifest.json").read_bytes()
    # the same command again: the identical case is kept, and said so
    again = run("golden", "--block", "cgnl", "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "cgnl/yue-float64" in again.stdout and "kept (identical)" in again.stdout
    assert (out / "cgnl" / "yue-float64" / "manifest.json").read_bytes() == before
    # a different case under the same id is refused, in the CLI's words
    other = run("golden", "--block", "cgnl", "--out", str(out), "--format", "npz")
    line = one_line_error(other)
    assert "a different case exists there (differs in fields formats)" in line
    assert "add --force to replace it" in line and "force=True" not in line
    assert (out / "cgnl" / "yue-float64" / "manifest.json").read_bytes() == before
    forced = run("golden", "--block", "cgnl", "--out", str(out), "--force")
    assert forced.exit_code == 0 and "kept (identical)" in forced.stdout
    # same command, same digests
    assert (out / "cgnl" / "yue-float64" / "manifest.json").read_bytes() == before
    assert run("verify", str(out)).exit_code == 0


def test_golden_mode_and_list_values(tmp_path: Path):
    result = run("golden", "--block", "cbam", "--mode", "eval", "--out", str(tmp_path),
                 "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["case"] for r in rows] == ["cbam/jongchan-eval-float64"]
    assert rows[0]["status"] == "written"
    line = one_line_error(run("golden", "--block", "gap", "--mode", "train",
                              "--out", str(tmp_path)))
    assert "--mode train: these cases have no live batch norm" in line
    line = one_line_error(run("golden", "--block", "cbam", "--mode", "train",
                              "--set", "spatial_bn=eval", "--out", str(tmp_path)))
    assert "--mode train: the --set values fix the mode to eval" in line
    # a comma-separated list is a list; a one-word list error shows the JSON form
    listed = run("golden", "--block", "cbam_channel", "--set", "pool_types=avg,lse",
                 "--out", str(tmp_path), "--json")
    assert listed.exit_code == 0, listed.output
    manifest = json.loads((Path(json.loads(listed.stdout)[0]["path"])
                           / "manifest.json").read_text())
    assert manifest["config"]["pool_types"] == ["avg", "lse"]
    line = one_line_error(run("golden", "--block", "cbam_channel", "--set",
                              "pool_types=avg", "--out", str(tmp_path)))
    assert """--set 'pool_types=["avg"]'""" in line


def test_golden_prints_each_case_as_written(tmp_path: Path):
    """A run that stops part-way has already printed what it wrote."""
    (tmp_path / "cbam" / "jongchan-eval-float64").mkdir(parents=True)  # not a case
    result = run("golden", "--block", "cbam", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "cbam/jongchan-train-float64" in result.stdout  # written before the error
    assert "written" in result.stdout
    assert "it does not verify" in result.stderr


def test_golden_bn_preset_gives_train_and_eval_cases(tmp_path: Path):
    result = run("golden", "--block", "cbam", "--preset", "jongchan", "--out", str(tmp_path),
                 "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    cases = sorted(r["case"] for r in json.loads(result.stdout))
    assert cases == ["cbam/jongchan-eval-float32", "cbam/jongchan-train-float32"]
    # an explicit --set of the BN key gives exactly that case
    result = run("golden", "--block", "cbam", "--preset", "jongchan", "--set",
                 "spatial_bn=eval", "--out", str(tmp_path), "--json")
    assert len(json.loads(result.stdout)) == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["golden", "--block", "nope"], "unknown block 'nope'"),
        (["golden", "--block", "cbam", "--preset", "nope"], "no preset 'nope'"),
        (["golden", "--block", "cbam", "--set", "colour=3"], "no key(s) colour"),
        (["golden", "--block", "cbam", "--set", "reduction"], "KEY=VALUE"),
        (["golden", "--block", "cbam", "--shape", "x=2,a,3"], "NAME=N,C,H,W"),
        (["golden", "--block", "cbam", "--shape", "y=2,16,4,4"], "no input named y"),
        (["golden"], "--block"),
        (["golden", "--block", "cbam", "--dtype", "float16"], "float16"),
        (["gradcheck", "--block", "cgnl", "--set", "groups=3", "--shape", "x=2,16,5,5"],
         "groups"),
        (["verify", "/nonexistent/dir"], "nonexistent"),
        (["show", "/nonexistent/dir"], "nonexistent"),
        (["validate", "/nonexistent/dir", "--results", "x.npz"], "nonexistent"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, needle):
    line = one_line_error(run(*args))
    assert needle in line


def test_golden_out_is_a_file(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    line = one_line_error(run("golden", "--block", "gap", "--out", str(f)))
    assert "is a file" in line


def test_gradcheck_passes_and_writes_json(tmp_path: Path):
    target = tmp_path / "report.json"
    result = run("gradcheck", "--block", "cbam", "--preset", "luuuyi", "--json", str(target))
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    data = json.loads(target.read_text())
    assert data[0]["ok"] is True
    assert {t["name"] for t in data[0]["tensors"]} >= {"input.x", "param.mlp.fc1.weight"}


def test_gradcheck_failure_exits_1(monkeypatch):
    from refattn.blocks.registry import BLOCKS

    spec = BLOCKS["gap"]
    real = spec.backward

    def wrong(douts, cache):
        dinputs, dparams = real(douts, cache)
        return {k: 2 * v for k, v in dinputs.items()}, dparams

    monkeypatch.setitem(spec.__dict__, "backward", wrong)  # a planted wrong backward
    result = run("gradcheck", "--block", "gap")
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(main, ["--debug", "golden", "--block", "nope"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError)
