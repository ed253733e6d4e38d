"""Launch wrappers for the small convolution, the norm reductions and CGNL.

Re-exported by ``refattn.cuda.launch``; see there for the conventions.
"""

from __future__ import annotations

from refattn._typing import Array
from refattn.cuda._runner import (Runner, check_groups, check_order, check_shape,
                                  default_runner, elementwise_grid, float_array, i64,
                                  nonempty, prod, row_grid, same_dtype)

__all__ = [
    "CGNL_MAX_ORDER",
    "batch_norm_stats",
    "batch_norm_sums",
    "cgnl_moments_backward",
    "cgnl_moments_forward",
    "group_norm_stats",
    "group_norm_sums",
    "small_conv_backward",
    "small_conv_forward",
]

CGNL_MAX_ORDER = 8
"""Highest Taylor order of the CGNL kernels (REFATTN_CGNL_MAX_ORDER)."""


# ---------------------------------------------------------------------------
# small-channel k x k convolution (CBAM's spatial gate)


def small_conv_forward(
    x: Array, weight: Array, bias: Array | None = None, *, runner: Runner | None = None
) -> Array:
    """Direct 'same' convolution, odd k, stride 1, zero padding (k − 1)/2.

    Math:
        y[n, o, h, w] = b[o] + Σ_{c,i,j} W[o, c, i, j] x[n, c, h+i−p, w+j−p]
    Shapes:
        x (N, Cin, H, W), weight (Cout, Cin, k, k), bias (Cout,) or None
        -> y (N, Cout, H, W)
    """
    r = runner or default_runner()
    x, weight, bias, (N, Cin, Cout, H, W, k) = _conv_args(r, x, weight, bias)
    if bias is None:
        bias = r.xp.zeros((Cout,), dtype=x.dtype)
    y = r.xp.empty((N, Cout, H, W), dtype=x.dtype)  # (N, Cout, H, W)
    if y.size:
        args = (x, weight, bias, y) + tuple(i64(v) for v in (N, Cin, Cout, H, W, k))
        r.launch("refattn_small_conv_fwd", x.dtype, elementwise_grid(r, y.size), args)
    return y


def small_conv_backward(
    dy: Array, x: Array, weight: Array,
    *, with_bias: bool = False, runner: Runner | None = None,
) -> tuple[Array, Array, Array | None]:
    """VJP of small_conv_forward.

    Math:
        dx[n, c, h, w] = Σ_{o,i,j} W[o, c, i, j] dy[n, o, h−i+p, w−j+p]
        dW[o, c, i, j] = Σ_{n,h,w} dy[n, o, h, w] x[n, c, h+i−p, w+j−p]
        db[o]          = Σ_{n,h,w} dy[n, o, h, w]      (None without bias)
    Shapes:
        dy (N, Cout, H, W) -> dx like x, dW like weight, db (Cout,)
    """
    r = runner or default_runner()
    x, weight, _, (N, Cin, Cout, H, W, k) = _conv_args(r, x, weight, None)
    dy = float_array(r, "dy", dy)
    check_shape("dy", dy, (N, Cout, H, W))
    same_dtype(dy=dy, x=x)
    sizes = tuple(i64(v) for v in (N, Cin, Cout, H, W, k))
    dx = r.xp.empty(x.shape, dtype=x.dtype)  # (N, Cin, H, W)
    dw = r.xp.empty(weight.shape, dtype=x.dtype)  # (Cout, Cin, k, k)
    if dx.size:
        grid = elementwise_grid(r, dx.size)
        r.launch("refattn_small_conv_dx_bwd", x.dtype, grid, (dy, weight, dx) + sizes)
    if dw.size:
        grid = row_grid(r, dw.size)
        r.launch("refattn_small_conv_dw_bwd", x.dtype, grid, (dy, x, dw) + sizes)
    db = r.xp.sum(dy, axis=(0, 2, 3)) if with_bias else None  # (Cout,)
    return dx, dw, db


