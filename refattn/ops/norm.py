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

from refattn._typing import Array
from refattn.backend import (
    NonFiniteError,
    check_array,
    check_finite,
    check_same_dtype,
    dtype_name,
    namespace,
    prod,
)
from refattn.ops.overrides import overridable, routed_by_cache

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


NormGrads = tuple[Array, Array | None, Array | None]  # dx, dweight, dbias


class BatchNormOut(NamedTuple):
    y: Array  # (N, C, *S)
    running_mean: Array | None  # (C,) updated (train) or the given array (eval)
    running_var: Array | None  # (C,)


class BatchNormCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (C,) 1/sqrt(var + eps), batch or running variance
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
    namespace(  # arrays of one library and device
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
    if not training:  # training finds a NaN/Inf of x through its statistics
        check_finite("x", x)
    out, cache = _batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps
    )
    return BatchNormOut(*out), cache


@overridable("batch_norm")
def _batch_norm(
    x: Array, weight: Array | None, bias: Array | None, running_mean: Array | None,
    running_var: Array | None, training: bool, momentum: float, eps: float,
) -> tuple[tuple[Array, Array | None, Array | None], BatchNormCache]:
    """The math of batch_norm_forward, arguments already checked (x too in eval
    mode; in training a NaN/Inf of x shows in the statistics)."""
    xp = namespace(x=x)
    N, C = x.shape[0], x.shape[1]
    L = prod(x.shape[2:])  # positions per sample
    M = N * L  # values per channel
    x3 = xp.reshape(x, (N, C, L))  # (N, C, L)
    if training:
        if M == 1:
            raise ValueError(
                "batch_norm: training needs more than one value per channel, "
                f"got input shape {tuple(x.shape)}"
            )
        mean = xp.mean(x3, axis=(0, 2))  # (C,)
        _check_statistic(xp, x, mean, "per-channel mean")
        xc = x3 - xp.reshape(mean, (1, C, 1))  # (N, C, L)
        var = xp.sum(_rowdot(xp, xc, xc), axis=0) / M  # (C,) biased
        _check_statistic(xp, x, var, "per-channel variance")
        inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
        xc *= xp.reshape(inv_std, (1, C, 1))  # x̂, in place on the fresh xc
        new_mean, new_var = _running_averages(
            running_mean, running_var, mean, var, M, momentum
        )
    else:
        if not bool(xp.all(running_var >= 0)):
            raise ValueError(
                "running_var: expected non-negative values, got a minimum of "
                f"{float(xp.min(running_var))}"
            )
        inv_std = 1.0 / xp.sqrt(running_var + eps)  # (C,)
        xc = x3 - xp.reshape(running_mean, (1, C, 1))  # (N, C, L)
        xc *= xp.reshape(inv_std, (1, C, 1))  # x̂, in place on the fresh xc
        new_mean, new_var = running_mean, running_var
    xhat = xp.reshape(xc, tuple(x.shape))  # (N, C, *S)
    y = _affine(xp, xhat, weight, bias)  # (N, C, *S)
    cache = BatchNormCache(xhat, inv_std, weight, bias is not None, training)
    return (y, new_mean, new_var), cache


@routed_by_cache("batch_norm")
def batch_norm_backward(dout: Array, cache: BatchNormCache) -> NormGrads:
    """VJP of batch_norm with respect to x, weight and bias.

    Math:
        dbias   = Σ_{N,S} dout
        dweight = Σ_{N,S} dout ⊙ x̂
        dx̂     = γ ⊙ dout                               (γ = 1 without weight)
        train:  dx = (dx̂ − mean_{N,S} dx̂ − x̂ ⊙ mean_{N,S}(dx̂ ⊙ x̂)) / sqrt(σ² + eps)
                   = γ/sqrt(σ² + eps) ⊙ (dout − dbias/M − x̂ ⊙ dweight/M)
        eval:   dx = dx̂ / sqrt(running_var + eps)
    Shapes:
        dout, dx          (N, C, *S)
        dweight, dbias    (C,), or None where weight / bias was None
    The running statistics are buffers and get no gradient.
    """
    _check_dout(dout, cache.xhat)
    return _batch_norm_backward(dout, cache)


@routed_by_cache("batch_norm")
def _batch_norm_backward(dout: Array, cache: BatchNormCache) -> NormGrads:
    """The math of batch_norm_backward, arguments already checked."""
    xhat, inv_std, weight, has_bias, training = cache
    xp = namespace(dout=dout)
    N, C = xhat.shape[0], xhat.shape[1]
    L = prod(xhat.shape[2:])
    M = N * L
    dout3 = xp.reshape(dout, (N, C, L))  # (N, C, L)
    xhat3 = xp.reshape(xhat, (N, C, L))  # (N, C, L)
    dbias = xp.sum(dout3, axis=(0, 2))  # (C,)
    dweight = xp.sum(_rowdot(xp, dout3, xhat3), axis=0)  # (C,)
    scale = inv_std if weight is None else weight * inv_std  # (C,) γ/sqrt(σ² + eps)
    dx = dout3 * xp.reshape(scale, (1, C, 1))  # (N, C, L)
    if training:
        # the two batch means of the formula are γ·dweight/M and γ·dbias/M
        dx -= xhat3 * xp.reshape(scale * (dweight / M), (1, C, 1))
        dx -= xp.reshape(scale * (dbias / M), (1, C, 1))
    dx = xp.reshape(dx, tuple(xhat.shape))  # (N, C, *S)
    return dx, (None if weight is None else dweight), (dbias if has_bias else None)


