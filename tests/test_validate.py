"""``refattn validate`` end to end: faithful anchors pass, known bugs are caught
on the tensor they must show on, bad input is one line with exit status 2,
results files from plain scripts, the pytest API, and the report itself.

The PyTorch modules are the anchor-structured ones of ``tests/anchors`` (on
``sys.path`` through tests/conftest.py).  Cases are generated once per module
with ``refattn golden`` into a temporary directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from refattn.cli import main
from refattn.validate import (
    ValidationInputError,
    ValidationReport,
    compare_tensor,
    validate_results,
)

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.filterwarnings(  # the seed snippet's implicit softmax dim
    "ignore:Implicit dimension choice for softmax:UserWarning")

needs_torch = pytest.mark.usefixtures("torch")  # skips when torch is absent

DTYPES = ("float64", "float32")


def run(*args: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result: Any) -> str:
    """Exit 2 with one ``Error:`` line on stderr (after click's usage lines for
    a usage error), no traceback; returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(ln.startswith(("Usage: ", "Try ")) for ln in lines[:-1]), result.stderr
    return errors[0]


def validate_json(case: Path, *args: str, want: int) -> dict[str, Any]:
    result = run("validate", case, *args, "--json")
    assert result.exit_code == want, result.output
    return json.loads(result.stdout)


def text_rows(text: str) -> list[tuple[str, str]]:
    """(tensor, status) of each row of a text report's table."""
    rows = re.findall(r"^  (\S+) +(PASS|FAIL|NOT CHECKED) ", text, flags=re.M)
    return [(name, status) for name, status in rows]


class Golden:
    """Cases written with ``refattn golden`` on first use, kept per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple, dict[str | None, Path]] = {}

    def __call__(self, block: str, preset: str | None = None, dtype: str = "float64",
                 *sets: str, shape: str | None = None) -> dict[str | None, Path]:
        """{BN mode or None: case directory} of one golden request."""
        key = (block, preset, dtype, sets, shape)
        if key not in self._made:
            args = ["golden", "--block", block, "--dtype", dtype, "--out", self.root,
                    "--json"]
            if preset:
                args += ["--preset", preset]
            for s in sets:
                args += ["--set", s]
            if shape:
                args += ["--shape", shape]
            result = run(*args)
            assert result.exit_code == 0, result.output
            out = {}
            for row in json.loads(result.stdout):
                path = Path(row["path"])
                mode = json.loads((path / "manifest.json").read_text())["mode"]
                out[mode] = path
            self._made[key] = out
        return self._made[key]

    def one(self, *args: Any, mode: str | None = None, **kwargs: Any) -> Path:
        return self(*args, **kwargs)[mode]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    return Golden(tmp_path_factory.mktemp("golden"))


@pytest.fixture
def user_module(tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write a module of the user's into tmp_path; returns its import name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"user_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def checkable(case: Path) -> set[str]:
    """Every fixture key a torch module's run yields (outputs and gradients)."""
    manifest = json.loads((case / "manifest.json").read_text())
    return {k for k in manifest["tensors"]
            if k.startswith(("output.", "grad.input.", "grad.param."))}


# ---------------------------------------------------------------------------
# 1. every faithful anchor passes its preset, float64 and float32

FAITHFUL = [
    # (block, preset, --set values, MODULE:FACTORY)
    ("conv1x1", None, (), "anchors.simple:make_conv1x1"),
    ("gap", None, (), "anchors.simple:make_gap"),
    ("mlpconv", "nin_cifar_1", (), "anchors.simple:make_mlpconv"),
    ("nin_head", None, (), "anchors.simple:make_nin_head"),
    ("cbam", "jongchan", (), "anchors.cbam:make_jongchan"),
    ("cbam", "luuuyi", (), "anchors.cbam:make_luuuyi"),
    ("cbam", "seed", (), "anchors.cbam:make_seed"),
    ("cbam_channel", "jongchan", (), "anchors.cbam:make_jongchan_channel"),
    ("cbam_spatial", "jongchan", (), "anchors.cbam:make_jongchan_spatial"),
    ("non_local", "alexhex7", (), "anchors.non_local:make_alexhex7"),
    ("non_local", "alexhex7", ("mode=gaussian",), "anchors.non_local:make_alexhex7"),
    ("non_local", "alexhex7", ("mode=dot_product",), "anchors.non_local:make_alexhex7"),
    ("non_local", "alexhex7", ("mode=concatenation",),
     "anchors.non_local:make_alexhex7"),
    ("non_local", "facebook", (), "anchors.non_local:make_facebook"),
    ("non_local", "cgnl_repo", (), "anchors.non_local:make_cgnl_repo"),
    ("cgnl", "yue", (), "anchors.cgnl:make_yue"),
    ("cgnl", "yue_gaussian", (), "anchors.cgnl:make_yue_gaussian"),
    ("cross_layer", "cnl", (), "anchors.cross_layer:make_cnl"),
    ("cross_layer", "cnl_official_noperm", (), "anchors.cross_layer:make_cnl"),
    ("cross_layer", "seed_fixed", (), "anchors.cross_layer:make_seed_fixed"),
]


