"""Pooling: windowed max and average pooling over 1, 2 or 3 spatial dims, the
global pools of CBAM's channel gate (avg, max, lp, lse) and the channel pools
of its spatial gate (max, mean).

Windowed pools take no padding and use floor mode, as PyTorch's defaults do:
along each spatial dim ``So = floor((S - K) / s) + 1`` windows, and a tail
shorter than a window is dropped (7 -> 3 for K = s = 2).  Both are separable,
so the forward reduces one spatial axis at a time, last axis first, each step
combining ``K_d`` strided slices (``backend.window``) of the previous result.
For max-pooling, the per-axis first arg-maxes combine into the row-major
first arg-max of the whole window (the smallest offset along the first axis
whose slab holds the maximum, then the smallest along the next, ...), which
is the element PyTorch's CPU max-pool picks.

Backwards scatter the gradient window offset by window offset: ``K1···Kd``
strided slices of a fresh buffer.  When windows overlap (stride < kernel)
the slices are added with ``backend.accumulate``, exactly; in the common
non-overlapping case (kernel == stride, e.g. the non-local block's
sub-sampling (2,), (2, 2), (1, 2, 2)) they are disjoint and simply stored.

Max-type reductions keep the index of their arg-max, so the backward needs no
comparison against the input and ties never split the gradient.

Inputs: ``x`` is a finite float32 or float64 array ``(N, C, *S)``.  max_pool
and avg_pool take 1 to 3 spatial dims (3-D to 5-D ``x``, as PyTorch's
max_pool1d/2d/3d); global_pool and channel_pool reduce whole axes and take
any number (>= 1) of spatial dims.  C and every spatial dim must be at least
1; N = 0 is allowed.  Anything else raises ValueError or TypeError naming the
argument, e.g. ``kernel_size: expected at most the input's spatial size
(7, 7) in every dim, got (8, 8)``.
"""

from __future__ import annotations

from itertools import product
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    accumulate,
    add_along_axis,
    add_into,
    as_tuple,
    check_array,
    check_finite,
    check_into,
    check_same_dtype,
    device,
    mean_last_axis,
    namespace,
    prod,
    route_along_axis,
    window,
)
from refattn.ops.overrides import overridable, routed_by_cache

__all__ = ["CHANNEL_POOL_KINDS", "GLOBAL_POOL_KINDS", "AvgPoolCache",
           "ChannelPoolCache", "GlobalPoolCache", "MaxPoolCache", "avg_pool_backward",
           "avg_pool_forward", "channel_pool_backward", "channel_pool_forward",
           "global_pool_backward", "global_pool_forward", "max_pool_backward",
           "max_pool_forward"]

GlobalPoolKind = Literal["avg", "max", "lp", "lse"]
ChannelPoolKind = Literal["max", "mean"]
GLOBAL_POOL_KINDS: tuple[str, ...] = ("avg", "max", "lp", "lse")
CHANNEL_POOL_KINDS: tuple[str, ...] = ("max", "mean")

IntOrTuple = int | tuple[int, ...]


# ---------------------------------------------------------------------------
# windowed pooling; the caches keep the window geometry (and max's arg-maxes)


class MaxPoolCache(NamedTuple):
    idx: Array  # (N, C, *So) integer: row-major offset of the arg-max in its window
    x_shape: Shape  # (N, C, *S)
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]


class AvgPoolCache(NamedTuple):
    x_shape: Shape  # (N, C, *S)
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]


# max pooling


def max_pool_forward(
    x: Array, *, kernel_size: IntOrTuple, stride: IntOrTuple | None = None
) -> tuple[Array, MaxPoolCache]:
    """Max over sliding windows (no padding, floor mode) in 1, 2 or 3 spatial dims.

    Math:
        out[n, c, o] = max_{t ∈ window} x[n, c, s ⊙ o + t],  t ∈ [0, K1) × ... × [0, Kd)
        So_i = floor((S_i − K_i) / s_i) + 1; stride defaults to kernel_size.
        idx[n, c, o] = row-major offset of the first t attaining the max.
    Shapes:
        x   (N, C, *S)   S = (L,), (H, W) or (T, H, W)
        out (N, C, *So)
    Args:
        kernel_size: K, an int or a tuple with one entry per spatial dim.
        stride: s, likewise; None means stride = kernel_size.
    """
    _check_input(x, "max_pool", ndims=(3, 4, 5))
    return _max_pool(x, *_geometry(x.shape, kernel_size, stride))


