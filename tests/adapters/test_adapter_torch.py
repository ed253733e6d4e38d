"""The no-false-PASS rule through ``refattn.adapters.torch``, as through the
JAX and Keras adapters: a module whose output is zeroed or negated FAILs,
and a non-real output is refused."""

from __future__ import annotations

from typing import Any

import pytest
from adapter_cases import committed

from refattn.adapters.torch import run_torch_case
from refattn.validate import ValidationInputError, validate_results

pytestmark = pytest.mark.usefixtures("torch")

CONV = "conv1x1/default-float64"


def conv_factory(torch: Any, wrong: Any) -> Any:
    class Conv(torch.nn.Conv2d):
        def forward(self, x: Any) -> Any:
            return wrong(super().forward(x))

    def make(config: dict[str, Any]) -> Any:
        return Conv(config["in_channels"], config["out_channels"], 1)

    return make


@pytest.mark.parametrize("how", ["zeroed", "negated"])
def test_a_wrong_module_fails(torch: Any, how: str) -> None:
    wrong = {"zeroed": lambda y: 0 * y, "negated": lambda y: -y}[how]
    case = committed(CONV)
    report = validate_results(case, run_torch_case(case, conv_factory(torch, wrong)))
    assert report.verdict == "FAIL"
    assert {"output.out", "grad.input.x", "grad.param.weight"} <= set(report.failed)
    right = run_torch_case(case, conv_factory(torch, lambda y: y))
    assert validate_results(case, right).verdict == "PASS"


def test_a_complex_output_is_refused(torch: Any) -> None:
    with pytest.raises(ValidationInputError, match="complex"):
        run_torch_case(committed(CONV),
                       conv_factory(torch, lambda y: y.to(torch.complex128)))


class _RecordingTorch:
    """Just enough of torch for settle_vml_dispatch: dtypes, linspace, and
    every VML op recording (op, dtype, element count) of each call."""

    float32, float64 = "float32", "float64"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def linspace(self, start: float, end: float, steps: int, dtype: str) -> Any:
        return (dtype, steps)

    def __getattr__(self, op: str) -> Any:
        return lambda x: self.calls.append((op, *x))


def test_settle_vml_dispatch_calls_every_op_once_per_dtype_on_one_thread() -> None:
    """Each VML op, both float dtypes, once per torch module, on fewer than
    the 2048 elements ATen gives one intra-op thread (pytorch#188792)."""
    from refattn.adapters import torch as adapter

    fake = _RecordingTorch()
    adapter.settle_vml_dispatch(fake)
    adapter.settle_vml_dispatch(fake)  # a second call does nothing
    ops = [op for op, _, _ in fake.calls]
    assert sorted(ops) == sorted(adapter.VML_OPS * 2)
    assert {(op, dt) for op, dt, _ in fake.calls} == {
        (op, dt) for op in adapter.VML_OPS for dt in ("float32", "float64")}
    assert all(0 < n <= 2048 for _, _, n in fake.calls)
    assert {"exp", "log", "sqrt", "tanh"} <= set(adapter.VML_OPS)


def test_the_adapter_settles_before_running_a_module(torch: Any) -> None:
    """run_torch_case imports torch through _torch(), which settles it."""
    from refattn.adapters import torch as adapter

    case = committed(CONV)
    run_torch_case(case, conv_factory(torch, lambda y: y))
    assert id(torch) in adapter._settled