def _faithful_id(entry: tuple) -> str:
    block, preset, sets, _ = entry
    return "-".join([block, preset or "default", *(s.split("=")[1] for s in sets)])


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entry", FAITHFUL, ids=[_faithful_id(e) for e in FAITHFUL])
def test_faithful_anchor_passes(golden: Golden, entry: tuple, dtype: str) -> None:
    block, preset, sets, factory = entry
    cases = golden(block, preset, dtype, *sets)
    for mode, case in cases.items():  # a BN preset: train and eval
        report = validate_json(case, "--torch", factory, "--names", "anchor", want=0)
        assert report["ok"] is True
        assert report["mode"] == mode and report["dtype"] == dtype
        rows = {r["name"]: r for r in report["rows"]}
        checked = {k for k, r in rows.items() if r["status"] != "NOT CHECKED"}
        # every output, running statistic and gradient was produced and compared
        assert checked == checkable(case)
        assert all(rows[k]["status"] == "PASS" for k in checked)
        assert set(report["not_checked"]) == {k for k in rows if k.startswith("aux.")}


# ---------------------------------------------------------------------------
# 2. each known bug is caught, on the tensor it must show on


class Bug:
    """A planted bug, the case it runs against, and what the report must say."""

    def __init__(self, id: str, factory: str, block: str, preset: str | None,
                 sets: tuple[str, ...] = (), *, mode: str | None = None,
                 dtype: str = "float64", fails: set[str],
                 passes: set[str] = frozenset(), only: bool = False,
                 shape: str | None = None) -> None:
        self.id, self.factory, self.block, self.preset = id, factory, block, preset
        self.sets, self.mode, self.dtype, self.shape = sets, mode, dtype, shape
        self.fails, self.passes, self.only = set(fails), set(passes), only

    def case(self, golden: Golden) -> Path:
        return golden.one(self.block, self.preset, self.dtype, *self.sets,
                          mode=self.mode, shape=self.shape)


_CBAM_MLP_GRADS = {f"grad.param.mlp.{fc}.{w}" for fc in ("fc1", "fc2")
                   for w in ("weight", "bias")}
_NL_GRADS_AFTER_Y = {"grad.param.W.bias", "grad.param.W_bn.bias"}

