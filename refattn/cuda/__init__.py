"""Raw CUDA kernels for the memory-bound steps of the blocks, run through CuPy.

The kernel sources are the ``.cu`` files of this package (shipped as package
data).  They are compiled together as one module: ``refattn_common.h`` first,
then every file of ``KERNEL_FILES``, each preceded by a ``#line`` directive so
compiler messages name the right file and line (``module_source()``).  Every
kernel is a template over float and double, instantiated through the name
expressions of ``kernel_names()`` (``refattn_softmax_fwd<float>``, ...).

Nothing here imports CuPy at import time.  ``get_module()`` compiles the module
with ``cupy.RawModule`` on first use, once per device, with ``COMPILE_OPTIONS``
(the same tuple the NVRTC compile test of ``tests/cuda`` uses).  The launch
wrappers in ``refattn.cuda.launch`` take and return CuPy arrays.

The ops of ``refattn.ops`` (and CGNL's moments) use the kernels on CuPy
arrays through their override points (``refattn.ops.overrides``), into
which ``refattn.cuda.kernel_ops`` registers its kernel variants the first
time a CuPy array reaches one.  Kernels are used only where
``kernels_enabled()`` is true: the environment variable
``REFATTN_KERNELS=generic`` switches them off (the generic Array API path
runs instead, so the two can be compared), and so do
``set_kernels_enabled(False)`` and ``with use_kernels(False): ...``.

Testing tiers (docs/gpu.md): (1) NVRTC compiles every kernel on a machine
without a GPU; (2) a C++ host shim runs the same source on the CPU against
NumPy; (3) ``pytest -m gpu`` runs the launch wrappers on a real GPU.  Only
tier 3 certifies GPU behaviour.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import numpy

__all__ = [
    "COMPILE_OPTIONS",
    "DTYPES",
    "KERNELS",
    "KERNEL_FILES",
    "KERNEL_HEADER",
    "MAX_THREADS",
    "cupy_available",
    "defined_kernels",
    "get_function",
    "get_module",
    "kernel_name",
    "kernel_names",
    "kernels_enabled",
    "module_source",
    "read_source",
    "set_kernels_enabled",
    "use_kernels",
    "wants_kernels",
]

KERNEL_HEADER = "refattn_common.h"
"""Helpers included (textually, first) by every kernel file."""

KERNELS: dict[str, tuple[str, ...]] = {
    "pool.cu": (
        "refattn_channel_pool_fwd",
        "refattn_channel_pool_bwd",
        "refattn_global_avg_pool_fwd",
        "refattn_global_avg_pool_bwd",
        "refattn_global_max_pool_fwd",
        "refattn_global_max_pool_bwd",
        "refattn_global_lp_pool_fwd",
        "refattn_global_lp_pool_bwd",
        "refattn_global_lse_pool_fwd",
        "refattn_global_lse_pool_bwd",
    ),
    "gate.cu": (
        "refattn_gate_mul_channel_fwd",
        "refattn_gate_mul_channel_bwd",
        "refattn_gate_mul_spatial_fwd",
        "refattn_gate_mul_spatial_bwd",
    ),
    "softmax.cu": ("refattn_softmax_fwd", "refattn_softmax_bwd"),
    "max_pool.cu": ("refattn_max_pool_fwd", "refattn_max_pool_bwd"),
    "conv.cu": (
        "refattn_small_conv_fwd",
        "refattn_small_conv_dx_bwd",
        "refattn_small_conv_dw_bwd",
    ),
    "norm.cu": (
        "refattn_batch_norm_stats_fwd",
        "refattn_batch_norm_reduce_bwd",
        "refattn_group_norm_stats_fwd",
        "refattn_group_norm_reduce_bwd",
    ),
    "cgnl.cu": ("refattn_cgnl_moments_fwd", "refattn_cgnl_moments_bwd"),
}
"""Kernel file -> the kernel templates it defines."""

KERNEL_FILES: tuple[str, ...] = tuple(KERNELS)
"""The kernel sources, in module order."""

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--diag-suppress=20283,629")
"""NVRTC options of the module: used by get_module() and by the compile test.

