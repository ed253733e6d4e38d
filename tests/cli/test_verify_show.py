"""``refattn verify`` and ``refattn show`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from refattn.cli.show import show
from refattn.cli.verify import verify
from refattn.golden.format import read_case, summarize_case, write_case

pytest.importorskip("safetensors")


@pytest.fixture
def cli() -> click.Group:
    return click.Group("refattn", commands=[verify, show])


def run(cli: click.Group, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def make_case(root: Path, case_id: str, seed: int = 0, block: str = "cbam") -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "input.x": rng.standard_normal((2, 4, 3, 3)),
        "param.conv.weight": rng.standard_normal((1, 2, 7, 7)),
        "cotangent.out": rng.standard_normal((2, 4, 3, 3)),
        "output.out": rng.standard_normal((2, 4, 3, 3)),
        "grad.input.x": rng.standard_normal((2, 4, 3, 3)),
        "grad.param.conv.weight": rng.standard_normal((1, 2, 7, 7)),
        "aux.spatial_gate": rng.random((2, 1, 3, 3)),
    }
    manifest = {
        "block": block,
        "preset": "paper",
        "case_id": case_id,
        "config": {"reduction": 2, "kernel_size": 7},
        "dtype": "float64",
        "mode": None,
        "seed": seed,
        "rng": "numpy.random.default_rng(PCG64)",
        "input_constraints": {},
        "redraws": 1,
        "inputs": ["x"],
        "outputs": ["out"],
        "anchor_names": {},
    }
    return write_case(
        root,
        block,
        case_id,
        tensors,
        manifest,
        accumulation={"output.out": 98, "grad.param.conv.weight": 18},
    )


def one_error_line(result: Result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    return lines[0]


def test_help(cli: click.Group) -> None:
    for cmd in ("verify", "show"):
        result = run(cli, cmd, "--help")
        assert result.exit_code == 0 and "Exit status" in result.output


def test_verify_tree_ok(cli: click.Group, tmp_path: Path) -> None:
    a = make_case(tmp_path, "a")
    b = make_case(tmp_path, "b", seed=1)
    result = run(cli, "verify", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("OK") and str(a) in lines[0]
    assert lines[1].startswith("OK") and str(b) in lines[1]
    assert "2 case(s) verified, 0 failed" in lines[2]
    single = run(cli, "verify", str(a))
    assert single.exit_code == 0 and single.output.count("OK") == 1
    via_manifest = run(cli, "verify", str(a / "manifest.json"))
    assert via_manifest.exit_code == 0


def test_verify_reports_the_corrupted_tensor(cli: click.Group, tmp_path: Path) -> None:
    a = make_case(tmp_path, "a")
    b = make_case(tmp_path, "b", seed=1)
    gate = read_case(b).tensors["aux.spatial_gate"]
    path = b / "tensors.npz"
    data = bytearray(path.read_bytes())
    at = bytes(data).find(gate.astype("<f8").tobytes()) + 9
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run(cli, "verify", str(tmp_path))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("OK") and str(a) in lines[0]
    assert lines[1].startswith("FAILED") and str(b) in lines[1]
    assert "tensors.npz" in lines[1] and "'aux.spatial_gate'" in lines[1]
    assert "1 failed" in lines[2]
    report = json.loads(run(cli, "verify", "--json", str(tmp_path)).output)
    assert report["ok"] is False
    assert [c["ok"] for c in report["cases"]] == [True, False]
    assert "aux.spatial_gate" in report["cases"][1]["problems"][0]


def test_verify_broken_manifest_is_a_failure(cli: click.Group, tmp_path: Path) -> None:
    case = make_case(tmp_path, "a")
    (case / "manifest.json").write_text("{")
    result = run(cli, "verify", str(case))
    assert result.exit_code == 1
    assert "FAILED" in result.output and "manifest.json" in result.output


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_verify_bad_path_exits_2(cli: click.Group, tmp_path: Path, what: str) -> None:
    target = tmp_path / "x"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("hello")
    result = run(cli, "verify", str(target))
    assert result.exit_code == 2
    assert str(target) in one_error_line(result)


def test_show_text(cli: click.Group, tmp_path: Path) -> None:
    case = make_case(tmp_path, "a", seed=3)
    result = run(cli, "show", str(case))
    assert result.exit_code == 0, result.output
    out = result.output
    golden = read_case(case)
    for text in (
        "cbam",
        "paper",
        "float64",
        "seed: 3",
        golden.manifest["digest"],
        '"kernel_size": 7',
        "grad.param.conv.weight",
        "(1, 2, 7, 7)",
        "grad_param",
    ):
        assert text in out, text
    table = out.split("\n\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["tensor", "role", "shape", "dtype"]
    assert len(table) == 1 + len(golden.tensors)


def test_show_json_matches_summary(cli: click.Group, tmp_path: Path) -> None:
    case = make_case(tmp_path, "a")
    result = run(cli, "show", "--json", str(case))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    golden = read_case(case)
    assert data["block"] == "cbam" and data["preset"] == "paper"
    assert data["digest"] == golden.manifest["digest"]
    assert data["config"] == {"reduction": 2, "kernel_size": 7}
    want: list[dict[str, Any]] = [
        {**r, "shape": list(r["shape"])} for r in summarize_case(golden)
    ]
    assert data["tensors"] == want
    x = golden.tensors["input.x"]
    row = next(r for r in data["tensors"] if r["tensor"] == "input.x")
    assert row["min"] == float(x.min()) and row["max"] == float(x.max())


def test_show_bad_input_exits_2(cli: click.Group, tmp_path: Path) -> None:
    result = run(cli, "show", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "missing" in one_error_line(result)
    result = run(cli, "show", str(tmp_path))
    assert result.exit_code == 2 and "not a fixture case" in one_error_line(result)
    case = make_case(tmp_path, "a")
    data = (case / "tensors.safetensors").read_bytes()
    (case / "tensors.safetensors").write_bytes(data[: len(data) - 40])
    result = run(cli, "show", str(case))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "tensors.safetensors" in line and "truncated" in line
