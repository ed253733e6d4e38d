"""Kernel-versus-NumPy checks shared by tier 2 (host shim) and tier 3 (GPU).

Each test takes a fixture ``k``: the launch wrappers of refattn.cuda.launch
bound to one runner, NumPy arrays in and out (``Bound``).  test_host_shim.py
binds them to the C++ host shim, test_gpu.py to CuPy on a GPU, and both
import the tests below, so the two tiers run the very same checks.

References are plain float64 NumPy, written independently of refattn (naive
loops where that is clearer).  Shapes are small and awkward: rows longer
than a block (reduction tails), more rows and elements than the grid covers
(grid-stride loops, with the small runners), size-1 axes.  Inputs are
tie-free except in the tests about the tie convention.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import numpy as np
import pytest

from refattn.cuda import launch as K

__all__ = [
    "test_batch_norm_reductions",
    "test_cgnl_moments",
    "test_channel_pool",
    "test_channel_pool_ties_go_to_the_first_channel",
    "test_gate_kind_refuses_other_broadcasts",
    "test_gate_mul",
    "test_global_max_ties_and_lp_zero_norm",
    "test_global_pools",
    "test_group_norm_reductions",
    "test_max_pool",
    "test_max_pool_ties_go_to_the_first_in_window_order",
    "test_sigmoid_is_stable_at_large_logits",
    "test_small_conv",
    "test_softmax",
    "test_wrappers_refuse_bad_arguments",
]


class Bound:
    """refattn.cuda.launch with a fixed runner and NumPy arrays at the edges.

    ``to_device`` moves each NumPy argument to the runner's array module and
    ``to_host`` brings every array result back (identity for the host shim).
    Non-callables and ``gate_kind`` pass through unchanged.
    """

    def __init__(
        self,
        runner: Any,
        to_device: Callable[[Any], Any] = lambda a: a,
        to_host: Callable[[Any], Any] = lambda a: a,
    ) -> None:
        self.runner = runner
        self.to_device = to_device
        self.to_host = to_host

    def __getattr__(self, name: str) -> Any:
        fn = getattr(K, name)
        if not callable(fn) or name == "gate_kind":
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            dev = self.to_device
            args = tuple(dev(a) if isinstance(a, np.ndarray) else a for a in args)
            kwargs = {
                n: dev(a) if isinstance(a, np.ndarray) else a for n, a in kwargs.items()
            }
            out = fn(*args, runner=self.runner, **kwargs)
            if isinstance(out, tuple):
                return tuple(None if o is None else self.to_host(o) for o in out)
            return self.to_host(out)

        return call


DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

# (N, C, *S): rows longer than a block, a tail, size-1 axes, a 1-element map
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 5, 1, 9), (1, 2, 8, 9)]


def distinct(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Tie-free values in about [-2, 2): a scaled permutation plus jitter."""
    n = int(np.prod(shape))
    v = (rng.permutation(n) - n / 2) * (4.0 / max(n, 1))
    v = v + rng.uniform(0.0, 0.5, n) * (4.0 / max(n, 1))
    return v.reshape(shape).astype(dtype)


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def close(got: np.ndarray, want: np.ndarray, dtype) -> None:
    assert got.dtype == dtype, f"dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    np.testing.assert_allclose(got.astype(np.float64), want, **TOL[dtype])


def f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


# ---------------------------------------------------------------------------
# channel pool


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 40, 3, 2)])
@pytest.mark.parametrize("max_first", [True, False])
def test_channel_pool(k, dtype, shape, max_first) -> None:
    rng = np.random.default_rng(1)
    x = distinct(rng, shape, dtype)
    m, arg = k.channel_pool_forward(x, max_first=max_first)
    mx, mean = f64(x).max(axis=1), f64(x).mean(axis=1)
    want = np.stack([mx, mean] if max_first else [mean, mx], axis=1)
    close(m, want, dtype)
    np.testing.assert_array_equal(arg, np.argmax(x, axis=1))

    dm = normal(rng, m.shape, dtype)
    dx = k.channel_pool_backward(dm, arg, shape[1], max_first=max_first)
    dmax, dmean = (dm[:, 0], dm[:, 1]) if max_first else (dm[:, 1], dm[:, 0])
    onehot = (
        np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2)) == arg[:, None]
    )
    want = onehot * f64(dmax)[:, None] + f64(dmean)[:, None] / shape[1]
    close(dx, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_pool_ties_go_to_the_first_channel(k, dtype) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, size=(3, 7, 4, 5)).astype(dtype)  # many ties
    _, arg = k.channel_pool_forward(x)
    np.testing.assert_array_equal(arg, np.argmax(x, axis=1))


