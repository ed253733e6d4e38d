"""Launch wrappers: arrays in, arrays out, with the semantics of refattn.ops.

Each wrapper checks its arguments, allocates the outputs with the runner's
array module and launches the kernels of ``refattn.cuda`` (CuPy arrays with
the default runner; the tests pass a host-shim runner with NumPy arrays).
Inputs may be any float32/float64 arrays (non-contiguous ones are copied);
float32 stays float32.  Arg-max indices are int64.

This module holds the sigmoid gates and softmax, and re-exports the pools
(``refattn.cuda.launch_pool``) and the small convolution, the norm
reductions and CGNL's moments (``refattn.cuda.launch_norm``), so that
``refattn.cuda.launch`` is the one place to import them from.

Notation: x is (N, C, *S) with L = prod(S) positions.
"""

from __future__ import annotations

import numpy

from refattn._typing import Array, Shape
from refattn.cuda._runner import (Runner, axis_index, check_shape, default_runner,
                                  elementwise_grid, float_array, i64, nonempty, prod,
                                  row_grid, same_dtype)
from refattn.cuda.launch_norm import (
    CGNL_MAX_ORDER,
    batch_norm_stats,
    batch_norm_sums,
    cgnl_moments_backward,
    cgnl_moments_forward,
    group_norm_stats,
    group_norm_sums,
    small_conv_backward,
    small_conv_forward,
)
from refattn.cuda.launch_pool import (GLOBAL_POOLS, channel_pool_backward,
                                      channel_pool_forward, global_pool_backward,
                                      global_pool_forward, max_pool_backward,
                                      max_pool_forward)

__all__ = [
    "CGNL_MAX_ORDER",
    "GLOBAL_POOLS",
    "batch_norm_stats",
    "batch_norm_sums",
    "cgnl_moments_backward",
    "cgnl_moments_forward",
    "channel_pool_backward",
    "channel_pool_forward",
    "gate_kind",
    "gate_mul_backward",
    "gate_mul_forward",
    "global_pool_backward",
    "global_pool_forward",
    "group_norm_stats",
    "group_norm_sums",
    "max_pool_backward",
    "max_pool_forward",
    "small_conv_backward",
    "small_conv_forward",
    "softmax_backward",
    "softmax_forward",
]


# ---------------------------------------------------------------------------
# sigmoid gate


def gate_kind(x_shape: Shape, z_shape: Shape) -> str | None:
    """'channel' for z (N, C, 1, ...), 'spatial' for z (N, 1, *S), else None.

    The kernels cover exactly these two broadcasts; other shapes take the
    generic path.
    """
    x_shape, z_shape = tuple(x_shape), tuple(z_shape)
    if len(x_shape) < 2 or len(z_shape) != len(x_shape) or z_shape[0] != x_shape[0]:
        return None
    ones = (1,) * (len(x_shape) - 2)
    if z_shape == x_shape[:2] + ones:
        return "channel"
    if z_shape == (x_shape[0], 1) + x_shape[2:]:
        return "spatial"
    return None