@overridable("max_pool")
def _max_pool(
    x: Array, k: tuple[int, ...], s: tuple[int, ...], so: tuple[int, ...]
) -> tuple[Array, MaxPoolCache]:
    """The math of max_pool_forward, arguments already checked (kernel, stride
    and output sizes as tuples, see _geometry)."""
    xp = namespace(x=x)
    it = _index_dtype(xp, prod(k))
    out, idx = _window_max(xp, x, k, s, so, it)  # (N, C, *So) twice
    return out, MaxPoolCache(idx, tuple(x.shape), k, s)


@routed_by_cache("max_pool")
def max_pool_backward(dout: Array, cache: MaxPoolCache) -> Array:
    """VJP of max_pool: each dout element goes to its window's arg-max.

    Math:
        dx[n, c, s ⊙ o + idx[n, c, o]] += dout[n, c, o]
        (a sum only where windows overlap, stride < kernel_size)
    Shapes:
        dout (N, C, *So) -> dx (N, C, *S); positions in no window's arg-max get 0.
    Convention:
        On a tie inside a window the whole gradient goes to the FIRST arg-max in
        row-major window order, never split; this matches PyTorch's CPU
        max_pool1d/2d/3d.
    """
    namespace(dout=dout)  # an array of a supported library
    _check_dout(dout, tuple(cache.idx.shape))
    return _max_pool_backward(dout, cache)


@routed_by_cache("max_pool")
def _max_pool_backward(
    dout: Array, cache: MaxPoolCache, *, out: tuple[Array, int] | None = None
) -> Array:
    """The math of max_pool_backward, arguments already checked.

    ``out=(buf, c0)`` writes dx into the channels c0 : c0 + C of `buf`
    (N, C', *S), a buffer of dout's dtype that the caller allocated (a
    concatenation the caller would otherwise make), and returns `buf`; every
    element of those channels is written.
    """
    xp = namespace(dout=dout)
    idx, x_shape, k, s = cache
    so = tuple(idx.shape[2:])
    if out is None:
        dx, c0 = _grad_buffer(xp, dout, x_shape, k, s, so), 0  # (N, C, *S)
    else:
        dx, c0 = out  # (N, C', *S)
        if not _tiles(x_shape, k, s, so):
            dx[_channels(c0, x_shape[1]) + (...,)] = 0.0
    for t, offset in enumerate(product(*(range(kk) for kk in k))):
        g = xp.astype(idx == t, dout.dtype) * dout  # (N, C, *So)
        _scatter(dx, _windows(offset, s, so, c0, x_shape[1]), g, k, s)
    return dx


# ---------------------------------------------------------------------------
# average pooling


def avg_pool_forward(
    x: Array, *, kernel_size: IntOrTuple, stride: IntOrTuple | None = None
) -> tuple[Array, AvgPoolCache]:
    """Mean over sliding windows (no padding, floor mode) in 1, 2 or 3 spatial dims.

    Math:
        out[n, c, o] = (1 / |K|) Σ_{t ∈ window} x[n, c, s ⊙ o + t],  |K| = K1···Kd
        So_i = floor((S_i − K_i) / s_i) + 1; stride defaults to kernel_size.
    Shapes:
        x   (N, C, *S)   S = (L,), (H, W) or (T, H, W)
        out (N, C, *So)
    """
    namespace(x=x)  # an array of a supported library
    _check_input(x, "avg_pool", ndims=(3, 4, 5))
    return _avg_pool(x, *_geometry(x.shape, kernel_size, stride))