# ---------------------------------------------------------------------------
# global pools


def _global_ref(x: np.ndarray, kind: str) -> np.ndarray:
    v = f64(x).reshape(x.shape[0], x.shape[1], -1)
    if kind == "avg":
        return v.mean(-1)
    if kind == "max":
        return v.max(-1)
    if kind == "lp":
        return np.sqrt((v * v).sum(-1))
    m = v.max(-1, keepdims=True)
    return (m + np.log(np.exp(v - m).sum(-1, keepdims=True)))[..., 0]


def _global_bwd_ref(dout, x, kind):
    v = f64(x).reshape(x.shape[0], x.shape[1], -1)
    d = f64(dout)[..., None]
    if kind == "avg":
        g = np.broadcast_to(d / v.shape[-1], v.shape)
    elif kind == "max":
        g = (np.arange(v.shape[-1]) == v.argmax(-1)[..., None]) * d
    elif kind == "lp":
        norm = np.sqrt((v * v).sum(-1, keepdims=True))
        g = np.divide(d * v, norm, out=np.zeros_like(v), where=norm != 0)
    else:
        e = np.exp(v - v.max(-1, keepdims=True))
        g = d * e / e.sum(-1, keepdims=True)
    return g.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 200)])
@pytest.mark.parametrize("kind", ["avg", "max", "lp", "lse"])
def test_global_pools(k, dtype, shape, kind) -> None:
    rng = np.random.default_rng(3)
    x = distinct(rng, shape, dtype)
    out, arg = k.global_pool_forward(x, kind)
    close(out, _global_ref(x, kind), dtype)
    if kind == "max":
        np.testing.assert_array_equal(
            arg, np.argmax(x.reshape(shape[0], shape[1], -1), axis=-1)
        )
    else:
        assert arg is None
    dout = normal(rng, out.shape, dtype)
    dx = k.global_pool_backward(dout, kind, x.shape, x=x, out=out, arg=arg)
    close(dx, _global_bwd_ref(dout, x, kind), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_max_ties_and_lp_zero_norm(k, dtype) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 2, size=(2, 3, 70)).astype(dtype)
    x[0, 1] = 0  # a zero map: lp gradient 0 by convention
    _, arg = k.global_pool_forward(x, "max")
    np.testing.assert_array_equal(arg, np.argmax(x, axis=-1))
    out, _ = k.global_pool_forward(x, "lp")
    assert out[0, 1] == 0
    dx = k.global_pool_backward(np.ones_like(out), "lp", x.shape, x=x, out=out)
    assert np.all(dx[0, 1] == 0) and np.all(np.isfinite(dx))
    close(dx, _global_bwd_ref(np.ones_like(out), x, "lp"), dtype)


