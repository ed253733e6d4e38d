"""Tier 1: every kernel compiles with NVRTC, on a machine without a GPU.

NVRTC compiles without a device: ``cupy.cuda.nvrtc`` with the libnvrtc of the
``nvidia-cuda-nvrtc`` wheel (pinned to 13.0, the CUDA version of the target
driver; docs/gpu.md).  Each kernel file is compiled with exactly
``refattn.cuda.COMPILE_OPTIONS`` plus a target architecture, for the float and
the double instantiations, and the whole module (the text cupy.RawModule
compiles) for several architectures.  A failure shows NVRTC's log.

Skipped when NVRTC cannot be loaded, unless REFATTN_REQUIRE_NVRTC=1 (CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import pytest

import refattn.cuda as rc

TARGET_ARCH = "90"  # H100 / H200
MODULE_ARCHS = ("80", "90")  # A100 and H100 classes, cubin each
# what cupy.RawModule adds to COMPILE_OPTIONS with NVRTC 13 (besides -arch)
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space", "--pch")
DTYPES = ("float32", "float64")


def _load_nvrtc() -> Any:
    reason = None
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except ImportError as err:
        reason = f"cupy is not installed ({err})"
    except Exception as err:  # noqa: BLE001 - DynamicLibNotFoundError and kin
        reason = f"libnvrtc cannot be loaded ({type(err).__name__}: {err})"
    msg = (
        f"NVRTC unavailable: {reason}; "
        "pip install cupy-cuda13x 'nvidia-cuda-nvrtc==13.0.*'"
    )
    if os.environ.get("REFATTN_REQUIRE_NVRTC") == "1":
        pytest.fail(f"REFATTN_REQUIRE_NVRTC=1 but {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def nvrtc() -> Any:
    return _load_nvrtc()


class CompileError(AssertionError):
    """NVRTC refused a source; the message carries the compiler log."""


@dataclass
class Compiled:
    log: str
    lowered: dict[str, str]
    binary: bytes


def nvrtc_compile(
    nvrtc: Any,
    source: str,
    *,
    arch: str = TARGET_ARCH,
    names: list[str] | tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    ptx: bool = False,
    filename: str = "refattn_module.cu",
) -> Compiled:
    """Compile with COMPILE_OPTIONS + the arch; raise CompileError with the log."""
    target = f"--gpu-architecture={'compute' if ptx else 'sm'}_{arch}"
    options = [*rc.COMPILE_OPTIONS, target, *extra]
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as err:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC {err} with options {options}:\n{log}") from None
        log = nvrtc.getProgramLog(prog).strip("\x00").strip()
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        binary = nvrtc.getPTX(prog) if ptx else nvrtc.getCUBIN(prog)
        return Compiled(log, lowered, binary)
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------------------
# the kernels


def test_ptx_loadable_by_the_cuda_13_0_driver(nvrtc) -> None:
    """PTX .version must not exceed what a CUDA 13.0 driver accepts (9.0).

    CI pins nvidia-cuda-nvrtc==13.0.*: NVRTC 13.5 emits PTX 9.5, which the
    target machines' driver (580.x, CUDA 13.0) would refuse to load.
    """
    if tuple(nvrtc.getVersion()) != (13, 0):
        pytest.skip(f"NVRTC {nvrtc.getVersion()} is loaded, not the pinned 13.0")
    out = nvrtc_compile(
        nvrtc,
        rc.module_source(("softmax.cu",)),
        ptx=True,
        names=rc.kernel_names(files=("softmax.cu",)),
    )
    version = re.search(rb"^\.version (\d+)\.(\d+)", out.binary, re.M)
    assert version is not None
    assert (int(version[1]), int(version[2])) <= (9, 0), version[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filename", rc.KERNEL_FILES)
def test_kernel_file_compiles(nvrtc, filename, dtype) -> None:
    names = rc.kernel_names((dtype,), files=(filename,))
    out = nvrtc_compile(
        nvrtc, rc.module_source((filename,)), names=names, filename=filename
    )
    assert "warning" not in out.log.lower(), out.log
    assert set(out.lowered) == set(names)
    assert all(out.lowered.values()), out.lowered
    assert len(out.binary) > 0


@pytest.mark.parametrize("arch", MODULE_ARCHS)
def test_module_compiles_as_rawmodule_would(nvrtc, arch) -> None:
    """The module text, name expressions and options of refattn.cuda.get_module(),
    with the options CuPy adds."""
    if int(arch) not in nvrtc.getSupportedArchs():
        pytest.skip(f"NVRTC {nvrtc.getVersion()} does not target sm_{arch}")
    names = rc.kernel_names()
    extra = (*CUPY_ADDS, "-Xptxas=-v")
    out = nvrtc_compile(nvrtc, rc.module_source(), arch=arch, names=names, extra=extra)
    assert len(set(out.lowered.values())) == len(names)
    assert out.binary[:4] == b"\x7fELF"  # a cubin
    # resources reported by ptxas: no register spills, no stack
    blocks = re.findall(r"Function properties for (\w+)\s*\n\s*(.*)", out.log)
    assert len(blocks) >= len(names), out.log[-3000:]
    for mangled, props in blocks:
        assert "0 bytes stack frame" in props, (mangled, props)
        assert "0 bytes spill stores" in props, (mangled, props)
    assert "warning" not in out.log.lower(), out.log[-3000:]


# ---------------------------------------------------------------------------
# the check bites


def test_a_broken_source_fails_with_the_log(nvrtc) -> None:
    broken = rc.module_source(()) + (
        "template <typename T>\n"
        "__global__ void refattn_broken_fwd(T* y) { y[0] = nope; }\n"
    )
    with pytest.raises(CompileError) as info:
        nvrtc_compile(nvrtc, broken, names=["refattn_broken_fwd<float>"])
    assert 'identifier "nope" is undefined' in str(info.value)


def test_host_only_names_are_refused(nvrtc) -> None:
    """A kernel using a host header's constant (the DBL_MAX trap) must not pass
    here, even though a host build that includes <cfloat> would accept it."""
    src = rc.module_source(()) + (
        "template <typename T>\n"
        "__global__ void refattn_lowest_fwd(T* y) { y[0] = -DBL_MAX; }\n"
    )
    with pytest.raises(CompileError) as info:
        nvrtc_compile(nvrtc, src, names=["refattn_lowest_fwd<double>"])
    assert "DBL_MAX" in str(info.value)


def test_errors_point_into_the_right_file_and_line(nvrtc) -> None:
    """module_source() keeps file names and line numbers (#line) in the log."""
    text = rc.read_source("gate.cu")
    good = "out[i] = x[i] * g;"
    line = text[: text.index(good)].count("\n") + 1
    src = rc.module_source(("gate.cu",)).replace(good, "out[i] = x[i] * gg;", 1)
    with pytest.raises(CompileError) as info:
        nvrtc_compile(nvrtc, src, names=rc.kernel_names(files=("gate.cu",)))
    assert f'gate.cu({line}): error: identifier "gg" is undefined' in str(info.value)
