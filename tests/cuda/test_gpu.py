"""Tier 3: the kernels, the ops and the blocks on a real GPU (``pytest -m gpu``).

Runs the very checks of kernel_checks.py that tier 2 runs on the host shim,
with the kernels compiled by cupy.RawModule (refattn.cuda.get_module()) and
launched by the CuPy runner: once with the default launch configuration and
once with small blocks and grids, so reduction tails and grid-stride loops
are exercised on the device too.  Beyond that: realistic shapes, tensors with
more than 2^31 elements (64-bit indexing), and the per-device module cache.

The op- and block-level checks of dispatch_checks.py run here too (tier 2
runs them on the CuPy stand-in): every wired op takes its kernel and matches
NumPy, kernels on and off; every block preset on CuPy matches NumPy in
float32 and float64, kernels on and off; golden cases generated with the
CuPy backend match the NumPy ones within their manifest tolerances.  With
``REFATTN_GPU_NO_POOL=1`` CuPy's memory pool is off, so that
compute-sanitizer's memcheck sees every array's exact bounds (see
``test_kernels_under_compute_sanitizer`` and docs/gpu.md).

The whole module is skipped when CuPy has no CUDA device.  Only this tier
certifies GPU behaviour (warps, the memory model, launch limits, atomics
under real concurrency); tiers 1 and 2 cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import refattn.cuda as rc

if not rc.cupy_available():
    pytest.skip(
        "no CUDA device answers through CuPy (tier 3 needs a GPU)",
        allow_module_level=True,
    )

import cupy  # noqa: E402 - only importable usefully past the skip

from refattn.cuda import launch as K  # noqa: E402
from refattn.cuda._runner import CupyRunner  # noqa: E402

from dispatch_checks import *  # noqa: E402,F403 - the shared dispatch checks
from dispatch_checks import Gpu, recording  # noqa: E402
from kernel_checks import *  # noqa: E402,F403 - the shared kernel checks
from kernel_checks import Bound, close, distinct, f64, normal  # noqa: E402

pytestmark = pytest.mark.gpu

if os.environ.get("REFATTN_GPU_NO_POOL") == "1":
    cupy.cuda.set_allocator(None)  # exact allocations for compute-sanitizer


def _runner(block: int | None, max_grid: int | None) -> CupyRunner:
    r = CupyRunner()
    if block is not None:
        r.block = block
    if max_grid is not None:
        r.max_grid = max_grid
    return r


@pytest.fixture(
    params=[(None, None), (32, 3), (48, 3)], ids=["default", "block32", "block48"]
)
def k(request: pytest.FixtureRequest) -> Bound:
    """The launch wrappers on the GPU, NumPy arrays at the edges."""
    return Bound(_runner(*request.param), to_device=cupy.asarray, to_host=cupy.asnumpy)


@pytest.fixture
def gpu() -> Iterator[Gpu]:
    """The ops and blocks on CuPy, every kernel launch recorded."""
    import array_api_compat.cupy as xp

    launched: list[str] = []
    with recording(launched):
        yield Gpu("cupy", xp, launched)


def test_module_is_compiled_once_per_device() -> None:
    dev = cupy.cuda.runtime.getDevice()
    assert rc.get_module() is rc.get_module(dev)
    for name in rc.kernel_names():
        base, ctype = name[:-1].split("<")
        dtype = {"float": "float32", "double": "float64"}[ctype]
        assert rc.get_function(base, dtype) is not None


def test_outputs_stay_on_the_device_and_keep_their_dtype() -> None:
    x = cupy.asarray(
        np.random.default_rng(0).standard_normal((2, 3, 5, 7)), dtype=cupy.float32
    )
    out, arg = K.global_pool_forward(x, "max")
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float32
    assert isinstance(arg, cupy.ndarray) and arg.dtype == cupy.int64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standard_cbam_shape(dtype) -> None:
    """CBAM at x (8, 256, 28, 28): channel gate, channel pool, spatial conv."""
    rng = np.random.default_rng(1)
    x = distinct(rng, (8, 256, 28, 28), dtype)
    xd = cupy.asarray(x)
    for kind in ("avg", "max", "lp", "lse"):
        out, _ = K.global_pool_forward(xd, kind)
        v = f64(x).reshape(8, 256, -1)
        want = {
            "avg": v.mean(-1),
            "max": v.max(-1),
            "lp": np.sqrt((v * v).sum(-1)),
            "lse": v.max(-1) + np.log(np.exp(v - v.max(-1, keepdims=True)).sum(-1)),
        }
        close(cupy.asnumpy(out), want[kind], dtype)
    z = cupy.asarray(normal(rng, (8, 256, 1, 1), dtype))
    out, s = K.gate_mul_forward(xd, z)
    close(cupy.asnumpy(out), f64(x) / (1 + np.exp(-f64(cupy.asnumpy(z)))), dtype)
    m, arg = K.channel_pool_forward(xd)
    close(cupy.asnumpy(m)[:, 0], f64(x).max(1), dtype)
    close(cupy.asnumpy(m)[:, 1], f64(x).mean(1), dtype)
    np.testing.assert_array_equal(cupy.asnumpy(arg), x.argmax(1))


@pytest.mark.slow
def test_more_than_2_31_elements() -> None:
    """64-bit indexing: element-wise, per-row and scatter kernels past 2^31."""
    L = 2**30 + 7
    n = 2 * L  # > 2^31 elements of float32 (8.6 GB per array)
    x = cupy.ones((1, 2, L), dtype=cupy.float32)
    x[0, 1, -3:] = cupy.asarray([2.0, 3.0, 4.0], dtype=cupy.float32)
    z = cupy.asarray([[[0.0]], [[1.0]]], dtype=cupy.float32).reshape(1, 2, 1)
    out, s = K.gate_mul_forward(x, z)
    s1 = 1.0 / (1.0 + np.exp(-1.0))
    tail = cupy.asnumpy(out[0, 1, -3:]).astype(np.float64)
    np.testing.assert_allclose(tail, np.array([2.0, 3.0, 4.0]) * s1, rtol=1e-6)
    assert float(out[0, 0, -1]) == 0.5
    del out, s
    mx, arg = K.global_pool_forward(x, "max")
    assert int(arg[0, 1]) == L - 1 and float(mx[0, 1]) == 4.0
    dx = K.global_pool_backward(mx, "max", x.shape, arg=arg)
    assert float(dx[0, 1, -1]) == 4.0 and float(dx[0, 1, -2]) == 0.0
    assert dx.size == n


SANITIZED = "block32 or wired_op or cbam_launches"
"""The tests run under compute-sanitizer: every kernel with small blocks
(tails, grid-stride loops), every wired op, and the CBAM block."""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_kernels_under_compute_sanitizer(tool: str) -> None:
    """The command of docs/gpu.md: no memory error and no shared-memory race."""
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH (it comes with the CUDA toolkit)")
    if os.environ.get("REFATTN_GPU_NO_POOL") == "1":
        pytest.skip("already running under compute-sanitizer")
    cmd = [
        exe, f"--tool={tool}", "--error-exitcode=99", sys.executable, "-m", "pytest",
        "-q", "-x", "-p", "no:cacheprovider", "-m", "gpu", "-k", SANITIZED,
        str(Path(__file__)),
    ]
    env = dict(os.environ, REFATTN_GPU_NO_POOL="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                          cwd=Path(__file__).parents[2], timeout=3600)
    report = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout, report