BUGS = [
    # CBAM, Jongchan's structure and names
    Bug("cbam-spatial-pool-order-swapped",
        "anchors.cbam:make_jongchan_swapped_pool_order", "cbam", "jongchan",
        mode="train",
        fails={"output.out", "output.state.spatial.bn.running_mean",
               "grad.param.spatial.conv.weight", "grad.input.x"}),
    Bug("cbam-spatial-pool-order-swapped-f32",
        "anchors.cbam:make_jongchan_swapped_pool_order", "cbam", "jongchan",
        mode="eval", dtype="float32",
        fails={"output.out", "grad.param.spatial.conv.weight"}),
    Bug("cbam-mlp-on-summed-descriptors",
        "anchors.cbam:make_jongchan_summed_descriptors", "cbam", "jongchan",
        mode="eval",
        fails={"output.out", "grad.param.mlp.fc2.bias", "grad.input.x"}),
    # only the shared MLP's parameter gradients see the separate MLPs
    Bug("cbam-separate-mlps", "anchors.cbam:make_jongchan_separate_mlps", "cbam",
        "jongchan", mode="train", fails=_CBAM_MLP_GRADS, only=True,
        passes={"output.out", "output.state.spatial.bn.running_mean",
                "output.state.spatial.bn.running_var", "grad.input.x",
                "grad.param.spatial.conv.weight", "grad.param.spatial.bn.weight",
                "grad.param.spatial.bn.bias"}),
    Bug("cbam-separate-mlps-f32", "anchors.cbam:make_jongchan_separate_mlps", "cbam",
        "jongchan", mode="eval", dtype="float32", fails=_CBAM_MLP_GRADS, only=True,
        passes={"output.out", "grad.input.x"}),
    # the BN before the missing sigmoid sees the right input: its statistics agree
    Bug("cbam-no-spatial-sigmoid", "anchors.cbam:make_jongchan_no_spatial_sigmoid",
        "cbam", "jongchan", mode="train",
        fails={"output.out", "grad.param.spatial.bn.weight", "grad.input.x"},
        passes={"output.state.spatial.bn.running_mean",
                "output.state.spatial.bn.running_var"}),
    # non-local, AlexHex7's structure and names; W's bias and BN's beta come after
    # the attention, and softmax over the keys makes phi's bias gradient zero
    Bug("non-local-softmax-over-queries",
        "anchors.non_local:make_alexhex7_softmax_over_queries", "non_local",
        "alexhex7", mode="eval",
        fails={"output.out", "grad.input.x", "grad.param.theta.weight",
               "grad.param.phi.bias"},
        passes=_NL_GRADS_AFTER_Y),
    Bug("non-local-missing-transpose", "anchors.non_local:make_alexhex7_no_transpose",
        "non_local", "alexhex7", mode="eval",
        fails={"output.out", "grad.input.x", "grad.param.g.weight"},
        passes=_NL_GRADS_AFTER_Y | {"grad.param.phi.bias"}),
    Bug("non-local-dot-product-by-query-count",
        "anchors.non_local:make_alexhex7_divide_by_query_count", "non_local",
        "alexhex7", ("mode=dot_product",), mode="eval",
        fails={"output.out", "grad.input.x", "grad.param.phi.weight"},
        passes=_NL_GRADS_AFTER_Y),
    # with a train-mode BN the batch statistics cancel the factor up to eps
    Bug("non-local-dot-product-by-query-count-train",
        "anchors.non_local:make_alexhex7_divide_by_query_count", "non_local",
        "alexhex7", ("mode=dot_product",), mode="train",
        fails={"output.out", "output.state.W_bn.running_var"},
        passes=_NL_GRADS_AFTER_Y),
    Bug("non-local-view-with-c", "anchors.non_local:make_alexhex7_view_with_c",
        "non_local", "alexhex7", mode="eval", shape="x=2,8,4,4",
        fails={"output.out", "grad.input.x"}, passes=_NL_GRADS_AFTER_Y),
    # cross-layer: the official view without the transpose, against preset cnl
    Bug("cnl-missing-transpose", "anchors.cross_layer:make_cnl_missing_transpose",
        "cross_layer", "cnl", mode="train",
        fails={"output.out", "output.state.kv0.bn.running_mean", "grad.input.x_q",
               "grad.input.x_kv.1", "grad.param.theta.weight"},
        passes={"grad.param.kv0.bn.bias", "grad.param.kv1.bn.bias"}),
    Bug("cnl-softmax-over-queries", "anchors.cross_layer:make_cnl_softmax_over_queries",
        "cross_layer", "cnl", mode="eval",
        fails={"output.out", "grad.input.x_kv.0", "grad.param.kv1.phi.weight"},
        passes={"grad.param.kv0.bn.bias", "grad.param.kv1.bn.bias"}),
    Bug("seed-snippet-crashes-fixed",
        "anchors.cross_layer:make_seed_snippet_crashes_fixed", "cross_layer",
        "seed_fixed",
        fails={"output.out", "grad.input.x_q", "grad.input.x_kv",
               "grad.param.theta.weight", "grad.param.kv0.g.bias"}),
    # CGNL: alpha in float32 inside a float64 model.  Each α_q carries a
    # relative error of ~3e-8; in the fixture draws (2γθφ ~ 1, so every Taylor
    # term counts) that shows in the output and every gradient behind the GN
    Bug("cgnl-alpha-float32", "anchors.cgnl:make_yue_gaussian_alpha_float32", "cgnl",
        "yue_gaussian", fails={"output.out", "grad.input.x", "grad.param.t.weight",
                               "grad.param.p.weight", "grad.param.g.weight",
                               "grad.param.z.weight", "grad.param.gn.weight"},
        only=True, passes={"grad.param.gn.bias"}),
    Bug("cgnl-alpha-float32-gamma0.1", "anchors.cgnl:make_yue_gaussian_alpha_float32",
        "cgnl", "yue_gaussian", ("gamma=0.1", "order=3"),
        fails={"output.out", "grad.input.x", "grad.param.t.weight",
               "grad.param.z.weight"},
        passes={"grad.param.gn.bias"}),
    Bug("cgnl-scale-all-planes", "anchors.cgnl:make_yue_scale_all_planes", "cgnl",
        "yue", ("use_scale=true",),
        fails={"output.out", "grad.param.p.weight", "grad.param.g.weight"},
        passes={"grad.param.gn.bias"}),
    Bug("nin-head-no-last-relu", "anchors.simple:make_nin_head_no_last_relu",
        "nin_head", None,
        fails={"output.out", "grad.param.convs.2.bias", "grad.input.x"}),
]