def _avg_pool(
    x: Array, k: tuple[int, ...], s: tuple[int, ...], so: tuple[int, ...]
) -> tuple[Array, AvgPoolCache]:
    """The math of avg_pool_forward, arguments already checked (see _max_pool)."""
    xp = namespace(x=x)
    out = _window_sum(xp, x, k, s, so) / prod(k)  # (N, C, *So)
    return out, AvgPoolCache(tuple(x.shape), k, s)


def avg_pool_backward(dout: Array, cache: AvgPoolCache) -> Array:
    """VJP of avg_pool: every window spreads dout / |K| uniformly over its inputs.

    Math:
        dx[n, c, s ⊙ o + t] += dout[n, c, o] / |K|   for every offset t in the window
    Shapes:
        dout (N, C, *So) -> dx (N, C, *S); dropped tail positions get 0.
    """
    namespace(dout=dout)  # an array of a supported library
    x_shape, k, s = cache
    _check_dout(dout, tuple(x_shape[:2]) + _out_size(x_shape[2:], k, s))
    return _avg_pool_backward(dout, cache)


def _avg_pool_backward(dout: Array, cache: AvgPoolCache) -> Array:
    """The math of avg_pool_backward, arguments already checked."""
    xp = namespace(dout=dout)
    x_shape, k, s = cache
    so = _out_size(x_shape[2:], k, s)
    g = dout / prod(k)  # (N, C, *So)
    dx = _grad_buffer(xp, dout, x_shape, k, s, so)  # (N, C, *S)
    for offset in product(*(range(kk) for kk in k)):
        _scatter(dx, _windows(offset, s, so), g, k, s)
    return dx


# ---------------------------------------------------------------------------
# global pooling (CBAM channel-gate descriptors)


class GlobalPoolCache(NamedTuple):
    kind: str
    x_shape: Shape  # (N, C, *S)
    keepdim: bool
    idx: Array | None = None  # (N, C) flat position of the arg-max ('max')
    x: Array | None = None  # (N, C, L) the input, positions flattened ('lp')
    norm: Array | None = None  # (N, C) ||x||_2 over the positions ('lp')
    e: Array | None = None  # (N, C, L) exp(x − max) ('lse')
    sum_e: Array | None = None  # (N, C) Σ_L e ('lse')


def global_pool_forward(
    x: Array,
    *,
    kind: GlobalPoolKind,
    keepdim: bool = False,
) -> tuple[Array, GlobalPoolCache]:
    """Reduce every spatial position of each (sample, channel) map to one number.

    Math (over the L = ∏S positions p of x[n, c]):
        avg   out = (1/L) Σ_p x_p
        max   out = max_p x_p
        lp    out = sqrt(Σ_p x_p²)          a SUM, as F.lp_pool2d(x, 2, (H, W))
        lse   out = m + log Σ_p exp(x_p − m),  m = max_p x_p   (log-SUM-exp)
        lp is rescaled by max_p |x_p| when the plain sum of squares would
        overflow or underflow.
    Shapes:
        x   (N, C, *S), any number (>= 1) of spatial dims
        out (N, C), or (N, C, 1, ..., 1) with keepdim
    """
    _check_input(x, "global_pool", ndims=None)
    _check_kind(kind, GLOBAL_POOL_KINDS)
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim: expected a bool, got {keepdim!r}")
    return _global_pool(x, kind, keepdim)


@overridable("global_pool")
def _global_pool(x: Array, kind: str, keepdim: bool) -> tuple[Array, GlobalPoolCache]:
    """The math of global_pool_forward, arguments already checked."""
    xp = namespace(x=x)
    n, c = x.shape[:2]
    xf = xp.reshape(x, (n, c, prod(x.shape[2:])))  # (N, C, L)
    cache = GlobalPoolCache(kind, tuple(x.shape), keepdim)
    if kind == "avg":
        out = mean_last_axis(xf)  # (N, C)
    elif kind == "max":
        idx = xp.argmax(xf, axis=-1, keepdims=True)  # (N, C, 1)
        out = xp.take_along_axis(xf, idx, axis=-1)[..., 0]  # (N, C)
        small = _index_dtype(xp, xf.shape[-1])  # the smallest int dtype for L
        cache = cache._replace(idx=xp.astype(idx[..., 0], small))
    elif kind == "lp":
        out = _l2_norm(xp, xf)  # (N, C)
        cache = cache._replace(x=xf, norm=out)
    else:
        m = xp.max(xf, axis=-1, keepdims=True)  # (N, C, 1)
        e = xp.exp(xf - m)  # (N, C, L); subtracting the max keeps exp <= 1
        sum_e = xp.sum(e, axis=-1)  # (N, C)
        out = m[..., 0] + xp.log(sum_e)  # (N, C)
        cache = cache._replace(e=e, sum_e=sum_e)
    if keepdim:
        out = xp.reshape(out, _keep_shape(x.shape))  # (N, C, 1, ..., 1)
    return out, cache


