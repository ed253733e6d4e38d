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

import operator
from collections.abc import Sequence
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
    "all_finite",
    "as_int",
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
    "matmul",
    "mean_last_axis",
    "namespace",
    "pad_spatial",
    "prod",
    "route_along_axis",
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
    if _all_plain_numpy((*arrays, *named.values())):
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


def _all_plain_numpy(arrays: tuple[Any, ...]) -> bool:
    """True when every non-None argument is a plain NumPy ndarray, and one is.

    Their namespace is then ``array_api_compat``'s NumPy namespace, the one
    the generic walk of ``namespace`` would find, found without the walk.
    """
    seen = False
    for a in arrays:
        if _is_plain_numpy(a):
            seen = True
        elif a is not None:
            return False
    return seen


def _is_plain_numpy(a: Any) -> bool:
    """True when `a` is exactly a ``numpy.ndarray`` (no subclass, no other
    library's array): the one test behind every NumPy-only route of this
    module.  Each such route lives inside a named function that computes the
    same thing on every namespace and is tested against its plain formula
    (``tests/test_backend.py``); what each saves is in docs/benchmarks.md.
    """
    return type(a) is np.ndarray


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


_NUMPY_FLOAT_NAMES = {np.dtype(n): n for n in FLOAT_DTYPES}


def _numpy_float_name(a: Any) -> str | None:
    """'float32' or 'float64' when `a` is a plain NumPy array of that dtype,
    else None (the caller then asks the generic way).

    A dictionary look-up: NumPy computes ``dtype.name`` anew on every access.
    """
    return _NUMPY_FLOAT_NAMES.get(a.dtype) if _is_plain_numpy(a) else None


def dtype_name(a: Array) -> str:
    """'float32', 'float64', 'int64', ... for any namespace's array."""
    known = _numpy_float_name(a)
    if known is not None:
        return known
    dt = a.dtype
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
    if _numpy_float_name(a) is None:  # else a float NumPy array: nothing to look up
        if isinstance(a, (np.matrix, np.ma.MaskedArray)):
            raise TypeError(  # their arithmetic differs from an array's
                f"{name}: expected a plain float32 or float64 array, got the ndarray "
                f"subclass {type(a).__module__}.{type(a).__qualname__} (convert it "
                f"with numpy.asarray, after filling any masked values)"
            )
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


def check_finite(name: str, a: Array) -> None:
    """Refuse NaN and +-Inf, reporting how many elements are bad."""
    if all_finite(a):
        return
    xp = namespace(a)
    bad = int(xp.sum(xp.astype(xp.logical_not(xp.isfinite(a)), xp.int64)))
    raise NonFiniteError(
        f"{name}: expected finite values, got {bad} NaN/Inf of {_size(a)} elements"
    )


# The size up to which all_finite tests a plain NumPy array element by element
# at once, rather than screening it with one reduction first: below it the
# screen's fixed costs (an error-state context, a BLAS call) exceed the test
# itself (docs/benchmarks.md, "The screen itself is cheaper").
_ISFINITE_WITHOUT_SCREEN_UP_TO = 4096


def all_finite(a: Array) -> bool:
    """True when `a` holds no NaN and no +-Inf: ``bool(xp.all(xp.isfinite(a)))``.

    Finite arrays are the common case, so one reduction screens first: a NaN
    or an Inf makes ``_finite_screen(a)`` non-finite, and only a non-finite
    screen (a NaN/Inf, or finite values whose screen overflowed) is followed
    by the element-by-element test.  A finite array thus costs one pass.  A
    plain NumPy array of at most ``_ISFINITE_WITHOUT_SCREEN_UP_TO`` elements
    takes the element-by-element test alone.
    """
    xp = namespace(a)
    if _is_plain_numpy(a) and a.size <= _ISFINITE_WITHOUT_SCREEN_UP_TO:
        return bool(np.isfinite(a).all())
    with np.errstate(all="ignore"):  # NaN/Inf in the screen are the signal
        if bool(xp.isfinite(_finite_screen(xp, a))):
            return True
    return bool(xp.all(xp.isfinite(a)))


def _finite_screen(xp: Any, a: Array) -> Array:
    """A scalar that is NaN or +-Inf when `a` holds a NaN or an Inf (and may
    be +Inf when finite values overflow it).

    A plain NumPy array gives Σ a² (one BLAS ``dot``, which uses every core)
    when it is C-contiguous after reducing each stride-0 (broadcast) axis to
    one slice, which holds every distinct element; otherwise the screen is
    Σ a (``xp.sum``).  Squares are never negative, so a +Inf term cannot be
    cancelled by a -Inf one.
    """
    if _is_plain_numpy(a):
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