@needs_torch
@pytest.mark.parametrize("bug", BUGS, ids=[b.id for b in BUGS])
def test_known_bug_is_caught(golden: Golden, bug: Bug) -> None:
    case = bug.case(golden)
    result = run("validate", case, "--torch", bug.factory, "--names", "anchor")
    assert result.exit_code == 1, result.output
    first = result.stdout.splitlines()[0]
    assert first.endswith(("FAIL", "not checked)")) and ": FAIL" in first
    for name in sorted(bug.fails):  # each named failure has its worst-element line
        assert f"  {name}: worst at index (" in result.stdout, name

    report = validate_json(case, "--torch", bug.factory, "--names", "anchor", want=1)
    status = {r["name"]: r["status"] for r in report["rows"]}
    assert text_rows(result.stdout) == [(r["name"], r["status"]) for r in report["rows"]]
    failed = {k for k, s in status.items() if s == "FAIL"}
    passed = {k for k, s in status.items() if s == "PASS"}
    assert bug.fails <= failed, sorted(failed)
    assert bug.passes <= passed, sorted(failed)
    if bug.only:
        assert failed == bug.fails
    assert set(report["failed"]) == failed


@needs_torch
def test_cgnl_alpha_float32_is_invisible_at_float32(golden: Golden) -> None:
    # a float32 alpha is exact enough for a float32 model: only the float64 case
    # can tell the anchor's float32 gamma from the faithful port
    case = golden.one("cgnl", "yue_gaussian", "float32")
    report = validate_json(case, "--torch",
                           "anchors.cgnl:make_yue_gaussian_alpha_float32", "--names",
                           "anchor", want=0)
    assert report["failed"] == []


@needs_torch
def test_gap_avgpool7_is_global_only_on_7x7_maps(golden: Golden) -> None:
    factory = "anchors.simple:make_gap_avgpool7"
    seven = golden.one("gap", None, "float64", shape="x=2,3,7,7")
    result = run("validate", seven, "--torch", factory, "--names", "anchor")
    assert result.exit_code == 0, result.output
    # on the fixture's 5x7 map the module cannot even run: bad input, one line
    line = one_line_error(run("validate", golden.one("gap"), "--torch", factory))
    assert "the module's forward raised RuntimeError" in line


@needs_torch
def test_seed_snippet_as_given_crashes_in_its_forward(golden: Golden) -> None:
    case = golden.one("cross_layer", "seed_fixed")
    line = one_line_error(run("validate", case, "--torch",
                              "anchors.cross_layer:make_seed_snippet", "--names",
                              "anchor"))
    assert "forward raised AttributeError" in line and "softmax" in line


@needs_torch
@pytest.mark.parametrize("block, preset, factory, passes", [
    ("cbam", "jongchan", "make_jongchan", set()),
    # in train mode the BN cancels W's bias (zero gradient); in eval mode it does not
    ("non_local", "alexhex7", "make_alexhex7",
     {"grad.param.W_bn.bias", "grad.param.phi.bias"}),
])
def test_bn_left_in_train_mode_fails_the_eval_case(
        golden: Golden, user_module: Callable[[str], str], block: str, preset: str,
        factory: str, passes: set[str]) -> None:
    # a faithful module whose .eval() is a no-op: its BN keeps using batch statistics
    name = user_module(f"""
        import torch
        from anchors.{block} import {factory}

        def make(config):
            module = {factory}(config)
            module.train = lambda mode=True: torch.nn.Module.train(module, True)
            return module
    """)
    case = golden.one(block, preset, mode="eval")
    report = validate_json(case, "--torch", f"{name}:make", "--names", "anchor", want=1)
    status = {r["name"]: r["status"] for r in report["rows"]}
    assert status["output.out"] == "FAIL" and status["grad.input.x"] == "FAIL"
    assert {k for k, s in status.items() if s == "PASS"} == passes
    # the same module in the train case is right
    train = golden.one(block, preset, mode="train")
    validate_json(train, "--torch", f"{name}:make", "--names", "anchor", want=0)


# ---------------------------------------------------------------------------
# 3. bad input: exit 2 with one line (and a partial results file)


def _results(case: Path) -> dict[str, np.ndarray]:
    """The fixture's own expected tensors: a perfect results set."""
    from safetensors.numpy import load_file

    t = load_file(str(case / "tensors.safetensors"))
    return {k: v for k, v in t.items() if k.startswith(("output.", "grad.", "aux."))}