@routed_by_cache("global_pool")
def global_pool_backward(
    dout: Array, cache: GlobalPoolCache, *, into: Array | None = None
) -> Array:
    """VJP of global_pool.

    Math (g = dout[n, c], spread over the positions p):
        avg   dx_p = g / L
        max   dx_p = g if p is the first arg-max else 0
        lp    dx_p = g · x_p / ||x||          (0 where ||x|| = 0)
        lse   dx_p = g · exp(x_p − m) / Σ_q exp(x_q − m)   (softmax over positions)
    Shapes:
        dout (N, C) or, with keepdim, (N, C, 1, ..., 1) -> dx (N, C, *S)
        For avg, dx is a read-only broadcast view.
    into:
        Optional array of x's shape and dtype that the caller owns: dx is added
        into it, in place where the namespace allows, and the sum is returned
        (use the returned array).  A max then touches N·C entries instead of
        building a dense routed array.
    Convention:
        max: on a tie the whole gradient goes to the FIRST arg-max in row-major
        position order, as torch.max(dim) does.  lp: at ||x|| = 0 (an all-zero
        map, where the norm has no derivative) the gradient is defined as 0, the
        minimum-norm subgradient.
    """
    check_into(into, cache.x_shape, dout)
    namespace(dout=dout)  # an array of a supported library
    c = cache
    _check_dout(dout, _keep_shape(c.x_shape) if c.keepdim else tuple(c.x_shape[:2]))
    if c.kind in ("lp", "lse"):
        check_same_dtype(dout=dout, x=c.x if c.kind == "lp" else c.e)
    return _global_pool_backward(dout, cache, into=into)


@routed_by_cache("global_pool")
def _global_pool_backward(
    dout: Array, cache: GlobalPoolCache, *, into: Array | None = None
) -> Array:
    """The math of global_pool_backward, arguments already checked; with
    `into`, a max adds its N·C routed values straight into it."""
    xp = namespace(dout=dout)
    c = cache
    n, ch = c.x_shape[:2]
    g = xp.reshape(dout, (n, ch, 1))  # (N, C, 1)
    length = prod(c.x_shape[2:])
    if c.kind == "avg":
        g = xp.reshape(g / length, _keep_shape(c.x_shape))  # (N, C, 1, ..., 1)
        return _broadcast_into(into, g, c.x_shape)  # (N, C, *S)
    if c.kind == "max" and into is not None:
        total = xp.reshape(into, (n, ch, length))  # (N, C, L)
        total = add_along_axis(total, c.idx[..., None], g, -1)  # (N, C, L)
        return xp.reshape(total, c.x_shape)  # (N, C, *S)
    if c.kind == "max":
        dx = route_along_axis(g, c.idx[..., None], -1, length)  # (N, C, L)
    elif c.kind == "lp":
        positive = c.norm > 0
        safe = xp.where(positive, c.norm, 1.0)  # (N, C)
        scale = xp.where(positive, g[..., 0] / safe, 0.0)  # (N, C): 0 at ||x|| = 0
        dx = c.x * scale[..., None]  # (N, C, L)
    else:
        dx = c.e * (g / c.sum_e[..., None])  # (N, C, L) = g · softmax
    return add_into(into, xp.reshape(dx, c.x_shape))  # (N, C, *S)