def _conv_args(r: Runner, x: Array, weight: Array, bias: Array | None) -> tuple:
    x = float_array(r, "x", x, ndim=4)
    weight = float_array(r, "weight", weight, ndim=4)
    same_dtype(x=x, weight=weight)
    N, Cin, H, W = (int(v) for v in x.shape)
    Cout, wc, k, k2 = (int(v) for v in weight.shape)
    if wc != Cin or k != k2 or k % 2 == 0:
        raise ValueError(
            f"weight: expected shape (Cout, {Cin}, k, k) with odd k, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        bias = float_array(r, "bias", bias)
        check_shape("bias", bias, (Cout,))
        same_dtype(x=x, bias=bias)
    return x, weight, bias, (N, Cin, Cout, H, W, k)


# ---------------------------------------------------------------------------
# group norm and batch norm reductions


def group_norm_stats(
    x: Array, num_groups: int, *, runner: Runner | None = None
) -> tuple[Array, Array]:
    """Statistics per (sample, group) over the group's (C/G)·L values.

    Shapes:
        x (N, C, *S) -> mean, var (N, G)  (var biased)
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(2, 5))
    N, C = x.shape[0], x.shape[1]
    G = check_groups(num_groups, C)
    K = x.size // (N * G) if N else 0
    nonempty("x", K if N else 1, "values per group")
    mean = r.xp.empty((N, G), dtype=x.dtype)
    var = r.xp.empty((N, G), dtype=x.dtype)
    if N:
        args = (x, mean, var, i64(N * G), i64(K))
        r.launch("refattn_group_norm_stats_fwd", x.dtype, row_grid(r, N * G), args)
    return mean, var


def group_norm_sums(
    dy: Array, xhat: Array, num_groups: int, weight: Array | None = None,
    *, runner: Runner | None = None,
) -> tuple[Array, Array]:
    """Per-(sample, group) reductions of the group-norm dx.

    Math:
        sum_gdy[n, g]      = Σ_{c∈g, l} γ_c dy
        sum_gdy_xhat[n, g] = Σ_{c∈g, l} γ_c dy x̂        (γ = 1 without weight)
    Shapes:
        dy, xhat (N, C, *S), weight (C,) or None -> (N, G), (N, G)
    """
    r = runner or default_runner()
    xhat = float_array(r, "xhat", xhat, ndim=(2, 5))
    dy = float_array(r, "dy", dy)
    check_shape("dy", dy, tuple(xhat.shape))
    N, C = xhat.shape[0], xhat.shape[1]
    G = check_groups(num_groups, C)
    if weight is None:
        weight = r.xp.ones((C,), dtype=xhat.dtype)
    weight = float_array(r, "weight", weight)
    check_shape("weight", weight, (C,))
    same_dtype(dy=dy, xhat=xhat, weight=weight)
    L = prod(tuple(xhat.shape[2:]))
    s1 = r.xp.zeros((N, G), dtype=dy.dtype)
    s2 = r.xp.zeros((N, G), dtype=dy.dtype)
    if N and L:
        args = (dy, xhat, weight, s1, s2, i64(N), i64(C), i64(L), i64(G))
        r.launch("refattn_group_norm_reduce_bwd", dy.dtype, row_grid(r, N * G), args)
    return s1, s2


def batch_norm_stats(x: Array, *, runner: Runner | None = None) -> tuple[Array, Array]:
    """Per-channel batch statistics.

    Math:
        μ_c = mean_{n,l} x[n, c, l],  σ²_c = mean_{n,l} (x − μ_c)²   (biased)
    Shapes:
        x (N, C, *S) -> mean, var (C,)
    """
    r = runner or default_runner()
    x = float_array(r, "x", x, ndim=(2, 5))
    N, C = x.shape[0], x.shape[1]
    L = prod(tuple(x.shape[2:]))
    nonempty("x", N * L, "values per channel")
    mean = r.xp.empty((C,), dtype=x.dtype)
    var = r.xp.empty((C,), dtype=x.dtype)
    if C:
        args = (x, mean, var, i64(N), i64(C), i64(L))
        r.launch("refattn_batch_norm_stats_fwd", x.dtype, row_grid(r, C), args)
    return mean, var


def batch_norm_sums(
    dy: Array, xhat: Array, *, runner: Runner | None = None
) -> tuple[Array, Array]:
    """Per-channel reductions of the norm backwards (BN dx; BN and GN dγ, dβ).

    Math:
        sum_dy[c] = Σ_{n,l} dy,   sum_dy_xhat[c] = Σ_{n,l} dy ⊙ x̂
    Shapes:
        dy, xhat (N, C, *S) -> (C,), (C,)
    """
    r = runner or default_runner()
    xhat = float_array(r, "xhat", xhat, ndim=(2, 5))
    dy = float_array(r, "dy", dy)
    check_shape("dy", dy, tuple(xhat.shape))
    same_dtype(dy=dy, xhat=xhat)
    N, C = xhat.shape[0], xhat.shape[1]
    L = prod(tuple(xhat.shape[2:]))
    s1 = r.xp.zeros((C,), dtype=dy.dtype)
    s2 = r.xp.zeros((C,), dtype=dy.dtype)
    if C and N * L:
        args = (dy, xhat, s1, s2, i64(N), i64(C), i64(L))
        r.launch("refattn_batch_norm_reduce_bwd", dy.dtype, row_grid(r, C), args)
    return s1, s2


# ---------------------------------------------------------------------------
# CGNL moments


def cgnl_moments_forward(
    p: Array, g: Array, order: int, *, runner: Runner | None = None
) -> Array:
    """The Taylor moments of CGNL, one row per (sample, group).

    Math:
        s[r, q] = Σ_m p[r, m]^q g[r, m],  q = 0..order   (p^0 = 1)
    Shapes:
        p, g (R, M) -> s (R, order + 1)
    """
    r = runner or default_runner()
    p = float_array(r, "p", p, ndim=2)
    g = float_array(r, "g", g, ndim=2)
    check_shape("g", g, tuple(p.shape))
    same_dtype(p=p, g=g)
    Q = check_order(order, CGNL_MAX_ORDER)
    R, M = int(p.shape[0]), int(p.shape[1])
    s = r.xp.zeros((R, Q + 1), dtype=p.dtype)  # (R, Q + 1)
    if R and M:
        args = (p, g, s, i64(R), i64(M), i64(Q))
        r.launch("refattn_cgnl_moments_fwd", p.dtype, row_grid(r, R), args)
    return s


def cgnl_moments_backward(
    ds: Array, p: Array, g: Array, *, runner: Runner | None = None
) -> tuple[Array, Array]:
    """VJP of cgnl_moments_forward.

    Math:
        dp = g ⊙ Σ_q ds[r, q] q p^(q−1),   dg = Σ_q ds[r, q] p^q
    Shapes:
        ds (R, order + 1), p, g (R, M) -> dp, dg (R, M)
    """
    r = runner or default_runner()
    p = float_array(r, "p", p, ndim=2)
    g = float_array(r, "g", g, ndim=2)
    check_shape("g", g, tuple(p.shape))
    ds = float_array(r, "ds", ds, ndim=2)
    R, M = int(p.shape[0]), int(p.shape[1])
    if ds.shape[0] != R:
        raise ValueError(f"ds: expected shape ({R}, order + 1), got {tuple(ds.shape)}")
    same_dtype(ds=ds, p=p, g=g)
    Q = check_order(int(ds.shape[1]) - 1, CGNL_MAX_ORDER)
    dp = r.xp.empty((R, M), dtype=p.dtype)
    dg = r.xp.empty((R, M), dtype=p.dtype)
    if dp.size:
        args = (ds, p, g, dp, dg, i64(R), i64(M), i64(Q))
        r.launch(
            "refattn_cgnl_moments_bwd", p.dtype, elementwise_grid(r, dp.size), args
        )
    return dp, dg