def test_partial_results_pass_with_the_rest_listed_not_checked(
        golden: Golden, tmp_path: Path) -> None:
    # decision: what is given is compared; what is missing is NOT CHECKED, shown
    # in the verdict line and in its own list, never counted as passed: the
    # verdict is PARTIAL, not PASS, in the text and the JSON (exit 0 unless
    # --require all, test_require_all_fails_a_partial_check)
    case = golden.one("cbam", "jongchan", mode="train")
    given = {k: v for k, v in _results(case).items()
             if k in ("output.out", "grad.input.x")}
    np.savez(tmp_path / "partial.npz", **given)
    result = run("validate", case, "--results", tmp_path / "partial.npz")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    n_all = len(_results(case))
    n_missing = n_all - 2
    assert first.endswith(
        f"PARTIAL: only 2 of {n_all} tensors checked (all passed), {n_missing} NOT "
        "CHECKED; --require all makes this a failure")
    assert "PASS" not in first
    assert "grad.param.mlp.fc1.weight" in result.stdout
    assert f"not checked ({n_missing}):" in result.stdout
    report = validate_json(case, "--results", tmp_path / "partial.npz", want=0)
    assert "grad.param.spatial.conv.weight" in report["not_checked"]
    assert report["verdict"] == "PARTIAL" and report["complete"] is False
    assert (report["checked"], report["total"]) == (2, n_all)
    # a wrong tensor among the given ones still fails
    given["grad.input.x"] = given["grad.input.x"] * 1.001
    np.savez(tmp_path / "partial_bad.npz", **given)
    report = validate_json(case, "--results", tmp_path / "partial_bad.npz", want=1)
    assert report["failed"] == ["grad.input.x"]


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r | {"output.extra": r["output.out"]},
     "keys not in the fixture: output.extra"),
    (lambda r: r | {"grad.input.x": r["grad.input.x"][:1]},
     "grad.input.x has shape (1, 32, 7, 6), the fixture's is (2, 32, 7, 6)"),
    (lambda r: {"input.x": r["output.out"]},
     "provides none of the fixture's checkable tensors"),
    (lambda r: {}, "provides none of the fixture's checkable tensors (gave nothing)"),
])
def test_bad_results_file(golden: Golden, tmp_path: Path, edit: Callable,
                          needle: str) -> None:
    case = golden.one("cbam", "jongchan", mode="eval")
    np.savez(tmp_path / "r.npz", **edit(_results(case)))
    line = one_line_error(run("validate", case, "--results", tmp_path / "r.npz"))
    assert needle in line


def test_unreadable_results_files(golden: Golden, tmp_path: Path) -> None:
    case = golden.one("gap")
    (tmp_path / "r.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert "not a readable safetensors file" in one_line_error(
        run("validate", case, "--results", tmp_path / "r.safetensors"))
    (tmp_path / "r.pt").write_bytes(b"")
    assert "expected a .safetensors or .npz file" in one_line_error(
        run("validate", case, "--results", tmp_path / "r.pt"))
    assert "no such file" in one_line_error(
        run("validate", case, "--results", tmp_path / "missing.npz"))
    # an object array would need pickle: refused, never loaded
    np.savez(tmp_path / "obj.npz", **{"output.out": np.array([object()])})
    assert "cannot read npz safely" in one_line_error(
        run("validate", case, "--results", tmp_path / "obj.npz"))


@needs_torch
def test_unmatched_parameter_names(golden: Golden, user_module: Callable) -> None:
    case = golden.one("conv1x1")
    name = user_module("""
        import torch

        def lacks_bias(config):
            return torch.nn.Conv2d(config["in_channels"], config["out_channels"], 1,
                                   bias=False)

        def has_extra(config):
            conv = torch.nn.Conv2d(config["in_channels"], config["out_channels"], 1)
            conv.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
            return conv
    """)
    line = one_line_error(run("validate", case, "--torch", f"{name}:lacks_bias"))
    assert "fixture (mapped) has [bias] the module lacks" in line
    assert "the module has [-] the fixture lacks" in line
    line = one_line_error(run("validate", case, "--torch", f"{name}:has_extra"))
    assert "has [-] the module lacks" in line
    assert "has [scale] the fixture lacks" in line


@needs_torch
def test_bad_factories(golden: Golden, user_module: Callable) -> None:
    case = golden.one("cbam", "jongchan", mode="eval")
    # the factory raises: luuuyi's anchor has no switch for the MLP bias
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam:make_luuuyi"))
    assert line.startswith("Error: the factory raised ValueError: config: the luuuyi")
    assert "mlp_bias" in line
    line = one_line_error(run("validate", case, "--torch", "no_such_pkg.cbam:make"))
    assert "cannot import 'no_such_pkg.cbam'" in line
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam:make_nothing"))
    assert "anchors.cbam has no callable 'make_nothing'" in line
    line = one_line_error(run("validate", case, "--torch", "anchors.cbam"))
    assert "expected MODULE:FACTORY" in line
    broken = user_module("import torch\nraise RuntimeError('broken at import')\n")
    line = one_line_error(run("validate", case, "--torch", f"{broken}:make"))
    assert f"cannot import '{broken}': RuntimeError: broken at import" in line
    odd = user_module("""
        import torch

        def not_a_module(config):
            return lambda x: x

        def wrong_shape(config):
            return torch.nn.Identity()
    """)
    line = one_line_error(run("validate", case, "--torch", f"{odd}:not_a_module"))
    assert "expected a torch.nn.Module" in line
    gap = golden.one("gap")
    line = one_line_error(run("validate", gap, "--torch", f"{odd}:wrong_shape"))
    assert "output has shape (2, 3, 5, 7), the fixture's output.out is (2, 3)" in line


