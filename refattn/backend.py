"""The array namespace: the one module (besides ``refattn/cuda``) that knows
which array libraries exist.

Everything in ``refattn.ops`` and ``refattn.blocks`` is written against the
Python Array API standard.  A public entry point resolves the namespace once,

    xp = namespace(x=x, weight=weight)

and uses only ``xp.*`` functions plus the few helpers below that the standard
lacks (zero padding, strided windows for scatter-adds, a stable sigmoid,
``sum_to_shape``).  NumPy arrays run through ``array_api_compat.numpy``,
CuPy arrays through ``array_api_compat.cupy``; the test suite also runs
everything under ``array_api_strict`` with arrays on a non-default device.

Random numbers are always drawn on the host with
``numpy.random.default_rng(seed)`` in float64 and then moved to the target
namespace, so NumPy and CuPy runs see bit-identical inputs.

Dtype policy: refattn computes in float32 or float64 only.  Every floating
argument of one call must share a dtype (no silent promotion), integer,
boolean and complex arrays are refused with a ``TypeError`` naming the
argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import array_api_compat
import numpy as np

from refattn._typing import Array, Shape

__all__ = [
    "FLOAT_DTYPES",
    "NonFiniteError",
    "accumulate",
    "add_along_axis",
    "add_into",
    "as_tuple",
    "check_array",
    "check_finite",
    "check_into",
    "check_same_dtype",
    "device",
    "dtype_name",
    "from_host",
    "host_rng",
    "is_cupy",
    "is_numpy",
    "namespace",
    "operands_checked",
    "pad_spatial",
    "prod",
    "route_along_axis",
    "screen_finite",
    "sum_product_to_shape",
    "sum_to_shape",
    "to_host",
    "unpad_spatial",
    "window",
    "zeros_like_shape",
]

FLOAT_DTYPES = ("float32", "float64")


# ---------------------------------------------------------------------------
# namespace resolution


def namespace(*arrays: Any, **named: Any) -> Any:
    """Return the Array API namespace shared by the given arrays.

    Positional and keyword arrays are both accepted; keyword names are used in
    error messages.  ``None`` and Python scalars are ignored.

    Raises:
        TypeError: an argument is not an array of a supported library, or the
            arrays come from different libraries or devices.
    """
    if _all_ndarrays(arrays, named):  # the common case, without the generic walk
        return _NUMPY
    items = [(f"argument {i}", a) for i, a in enumerate(arrays)] + list(named.items())
    found = []
    for name, a in items:
        if a is None or isinstance(a, (bool, int, float)):
            continue
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(
                f"{name}: expected an array (numpy, cupy or an Array API array), "
                f"got {type(a).__module__}.{type(a).__qualname__}"
            )
        found.append((name, a))
    if not found:
        given = ", ".join(f"{n}: {type(a).__name__}" for n, a in items) or "nothing"
        raise TypeError(f"expected at least one array argument, got {given}")
    try:
        return array_api_compat.array_namespace(*(a for _, a in found))
    except TypeError as err:
        kinds = ", ".join(f"{n}: {type(a).__module__}" for n, a in found)
        raise TypeError(f"arrays from different libraries were mixed ({kinds})") from err


_NUMPY = array_api_compat.array_namespace(np.empty(0))


def _all_ndarrays(arrays: tuple[Any, ...], named: dict[str, Any]) -> bool:
    """True when every non-None argument is a plain NumPy ndarray (and one is)."""
    seen = False
    for a in (*arrays, *named.values()):
        if type(a) is np.ndarray:
            seen = True
        elif a is not None:
            return False
    return seen


def is_numpy(xp: Any) -> bool:
    """True for NumPy (plain or through array_api_compat)."""
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp: Any) -> bool:
    """True for CuPy (plain or through array_api_compat)."""
    return array_api_compat.is_cupy_namespace(xp)


def device(a: Array) -> Any:
    """The device of `a` (``"cpu"`` for NumPy)."""
    return array_api_compat.device(a)


# ---------------------------------------------------------------------------
# host <-> namespace


def host_rng(seed: int) -> np.random.Generator:
    """The one random generator refattn uses: PCG64 through default_rng."""
    return np.random.default_rng(seed)


def to_host(a: Array) -> np.ndarray:
    """Copy an array of any supported namespace to a NumPy ndarray.

    For emission, reports and tests only; never called inside ops.
    """
    if isinstance(a, np.ndarray):
        return a
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy()
    xp = namespace(a)
    if "array_api_strict" in getattr(xp, "__name__", ""):
        # array_api_strict refuses __array__ off its default device: copy there.
        cpu = xp.asarray(a, device=xp.__array_namespace_info__().default_device())
        return np.asarray(cpu)
    return np.asarray(a)


def from_host(a: np.ndarray, xp: Any, *, device: Any = None) -> Array:
    """Move a host array into namespace `xp` (on `device` when given)."""
    if is_numpy(xp):
        return np.asarray(a)
    if device is None:
        return xp.asarray(a)
    if "array_api_strict" in getattr(xp, "__name__", ""):
        default = xp.__array_namespace_info__().default_device()
        return xp.asarray(xp.asarray(a, device=default), device=device)
    return xp.asarray(a, device=device)


# ---------------------------------------------------------------------------
# validation and dtype policy


_NUMPY_DTYPE_NAMES = {np.dtype(n): n for n in ("float32", "float64")}
_NUMPY_DTYPE_TYPES = tuple({type(d) for d in _NUMPY_DTYPE_NAMES})


def dtype_name(a: Array) -> str:
    """'float32', 'float64', 'int64', ... for any namespace's array."""
    dt = a.dtype
    # numpy's dtype.name is Python code: look the float dtypes up instead
    if type(dt) in _NUMPY_DTYPE_TYPES and dt in _NUMPY_DTYPE_NAMES:
        return _NUMPY_DTYPE_NAMES[dt]
    name = getattr(dt, "name", None)
    if isinstance(name, str):
        return name
    return str(dt).split(".")[-1].strip("'>")