# ---------------------------------------------------------------------------
# group norm


class GroupNormCache(NamedTuple):
    xhat: Array  # (N, C, *S) normalised input
    inv_std: Array  # (N, G) 1/sqrt(var + eps) per sample and group
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
    namespace(x=x, weight=weight, bias=bias)  # arrays of one library and device
    C = x.shape[1]
    _check_affine(weight, bias, C)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(
            f"num_groups: expected a positive divisor of the channel count C={C}, "
            f"got {num_groups}"
        )
    eps = _check_real("eps", eps, low=0.0, low_open=True)
    check_same_dtype(x=x, weight=weight, bias=bias)
    _check_nonempty(x)
    return _group_norm(x, weight, bias, int(num_groups), eps)


@overridable("group_norm")
def _group_norm(
    x: Array, weight: Array | None, bias: Array | None, G: int, eps: float
) -> tuple[Array, GroupNormCache]:
    """The math of group_norm_forward, arguments already checked (a NaN/Inf of
    x shows in the statistics)."""
    xp = namespace(x=x)
    N = x.shape[0]
    K = prod(x.shape) // (N * G)  # values per (n, group)
    xg = xp.reshape(x, (N, G, K))  # (N, G, K)
    mean = xp.mean(xg, axis=-1)  # (N, G)
    _check_statistic(xp, x, mean, "per-group mean")
    xc = xg - xp.reshape(mean, (N, G, 1))  # (N, G, K)
    var = _rowdot(xp, xc, xc) / K  # (N, G) biased
    _check_statistic(xp, x, var, "per-group variance")
    inv_std = 1.0 / xp.sqrt(var + eps)  # (N, G)
    xc *= xp.reshape(inv_std, (N, G, 1))  # x̂, in place on the fresh xc
    xhat = xp.reshape(xc, tuple(x.shape))  # (N, C, *S)
    y = _affine(xp, xhat, weight, bias)  # (N, C, *S)
    return y, GroupNormCache(xhat, inv_std, weight, bias is not None)


@routed_by_cache("group_norm")
def group_norm_backward(dout: Array, cache: GroupNormCache) -> NormGrads:
    """VJP of group_norm with respect to x, weight and bias.

    Math (mean_g averages over the K values of each (n, group)):
        dbias   = Σ_{N,S} dout
        dweight = Σ_{N,S} dout ⊙ x̂
        dx̂     = γ ⊙ dout                                  (γ = 1 without weight)
        dx      = (dx̂ − mean_g dx̂ − x̂ ⊙ mean_g(dx̂ ⊙ x̂)) / sqrt(σ² + eps)
    Both group means come from per-(n, c) sums: mean_g dx̂ = Σ_{c∈g} γ_c Σ_S dout / K
    and mean_g(dx̂ ⊙ x̂) = Σ_{c∈g} γ_c Σ_S (dout ⊙ x̂) / K.
    Shapes:
        dout, dx          (N, C, *S)
        dweight, dbias    (C,), or None where weight / bias was None
    """
    _check_dout(dout, cache.xhat)
    return _group_norm_backward(dout, cache)


