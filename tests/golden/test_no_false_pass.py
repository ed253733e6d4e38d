"""No false PASS: every verdict refattn gives can fail.

* a mutation test over every committed case and over freshly generated cases
  of every block and preset: for each checked tensor the zeroed, negated,
  scaled (1 + 10 rtol) and one-off results each FAIL through the real
  validate path, and the unmutated results PASS;
* the tolerance checker (``refattn.golden.strength``) itself rejects planted
  weak tolerances, and ``validate`` reports a tensor whose stored tolerance is
  vacuous as NOT CHECKED, never PASS;
* tensors marked not checkable are NOT CHECKED with their reason and make
  the verdict PARTIAL; ``require="all"`` fails it;
* results must be real floats.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refattn.cli.main import main
from refattn.golden.format import find_cases, read_case, write_case
from refattn.golden.generate import all_requests, generate_case
from refattn.golden.strength import (
    MAX_RTOL,
    case_weaknesses,
    mutants,
    tolerance_weaknesses,
)
from refattn.testing import assert_matches_golden
from refattn.validate import ValidationInputError, validate_results

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
CASES = find_cases(GOLDEN) if GOLDEN.is_dir() else []


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _expected(case) -> dict[str, np.ndarray]:
    return {k: v for k, v in case.tensors.items()
            if k.startswith(("output.", "grad.", "aux."))}


def _survivors(case) -> tuple[list[str], int]:
    """(mutants that were not rejected, how many were tried), through
    validate_results with only the mutated tensor given."""
    survivors, tried = [], 0
    full = validate_results(case, _expected(case))
    assert full.verdict in ("PASS", "PARTIAL") and not full.failed, full.to_text()
    for key, e in _expected(case).items():
        entry = case.manifest["tensors"][key]
        kind = entry.get("check", "full")
        for what, wrong in mutants(e, entry["rtol"], entry["atol"], kind).items():
            tried += 1
            report = validate_results(case, {key: wrong.astype(e.dtype)})
            row = next(r for r in report.rows if r.name == key)
            if row.status != "FAIL" or report.ok:
                survivors.append(f"{key} {what}: {row.status}")
    return survivors, tried


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_mutant_of_a_committed_case_fails(case_dir: Path) -> None:
    case = read_case(case_dir)
    survivors, tried = _survivors(case)
    assert tried and not survivors, survivors
    # and the committed set is fully checkable: every case PASSes in full
    report = validate_results(case, _expected(case), require="all")
    assert report.verdict == "PASS" and report.ok, report.to_text()


def test_the_committed_set_has_no_weak_tolerance() -> None:
    weak = [f"{c.parent.name}/{c.name} {w}" for c in CASES
            for w in case_weaknesses(read_case(c).manifest, read_case(c).tensors)]
    assert CASES and not weak, weak
    unchecked = [(c, k) for c in CASES
                 for k, e in read_case(c).manifest["tensors"].items()
                 if e.get("check") == "none"]
    assert unchecked == []  # docs/format.md: "none in the committed set"


def test_fresh_cases_of_every_block_and_preset_reject_every_mutant(tmp_path) -> None:
    total = 0
    for req, cfg in all_requests():
        gen = generate_case(req, cfg)
        path = write_case(tmp_path, gen.block, gen.case_id, gen.tensors, gen.manifest,
                          tolerances=gen.tolerances, accumulation=gen.accumulation,
                          checks=gen.checks)
        survivors, tried = _survivors(read_case(path))
        assert not survivors, (gen.block, gen.case_id, survivors)
        total += tried
    assert total > 1500


# ---------------------------------------------------------------------------
# the checker itself rejects weak tolerances


def test_tolerance_weaknesses_catch_planted_weak_tolerances() -> None:
    e = np.random.default_rng(0).standard_normal((4, 5))
    top = float(np.abs(e).max())
    assert tolerance_weaknesses("t", e, 1e-10, 1e-10 * top, "float64") == []
    assert tolerance_weaknesses("t", e, 1e-3, 1e-3 * top, "float32") == []
    # the cap alone: rtol 1e-8 in float64, 1e-2 in float32
    capped = tolerance_weaknesses("t", e, MAX_RTOL["float64"], 0.0, "float64")
    assert [w.what for w in capped] == ["rtol"]
    assert [w.what for w in tolerance_weaknesses("t", e, 2e-2, 0.0, "float32")] == ["rtol"]
    # an atol on the tensor's own scale lets the zeroed and negated through
    what = {w.what for w in tolerance_weaknesses("t", e, 1e-10, 2 * top, "float64")}
    assert what == {"zeroed", "negated", "scaled", "one off"}
    # an atol of a third of the tensor's scale rejects the zeroed, negated and
    # one-off results, but not the scaled one
    what = {w.what for w in tolerance_weaknesses("t", e, 1e-10, top / 3, "float64")}
    assert what == {"scaled"}
    # the old CGNL widening: rtol 358, atol 410
    old = {w.what for w in tolerance_weaknesses("t", e, 358.0, 410.0, "float32")}
    assert old == {"rtol", "zeroed", "negated", "one off"}
    # "zero": only the one-off mutant applies (one element at 1 % of the
    # family scale atol / rtol), and it must be rejected
    z = 1e-16 * e
    assert tolerance_weaknesses("t", z, 1e-11, 1e-11 * 5.0, "float64", "zero") == []
    assert [w.what for w in tolerance_weaknesses("t", z, 5e-3, 5e-3 * 5.0, "float32",
                                                 "zero")] == []
    assert [w.what for w in tolerance_weaknesses("t", z, 1e-11, np.inf, "float64",
                                                 "zero")] == ["one off"]
    assert tolerance_weaknesses("t", e, 1.0, 1e9, "float64", "none") == []
    with pytest.raises(ValueError, match="kind: expected one of full, zero, none"):
        tolerance_weaknesses("t", e, 1e-10, 1e-10, "float64", "partial")


def test_mutants_are_wrong_by_more_than_the_band() -> None:
    e = np.array([[0.5, -3.0], [2.0, 0.0]])
    m = mutants(e, 1e-3, 1e-3 * 3.0)
    assert set(m) == {"zeroed", "negated", "scaled", "one off"}
    np.testing.assert_array_equal(m["negated"], -e)
    np.testing.assert_array_equal(m["scaled"], e * 1.01)
    moved = np.argwhere(m["one off"] != e)
    assert moved.tolist() == [[0, 1]]  # the largest |e|, where the band is widest
    assert m["one off"][0, 1] == 3.0  # its sign flipped
    zero = mutants(1e-17 * e, 1e-3, 1e-3 * 7.0, "zero")
    assert set(zero) == {"one off"} and zero["one off"][0, 1] == pytest.approx(7e-2)
    assert mutants(e, 1e-3, 1e-3, "none") == {} and mutants(e[:0], 1e-3, 0.0) == {}


@pytest.fixture(scope="module")
def cgnl_case(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("g")
    assert run("golden", "--block", "cgnl", "--dtype", "float32", "--out",
               root).exit_code == 0
    return root / "cgnl" / "yue-float32"


def _rewritten(case_dir: Path, root: Path, **tolerances) -> Path:
    """The case written again with some tolerances replaced."""
    case = read_case(case_dir)
    tol = {k: (e["rtol"], e["atol"]) for k, e in case.manifest["tensors"].items()}
    tol |= tolerances
    manifest = {k: v for k, v in case.manifest.items()
                if k not in ("schema", "tensors", "digest", "formats")}
    return write_case(root, case.block, case.case_id, case.tensors, manifest,
                      tolerances=tol)


def test_a_vacuous_stored_tolerance_is_not_checked_never_pass(cgnl_case, tmp_path) -> None:
    """The failure the no-false-PASS issue measured: cgnl/yue-float32 with
    the old widened tolerance of grad.param.p.weight (rtol 358, atol 410)
    passed a zeroed gradient.  A fixture that still carries such a tolerance
    (an old or hand-made one) gets a NOT CHECKED row saying why."""
    weak = _rewritten(cgnl_case, tmp_path, **{"grad.param.p.weight": (358.0, 410.0)})
    case = read_case(weak)
    results = _expected(case) | {
        "grad.param.p.weight": np.zeros_like(case.tensors["grad.param.p.weight"])}
    report = validate_results(case, results)
    row = next(r for r in report.rows if r.name == "grad.param.p.weight")
    assert row.status == "NOT CHECKED"
    assert "tolerance cannot reject a wrong result" in row.reason
    assert report.verdict == "PARTIAL" and not validate_results(
        case, results, require="all").ok
    np.savez(tmp_path / "r.npz", **results)
    result = run("validate", weak, "--results", tmp_path / "r.npz")
    assert "PASS" not in result.stdout.splitlines()[0]
    assert "grad.param.p.weight" in result.stdout and "cannot reject" in result.stdout


def test_not_checkable_tensors_are_reported_with_their_reason(tmp_path) -> None:
    """One channel per z group under train-mode BN: grad.param.z.weight is an
    eps-remainder; the fixture marks it, golden warns, validate says why."""
    result = run("golden", "--block", "cgnl", "--set", "norm=bn_train", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "grad.param.z.weight" in result.stderr
    assert "NOT CHECKABLE" in result.stderr
    (case_dir,) = find_cases(tmp_path)
    entry = json.loads((case_dir / "manifest.json").read_text())["tensors"][
        "grad.param.z.weight"]
    assert entry["check"] == "none" and "ill-conditioned in float64" in entry["check_reason"]
    case = read_case(case_dir)
    report = validate_results(case, _expected(case))
    row = next(r for r in report.rows if r.name == "grad.param.z.weight")
    assert row.status == "NOT CHECKED" and row.reason.startswith("not checkable: ")
    assert report.verdict == "PARTIAL" and report.ok and not report.complete
    np.savez(tmp_path / "r.npz", **_expected(case))
    text = run("validate", case_dir, "--results", tmp_path / "r.npz")
    assert text.exit_code == 0 and "PARTIAL" in text.stdout.splitlines()[0]
    strict = run("validate", case_dir, "--results", tmp_path / "r.npz", "--require", "all")
    assert strict.exit_code == 1 and "a failure under --require all" in strict.stdout
    with pytest.raises(AssertionError, match="NOT CHECKED"):
        assert_matches_golden(case_dir, _expected(case), require="all")
    assert assert_matches_golden(case_dir, _expected(case)).verdict == "PARTIAL"


def test_require_all_fails_a_partial_check(cgnl_case, tmp_path) -> None:
    case = read_case(cgnl_case)
    only_out = {"output.out": case.tensors["output.out"]}
    np.savez(tmp_path / "out.npz", **only_out)
    lax = run("validate", cgnl_case, "--results", tmp_path / "out.npz", "--json")
    assert lax.exit_code == 0
    data = json.loads(lax.stdout)
    assert data["verdict"] == "PARTIAL" and data["complete"] is False
    assert data["require"] == "provided" and data["checked"] == 1
    strict = run("validate", cgnl_case, "--results", tmp_path / "out.npz", "--require",
                 "all", "--json")
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["ok"] is False
    np.savez(tmp_path / "all.npz", **_expected(case))
    full = run("validate", cgnl_case, "--results", tmp_path / "all.npz", "--require", "all")
    assert full.exit_code == 0 and full.stdout.splitlines()[0].endswith(": PASS")
    with pytest.raises(AssertionError, match="PARTIAL"):
        assert_matches_golden(cgnl_case, only_out, require="all")
    assert assert_matches_golden(cgnl_case, _expected(case), require="all").ok
    bad = run("validate", cgnl_case, "--results", tmp_path / "all.npz", "--require", "most")
    assert bad.exit_code == 2 and "--require" in bad.stderr


def test_abs_only_rows_are_labelled() -> None:
    case = read_case(GOLDEN / "non_local" / "facebook-train-float64")
    report = validate_results(case, _expected(case))
    labels = {r.name: r.strength for r in report.rows}
    assert labels["grad.param.W.bias"] == "abs only (exact 0)"
    assert labels["output.out"] == "rel+abs"
    line = next(ln for ln in report.to_text().splitlines()
                if ln.lstrip().startswith("grad.param.W.bias "))
    assert line.rstrip().endswith("abs only (exact 0)")
    assert json.loads(report.to_json())["rows"][-1]["strength"] in (
        "rel+abs", "abs only (exact 0)", "abs only (tiny)")


# ---------------------------------------------------------------------------
# results are real floats


WRONG_DTYPES = {
    "complex": lambda e: e + 1e6j,
    "string": lambda e: e.astype(str),
    "bytes": lambda e: e.astype("S32"),
    "int": lambda e: np.round(e).astype(np.int64),
    "bool": lambda e: e > 0,
    "structured": lambda e: np.zeros(e.shape, dtype=[("a", "f8"), ("b", "f8")]),
}


@pytest.mark.parametrize("kind", list(WRONG_DTYPES))
def test_results_that_are_not_real_floats_are_refused(cgnl_case, tmp_path, kind) -> None:
    case = read_case(cgnl_case)
    results = _expected(case)
    results["grad.input.x"] = WRONG_DTYPES[kind](results["grad.input.x"])
    with pytest.raises(ValidationInputError, match=r"results: grad\.input\.x has dtype"):
        validate_results(case, results)
    with pytest.raises(ValidationInputError, match="expected a real floating-point"):
        assert_matches_golden(cgnl_case, results)
    np.savez(tmp_path / "r.npz", **results)
    result = run("validate", cgnl_case, "--results", tmp_path / "r.npz")
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert str(tmp_path / "r.npz") in line and "grad.input.x" in line


def test_object_results_are_refused(cgnl_case) -> None:
    case = read_case(cgnl_case)
    results = _expected(case)
    results["output.out"] = np.array([object()] * 2, dtype=object)
    with pytest.raises(ValidationInputError, match="output.out has dtype object"):
        validate_results(case, results)
    results["output.out"] = case.tensors["output.out"].astype(np.float16)  # real: fine
    assert validate_results(case, results).rows[0].status in ("PASS", "FAIL")


TORCH_MODULE = """
import torch