def _broadcast_into(into: Array | None, g: Array, shape: Shape) -> Array:
    """An average's gradient: g broadcast to `shape`, as a read-only view,
    or added into the caller's `into` in place."""
    xp = namespace(g=g)
    if into is None:
        return xp.broadcast_to(g, shape)  # (N, C, *S)
    return _add_broadcast_into(into, g)  # (N, C, *S)


@overridable("add_broadcast_into")
def _add_broadcast_into(into: Array, g: Array) -> Array:
    """into += g broadcast to into's shape, in place; returns into.

    g is (N, C, 1, ..., 1) for a global average, (N, 1, *S) for a channel
    mean, (1, C, 1, ..., 1) for a convolution's bias: one addition per
    element, which the CPU tier spreads over the cores with the same bits.
    """
    xp = namespace(into=into)
    into += xp.broadcast_to(g, tuple(into.shape))  # (N, C, *S)
    return into


# ---------------------------------------------------------------------------
# channel pooling (CBAM spatial-gate descriptors)


class ChannelPoolCache(NamedTuple):
    kind: str
    x_shape: Shape  # (N, C, *S)
    idx: Array | None = None  # (N, 1, *S) arg-max channel ('max')


def channel_pool_forward(
    x: Array, *, kind: ChannelPoolKind
) -> tuple[Array, ChannelPoolCache]:
    """Reduce the channel axis (axis 1) at every position, keeping it.

    Math:
        max   out[n, 0, p] = max_c x[n, c, p]
        mean  out[n, 0, p] = (1/C) Σ_c x[n, c, p]
    Shapes:
        x   (N, C, *S), any number (>= 1) of spatial dims
        out (N, 1, *S)
    """
    _check_input(x, "channel_pool", ndims=None)
    _check_kind(kind, CHANNEL_POOL_KINDS)
    return _channel_pool(x, kind)


@overridable("channel_pool")
def _channel_pool(x: Array, kind: str) -> tuple[Array, ChannelPoolCache]:
    """The math of channel_pool_forward, arguments already checked."""
    xp = namespace(x=x)
    if kind == "mean":
        out = xp.mean(x, axis=1, keepdims=True)  # (N, 1, *S)
        return out, ChannelPoolCache(kind, tuple(x.shape))
    idx = xp.argmax(x, axis=1, keepdims=True)  # (N, 1, *S)
    out = xp.take_along_axis(x, idx, axis=1)  # (N, 1, *S)
    small = _index_dtype(xp, x.shape[1])  # the smallest int dtype for C
    return out, ChannelPoolCache(kind, tuple(x.shape), xp.astype(idx, small))


@routed_by_cache("channel_pool")
def channel_pool_backward(
    dout: Array, cache: ChannelPoolCache, *, into: Array | None = None
) -> Array:
    """VJP of channel_pool.

    Math:
        max   dx[n, c, p] = dout[n, 0, p] if c = idx[n, 0, p] else 0
        mean  dx[n, c, p] = dout[n, 0, p] / C
    Shapes:
        dout (N, 1, *S) -> dx (N, C, *S); for mean a read-only broadcast view.
    into:
        Optional array of x's shape and dtype that the caller owns: dx is added
        into it, in place where the namespace allows, and the sum is returned
        (use the returned array).  A max then touches N·|S| entries instead of
        building a dense routed array.
    Convention:
        max: on a tie the whole gradient goes to the FIRST arg-max channel, as
        torch.max(x, dim=1) does.
    """
    check_into(into, cache.x_shape, dout)
    namespace(dout=dout)  # an array of a supported library
    x_shape = cache.x_shape
    _check_dout(dout, (x_shape[0], 1) + tuple(x_shape[2:]))
    return _channel_pool_backward(dout, cache, into=into)


@routed_by_cache("channel_pool")
def _channel_pool_backward(
    dout: Array, cache: ChannelPoolCache, *, into: Array | None = None
) -> Array:
    """The math of channel_pool_backward, arguments already checked."""
    xp = namespace(dout=dout)
    kind, x_shape, idx = cache
    c = x_shape[1]
    if kind == "mean":
        return _broadcast_into(into, dout / c, x_shape)  # (N, C, *S)
    if into is not None:
        return add_along_axis(into, idx, dout, 1)  # (N, C, *S)
    return route_along_axis(dout, idx, 1, c)  # (N, C, *S)