@needs_torch
def test_names_map_json(golden: Golden, user_module: Callable, tmp_path: Path) -> None:
    case = golden.one("conv1x1", None, "float32")
    name = user_module("""
        import torch

        def make(config):  # the user's own structure: the conv is entry 0
            return torch.nn.Sequential(torch.nn.Conv2d(
                config["in_channels"], config["out_channels"], 1))
    """)
    line = one_line_error(run("validate", case, "--torch", f"{name}:make"))
    assert "[bias, weight] the module lacks" in line and "[0.bias, 0.weight]" in line
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"weight": "0.weight", "bias": "0.bias"}))
    report = validate_json(case, "--torch", f"{name}:make", "--names", names, want=0)
    assert report["failed"] == [] and "grad.param.weight" not in report["not_checked"]
    names.write_text(json.dumps({"weigth": "0.weight"}))
    line = one_line_error(run("validate", case, "--torch", f"{name}:make",
                              "--names", names))
    # a rule no name matches is ignored, and named when the names do not match
    assert "no name of this case matches: 'weigth'" in line
    assert "the case's names: bias, weight" in line
    assert "nearest names: bias ~ 0.bias, weight ~ 0.weight" in line
    names.write_text("{not json")
    assert "cannot read JSON map" in one_line_error(
        run("validate", case, "--torch", f"{name}:make", "--names", names))


