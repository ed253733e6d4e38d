"""The CPU-tier overrides of the ops' steps, for NumPy arrays.

Each ``<op>_forward`` computes what the override point of the same name in
``refattn.ops`` computes, from the same, already checked, arguments, with
the passes over the data done by the kernels of ``refattn.cpu.kernels``
(numba, multi-threaded).  The caches are subclasses of the generic caches
(same fields), so a block reads them as it reads the generic ones; their
type routes the backward here (``refattn.ops.overrides.routed_by_cache``).
The norms' caches are their own: they keep the input and its statistics
instead of x̂, share the generic caches' ``inv_std`` (which CGNL's kink
margin reads), and ``generic()`` rebuilds the generic cache.
The small convolution's cache is its own (input, weight, has_bias), as the
CUDA tier's: no block reads a convolution cache's fields.
A backward whose ``dout`` is not a plain C-contiguous array of the
forward's shape and dtype hands a generic cache to the generic backward,
which checks it and raises the generic error.

Where the NumPy math and a kernel compute the same formula in the same
order (max-pool, the arg-max pools, ReLU's backward, the additions, GC's
rank-2 update, the norms' normalise-and-affine pass and their backward's
final pass, given the same statistics) the results are the same bits.
Sums are accumulated in float64 here (NumPy: pairwise or BLAS in the
data's dtype), and softmax's ``exp`` is the kernels' own polynomial (within
1.2 ulp, written so that it vectorises) rather than NumPy's SIMD one, so
softmax, the norms' statistics and gradients and the gates' ``dz`` agree
with the NumPy path within ``TOLERANCE``.

The sums of products of the shifted-view convolution (``c += a·b``) are no
kernel: they go to NumPy's own BLAS as one GEMM with β = 1
(``refattn.cpu.blas``), within ``TOLERANCE`` of the product formed and
then added.

``OVERRIDES`` says when each kernel is taken: plain ``numpy.ndarray``
inputs, C-contiguous, float32 or float64, at least ``MIN_ELEMENTS``
elements (below that numba's call and thread-pool start cost more than the
NumPy passes), and only while ``refattn.cuda.kernels_enabled()`` is true
(``REFATTN_KERNELS=generic`` or ``use_kernels(False)`` turn the tier off).
``register()`` is the loader ``refattn.ops.overrides`` calls; it registers
nothing when numba is not installed.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, NamedTuple

import numpy as np

from refattn.backend import check_array, check_finite
from refattn.cpu import blas
from refattn.cuda import kernels_enabled
from refattn.ops import overrides
from refattn.ops.conv import _check_dout as _check_conv_dout
from refattn.ops.conv import is_small_conv
from refattn.ops.elementwise import AddCache, GateMulCache, ReluCache, sigmoid
from refattn.ops.norm import BatchNormCache, GroupNormCache
from refattn.ops.overrides import Override
from refattn.ops.pool import ChannelPoolCache, GlobalPoolCache, MaxPoolCache
from refattn.ops.softmax import SoftmaxCache

__all__ = [
    "MIN_ELEMENTS",
    "OVERRIDES",
    "TOLERANCE",
    "available",
    "register",
]

MIN_ELEMENTS = 4096
"""The smallest input (elements of the step's first argument) the tier takes."""

TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (2e-5, 1e-6),
    "float64": (1e-12, 1e-14),
}
"""(rtol, atol relative to the reference's largest magnitude) within which
the tier's results agree with the NumPy path where their arithmetic differs
(float64 sums instead of pairwise or BLAS ones in the data's dtype; the
kernels' exp instead of NumPy's; a product added by BLAS as it is
written)."""

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_K: Any = None  # refattn.cpu.kernels behind _Serialised, set by register()
_LOCK = threading.Lock()


class _Serialised:
    """The kernels, imported on the first kernel call (so a process whose
    arrays all stay below MIN_ELEMENTS never imports numba), one call at a
    time: numba's workqueue threading layer, the tier's layer where TBB is
    not installed, aborts the process when two Python threads launch
    parallel kernels at once, so concurrent callers queue here instead."""

    def __init__(self) -> None:
        self._module: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._module is None:
            from refattn.cpu import kernels

            self._module = kernels
        kernel = getattr(self._module, name)

        def call(*args: Any) -> None:
            with _LOCK:
                kernel(*args)

        return call


