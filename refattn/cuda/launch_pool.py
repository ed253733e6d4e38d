"""Launch wrappers for the pools: channel pool, global pools, max-pooling.

Re-exported by ``refattn.cuda.launch``; see there for the conventions.
Notation: x is (N, C, *S) with L = prod(S) positions.
"""

from __future__ import annotations

from typing import Any

from refattn._typing import Array, Shape
from refattn.cuda._runner import (
    Runner,
    check_shape,
    default_runner,
    elementwise_grid,
    float_array,
    i64,
    index_array,
    int_tuple,
    nonempty,
    positive,
    prod,
    row_grid,
    same_dtype,
)

__all__ = ["GLOBAL_POOLS", "channel_pool_backward", "channel_pool_forward",
           "global_pool_backward", "global_pool_forward", "max_pool_backward",
           "max_pool_forward"]

GLOBAL_POOLS = ("avg", "max", "lp", "lse")


# ---------------------------------------------------------------------------
# channel pool (CBAM's spatial descriptor)


def channel_pool_forward(
    x: Array, *, max_first: bool = True, runner: Runner | None = None
) -> tuple[Array, Array]:
    """Max and mean over the channels, stacked as two channels.

    Math:
        m[n, 0] = max_c x[n, c],  m[n, 1] = mean_c x[n, c]   (max_first)
        m[n, 0] = mean,           m[n, 1] = max              (not max_first)
        arg[n] = the first c attaining the max
    Shapes:
        x (N, C, *S) -> m (N, 2, *S), arg (N, *S) int64
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(2, 5))
    N, C, S = x.shape[0], x.shape[1], tuple(x.shape[2:])
    nonempty("x", C, "channels")
    L = prod(S)
    m = r.xp.empty((N, 2) + S, dtype=x.dtype)  # (N, 2, *S)
    arg = r.xp.empty((N,) + S, dtype=r.xp.int64)  # (N, *S)
    mx, mean = (m[:, 0], m[:, 1]) if max_first else (m[:, 1], m[:, 0])
    if N * L:
        args = (x, mx, arg, mean, i64(N), i64(C), i64(L), i64(2 * L))
        r.launch("refattn_channel_pool_fwd", x.dtype, elementwise_grid(r, N * L), args)
    return m, arg


def channel_pool_backward(
    dm: Array,
    arg: Array,
    channels: int,
    *,
    max_first: bool = True,
    runner: Runner | None = None,
) -> Array:
    """VJP of channel_pool_forward.

    Math:
        dx[n, c] = [c == arg[n]] dm_max[n] + dm_mean[n] / C
    Convention:
        the max sends its whole gradient to the first arg-max channel.
    Shapes:
        dm (N, 2, *S), arg (N, *S) -> dx (N, channels, *S)
    """
    r = runner or default_runner()
    dm = float_array(r, "dm", dm, ndim=(2, 5))
    if dm.shape[1] != 2:
        raise ValueError(f"dm: expected shape (N, 2, *S), got {dm.shape}")
    N, S = dm.shape[0], tuple(dm.shape[2:])
    arg = index_array(r, "arg", arg, (N,) + S)
    C = positive("channels", channels)
    L = prod(S)
    dx = r.xp.empty((N, C) + S, dtype=dm.dtype)  # (N, C, *S)
    dmax, dmean = (dm[:, 0], dm[:, 1]) if max_first else (dm[:, 1], dm[:, 0])
    if dx.size:
        args = (dmax, arg, dmean, dx, i64(N), i64(C), i64(L), i64(2 * L))
        r.launch(
            "refattn_channel_pool_bwd", dm.dtype, elementwise_grid(r, dx.size), args
        )
    return dx


# ---------------------------------------------------------------------------
# global pools over the positions


def global_pool_forward(
    x: Array, kind: str, *, runner: Runner | None = None
) -> tuple[Array, Array | None]:
    """Pool every (n, c) map over its L positions.

    Math:
        avg  out = (1/L) sum_l x
        max  out = max_l x, arg = first arg-max position (flat, row-major)
        lp   out = sqrt(sum_l x^2)                       (p = 2, a sum)
        lse  out = m + log sum_l exp(x - m),  m = max_l x
    Shapes:
        x (N, C, *S) -> out (N, C); arg (N, C) int64 for max, else None
    """
    r = runner or default_runner()
    _check_kind(kind)
    x = float_array(r, "x", x, ndim=(2, 5))
    N, C = x.shape[0], x.shape[1]
    L = prod(tuple(x.shape[2:]))
    nonempty("x", L, "positions")
    out = r.xp.empty((N, C), dtype=x.dtype)  # (N, C)
    arg = r.xp.empty((N, C), dtype=r.xp.int64) if kind == "max" else None
    if N * C:
        grid = row_grid(r, N * C)
        args = (x, out, arg) if kind == "max" else (x, out)
        r.launch(
            f"refattn_global_{kind}_pool_fwd",
            x.dtype,
            grid,
            args + (i64(N * C), i64(L)),
        )
    return out, arg


def global_pool_backward(
    dout: Array,
    kind: str,
    x_shape: Shape,
    *,
    x: Array | None = None,
    out: Array | None = None,
    arg: Array | None = None,
    runner: Runner | None = None,
) -> Array:
    """VJP of global_pool_forward.

    Math:
        avg  dx = dout / L
        max  dx = [l == arg] dout
        lp   dx = dout x / out   (0 where out = 0)
        lse  dx = dout exp(x - out) = dout softmax_l(x)
    Needs: arg for max; x and out for lp and lse.
    Convention:
        max sends its whole gradient to the first arg-max position.
    Shapes:
        dout (N, C) -> dx x_shape = (N, C, *S)
    """
    r = runner or default_runner()
    _check_kind(kind)
    x_shape = tuple(int(s) for s in x_shape)
    if not 2 <= len(x_shape) <= 5:
        raise ValueError(
            f"x_shape: expected (N, C, *S) with 0 to 3 S axes, got {x_shape}"
        )
    N, C = x_shape[0], x_shape[1]
    L = prod(x_shape[2:])
    dout = float_array(r, "dout", dout)
    check_shape("dout", dout, (N, C))
    dx = r.xp.empty(x_shape, dtype=dout.dtype)  # (N, C, *S)
    if kind == "avg":
        extra: tuple[Any, ...] = ()
    elif kind == "max":
        if arg is None:
            raise ValueError("arg: the max pool backward needs the forward's arg-max")
        extra = (index_array(r, "arg", arg, (N, C)),)
    else:
        if x is None or out is None:
            raise ValueError(f"x, out: the {kind} pool backward needs both, got None")
        x = float_array(r, "x", x)
        check_shape("x", x, x_shape)
        out = float_array(r, "out", out)
        check_shape("out", out, (N, C))
        same_dtype(dout=dout, x=x, out=out)
        extra = (x, out)
    if dx.size:
        args = (dout,) + extra + (dx, i64(N * C), i64(L))
        grid = elementwise_grid(r, dx.size)
        r.launch(f"refattn_global_{kind}_pool_bwd", dout.dtype, grid, args)
    return dx


# ---------------------------------------------------------------------------
# max pooling, 1-, 2- and 3-D


def max_pool_forward(
    x: Array,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    *,
    runner: Runner | None = None,
) -> tuple[Array, Array]:
    """Max over k-windows with stride s (floor mode, no padding), with arg-max.

    Math:
        y[n, c, o] = max over the window at o·s of x[n, c]
        arg[n, c, o] = flat index (row-major over S) of the first arg-max in
                       row-major window order
    Shapes:
        x (N, C, *S), len(S) = 1, 2 or 3 -> y, arg (N, C, *So),
        So_i = (S_i − k_i) // s_i + 1
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(3, 5))
    d = x.ndim - 2
    k = int_tuple("kernel_size", kernel_size, d)
    s = k if stride is None else int_tuple("stride", stride, d)
    S = tuple(x.shape[2:])
    if any(ki > si for ki, si in zip(k, S, strict=True)):
        raise ValueError(f"kernel_size: expected at most the input size {S}, got {k}")
    So = tuple((si - ki) // st + 1 for si, ki, st in zip(S, k, s, strict=True))
    N, C = x.shape[0], x.shape[1]
    y = r.xp.empty((N, C) + So, dtype=x.dtype)  # (N, C, *So)
    arg = r.xp.empty((N, C) + So, dtype=r.xp.int64)  # (N, C, *So)
    pad = (1,) * (3 - d)  # view 1-D and 2-D as 3-D with unit leading axes
    S3, k3, s3, So3 = pad + S, pad + k, pad + s, pad + So
    if y.size:
        args = (x, y, arg, i64(N * C)) + tuple(i64(v) for v in S3 + k3 + s3 + So3)
        r.launch("refattn_max_pool_fwd", x.dtype, elementwise_grid(r, y.size), args)
    return y, arg


def max_pool_backward(
    dy: Array, arg: Array, x_shape: Shape, *, runner: Runner | None = None
) -> Array:
    """VJP of max_pool_forward: dx[n, c, arg] += dy (overlapping windows add).

    Convention:
        each window sends its whole gradient to its first arg-max.
    Shapes:
        dy, arg (N, C, *So) -> dx x_shape = (N, C, *S)
    """
    r = runner or default_runner()
    dy = float_array(r, "dy", dy, ndim=(3, 5))
    arg = index_array(r, "arg", arg, tuple(dy.shape))
    x_shape = tuple(int(v) for v in x_shape)
    if len(x_shape) != dy.ndim or x_shape[:2] != tuple(dy.shape[:2]):
        raise ValueError(
            f"x_shape: expected (N, C, *S) matching dy {dy.shape}, got {x_shape}"
        )
    dx = r.xp.zeros(x_shape, dtype=dy.dtype)  # (N, C, *S)
    P = x_shape[0] * x_shape[1]
    if dy.size:
        plane_in, plane_out = prod(x_shape[2:]), prod(tuple(dy.shape[2:]))
        args = (dy, arg, dx, i64(P), i64(plane_in), i64(plane_out))
        r.launch("refattn_max_pool_bwd", dy.dtype, elementwise_grid(r, dy.size), args)
    return dx


def _check_kind(kind: str) -> None:
    if kind not in GLOBAL_POOLS:
        raise ValueError(f"kind: expected one of {list(GLOBAL_POOLS)}, got {kind!r}")