class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(6, 4, 1, 1, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.weight, self.bias)
        return {cast}

def make(cfg):
    return Conv()
"""


@pytest.mark.parametrize("cast, dtype", [("y", None),
                                         ("y.to(torch.complex128) + 1e6j", "complex128"),
                                         ("y.long()", "int64")])
def test_torch_outputs_that_are_not_real_floats_are_refused(tmp_path, monkeypatch, cast,
                                                            dtype) -> None:
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"conv_{dtype or 'real'}"
    (tmp_path / f"{name}.py").write_text(TORCH_MODULE.format(cast=cast))
    result = run("validate", GOLDEN / "conv1x1" / "default-float64", "--torch",
                 f"{name}:make")
    if dtype is None:  # the real module runs to a verdict
        assert result.exit_code == 0 and "PASS" in result.stdout.splitlines()[0]
        return
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert f"output.out: the module's output has dtype torch.{dtype}" in line


def test_golden_refuses_a_case_whose_tolerance_would_be_vacuous(monkeypatch,
                                                                tmp_path) -> None:
    """The generator's last guard: a tolerance rule that would let a zeroed
    tensor pass (here an absolute band five times each tensor's scale) makes
    `refattn golden` refuse the case with one line, and write nothing."""
    import refattn.golden.generate as generate

    monkeypatch.setattr(generate, "tolerance_for", lambda dtype, k: (1e-12, 5.0))
    result = run("golden", "--block", "gap", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "refusing a case whose tolerance cannot reject a wrong result" in line
    assert "zeroed" in line
    assert not list(tmp_path.rglob("manifest.json"))