def check_array(
    name: str,
    a: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Shape | None = None,
) -> None:
    """Refuse anything that is not a float32/float64 array of the right rank.

    ``shape`` entries of ``-1`` match any size.
    """
    numpy_float = type(a) is np.ndarray and a.dtype in _NUMPY_DTYPE_NAMES
    if not numpy_float:  # the generic lookups, skipped in the common case
        if not array_api_compat.is_array_api_obj(a) or isinstance(a, (bool, int, float)):
            raise TypeError(
                f"{name}: expected a float32 or float64 array, "
                f"got {type(a).__module__}.{type(a).__qualname__}"
            )
        dt = dtype_name(a)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float32 or float64, got {dt}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if a.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{name}: expected a {want}-D array, got shape {tuple(a.shape)}"
            )
    if shape is not None and tuple(shape) != tuple(a.shape):
        if len(shape) != a.ndim or any(
            s != -1 and s != t for s, t in zip(shape, a.shape)
        ):
            want = "(" + ", ".join("*" if s == -1 else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(a.shape)}")


def check_same_dtype(**arrays: Any) -> str:
    """All non-None arrays share one float dtype; return its name."""
    dtypes = {a.dtype for a in arrays.values() if a is not None}
    if len(dtypes) == 1:
        for a in arrays.values():
            if a is not None:
                return dtype_name(a)
    names = {k: dtype_name(v) for k, v in arrays.items() if v is not None}
    dts = set(names.values())
    if len(dts) > 1:
        listing = ", ".join(f"{k}={v}" for k, v in names.items())
        raise TypeError(
            f"all arrays must share one dtype (refattn never promotes), got {listing}"
        )
    return dts.pop()


class NonFiniteError(ValueError):
    """An array holds NaN or +-Inf (raised by ``check_finite``).

    A subclass of ValueError, so callers need not know it; the block contract
    (``refattn.blocks.spec.BlockSpec``) uses it to tell a non-finite argument
    from a finite one that overflowed inside the computation.
    """


_SMALL = 4096  # arrays up to this size are screened element by element


def check_finite(name: str, a: Array) -> None:
    """Refuse NaN and +-Inf, reporting how many elements are bad.

    One reduction screens first (any NaN or Inf makes it non-finite); only
    then, or if the reduction overflowed, is every element looked at, so valid
    inputs cost a single pass.  A NumPy array of at most ``_SMALL`` elements
    is tested element by element at once: at that size the screen's fixed
    costs (an error-state context, a BLAS call) exceed the test itself.
    """
    xp = namespace(a)
    if type(a) is np.ndarray and a.size <= _SMALL:
        if np.isfinite(a).all():  # small: one elementwise test, nothing can overflow
            return
    else:
        with np.errstate(all="ignore"):  # NaN/Inf in the screen are the signal
            if bool(xp.isfinite(_screen(xp, a))):
                return
    ok = xp.isfinite(a)
    if not bool(xp.all(ok)):
        bad = int(xp.sum(xp.astype(xp.logical_not(ok), xp.int64)))
        raise NonFiniteError(
            f"{name}: expected finite values, got {bad} NaN/Inf of {_size(a)} elements"
        )


