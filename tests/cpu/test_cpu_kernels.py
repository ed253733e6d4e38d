"""The CPU kernel tier (refattn.cpu, numba) against the NumPy formulas.

Bit for bit where the tier does the NumPy path's arithmetic in the same
order (max-pool, the arg-max pools, the gate's forward and dx, the norms'
normalise-and-affine pass given the same statistics); within
``kernel_ops.TOLERANCE`` elsewhere (float64 sums, the kernels' exp), and each
tolerance comparison is shown to fail on a wrong result.  Whole blocks run
through the tier agree with the NumPy path and pass float64 gradient
checks.  Skipped without numba (the ``cpu`` extra); REFATTN_REQUIRE_NUMBA=1
turns the skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn.backend import NonFiniteError
from refattn.blocks.registry import BLOCKS, draw_case, gradcheck_block, run_block
from refattn.cuda import use_kernels
from refattn.ops import overrides
from refattn.ops.elementwise import (
    AddCache,
    add_backward,
    add_forward,
    ReluCache,
    gate_mul_backward,
    gate_mul_forward,
    relu_backward,
    relu_forward,
)
from refattn.ops.conv import Conv2dCache, conv2d_backward, conv2d_forward
from refattn.ops.linear import _add_outer_products, _add_product_into, _product_into
from refattn.ops.norm import (
    BatchNormCache,
    GroupNormCache,
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
)
from refattn.ops.pool import (
    channel_pool_backward,
    channel_pool_forward,
    global_pool_backward,
    global_pool_forward,
    max_pool_backward,
    max_pool_forward,
)
from refattn.ops.softmax import SoftmaxCache, softmax_backward, softmax_forward

if os.environ.get("REFATTN_REQUIRE_NUMBA") == "1":
    import numba  # noqa: F401 - a failure, not a skip, when it is required
else:
    pytest.importorskip("numba", reason="the cpu extra (numba) is not installed")

from refattn.cpu import blas, kernel_ops
from refattn.cpu import kernels as K

DTYPES = ("float32", "float64")


@pytest.fixture(autouse=True)
def _tier_loaded() -> Iterator[None]:
    """The NumPy table holds the tier (whatever ran before)."""
    overrides._load_cpu()
    assert set(kernel_ops.OVERRIDES) <= set(overrides.CPU_OVERRIDES)
    yield


def generic(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """f on the NumPy path (the tier switched off)."""
    with use_kernels(False):
        return f(*args, **kwargs)


def assert_close(actual: Any, expected: Any, dtype: str) -> None:
    """Within the documented tolerance of the tier, relative to the largest
    magnitude of the reference."""
    rtol, atol = kernel_ops.TOLERANCE[dtype]
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def normal(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _caches_of_tier(*caches: Any) -> None:
    for c in caches:
        assert type(c).__module__ == "refattn.cpu.kernel_ops", type(c)


# ---------------------------------------------------------------------------
# the comparison itself


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wrong", ["negated", "scaled", "zeroed", "one ulp x 1000"])
def test_assert_close_rejects_a_wrong_result(dtype: str, wrong: str) -> None:
    ref = normal((64, 80), dtype)
    eps = np.finfo(dtype).eps
    bad = {
        "negated": -ref,
        "scaled": ref * (1 + 1e-3),
        "zeroed": np.zeros_like(ref),
        "one ulp x 1000": ref + np.abs(ref).max() * 1000 * eps,
    }[wrong]
    with pytest.raises(AssertionError):
        assert_close(bad, ref, dtype)
    assert_close(ref * (1 + eps), ref, dtype)  # a rounding difference passes


# ---------------------------------------------------------------------------
# the switch and the threshold


def test_generic_env_turns_the_tier_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x = normal((32, 256), "float64")
    _, cache = softmax_forward(x)
    _caches_of_tier(cache)
    monkeypatch.setenv("REFATTN_KERNELS", "generic")
    _, cache = softmax_forward(x)
    assert type(cache) is SoftmaxCache


def test_small_inputs_stay_on_the_numpy_path() -> None:
    x = normal((4, kernel_ops.MIN_ELEMENTS // 4 - 1), "float64")
    _, cache = softmax_forward(x)
    assert type(cache) is SoftmaxCache


def test_without_numba_nothing_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overrides, "CPU_OVERRIDES", {})
    monkeypatch.setattr(kernel_ops, "available", lambda: False)
    kernel_ops.register()
    assert overrides.CPU_OVERRIDES == {}
    _, cache = softmax_forward(normal((32, 256), "float64"))
    assert type(cache) is SoftmaxCache


def test_views_and_subclasses_stay_on_the_numpy_path() -> None:
    x = normal((64, 256), "float64")
    _, cache = softmax_forward(x[:, ::2])  # not contiguous
    assert type(cache) is SoftmaxCache
    _, cache = softmax_forward(x, axis=0)  # not the last axis
    assert type(cache) is SoftmaxCache


# ---------------------------------------------------------------------------
# the kernels' exp (softmax's), against a 64-digit reference


EXP_MAX_ULP = 1.5  # measured 1.15 (float32) and 1.16 (float64)


def ulp_error(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|got − e^x| in units of the spacing of the dtype at e^x, e^x taken in
    extended precision (longdouble) and rounded to nothing in between."""
    ref = np.exp(x.astype(np.longdouble))
    spacing = np.spacing(np.abs(ref).astype(got.dtype)).astype(np.longdouble)
    return np.abs(got.astype(np.longdouble) - ref) / spacing


def exp_grid(dtype: str) -> np.ndarray:
    """[−750, 0] densely, the subnormal outputs, and v near 0 on a log scale."""
    return np.concatenate([
        np.linspace(-750.0, 0.0, 1_500_001),
        -np.logspace(-320, 2.9, 20_000),
        np.linspace(-104.0, -87.0, 20_001),  # float32's subnormal outputs
        np.linspace(-746.0, -707.0, 20_001),  # float64's
    ]).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_exp_is_within_one_and_a_half_ulp(dtype: str) -> None:
    x = exp_grid(dtype)
    got = np.empty_like(x)
    K.exp_nonpositive(x, got)
    err = ulp_error(got, x)
    assert float(err.max()) <= EXP_MAX_ULP, (float(err.max()), x[int(err.argmax())])
    # the check sees 2 ulp: the same values pushed away from e^x by 2 spacings
    ref = np.exp(x.astype(np.longdouble)).astype(dtype)
    away = ref + 2 * np.spacing(ref)
    assert float(ulp_error(away, x).max()) > EXP_MAX_ULP


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_exp_special_values(dtype: str) -> None:
    x = np.array([0.0, -0.0, -np.inf, np.nan, -1e30, -750.0, -1.0], dtype)
    got = np.empty_like(x)
    K.exp_nonpositive(x, got)
    assert got[0] == got[1] == 1.0  # exactly
    assert got[2] == got[4] == got[5] == 0.0
    assert np.isnan(got[3])
    e = np.asarray(np.exp(-1.0), dtype)
    assert abs(float(got[6]) - float(e)) <= float(np.spacing(e))


@settings(max_examples=50, deadline=None)
@given(v=st.floats(-800.0, 0.0), dtype=st.sampled_from(DTYPES))
def test_kernel_exp_property(v: float, dtype: str) -> None:
    x = np.full(3, v, dtype)
    got = np.empty_like(x)
    K.exp_nonpositive(x, got)
    assert float(ulp_error(got, x).max()) <= EXP_MAX_ULP
    assert 0.0 <= got[0] <= 1.0


