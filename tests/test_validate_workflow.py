"""The validator's workflow: name maps with prefix rules, the anchor map on
one gate of an anchor, name-mismatch hints, intermediates (``aux.*``)
through hooks or a returned dict, a backward that raises, and the diagnosis
of a FAIL (the first failing tensor, the gate-level cases, signatures).

The module-level factories are imported by ``refattn validate --torch
test_validate_workflow:...`` (tests/ is on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from refattn.adapters.common import apply_name_rules
from refattn.blocks.registry import BLOCKS
from refattn.cli import main
from refattn.testing import validate_case
from refattn.validate import (
    GATE_CASES,
    SIGNATURES,
    ValidationInputError,
    compare_tensor,
    distinct,
    signature,
)

needs_torch = pytest.mark.usefixtures("torch")

JONGCHAN_MAP = {"mlp.fc1.": "ChannelGate.mlp.1.", "mlp.fc2.": "ChannelGate.mlp.3.",
                "spatial.": "SpatialGate.spatial."}
"""One map for Jongchan's CBAM, its channel gate and its spatial gate."""


def inside(prefix: str) -> str:
    """JONGCHAN_MAP for the CBAM held as `prefix` (rules do not chain: the
    longest matching prefix alone renames a name)."""
    return json.dumps({k: prefix + v for k, v in JONGCHAN_MAP.items()})


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, Path]:
    """{(block, preset, mode): case dir} for the CBAM blocks, float64."""
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for block, preset in [("cbam", "jongchan"), ("cbam_channel", "jongchan"),
                          ("cbam_spatial", "jongchan"), ("cbam", "luuuyi"),
                          ("conv1x1", None)]:
        args = ["golden", "--block", block, "--out", root, "--json"]
        if preset:
            args += ["--preset", preset]
        result = run(*args)
        assert result.exit_code == 0, result.output
        for row in json.loads(result.stdout):
            manifest = json.loads((Path(row["path"]) / "manifest.json").read_text())
            out[(block, preset, manifest["mode"])] = Path(row["path"])
    return out


def validate_json(case: Path, *args: Any, want: int) -> dict[str, Any]:
    result = run("validate", case, *args, "--json")
    assert result.exit_code == want, result.output
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------
# factories: the official gate classes themselves, and wrapped anchors


def make_jongchan_channel_gate(config: dict[str, Any]) -> Any:
    """Jongchan's ChannelGate class on its own (names ``mlp.1.weight``...)."""
    from anchors import cbam

    gate = cbam.ChannelGate(cbam._channels(config), config["reduction"],
                            tuple(config["pool_types"]))
    return cbam._finish(gate, config)


def make_jongchan_spatial_gate(config: dict[str, Any]) -> Any:
    """Jongchan's SpatialGate class on its own (names ``spatial.conv.weight``...)."""
    from anchors import cbam

    return cbam._finish(cbam._jongchan_spatial_gate(config), config)


def _with_gates(module: Any) -> Any:
    """`module` (Jongchan structure) returning ``(out, {gates})``."""
    import torch

    class WithGates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> Any:
            out = self.inner(x)
            return out, {"channel_gate": self.inner.ChannelGate.last_gate,
                         "aux.spatial_gate": self.inner.SpatialGate.last_gate}

    return WithGates().double().train(module.training)


def make_jongchan_with_gates(config: dict[str, Any]) -> Any:
    from anchors import cbam

    return _with_gates(cbam.make_jongchan(config))


def make_no_spatial_sigmoid_with_gates(config: dict[str, Any]) -> Any:
    from anchors import cbam

    return _with_gates(cbam.make_jongchan_no_spatial_sigmoid(config))