def available() -> bool:
    """numba is installed (the ``cpu`` extra)."""
    return importlib.util.find_spec("numba") is not None


def _plain(a: Any) -> bool:
    """A C-contiguous native float32/float64 ndarray, large enough."""
    return (
        type(a) is np.ndarray
        and a.dtype in _FLOATS
        and a.flags.c_contiguous
        and a.size >= MIN_ELEMENTS
    )


def _takes(*arrays: Any) -> bool:
    return all(_plain(a) for a in arrays) and kernels_enabled()


def _beside(a: Any, x: Any) -> bool:
    """A small operand (a weight, a bias) the kernel may read beside x: a
    C-contiguous ndarray of x's dtype, of any size."""
    return type(a) is np.ndarray and a.dtype == x.dtype and a.flags.c_contiguous


def _same(dout: Any, like: Any) -> bool:
    """dout may take the kernel: a plain array of `like`'s shape and dtype."""
    return (
        type(dout) is np.ndarray
        and dout.shape == like.shape
        and dout.dtype == like.dtype
        and dout.flags.c_contiguous
    )


def _empty(dt: Any) -> np.ndarray:
    return np.empty(0, dtype=dt)


def _rows(a: np.ndarray) -> np.ndarray:
    """(N, C, *S) -> the (N·C, L) rows of the kernels (a view)."""
    return a.reshape(a.shape[0] * a.shape[1], -1)


def _vec(a: Any, dt: Any) -> np.ndarray:
    """An optional (C,) parameter as a contiguous array; empty for None."""
    return _empty(dt) if a is None else np.ascontiguousarray(a)


# ---------------------------------------------------------------------------
# softmax (last axis)


class SoftmaxCpuCache(SoftmaxCache):
    __slots__ = ()


def softmax_forward(x: np.ndarray, axis: int) -> tuple[np.ndarray, SoftmaxCpuCache]:
    """softmax along the last axis, one row per thread step.

    Shapes:
        x, y  (..., L)
    """
    y = np.empty_like(x)
    L = x.shape[-1]
    _K.softmax_rows(x.reshape(-1, L), y.reshape(-1, L))
    return y, SoftmaxCpuCache(y, axis)


def softmax_backward(dout: Any, cache: SoftmaxCpuCache) -> Any:
    """dx = (dout − Σ dout ⊙ y) ⊙ y per row; the sum in float64."""
    y = cache.y
    if not _same(dout, y):
        from refattn.ops.softmax import softmax_backward as generic

        return generic(dout, SoftmaxCache(*cache))
    dx = np.empty_like(y)
    L = y.shape[-1]
    _K.softmax_backward_rows(dout.reshape(-1, L), y.reshape(-1, L), dx.reshape(-1, L))
    return dx


# ---------------------------------------------------------------------------
# batch norm (training) and group norm


class BatchNormCpuCache(NamedTuple):
    """The tier's batch-norm cache: the input and its statistics.  The
    backward recomputes x̂ from them, with the forward's arithmetic, where the
    generic cache stores x̂ (one full-size array fewer written and kept)."""

    x: np.ndarray  # (N, C, *S) the input
    mean: np.ndarray  # (C,) batch mean, x's dtype
    inv_std: np.ndarray  # (C,) 1/sqrt(var + eps)
    weight: Any  # (C,) γ, or None
    has_bias: bool
    training: bool  # always True: the tier takes training mode only

    def generic(self) -> BatchNormCache:
        """The generic cache of the same forward (x̂ computed here)."""
        xhat = _normalise(self.x, self.mean, self.inv_std, 1, None, None)
        return BatchNormCache(xhat, self.inv_std, self.weight, self.has_bias,
                              self.training)


