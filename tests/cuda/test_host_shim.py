"""Tier 2: the CUDA kernels run on the CPU through the C++ host shim.

The exact text cupy.RawModule compiles is built with a C++20 compiler against
tests/cuda/shim/cuda_host_shim.h (shim_harness.py), and the launch wrappers of
refattn.cuda.launch drive it with NumPy arrays.  The kernel checks themselves
live in kernel_checks.py (shared with the GPU tier): every kernel against a
plain float64 NumPy reference, here with blocks of 32 and 48 threads and at
most 3 blocks, so reduction tails and grid-stride loops are exercised.  The
same checks run once more under AddressSanitizer and UBSan.

What this does not show: warp behaviour, concurrency between blocks, the GPU
memory model and launch limits -- only a GPU run (tests/cuda/test_gpu.py)
certifies those.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refattn.cuda as rc
from refattn.cuda import launch as K

from shim_harness import ShimLibrary, build_shim, find_cxx
from kernel_checks import *  # noqa: F403 - the shared kernel checks
from kernel_checks import Bound, normal


@pytest.fixture(params=[32, 48], ids=["block32", "block48"])
def k(shim_library: ShimLibrary, request: pytest.FixtureRequest) -> Bound:
    """The launch wrappers on the host shim: a small block (a power of two, and
    not) and a grid of at most 3 blocks."""
    return Bound(shim_library.runner(block=request.param, max_grid=3))


# ---------------------------------------------------------------------------
# the build itself


def test_every_kernel_is_in_the_shim_build(shim_library: ShimLibrary) -> None:
    assert sorted(shim_library.kernels) == sorted(rc.kernel_names())


def test_kernel_table_matches_the_sources() -> None:
    for f in rc.KERNEL_FILES:
        assert rc.defined_kernels(f) == list(rc.KERNELS[f]), f


def test_header_constants_match_python() -> None:
    head = rc.read_source(rc.KERNEL_HEADER)
    assert f"#define REFATTN_MAX_THREADS {rc.MAX_THREADS}\n" in head
    assert f"#define REFATTN_CGNL_MAX_ORDER {K.CGNL_MAX_ORDER}\n" in head


def test_host_build_has_no_warnings(shim_library: ShimLibrary) -> None:
    """-Wall -Wextra -Wconversion -Wsign-conversion -Wshadow over the kernels:
    a 64-bit index narrowed to int, sign mix-ups, unused values."""
    log = (shim_library.path.parent / "build.log").read_text()
    assert "warning" not in log, log


def test_runner_checks_argument_types(shim_library: ShimLibrary) -> None:
    """The shim refuses what a GPU launch would silently misread."""
    r = shim_library.runner()
    x = np.zeros((2, 3), np.float32)
    out = np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="expected float32, got float64"):
        r.launch(
            "refattn_global_avg_pool_fwd",
            np.float32,
            1,
            (x.astype(np.float64), out, np.int64(2), np.int64(3)),
        )
    with pytest.raises(TypeError, match="expected a int64 scalar, got int"):
        r.launch("refattn_global_avg_pool_fwd", np.float32, 1, (x, out, 2, np.int64(3)))
    with pytest.raises(TypeError, match="expected 4 arguments"):
        r.launch("refattn_global_avg_pool_fwd", np.float32, 1, (x, out, np.int64(2)))


def test_wrappers_do_not_mutate_inputs(shim_library) -> None:
    shim = shim_library.runner()
    rng = np.random.default_rng(13)
    x = normal(rng, (2, 3, 5, 7), np.float64)
    z = normal(rng, (2, 1, 5, 7), np.float64)
    before = (x.copy(), z.copy())
    out, s = K.gate_mul_forward(x, z, runner=shim)
    K.gate_mul_backward(out, x, s, runner=shim)
    K.softmax_forward(x, axis=1, runner=shim)
    K.channel_pool_forward(x, runner=shim)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(z, before[1])


# ---------------------------------------------------------------------------
# sanitizers


def _libasan(cxx: str) -> str | None:
    proc = subprocess.run(
        [cxx, "-print-file-name=libasan.so"],
        capture_output=True,
        text=True,
        check=False,
    )
    path = proc.stdout.strip()
    return path if proc.returncode == 0 and os.path.isabs(path) else None


def _sanitizer_env(libasan: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        REFATTN_SHIM_SANITIZE="1",
    )
    return env


@pytest.fixture(scope="module")
def libasan() -> str:
    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) found: sanitizer build needs one")
    path = _libasan(cxx)
    if path is None:
        pytest.skip(f"{cxx} has no libasan.so (-print-file-name=libasan.so)")
    return path


def test_kernels_under_address_and_ub_sanitizers(libasan) -> None:
    """This file's kernel tests again, built with -fsanitize=address,undefined."""
    if os.environ.get("REFATTN_SHIM_SANITIZE") == "1":
        pytest.skip("already running under the sanitizers")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-k",
        "not sanitizer and not planted and block32",
        str(Path(__file__)),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=_sanitizer_env(libasan),
        cwd=Path(__file__).parents[2],
        check=False,
        timeout=300,
    )
    report = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout, report


PLANTED_OVERFLOW = r"""
template <typename T>
__global__ void refattn_planted_fwd(const T* __restrict__ x, T* __restrict__ y,
                                    long long n) {
    for (long long i = refattn_gid(); i <= n; i += refattn_gstride()) y[i] = x[i];
}
"""


def test_planted_overflow_is_caught(libasan, tmp_path) -> None:
    """A missing bounds check (i <= n) must be reported by AddressSanitizer."""
    src = rc.module_source(()) + PLANTED_OVERFLOW
    lib = build_shim(tmp_path, source=src, sanitize=True)
    script = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from shim_harness import ShimLibrary\n"
        f"L = ShimLibrary(__import__('pathlib').Path({str(lib)!r}))\n"
        "x = np.ones(37); y = np.empty(37)\n"
        "L.call('refattn_planted_fwd<double>', 2, 32, (x, y, np.int64(37)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_sanitizer_env(libasan),
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "refattn_planted_fwd" in proc.stderr, proc.stderr[-3000:]