def make_backward_raises(config: dict[str, Any]) -> Any:
    """Jongchan's CBAM whose output's backward raises (its forward is right)."""
    import torch
    from anchors import cbam

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("one of the variables needed for gradient computation "
                               "has been modified by an inplace operation")

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = cbam.make_jongchan(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Fails.apply(self.inner(x))

    return Wrapped().double()


def make_negated_backward_raises(config: dict[str, Any]) -> Any:
    """A wrong forward (negated) and a backward that raises."""
    import torch

    inner = make_backward_raises(config)

    class Negated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -self.inner(x)

    return Negated()


# ---------------------------------------------------------------------------
# 1. name maps


def test_name_rules_exact_beats_prefix_and_longest_prefix_wins() -> None:
    rules = {"mlp.": "A.", "mlp.fc1.": "B.", "mlp.fc1.weight": "C", "": "top."}
    assert apply_name_rules(rules, "mlp.fc1.weight") == "C"
    assert apply_name_rules(rules, "mlp.fc1.bias") == "B.bias"
    assert apply_name_rules(rules, "mlp.fc2.bias") == "A.fc2.bias"
    assert apply_name_rules(rules, "spatial.conv.weight") == "top.spatial.conv.weight"
    assert apply_name_rules({"mlp.": "x."}, "mlpx.weight") == "mlpx.weight"
    assert apply_name_rules({}, "w") == "w"


@needs_torch
@pytest.mark.parametrize("inline", [False, True], ids=["file", "inline"])
def test_one_prefix_map_serves_cbam_and_both_gates(cases: dict, tmp_path: Path,
                                                   inline: bool) -> None:
    path = tmp_path / "jongchan.json"
    path.write_text(json.dumps(JONGCHAN_MAP))
    names = json.dumps(JONGCHAN_MAP) if inline else path
    runs = [("cbam", "anchors.cbam:make_jongchan"),
            ("cbam_channel", "anchors.cbam:make_jongchan_channel"),
            ("cbam_spatial", "anchors.cbam:make_jongchan_spatial")]
    seen = 0
    for (block, preset, mode), case in cases.items():
        for wanted, factory in runs:
            if block != wanted or preset != "jongchan":
                continue
            report = validate_json(case, "--torch", factory, "--names", names, want=0)
            assert report["failed"] == [] and report["checked"] > 1
            assert not [k for k in report["not_checked"] if k.startswith("grad.")]
            seen += 1
    assert seen == 5  # cbam and cbam_spatial train and eval, cbam_channel


@needs_torch
def test_prefix_map_that_fits_nothing_is_reported(cases: dict) -> None:
    case = cases[("cbam_channel", "jongchan", None)]
    line = one_line_error(run("validate", case, "--torch",
                              "anchors.cbam:make_jongchan_channel",
                              "--names", '{"mpl.": "ChannelGate.mlp."}'))
    assert "no name of this case matches: 'mpl.'" in line
    assert "--names anchor matches this module" in line
    assert one_line_error(run("validate", case, "--torch", "anchors.cbam:make_jongchan",
                              "--names", "{not json")).startswith(
        "Error: --names: cannot read the inline JSON map")
    assert "a JSON object of strings" in one_line_error(run(
        "validate", case, "--torch", "anchors.cbam:make_jongchan", "--names",
        '{"mlp.": 3}'))


@needs_torch
@pytest.mark.parametrize("block,factory", [
    ("cbam_channel", "make_jongchan_channel_gate"),
    ("cbam_spatial", "make_jongchan_spatial_gate"),
])
def test_anchor_map_fits_the_official_gate_class(cases: dict, block: str,
                                                 factory: str) -> None:
    for (b, preset, mode), case in cases.items():
        if b != block:
            continue
        report = validate_json(case, "--torch", f"test_validate_workflow:{factory}",
                               "--names", "anchor", want=0)
        assert report["failed"] == [] and report["verdict"] == "PARTIAL"
        assert set(report["not_checked"]) == {k for k in (r["name"] for r in
                                              report["rows"]) if k.startswith("aux.")}


@needs_torch
def test_name_mismatch_suggests_anchor_and_nearest(cases: dict) -> None:
    case = cases[("cbam", "jongchan", "train")]
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam:make_jongchan"))
    assert "parameter names do not match" in line
    assert "--names anchor matches this module" in line
    assert "nearest names: mlp.fc1.bias ~ ChannelGate.mlp.1.bias" in line
    # a module neither map fits: no suggestion of a map, only the nearest names
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam:make_luuuyi"))
    assert "matches this module" not in line


# ---------------------------------------------------------------------------
# 2. intermediates


@needs_torch
def test_aux_through_forward_hooks(cases: dict) -> None:
    case = cases[("cbam", "luuuyi", None)]
    names = {"mlp.fc1.": "ca.fc.0.", "mlp.fc2.": "ca.fc.2.", "spatial.conv.": "sa.conv1.",
             "aux.channel_gate": "ca", "aux.spatial_gate": "sa",
             "aux.not_in_this_case": "ca"}  # ignored: the case has no such tensor
    report = validate_json(case, "--torch", "anchors.cbam:make_luuuyi", "--names",
                           json.dumps(names), want=0)
    rows = {r["name"]: r["status"] for r in report["rows"]}
    assert rows["aux.channel_gate"] == rows["aux.spatial_gate"] == "PASS"
    assert report["not_checked"] == ["aux.spatial_descriptor"]
    names["aux.spatial_gate"] = "sa.conv"
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam:make_luuuyi",
                              "--names", json.dumps(names)))
    assert "aux.spatial_gate names the submodule 'sa.conv'" in line
    assert "nearest: sa.conv1" in line