# ---------------------------------------------------------------------------
# helpers



def _keep_shape(x_shape: Shape) -> Shape:
    return tuple(x_shape[:2]) + (1,) * (len(x_shape) - 2)


def _check_input(x: Any, op: str, *, ndims: tuple[int, ...] | None) -> None:
    """x: a float32/float64 array (N, C, *S) with non-empty C and S, finite."""
    check_array("x", x)
    if ndims is not None and x.ndim not in ndims:
        raise ValueError(
            f"x: {op} expected a 3-D, 4-D or 5-D array (N, C, *S) with 1 to 3 "
            f"spatial dims, got shape {tuple(x.shape)}"
        )
    if ndims is None and x.ndim < 3:
        raise ValueError(
            f"x: {op} expected an array (N, C, *S) with at least one spatial dim, "
            f"got shape {tuple(x.shape)}"
        )
    if any(int(d) == 0 for d in x.shape[1:]):
        raise ValueError(
            f"x: {op} expected non-empty channel and spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    check_finite("x", x)


def _check_dout(dout: Any, shape: Shape) -> None:
    check_array("dout", dout, shape=shape)
    check_finite("dout", dout)


def _check_kind(kind: Any, allowed: tuple[str, ...]) -> None:
    if kind not in allowed or not isinstance(kind, str):
        listing = ", ".join(repr(a) for a in allowed)
        error = ValueError if isinstance(kind, str) else TypeError
        raise error(f"kind: expected one of {listing}, got {kind!r}")


def _geometry(
    x_shape: Shape, kernel_size: Any, stride: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validated (kernel, stride, output spatial size), one entry per spatial dim."""
    spatial = tuple(int(d) for d in x_shape[2:])
    k = as_tuple("kernel_size", kernel_size, len(spatial), minimum=1)
    s = k if stride is None else as_tuple("stride", stride, len(spatial), minimum=1)
    if any(kk > d for kk, d in zip(k, spatial)):
        raise ValueError(
            f"kernel_size: expected at most the input's spatial size {spatial} "
            f"in every dim, got {k}"
        )
    return k, s, _out_size(spatial, k, s)


def _out_size(spatial: Shape, k: Shape, s: Shape) -> Shape:
    return tuple((int(d) - kk) // ss + 1 for d, kk, ss in zip(spatial, k, s))


def _index_dtype(xp: Any, count: int) -> Any:
    """The smallest signed integer dtype that holds offsets 0..count-1."""
    for dt, top in ((xp.int8, 127), (xp.int16, 32767), (xp.int32, 2**31 - 1)):
        if count - 1 <= top:
            return dt
    return xp.int64


def _along(ndim: int, axis: int, sl: slice) -> tuple[slice, ...]:
    """An index that applies `sl` on `axis` and takes everything elsewhere."""
    return (slice(None),) * axis + (sl,) + (slice(None),) * (ndim - axis - 1)


def _windows(
    offset: Shape, s: Shape, so: Shape, c0: int = 0, channels: int | None = None
) -> tuple[slice, ...]:
    """(N, C, *S) index of the elements at window offset `offset` of every
    window (of channels c0 : c0 + channels of a larger buffer, if given)."""
    return _channels(c0, channels) + tuple(
        window(t, ss, n) for t, ss, n in zip(offset, s, so)
    )


def _channels(c0: int, channels: int | None) -> tuple[slice, slice]:
    """(N, C', ...) index of channels c0 : c0 + channels (all when None)."""
    return (slice(None), slice(c0, None if channels is None else c0 + channels))


def _window_sum(xp: Any, x: Array, k: Shape, s: Shape, so: Shape) -> Array:
    """Σ over every window, one spatial axis at a time (last axis first)."""
    val = x
    for d in reversed(range(len(k))):
        ax = 2 + d
        total = val[_along(val.ndim, ax, window(0, s[d], so[d]))]
        for t in range(1, k[d]):
            total = total + val[_along(val.ndim, ax, window(t, s[d], so[d]))]
        val = total  # axis `ax` now has So_d entries
    return val  # (N, C, *So); a view of x only when every K_d is 1


def _window_max(
    xp: Any, x: Array, k: Shape, s: Shape, so: Shape, it: Any
) -> tuple[Array, Array]:
    """Max over every window and the row-major offset of its first arg-max.

    One spatial axis at a time, last axis first.  Along axis d the K_d strided
    slices give the running max m; the local arg-max j is the number of
    leading slices that differ from m (so the first one attaining m wins); the
    offset found so far for the trailing axes is then read from slice j.  This
    yields the lexicographically smallest arg-max, i.e. the first in
    row-major window order.
    """
    val, idx, inner = x, None, 1
    for d in reversed(range(len(k))):
        ax, kd = 2 + d, k[d]
        at = [_along(val.ndim, ax, window(t, s[d], so[d])) for t in range(kd)]
        m = val[at[0]]
        for sl in at[1:]:
            m = xp.maximum(m, val[sl])
        j = None  # local arg-max along this axis, None while it is 0
        missed = None  # all slices so far differ from the max
        for sl in at[:-1]:
            miss = val[sl] != m
            missed = miss if missed is None else xp.logical_and(missed, miss)
            step = xp.astype(missed, it)
            j = step if j is None else j + step
        if idx is not None:
            prev = [idx[sl] for sl in at]
            picked = prev[0]
            if j is not None:
                for t in range(1, kd):  # picked = prev[j]
                    picked = picked + xp.astype(j == t, it) * (prev[t] - prev[0])
            idx = picked if j is None else j * inner + picked
        else:
            idx = j
        val, inner = m, inner * kd
    if idx is None:  # every K_d == 1: each window is a single element
        idx = xp.zeros(val.shape, dtype=it, device=device(x))
        val = xp.asarray(val, copy=True)  # never hand out a view of x
    return val, idx  # (N, C, *So) each


def _grad_buffer(
    xp: Any, dout: Array, x_shape: Shape, k: Shape, s: Shape, so: Shape
) -> Array:
    """A fresh gradient buffer of x's shape for the window-offset scatter.

    Uninitialised only when kernel == stride and the windows tile x exactly,
    so that the K window offsets write every element once; zeros otherwise
    (overlaps, gaps, and the floor-mode tail that gets no gradient).
    """
    make = xp.empty if _tiles(x_shape, k, s, so) else xp.zeros
    return make(tuple(x_shape), dtype=dout.dtype, device=device(dout))  # (N, C, *S)


def _tiles(x_shape: Shape, k: Shape, s: Shape, so: Shape) -> bool:
    """kernel == stride and the windows cover x exactly: the K window offsets
    write every element of x once."""
    return all(kk == ss and o * kk == d for kk, ss, o, d in zip(k, s, so, x_shape[2:]))


def _scatter(dx: Array, index: tuple[slice, ...], g: Array, k: Shape, s: Shape) -> None:
    """dx[index] += g into the buffer from _grad_buffer.

    With stride >= kernel_size in every dim the windows are disjoint, so no
    element is reached twice and the add is a plain store (half the memory
    traffic); overlapping windows go through backend.accumulate.
    """
    if all(ss >= kk for kk, ss in zip(k, s)):
        dx[index] = g
    else:
        accumulate(dx, index, g)


def _l2_norm(xp: Any, xf: Array) -> Array:
    """sqrt(Σ_L x²) per row of (N, C, L), rescaled by max |x| when the plain sum
    of squares overflows or underflows (or a row is all zero)."""
    ss = xp.vecdot(xf, xf)  # (N, C)
    tiny = xp.finfo(xf.dtype).smallest_normal
    if bool(xp.all(xp.logical_and(xp.isfinite(ss), ss >= tiny))):
        return xp.sqrt(ss)
    amax = xp.max(xp.abs(xf), axis=-1, keepdims=True)  # (N, C, 1)
    r = xf / xp.where(amax > 0, amax, 1.0)  # (N, C, L), |r| <= 1
    return amax[..., 0] * xp.sqrt(xp.vecdot(r, r))  # (N, C)