CuPy adds the target architecture itself (and ``-ftz=true``,
``--device-as-default-execution-space``, ``--pch``); the compile test adds
``--gpu-architecture=...``.  Two warnings about CuPy's ``--pch`` are
silenced: 20283 ("PCH creation disabled because #line directive
encountered": module_source() keeps file names and lines with #line) and 629
(a precompiled header made with other options, e.g. for another
architecture, in the same process).  The module includes no headers, so
there is nothing to precompile.  No fast-math: results must stay comparable
with the NumPy path.
"""

DTYPES: dict[str, str] = {"float32": "float", "float64": "double"}
"""Array dtype name -> the C type of the template instantiation."""

MAX_THREADS = 256
"""Threads per block the row reductions support (REFATTN_MAX_THREADS)."""


# ---------------------------------------------------------------------------
# sources and names


def read_source(filename: str) -> str:
    """The text of one kernel file or the header, from the package data."""
    if filename != KERNEL_HEADER and filename not in KERNELS:
        raise ValueError(
            f"filename: expected {KERNEL_HEADER!r} or one of {list(KERNELS)}, "
            f"got {filename!r}"
        )
    return resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


@functools.cache
def module_source(files: tuple[str, ...] = KERNEL_FILES) -> str:
    """The exact text compiled as one module: the header, then `files`.

    Each part starts with ``#line 1 "<file>"`` so diagnostics (NVRTC's log,
    the host compiler's, sanitizer reports) point into the right file.  The
    ``#include "refattn_common.h"`` lines of the kernel files are guarded by
    ``#ifndef REFATTN_COMMON_H`` and so are skipped: no include path needed.
    """
    parts = []
    for name in (KERNEL_HEADER, *files):
        text = read_source(name)
        parts.append(f'#line 1 "{name}"\n{text}')
    return "\n".join(parts)


def kernel_name(base: str, dtype: Any) -> str:
    """The name expression of one instantiation: ``refattn_softmax_fwd<float>``."""
    try:
        dt = numpy.dtype(dtype).name
    except TypeError:
        dt = repr(dtype)
    if dt not in DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return f"{base}<{DTYPES[dt]}>"


def kernel_names(
    dtypes: tuple[str, ...] = ("float32", "float64"),
    files: tuple[str, ...] = KERNEL_FILES,
) -> list[str]:
    """Every name expression of the module (for RawModule's name_expressions)."""
    return [
        kernel_name(base, dt) for f in files for base in KERNELS[f] for dt in dtypes
    ]


_DEFINITION = re.compile(r"__global__\s+void\s+(refattn_\w+)\s*\(")


def defined_kernels(filename: str) -> list[str]:
    """Kernel templates a source file actually defines (checked against KERNELS)."""
    return _DEFINITION.findall(read_source(filename))


# ---------------------------------------------------------------------------
# the switch between raw kernels and the generic path

_ENV = "REFATTN_KERNELS"
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "refattn_kernels", default=None
)


def kernels_enabled() -> bool:
    """Whether CuPy inputs may take the raw-kernel path.

    ``set_kernels_enabled`` / ``use_kernels`` win; otherwise the environment
    variable ``REFATTN_KERNELS`` decides: ``generic`` forces the generic Array
    API path, ``auto`` (or unset, or empty) allows the kernels.
    """
    flag = _override.get()
    if flag is not None:
        return flag
    value = os.environ.get(_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return True
    if value == "generic":
        return False
    raise ValueError(f"{_ENV}: expected 'auto' or 'generic', got {value!r}")


def set_kernels_enabled(flag: bool | None) -> None:
    """Force the raw kernels on (True) or off (False); None defers to the env."""
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag: expected True, False or None, got {flag!r}")
    _override.set(flag)


@contextlib.contextmanager
def use_kernels(flag: bool) -> Iterator[None]:
    """``with use_kernels(False): ...`` runs the block on the generic path."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag: expected True or False, got {flag!r}")
    token = _override.set(flag)
    try:
        yield
    finally:
        _override.reset(token)


def wants_kernels(*arrays: Any) -> bool:
    """True when every given array is a CuPy array and kernels are enabled.

    The predicate of the kernel overrides (``kernel_ops.OVERRIDES``): cheap,
    and it never imports CuPy for NumPy or array_api_strict inputs.
    """
    arrays = tuple(a for a in arrays if a is not None)
    if not arrays or not all(type(a).__module__.startswith("cupy") for a in arrays):
        return False
    return kernels_enabled()


# ---------------------------------------------------------------------------
# compilation (CuPy, lazily)


def cupy_available() -> bool:
    """CuPy is importable and a CUDA device answers."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - a broken driver means "not available"
        return False


@functools.cache
def _module_for_device(device_id: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=module_source(),
            options=COMPILE_OPTIONS,
            name_expressions=kernel_names(),
        )


def get_module(device_id: int | None = None) -> Any:
    """The compiled ``cupy.RawModule`` for a device (default: the current one).

    Compiled on first use and memoized per device (CuPy also keeps its
    on-disk kernel cache).
    """
    if device_id is None:
        import cupy

        device_id = cupy.cuda.runtime.getDevice()
    return _module_for_device(int(device_id))


def get_function(base: str, dtype: Any, device_id: int | None = None) -> Any:
    """One compiled kernel instantiation, e.g. ``get_function("refattn_softmax_fwd",
    "float32")``."""
    return get_module(device_id).get_function(kernel_name(base, dtype))