class GroupNormCpuCache(NamedTuple):
    """The tier's group-norm cache: the input and its statistics (see
    ``BatchNormCpuCache``); ``inv_std`` is the generic cache's field."""

    x: np.ndarray  # (N, C, *S) the input
    mean: np.ndarray  # (N·G,) per sample and group, x's dtype
    inv_std: np.ndarray  # (N, G) 1/sqrt(var + eps)
    weight: Any  # (C,) γ, or None
    has_bias: bool

    def generic(self) -> GroupNormCache:
        """The generic cache of the same forward (x̂ computed here)."""
        G = self.inv_std.shape[1]
        xhat = _normalise(self.x, self.mean, self.inv_std.reshape(-1),
                          self.x.shape[1] // G, None, None)
        return GroupNormCache(xhat, self.inv_std, self.weight, self.has_bias)


def _normalise(
    x: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, per: int,
    weight: Any, bias: Any,
) -> np.ndarray:
    """y = γ ⊙ x̂ + β, x̂ = (x − mean) · inv_std, in one pass over the rows
    (x̂ itself when there is no γ and no β)."""
    y = np.empty_like(x)
    _K.norm_apply(_rows(x), mean, inv_std, per, _vec(weight, x.dtype),
                  _vec(bias, x.dtype), _rows(y))
    return y


def _statistics(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of x3[:, b, :] for each b, in x3's dtype
    (float64 sums; the variance about the rounded mean, as NumPy's)."""
    B = x3.shape[1]
    mean = np.empty(B, x3.dtype)
    var = np.empty(B, x3.dtype)
    _K.group_mean_var(x3, mean, var)
    return mean, var


def _finite(*stats: np.ndarray) -> bool:
    return all(bool(np.isfinite(s).all()) for s in stats)


def batch_norm_forward(
    x: np.ndarray, weight: Any, bias: Any, running_mean: Any, running_var: Any,
    training: bool, momentum: float, eps: float,
) -> Any:
    """batch_norm in training mode: each channel's statistics from two passes
    over it while it is in cache, then one normalise-and-affine pass.
    Non-finite statistics go to the generic math, which reports them."""
    from refattn.ops import norm

    N, C = x.shape[0], x.shape[1]
    M = x.size // C
    mean, var = _statistics(x.reshape(N, C, -1))  # (C,) each
    if M == 1 or not _finite(mean, var):
        return norm._batch_norm.__wrapped__(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
    inv_std = 1.0 / np.sqrt(var + eps)  # (C,)
    y = _normalise(x, mean, inv_std, 1, weight, bias)
    if running_mean is None:
        new_mean = new_var = None
    else:
        unbiased_var = var * (M / (M - 1))  # (C,)
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * unbiased_var
    cache = BatchNormCpuCache(x, mean, inv_std, weight, bias is not None, training)
    return (y, new_mean, new_var), cache


def _row_sums(
    dout: np.ndarray, x: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, per: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ dout and Σ dout ⊙ x̂ per (n, c) row, float64, each (N, C)."""
    N, C = x.shape[0], x.shape[1]
    db = np.empty(N * C)
    dw = np.empty(N * C)
    _K.norm_row_sums(_rows(dout), _rows(x), mean, inv_std, per, db, dw)
    return db.reshape(N, C), dw.reshape(N, C)


def _apply_backward(
    dout: np.ndarray, x: np.ndarray, mean: np.ndarray, inv_std: np.ndarray,
    per: int, a: np.ndarray, b: np.ndarray, c: np.ndarray,
) -> np.ndarray:
    """dx = dout · a − x̂ · b − c with one coefficient of each per (n, c) row."""
    dx = np.empty_like(x)
    _K.norm_backward_apply(_rows(dout), _rows(x), mean, inv_std, per,
                           np.ascontiguousarray(a).reshape(-1),
                           np.ascontiguousarray(b).reshape(-1),
                           np.ascontiguousarray(c).reshape(-1), _rows(dx))
    return dx


def batch_norm_backward(dout: Any, cache: BatchNormCpuCache) -> Any:
    """The generic formula with the two per-channel sums from one parallel
    pass and dx from a second."""
    x, mean, inv_std, weight, has_bias, _ = cache  # training: always, here
    if not _same(dout, x):
        from refattn.ops.norm import batch_norm_backward as generic

        return generic(dout, cache.generic())
    N, C = x.shape[0], x.shape[1]
    M = x.size // C
    db_nc, dw_nc = _row_sums(dout, x, mean, inv_std, 1)  # (N, C) float64
    dbias = db_nc.sum(axis=0).astype(x.dtype)  # (C,)
    dweight = dw_nc.sum(axis=0).astype(x.dtype)  # (C,)
    scale = inv_std if weight is None else weight * inv_std  # (C,)
    b = scale * (dweight / M)  # (C,)
    c = scale * (dbias / M)  # (C,)
    dx = _apply_backward(dout, x, mean, inv_std, 1,
                         np.tile(scale, N), np.tile(b, N), np.tile(c, N))
    return dx, (None if weight is None else dweight), (dbias if has_bias else None)


def group_norm_forward(
    x: np.ndarray, weight: Any, bias: Any, G: int, eps: float
) -> Any:
    """group_norm: each (sample, group)'s statistics from two passes over it
    while it is in cache, then one normalise-and-affine pass over the (n, c)
    rows."""
    from refattn.ops import norm

    N, C = x.shape[0], x.shape[1]
    mean, var = _statistics(x.reshape(1, N * G, -1))  # (N·G,) each
    if not _finite(mean, var):
        return norm._group_norm.__wrapped__(x, weight, bias, G, eps)
    inv_std = 1.0 / np.sqrt(var + eps)  # (N·G,)
    y = _normalise(x, mean, inv_std, C // G, weight, bias)
    cache = GroupNormCpuCache(x, mean, inv_std.reshape(N, G), weight, bias is not None)
    return y, cache


def group_norm_backward(dout: Any, cache: GroupNormCpuCache) -> Any:
    """The generic formula: the per-(n, c) sums from one parallel pass, the
    group means from them, and dx from a second pass."""
    x, mean, inv_std, weight, has_bias = cache
    if not _same(dout, x):
        from refattn.ops.norm import group_norm_backward as generic

        return generic(dout, cache.generic())
    N, C = x.shape[0], x.shape[1]
    G = inv_std.shape[1]
    K = x.size // (N * G)
    per = C // G
    db64, dw64 = _row_sums(dout, x, mean, inv_std.reshape(-1), per)  # (N, C) float64
    db_nc, dw_nc = db64.astype(x.dtype), dw64.astype(x.dtype)
    gdb = db_nc if weight is None else db_nc * weight  # (N, C)
    gdw = dw_nc if weight is None else dw_nc * weight
    mean_dxhat = gdb.reshape(N, G, per).sum(axis=-1) / K  # (N, G)
    mean_dxhat_xhat = gdw.reshape(N, G, per).sum(axis=-1) / K
    inv_c = np.repeat(inv_std, per, axis=1)  # (N, C)
    scale = inv_c if weight is None else inv_c * weight  # (N, C)
    q = np.repeat(inv_std * mean_dxhat_xhat, per, axis=1)  # (N, C)
    r = np.repeat(inv_std * mean_dxhat, per, axis=1)  # (N, C)
    dx = _apply_backward(dout, x, mean, inv_std.reshape(-1), per, scale, q, r)
    dweight = None if weight is None else dw64.sum(axis=0).astype(x.dtype)
    dbias = db64.sum(axis=0).astype(x.dtype) if has_bias else None
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# the sigmoid gate x ⊙ σ(z), z per channel or per position


class GateMulCpuCache(GateMulCache):
    __slots__ = ()


def gate_kind(x: Any, z: Any) -> str | None:
    """How z broadcasts against x (N, C, *S): 'channel' for z (N, C, 1, ..., 1),
    'spatial' for z (N, 1, *S), else None.  The gate's z, the per-channel
    addend and the average pools' gradient take the kernels in these cases."""
    if type(z) is not np.ndarray or z.ndim != x.ndim or x.ndim < 3:
        return None
    if z.dtype != x.dtype or not z.flags.c_contiguous or z.shape[0] != x.shape[0]:
        return None
    if z.shape[1] == x.shape[1] and all(d == 1 for d in z.shape[2:]):
        return "channel"
    if z.shape[1] == 1 and z.shape[2:] == x.shape[2:] and x.shape[1] > 1:
        return "spatial"
    return None


def gate_mul_forward(x: np.ndarray, z: np.ndarray) -> tuple[Any, GateMulCpuCache]:
    """s = σ(z) by the generic formula (z is small), then x ⊙ s on every core:
    the same single product per element as NumPy's, so the same bits."""
    s = sigmoid(z)  # like z
    N, C = x.shape[0], x.shape[1]
    y = np.empty_like(x)
    if s.shape[1] == C:  # channel gate: one value per (n, c) row
        _K.gate_channel_forward(_rows(x), s.reshape(N * C), _rows(y))
    else:  # spatial gate: one value per (n, position)
        _K.gate_spatial_forward(x.reshape(N, C, -1), s.reshape(N, -1),
                                y.reshape(N, C, -1))
    return y, GateMulCpuCache(x, s)


def gate_mul_backward(dout: Any, cache: GateMulCpuCache) -> Any:
    """dx = dout ⊙ s and Σ dout ⊙ x over the broadcast axes, in one pass."""
    x, s = cache
    if not _same(dout, x):
        from refattn.ops.elementwise import gate_mul_backward as generic

        return generic(dout, GateMulCache(*cache))
    N, C = x.shape[0], x.shape[1]
    dx = np.empty_like(x)
    if s.shape[1] == C:  # channel gate: one value per (n, c) row
        ds = np.empty(N * C)
        _K.gate_channel_backward(_rows(dout), _rows(x), s.reshape(N * C),
                                 _rows(dx), ds)
    else:  # spatial gate: one value per (n, position)
        ds = np.empty((N, x.size // (N * C)))
        _K.gate_spatial_backward(dout.reshape(N, C, -1), x.reshape(N, C, -1),
                                 s.reshape(N, -1), dx.reshape(N, C, -1), ds)
    ds = ds.astype(x.dtype).reshape(s.shape)  # like z
    return dx, ds * s * (1 - s)


# ---------------------------------------------------------------------------
# ReLU


class ReluCpuCache(ReluCache):
    __slots__ = ()


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, ReluCpuCache]:
    """max(x, 0) on every core, NumPy's ``maximum(x, 0.0)`` bits, with the
    cache that sends the backward to the kernel."""
    out = np.empty_like(x)
    _K.relu_flat(x.reshape(-1), out.reshape(-1))
    return out, ReluCpuCache(out)


def relu_backward(dout: Any, cache: ReluCpuCache) -> Any:
    """dout ⊙ 1[out > 0] on every core, the generic product's bits."""
    (out,) = cache
    if not _same(dout, out):
        from refattn.ops.elementwise import relu_backward as generic

        return generic(dout, ReluCache(*cache))
    dx = np.empty_like(out)
    _K.relu_backward_flat(dout.reshape(-1), out.reshape(-1), dx.reshape(-1))
    return dx


# ---------------------------------------------------------------------------
# sums: a + b per (n, c) row, the average pools' gradient, the rank-2 update


def add_forward(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, AddCache]:
    """a + b with b per (n, c) row, on every core: one addition per element,
    NumPy's bits.  The generic cache: the backward's sums stay NumPy's."""
    out = np.empty_like(a)
    _K.add_channel(_rows(a), b.reshape(-1), _rows(out))
    return out, AddCache(tuple(a.shape), tuple(b.shape))


def addend_kind(into: Any, g: Any) -> str | None:
    """gate_kind's cases, and 'shared' for g (1, C, 1, ..., 1), a C-contiguous
    ndarray of into's dtype: one value per channel for every sample (a
    convolution's bias)."""
    kind = gate_kind(into, g)
    if (kind is None and _beside(g, into) and g.ndim == into.ndim >= 3
            and g.shape[0] == 1 and g.shape[1] == into.shape[1]
            and all(d == 1 for d in g.shape[2:])):
        return "shared"
    return kind


def add_broadcast_into(into: np.ndarray, g: np.ndarray) -> np.ndarray:
    """into += g in place, g per (n, c) row, per channel or per (n,
    position), on every core (the same single addition per element, so
    NumPy's bits)."""
    N, C = into.shape[0], into.shape[1]
    if g.shape[1] == C:
        per_row = g.reshape(-1) if g.shape[0] == N else np.tile(g.reshape(C), N)  # (N·C,)
        _K.add_channel(_rows(into), per_row, _rows(into))
    else:
        _K.add_spatial(into.reshape(N, C, -1), g.reshape(N, -1), into.reshape(N, C, -1))
    return into


def product_applies(c: Any, a: Any, b: Any) -> bool:
    """c += a·b goes to NumPy's BLAS: ``blas.applies`` (2-D float operands,
    c a writeable row-major view), c of at least MIN_ELEMENTS elements, and
    the BLAS found."""
    return (
        blas.applies(c, a, b)
        and c.size >= MIN_ELEMENTS
        and kernels_enabled()
        and blas.gemm() is not None
    )


def into_applies(buf: Any, r0: Any, a: Any, b: Any) -> bool:
    """a·b into rows r0 : r0 + M of buf goes to ``np.matmul(a, b, out=rows)``:
    plain float ndarrays of one dtype, the rows inside buf and of the
    product's shape, buf writeable and aligned, sharing no memory with a or
    b, its rows of unit stride at least a row apart.  NumPy then hands the
    rows to BLAS as it would fresh memory; rows it could not (a
    column-major buffer) would take NumPy's own loop, whose sums are
    ordered differently."""
    if not (type(buf) is np.ndarray and type(a) is np.ndarray and type(b) is np.ndarray):
        return False
    if buf.dtype.kind != "f" or a.dtype != buf.dtype or b.dtype != buf.dtype:
        return False
    if type(r0) is not int or min(a.ndim, b.ndim) < 2 or a.shape[-1] != b.shape[-2]:
        return False
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        return False
    m, n = a.shape[-2], b.shape[-1]
    if buf.shape != batch + (buf.shape[-2], n) or not 0 <= r0 <= buf.shape[-2] - m:
        return False
    row, unit = buf.strides[-2], buf.itemsize
    if buf.size == 0 or buf.strides[-1] != unit or row % unit or row < n * unit:
        return False
    if not (buf.flags.writeable and buf.flags.aligned):
        return False
    return (not (np.may_share_memory(buf, a) or np.may_share_memory(buf, b))
            and kernels_enabled())


def outer_kind(base: Any, u1: Any, v1: Any, u2: Any, v2: Any) -> bool:
    """base (N, n, m) with u1 (N, n, 1), v1 and v2 (N, 1, m), u2 (n, 1),
    (1, n, 1) or (N, n, 1), all ndarrays of base's dtype."""
    if base.ndim != 3:
        return False
    N, n, m = base.shape
    if any(type(t) is not np.ndarray or t.dtype != base.dtype
           for t in (u1, v1, u2, v2)):
        return False
    return (u1.shape == (N, n, 1) and v1.shape == (N, 1, m) and v2.shape == (N, 1, m)
            and u2.shape in ((n, 1), (1, n, 1), (N, n, 1)))


def add_outer_products_forward(
    base: np.ndarray, u1: np.ndarray, v1: np.ndarray, u2: np.ndarray, v2: np.ndarray
) -> np.ndarray:
    """base + (u1 v1 + u2 v2) in one pass (the NumPy passes' order and bits)."""
    N, n, m = base.shape
    out = np.empty_like(base)

    def rows(t: np.ndarray, k: int) -> np.ndarray:  # the small operands, (·, k)
        return np.ascontiguousarray(t.reshape(-1, k))

    _K.add_outer_products(base, rows(u1, n), rows(v1, m), rows(u2, n), rows(v2, m), out)
    return out


# ---------------------------------------------------------------------------
# pools


def _index_dtype(count: int) -> Any:
    """The smallest signed integer dtype for offsets 0..count-1 (as the
    generic pools choose)."""
    for dt in (np.int8, np.int16, np.int32):
        if count - 1 <= np.iinfo(dt).max:
            return dt
    return np.int64


def channel_pool_forward(x: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """The max (with its first arg-max channel) or the mean over channels in
    one pass per sample.  The generic backward (N·|S| entries) stays."""
    N, C = x.shape[0], x.shape[1]
    out = np.empty((N, 1) + x.shape[2:], dtype=x.dtype)
    arg = np.empty(out.shape, dtype=np.int64)
    _K.channel_pool_max_mean(x.reshape(N, C, -1), kind == "max",
                             out.reshape(N, -1), arg.reshape(N, -1))
    if kind == "mean":
        return out, ChannelPoolCache(kind, tuple(x.shape))
    return out, ChannelPoolCache(kind, tuple(x.shape), arg.astype(_index_dtype(C)))


def global_pool_forward(x: np.ndarray, kind: str, keepdim: bool) -> Any:
    """The global max and its first arg-max in one pass ('max' only; the
    average is a BLAS product already)."""
    N, C = x.shape[0], x.shape[1]
    rows = _rows(x)
    out = np.empty(N * C, dtype=x.dtype)
    arg = np.empty(N * C, dtype=np.int64)
    _K.row_max_arg(rows, out, arg)
    idx = arg.astype(_index_dtype(rows.shape[1])).reshape(N, C)
    shape = (N, C) + (1,) * (x.ndim - 2) if keepdim else (N, C)
    return out.reshape(shape), GlobalPoolCache(kind, tuple(x.shape), keepdim, idx)


class MaxPoolCpuCache(MaxPoolCache):
    __slots__ = ()


def max_pool_forward(
    x: np.ndarray, k: tuple[int, ...], s: tuple[int, ...], so: tuple[int, ...]
) -> tuple[np.ndarray, MaxPoolCpuCache]:
    """2-D max-pool: every window's max and first arg-max in one pass."""
    N, C = x.shape[0], x.shape[1]
    out = np.empty((N, C) + so, dtype=x.dtype)
    idx = np.empty((N, C) + so, dtype=_index_dtype(k[0] * k[1]))
    _K.max_pool2d_forward(x, k[0], k[1], s[0], s[1], out, idx)  # x: any strides
    return out, MaxPoolCpuCache(idx, tuple(x.shape), k, s)


def max_pool_backward(
    dout: Any, cache: MaxPoolCpuCache, *, out: tuple[np.ndarray, int] | None = None
) -> Any:
    """dout to each window's arg-max, one plane per thread step; with
    ``out=(buf, c0)`` into buf's channels c0 : c0 + C (see the generic
    ``_max_pool_backward``), returning buf."""
    idx, x_shape, k, s = cache
    if (type(dout) is not np.ndarray or dout.shape != idx.shape
            or dout.dtype not in _FLOATS
            or (out is not None and type(out[0]) is not np.ndarray)):
        from refattn.ops.pool import _max_pool_backward, max_pool_backward

        if out is None:
            return max_pool_backward(dout, MaxPoolCache(*cache))
        return _max_pool_backward(dout, MaxPoolCache(*cache), out=out)
    check_array("dout", dout, shape=tuple(idx.shape))
    check_finite("dout", dout)
    if out is None:
        dx = buf = np.empty(x_shape, dtype=dout.dtype)  # (N, C, H, W)
    else:
        buf, c0 = out  # (N, C', H, W)
        dx = buf[:, c0 : c0 + x_shape[1]]  # (N, C, H, W), a view
    _K.max_pool2d_backward(dout, idx, k[1], s[0], s[1], dx)  # any strides
    return buf


# ---------------------------------------------------------------------------
# small k x k convolution (CBAM's spatial conv)


class Conv2dCpuCache(NamedTuple):
    x: np.ndarray  # (N, C, H, W) the input (the dW pass reads it)
    weight: np.ndarray  # (O, C, k, k)
    has_bias: bool


def conv2d_forward(
    x: np.ndarray, weight: np.ndarray, bias: Any, *geometry: Any
) -> tuple[np.ndarray, Conv2dCpuCache]:
    """conv2d in the is_small_conv case (stride 1, 'same' padding, one
    group), directly: no im2col matrix, one output plane per thread step."""
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    out = np.empty((N, weight.shape[0], H, W), dtype=x.dtype)
    b = weight[:, 0, 0, 0] if bias is None else bias  # read only with a bias
    _K.small_conv_forward(x, weight, b, bias is not None, out)
    return out, Conv2dCpuCache(x, weight, bias is not None)


def conv2d_backward(dout: Any, cache: Conv2dCpuCache) -> tuple[Any, Any, Any]:
    """dx by input plane (no two threads write one plane), dW and db by
    tap, float64 sums."""
    x, weight, has_bias = cache
    _check_conv_dout(dout, weight, (x.shape[0], weight.shape[0]) + x.shape[2:])
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(x)
    dw = np.empty(weight.shape)
    db = np.empty(weight.shape[0])
    _K.small_conv_backward(dout, x, weight, dx, dw, db)
    return dx, dw.astype(x.dtype), db.astype(x.dtype) if has_bias else None


# ---------------------------------------------------------------------------
# the table


def _unreachable(dout: Any, cache: Any, **kwargs: Any) -> Any:  # pragma: no cover
    raise AssertionError("the forward returns a generic cache")


OVERRIDES: dict[str, Override] = {
    "softmax": Override(
        lambda x, axis: axis == x.ndim - 1 and _takes(x),
        softmax_forward, softmax_backward, SoftmaxCpuCache,
        "softmax along the last axis, forward and backward",
    ),
    "batch_norm": Override(
        lambda x, weight, bias, mean, var, training, *options: (
            training and x.ndim >= 3 and _takes(x)
        ),
        batch_norm_forward, batch_norm_backward, BatchNormCpuCache,
        "batch norm in training mode with spatial dims: statistics, "
        "normalise + affine, backward sums and dx",
    ),
    "group_norm": Override(
        lambda x, *rest: _takes(x),
        group_norm_forward, group_norm_backward, GroupNormCpuCache,
        "group norm: statistics, normalise + affine, backward sums and dx",
    ),
    "gate_mul": Override(
        lambda x, z: gate_kind(x, z) is not None and _takes(x),
        gate_mul_forward, gate_mul_backward, GateMulCpuCache,
        "the sigmoid gate with z per channel or per position: the backward's "
        "dx and dz in one pass",
    ),
    "relu": Override(
        lambda x: _takes(x),
        relu_forward, relu_backward, ReluCpuCache,
        "ReLU's forward and its backward, one pass each",
    ),
    "add": Override(
        lambda a, b: gate_kind(a, b) == "channel" and _takes(a),
        add_forward, _unreachable, type(None),
        "a + b with b per (n, c) row, forward (GC's channel_add)",
    ),
    "add_broadcast_into": Override(
        lambda into, g: addend_kind(into, g) is not None and _takes(into),
        add_broadcast_into, _unreachable, type(None),
        "into += g in place, g per (n, c), per channel or per (n, position): "
        "the average pools' backward and the convolutions' bias",
    ),
    "add_product_into": Override(
        product_applies,
        blas.add_product_into, _unreachable, type(None),
        "c += a·b in place as one GEMM with β = 1 (NumPy's own BLAS, "
        "refattn.cpu.blas): the shifted-view convolution's sums over taps",
    ),
    "product_into": Override(
        into_applies,
        blas.product_into, _unreachable, type(None),
        "a·b written into rows r0 : r0 + M of the caller's buffer (np.matmul "
        "with out=): the attention blocks' stacked projection gradients",
    ),
    "add_outer_products": Override(
        lambda base, *uv: outer_kind(base, *uv) and _takes(base),
        add_outer_products_forward, _unreachable, type(None),
        "base + (u1 v1 + u2 v2), the GC block's x gradient, in one pass",
    ),
    "conv2d": Override(
        lambda x, weight, bias, *geometry: (
            is_small_conv(weight.shape, *geometry) and _takes(x)
            and _beside(weight, x) and (bias is None or _beside(bias, x))
        ),
        conv2d_forward, conv2d_backward, Conv2dCpuCache,
        "C_in, C_out <= 4, odd square k >= 3, 'same' padding, stride 1 (CBAM's "
        "spatial conv): directly, forward and backward",
    ),
    "channel_pool": Override(
        lambda x, kind: kind in ("max", "mean") and _takes(x),
        channel_pool_forward, _unreachable, type(None),
        "the channel max (with arg-max) and mean, forward",
    ),
    "global_pool": Override(
        lambda x, kind, keepdim: kind == "max" and _takes(x),
        global_pool_forward, _unreachable, type(None),
        "the global max with its arg-max, forward",
    ),
    "max_pool": Override(
        lambda x, k, s, so: (  # any strides: non_local pools a channel slice
            x.ndim == 4 and type(x) is np.ndarray and x.dtype in _FLOATS
            and x.size >= MIN_ELEMENTS and kernels_enabled()
        ),
        max_pool_forward, max_pool_backward, MaxPoolCpuCache,
        "2-D max-pool with its arg-max, forward and backward",
    ),
}
"""Override point -> its CPU kernel variant and when it is taken."""


def register() -> None:
    """Put the kernels into the ops' NumPy table, when numba is installed."""
    global _K
    if not available():
        return
    _K = _Serialised()
    for name, override in OVERRIDES.items():
        overrides.register_cpu(name, override)