def as_int(name: str, value: Any, expected: str) -> int:
    """`value` as a Python int (NumPy integers too, never a bool), or a
    TypeError "<name>: expected <expected>, got <value>"."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name}: expected {expected}, got {value!r}")


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


# The longest sum per output that sum_product_to_shape hands to np.einsum:
# einsum adds in a few running sums, whose rounding error grows with the
# number of terms, where ``xp.sum`` sums pairwise; past this length the
# pairwise sum is kept.
_EINSUM_MAX_TERMS = 4096


def sum_product_to_shape(a: Array, b: Array, shape: Shape) -> Array:
    """``sum_to_shape(a * b, shape)`` for `a` and `b` of one shape, equal to it
    up to the order of the additions, without the full-size product where it
    can.

    Three routes to the same sums:

    * `shape` is a leading part of ``a.shape`` followed by ones (a channel
      gate's (N, C, 1, 1) against (N, C, H, W), a keep-dims reduction over
      the last axis): each output is the dot product of one row of `a` with
      the same row of `b`, ``xp.vecdot``, on every namespace;
    * otherwise, for plain NumPy arrays summing at most
      ``_EINSUM_MAX_TERMS`` products per output (CBAM's spatial gate, a sum
      over channels): one ``np.einsum`` contraction;
    * otherwise the product, then ``sum_to_shape`` (pairwise sums).
    """
    shape = tuple(shape)
    if a.shape != b.shape:
        return sum_to_shape(a * b, shape)
    k = _leading_rank(tuple(a.shape), shape)
    if k is not None:
        xp = namespace(a=a, b=b)
        rows = (prod(a.shape[:k]), prod(a.shape[k:]))
        dots = xp.vecdot(xp.reshape(a, rows), xp.reshape(b, rows), axis=-1)  # (rows,)
        return xp.reshape(dots, shape)
    if not (_is_plain_numpy(a) and _is_plain_numpy(b)) or (
        a.size > _EINSUM_MAX_TERMS * max(prod(shape), 1)
    ):
        return sum_to_shape(a * b, shape)
    summed = _summed_axes(a.shape, shape)
    letters = "abcdefghijklmnopqrstuvwxyz"[: a.ndim]
    kept = "".join(v for i, v in enumerate(letters) if i not in summed)
    return np.reshape(np.einsum(f"{letters},{letters}->{kept}", a, b), shape)


def _leading_rank(a_shape: Shape, shape: Shape) -> int | None:
    """k < len(a_shape) when `shape` is ``a_shape[:k]`` followed by ones (k as
    small as the trailing ones allow), else None."""
    if len(shape) != len(a_shape):
        return None
    k = len(shape)
    while k and shape[k - 1] == 1:
        k -= 1
    return k if k < len(shape) and shape[:k] == a_shape[:k] else None


def matmul(xp: Any, a: Array, b: Array) -> Array:
    """``xp.matmul(a, b)``, with a contraction of length 1 as ``a * b``.

    When a's last axis (b's second-last) has length 1, every element of the
    product is one product a[..., i, 0] · b[..., 0, j] and no sum: the
    broadcast multiply gives the same numbers in one pass, where a BLAS GEMM
    of inner size 1 runs at about 1 GFLOP/s (the GC block's outer product
    (8, 256, 1) x (8, 1, 784) at float32: 2.3 ms as a GEMM, 0.84 ms broadcast).
    Batch axes broadcast the same way in both.  The result is a fresh array.
    """
    if a.ndim >= 2 and b.ndim >= 2 and a.shape[-1] == 1 == b.shape[-2]:
        return a * b  # (..., n, 1) * (..., 1, m) -> (..., n, m)
    return xp.matmul(a, b)


def mean_last_axis(a: Array) -> Array:
    """The mean over the last axis, (..., L) -> (...), for L >= 1 and at
    least one leading axis.

    Computed as the matrix-vector product ``a @ w`` with w = (1/L, ..., 1/L):
    each term is scaled by the rounded 1/L before the sum, so the result can
    differ from ``xp.mean`` (Σ, then / L) in the last bits.  The product is a
    BLAS call, which uses every core.
    """
    length = int(a.shape[-1])
    if length == 0:
        raise ValueError(f"a: expected a non-empty last axis, got shape {tuple(a.shape)}")
    xp = namespace(a=a)
    w = xp.full((length,), 1.0 / length, dtype=a.dtype, device=device(a))  # (L,)
    return xp.matmul(a, w)  # (...)


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
    if _is_plain_numpy(total):
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
    (``np.put_along_axis``); other namespaces compare positions and select.
    """
    xp = namespace(values=values)
    shape = list(values.shape)
    shape[axis] = size
    if _is_plain_numpy(values):
        out = np.zeros(tuple(shape), dtype=values.dtype)
        np.put_along_axis(out, np.astype(idx, np.intp), values, axis=axis)
        return out
    at = [1] * values.ndim
    at[axis] = size
    positions = xp.arange(size, dtype=idx.dtype, device=device(idx))  # (size,)
    positions = xp.reshape(positions, tuple(at))  # size along `axis`
    return xp.where(positions == idx, values, 0.0)