def test_softmax_keeps_non_finite_rows_non_finite() -> None:
    """A NaN or an infinite logit (an overflow upstream) must not come out as
    a finite probability: the block's output check relies on it."""
    x = normal((6, 40), "float32")
    x[1, 3] = np.nan
    x[2, :] = np.inf
    x[3, 5] = np.inf
    y = np.empty_like(x)
    K.softmax_rows(x, y)
    assert np.isnan(y[1]).all() or np.isnan(y[1, 3])
    assert np.isnan(y[2]).all() and not np.isfinite(y[3]).all()
    assert np.isfinite(y[[0, 4, 5]]).all()


# ---------------------------------------------------------------------------
# softmax


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_numpy(dtype: str) -> None:
    x = normal((4, 96, 130), dtype) * 4
    dout = normal(x.shape, dtype, 1)
    y, cache = softmax_forward(x)
    dx = softmax_backward(dout, cache)
    _caches_of_tier(cache)
    y0, c0 = generic(softmax_forward, x)
    assert_close(y, y0, dtype)
    assert_close(dx, generic(softmax_backward, dout, c0), dtype)
    assert y.dtype == dx.dtype == x.dtype


def test_softmax_backward_checks_dout_as_the_numpy_path() -> None:
    x = normal((32, 256), "float64")
    _, cache = softmax_forward(x)
    with pytest.raises(ValueError, match="dout"):
        softmax_backward(np.ones((32, 255)), cache)
    strided = normal((32, 512), "float64")[:, ::2]  # a view takes the NumPy route
    np.testing.assert_allclose(
        softmax_backward(strided, cache),
        generic(softmax_backward, strided, SoftmaxCache(*cache)), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), length=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), shift=st.floats(-50, 50))
def test_softmax_kernel_rows_property(rows: int, length: int, dtype: str,
                                      shift: float) -> None:
    x = normal((rows, length), dtype) + np.asarray(shift, dtype)
    y = np.empty_like(x)
    K.softmax_rows(x, y)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    assert_close(y, e / e.sum(axis=1, keepdims=True), dtype)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------
# batch norm and group norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_batch_norm_matches_numpy(dtype: str, affine: str) -> None:
    C = 12
    x = normal((6, C, 9, 11), dtype) * 3 + 1
    w = normal((C,), dtype, 2) if affine != "none" else None
    b = normal((C,), dtype, 3) if affine == "both" else None
    rm, rv = normal((C,), dtype, 4), np.abs(normal((C,), dtype, 5)) + 0.5
    dout = normal(x.shape, dtype, 6)
    kw = {"training": True, "momentum": 0.1, "eps": 1e-5}
    out, cache = batch_norm_forward(x, w, b, rm, rv, **kw)
    grads = batch_norm_backward(dout, cache)
    _caches_of_tier(cache)
    out0, c0 = generic(batch_norm_forward, x, w, b, rm, rv, **kw)
    grads0 = generic(batch_norm_backward, dout, c0)
    for a, e in zip(list(out) + list(grads), list(out0) + list(grads0)):
        assert (a is None) == (e is None)
        if e is not None:
            assert a.dtype == e.dtype
            assert_close(a, e, dtype)


def test_batch_norm_eval_mode_stays_on_the_numpy_path() -> None:
    x = normal((4, 8, 16, 16), "float64")
    _, cache = batch_norm_forward(x, None, None, np.zeros(8), np.ones(8),
                                  training=False)
    assert type(cache) is BatchNormCache


def test_batch_norm_reports_an_overflow_as_the_numpy_path() -> None:
    x = normal((4, 8, 16, 16), "float32") * np.float32(5e37)  # finite, but
    # its float32 variance is not
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(NonFiniteError) as tier:
            batch_norm_forward(x, None, None, None, None, training=True)
        with pytest.raises(NonFiniteError) as numpy_path:
            generic(batch_norm_forward, x, None, None, None, None, training=True)
    assert str(tier.value) == str(numpy_path.value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_numpy(dtype: str, affine: bool) -> None:
    C, G = 32, 8
    x = normal((3, C, 10, 13), dtype) * 2 - 1
    w = normal((C,), dtype, 2) if affine else None
    b = normal((C,), dtype, 3) if affine else None
    dout = normal(x.shape, dtype, 6)
    y, cache = group_norm_forward(x, w, b, num_groups=G)
    grads = group_norm_backward(dout, cache)
    _caches_of_tier(cache)
    y0, c0 = generic(group_norm_forward, x, w, b, num_groups=G)
    assert_close(y, y0, dtype)
    assert_close(cache.inv_std, c0.inv_std, dtype)
    for a, e in zip(grads, generic(group_norm_backward, dout, c0)):
        assert (a is None) == (e is None)
        if e is not None:
            assert_close(a, e, dtype)


def test_group_norm_backward_with_a_bad_dout_raises_the_numpy_error() -> None:
    x = normal((3, 32, 10, 13), "float64")
    _, cache = group_norm_forward(x, None, None, num_groups=8)
    with pytest.raises(ValueError) as tier:
        group_norm_backward(np.ones((3, 32, 10, 12)), cache)
    with pytest.raises(ValueError) as numpy_path:
        group_norm_backward(np.ones((3, 32, 10, 12)), cache.generic())
    assert str(tier.value) == str(numpy_path.value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_norm_passes_are_the_numpy_formula_bit_for_bit(dtype: str, affine: str) -> None:
    """Given the same statistics, y = x̂·γ + β, x̂ = (x − μ)·inv, is the NumPy
    ops' bits (same order, the data's dtype), and so is the backward's
    dout·a − x̂·b − c with x̂ recomputed from x: the same as a stored x̂."""
    N, C, L = 4, 6, 50
    x = normal((N, C, L), dtype)
    mean, inv = normal((C,), dtype, 1), np.abs(normal((C,), dtype, 2)) + 0.1
    g = normal((C,), dtype, 3) if affine in ("both", "weight") else None
    b = normal((C,), dtype, 4) if affine in ("both", "bias") else None
    empty = np.empty(0, dtype)
    y = np.empty_like(x)
    K.norm_apply(x.reshape(N * C, L), mean, inv, 1, empty if g is None else g,
                 empty if b is None else b, y.reshape(N * C, L))
    xhat0 = (x - mean[:, None]) * inv[:, None]
    y0 = xhat0 if g is None else xhat0 * g[:, None]
    y0 = y0 if b is None else y0 + b[:, None]
    np.testing.assert_array_equal(y, y0)
    dout = normal(x.shape, dtype, 8)
    dx = np.empty_like(x)
    a, bb, c = (np.tile(normal((C,), dtype, s), N) for s in (5, 6, 7))
    K.norm_backward_apply(dout.reshape(N * C, L), x.reshape(N * C, L), mean, inv, 1,
                          a, bb, c, dx.reshape(N * C, L))
    dx0 = dout * a.reshape(N, C, 1)
    dx0 -= xhat0 * bb.reshape(N, C, 1)
    dx0 -= c.reshape(N, C, 1)
    np.testing.assert_array_equal(dx, dx0)
    # the row sums: Σ dout and Σ dout ⊙ x̂, float64
    s_d, s_dx = np.empty(N * C), np.empty(N * C)
    K.norm_row_sums(dout.reshape(N * C, L), x.reshape(N * C, L), mean, inv, 1, s_d, s_dx)
    np.testing.assert_allclose(s_d, dout.astype(np.float64).sum(-1).reshape(-1),
                               rtol=1e-12, atol=1e-12)
    tol = 1e-12 if dtype == "float64" else 1e-6  # a product may be regrouped
    np.testing.assert_allclose(
        s_dx, (dout * xhat0).astype(np.float64).sum(-1).reshape(-1), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 50), (1, 8, 3000), (3, 2, 1)])