# ---------------------------------------------------------------------------
# sigmoid gate


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 40)])
@pytest.mark.parametrize("gate", ["channel", "spatial"])
def test_gate_mul(k, dtype, shape, gate) -> None:
    rng = np.random.default_rng(5)
    x = normal(rng, shape, dtype)
    ones = (1,) * (len(shape) - 2)
    zshape = shape[:2] + ones if gate == "channel" else (shape[0], 1) + shape[2:]
    z = (normal(rng, zshape, dtype) * 6).astype(dtype)  # both tails of the sigmoid
    # with C = 1 and a 1x1 map both gates are the same broadcast: 'channel'
    assert k.gate_kind(shape, zshape) in (gate, "channel" if zshape == shape else None)
    out, s = k.gate_mul_forward(x, z)
    sref = _sigmoid(f64(z))
    close(s, sref, dtype)
    close(out, f64(x) * sref, dtype)

    dout = normal(rng, shape, dtype)
    dx, dz = k.gate_mul_backward(dout, x, s)
    s64 = f64(s)
    axes = tuple(i for i, n in enumerate(zshape) if n == 1 and shape[i] != 1)
    dz_ref = (f64(dout) * f64(x)).sum(axis=axes, keepdims=True) * s64 * (1 - s64)
    close(dx, f64(dout) * s64, dtype)
    close(dz, dz_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_is_stable_at_large_logits(k, dtype) -> None:
    x = np.ones((1, 4, 1, 1), dtype)
    z = np.array([-800.0, -30.0, 30.0, 800.0], dtype=dtype).reshape(1, 4, 1, 1)
    with np.errstate(over="ignore"):
        want = _sigmoid(f64(z))
    out, s = k.gate_mul_forward(x, z)
    assert np.all(np.isfinite(s))
    close(s, want, dtype)


def test_gate_kind_refuses_other_broadcasts() -> None:
    assert K.gate_kind((2, 3, 4, 5), (2, 3, 4, 5)) is None
    assert K.gate_kind((2, 3, 4, 5), (1, 3, 1, 1)) is None
    assert K.gate_kind((2, 3, 4, 5), (2, 1, 1, 5)) is None


# ---------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis", [((5, 70), -1), ((1, 1), -1), ((4, 33, 2), 1), ((7, 3), 0)]
)
def test_softmax(k, dtype, shape, axis) -> None:
    rng = np.random.default_rng(6)
    x = (normal(rng, shape, dtype) * 5).astype(dtype)
    y = k.softmax_forward(x, axis=axis)
    e = np.exp(f64(x) - f64(x).max(axis=axis, keepdims=True))
    yref = e / e.sum(axis=axis, keepdims=True)
    close(np.ascontiguousarray(y), yref, dtype)
    dy = normal(rng, shape, dtype)
    dx = k.softmax_backward(dy, y, axis=axis)
    y64 = f64(y)
    close(
        np.ascontiguousarray(dx),
        y64 * (f64(dy) - (f64(dy) * y64).sum(axis=axis, keepdims=True)),
        dtype,
    )


# ---------------------------------------------------------------------------
# max pooling


