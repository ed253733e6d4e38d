"""The raw-kernel overrides of the ops' steps, for CuPy arrays.

Each ``<op>_forward`` here computes what the override point of the same
name in ``refattn.ops`` computes (``refattn.ops.overrides``), from the same,
already checked, arguments, with the memory-bound steps done by the kernels
of ``refattn.cuda.launch``, and returns the step's outputs with a cache of
its own type (``<Op>KernelCache``), holding what the kernel backward needs.
The backwards validate ``dout`` as the generic backwards do, so both paths
raise the same errors.  Fields a block reads from an op's cache (``kind``
of a global pool, ``x`` and ``s`` of a gate) keep their generic names.

``OVERRIDES`` says when each kernel is taken (``applies``; never when
``refattn.cuda.kernels_enabled()`` is false) and ``register()``, called by
``refattn.ops.overrides`` when a CuPy array first reaches an override
point, puts them into the ops' table.  ``KERNEL_OPS`` describes the cases.

Math, shapes and conventions are those of the generic ops (their docstrings
are the specification); only what differs is noted here.  Sums are
accumulated in double inside the kernels, for float32 data too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    add_into,
    check_array,
    check_finite,
    check_into,
    check_same_dtype,
    device,
    dtype_name,
    namespace,
    prod,
)
from refattn.cuda import launch as K
from refattn.cuda import wants_kernels
from refattn.ops import norm, overrides
from refattn.ops.conv import SMALL_CONV_MAX_CHANNELS, is_small_conv
from refattn.ops.conv import _check_dout as _check_conv_dout
from refattn.ops.overrides import Override

__all__ = [
    "CGNL_MAX_ORDER",
    "KERNEL_OPS",
    "OVERRIDES",
    "SMALL_CONV_MAX_CHANNELS",
    "BatchNormKernelCache",
    "CgnlMomentsKernelCache",
    "ChannelPoolKernelCache",
    "Conv2dKernelCache",
    "GateMulKernelCache",
    "GlobalPoolKernelCache",
    "GroupNormKernelCache",
    "MaxPoolKernelCache",
    "SoftmaxKernelCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "cgnl_moments_backward",
    "cgnl_moments_forward",
    "channel_pool_backward",
    "channel_pool_forward",
    "conv2d_backward",
    "conv2d_forward",
    "gate_kind",
    "gate_mul_backward",
    "gate_mul_forward",
    "global_pool_backward",
    "global_pool_forward",
    "group_norm_backward",
    "group_norm_forward",
    "is_small_conv",
    "max_pool_backward",
    "max_pool_forward",
    "register",
    "softmax_backward",
    "softmax_forward",
]

gate_kind = K.gate_kind  # 'channel', 'spatial' or None (then: generic)



# ---------------------------------------------------------------------------
# channel pool


class ChannelPoolKernelCache(NamedTuple):
    kind: str  # 'max' or 'mean'
    x_shape: Shape  # (N, C, *S)
    arg: Array  # (N, *S) int64 first arg-max channel (written for either kind)


def channel_pool_forward(x: Array, kind: str) -> tuple[Array, ChannelPoolKernelCache]:
    """channel_pool by one kernel pass that writes the max and the mean planes.

    Shapes:
        x (N, C, *S) -> out (N, 1, *S), a view of the (N, 2, *S) kernel output
    """
    m, arg = K.channel_pool_forward(x)  # (N, 2, *S) [max, mean]; (N, *S)
    plane = 0 if kind == "max" else 1
    out = m[:, plane : plane + 1, ...]  # (N, 1, *S)
    return out, ChannelPoolKernelCache(kind, tuple(x.shape), arg)


def channel_pool_backward(
    dout: Array, cache: ChannelPoolKernelCache, *, into: Array | None = None
) -> Array:
    """VJP of channel_pool by the kernel dx = [c = arg] dmax + dmean / C, with
    dout as the plane of its kind and zeros as the other (so for 'mean' the
    arg-max selects nothing); added into `into` when given."""
    kind, x_shape, arg = cache
    check_into(into, x_shape, dout)
    n, c, spatial = x_shape[0], x_shape[1], tuple(x_shape[2:])
    _check_dout(dout, (n, 1) + spatial)
    xp = namespace(dout=dout)
    dm = xp.zeros((n, 2) + spatial, dtype=dout.dtype, device=device(dout))  # (N, 2, *S)
    plane = 0 if kind == "max" else 1
    dm[:, plane : plane + 1, ...] = dout
    return add_into(into, K.channel_pool_backward(dm, arg, c))  # (N, C, *S)


# ---------------------------------------------------------------------------
# global pools


class GlobalPoolKernelCache(NamedTuple):
    kind: str  # 'avg', 'max', 'lp' or 'lse'
    x_shape: Shape  # (N, C, *S)
    keepdim: bool
    arg: Array | None = None  # (N, C) int64 flat arg-max position ('max')
    x: Array | None = None  # (N, C, *S) the input ('lp', 'lse')
    out: Array | None = None  # (N, C) the pooled values ('lp', 'lse')


def global_pool_forward(
    x: Array, kind: str, keepdim: bool
) -> tuple[Array, GlobalPoolKernelCache]:
    """global_pool with one block of threads per (n, c) map.

    For float64 'lp' whose sum of squares leaves the normal range (where the
    double accumulator overflows or loses precision), the norm is recomputed
    with the rescaling of the generic path.
    """
    xp = namespace(x=x)
    n, c = x.shape[0], x.shape[1]
    out, arg = K.global_pool_forward(x, kind)  # (N, C), (N, C) int64 | None
    if kind == "lp" and dtype_name(x) == "float64":
        out = _l2_in_range(xp, x, out)  # (N, C)
    saved = kind in ("lp", "lse")
    cache = GlobalPoolKernelCache(
        kind,
        tuple(x.shape),
        keepdim,
        arg,
        x if saved else None,
        out if saved else None,
    )
    if keepdim:
        out = xp.reshape(out, (n, c) + (1,) * (x.ndim - 2))  # (N, C, 1, ..., 1)
    return out, cache


def global_pool_backward(
    dout: Array, cache: GlobalPoolKernelCache, *, into: Array | None = None
) -> Array:
    """VJP of global_pool (avg: dout/L, max: to the arg-max, lp: dout·x/‖x‖,
    lse: dout·softmax(x)); dx is a fresh array for every kind, added into
    `into` when given."""
    c = cache
    check_into(into, c.x_shape, dout)
    n, ch = c.x_shape[0], c.x_shape[1]
    keep = (n, ch) + (1,) * (len(c.x_shape) - 2)
    _check_dout(dout, keep if c.keepdim else (n, ch))
    if c.x is not None:
        check_same_dtype(dout=dout, x=c.x)
    xp = namespace(dout=dout)
    g = xp.reshape(dout, (n, ch))  # (N, C)
    dx = K.global_pool_backward(g, c.kind, c.x_shape, x=c.x, out=c.out, arg=c.arg)
    return add_into(into, dx)  # (N, C, *S)


def _l2_in_range(xp: Any, x: Array, out: Array) -> Array:
    """The kernel's sqrt(Σ x²), or, where Σ x² is not a finite normal number,
    max|x| · sqrt(Σ (x / max|x|)²) as in the generic path."""
    ss = out * out  # (N, C)
    tiny = xp.finfo(x.dtype).smallest_normal
    if bool(xp.all(xp.logical_and(xp.isfinite(ss), ss >= tiny))):
        return out
    xf = xp.reshape(x, (x.shape[0], x.shape[1], -1))  # (N, C, L)
    amax = xp.max(xp.abs(xf), axis=-1, keepdims=True)  # (N, C, 1)
    r = xf / xp.where(amax > 0, amax, 1.0)  # (N, C, L)
    return amax[..., 0] * xp.sqrt(xp.vecdot(r, r))  # (N, C)


# ---------------------------------------------------------------------------
# sigmoid gate


class GateMulKernelCache(NamedTuple):
    x: Array  # (N, C, *S) the features being gated
    s: Array  # like z: σ(z), written by the forward kernel


def gate_mul_forward(x: Array, z: Array) -> tuple[Array, GateMulKernelCache]:
    """gate_mul for a channel gate z (N, C, 1, ...) or a spatial gate z (N, 1, *S):
    one element-wise kernel writes out = x ⊙ σ(z) and s = σ(z)."""
    out, s = K.gate_mul_forward(x, z)  # like x, like z
    return out, GateMulKernelCache(x, s)


def gate_mul_backward(dout: Array, cache: GateMulKernelCache) -> tuple[Array, Array]:
    """VJP of gate_mul: dx = dout ⊙ s and dz = s(1 − s) Σ_broadcast dout ⊙ x,
    the sum fused into the same kernel."""
    x, s = cache
    check_array("dout", dout, shape=tuple(x.shape))
    if dout.dtype != x.dtype:
        check_same_dtype(dout=dout, forward=x)
    return K.gate_mul_backward(dout, x, s)  # like x, like z


# ---------------------------------------------------------------------------
# softmax


class SoftmaxKernelCache(NamedTuple):
    y: Array  # like x: the softmax output
    axis: int  # always x.ndim - 1: the kernel normalises rows


def softmax_forward(x: Array, axis: int) -> tuple[Array, SoftmaxKernelCache]:
    """softmax over the last axis, one block of threads per row."""
    y = K.softmax_forward(x, axis=-1)  # like x
    return y, SoftmaxKernelCache(y, x.ndim - 1)


def softmax_backward(dout: Array, cache: SoftmaxKernelCache) -> Array:
    """VJP of softmax: dx = y ⊙ (dout − Σ_row dout ⊙ y), one block per row."""
    y = cache.y
    check_array("dout", dout, shape=tuple(y.shape))
    check_same_dtype(dout=dout, forward=y)
    return K.softmax_backward(dout, y, axis=-1)  # like x


# ---------------------------------------------------------------------------
# max pooling


class MaxPoolKernelCache(NamedTuple):
    arg: Array  # (N, C, *So) int64: flat index of the first arg-max in its
    #             (N, C) input plane, d·H·W + h·W + w (as PyTorch's indices)
    x_shape: Shape  # (N, C, *S)


def max_pool_forward(
    x: Array, kernel_size: Shape, stride: Shape, out_size: Shape
) -> tuple[Array, MaxPoolKernelCache]:
    """max_pool with one thread per output (the kernel sizes its own output)."""
    out, arg = K.max_pool_forward(x, kernel_size, stride)  # (N, C, *So) twice
    return out, MaxPoolKernelCache(arg, tuple(x.shape))


def max_pool_backward(
    dout: Array, cache: MaxPoolKernelCache, *, out: tuple[Array, int] | None = None
) -> Array:
    """VJP of max_pool: dx[n, c, arg] += dout (atomicAdd, so where windows
    overlap the float sums may differ between runs in the last bit).  With
    ``out=(buf, c0)`` dx is copied into buf's channels c0 : c0 + C and buf is
    returned (see the generic ``_max_pool_backward``)."""
    arg, x_shape = cache
    _check_dout(dout, tuple(arg.shape))
    dx = K.max_pool_backward(dout, arg, x_shape)  # (N, C, *S)
    if out is None:
        return dx
    buf, c0 = out  # (N, C', *S)
    buf[:, c0 : c0 + x_shape[1]] = dx
    return buf


# ---------------------------------------------------------------------------
# small k x k convolution


class Conv2dKernelCache(NamedTuple):
    x: Array  # (N, C, H, W) the input (the dW kernel reads it)
    weight: Array  # (O, C, k, k)
    has_bias: bool


def conv2d_forward(
    x: Array, weight: Array, bias: Array | None, *geometry: Any
) -> tuple[Array, Conv2dKernelCache]:
    """conv2d in the is_small_conv case, which fixes the geometry (stride,
    padding, dilation, groups): one thread per output element."""
    out = K.small_conv_forward(x, weight, bias)  # (N, O, H, W)
    return out, Conv2dKernelCache(x, weight, bias is not None)


def conv2d_backward(
    dout: Array, cache: Conv2dKernelCache
) -> tuple[Array, Array, Array | None]:
    """VJP of conv2d: dx as a gather (one thread per input element, no
    atomics), dW with one block of threads per weight, db = Σ dout."""
    x, weight, has_bias = cache
    _check_conv_dout(dout, weight, (x.shape[0], weight.shape[0]) + tuple(x.shape[2:]))
    return K.small_conv_backward(dout, x, weight, with_bias=has_bias)


# ---------------------------------------------------------------------------
# batch norm


class BatchNormKernelCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (C,) 1/sqrt(var + eps), batch or running variance
    weight: Array | None  # (C,) γ, or None
    has_bias: bool
    training: bool


def batch_norm_forward(
    x: Array, weight: Array | None, bias: Array | None, running_mean: Array | None,
    running_var: Array | None, training: bool, momentum: float, eps: float,
) -> tuple[tuple[Array, Array | None, Array | None], BatchNormKernelCache]:
    """batch_norm with the per-channel mean and biased variance (train) from
    one kernel launch (two passes over each channel, summed in double);
    normalisation, affine map and running averages as array expressions.
    The check the generic op makes inside its math in train mode (one value
    per channel) is made here too, with the same message.  Eval mode has no
    reduction: it runs the generic math, and its cache (as a
    BatchNormKernelCache) routes the backward to the kernel sums.

    Returns ``((y, running_mean', running_var'), cache)``.
    """
    if not training:
        out, generic = norm._batch_norm.__wrapped__(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        return out, BatchNormKernelCache(*generic)
    xp = namespace(x=x)
    N, C = x.shape[0], x.shape[1]
    M = N * prod(x.shape[2:])  # values per channel
    col = (1, C) + (1,) * (x.ndim - 2)  # (C,) against (N, C, *S)
    if M == 1:
        raise ValueError(
            "batch_norm: training needs more than one value per channel, "
            f"got input shape {tuple(x.shape)}"
        )
    mean, var = K.batch_norm_stats(x)  # (C,), (C,) biased
    _check_statistics(xp, x, mean, var, "per-channel")
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    new_mean, new_var = norm._running_averages(
        running_mean, running_var, mean, var, M, momentum
    )  # (C,), (C,), or None without running statistics
    xhat = x - xp.reshape(mean, col)  # (N, C, *S)
    xhat *= xp.reshape(inv_std, col)  # in place on the fresh difference
    y = norm._affine(xp, xhat, weight, bias)  # (N, C, *S)
    cache = BatchNormKernelCache(xhat, inv_std, weight, bias is not None, training)
    return (y, new_mean, new_var), cache


def batch_norm_backward(
    dout: Array, cache: BatchNormKernelCache
) -> tuple[Array, Array | None, Array | None]:
    """VJP of batch_norm; Σ dout and Σ dout ⊙ x̂ per channel from one kernel
    launch, dx from them as an array expression."""
    xhat, inv_std, weight, has_bias, training = cache
    check_array("dout", dout, shape=tuple(xhat.shape))
    check_same_dtype(dout=dout, forward=xhat)
    xp = namespace(dout=dout)
    N, C = xhat.shape[0], xhat.shape[1]
    M = N * prod(xhat.shape[2:])
    col = (1, C) + (1,) * (xhat.ndim - 2)
    dbias, dweight = K.batch_norm_sums(dout, xhat)  # (C,), (C,)
    scale = inv_std if weight is None else weight * inv_std  # (C,)
    dx = dout * xp.reshape(scale, col)  # (N, C, *S)
    if training:
        dx -= xhat * xp.reshape(scale * (dweight / M), col)
        dx -= xp.reshape(scale * (dbias / M), col)
    return dx, (None if weight is None else dweight), (dbias if has_bias else None)


# ---------------------------------------------------------------------------
# group norm


class GroupNormKernelCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (N, G) 1/sqrt(var + eps)
    weight: Array | None  # (C,) γ, or None
    has_bias: bool


def group_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    num_groups: int,
    eps: float,
) -> tuple[Array, GroupNormKernelCache]:
    """group_norm with the mean and biased variance of every (n, group) from
    one kernel launch; the rest as array expressions."""
    xp = namespace(x=x)
    N, G = x.shape[0], num_groups
    mean, var = K.group_norm_stats(x, G)  # (N, G), (N, G)
    _check_statistics(xp, x, mean, var, "per-group")
    inv_std = 1.0 / xp.sqrt(var + eps)  # (N, G)
    xg = xp.reshape(x, (N, G, -1))  # (N, G, K)
    xhat = xg - xp.reshape(mean, (N, G, 1))  # (N, G, K)
    xhat *= xp.reshape(inv_std, (N, G, 1))  # in place on the fresh difference
    xhat = xp.reshape(xhat, tuple(x.shape))  # (N, C, *S)
    y = norm._affine(xp, xhat, weight, bias)  # (N, C, *S)
    return y, GroupNormKernelCache(xhat, inv_std, weight, bias is not None)


def group_norm_backward(
    dout: Array, cache: GroupNormKernelCache
) -> tuple[Array, Array | None, Array | None]:
    """VJP of group_norm; the group sums Σ γ dout and Σ γ dout ⊙ x̂ per (n, g)
    from one kernel launch, dγ and dβ (per-channel sums) from a second."""
    xhat, inv_std, weight, has_bias = cache
    check_array("dout", dout, shape=tuple(xhat.shape))
    check_same_dtype(dout=dout, forward=xhat)
    xp = namespace(dout=dout)
    N, C, G = xhat.shape[0], xhat.shape[1], inv_std.shape[1]
    K_ = (C // G) * prod(xhat.shape[2:])  # values per (n, group)
    s_dy, s_dy_xhat = K.group_norm_sums(dout, xhat, G, weight)  # (N, G), (N, G)
    # dx = γ·inv·dout − x̂·inv·mean_g(dx̂ ⊙ x̂) − inv·mean_g(dx̂), per group
    col = (1, C) + (1,) * (xhat.ndim - 2)
    gdout = dout if weight is None else dout * xp.reshape(weight, col)  # (N, C, *S)
    dx = xp.reshape(gdout, (N, G, K_))  # (N, G, K): γ ⊙ dout
    xhat_g = xp.reshape(xhat, (N, G, K_))  # (N, G, K)
    dx = dx - xhat_g * xp.reshape(s_dy_xhat / K_, (N, G, 1))  # fresh (N, G, K)
    dx -= xp.reshape(s_dy / K_, (N, G, 1))
    dx *= xp.reshape(inv_std, (N, G, 1))
    dx = xp.reshape(dx, tuple(xhat.shape))  # (N, C, *S)
    dweight = dbias = None
    if weight is not None or has_bias:
        dbias, dweight = K.batch_norm_sums(dout, xhat)  # (C,), (C,)
    return dx, (dweight if weight is not None else None), (dbias if has_bias else None)


# ---------------------------------------------------------------------------
# CGNL's Taylor moments (a step of refattn.blocks.cgnl, not an op)

CGNL_MAX_ORDER = K.CGNL_MAX_ORDER
"""Highest Taylor order the moment kernels take; higher orders: generic."""


class CgnlMomentsKernelCache(NamedTuple):
    p: Array  # (N, G, M) φ
    w: Array  # (N, G, M) the weights of the moments


def cgnl_moments_forward(
    p: Array, w: Array, order: int
) -> tuple[Array, CgnlMomentsKernelCache]:
    """The raw moments of one CGNL group, one block of threads per (n, group).

    Math:
        s[n, g, q] = Σ_M p^q w,   q = 0..order
    Shapes:
        p, w (N, G, M) -> s (N, G, order + 1)
    """
    xp = namespace(p=p)
    N, G, M = (int(v) for v in p.shape)
    s = K.cgnl_moments_forward(
        xp.reshape(p, (N * G, M)), xp.reshape(w, (N * G, M)), order
    )  # (N·G, Q+1)
    return xp.reshape(s, (N, G, order + 1)), CgnlMomentsKernelCache(p, w)


def cgnl_moments_backward(
    ds: Array, cache: CgnlMomentsKernelCache
) -> tuple[Array, Array]:
    """VJP of cgnl_moments_forward, one thread per element.

    Math:
        dp = w ⊙ Σ_q ds_q q p^(q−1),   dw = Σ_q ds_q p^q
    Shapes:
        ds (N, G, Q+1), p, w (N, G, M) -> dp, dw (N, G, M)
    """
    p, w = cache
    xp = namespace(ds=ds)
    N, G, M = (int(v) for v in p.shape)
    dp, dw = K.cgnl_moments_backward(
        xp.reshape(ds, (N * G, ds.shape[-1])),
        xp.reshape(p, (N * G, M)),
        xp.reshape(w, (N * G, M)),
    )  # (N·G, M) each
    return xp.reshape(dp, (N, G, M)), xp.reshape(dw, (N, G, M))


# ---------------------------------------------------------------------------
# the override table: when each kernel is taken


def _on_device(*arrays: Array | None) -> bool:
    """Every given array a CuPy array, kernels enabled, at most 3 spatial dims."""
    return wants_kernels(*arrays) and arrays[0].ndim <= 5


OVERRIDES: dict[str, Override] = {
    "channel_pool": Override(
        lambda x, kind: _on_device(x),
        channel_pool_forward,
        channel_pool_backward,
        ChannelPoolKernelCache,
        "kind 'max' or 'mean'; 1 to 3 spatial dims",
    ),
    "global_pool": Override(
        lambda x, kind, keepdim: _on_device(x),
        global_pool_forward,
        global_pool_backward,
        GlobalPoolKernelCache,
        "kind 'avg', 'max', 'lp' or 'lse'; 1 to 3 spatial dims",
    ),
    "gate_mul": Override(
        lambda x, z: _on_device(x, z) and gate_kind(x.shape, z.shape) is not None,
        gate_mul_forward,
        gate_mul_backward,
        GateMulKernelCache,
        "channel gate z (N, C, 1, ...) or spatial gate z (N, 1, *S); "
        "x with 0 to 3 spatial dims",
    ),
    "softmax": Override(
        lambda x, axis: wants_kernels(x) and axis == x.ndim - 1,
        softmax_forward,
        softmax_backward,
        SoftmaxKernelCache,
        "the last axis",
    ),
    "max_pool": Override(
        lambda x, *geometry: wants_kernels(x),
        max_pool_forward,
        max_pool_backward,
        MaxPoolKernelCache,
        "1, 2 and 3 spatial dims (every case the op accepts)",
    ),
    "conv2d": Override(
        lambda x, weight, bias, *geometry: (
            wants_kernels(x, weight, bias) and is_small_conv(weight.shape, *geometry)
        ),
        conv2d_forward,
        conv2d_backward,
        Conv2dKernelCache,
        f"C_in, C_out <= {SMALL_CONV_MAX_CHANNELS}, odd square k >= 3, padding "
        "(k - 1) / 2, stride 1, dilation 1, groups 1 (CBAM's spatial conv)",
    ),
    "batch_norm": Override(
        lambda x, weight, bias, mean, var, *options: wants_kernels(
            x, weight, bias, mean, var
        ),
        batch_norm_forward,
        batch_norm_backward,
        BatchNormKernelCache,
        "train and eval; statistics and backward sums by kernel",
    ),
    "group_norm": Override(
        lambda x, weight, bias, *options: wants_kernels(x, weight, bias),
        group_norm_forward,
        group_norm_backward,
        GroupNormKernelCache,
        "statistics and backward sums by kernel",
    ),
    "cgnl_moments": Override(
        lambda p, w, order: wants_kernels(p, w) and order <= CGNL_MAX_ORDER,
        cgnl_moments_forward,
        cgnl_moments_backward,
        CgnlMomentsKernelCache,
        f"CGNL's Taylor moments Σ φ^q w and their VJP, order <= {CGNL_MAX_ORDER}",
    ),
}
"""Override point -> its kernel variant and when it is taken."""

KERNEL_OPS: dict[str, str] = {name: o.description for name, o in OVERRIDES.items()}
"""Override point -> the cases that take its raw kernel on CuPy (others: generic)."""


def register() -> None:
    """Put the kernels into the ops' override table (refattn.ops.overrides)."""
    for name, override in OVERRIDES.items():
        overrides.register(name, override)


# ---------------------------------------------------------------------------
# helpers


def _check_dout(dout: Array, shape: Shape) -> None:
    check_array("dout", dout, shape=shape)
    check_finite("dout", dout)


def _check_statistics(xp: Any, x: Array, mean: Array, var: Array, what: str) -> None:
    """As the generic norms: a non-finite statistic is a NaN/Inf in x (named
    and counted by check_finite) or an overflow of x's dtype."""
    if bool(xp.all(xp.isfinite(mean))) and bool(xp.all(xp.isfinite(var))):
        return
    check_finite("x", x)
    which = "mean" if not bool(xp.all(xp.isfinite(mean))) else "variance"
    raise ValueError(
        f"x: the {what} {which} overflows {dtype_name(x)}, "
        f"got values up to {float(xp.max(xp.abs(x))):g} in magnitude"
    )