def test_group_mean_var_is_the_two_pass_formula(dtype: str, shape: tuple) -> None:
    """mean = (Σ x / n) rounded to the dtype, var = Σ (x − mean)² / n with the
    difference in the dtype, both sums in float64; and a shifted mean is
    rejected by the same comparison."""
    x = normal(shape, dtype) * 3 + 100
    mean, var = np.empty(shape[1], dtype), np.empty(shape[1], dtype)
    K.group_mean_var(x, mean, var)
    n = shape[0] * shape[2]
    mean0 = (x.astype(np.float64).sum(axis=(0, 2)) / n).astype(dtype)
    d = (x - mean0[None, :, None]).astype(np.float64)
    var0 = ((d * d).sum(axis=(0, 2)) / n).astype(dtype)
    tol = {"rtol": 1e-12} if dtype == "float64" else {"rtol": 2 * np.finfo(dtype).eps}
    np.testing.assert_allclose(mean, mean0, **tol)
    np.testing.assert_allclose(var, var0, **tol)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(mean * (1 + 1e-5), mean0, **tol)


def test_norm_cache_keeps_the_input_and_the_generic_cache_recomputes_xhat() -> None:
    """The tier caches x and the statistics, not x̂; ``generic()`` rebuilds the
    generic cache with x̂ = (x − mean)·inv_std, the forward's bits."""
    x = normal((3, 32, 10, 13), "float32") * 2 - 1
    _, gn = group_norm_forward(x, None, None, num_groups=8)
    assert gn.x is x
    xg = x.reshape(3, 8, -1)
    xhat0 = (xg - gn.mean.reshape(3, 8, 1)) * gn.inv_std.reshape(3, 8, 1)
    xhat0 = xhat0.reshape(x.shape)
    np.testing.assert_array_equal(gn.generic().xhat, xhat0)
    assert type(gn.generic()) is GroupNormCache and gn.generic().inv_std is gn.inv_std
    _, bn = batch_norm_forward(x, None, None, None, None, training=True)
    xhat0 = (x - bn.mean.reshape(1, 32, 1, 1)) * bn.inv_std.reshape(1, 32, 1, 1)
    np.testing.assert_array_equal(bn.generic().xhat, xhat0)
    assert type(bn.generic()) is BatchNormCache


# ---------------------------------------------------------------------------
# the sigmoid gate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["channel", "spatial"])
def test_gate_mul_matches_numpy(dtype: str, gate: str) -> None:
    N, C, H, W = 4, 24, 14, 13
    x = normal((N, C, H, W), dtype)
    z = normal((N, C, 1, 1) if gate == "channel" else (N, 1, H, W), dtype, 1) * 3
    dout = normal(x.shape, dtype, 2)
    out, cache = gate_mul_forward(x, z)
    dx, dz = gate_mul_backward(dout, cache)
    _caches_of_tier(cache)
    out0, c0 = generic(gate_mul_forward, x, z)
    dx0, dz0 = generic(gate_mul_backward, dout, c0)
    np.testing.assert_array_equal(out, out0)  # same formula, same bits
    np.testing.assert_array_equal(dx, dx0)
    assert dz.shape == z.shape and dz.dtype == z.dtype
    assert_close(dz, dz0, dtype)


