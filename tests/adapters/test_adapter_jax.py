"""``refattn validate --jax`` and ``refattn.adapters.jax``: the Flax NNX
anchors (tests/anchors/flax_nnx.py) pass their presets in float64 and
float32, each planted bug fails exactly the tensors it must, a zeroed or
negated result FAILs, non-real results are refused, ``jax_enable_x64`` is
restored whatever happens, and the plain ``(apply, params)`` form works."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from adapter_cases import COMMITTED, checked_keys, committed
from click.testing import CliRunner

from refattn.cli import main
from refattn.testing import assert_matches_golden
from refattn.validate import ValidationInputError, validate_results

pytestmark = pytest.mark.usefixtures("jax")

CHANNELS_LAST = {"data_format": "channels_last"}


def run_jax(case: Any, factory: Any, **kwargs: Any) -> Any:
    from refattn.adapters.jax import run_jax_case

    return validate_results(case, run_jax_case(case, factory, **kwargs))


def nnx_factory(name: str) -> Any:
    import anchors.flax_nnx as flax_anchors

    return getattr(flax_anchors, name)


# ---------------------------------------------------------------------------
# 1. the anchors pass their presets

PASSING = [
    ("cbam/jongchan-train-float64", "make_cbam"),
    ("cbam/jongchan-eval-float32", "make_cbam"),
    ("non_local/alexhex7-train-float64", "make_non_local"),
    ("non_local/alexhex7-eval-float32", "make_non_local"),
    ("cgnl/yue-float64", "make_cgnl"),
    ("cgnl/yue-float32", "make_cgnl"),
]
PASSING_SLOW = [
    ("cbam/jongchan-eval-float64", "make_cbam"),
    ("cbam/jongchan-train-float32", "make_cbam"),
    ("non_local/alexhex7-eval-float64", "make_non_local"),
    ("non_local/alexhex7-train-float32", "make_non_local"),
]


@pytest.mark.parametrize("path, factory", PASSING + [
    pytest.param(*p, marks=pytest.mark.slow) for p in PASSING_SLOW])
def test_flax_anchor_passes_its_preset(path: str, factory: str) -> None:
    case = committed(path)
    report = run_jax(case, nnx_factory(factory), **CHANNELS_LAST)
    assert report.failed == [], report.to_text()
    # every tensor but the intermediates (which a model does not expose)
    assert [r.name for r in report.checked] and all(
        n.startswith("aux.") for n in report.not_checked), report.to_text()
    assert {r.name for r in report.checked} == set(checked_keys(case))


# ---------------------------------------------------------------------------
# 2. planted bugs are caught on the tensors they must show on


def _all_but(case: Any, *passing: str) -> list[str]:
    return sorted(set(checked_keys(case)) - set(passing))


def test_cbam_without_spatial_sigmoid_fails_all_but_the_running_statistics() -> None:
    case = committed("cbam/jongchan-train-float64")
    report = run_jax(case, nnx_factory("make_cbam_no_spatial_sigmoid"), **CHANNELS_LAST)
    stats = [k for k in checked_keys(case) if k.startswith("output.state.")]
    assert len(stats) == 2
    assert sorted(report.failed) == _all_but(case, *stats)


def test_non_local_softmax_over_queries_spares_only_the_biases_after_it() -> None:
    case = committed("non_local/alexhex7-eval-float64")
    report = run_jax(case, nnx_factory("make_non_local_softmax_over_queries"),
                     **CHANNELS_LAST)
    assert sorted(report.failed) == _all_but(case, "grad.param.W.bias",
                                              "grad.param.W_bn.bias")


def test_cgnl_one_group_kernel_spares_only_the_group_norm_bias() -> None:
    case = committed("cgnl/yue-float64")
    report = run_jax(case, nnx_factory("make_cgnl_one_group_kernel"), **CHANNELS_LAST)
    assert sorted(report.failed) == _all_but(case, "grad.param.gn.bias")


@pytest.mark.parametrize("path, factory, stat", [
    ("cbam/jongchan-train-float64", "make_cbam_flax_bn", "spatial.bn.running_var"),
    ("non_local/alexhex7-train-float64", "make_non_local_flax_bn", "W_bn.running_var"),
])
def test_flax_batch_norm_fails_only_the_running_variance(path: str, factory: str,
                                                         stat: str) -> None:
    """nnx.BatchNorm updates the running variance with the biased batch
    variance; PyTorch and the fixtures with the unbiased one."""
    case = committed(path)
    report = run_jax(case, nnx_factory(factory), **CHANNELS_LAST)
    assert report.failed == [f"output.state.{stat}"]
    row = next(r for r in report.rows if r.name == f"output.state.{stat}")
    assert row.max_rel_err > 1e3 * row.rtol  # far outside the band, not round-off


# ---------------------------------------------------------------------------
# 3. the plain (apply, params) form, no-false-PASS, refusals


def conv1x1_apply(params: dict[str, Any], x: Any) -> Any:
    """A 1x1 convolution on channels-first input, params in PyTorch layout."""
    import jax.numpy as jnp

    w = params["weight"][:, :, 0, 0]                                 # (O, C)
    return jnp.einsum("oc,nchw->nohw", w, x) + params["bias"][:, None, None]


def conv1x1_factory(wrong: Any = None, **extra: Any) -> Any:
    """A factory of (apply, params) whose output `wrong` may corrupt."""
    import jax.numpy as jnp

    def factory(config: dict[str, Any]) -> Any:
        c, o = config["in_channels"], config["out_channels"]
        params = {"weight": jnp.zeros((o, c, 1, 1)), "bias": jnp.zeros(o), **extra}
        if wrong is None:
            return conv1x1_apply, params
        return (lambda p, x: wrong(conv1x1_apply(p, x))), params

    return factory


CONV = "conv1x1/default-float64"


def test_plain_apply_and_params_pass_and_linen_collections_are_dropped() -> None:
    case = committed(CONV)
    assert run_jax(case, conv1x1_factory()).verdict == "PASS"

    def linen_style(config: dict[str, Any]) -> Any:
        apply, params = conv1x1_factory()(config)
        return (lambda v, x: apply(v["params"], x)), {"params": params}

    assert run_jax(case, linen_style).verdict == "PASS"


@pytest.mark.parametrize("how", ["zeroed", "negated", "scaled"])
def test_a_wrong_result_fails_through_the_adapter(how: str) -> None:
    wrong = {"zeroed": lambda y: 0 * y, "negated": lambda y: -y,
             "scaled": lambda y: 1.001 * y}[how]
    report = run_jax(committed(CONV), conv1x1_factory(wrong))
    assert report.verdict == "FAIL" and "output.out" in report.failed
    if how != "scaled":  # the backward of 0*y and -y is wrong too
        assert "grad.param.weight" in report.failed


@pytest.mark.parametrize("dtype, kind", [("complex128", "complex"), ("int32", "integer")])
def test_non_real_outputs_are_refused(dtype: str, kind: str) -> None:
    with pytest.raises(ValidationInputError, match=f"output.out has dtype {dtype} .{kind}"):
        run_jax(committed(CONV), conv1x1_factory(lambda y: y.astype(dtype)))


def test_names_and_shapes_must_agree() -> None:
    import jax.numpy as jnp

    case = committed(CONV)
    with pytest.raises(ValidationInputError, match=r"the pytree has \[extra\]"):
        run_jax(case, conv1x1_factory(extra=jnp.zeros(3)))
    with pytest.raises(ValidationInputError, match="expected \\(apply, params\\) or a "
                                                   "flax.nnx.Module"):
        run_jax(case, lambda config: conv1x1_apply)
    # a Flax model run on channels-first input fails in its forward, by name
    with pytest.raises(ValidationInputError, match="the forward raised"):
        run_jax(committed("cgnl/yue-float64"), nnx_factory("make_cgnl"))


def test_an_nnx_module_is_accepted_in_place_of_its_factory() -> None:
    case = committed("cgnl/yue-float32")
    module = nnx_factory("make_cgnl")({**case.manifest["config"], "in_channels": 16})
    report = run_jax(case, module, **CHANNELS_LAST)
    assert report.failed == [] and report.checked


def test_x64_is_switched_on_for_float64_and_restored(jax: Any) -> None:
    before = jax.config.read("jax_enable_x64")
    seen = []

    def spy(config: dict[str, Any]) -> Any:
        seen.append(jax.config.read("jax_enable_x64"))
        return conv1x1_factory()(config)

    try:
        for setting in (False, True):
            jax.config.update("jax_enable_x64", setting)
            run_jax(committed(CONV), spy)
            run_jax(committed("conv1x1/default-float32"), spy)
            assert jax.config.read("jax_enable_x64") is setting

            def exits(config: dict[str, Any]) -> Any:
                raise RuntimeError("boom")

            with pytest.raises(ValidationInputError, match="the factory raised "
                                                           "RuntimeError: boom"):
                run_jax(committed(CONV), exits)
            assert jax.config.read("jax_enable_x64") is setting
    finally:
        jax.config.update("jax_enable_x64", before)
    assert seen == [True, False, True, True]  # float64 always on; float32 left alone


def test_sys_exit_in_the_factory_is_a_user_code_error() -> None:
    from refattn.adapters.common import UserCodeError

    def exits(config: dict[str, Any]) -> Any:
        sys.exit(3)

    with pytest.raises(UserCodeError, match="raised SystemExit.3. while building"):
        run_jax(committed(CONV), exits)


# ---------------------------------------------------------------------------
# 4. the command line and refattn.testing


def cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_verdicts_and_exit_codes() -> None:
    case = COMMITTED / "cgnl/yue-float64"
    result = cli("validate", case, "--jax", "anchors.flax_nnx:make_cgnl",
                 "--data-format", "channels_last", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "PARTIAL" and report["failed"] == []
    assert "JAX model from anchors.flax_nnx:make_cgnl" in report["subject"]
    result = cli("validate", case, "--jax", "anchors.flax_nnx:make_cgnl",
                 "--data-format", "channels_last", "--require", "all")
    assert result.exit_code == 1  # PARTIAL (the aux tensors) under --require all
    result = cli("validate", case, "--jax", "anchors.flax_nnx:make_cgnl_one_group_kernel",
                 "--data-format", "channels_last")
    assert result.exit_code == 1 and "FAIL" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--jax", "anchors.flax_nnx"], "--jax: expected MODULE:FACTORY"),
    (["--jax", "no_such_module:make"], "--jax: cannot import 'no_such_module'"),
    (["--jax", "anchors.flax_nnx:nope"], "--jax: anchors.flax_nnx has no callable 'nope'"),
    (["--jax", "a:b", "--keras", "c:d"], "give exactly one of --results FILE"),
    (["--torch", "a:b", "--data-format", "channels_last"],
     "--data-format: applies to --jax and --keras only"),
])
def test_cli_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = cli("validate", COMMITTED / "cgnl/yue-float64", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.stderr.strip().splitlines()[-1]


def test_cli_without_jax_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)
    result = cli("validate", COMMITTED / "cgnl/yue-float64", "--jax",
                 "anchors.flax_nnx:make_cgnl")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: JAX is not installed: pip install "
                                     "'refattn[jax]'")


def test_testing_api_with_framework_jax(tmp_path: Path) -> None:
    case = COMMITTED / "cgnl/yue-float32"
    report = assert_matches_golden(case, nnx_factory("make_cgnl"), framework="jax",
                                   **CHANNELS_LAST)
    assert report.failed == []
    with pytest.raises(AssertionError, match="grad.param.gn.weight"):
        assert_matches_golden(case, nnx_factory("make_cgnl_one_group_kernel"),
                              framework="jax", **CHANNELS_LAST)
    with pytest.raises(ValueError, match="framework: expected one of torch, jax, keras"):
        assert_matches_golden(case, nnx_factory("make_cgnl"), framework="flax")
