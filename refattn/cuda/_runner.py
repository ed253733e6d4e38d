"""Where the kernels run: a small runner interface and its CuPy implementation.

A runner knows its array module (``xp``: CuPy here; the host-shim runner of
the tests uses NumPy), its block size and a cap on the grid, and launches one
kernel instantiation with a tuple of arguments (arrays are passed as device
pointers, NumPy integer scalars as ``long long``).  The launch wrappers of
``refattn.cuda.launch`` only talk to this interface, so the tests run the
very same wrappers through the host shim on the CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy

from refattn.backend import prod
from refattn.cuda import MAX_THREADS, get_function

__all__ = [
    "CupyRunner",
    "Runner",
    "axis_index",
    "check_groups",
    "check_order",
    "check_shape",
    "default_runner",
    "elementwise_grid",
    "float_array",
    "i64",
    "index_array",
    "int_tuple",
    "nonempty",
    "positive",
    "prod",
    "row_grid",
    "same_dtype",
]


class Runner(Protocol):
    """What a launch wrapper needs from the place the kernels run."""

    xp: Any  # the array module of inputs and outputs
    block: int  # threads per block, 1..MAX_THREADS
    max_grid: int  # at most this many blocks per launch (grid-stride beyond)

    def launch(self, base: str, dtype: Any, grid: int, args: tuple[Any, ...]) -> None:
        """Run ``<base><T>`` with T from `dtype` on `grid` blocks of `block`."""
        ...


class CupyRunner:
    """Runs the kernels of ``refattn.cuda.get_module()`` on a CUDA device.

    The launch happens on the device of the first array argument, with that
    device's compiled module.
    """

    block = 256
    max_grid = 65535

    @property
    def xp(self) -> Any:
        import cupy

        return cupy

    def launch(self, base: str, dtype: Any, grid: int, args: tuple[Any, ...]) -> None:
        import cupy

        arrays = [a for a in args if isinstance(a, cupy.ndarray)]
        dev = arrays[0].device if arrays else cupy.cuda.Device()
        with dev:
            fn = get_function(base, dtype, dev.id)
            fn((int(grid),), (int(self.block),), args)


@functools.cache
def default_runner() -> CupyRunner:
    """The runner used when a wrapper gets none: CuPy on the current device."""
    return CupyRunner()


def elementwise_grid(runner: Runner, n: int) -> int:
    """Blocks for a grid-stride loop over `n` items."""
    _check_block(runner)
    return max(1, min(-(-n // runner.block), runner.max_grid))


def row_grid(runner: Runner, rows: int) -> int:
    """Blocks for a one-block-per-row kernel over `rows` rows."""
    _check_block(runner)
    return max(1, min(rows, runner.max_grid))


def i64(v: int) -> numpy.int64:
    """A kernel's ``long long`` argument."""
    return numpy.int64(v)


def _check_block(runner: Runner) -> None:
    if not 1 <= runner.block <= MAX_THREADS:
        raise ValueError(
            f"runner.block: expected 1..{MAX_THREADS} threads, got {runner.block}"
        )


# ---------------------------------------------------------------------------
# argument checks shared by the launch wrappers


def float_array(
    runner: Runner, name: str, a: Any, *, ndim: int | tuple[int, int] | None = None
) -> Any:
    """`a` as a C-contiguous float32/float64 array of the runner's module.

    ``ndim`` is an exact rank or an inclusive (low, high) range.
    """
    xp = runner.xp
    if not isinstance(a, xp.ndarray):
        raise TypeError(
            f"{name}: expected a {xp.__name__} array, "
            f"got {type(a).__module__}.{type(a).__qualname__}"
        )
    if a.dtype.name not in ("float32", "float64"):
        raise TypeError(
            f"{name}: expected dtype float32 or float64, got {a.dtype.name}"
        )
    if ndim is not None:
        low, high = (ndim, ndim) if isinstance(ndim, int) else ndim
        if not low <= a.ndim <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise ValueError(f"{name}: expected a {want}-D array, got shape {a.shape}")
    return xp.ascontiguousarray(a)


def index_array(runner: Runner, name: str, a: Any, shape: tuple[int, ...]) -> Any:
    """`a` as a C-contiguous int64 array of exactly `shape`."""
    xp = runner.xp
    if not isinstance(a, xp.ndarray) or a.dtype.name != "int64":
        got = a.dtype.name if isinstance(a, xp.ndarray) else type(a).__qualname__
        raise TypeError(f"{name}: expected an int64 {xp.__name__} array, got {got}")
    check_shape(name, a, shape)
    return xp.ascontiguousarray(a)


def check_shape(name: str, a: Any, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")


def same_dtype(**arrays: Any) -> Any:
    """The one dtype shared by the arrays (refattn never promotes)."""
    dts = {k: v.dtype for k, v in arrays.items()}
    if len(set(dts.values())) > 1:
        listing = ", ".join(f"{k}={v.name}" for k, v in dts.items())
        raise TypeError(f"all arrays must share one dtype, got {listing}")
    return next(iter(dts.values()))


def nonempty(name: str, n: int, what: str) -> None:
    """Refuse a reduction over nothing (a max of no values is undefined)."""
    if n == 0:
        raise ValueError(f"{name}: expected at least one of the reduced {what}, got 0")


def positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def check_groups(num_groups: Any, channels: int) -> int:
    g = positive("num_groups", num_groups)
    if channels % g:
        raise ValueError(
            f"num_groups: expected a divisor of the channel count C={channels}, got {g}"
        )
    return g


def check_order(q: Any, highest: int) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= highest:
        raise ValueError(f"order: expected an int in 0..{highest}, got {q!r}")
    return q


def axis_index(axis: Any, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an int in [{-ndim}, {ndim}), got {axis!r}")
    return axis % ndim


def int_tuple(name: str, v: Any, n: int) -> tuple[int, ...]:
    """An int or n ints, all >= 1, as an n-tuple."""
    out = (v,) * n if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(out) != n or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in out
    ):
        raise ValueError(
            f"{name}: expected a positive int or {n} positive ints, got {v!r}"
        )
    return out