def gate_mul_forward(
    x: Array, z: Array, *, runner: Runner | None = None
) -> tuple[Array, Array]:
    """out = x ⊙ σ(z), z a channel or spatial gate; also returns s = σ(z).

    Math:
        s = σ(z) (stable: from exp(-|z|)),  out = x ⊙ s  (s broadcast)
    Shapes:
        x (N, C, *S), z (N, C, 1...) or (N, 1, *S) -> out like x, s like z
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(2, 5))
    z = float_array(r, "z", z)
    same_dtype(x=x, z=z)
    kind, sizes = _gate(x.shape, z.shape)
    out = r.xp.empty(x.shape, dtype=x.dtype)  # like x
    s = r.xp.empty(z.shape, dtype=z.dtype)  # like z
    if x.size:
        grid = elementwise_grid(r, x.size)
        r.launch(f"refattn_gate_mul_{kind}_fwd", x.dtype, grid, (x, z, out, s) + sizes)
    return out, s


def gate_mul_backward(
    dout: Array, x: Array, s: Array, *, runner: Runner | None = None
) -> tuple[Array, Array]:
    """VJP of gate_mul_forward, from the saved x and s = σ(z).

    Math:
        dx = dout ⊙ s
        dz = sum_to_shape(dout ⊙ x, z.shape) ⊙ s ⊙ (1 − s)
    Shapes:
        dout, x (N, C, *S), s like z -> dx like x, dz like z
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(2, 5))
    dout = float_array(r, "dout", dout)
    check_shape("dout", dout, tuple(x.shape))
    s = float_array(r, "s", s)
    same_dtype(dout=dout, x=x, s=s)
    kind, sizes = _gate(x.shape, s.shape)
    dx = r.xp.empty(x.shape, dtype=x.dtype)  # like x
    dz = r.xp.empty(s.shape, dtype=x.dtype)  # like z
    if x.size:
        # a block per (n, c) row, or a thread per (n, position): one per z
        grid = row_grid(r, s.size) if kind == "channel" else elementwise_grid(r, s.size)
        args = (dout, x, s, dx, dz) + sizes
        r.launch(f"refattn_gate_mul_{kind}_bwd", x.dtype, grid, args)
    elif dz.size:
        dz[...] = 0
    return dx, dz


# ---------------------------------------------------------------------------
# softmax


def softmax_forward(x: Array, *, axis: int = -1, runner: Runner | None = None) -> Array:
    """y = exp(x − max x) / Σ exp(x − max x) along `axis`.

    Shapes:
        x, y  any shape with at least one axis
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(1, 64))
    axis = axis_index(axis, x.ndim)
    nonempty("x", x.shape[axis], f"entries along axis {axis}")
    xt = r.xp.ascontiguousarray(r.xp.moveaxis(x, axis, -1))  # (..., K)
    K = xt.shape[-1]
    R = xt.size // K
    y = r.xp.empty(xt.shape, dtype=x.dtype)
    if R:
        r.launch(
            "refattn_softmax_fwd", x.dtype, row_grid(r, R), (xt, y, i64(R), i64(K))
        )
    return r.xp.moveaxis(y, -1, axis)


def softmax_backward(
    dy: Array, y: Array, *, axis: int = -1, runner: Runner | None = None
) -> Array:
    """VJP of softmax from its output: dx = y ⊙ (dy − Σ_axis dy ⊙ y)."""
    r = runner or default_runner()
    y = float_array(r, "y", y, ndim=(1, 64))
    dy = float_array(r, "dy", dy)
    check_shape("dy", dy, tuple(y.shape))
    same_dtype(dy=dy, y=y)
    axis = axis_index(axis, y.ndim)
    yt = r.xp.ascontiguousarray(r.xp.moveaxis(y, axis, -1))  # (..., K)
    dyt = r.xp.ascontiguousarray(r.xp.moveaxis(dy, axis, -1))  # (..., K)
    K = yt.shape[-1]
    R = yt.size // K if K else 0
    dx = r.xp.empty(yt.shape, dtype=y.dtype)
    if R:
        args = (dyt, yt, dx, i64(R), i64(K))
        r.launch("refattn_softmax_bwd", y.dtype, row_grid(r, R), args)
    return r.xp.moveaxis(dx, -1, axis)


# ---------------------------------------------------------------------------
# helpers


def _gate(x_shape: Shape, z_shape: Shape) -> tuple[str, tuple[numpy.int64, ...]]:
    """The gate's kind and its kernels' size arguments: (R = N·C, L) for a
    channel gate, (N, C, L) for a spatial one."""
    kind = gate_kind(x_shape, z_shape)
    N, C = x_shape[0], x_shape[1]
    L = prod(tuple(x_shape[2:]))
    if kind == "channel":
        return kind, (i64(N * C), i64(L))
    if kind == "spatial":
        return kind, (i64(N), i64(C), i64(L))
    raise ValueError(
        f"z: expected a channel gate {(N, C) + (1,) * (len(x_shape) - 2)} or a "
        f"spatial gate {(N, 1) + tuple(x_shape[2:])}, got {tuple(z_shape)}"
    )
