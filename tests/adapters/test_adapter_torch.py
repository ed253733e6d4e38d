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
