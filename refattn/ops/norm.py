"""Batch normalisation and group normalisation over (N, C, *S) inputs.

S is the spatial shape: () for (N, C), (L,), (H, W) or (T, H, W).  The
affine vectors `weight` (γ) and `bias` (β) have shape (C,) and may each be
None (no scale / no shift).  BatchNorm's running statistics are buffers:
they are never differentiated and never written to; train mode returns
their updated values as new arrays.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
    check_finite,
    check_same_dtype,
    namespace,
)

__all__ = [
    "BatchNormCache",
    "BatchNormOut",
    "GroupNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "group_norm_backward",
    "group_norm_forward",
]

_NDIM = (2, 3, 4, 5)  # (N, C, *S) with spatial rank 0..3


# ---------------------------------------------------------------------------
# batch norm


class BatchNormOut(NamedTuple):
    y: Array  # (N, C, *S)
    running_mean: Array | None  # (C,) updated (train) or the given array (eval)
    running_var: Array | None  # (C,)


class BatchNormCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (1, C, 1...) 1/sqrt(var + eps), batch or running var
    weight: Array | None  # (C,) γ, or None
    has_bias: bool  # whether β was given (dbias is None otherwise)
    training: bool  # batch statistics (True) or running statistics (False)


def batch_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[BatchNormOut, BatchNormCache]:
    """Batch normalisation per channel, PyTorch semantics.

    Math:
        train: μ = mean_{N,S} x,  σ² = mean_{N,S} (x − μ)²  (biased)
               running_mean' = (1 − m)·running_mean + m·μ
               running_var'  = (1 − m)·running_var  + m·σ²·M/(M − 1)   (unbiased)
               with M = N·prod(S) values per channel
        eval:  μ = running_mean,  σ² = running_var  (returned unchanged)
        x̂ = (x − μ)/sqrt(σ² + eps),   y = γ ⊙ x̂ + β
    Shapes:
        x, y                     (N, C, *S) with S = (), (L,), (H, W) or (T, H, W)
        weight, bias             (C,) or None
        running_mean, running_var  (C,); None allowed in train mode only
                                   (the returned ones are then None too)
    """
    check_array("x", x, ndim=_NDIM)
    xp = namespace(
        x=x,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    C = x.shape[1]
    _check_affine(weight, bias, C)
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {training!r}")
    momentum = _check_real("momentum", momentum, low=0.0, high=1.0)
    eps = _check_real("eps", eps, low=0.0, low_open=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean, running_var: expected both arrays or both None, got "
            f"running_mean={_describe(running_mean)}, "
            f"running_var={_describe(running_var)}"
        )
    if running_mean is None and not training:
        raise ValueError(
            "running_mean, running_var: eval mode (training=False) normalises with "
            "the running statistics, so both are required, got None"
        )
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if a is not None:
            check_array(name, a, shape=(C,))
            check_finite(name, a)
    check_same_dtype(
        x=x,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    _check_nonempty(x)
    check_finite("x", x)

    axes = (0,) + tuple(range(2, x.ndim))  # every axis but C
    bshape = (1, C) + (1,) * (x.ndim - 2)  # (C,) broadcast against x
    M = _prod(x.shape) // C  # values per channel
    if training:
        if M == 1:
            raise ValueError(
                "batch_norm: training needs more than one value per channel, "
                f"got input shape {tuple(x.shape)}"
            )
        mean = xp.mean(x, axis=axes, keepdims=True)  # (1, C, 1...)
        xc = x - mean  # (N, C, *S)
        var = xp.mean(xc * xc, axis=axes, keepdims=True)  # (1, C, 1...) biased
        inv_std = 1.0 / xp.sqrt(var + eps)  # (1, C, 1...)
        xhat = xc * inv_std  # (N, C, *S)
        if running_mean is None:
            new_mean = new_var = None
        else:
            # buffers: fresh arrays, the unbiased variance goes into the average
            new_mean = (1.0 - momentum) * running_mean + momentum * xp.reshape(
                mean, (C,)
            )  # (C,)
            new_var = (1.0 - momentum) * running_var + momentum * (M / (M - 1)) * (
                xp.reshape(var, (C,))
            )  # (C,)
    else:
        if not bool(xp.all(running_var >= 0)):
            raise ValueError(
                "running_var: expected non-negative values, got a minimum of "
                f"{float(xp.min(running_var))}"
            )
        inv_std = xp.reshape(1.0 / xp.sqrt(running_var + eps), bshape)  # (1, C, 1...)
        xhat = (x - xp.reshape(running_mean, bshape)) * inv_std  # (N, C, *S)
        new_mean, new_var = running_mean, running_var
    y = _affine(xp, xhat, weight, bias, bshape)  # (N, C, *S)
    out = BatchNormOut(y, new_mean, new_var)
    return out, BatchNormCache(xhat, inv_std, weight, bias is not None, training)


def batch_norm_backward(
    dout: Array, cache: BatchNormCache
) -> tuple[Array, Array | None, Array | None]:
    """VJP of batch_norm with respect to x, weight and bias.

    Math:
        dbias   = Σ_{N,S} dout
        dweight = Σ_{N,S} dout ⊙ x̂
        dx̂     = γ ⊙ dout                               (γ = 1 without weight)
        train:  dx = (dx̂ − mean_{N,S} dx̂ − x̂ ⊙ mean_{N,S}(dx̂ ⊙ x̂)) / sqrt(σ² + eps)
                   = γ/sqrt(σ² + eps) ⊙ (dout − dbias/M − x̂ ⊙ dweight/M)
        eval:   dx = dx̂ / sqrt(running_var + eps)
    The running statistics are buffers and get no gradient.
    Shapes:
        dout, dx          (N, C, *S)
        dweight, dbias    (C,), or None where weight / bias was None
    """
    xhat, inv_std, weight, has_bias, training = cache
    check_array("dout", dout, shape=tuple(xhat.shape))
    check_same_dtype(dout=dout, forward=xhat)
    xp = namespace(dout=dout)
    C = xhat.shape[1]
    axes = (0,) + tuple(range(2, xhat.ndim))
    bshape = tuple(inv_std.shape)  # (1, C, 1...)
    scale = inv_std if weight is None else xp.reshape(weight, bshape) * inv_std
    dbias_b = xp.sum(dout, axis=axes, keepdims=True)  # (1, C, 1...)
    dweight_b = xp.sum(dout * xhat, axis=axes, keepdims=True)  # (1, C, 1...)
    if training:
        M = _prod(xhat.shape) // C
        # the two means of the formula are γ·dbias/M and γ·dweight/M
        dx = scale * (dout - dbias_b / M - xhat * (dweight_b / M))  # (N, C, *S)
    else:
        dx = dout * scale  # (N, C, *S)
    dweight = None if weight is None else xp.reshape(dweight_b, (C,))  # (C,)
    dbias = xp.reshape(dbias_b, (C,)) if has_bias else None  # (C,)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# group norm


class GroupNormCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (N, G, 1) 1/sqrt(var + eps) per sample and group
    weight: Array | None  # (C,) γ, or None
    has_bias: bool  # whether β was given (dbias is None otherwise)


def group_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    *,
    num_groups: int,
    eps: float = 1e-5,
) -> tuple[Array, GroupNormCache]:
    """Group normalisation: statistics per sample over each group of channels.

    Math:
        channels split into G groups of C/G; for each (n, g), over the
        K = (C/G)·prod(S) values of the group:
        μ = mean x,  σ² = mean (x − μ)²  (biased)
        x̂ = (x − μ)/sqrt(σ² + eps),   y = γ ⊙ x̂ + β   (γ, β per channel)
    Shapes:
        x, y          (N, C, *S) with S = (), (L,), (H, W) or (T, H, W)
        weight, bias  (C,) or None
    """
    check_array("x", x, ndim=_NDIM)
    xp = namespace(x=x, weight=weight, bias=bias)
    N, C = x.shape[0], x.shape[1]
    _check_affine(weight, bias, C)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(
            f"num_groups: expected a positive divisor of the channel count C={C}, "
            f"got {num_groups}"
        )
    G = int(num_groups)
    eps = _check_real("eps", eps, low=0.0, low_open=True)
    check_same_dtype(x=x, weight=weight, bias=bias)
    _check_nonempty(x)
    check_finite("x", x)

    K = _prod(x.shape) // (N * G)  # values per (n, group)
    xg = xp.reshape(x, (N, G, K))  # (N, G, K)
    mean = xp.mean(xg, axis=-1, keepdims=True)  # (N, G, 1)
    xc = xg - mean  # (N, G, K)
    var = xp.mean(xc * xc, axis=-1, keepdims=True)  # (N, G, 1) biased
    inv_std = 1.0 / xp.sqrt(var + eps)  # (N, G, 1)
    xhat = xp.reshape(xc * inv_std, tuple(x.shape))  # (N, C, *S)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    y = _affine(xp, xhat, weight, bias, bshape)  # (N, C, *S)
    return y, GroupNormCache(xhat, inv_std, weight, bias is not None)


def group_norm_backward(
    dout: Array, cache: GroupNormCache
) -> tuple[Array, Array | None, Array | None]:
    """VJP of group_norm with respect to x, weight and bias.

    Math:
        dbias   = Σ_{N,S} dout
        dweight = Σ_{N,S} dout ⊙ x̂
        dx̂     = γ ⊙ dout                                  (γ = 1 without weight)
        dx      = (dx̂ − mean_g dx̂ − x̂ ⊙ mean_g(dx̂ ⊙ x̂)) / sqrt(σ² + eps)
    where mean_g averages over the K values of each (n, group).
    Shapes:
        dout, dx          (N, C, *S)
        dweight, dbias    (C,), or None where weight / bias was None
    """
    xhat, inv_std, weight, has_bias = cache
    check_array("dout", dout, shape=tuple(xhat.shape))
    check_same_dtype(dout=dout, forward=xhat)
    xp = namespace(dout=dout)
    N, C = xhat.shape[0], xhat.shape[1]
    G = inv_std.shape[1]
    K = _prod(xhat.shape) // (N * G)
    axes = (0,) + tuple(range(2, xhat.ndim))
    bshape = (1, C) + (1,) * (xhat.ndim - 2)
    dout_xhat = dout * xhat  # (N, C, *S)
    if weight is None:
        dxhat, dxhat_xhat = dout, dout_xhat  # (N, C, *S)
    else:
        g = xp.reshape(weight, bshape)  # (1, C, 1...)
        dxhat, dxhat_xhat = dout * g, dout_xhat * g  # (N, C, *S)
    dxhat = xp.reshape(dxhat, (N, G, K))  # (N, G, K)
    dx = inv_std * (
        dxhat
        - xp.mean(dxhat, axis=-1, keepdims=True)
        - xp.reshape(xhat, (N, G, K))
        * xp.mean(xp.reshape(dxhat_xhat, (N, G, K)), axis=-1, keepdims=True)
    )  # (N, G, K)
    dx = xp.reshape(dx, tuple(xhat.shape))  # (N, C, *S)
    dweight = None if weight is None else xp.sum(dout_xhat, axis=axes)  # (C,)
    dbias = xp.sum(dout, axis=axes) if has_bias else None  # (C,)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# helpers


def _affine(
    xp: Any, xhat: Array, weight: Array | None, bias: Array | None, bshape: Shape
) -> Array:
    """γ ⊙ x̂ + β with per-channel γ, β (either may be None)."""
    y = xhat
    if weight is not None:
        y = y * xp.reshape(weight, bshape)
    if bias is not None:
        y = y + xp.reshape(bias, bshape)
    return y


def _check_affine(weight: Array | None, bias: Array | None, C: int) -> None:
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            check_array(name, a, shape=(C,))
            check_finite(name, a)


def _check_real(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    if not math.isfinite(v) or too_low or v > high:
        lo = "(" if low_open else "["
        hi = f"{high}]" if math.isfinite(high) else "inf)"
        raise ValueError(f"{name}: expected a value in {lo}{low}, {hi}, got {value!r}")
    return v


def _check_nonempty(x: Array) -> None:
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"x: expected a non-empty array, got shape {tuple(x.shape)}")


def _describe(a: Array | None) -> str:
    return "None" if a is None else f"array of shape {tuple(a.shape)}"


def _prod(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
