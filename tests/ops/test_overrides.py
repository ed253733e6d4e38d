"""The override table of refattn.ops.overrides, without CUDA: a NumPy array
whose type claims the module ``cupy`` stands for a CuPy array, and a test
loader registers a stand-in override of the softmax step."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest

from refattn.ops import overrides
from refattn.ops.overrides import Override
from refattn.ops.softmax import SoftmaxCache, softmax_backward, softmax_forward


class DeviceArray(np.ndarray):
    """A NumPy array that the override points take for a CuPy array."""


DeviceArray.__module__ = "cupy.standin"


class DoubledCache(NamedTuple):
    y: Any


def _doubled_forward(x: Any, axis: int) -> tuple[Any, DoubledCache]:
    return 2.0 * x, DoubledCache(x)


def _doubled_backward(dout: Any, cache: DoubledCache) -> Any:
    return 2.0 * dout


LOADS: list[str] = []


def register() -> None:
    """The test's loader: the override applies along the last axis only."""
    LOADS.append("register")
    overrides.register("softmax", Override(
        lambda x, axis: axis == x.ndim - 1, _doubled_forward, _doubled_backward,
        DoubledCache, "the last axis (test)",
    ))


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> dict[str, Override]:
    """An empty table whose loader is this module's ``register``."""
    LOADS.clear()
    monkeypatch.setattr(overrides, "OVERRIDES", {})
    monkeypatch.setattr(overrides, "_loaded", False)
    monkeypatch.setattr(overrides, "LOADERS", (f"{__name__}:register",))
    return overrides.OVERRIDES


def test_numpy_arrays_never_load_the_table(table: dict[str, Override]) -> None:
    x = np.arange(6.0).reshape(2, 3)
    y, cache = softmax_forward(x)
    assert type(cache) is SoftmaxCache and LOADS == [] and table == {}
    softmax_backward(np.ones_like(y), cache)
    assert LOADS == [] and not overrides._loaded


def test_a_device_array_loads_the_table_once(table: dict[str, Override]) -> None:
    x = np.arange(6.0).reshape(2, 3).view(DeviceArray)
    for _ in range(3):
        y, cache = softmax_forward(x, axis=-1)
        assert type(cache) is DoubledCache
        np.testing.assert_array_equal(y, 2.0 * x)
        np.testing.assert_array_equal(softmax_backward(np.ones((2, 3)), cache),
                                      2.0 * np.ones((2, 3)))
    assert LOADS == ["register"]
    assert set(table) == {"softmax"}


def test_where_the_override_does_not_apply_the_math_runs(
    table: dict[str, Override]
) -> None:
    x = np.arange(6.0).reshape(2, 3)
    y, cache = softmax_forward(x.view(DeviceArray), axis=0)  # not the last axis
    assert type(cache) is SoftmaxCache
    want, _ = softmax_forward(x, axis=0)
    np.testing.assert_allclose(y, want)
    # a generic cache goes to the generic backward, override registered or not
    dx = softmax_backward(np.ones((2, 3)), cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-15)


def test_checks_run_before_the_override(table: dict[str, Override]) -> None:
    """The public op checks its arguments first: both paths raise alike."""
    x = np.arange(6.0).reshape(2, 3).view(DeviceArray)
    with pytest.raises(ValueError, match="axis: expected an int in"):
        softmax_forward(x, axis=2)
    assert LOADS == []