def _max_pool_ref(x, k, s):
    """Naive loops: value and first arg-max (flat index in the input plane)."""
    N, C, *S = x.shape
    So = [(si - ki) // st + 1 for si, ki, st in zip(S, k, s, strict=True)]
    y = np.empty((N, C, *So))
    arg = np.empty((N, C, *So), np.int64)
    for n in range(N):
        for c in range(C):
            for o in np.ndindex(*So):
                win = tuple(
                    slice(oi * st, oi * st + ki)
                    for oi, st, ki in zip(o, s, k, strict=True)
                )
                w = f64(x[n, c][win])
                j = int(np.argmax(w))
                local = np.unravel_index(j, w.shape)
                pos = tuple(
                    oi * st + li for oi, st, li in zip(o, s, local, strict=True)
                )
                y[n, c][o] = w.flat[j]
                arg[n, c][o] = np.ravel_multi_index(pos, S)
    return y, arg


POOLS = [
    ((2, 3, 7, 9), (3, 3), (2, 2)),  # overlapping windows, floor mode drops a tail
    ((1, 2, 6, 6), (2, 2), (2, 2)),
    ((2, 1, 5, 8), (2, 3), (1, 2)),
    ((1, 1, 1, 1), (1, 1), (1, 1)),
    ((2, 2, 4, 5, 6), (2, 2, 3), (1, 2, 2)),  # 3-D
    ((1, 3, 11), (3,), (2,)),  # 1-D
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ks,s", POOLS)
def test_max_pool(k, dtype, shape, ks, s) -> None:
    rng = np.random.default_rng(7)
    x = distinct(rng, shape, dtype)
    y, arg = k.max_pool_forward(x, ks, s)
    yref, aref = _max_pool_ref(x, ks, s)
    close(y, yref, dtype)
    np.testing.assert_array_equal(arg, aref)
    dy = normal(rng, y.shape, dtype)
    dx = k.max_pool_backward(dy, arg, x.shape)
    want = np.zeros((shape[0] * shape[1], int(np.prod(shape[2:]))))
    np.add.at(
        want,
        (np.arange(want.shape[0])[:, None], aref.reshape(want.shape[0], -1)),
        f64(dy).reshape(want.shape[0], -1),
    )
    close(dx, want.reshape(shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_ties_go_to_the_first_in_window_order(k, dtype) -> None:
    rng = np.random.default_rng(8)
    x = rng.integers(0, 2, size=(2, 2, 6, 7, 5)).astype(dtype)
    y, arg = k.max_pool_forward(x, (2, 3, 2), (1, 2, 1))
    yref, aref = _max_pool_ref(x, (2, 3, 2), (1, 2, 1))
    close(y, yref, dtype)
    np.testing.assert_array_equal(arg, aref)


# ---------------------------------------------------------------------------
# small convolution


def _conv_ref(x, w, b):
    """Naive 'same' correlation, zero padding (k-1)/2."""
    N, Cin, H, W = x.shape
    Cout, _, k, _ = w.shape
    p = (k - 1) // 2
    xp_ = np.zeros((N, Cin, H + 2 * p, W + 2 * p))
    xp_[:, :, p : p + H, p : p + W] = x
    y = np.zeros((N, Cout, H, W)) + b.reshape(1, -1, 1, 1)
    for i in range(k):
        for j in range(k):
            y += np.einsum(
                "oc,nchw->nohw", w[:, :, i, j], xp_[:, :, i : i + H, j : j + W]
            )
    return y


CONVS = [
    ((2, 2, 9, 11), 1, 7),
    ((1, 2, 3, 2), 1, 7),
    ((3, 2, 5, 6), 1, 3),
    ((1, 3, 4, 4), 2, 1),
    ((2, 2, 1, 1), 1, 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,cout,ks", CONVS)
def test_small_conv(k, dtype, xshape, cout, ks) -> None:
    rng = np.random.default_rng(9)
    x = normal(rng, xshape, dtype)
    w = normal(rng, (cout, xshape[1], ks, ks), dtype)
    b = normal(rng, (cout,), dtype)
    y = k.small_conv_forward(x, w, b)
    close(y, _conv_ref(f64(x), f64(w), f64(b)), dtype)
    close(k.small_conv_forward(x, w), _conv_ref(f64(x), f64(w), np.zeros(cout)), dtype)

    # backward: the exact adjoint, from the reference forward's linearity
    dy = normal(rng, y.shape, dtype)
    dx, dw, db = k.small_conv_backward(dy, x, w, with_bias=True)
    dx_ref = np.zeros(xshape)
    for idx in np.ndindex(*xshape):
        e = np.zeros(xshape)
        e[idx] = 1
        dx_ref[idx] = np.sum(f64(dy) * _conv_ref(e, f64(w), np.zeros(cout)))
    dw_ref = np.zeros(w.shape)
    for idx in np.ndindex(*w.shape):
        e = np.zeros(w.shape)
        e[idx] = 1
        dw_ref[idx] = np.sum(f64(dy) * _conv_ref(f64(x), e, np.zeros(cout)))
    close(dx, dx_ref, dtype)
    close(dw, dw_ref, dtype)
    close(db, f64(dy).sum(axis=(0, 2, 3)), dtype)


# ---------------------------------------------------------------------------
# norm reductions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(2, 3, 5, 7), (1, 1, 1, 2), (4, 5, 1, 9), (3, 2, 50)]
)
def test_batch_norm_reductions(k, dtype, shape) -> None:
    rng = np.random.default_rng(10)
    x = (normal(rng, shape, dtype) * 3 + 5).astype(dtype)  # a mean to remove
    mean, var = k.batch_norm_stats(x)
    axes = (0,) + tuple(range(2, len(shape)))
    close(mean, f64(x).mean(axis=axes), dtype)
    close(var, f64(x).var(axis=axes), dtype)
    dy, xhat = normal(rng, shape, dtype), normal(rng, shape, dtype)
    s1, s2 = k.batch_norm_sums(dy, xhat)
    close(s1, f64(dy).sum(axis=axes), dtype)
    close(s2, (f64(dy) * f64(xhat)).sum(axis=axes), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,G",
    [((2, 6, 5, 7), 3), ((1, 4, 1, 1), 4), ((3, 4, 70), 1), ((2, 8, 3, 3), 2)],
)
@pytest.mark.parametrize("with_weight", [True, False])
def test_group_norm_reductions(k, dtype, shape, G, with_weight) -> None:
    rng = np.random.default_rng(11)
    N, C = shape[:2]
    x = (normal(rng, shape, dtype) * 2 - 1).astype(dtype)
    mean, var = k.group_norm_stats(x, G)
    xg = f64(x).reshape(N, G, -1)
    close(mean, xg.mean(-1), dtype)
    close(var, xg.var(-1), dtype)
    dy, xhat = normal(rng, shape, dtype), normal(rng, shape, dtype)
    w = normal(rng, (C,), dtype) if with_weight else None
    s1, s2 = k.group_norm_sums(dy, xhat, G, w)
    gamma = f64(w) if with_weight else np.ones(C)
    gdy = f64(dy) * gamma.reshape((1, C) + (1,) * (len(shape) - 2))
    close(s1, gdy.reshape(N, G, -1).sum(-1), dtype)
    close(s2, (gdy * f64(xhat)).reshape(N, G, -1).sum(-1), dtype)


# ---------------------------------------------------------------------------
# CGNL moments


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,M,Q", [(5, 70, 3), (1, 1, 0), (4, 33, 1), (2, 10, 8)])
def test_cgnl_moments(k, dtype, R, M, Q) -> None:
    rng = np.random.default_rng(12)
    p = (normal(rng, (R, M), dtype) * 0.7).astype(dtype)
    g = normal(rng, (R, M), dtype)
    s = k.cgnl_moments_forward(p, g, Q)
    q = np.arange(Q + 1)
    pw = f64(p)[:, :, None] ** q  # (R, M, Q+1), p^0 = 1
    close(s, (pw * f64(g)[:, :, None]).sum(1), dtype)
    ds = normal(rng, s.shape, dtype)
    dp, dg = k.cgnl_moments_backward(ds, p, g)
    dpw = np.where(q > 0, q * f64(p)[:, :, None] ** np.maximum(q - 1, 0), 0.0)
    close(dp, f64(g) * (dpw * f64(ds)[:, None, :]).sum(-1), dtype)
    close(dg, (pw * f64(ds)[:, None, :]).sum(-1), dtype)


# ---------------------------------------------------------------------------
# argument checks of the wrappers


def test_wrappers_refuse_bad_arguments(k) -> None:
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        k.global_pool_forward(x.astype(np.int64), "avg")
    with pytest.raises(ValueError, match="kind: expected one of"):
        k.global_pool_forward(x, "median")
    with pytest.raises(TypeError, match="all arrays must share one dtype"):
        k.gate_mul_forward(x, np.zeros((2, 3, 1, 1)))
    with pytest.raises(ValueError, match="z: expected a channel gate"):
        k.gate_mul_forward(x, np.zeros((2, 3, 4, 1), np.float32))
    with pytest.raises(ValueError, match="weight: expected shape"):
        k.small_conv_forward(x, np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="num_groups: expected a divisor"):
        k.group_norm_stats(x, 2)
    with pytest.raises(ValueError, match="order: expected an int in 0..8"):
        k.cgnl_moments_forward(x[0, 0], x[0, 0], 9)
    with pytest.raises(ValueError, match="kernel_size: expected at most"):
        k.max_pool_forward(x, 5)
    with pytest.raises(ValueError, match="positions, got 0"):
        k.global_pool_forward(np.zeros((2, 3, 0), np.float32), "max")