# ---------------------------------------------------------------------------
# ReLU


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_is_numpy_bit_for_bit(dtype: str) -> None:
    """np.maximum's bits and the masked product's, signed zeros, infinities
    and NaN included (the generic backward gives -0.0 for a negative dout)."""
    x = normal((8, 24, 32), dtype)
    x.reshape(-1)[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan]
    dout = normal(x.shape, dtype, 1)
    dout.reshape(-1)[6:9] = [np.nan, -0.0, np.inf]
    with np.errstate(invalid="ignore"):
        # the kernels themselves: the op's own check refuses non-finite x
        out, cache = kernel_ops.relu_forward(x)
        out0 = np.maximum(x, 0.0)  # the generic formula
        dx = relu_backward(dout, cache)
        dx0 = generic(relu_backward, dout, ReluCache(out0))
    _caches_of_tier(cache)
    uint = np.uint32 if dtype == "float32" else np.uint64
    np.testing.assert_array_equal(out.view(uint), out0.view(uint))  # NaNs' too
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(np.signbit(dx), np.signbit(dx0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_through_the_op_takes_the_tier(dtype: str) -> None:
    x, dout = normal((8, 24, 32), dtype), normal((8, 24, 32), dtype, 1)
    out, cache = relu_forward(x)
    _caches_of_tier(cache)
    out0, c0 = generic(relu_forward, x)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(relu_backward(dout, cache),
                                  generic(relu_backward, dout, c0))
    strided = normal((8, 24, 64), dtype, 2)[..., ::2]  # the generic backward
    np.testing.assert_array_equal(relu_backward(strided, cache),
                                  generic(relu_backward, strided, c0))
    with pytest.raises(ValueError, match="dout"):
        relu_backward(normal((8, 24, 31), dtype), cache)


# ---------------------------------------------------------------------------
# sums: a + b and the rank-2 update


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_per_channel_is_numpy_bit_for_bit(dtype: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward on every core, one addition per element; the backward is
    the generic one (NumPy's sums)."""
    a, b = normal((4, 24, 14, 13), dtype), normal((4, 24, 1, 1), dtype, 1)
    dout = normal(a.shape, dtype, 2)
    taken = _tier_steps_taken(monkeypatch)
    out, cache = add_forward(a, b)
    assert taken == {"add"}
    out0, c0 = generic(add_forward, a, b)
    np.testing.assert_array_equal(out, out0)
    assert type(cache) is AddCache and cache == c0
    da, db = add_backward(dout, cache)
    assert da is dout
    np.testing.assert_array_equal(db, generic(add_backward, dout, c0)[1])


def test_add_of_other_broadcasts_stays_on_the_numpy_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tier's add takes b per (n, c) only: not same shapes, b shared
    over the batch, b per position or a strided b."""
    a = normal((4, 24, 14, 13), "float64")
    taken = _tier_steps_taken(monkeypatch)
    for b in (normal((4, 24, 14, 13), "float64"), normal((1, 24, 1, 1), "float64"),
              normal((4, 1, 14, 13), "float64"),
              normal((4, 24, 1, 2), "float64")[..., ::2]):
        out, _ = add_forward(a, b)
        np.testing.assert_array_equal(out, a + b)
    assert taken == set()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_conv_bias_is_added_on_the_tier_bit_for_bit(
        dtype: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolution's bias, one value per channel for every sample, is added
    in place by the tier (the 1x1 product and the shifted-view k x k path):
    NumPy's single addition per element, so its bits, signed zeros included."""
    x, w = normal((4, 24, 14, 13), dtype), normal((32, 24, k, k), dtype, 1)
    b = normal((32,), dtype, 2)
    b[:2] = [-0.0, 0.0]
    monkeypatch.delitem(overrides.CPU_OVERRIDES, "add_product_into")  # NumPy's sums on both sides
    taken = _tier_steps_taken(monkeypatch)
    out, _ = conv2d_forward(x, w, b, padding=k // 2)
    assert "add_broadcast_into" in taken
    out0, _ = generic(conv2d_forward, x, w, b, padding=k // 2)
    uint = np.uint32 if dtype == "float32" else np.uint64
    np.testing.assert_array_equal(out.view(uint), out0.view(uint))


def _outer_operands(dtype: str, shared: bool) -> tuple[np.ndarray, ...]:
    N, n, m = 4, 48, 100
    u2_shape = (n, 1) if shared else (N, n, 1)
    return (normal((N, n, m), dtype), normal((N, n, 1), dtype, 1),
            normal((N, 1, m), dtype, 2), normal(u2_shape, dtype, 3),
            normal((N, 1, m), dtype, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_add_outer_products_is_numpy_bit_for_bit(
        dtype: str, shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass, the NumPy passes' order: the same bits (no fused multiply-add)."""
    base, u1, v1, u2, v2 = _outer_operands(dtype, shared)
    taken = _tier_steps_taken(monkeypatch)
    out = _add_outer_products(base, u1, v1, u2, v2)
    assert taken == {"add_outer_products"}
    out0 = generic(_add_outer_products, base, u1, v1, u2, v2)
    np.testing.assert_array_equal(out, out0)
    written_out = base + (u1 * v1 + u2 * v2)  # the math, term by term
    np.testing.assert_array_equal(out, written_out)
    assert not np.shares_memory(out, base)


def test_add_outer_products_rejects_a_swapped_product() -> None:
    """The bit-for-bit comparison sees one wrong term (v1 and v2 swapped)."""
    base, u1, v1, u2, v2 = _outer_operands("float64", True)
    out = _add_outer_products(base, u1, v2, u2, v1)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(out, base + (u1 * v1 + u2 * v2))


def test_add_outer_products_of_other_shapes_stays_on_the_numpy_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base, u1, v1, u2, v2 = _outer_operands("float64", True)
    taken = _tier_steps_taken(monkeypatch)
    out = _add_outer_products(base, u1, v1, u2.astype("float32"), v2)
    np.testing.assert_array_equal(out, base + (u1 * v1 + u2.astype("float32") * v2))
    out = _add_outer_products(base, u1, v1, u2[:1], v2[:, :, :1])  # broadcast v2
    np.testing.assert_array_equal(out, base + (u1 * v1 + u2[:1] * v2[:, :, :1]))
    assert taken == set()


# ---------------------------------------------------------------------------
# sums of products through NumPy's own BLAS (a GEMM with beta = 1)


needs_blas = pytest.mark.skipif(
    blas.library_path() is None,
    reason="this NumPy is not built with its bundled ILP64 OpenBLAS",
)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _fresh_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make blas.gemm() look for the library again (restored afterwards)."""
    monkeypatch.setattr(blas, "_looked", False)
    monkeypatch.setattr(blas, "_found", None)


@needs_blas
def test_numpys_own_blas_is_found_and_passes_its_check() -> None:
    """The library found is the one NumPy loaded (the same file mapped into
    the process), and it passes the load-time check."""
    assert blas.gemm() is not None
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert os.path.realpath(blas.library_path()) in maps.read_text()


WHOLE, WINDOW = (slice(None), slice(None)), (slice(None), slice(35, 165))
PRODUCT_LAYOUTS = {  # name -> (buffer, c's window in it, a, b): (48, 130) += (48, 64)·(64, 130)
    "row-major": lambda d: (normal((48, 130), d), WHOLE, normal((48, 64), d, 1),
                            normal((64, 130), d, 2)),
    "c a window of a wider array": lambda d: (normal((48, 200), d), WINDOW, normal((48, 64), d, 1),
                                              normal((64, 200), d, 2)[:, 7:137]),
    "a and b transposed": lambda d: (normal((48, 130), d), WHOLE, normal((64, 48), d, 1).T,
                                     normal((130, 64), d, 2).T),
    "a a strided tap of a weight": lambda d: (normal((48, 130), d), WHOLE,
                                              normal((48, 64, 3, 3), d, 1)[:, :, 1, 2],
                                              normal((64, 130), d, 2)),
    "b broadcast along a row": lambda d: (normal((48, 130), d), WHOLE, normal((48, 64), d, 1),
                                          np.broadcast_to(normal((64, 1), d, 2), (64, 130))),
}


@needs_blas
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(PRODUCT_LAYOUTS))
def test_add_product_into_matches_numpy(dtype: str, layout: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """c += a·b through BLAS, whatever the operands' strides: NumPy's product
    and addition within the tolerance, c updated in place, and nothing
    around it in its buffer touched."""
    buf, window, a, b = PRODUCT_LAYOUTS[layout](dtype)
    c = buf[window]
    before = buf.copy()
    want = c + a @ b
    taken = _tier_steps_taken(monkeypatch)
    out = _add_product_into(c, a, b)
    assert taken == {"add_product_into"} and out is c
    assert_close(buf[window], want, dtype)
    outside = np.ones(buf.shape, dtype=bool)
    outside[window] = False
    np.testing.assert_array_equal(_bits(buf[outside]), _bits(before[outside]))


@needs_blas
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_product_into_with_a_long_contraction_is_within_tolerance(dtype: str) -> None:
    """K = 3000 spans several of OpenBLAS's blocks, each added to c in turn:
    the sum regrouped, within the tier's tolerance."""
    c, a, b = normal((40, 150), dtype), normal((40, 3000), dtype, 1), normal((3000, 150), dtype, 2)
    want = c + a @ b
    _add_product_into(c, a, b)
    assert_close(c, want, dtype)


@needs_blas
@pytest.mark.parametrize("wrong", ["negated", "scaled", "zeroed", "one ulp x 1000"])
def test_the_product_comparison_rejects_a_wrong_sum(wrong: str) -> None:
    c, a, b = normal((40, 150), "float32"), normal((40, 3000), "float32", 1), normal((3000, 150), "float32", 2)
    want = c + a @ b
    _add_product_into(c, a, b)
    bad = {"negated": -c, "scaled": c * np.float32(1.001), "zeroed": np.zeros_like(c),
           "one ulp x 1000": c + 1000 * np.spacing(c)}[wrong]
    with pytest.raises(AssertionError):
        assert_close(bad, want, "float32")


def test_products_blas_cannot_write_stay_on_the_numpy_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """c column-major, read-only, overlapping an operand, too small, of another
    dtype than its operands, 3-D, or a subclass: NumPy's product and addition."""
    d = "float64"
    buf = normal((128, 130), d)
    cases = [
        (normal((130, 64), d).T, normal((64, 32), d, 1), normal((32, 130), d, 2)),  # column-major
        (np.broadcast_to(normal((1, 130), d), (64, 130)), normal((64, 32), d, 1), normal((32, 130), d, 2)),
        (buf[:64], buf[64:96, :64].T @ np.eye(32, dtype=d), buf[32:64]),  # b overlaps c
        (normal((8, 130), d), normal((8, 32), d, 1), normal((32, 130), d, 2)),  # 1,040 < MIN_ELEMENTS
        (normal((64, 130), d), normal((64, 32), "float32", 1), normal((32, 130), d, 2)),
        (normal((2, 64, 130), d), normal((2, 64, 32), d, 1), normal((2, 32, 130), d, 2)),
        (normal((64, 130), d).view(_Sub), normal((64, 32), d, 1), normal((32, 130), d, 2)),
    ]
    taken = _tier_steps_taken(monkeypatch)
    for c, a, b in cases:
        if c.flags.writeable:
            want = np.asarray(c + np.asarray(a, dtype=c.dtype) @ b).copy()
            out = _add_product_into(c, a, b)
            np.testing.assert_array_equal(np.asarray(out), want)
        else:
            assert not kernel_ops.product_applies(c, a, b)
    assert taken == set()


INTO_LAYOUTS = {  # name -> (buffer, r0, a, b): rows r0 : r0 + 12 of (3, M', 50) ← (3, 12, K)·(3, K, 50)
    "contiguous operands": lambda d: (normal((3, 40, 50), d), 17, normal((3, 12, 37), d, 1),
                                      normal((3, 37, 50), d, 2)),
    "transposed operands": lambda d: (normal((3, 40, 50), d), 0, normal((3, 37, 12), d, 1).mT,
                                      normal((3, 50, 37), d, 2).mT),
    "rows wider apart than a row": lambda d: (normal((3, 40, 80), d)[:, :, 10:60], 28,
                                              normal((3, 12, 37), d, 1), normal((3, 37, 50), d, 2)),
    "a shared by the batch": lambda d: (normal((3, 40, 50), d), 5, normal((12, 37), d, 1),
                                        normal((3, 37, 50), d, 2)),
    "a contraction of length 1": lambda d: (normal((3, 40, 50), d), 9, normal((3, 12, 1), d, 1),
                                            normal((3, 1, 50), d, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(INTO_LAYOUTS))
def test_product_into_has_the_numpy_paths_bits(dtype: str, layout: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """a·b written into rows of a buffer by NumPy's matmul (``out=``): bit
    for bit the product formed and copied, and every other row untouched."""
    buf, r0, a, b = INTO_LAYOUTS[layout](dtype)
    want = generic(_product_into, buf.copy(), r0, a, b)
    taken = _tier_steps_taken(monkeypatch)
    out = _product_into(buf, r0, a, b)
    assert taken == {"product_into"} and out is buf
    np.testing.assert_array_equal(_bits(buf), _bits(want))
    assert not np.array_equal(want[:, r0 : r0 + 12], np.zeros_like(want[:, r0 : r0 + 12]))


def test_product_into_declines_rows_blas_could_not_write(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A column-major buffer (NumPy's own loop would sum in another order),
    a read-only one, one overlapping an operand, rows outside the buffer, a
    row index that is not an int, mixed dtypes, integer arrays, a batch
    that does not match, or a subclass: the product formed and copied."""
    d = "float64"
    a, b = normal((3, 12, 37), d, 1), normal((3, 37, 50), d, 2)
    shared = normal((3, 50, 50), d)
    cases = [
        (normal((3, 50, 40), d).mT, 0, a, b),  # column-major rows
        (shared, 0, shared[:, 20:32, 3:40], b),  # a inside the buffer
        (normal((3, 40, 50), d), 30, a, b),  # rows 30 : 42 of 40
        (normal((3, 40, 50), d), np.int64(3), a, b),
        (normal((3, 40, 50), d), 3, a.astype("float32"), b),
        (np.zeros((3, 40, 50), dtype="int64"), 3, a.astype("int64"), b.astype("int64")),
        (normal((2, 40, 50), d), 3, a, b),  # batch 2 against 3
        (normal((3, 40, 50), d).view(_Sub), 3, a, b),
    ]
    readonly = normal((3, 40, 50), d)
    readonly.flags.writeable = False
    assert not kernel_ops.into_applies(readonly, 3, a, b)
    taken = _tier_steps_taken(monkeypatch)
    for buf, r0, ca, cb in cases:
        assert not kernel_ops.into_applies(buf, r0, ca, cb)
        if buf.shape[0] == 3 and int(r0) + 12 <= buf.shape[1]:
            want = np.array(buf, copy=True)
            want[:, int(r0) : int(r0) + 12] = np.asarray(ca, dtype=buf.dtype) @ cb
            np.testing.assert_array_equal(np.asarray(_product_into(buf, r0, ca, cb)), want)
    assert taken == set()


@pytest.mark.parametrize("block", ["non_local", "cross_layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_blocks_write_their_stacked_gradients_with_numpys_bits(
        block: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``product_into`` the only override, non_local's and cross_layer's
    gradients are the NumPy path's bit for bit: the rows written in place
    are the products that would have been concatenated."""
    spec, cfg, cast, params, state, dout = _block_case(block, dtype, 3, 8)
    want = generic(run_block, spec, cfg, cast, params, state, dout)
    if not overrides._cpu_loaded:
        overrides._load_cpu()
    only = {"product_into": overrides.CPU_OVERRIDES["product_into"]}
    monkeypatch.setattr(overrides, "CPU_OVERRIDES", only)
    taken = _tier_steps_taken(monkeypatch)
    got = run_block(spec, cfg, cast, params, state, dout)
    assert taken == {"product_into"}
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            np.testing.assert_array_equal(_bits(g[key]), _bits(w[key]), err_msg=key)


def test_without_numpys_blas_the_shifted_conv_is_numpys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No bundled OpenBLAS found (NumPy built against another BLAS): the
    override declines and the convolution runs NumPy's formulas."""
    _fresh_lookup(monkeypatch)
    monkeypatch.setattr(blas, "library_path", lambda: None)
    assert blas.gemm() is None
    x, w = normal((2, 32, 12, 12), "float64"), normal((40, 32, 3, 3), "float64", 1)
    taken = _tier_steps_taken(monkeypatch)
    out, _ = conv2d_forward(x, w, None, padding=1)
    assert "add_product_into" not in taken
    np.testing.assert_array_equal(out, generic(conv2d_forward, x, w, None, padding=1)[0])


@pytest.mark.parametrize("config", [
    {"Build Dependencies": {"blas": {"name": "accelerate"}}},
    {"Build Dependencies": {"blas": {"name": "scipy-openblas",
                                     "openblas configuration": "OpenBLAS 0.3.31 DYNAMIC_ARCH"}}},
    {"Build Dependencies": {}},
])
def test_only_numpys_ilp64_openblas_is_taken(config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another BLAS, an OpenBLAS with 32-bit integers, or a configuration that
    names none: no library, whatever files lie beside NumPy."""
    monkeypatch.setattr(np, "show_config", lambda mode=None: config)
    assert blas.library_path() is None


@needs_blas
@pytest.mark.parametrize("fault", ["beta 0", "transpose ignored", "leading dimension ignored",
                                   "swapped operands"])
def test_the_load_check_rejects_a_wrong_gemm(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check made before the first use fails on a GEMM that overwrites c,
    that reads a transposed operand as row-major, that takes c's rows as
    contiguous, or that multiplies b·a; then gemm() is None."""
    real = blas._bind(blas.library_path())

    def wrong(f: Any) -> Any:
        def call(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):  # noqa: ANN001, ANN202
            if fault == "beta 0":
                beta = 0.0
            elif fault == "transpose ignored":
                ta, lda = blas._NO_TRANS, k
            elif fault == "leading dimension ignored":
                ldc = n
            else:
                a, b = b, a
            return f(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        return call

    bad = {dt: wrong(f) for dt, f in real.items()}
    assert blas._passes_check(real)
    assert not blas._passes_check(bad)
    _fresh_lookup(monkeypatch)
    monkeypatch.setattr(blas, "_bind", lambda path: bad)
    assert blas.gemm() is None


@needs_blas
def test_generic_env_keeps_products_on_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    c, _, a, b = PRODUCT_LAYOUTS["row-major"]("float64")
    assert kernel_ops.product_applies(c, a, b)
    monkeypatch.setenv("REFATTN_KERNELS", "generic")
    assert not kernel_ops.product_applies(c, a, b)


@needs_blas
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, padding", [(3, 1), (5, 0), (3, (2, 0))])
def test_shifted_conv_sums_its_taps_in_blas(
        dtype: str, k: int, padding: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shifted-view k x k convolution adds each tap's product as BLAS
    writes it, forward (into Y) and backward (into dX's shifted views):
    out, dx, dW and db as on the NumPy path, within the tolerance."""
    x, w = normal((3, 24, 11, 13), dtype), normal((40, 24, k, k), dtype, 1)
    b = normal((40,), dtype, 2)
    taken = _tier_steps_taken(monkeypatch)
    out, cache = conv2d_forward(x, w, b, padding=padding)
    dout = normal(out.shape, dtype, 3)
    grads = conv2d_backward(dout, cache)
    assert "add_product_into" in taken
    out0, cache0 = generic(conv2d_forward, x, w, b, padding=padding)
    grads0 = generic(conv2d_backward, dout, cache0)
    for got, want in zip((out, *grads), (out0, *grads0)):
        assert_close(got, want, dtype)


@needs_blas
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 90), k=st.integers(1, 64),
       lead=st.integers(0, 9), trans_a=st.booleans(), trans_b=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_add_product_into_property(m: int, n: int, k: int, lead: int, trans_a: bool,
                                   trans_b: bool, dtype: str, seed: int) -> None:
    """Any shapes, c a view with extra columns on each side, a and b in
    either order: NumPy's product and addition within the tolerance, through
    the BLAS call itself (below MIN_ELEMENTS too), and the columns beside c
    untouched."""
    buf = normal((m, n + 2 * lead), dtype, seed)
    c = buf[:, lead:lead + n]
    a = normal((k, m), dtype, seed + 1).T if trans_a else normal((m, k), dtype, seed + 1)
    b = normal((n, k), dtype, seed + 2).T if trans_b else normal((k, n), dtype, seed + 2)
    assert blas.applies(c, a, b)
    before, want = buf.copy(), c + a @ b
    blas.add_product_into(c, a, b)
    assert_close(c, want, dtype)
    np.testing.assert_array_equal(_bits(buf[:, :lead]), _bits(before[:, :lead]))
    np.testing.assert_array_equal(_bits(buf[:, lead + n:]), _bits(before[:, lead + n:]))

# ---------------------------------------------------------------------------
# the small k x k convolution (CBAM's spatial conv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [(8, 2, 1, 28, 28, 7, False), (3, 3, 2, 9, 11, 3, True),
                                      (2, 4, 4, 6, 17, 5, True), (1, 1, 1, 2, 3, 7, True)])
def test_small_conv_matches_numpy(dtype: str, geometry: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct sums against im2col + BLAS; kernels larger than the image
    (k = 7 on 2 x 3) and every border included."""
    monkeypatch.setattr(kernel_ops, "MIN_ELEMENTS", 0)
    N, C, O, H, W, k, has_bias = geometry
    x, w = normal((N, C, H, W), dtype), normal((O, C, k, k), dtype, 1)
    b = normal((O,), dtype, 2) if has_bias else None
    out, cache = conv2d_forward(x, w, b, padding=(k - 1) // 2)
    assert type(cache) is kernel_ops.Conv2dCpuCache
    out0, c0 = generic(conv2d_forward, x, w, b, padding=(k - 1) // 2)
    assert_close(out, out0, dtype)
    dout = normal(out.shape, dtype, 3)
    grads = conv2d_backward(dout[..., ::-1], cache)  # a strided dout too
    grads0 = generic(conv2d_backward, dout[..., ::-1], c0)
    for g, g0 in zip(grads, grads0):
        if g0 is None:
            assert g is None
        else:
            assert g.dtype == g0.dtype and g.shape == g0.shape
            assert_close(g, g0, dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), o=st.integers(1, 4),
       h=st.integers(1, 12), w=st.integers(1, 12), k=st.sampled_from([3, 5, 7]),
       dtype=st.sampled_from(DTYPES))
def test_small_conv_kernels_property(n: int, c: int, o: int, h: int, w: int, k: int,
                                     dtype: str) -> None:
    """The kernels against the sums written out in float64 (tap by tap on
    the padded image), any image and kernel size, k larger than the image
    included."""
    x, wt = normal((n, c, h, w), dtype), normal((o, c, k, k), dtype, 1)
    d = normal((n, o, h, w), dtype, 2)
    p = (k - 1) // 2
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    w64, d64 = wt.astype(np.float64), d.astype(np.float64)
    want = np.zeros((n, o, h, w))
    dxpad = np.zeros_like(xpad)
    dw_want = np.zeros(wt.shape)
    for u in range(k):
        for v in range(k):
            window = xpad[:, :, u:u + h, v:v + w]
            want += np.einsum("oc,nchw->nohw", w64[:, :, u, v], window)
            dxpad[:, :, u:u + h, v:v + w] += np.einsum("oc,nohw->nchw", w64[:, :, u, v], d64)
            dw_want[:, :, u, v] = np.einsum("nohw,nchw->oc", d64, window)
    out = np.empty((n, o, h, w), dtype=dtype)
    K.small_conv_forward(x, wt, wt[:, 0, 0, 0], False, out)
    assert_close(out, want, dtype)
    dx, dw, db = np.empty_like(x), np.empty(wt.shape), np.empty(o)
    K.small_conv_backward(d, x, wt, dx, dw, db)
    assert_close(dx, dxpad[:, :, p:p + h, p:p + w], dtype)
    assert_close(dw, dw_want, dtype)
    assert_close(db, d64.sum(axis=(0, 2, 3)), dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), rows=st.integers(1, 40), cols=st.integers(1, 300),
       shared=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_add_outer_products_kernel_property(n: int, rows: int, cols: int, shared: bool,
                                            dtype: str) -> None:
    base, u1 = normal((n, rows, cols), dtype), normal((n, rows), dtype, 1)
    v1, v2 = normal((n, cols), dtype, 2), normal((n, cols), dtype, 3)
    u2 = normal((1 if shared else n, rows), dtype, 4)
    out = np.empty_like(base)
    K.add_outer_products(base, u1, v1, u2, v2, out)
    want = base + (u1[:, :, None] * v1[:, None, :] + u2[:, :, None] * v2[:, None, :])
    np.testing.assert_array_equal(out, want)


def test_small_conv_of_other_geometries_stays_on_the_numpy_path() -> None:
    x = normal((4, 4, 30, 30), "float64")
    for w, kwargs in ((normal((5, 4, 3, 3), "float64"), {"padding": 1}),  # 5 > 4 out
                      (normal((1, 4, 3, 3), "float64"), {"padding": 0}),  # not 'same'
                      (normal((1, 4, 3, 3), "float64"), {"padding": 1, "stride": 2}),
                      (normal((1, 4, 4, 4), "float64"), {"padding": 2})):  # even k
        _, cache = conv2d_forward(x, w, **kwargs)
        assert type(cache) is Conv2dCache, (w.shape, kwargs)


def test_small_conv_backward_checks_dout() -> None:
    x, w = normal((8, 2, 28, 28), "float64"), normal((1, 2, 7, 7), "float64", 1)
    _, cache = conv2d_forward(x, w, padding=3)
    assert type(cache) is kernel_ops.Conv2dCpuCache
    with pytest.raises(ValueError, match=r"^dout: expected the forward's output shape"):
        conv2d_backward(normal((8, 1, 28, 27), "float64"), cache)
    with pytest.raises(TypeError, match="dout=float32"):
        conv2d_backward(normal((8, 1, 28, 28), "float32"), cache)


# ---------------------------------------------------------------------------
# pools (arg-max: bit for bit, ties included)


def _with_ties(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.random.default_rng(3).integers(-3, 4, shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [((2, 2), None), ((3, 3), (2, 2)),
                                      ((2, 3), (3, 1)), ((1, 1), None)])
def test_max_pool_is_numpy_bit_for_bit(dtype: str, geometry: Any) -> None:
    k, s = geometry
    x = _with_ties((3, 16, 15, 14), dtype)
    out, cache = max_pool_forward(x, kernel_size=k, stride=s)
    _caches_of_tier(cache)
    out0, c0 = generic(max_pool_forward, x, kernel_size=k, stride=s)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(cache.idx, c0.idx)
    assert cache.idx.dtype == c0.idx.dtype
    dout = normal(out.shape, dtype, 1)
    dx, dx0 = max_pool_backward(dout, cache), generic(max_pool_backward, dout, c0)
    if s is not None and any(ss < kk for kk, ss in zip(k, s)):
        assert_close(dx, dx0, dtype)  # overlapping windows: sums in another order
    else:
        np.testing.assert_array_equal(dx, dx0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_takes_a_channel_slice_and_a_strided_dout(dtype: str) -> None:
    """non_local pools a channel slice of its projections: the tier reads it
    in place (no copy) and must give the NumPy path's bits."""
    whole = _with_ties((3, 40, 15, 14), dtype)
    x = whole[:, 8:24]  # (3, 16, 15, 14), not C-contiguous
    assert not x.flags.c_contiguous
    out, cache = max_pool_forward(x, kernel_size=2)
    _caches_of_tier(cache)
    out0, c0 = generic(max_pool_forward, np.ascontiguousarray(x), kernel_size=2)
    np.testing.assert_array_equal(out, out0)
    np.testing.assert_array_equal(cache.idx, c0.idx)
    wide = normal((3, 32) + out.shape[2:], dtype, 1)
    dout = wide[:, ::2]  # every other channel: a strided cotangent
    dx = max_pool_backward(dout, cache)
    np.testing.assert_array_equal(
        dx, generic(max_pool_backward, np.ascontiguousarray(dout), c0))


class _Sub(np.ndarray):
    """An ndarray subclass: the tier leaves it to the NumPy formulas."""


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [((2, 2), None), ((3, 3), (2, 2))])
def test_max_pool_backward_into_channels_of_a_buffer(dtype: str, geometry: Any) -> None:
    """out=(buf, c0), as non_local's backward passes it: the fresh dx's bits
    (sums in another order where windows overlap) in channels c0 : c0 + C,
    every element written (buf starts as NaN), the others left alone; also
    through the generic route, which a subclass takes."""
    from refattn.ops.pool import _max_pool_backward

    k, s = geometry
    x = _with_ties((3, 16, 15, 14), dtype)
    out, cache = max_pool_forward(x, kernel_size=k, stride=s)
    _caches_of_tier(cache)
    dout = normal(out.shape, dtype, 1)
    want = generic(max_pool_backward, dout,
                   generic(max_pool_forward, x, kernel_size=k, stride=s)[1])
    for d in (dout, dout.view(_Sub)):
        buf = np.full((3, 21, 15, 14), np.nan, dtype=dtype)
        assert _max_pool_backward(d, cache, out=(buf, 3)) is buf
        if s is not None and type(d) is np.ndarray:
            assert_close(buf[:, 3:19], want, dtype)  # overlaps: another order
        else:
            np.testing.assert_array_equal(buf[:, 3:19], want)
        assert np.isnan(buf[:, :3]).all() and np.isnan(buf[:, 19:]).all()


def test_max_pool_backward_checks_dout_finite() -> None:
    x = normal((3, 16, 16, 16), "float64")
    out, cache = max_pool_forward(x, kernel_size=2)
    dout = np.ones(out.shape)
    dout[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="dout"):
        max_pool_backward(dout, cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["max", "mean"])
def test_channel_pool_matches_numpy(dtype: str, kind: str) -> None:
    x = _with_ties((4, 40, 11, 12), dtype) + normal((4, 40, 11, 12), dtype) / 8
    out, cache = channel_pool_forward(x, kind=kind)
    out0, c0 = generic(channel_pool_forward, x, kind=kind)
    assert out.shape == out0.shape and out.dtype == out0.dtype
    if kind == "max":
        np.testing.assert_array_equal(out, out0)
        np.testing.assert_array_equal(cache.idx, c0.idx)
        assert cache.idx.dtype == c0.idx.dtype
    else:
        assert_close(out, out0, dtype)
    dout = normal(out.shape, dtype, 1)
    np.testing.assert_array_equal(channel_pool_backward(dout, cache),
                                  generic(channel_pool_backward, dout, c0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdim", [False, True])
def test_global_max_pool_is_numpy_bit_for_bit(dtype: str, keepdim: bool) -> None:
    x = _with_ties((4, 64, 7, 9), dtype)
    out, cache = global_pool_forward(x, kind="max", keepdim=keepdim)
    out0, c0 = generic(global_pool_forward, x, kind="max", keepdim=keepdim)
    np.testing.assert_array_equal(out, out0)
    assert out.shape == out0.shape
    np.testing.assert_array_equal(cache.idx, c0.idx)
    assert cache.idx.dtype == c0.idx.dtype
    dout = normal(out.shape, dtype, 1)
    np.testing.assert_array_equal(global_pool_backward(dout, cache),
                                  generic(global_pool_backward, dout, c0))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), length=st.integers(1, 100), levels=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_row_max_arg_kernel_is_numpy_argmax_property(
    rows: int, length: int, levels: int, dtype: str, seed: int
) -> None:
    """Eight lanes and a tail, with many ties (a few distinct values): the
    first position of the maximum, as NumPy's argmax."""
    x = np.random.default_rng(seed).integers(0, levels, (rows, length)).astype(dtype)
    out, arg = np.empty(rows, dtype), np.empty(rows, np.int64)
    K.row_max_arg(x, out, arg)
    np.testing.assert_array_equal(arg, x.argmax(axis=1))
    np.testing.assert_array_equal(out, x.max(axis=1))


# ---------------------------------------------------------------------------
# whole blocks through the tier


BLOCK_CASES = {  # block -> (preset, overrides, shapes) large enough for the tier
    "cbam": ("jongchan", {}, {"x": (4, 64, 14, 14)}),
    "non_local": ("alexhex7", {"inter_channels": 32}, {"x": (2, 64, 14, 14)}),
    "cgnl": ("yue", {"planes": 32}, {"x": (2, 64, 12, 12)}),
    "gc": ("mmcv", {"fusion_types": ["channel_mul", "channel_add"]},
           {"x": (4, 64, 14, 14)}),
    "mlpconv": ("nin_cifar_1", {"channels": (32, 24, 16), "kernel_size": 3, "padding": 1},
                {"x": (2, 16, 16, 16)}),
    "cross_layer": ("cnl", {"planes": 32},
                    {"x_q": (2, 64, 7, 7), "x_kv": (2, 32, 14, 14)}),
}


def _block_case(block: str, dtype: str, seed: int, dout_seed: int) -> tuple[Any, ...]:
    """spec, cfg, inputs, params, state and a drawn dout of BLOCK_CASES[block]
    at `dtype`."""
    preset, sets, shapes = BLOCK_CASES[block]
    spec = BLOCKS[block]
    cfg = spec.config(preset, **sets)
    inputs, params, state = (
        {k: v.astype(dtype) for k, v in d.items()}
        for d in draw_case(spec, cfg, shapes, seed=seed))
    out, _, _ = generic(run_block, spec, cfg, inputs, params, state)
    return spec, cfg, inputs, params, state, normal(out["out"].shape, dtype, dout_seed)


def _tier_steps_taken(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Record which tier steps run."""
    taken: set[str] = set()
    for name, o in list(overrides.CPU_OVERRIDES.items()):
        def forward(*args: Any, _f: Any = o.forward, _n: str = name) -> Any:
            taken.add(_n)
            return _f(*args)
        monkeypatch.setitem(overrides.CPU_OVERRIDES, name, o._replace(forward=forward))
    return taken


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", sorted(BLOCK_CASES))
def test_block_matches_the_numpy_path(block: str, dtype: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec, cfg, cast, params, state, dout = _block_case(block, dtype, 1, 7)
    taken = _tier_steps_taken(monkeypatch)
    out, dins, dparams = run_block(spec, cfg, cast, params, state, dout)
    assert taken, "no step of the block took the tier"
    out0, dins0, dparams0 = generic(run_block, spec, cfg, cast, params, state, dout)
    # the float64 NumPy path at the same values: how far float32 rounding
    # alone moves each result (CGNL's p and g weight gradients are small
    # differences of large terms, where float32 keeps few digits either way)
    wide = {k: v.astype("float64") for k, v in cast.items()}
    truth = generic(run_block, spec, cfg, wide,
                    {k: v.astype("float64") for k, v in params.items()},
                    {k: v.astype("float64") for k, v in state.items()},
                    dout.astype("float64"))
    # a gradient that is a small difference of large terms (CGNL's p and g
    # weights) carries rounding of the size of those terms: the absolute
    # tolerance is taken relative to the block's largest gradient
    largest = max(float(np.max(np.abs(v))) for d in (dins0, dparams0)
                  for v in d.values())
    for got, want, true in zip((out, dins, dparams), (out0, dins0, dparams0), truth):
        assert set(got) == set(want)
        for key in want:
            rtol, atol = kernel_ops.TOLERANCE[dtype]
            scale = max(float(np.max(np.abs(want[key]))),
                        largest if want is not out0 else 0.0)
            numpy_error = float(np.max(np.abs(want[key] - true[key])))
            # a block chains steps; its error may be a few times a step's,
            # and never much more than the NumPy path's own float32 error
            bound = max(50 * atol * scale, 4 * numpy_error)
            np.testing.assert_allclose(got[key], want[key], rtol=50 * rtol,
                                       atol=bound, err_msg=key)


def test_block_comparison_rejects_a_wrong_gradient() -> None:
    """The bound of test_block_matches_the_numpy_path fails on a gradient
    scaled by 1.01 (float32 non_local)."""
    spec, cfg, cast, params, state, dout = _block_case("non_local", "float32", 1, 7)
    _, dins, _ = run_block(spec, cfg, cast, params, state, dout)
    _, dins0, _ = generic(run_block, spec, cfg, cast, params, state, dout)
    rtol, atol = kernel_ops.TOLERANCE["float32"]
    scale = float(np.max(np.abs(dins0["x"])))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(dins["x"] * 1.01, dins0["x"], rtol=50 * rtol,
                                   atol=50 * atol * scale)


@pytest.mark.parametrize("block", sorted(BLOCK_CASES))
def test_block_gradcheck_through_the_tier(block: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 gradient checks at the fixture shapes, every eligible step on
    the tier (the size threshold lowered to 0)."""
    monkeypatch.setattr(kernel_ops, "MIN_ELEMENTS", 0)
    preset, sets, _ = BLOCK_CASES[block]
    spec = BLOCKS[block]
    cfg = spec.config(preset, **sets)
    inputs, params, state = draw_case(spec, cfg, seed=2)
    taken = _tier_steps_taken(monkeypatch)
    mode = "full" if block in ("non_local", "cgnl") else "fast"
    report = gradcheck_block(spec, cfg, inputs, params, state, mode=mode)
    assert taken
    assert report.ok, report.to_text()


def test_golden_cases_are_the_numpy_formulas(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixture's bits do not depend on the tier: generate_case runs with it
    off even where every step would take it (threshold 0), and gives the
    bits of the generic path.  With the tier on, the same block's gradients
    differ in the last bits (float64 sums), so the check can see it."""
    from refattn.golden.generate import CaseRequest, generate_case

    req = CaseRequest("gc", "gcnet_r16", dtype="float64")
    cfg = BLOCKS["gc"].config("gcnet_r16")
    want = generic(generate_case, req, cfg).tensors
    monkeypatch.setattr(kernel_ops, "MIN_ELEMENTS", 0)
    taken = _tier_steps_taken(monkeypatch)
    got = generate_case(req, cfg).tensors
    assert taken == set()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    inputs = {k[len("input."):]: v for k, v in want.items() if k.startswith("input.")}
    params = {k[len("param."):]: v for k, v in want.items() if k.startswith("param.")}
    _, dins, _ = run_block(BLOCKS["gc"], cfg, inputs, params, {}, want["cotangent.out"])
    assert taken  # the same block outside generate_case takes the tier
    assert not np.array_equal(dins["x"], want["grad.input.x"])


def test_threads_may_call_the_tier_at_once() -> None:
    """Concurrent callers are serialised (numba's workqueue layer would abort
    on two parallel launches at once) and each gets its own result."""
    import threading

    xs = [normal((64, 300), "float64", seed) for seed in range(8)]
    results: list[Any] = [None] * len(xs)

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = softmax_forward(xs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(xs, results):
        assert_close(y, generic(softmax_forward, x)[0], "float64")


def _tbb_expected() -> bool:
    """The cpu extra installs TBB's wheel on x86-64, where one exists."""
    import platform

    return (os.environ.get("REFATTN_REQUIRE_NUMBA") == "1"
            and platform.machine() in ("x86_64", "AMD64"))


def test_threading_layer_is_tbb_or_the_workqueue_never_openmp() -> None:
    """GNU OpenMP's spinning workers make a launch after a GEMM cost
    milliseconds, and it terminates a forked child that launches a loop
    (docs/cpu-kernels.md, "The threading layer").  In a fresh interpreter
    without NUMBA_THREADING_LAYER, so the tier's own choice is checked
    whatever this process was started with."""
    import subprocess
    import sys

    script = ("import numba, numpy as np\n"
              "from refattn.ops.softmax import softmax_forward\n"
              "softmax_forward(np.ones((64, 300)))\n"  # starts the thread pool
              "print(numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    layer = proc.stdout.split()[-1]
    assert layer in ("tbb", "workqueue")
    if _tbb_expected():
        assert layer == "tbb"


_FORK_SCRIPT = """
import os
import numpy as np
from refattn.ops.softmax import softmax_forward

x = np.random.default_rng(0).standard_normal((64, 300))
want = softmax_forward(x)[0]  # the parent launches the tier first
pid = os.fork()
if pid == 0:
    got = softmax_forward(x)[0]
    os._exit(0 if np.array_equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), type(softmax_forward(x)[1]).__name__)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_runs_the_tier() -> None:
    """The parent has launched kernels; a child forked after it gets the same
    softmax (GNU OpenMP's layer would terminate it instead).  In a fresh
    interpreter: this one may hold other libraries' threads (JAX's), which a
    fork must not copy."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["child", "0", "SoftmaxCpuCache"], proc.stderr[-2000:]