@needs_torch
def test_aux_returned_beside_the_output_shows_which_gate_fails(cases: dict) -> None:
    case = cases[("cbam", "jongchan", "train")]
    good = validate_json(case, "--torch", "test_validate_workflow:make_jongchan_with_gates",
                         "--names", inside("inner."), want=0)
    assert good["failed"] == [] and good["diagnosis"] == []
    result = run("validate", case, "--torch",
                 "test_validate_workflow:make_no_spatial_sigmoid_with_gates",
                 "--names", inside("inner."))
    assert result.exit_code == 1, result.output
    text = result.stdout
    assert "aux.channel_gate" in text
    assert next(ln.split()[1] for ln in text.splitlines()
                if ln.strip().startswith("aux.channel_gate ")) == "PASS"
    assert "first failing tensor in data-flow order: aux.spatial_gate" in text
    assert "aux.spatial_gate: missing sigmoid: actual ≈ logit(expected)" in text
    assert "aux.spatial_gate belongs to cbam_spatial" in text
    assert "refattn golden --block cbam_spatial --preset jongchan" in text
    assert "cbam_channel: its intermediates passed" in text


# ---------------------------------------------------------------------------
# 3. a backward that raises


@needs_torch
def test_backward_raises_forward_still_compared(cases: dict) -> None:
    case = cases[("cbam", "jongchan", "train")]
    names = inside("inner.")
    result = run("validate", case, "--torch",
                 "test_validate_workflow:make_backward_raises", "--names", names)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "FAIL" in lines[0]
    rows = {ln.split()[0]: ln for ln in lines if ln.startswith("  ") and "  " in ln}
    assert " PASS " in rows["output.out"]
    assert " PASS " in rows["output.state.spatial.bn.running_mean"]
    assert "not computed: their backward raised" in rows["grad.input.x"]
    error = [i for i, ln in enumerate(lines) if ln.startswith("  error: ")]
    assert len(error) == 1 and error[0] > max(
        i for i, ln in enumerate(lines) if ln.startswith("  output.out"))
    assert "the backward of the module's output raised RuntimeError: one of the" \
           in lines[error[0]]
    report = validate_json(case, "--torch", "test_validate_workflow:make_backward_raises",
                           "--names", names, want=1)
    assert report["verdict"] == "FAIL" and report["failed"] == []
    assert len(report["errors"]) == 1
    # a wrong forward is a FAIL on the output too, with the error
    report = validate_json(
        case, "--torch", "test_validate_workflow:make_negated_backward_raises",
        "--names", inside("inner.inner."), want=1)
    assert report["failed"] == ["output.out"] and len(report["errors"]) == 1
    assert any("output.out: sign flip" in d for d in report["diagnosis"])


@needs_torch
def test_backward_raises_through_the_library(cases: dict) -> None:
    case = cases[("cbam", "jongchan", "eval")]
    report = validate_case(case, make_backward_raises,
                           names=inside("inner."))
    assert not report.ok and report.verdict == "FAIL" and report.errors
    assert "output.out" not in report.failed


# ---------------------------------------------------------------------------
# 4. signatures: each fires on its planted answer and on nothing else


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def _bases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    z = rng.standard_normal((2, 5, 5))
    return {
        "signed": rng.standard_normal((2, 3, 4, 4)),
        "gate": 1.0 / (1.0 + np.exp(-rng.standard_normal((2, 1, 4, 4)))),
        "softmax": _softmax(z, axis=2),
    }


def _planted(e: np.ndarray) -> dict[str, np.ndarray]:
    """Every planted wrong answer for `e` (the ones its domain admits)."""
    out = {
        "all zeros": np.zeros_like(e),
        "sign flip": -e,
        "constant factor": 2.0 * e,
        "transposed": np.swapaxes(e, -1, -2),
    }
    if np.all((e > 0) & (e < 1)):
        out["missing sigmoid"] = np.log(e) - np.log1p(-e)
    out["extra sigmoid"] = 1.0 / (1.0 + np.exp(-e))
    if np.allclose(e.sum(axis=-1), 1.0):
        out["softmax over the wrong axis"] = _softmax(np.log(e), axis=1)
    rng = np.random.default_rng(11)
    out["noise"] = e + 0.3 * rng.standard_normal(e.shape)  # differently wrong
    one_off = e.copy()
    one_off.flat[3] += 1.0
    out["one element"] = one_off  # differently wrong
    return out


PLANTED = [(base, kind) for base, e in _bases().items() for kind in _planted(e)]


@pytest.mark.parametrize("base,kind", PLANTED, ids=[f"{b}-{k}" for b, k in PLANTED])
def test_signature_fires_on_its_planted_answer_only(base: str, kind: str) -> None:
    e = _bases()[base]
    a = _planted(e)[kind]
    row = compare_tensor("t", e, a, 1e-10, 1e-12)
    assert row.status == "FAIL"
    if kind in SIGNATURES:
        assert row.signature is not None and row.signature.startswith(kind), row.signature
    else:
        assert row.signature is None, row.signature