_OPERANDS_CHECKED: ContextVar[bool] = ContextVar("refattn_operands_checked", default=False)


@contextlib.contextmanager
def operands_checked() -> Iterator[None]:
    """Inside this context, ops skip their finiteness screens (``screen_finite``).

    A block checks its own arguments once, names them in its errors, and its
    results are checked on the way out (``refattn.blocks.spec``); a NaN or Inf
    born inside, an overflow, reaches those results and is reported there.
    Screening every operand of every op again costs one pass over memory per
    operand: 10-20% of a block's time.
    """
    token = _OPERANDS_CHECKED.set(True)
    try:
        yield
    finally:
        _OPERANDS_CHECKED.reset(token)


def screen_finite(name: str, a: Array) -> None:
    """An op's check of an operand: ``check_finite`` unless the caller already
    checked (inside ``operands_checked()``)."""
    if not _OPERANDS_CHECKED.get():
        check_finite(name, a)


def _screen(xp: Any, a: Array) -> Array:
    """A scalar that is finite when `a` holds no NaN/Inf (unless it overflows).

    A contiguous NumPy array takes Σ a² through BLAS (both cores, half the
    time of ``np.sum`` in float64); anything else takes ``xp.sum``.  A NumPy
    broadcast view is screened on one slice of each stride-0 axis, which holds
    every distinct element (gap's input gradient is such a view).
    """
    if type(a) is np.ndarray:
        if 0 in a.strides:
            a = a[tuple(slice(0, 1) if st == 0 else slice(None) for st in a.strides)]
        if a.flags.c_contiguous:
            flat = a.reshape(-1)
            return np.dot(flat, flat)
    return xp.sum(a)


def prod(values: Any) -> int:
    """The product of a shape's (or any) integers, as a Python int (1 for ())."""
    n = 1
    for v in values:
        n *= int(v)
    return n


def _size(a: Array) -> int:
    return prod(a.shape)


def as_tuple(name: str, value: int | Sequence[int], n: int, *, minimum: int = 0) -> tuple[int, ...]:
    """Expand an int or a length-n sequence of ints to an n-tuple, validated."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or {n} ints, got {value!r}")
    if isinstance(value, int):
        out = (value,) * n
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise TypeError(f"{name}: expected an int or {n} ints, got {value!r}") from None
        if len(out) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
            raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return out


# ---------------------------------------------------------------------------
# helpers the standard lacks


def sum_to_shape(g: Array, shape: Shape) -> Array:
    """Reverse of broadcasting: sum `g` down to `shape`.

    Sums the leading axes `g` has in front of `shape`, and every axis where
    `shape` is 1 but `g` is not.  Every backward whose forward broadcast an
    operand undoes it with this function and nothing ad hoc.
    """
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    xp = namespace(g)
    axes = _summed_axes(tuple(g.shape), shape)
    summed = xp.sum(g, axis=axes, keepdims=True) if axes else g
    return xp.reshape(summed, shape)


def _summed_axes(g_shape: Shape, shape: Shape) -> tuple[int, ...]:
    """The axes of `g_shape` that broadcasting to it from `shape` added or
    stretched: the leading extra ones, and every axis where `shape` is 1."""
    extra = len(g_shape) - len(shape)
    return tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and g_shape[extra + i] != 1
    )


_EINSUM_TERMS = 4096  # the longest reduction sum_product_to_shape hands to einsum


def sum_product_to_shape(a: Array, b: Array, shape: Shape) -> Array:
    """``sum_to_shape(a * b, shape)`` for `a`, `b` of one shape, without the
    full-size product where the namespace allows.

    NumPy contracts with ``np.einsum``, one pass that multiplies and sums
    (half the time of the product and the sum at CBAM's spatial-gate
    shape), when each output sums at most ``_EINSUM_TERMS`` products:
    einsum accumulates in a few running sums, and longer reductions keep
    the pairwise summation of ``xp.sum``.  Other namespaces multiply, then
    sum.
    """
    shape = tuple(shape)
    if (
        type(a) is not np.ndarray
        or type(b) is not np.ndarray
        or a.shape != b.shape
        or a.size > _EINSUM_TERMS * max(prod(shape), 1)
    ):
        return sum_to_shape(a * b, shape)
    summed = _summed_axes(a.shape, shape)
    letters = "abcdefghijklmnopqrstuvwxyz"[: a.ndim]
    kept = "".join(v for i, v in enumerate(letters) if i not in summed)
    return np.reshape(np.einsum(f"{letters},{letters}->{kept}", a, b), shape)


def zeros_like_shape(ref: Array, shape: Shape) -> Array:
    """Zeros of `shape` with the dtype and device of `ref`."""
    xp = namespace(ref)
    return xp.zeros(tuple(shape), dtype=ref.dtype, device=device(ref))


def pad_spatial(x: Array, padding: Sequence[int]) -> Array:
    """Zero-pad the trailing ``len(padding)`` axes symmetrically.

    ``padding[i]`` zeros go before and after trailing axis ``i``.
    """
    if not any(padding):
        return x
    lead = x.ndim - len(padding)
    shape = tuple(x.shape[:lead]) + tuple(
        s + 2 * p for s, p in zip(x.shape[lead:], padding)
    )
    out = zeros_like_shape(x, shape)
    inner = (slice(None),) * lead + tuple(
        slice(p, p + s) for s, p in zip(x.shape[lead:], padding)
    )
    out[inner] = x
    return out


def unpad_spatial(x: Array, padding: Sequence[int]) -> Array:
    """The adjoint of pad_spatial: crop the padding away again."""
    if not any(padding):
        return x
    lead = x.ndim - len(padding)
    inner = (slice(None),) * lead + tuple(
        slice(p, s - p) for s, p in zip(x.shape[lead:], padding)
    )
    return x[inner]


def window(start: int, step: int, count: int) -> slice:
    """``start, start+step, ..., start+step*(count-1)`` as an in-bounds slice.

    array_api_strict refuses slice stops past the end, so the stop is the last
    index plus one rather than ``start + step*count``.
    """
    return slice(start, start + step * (count - 1) + 1, step)


def accumulate(dst: Array, index: tuple[slice, ...], src: Array) -> None:
    """``dst[index] += src`` on an array the caller allocated itself.

    Scatter-adding into a fresh gradient buffer through a strided slice (no
    index repeats within one slice, so it is exact); the adjoints of im2col
    and pooling use it.  In-place updates are only ever made on arrays the
    function itself allocated, never on arguments or caches.
    """
    dst[index] += src


def check_into(into: Array | None, x_shape: Shape, dout: Array) -> None:
    """The optional ``into`` of a backward: None, or an array of x's shape and
    dout's dtype that the caller owns and lets the backward add dx into."""
    if into is None:
        return
    check_array("into", into, shape=tuple(x_shape))
    check_array("dout", dout)
    check_same_dtype(into=into, dout=dout)


