"""Shared fixtures: the backend matrix, torch (optional unless required),
hypothesis profiles."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from refattn import backend

# tests/anchors (PyTorch modules in the structure of each anchor implementation)
# is importable as `anchors` from every test module and from `refattn validate`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "fuzz", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("REFATTN_HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """One entry of the backend matrix: a namespace and the device to use."""

    name: str
    xp: Any
    device: Any

    def asarray(self, a: np.ndarray) -> Any:
        """Move a host array onto this backend (on its device)."""
        return backend.from_host(np.asarray(a), self.xp, device=self.device)

    def to_host(self, a: Any) -> np.ndarray:
        return backend.to_host(a)


def _backends() -> list[Any]:
    import array_api_compat.numpy as cnp

    out = [pytest.param(Backend("numpy", cnp, "cpu"), id="numpy")]
    try:
        import array_api_strict as xs

        dev = xs.Device("device1")
        out.append(pytest.param(Backend("strict", xs, dev), id="strict"))
    except ImportError:  # pragma: no cover - array-api-strict is in the test extra
        pass
    return out


@pytest.fixture(params=_backends())
def xb(request: pytest.FixtureRequest) -> Backend:
    """The backend matrix: NumPy, and array_api_strict on a non-default device."""
    return request.param


@pytest.fixture(scope="session")
def torch() -> Any:
    """PyTorch, or a skip; a failure when REFATTN_REQUIRE_TORCH=1.  Its MKL VML
    kernels are chosen on one thread first (``settle_vml_dispatch``)."""
    try:
        import torch as _torch
    except ImportError:
        if os.environ.get("REFATTN_REQUIRE_TORCH") == "1":
            pytest.fail("REFATTN_REQUIRE_TORCH=1 but torch is not importable")
        pytest.skip("torch is not installed (pip install 'refattn[torch]')")
    _torch.set_num_threads(max(1, os.cpu_count() or 1))
    from refattn.adapters.torch import settle_vml_dispatch

    settle_vml_dispatch(_torch)  # before any multi-threaded exp, log, sqrt, ...
    return _torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