def test_signature_needs_a_real_difference() -> None:
    e = _bases()["signed"]
    assert compare_tensor("t", e, e.copy(), 1e-10, 1e-12).signature is None
    assert signature(e, e[..., :3], 1e-10, 1e-12) is None  # another shape
    # the factor is the one fitted, not a fixed guess
    row = compare_tensor("t", e, 0.125 * e, 1e-10, 1e-12)
    assert row.signature == "constant factor: actual ≈ 0.125 × expected"
    # one number is a multiple of any other: no factor is claimed, a sign flip is
    assert signature(np.array([2.0]), np.array([3.0]), 1e-10, 1e-12) is None
    assert signature(np.array([2.0]), np.array([-2.0]), 1e-10, 1e-12) == (
        "sign flip: actual ≈ -expected")
    # a transpose over axes of different sizes is not a same-shape signature
    rect = np.random.default_rng(3).standard_normal((2, 3, 7, 6))
    assert compare_tensor("t", rect, rect[..., ::-1], 1e-10, 1e-12).signature is None


def test_transposed_results_file_is_named_in_the_shape_error(cases: dict,
                                                             tmp_path: Path) -> None:
    from refattn.golden.format import read_case

    case_dir = cases[("conv1x1", None, None)]
    case = read_case(case_dir)
    out = case.tensors["output.out"]
    results = tmp_path / "r.npz"
    np.savez(results, **{"output.out": np.swapaxes(out, 2, 3)})
    line = one_line_error(run("validate", case_dir, "--results", results))
    assert "the axes permuted to (0, 1, 3, 2): a transposed tensor" in line
    np.savez(results, **{"output.out": np.swapaxes(out, 2, 3) + 1.0})
    assert "a transposed tensor" not in one_line_error(
        run("validate", case_dir, "--results", results))


def test_first_mismatches_show_the_difference() -> None:
    e = np.full((4,), 1.0)
    a = e + 3e-9
    assert distinct(1.0, 1.0 + 3e-9) == ("1", "1.000000003")
    assert distinct(1.0, 2.0) == ("1", "2")
    row = compare_tensor("t", e, a, 1e-12, 1e-14)
    assert row.status == "FAIL"
    from refattn.validate import ValidationReport

    report = ValidationReport("c", "conv1x1", None, "float64", None, "s", [row])
    text = report.to_text()
    assert "(0,): 1 vs 1.000000003" in text
    assert "expected 1, actual 1.000000003" in text


def test_diagnosis_orders_by_data_flow_and_names_gate_cases(cases: dict) -> None:
    from refattn.golden.format import read_case
    from refattn.validate import validate_results

    for gates in GATE_CASES.values():
        assert all(g in BLOCKS for g, _ in gates)
    case = read_case(cases[("cbam", "jongchan", "train")])
    given = {k: v.copy() for k, v in case.tensors.items()
             if k.startswith(("output.", "grad.", "aux."))}
    given["grad.input.x"] = -given["grad.input.x"]
    report = validate_results(case, given)
    assert report.first_failure() == "grad.input.x"
    assert report.diagnosis()[0].endswith("(the forward agrees: every output and "
                                          "intermediate compared passed)")
    given["grad.param.spatial.conv.weight"] = 2 * given["grad.param.spatial.conv.weight"]
    given["output.out"] = given["output.out"] * 1.5
    given["aux.spatial_descriptor"] = given["aux.spatial_descriptor"] * 1.5
    report = validate_results(case, given)
    assert report.first_failure() == "aux.spatial_descriptor"
    lines = report.diagnosis()
    assert "aux.spatial_descriptor belongs to cbam_spatial" in " ".join(lines)
    assert "cbam_channel: its intermediates passed" in lines
    # without intermediates, both gate-level cases are named
    del given["aux.spatial_descriptor"], given["aux.channel_gate"]
    del given["aux.spatial_gate"]
    report = validate_results(case, given)
    assert report.first_failure() == "output.out"
    assert any("the gate-level cases cbam_channel and cbam_spatial" in d
               for d in report.diagnosis())


def test_report_without_failures_has_no_diagnosis(cases: dict) -> None:
    from refattn.golden.format import read_case
    from refattn.validate import validate_results

    case = read_case(cases[("conv1x1", None, None)])
    report = validate_results(case, {"output.out": case.tensors["output.out"]})
    assert report.diagnosis() == [] and "diagnosis" not in report.to_text()
    with pytest.raises(ValidationInputError):
        validate_results(case, {})