@routed_by_cache("group_norm")
def _group_norm_backward(dout: Array, cache: GroupNormCache) -> NormGrads:
    """The math of group_norm_backward, arguments already checked."""
    xhat, inv_std, weight, has_bias = cache
    xp = namespace(dout=dout)
    N, C = xhat.shape[0], xhat.shape[1]
    G = inv_std.shape[1]
    L = prod(xhat.shape[2:])
    K = (C // G) * L
    dout3 = xp.reshape(dout, (N, C, L))  # (N, C, L)
    xhat3 = xp.reshape(xhat, (N, C, L))  # (N, C, L)
    db_nc = xp.sum(dout3, axis=-1)  # (N, C)  Σ_S dout
    dw_nc = _rowdot(xp, dout3, xhat3)  # (N, C)  Σ_S dout ⊙ x̂
    if weight is not None:
        gdb_nc, gdw_nc = db_nc * weight, dw_nc * weight  # (N, C)
    else:
        gdb_nc, gdw_nc = db_nc, dw_nc  # (N, C)
    mean_dxhat = xp.sum(xp.reshape(gdb_nc, (N, G, C // G)), axis=-1) / K  # (N, G)
    mean_dxhat_xhat = xp.sum(xp.reshape(gdw_nc, (N, G, C // G)), axis=-1) / K
    # dx = dout·(γ·inv) − x̂·(inv·mean_g(dx̂ ⊙ x̂)) − inv·mean_g dx̂, with the
    # three coefficients per (n, c): the per-group ones repeated over the group
    inv_c = _per_channel(xp, inv_std, C)  # (N, C)
    scale = inv_c if weight is None else inv_c * weight  # (N, C)
    q = _per_channel(xp, inv_std * mean_dxhat_xhat, C)  # (N, C)
    r = _per_channel(xp, inv_std * mean_dxhat, C)  # (N, C)
    dx = dout3 * xp.reshape(scale, (N, C, 1))  # (N, C, L)
    dx -= xhat3 * xp.reshape(q, (N, C, 1))
    dx -= xp.reshape(r, (N, C, 1))
    dx = xp.reshape(dx, tuple(xhat.shape))  # (N, C, *S)
    dweight = None if weight is None else xp.sum(dw_nc, axis=0)  # (C,)
    dbias = xp.sum(db_nc, axis=0) if has_bias else None  # (C,)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# helpers


def _affine(xp: Any, xhat: Array, weight: Array | None, bias: Array | None) -> Array:
    """γ ⊙ x̂ + β with per-channel γ, β (either may be None; with neither, the
    result is x̂ itself)."""
    bshape = (1, xhat.shape[1]) + (1,) * (xhat.ndim - 2)  # (C,) against (N, C, *S)
    if weight is None:
        return xhat if bias is None else xhat + xp.reshape(bias, bshape)
    y = xhat * xp.reshape(weight, bshape)  # (N, C, *S)
    if bias is not None:
        y += xp.reshape(bias, bshape)  # in place on the fresh product
    return y


def _running_averages(
    running_mean: Array | None, running_var: Array | None, mean: Array, var: Array,
    M: int, momentum: float,
) -> tuple[Array | None, Array | None]:
    """The updated running statistics from the batch ones over M values per
    channel, as fresh arrays (None without running statistics); the unbiased
    variance σ²·M/(M − 1) enters the average."""
    if running_mean is None:
        return None, None
    unbiased_var = var * (M / (M - 1))  # (C,)
    new_mean = (1.0 - momentum) * running_mean + momentum * mean  # (C,)
    new_var = (1.0 - momentum) * running_var + momentum * unbiased_var  # (C,)
    return new_mean, new_var


def _rowdot(xp: Any, a: Array, b: Array) -> Array:
    """Σ over the last axis of a ⊙ b, (..., L) -> (...), without a temporary
    product when L > 1."""
    if a.shape[-1] == 1:
        return (a * b)[..., 0]
    return xp.vecdot(a, b, axis=-1)


def _per_channel(xp: Any, a: Array, C: int) -> Array:
    """(N, G) per-group values repeated over each group's C/G channels: (N, C)."""
    N, G = a.shape
    rep = xp.broadcast_to(xp.reshape(a, (N, G, 1)), (N, G, C // G))  # (N, G, C/G)
    return xp.reshape(rep, (N, C))


def _check_statistic(xp: Any, x: Array, stat: Array, what: str) -> None:
    """A NaN/Inf in x makes its statistics non-finite: screen them (cheap), and
    only then check x itself, which names and counts the bad values."""
    if bool(xp.all(xp.isfinite(stat))):
        return
    check_finite("x", x)
    raise NonFiniteError(
        f"x: the {what} overflows {dtype_name(x)}, "
        f"got values up to {float(xp.max(xp.abs(x))):g} in magnitude"
    )


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


def _check_dout(dout: Array, xhat: Array) -> None:
    """dout must have the forward output's shape and dtype (that of x̂)."""
    check_array("dout", dout, shape=tuple(xhat.shape))
    check_same_dtype(dout=dout, forward=xhat)


def _check_nonempty(x: Array) -> None:
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"x: expected a non-empty array, got shape {tuple(x.shape)}")


def _describe(a: Array | None) -> str:
    return "None" if a is None else f"array of shape {tuple(a.shape)}"


# ---------------------------------------------------------------------------
# a block's BN step: parameters and buffers stored under one name


def _batch_norm_named(
    x: Array, params: dict[str, Array], state: dict[str, Array], name: str,
    training: bool, momentum: float, eps: float,
) -> tuple[Array, dict[str, Array], BatchNormCache]:
    """``_batch_norm`` on the γ, β and running statistics that a block keeps
    under ``name`` (``<name>.weight``, ``<name>.bias``, ``<name>.running_mean``,
    ``<name>.running_var``).

    Returns y, the updated running statistics keyed as in ``state`` (training
    only: eval reads the buffers and leaves them as they are, so the dict is
    empty) and the cache.
    """
    (y, mean, var), cache = _batch_norm(
        x, params[f"{name}.weight"], params[f"{name}.bias"],
        state[f"{name}.running_mean"], state[f"{name}.running_var"],
        training, momentum, eps,
    )
    if not training:
        return y, {}, cache
    return y, {f"{name}.running_mean": mean, f"{name}.running_var": var}, cache


def _batch_norm_named_backward(
    dout: Array, cache: BatchNormCache, name: str
) -> tuple[Array, dict[str, Array]]:
    """``_batch_norm_backward``, with dγ and dβ keyed ``<name>.weight``/``.bias``."""
    dx, dweight, dbias = _batch_norm_backward(dout, cache)
    return dx, {f"{name}.weight": dweight, f"{name}.bias": dbias}