def add_into(into: Array | None, dx: Array) -> Array:
    """dx, or `into` + dx accumulated in place into the caller's array."""
    if into is None:
        return dx
    into += dx
    return into


def add_along_axis(total: Array, idx: Array, values: Array, axis: int) -> Array:
    """Add ``values`` into `total` at positions ``idx`` along `axis`, in place.

    ``total[..., idx[..., 0, ...], ...] += values[..., 0, ...]``, where `values`
    and `idx` have length 1 along `axis`: a max's gradient routed into a
    gradient the caller is building (and owns).  NumPy reads and writes only
    the indexed entries (``np.take_along_axis`` / ``np.put_along_axis``);
    other namespaces add the dense routed array.  Returns `total`.
    """
    if type(total) is np.ndarray:
        at = np.astype(idx, np.intp)
        np.put_along_axis(total, at, np.take_along_axis(total, at, axis=axis) + values,
                          axis=axis)
        return total
    total += route_along_axis(values, idx, axis, int(total.shape[axis]))
    return total


def route_along_axis(values: Array, idx: Array, axis: int, size: int) -> Array:
    """Place ``values`` at positions ``idx`` of a new zero axis of length `size`.

    ``out[..., j, ...] = values[..., 0, ...] if j == idx[..., 0, ...] else 0``
    along `axis`, where `values` and `idx` have length 1 there: the gradient of
    a max, routed to its arg-max.  NumPy writes the few values into zeros
    (``np.put_along_axis``: one pass, 3-4x faster than building the dense
    comparison); other namespaces compare positions and select.
    """
    xp = namespace(values=values)
    shape = list(values.shape)
    shape[axis] = size
    if type(values) is np.ndarray:
        out = np.zeros(tuple(shape), dtype=values.dtype)
        np.put_along_axis(out, np.astype(idx, np.intp), values, axis=axis)
        return out
    at = [1] * values.ndim
    at[axis] = size
    positions = xp.arange(size, dtype=idx.dtype, device=device(idx))  # (size,)
    positions = xp.reshape(positions, tuple(at))  # size along `axis`
    return xp.where(positions == idx, values, 0.0)