def test_names_anchor_without_a_map(golden: Golden, user_module: Callable,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from refattn.adapters import torch as adapter
    from refattn.golden.format import read_case

    case = read_case(golden.one("conv1x1"))
    monkeypatch.setitem(case.manifest, "anchor_names", {})
    with pytest.raises(ValidationInputError, match="has no anchor name map"):
        adapter.build_name_map(case, "anchor")
    # a block without parameters needs no map
    assert adapter.build_name_map(read_case(golden.one("gap")), "anchor") == {}


@pytest.mark.parametrize("args", [[], ["--results", "r.npz", "--torch", "m:f"]])
def test_exactly_one_of_results_and_torch(golden: Golden, args: list[str]) -> None:
    line = one_line_error(run("validate", golden.one("gap"), *args))
    assert "give exactly one of --results FILE or --torch MODULE:FACTORY" in line


def test_case_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    line = one_line_error(run("validate", tmp_path / "f", "--results", "r.npz"))
    assert line == f"Error: CASE: {tmp_path / 'f'} is not a case directory"
    line = one_line_error(run("validate", tmp_path, "--results", "r.npz"))
    assert "manifest.json: missing (not a fixture case)" in line


def test_torch_missing_says_how_to_install(golden: Golden,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    line = one_line_error(run("validate", golden.one("cbam", "jongchan", mode="eval"),
                              "--torch", "anchors.cbam:make_jongchan"))
    assert line == "Error: PyTorch is not installed: pip install 'refattn[torch]'"


# ---------------------------------------------------------------------------
# 4. results files written by a plain script (no refattn in it)

PLAIN_SCRIPT = """
import sys
import numpy as np
from safetensors.numpy import save_file

case, dtype, how, prefix = sys.argv[1], np.dtype(sys.argv[2]), sys.argv[3], sys.argv[4]
t = dict(np.load(case + "/tensors.npz", allow_pickle=False))
if how == "float32-math":
    t = {k: v.astype(np.float32) for k, v in t.items()}
x, b, dout = t["input.x"], t["param.bias"], t["cotangent.out"]
w = t["param.weight"][:, :, 0, 0]                                 # (O, C, 1, 1)
out = np.einsum("oc,nchw->nohw", w, x) + b[None, :, None, None]
results = {
    "output.out": out,
    "grad.input.x": np.einsum("oc,nohw->nchw", w, dout),
    "grad.param.weight": np.einsum("nohw,nchw->oc", dout, x)[:, :, None, None],
    "grad.param.bias": dout.sum(axis=(0, 2, 3)) * (2 if how == "bug" else 1),
}
results = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in results.items()}
np.savez(prefix + ".npz", **results)
save_file(results, prefix + ".safetensors")
"""


def _plain_script(tmp_path: Path, case: Path, dtype: str, how: str) -> Path:
    script = tmp_path / "mine.py"
    script.write_text(PLAIN_SCRIPT)
    prefix = tmp_path / how
    subprocess.run([sys.executable, script, case, dtype, how, prefix], check=True,
                   capture_output=True)
    return prefix


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_from_a_plain_script(golden: Golden, tmp_path: Path,
                                     dtype: str) -> None:
    case = golden.one("conv1x1", None, dtype)
    ok = _plain_script(tmp_path, case, dtype, "ok")
    bug = _plain_script(tmp_path, case, dtype, "bug")
    for suffix in (".npz", ".safetensors"):
        report = validate_json(case, "--results", f"{ok}{suffix}", want=0)
        assert report["not_checked"] == [] and report["subject"].endswith(suffix)
        report = validate_json(case, "--results", f"{bug}{suffix}", want=1)
        assert report["failed"] == ["grad.param.bias"]


def test_float32_math_fails_a_float64_case(golden: Golden, tmp_path: Path) -> None:
    # the float64 tolerance sits far below float32 round-off
    case = golden.one("conv1x1", None, "float64")
    f32 = _plain_script(tmp_path, case, "float64", "float32-math")
    report = validate_json(case, "--results", f"{f32}.safetensors", want=1)
    assert "output.out" in report["failed"]


# ---------------------------------------------------------------------------
# 5. the pytest API


@needs_torch
def test_assert_matches_golden(golden: Golden) -> None:
    from anchors.cbam import make_jongchan, make_jongchan_separate_mlps

    from refattn.testing import assert_matches_golden

    case = golden.one("cbam", "jongchan", mode="train")
    report = assert_matches_golden(case, make_jongchan, names="anchor")
    assert isinstance(report, ValidationReport) and report.ok
    assert report.subject == "torch module from make_jongchan"
    with pytest.raises(AssertionError) as info:
        assert_matches_golden(case, make_jongchan_separate_mlps, names="anchor")
    message = str(info.value)
    assert message.strip() == validate_with_api(case, make_jongchan_separate_mlps)
    assert "grad.param.mlp.fc1.weight: worst at index" in message
    # a results dict instead of a factory
    assert assert_matches_golden(case, _results(case)).ok
    with pytest.raises(AssertionError, match="output.out: worst at index"):
        assert_matches_golden(case, {"output.out": _results(case)["output.out"] + 1})


def validate_with_api(case: Path, factory: Callable) -> str:
    from refattn.testing import validate_case

    return validate_case(case, factory, names="anchor").to_text()


def test_golden_cases_parametrize(golden: Golden, pytester: pytest.Pytester) -> None:
    from refattn.testing import golden_cases

    root = golden.root
    golden("gap", None, "float32")
    golden("gap")
    gaps = golden_cases(root, block="gap")
    assert [p.parent.name for p in gaps] == ["gap"] * len(gaps) and len(gaps) >= 2
    assert golden_cases(root, block="gap", dtype="float32") == [
        golden.one("gap", None, "float32")]
    assert gaps == sorted(gaps)
    # a third party's suite, run by pytest: one test per case, the bug fails
    pytester.makepyfile(test_theirs=f"""
        import numpy as np
        import pytest
        from refattn.golden.format import read_case
        from refattn.testing import assert_matches_golden, golden_cases

        def my_gap(x, dout, bug=False):
            H, W = x.shape[2:]
            dx = np.broadcast_to(dout[:, :, None, None] / (H * (1 if bug else W)),
                                 x.shape)
            return {{"output.out": x.mean(axis=(2, 3)), "grad.input.x": dx}}

        @pytest.mark.parametrize("case", golden_cases({str(root)!r}, block="gap"),
                                 ids=lambda p: p.name)
        @pytest.mark.parametrize("bug", [False, True])
        def test_my_gap(case, bug):
            t = read_case(case).tensors
            assert_matches_golden(case, my_gap(t["input.x"], t["cotangent.out"], bug))
    """)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(gaps), failed=len(gaps))
    result.stdout.fnmatch_lines(["*grad.input.x: worst at index*"])


# ---------------------------------------------------------------------------
# 6. the report: text and JSON


def _report(rows: list) -> ValidationReport:
    return ValidationReport(case="golden/x/case", block="x", preset="p",
                            dtype="float64", mode=None, subject="theirs.npz", rows=rows)


def test_compare_tensor_rule_boundary() -> None:
    # |a - e| <= atol + rtol |e|, exactly representable numbers
    e = np.array([1.0, 0.0, -2.0])
    ok = compare_tensor("t", e, np.array([1.75, 0.25, -3.25]), rtol=0.5, atol=0.25)
    assert ok.status == "PASS" and ok.mismatches == 0
    bad = compare_tensor("t", e, np.array([1.75, np.nextafter(0.25, 1), -3.25]),
                         rtol=0.5, atol=0.25)
    assert bad.status == "FAIL" and bad.mismatches == 1 and bad.worst_index == (1,)


def test_report_text_and_json_say_the_same() -> None:
    rng = np.random.default_rng(7)
    e = rng.standard_normal((3, 4, 5))
    a = e.copy()
    a[1, 2, 3] += 0.5  # the worst element
    a[0, 0, 1] += 1e-3
    a[2, 1, 0] = np.nan
    a[2, 3, 4] = -np.inf
    row = compare_tensor("grad.input.x", e, a, rtol=1e-6, atol=1e-6)
    ok = compare_tensor("output.out", e, e + 1e-9, rtol=1e-6, atol=1e-6)
    report = _report([ok, row])
    # the numbers, computed independently
    finite = np.isfinite(a)
    diff = np.abs(a - e)
    assert row.max_abs_err == np.inf and row.nan_actual == 1 and row.inf_actual == 1
    assert row.mismatches == 4 and row.size == 60
    assert row.worst_index == (2, 1, 0)  # NaN: infinitely wrong, first in C order
    assert row.first_mismatches[0]["index"] == [0, 0, 1]
    assert [m["index"] for m in row.first_mismatches] == [
        [0, 0, 1], [1, 2, 3], [2, 1, 0], [2, 3, 4]]
    assert row.first_mismatches[1]["actual"] == a[1, 2, 3]
    assert np.max(diff[finite]) == pytest.approx(0.5)
    assert ok.max_abs_err == pytest.approx(np.max(np.abs(1e-9 + e - e)), rel=1e-6)
    assert ok.rel_l2_err == pytest.approx(
        np.linalg.norm((e + 1e-9) - e) / np.linalg.norm(e), rel=1e-6)

    text = report.to_text()
    lines = text.splitlines()
    assert lines[0] == "validate golden/x/case (x, preset p, float64): FAIL"
    assert lines[1] == ("  expected = refattn golden fixture (expected, float64 "
                        "reference math)")
    assert lines[2] == "  actual   = theirs.npz"
    assert lines[3].split() == ["tensor", "status", "max", "abs", "max", "rel", "rel",
                                "L2", "rtol", "atol", "mismatch", "compared"]
    assert lines[4].split()[:2] == ["output.out", "PASS"]
    assert lines[4].endswith("rel+abs")
    row_line = lines[5]
    assert row_line.split()[:3] == ["grad.input.x", "FAIL", "inf"]
    assert "4/60 (6.7%)" in row_line and row_line.endswith("NaN 1  Inf 1")
    assert "  grad.input.x: worst at index (2, 1, 0): expected " in text
    assert "actual nan (|diff| nan, allowed" in text
    assert "first mismatches (expected vs actual): (0, 0, 1): " in text
    assert "(2, 3, 4): " in text and " vs -inf" in text

    data = json.loads(report.to_json(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["ok"] is False and data["failed"] == ["grad.input.x"]
    assert data["verdict"] == "FAIL" and data["rows"][0]["strength"] == "rel+abs"
    assert data["reference"] == report.reference and data["subject"] == "theirs.npz"
    bad = data["rows"][1]
    assert bad["name"] == "grad.input.x" and bad["status"] == "FAIL"
    assert bad["worst_index"] == [2, 1, 0]
    assert bad["actual_at_worst"] == "nan" and bad["max_abs_err"] == "inf"
    assert bad["nan_actual"] == 1 and bad["inf_actual"] == 1
    assert bad["mismatches"] == 4 and bad["mismatch_pct"] == pytest.approx(100 * 4 / 60)
    assert bad["first_mismatches"][3]["actual"] == "-inf"
    assert data["rows"][0]["max_abs_err"] == ok.max_abs_err


def test_report_rows_follow_the_fixture(golden: Golden) -> None:
    from refattn.golden.format import read_case

    case = read_case(golden.one("cbam", "jongchan", mode="train"))
    results = _results(golden.one("cbam", "jongchan", mode="train"))
    report = validate_results(case, results, subject="mine")
    names = [r.name for r in report.rows]
    # outputs first, then running statistics, input and parameter gradients, aux
    assert names[0] == "output.out"
    assert names.index("output.state.spatial.bn.running_mean") < names.index(
        "grad.input.x") < names.index("grad.param.mlp.fc1.bias") < names.index(
        "aux.spatial_gate")
    for r in report.rows:  # the manifest's tolerances, verbatim
        assert (r.rtol, r.atol) == case.tolerance(r.name)
        assert r.max_abs_err == 0.0
    # the longest name fits its column: the table stays aligned
    lines = report.to_text().splitlines()[3:4 + len(names)]
    assert max(map(len, names)) > 34
    columns = {re.search(r" (status|PASS|NOT CHECKED)\b", ln).start() for ln in lines}
    assert len(columns) == 1
