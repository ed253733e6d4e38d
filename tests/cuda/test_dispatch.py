"""Tier 2 of the kernel dispatch: the ops and blocks on CuPy arrays, without a GPU.

``cupy_standin.install`` makes ``cupy`` a NumPy-backed stand-in whose
``RawModule`` runs the kernels through the C++ host shim, so the ops see CuPy
arrays and take their raw-kernel path through the production code (the
override points of ``refattn.ops.overrides``, ``kernel_ops``, ``launch``,
``CupyRunner``, ``get_module``).  The checks themselves live in
dispatch_checks.py and run again on a real GPU in test_gpu.py (tier 3, which
alone certifies GPU behaviour).  The default runner uses 32 threads and at most 3 blocks here,
so reduction tails and grid-stride loops run; one test uses the GPU
defaults (256 threads, a full grid).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import refattn.cuda as rc
from refattn import backend
from refattn.blocks.registry import BLOCKS
from refattn.cuda import _runner
from refattn.ops import elementwise, pool

from cupy_standin import StandIn, install, to_device
from dispatch_checks import *  # noqa: F403 - the shared dispatch checks
from dispatch_checks import Gpu, _block_run, assert_close, recording
from shim_harness import ShimLibrary
from test_host_shim import _sanitizer_env, libasan  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def standin(shim_library: ShimLibrary) -> Iterator[StandIn]:
    with install(shim_library, block=32, max_grid=3) as s:
        yield s


@pytest.fixture
def gpu(standin: StandIn) -> Iterator[Gpu]:
    launched: list[str] = []
    with recording(launched):
        yield Gpu("stand-in", standin.compat, launched)


# ---------------------------------------------------------------------------
# the stand-in is CuPy as far as refattn can tell, and as strict as CuPy


def test_ops_see_cupy_arrays(standin: StandIn) -> None:
    x = to_device(np.ones((2, 3, 4, 5)))
    xp = backend.namespace(x=x)
    assert xp is standin.compat and backend.is_cupy(xp)
    assert rc.wants_kernels(x) and rc.cupy_available()
    assert isinstance(backend.to_host(x), np.ndarray)


def test_standin_refuses_host_arrays_like_cupy(standin: StandIn) -> None:
    x = to_device(np.ones((2, 3)))
    with pytest.raises(TypeError, match="NumPy array was mixed"):
        x + np.ones((2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(ValueError, match="device: expected a cupy.cuda.Device"):
        standin.compat.zeros((2,), device="cpu")


def test_module_is_built_once_from_module_source(standin: StandIn) -> None:
    """get_module() memoizes the RawModule; every launch goes through it, and
    the runner-level record equals the RawKernel-level one."""
    x = to_device(np.random.default_rng(0).standard_normal((2, 3, 5, 6)))
    launched: list[str] = []
    with recording(launched), standin.recording() as raw:
        for _ in range(2):
            out, cache = pool.global_pool_forward(x, kind="max")
            pool.global_pool_backward(out, cache)
    assert launched == [r.base for r in raw] == [
        "refattn_global_max_pool_fwd", "refattn_global_max_pool_bwd"
    ] * 2
    assert all(r.name.endswith("<double>") and r.block == 32 for r in raw)
    assert standin.modules_built == 1
    assert rc.get_module() is rc.get_module(0)


def test_default_launch_configuration(standin: StandIn,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole CBAM block with the GPU defaults: 256 threads, a full grid."""
    import array_api_compat.numpy as cnp

    runner = _runner.default_runner()
    monkeypatch.setattr(runner, "block", 256)
    monkeypatch.setattr(runner, "max_grid", 65535)
    spec = BLOCKS["cbam"]
    cfg = spec.config("jongchan")
    shapes = {"x": (2, 16, 17, 19)}
    params, state = spec.init_params(cfg, shapes, seed=0)
    rng = np.random.default_rng(0)
    host = {"inputs": {"x": rng.standard_normal(shapes["x"])}, "params": params,
            "state": state}
    cot = rng.standard_normal(shapes["x"])
    with standin.recording() as raw:
        got = _block_run(spec, cfg, host, cot, standin.compat)
    want = _block_run(spec, cfg, host, cot, cnp)
    assert raw and all(r.block == 256 for r in raw)
    assert max(r.grid for r in raw) > 3
    for key in want:
        assert_close(got[key], want[key], "float64", key)


def test_kernel_path_passes_gradcheck(standin: Any) -> None:
    """A direct finite-difference check of some kernel backwards (float64)."""
    from refattn.gradcheck import gradcheck_op

    rng = np.random.default_rng(5)
    x = to_device(rng.standard_normal((2, 3, 5, 4)))
    z = to_device(rng.standard_normal((2, 1, 5, 4)))
    cases = [
        (elementwise.gate_mul_forward, elementwise.gate_mul_backward,
         {"x": x, "z": z}, {}),
        (pool.global_pool_forward, pool.global_pool_backward, {"x": x},
         {"kind": "lse"}),
        (pool.channel_pool_forward, pool.channel_pool_backward, {"x": x},
         {"kind": "mean"}),
    ]
    for forward, backward, inputs, options in cases:
        report = gradcheck_op(forward, backward, inputs, options=options)
        assert report.ok, report.to_text()


# ---------------------------------------------------------------------------
# nothing changes on NumPy and array_api_strict


def test_numpy_and_strict_arrays_never_take_a_kernel(gpu: Gpu, xb: Any) -> None:
    """With CuPy importable and kernels enabled, the other namespaces still get
    the generic path (and the generic caches)."""
    from dispatch_checks import WIRED, _draw, _kernel_cache, _run

    for case in WIRED:
        host = _draw(case, "float64")
        _, _, cache, _ = _run(case, host, None, xb.asarray, xb.xp)
        assert not _kernel_cache(cache), case.id
    assert gpu.launched == []


def test_importing_the_ops_does_not_import_cupy() -> None:
    code = (
        "import sys, numpy as np, refattn.ops, refattn.blocks.registry\n"
        "from refattn.ops import softmax_forward\n"
        "softmax_forward(np.ones((2, 3)))\n"
        "assert 'cupy' not in sys.modules, 'cupy imported by the ops'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# sanitizers


def test_wired_ops_under_address_and_ub_sanitizers(libasan: str) -> None:
    """The wired-op checks (float64) again with the shim built with
    -fsanitize=address,undefined: the arguments the ops hand the kernels
    (strided planes, reshaped rows) stay in bounds."""
    if os.environ.get("REFATTN_SHIM_SANITIZE") == "1":
        pytest.skip("already running under the sanitizers")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
        "-k", "wired_op and float64", str(Path(__file__)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=_sanitizer_env(libasan), cwd=Path(__file__).parents[2],
                          check=False, timeout=300)
    report = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout, report
