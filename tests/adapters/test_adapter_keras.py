"""``refattn validate --keras`` and ``refattn.adapters.keras``: the Keras 3
CBAM of tests/anchors/keras_cbam.py (luuuyi layout, MLP biases, reduction 8)
against ``--preset luuuyi --set mlp_bias=true --set reduction=8`` cases, on
the JAX backend in this process and on the torch backend in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from adapter_cases import REPO, checked_keys, golden_case
from click.testing import CliRunner

from refattn.cli import main
from refattn.golden.format import read_case
from refattn.testing import assert_matches_golden
from refattn.validate import ValidationInputError, validate_results

pytestmark = pytest.mark.usefixtures("keras")

SETS = ("mlp_bias=true", "reduction=8")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras-golden")
    return {dtype: golden_case(root, "cbam", "luuuyi", dtype, *SETS)
            for dtype in ("float64", "float32")}


def factory(name: str) -> Any:
    import anchors.keras_cbam as keras_anchors

    return getattr(keras_anchors, name)


def run_keras(case_dir: Path, make: Any, **kwargs: Any) -> Any:
    from refattn.adapters.keras import run_keras_case

    case = read_case(case_dir)
    return validate_results(case, run_keras_case(case, make, names="anchor", **kwargs))


def test_the_case_is_the_keras_layout(cases: dict[str, Path]) -> None:
    manifest = json.loads((cases["float64"] / "manifest.json").read_text())
    assert manifest["config"]["reduction"] == 8 and manifest["config"]["mlp_bias"]
    assert manifest["anchor_names"]["mlp.fc1.bias"] == "ca.fc.0.bias"


@pytest.mark.parametrize("dtype, make", [("float32", "make_cbam"),
                                         ("float32", "make_cbam_sum_mean"),
                                         ("float64", "make_cbam_sum_mean")])
def test_keras_cbam_passes(cases: dict[str, Path], dtype: str, make: str) -> None:
    report = run_keras(cases[dtype], factory(make))
    assert report.failed == [], report.to_text()
    assert {r.name for r in report.checked} == set(checked_keys(read_case(cases[dtype])))


def test_keras_ops_mean_is_float32_math_in_a_float64_layer(cases: dict[str, Path]) -> None:
    """Outside TensorFlow, keras.ops.mean accumulates a float64 tensor in
    float32: every tensor fails the float64 case by about float32 round-off."""
    report = run_keras(cases["float64"], factory("make_cbam"))
    assert sorted(report.failed) == checked_keys(read_case(cases["float64"]))
    out = next(r for r in report.rows if r.name == "output.out")
    assert 1e-10 < out.rel_l2_err < 1e-6


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_pool_order_bug_fails_every_tensor(cases: dict[str, Path], dtype: str) -> None:
    report = run_keras(cases[dtype], factory("make_cbam_max_mean"))
    assert sorted(report.failed) == checked_keys(read_case(cases[dtype]))
    out = next(r for r in report.rows if r.name == "output.out")
    assert out.rel_l2_err > 1e-2  # a wrong result, not round-off


def test_a_zeroed_or_negated_layer_fails(cases: dict[str, Path]) -> None:
    from anchors.keras_cbam import CBAM

    for sign in (0.0, -1.0):
        class Wrong(CBAM):
            def call(self, x: Any, sign: float = sign) -> Any:
                return sign * super().call(x)

        def make(config: dict[str, Any]) -> Any:
            return Wrong(config["in_channels"], config["reduction"], exact_mean=True,
                         name="cbam")

        report = run_keras(cases["float32"], make, data_format="channels_last")
        assert report.verdict == "FAIL" and "output.out" in report.failed
        assert "grad.param.spatial.conv.weight" in report.failed


def test_dtype_policy_and_x64_are_restored(cases: dict[str, Path], keras: Any) -> None:
    import jax

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy().name
    x64 = jax.config.read("jax_enable_x64")
    run_keras(cases["float64"], factory("make_cbam_sum_mean"))
    with pytest.raises(ValidationInputError, match="the factory raised ValueError"):
        run_keras(cases["float64"], lambda config: factory("make_cbam")(
            {**config, "spatial_bias": True}))
    assert keras.config.floatx() == floatx and keras.config.dtype_policy().name == policy
    assert jax.config.read("jax_enable_x64") == x64


def test_refusals(cases: dict[str, Path], keras: Any) -> None:
    with pytest.raises(ValidationInputError, match="expected a keras Layer"):
        run_keras(cases["float32"], lambda config: object())
    with pytest.raises(ValidationInputError, match="got the layer 'cbam' itself; pass a "
                                                   "factory"):
        run_keras(cases["float32"], factory("make_cbam")(
            {**read_case(cases["float32"]).manifest["config"], "in_channels": 16}))
    with pytest.raises(ValidationInputError, match=r"the layer has \[ca.fc.0.bias"):
        from refattn.adapters.keras import run_keras_case

        case = read_case(cases["float32"])
        run_keras_case(case, factory("make_cbam"), names="canonical")

    def complex_out(config: dict[str, Any]) -> Any:
        class Complex(keras.layers.Layer):
            def call(self, x: Any) -> Any:
                return keras.ops.cast(x, "complex64")

        return Complex()

    with pytest.raises(ValidationInputError, match="output.out has dtype complex64"):
        from refattn.adapters.keras import run_keras_case

        run_keras_case(read_case(REPO / "golden/gap/default-float32"), complex_out)


def test_cli_and_testing_api(cases: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["validate", str(cases["float32"]), "--keras",
                                       "anchors.keras_cbam:make_cbam", "--names", "anchor",
                                       "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["failed"] == [] and "jax backend" in report["subject"]
    result = CliRunner().invoke(main, ["validate", str(cases["float32"]), "--keras",
                                       "anchors.keras_cbam:make_cbam_max_mean",
                                       "--names", "anchor"], catch_exceptions=False)
    assert result.exit_code == 1
    with pytest.raises(AssertionError, match="grad.param.spatial.conv.weight"):
        assert_matches_golden(cases["float32"], factory("make_cbam_max_mean"),
                              framework="keras", names="anchor")


TORCH_BACKEND = """
import json, sys
from refattn.adapters.keras import backend, run_keras_case
from refattn.golden.format import read_case
from refattn.validate import validate_results
import anchors.keras_cbam as k
out = {"backend": backend()}
for make in ("make_cbam", "make_cbam_max_mean"):
    case = read_case(sys.argv[1])
    report = validate_results(case, run_keras_case(case, getattr(k, make), names="anchor"))
    out[make] = report.failed
print(json.dumps(out))
"""


def test_torch_backend(cases: dict[str, Path]) -> None:
    """Keras on its torch backend, float32 (float64 Conv2D backward fails
    inside torch on CPU: its slow_conv2d refuses the permuted kernel Keras
    passes)."""
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", TORCH_BACKEND, str(cases["float32"])],
                          check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["backend"] == "torch" and got["make_cbam"] == []
    assert sorted(got["make_cbam_max_mean"]) == checked_keys(read_case(cases["float32"]))
