"""Softmax along any axis: gradient checks, properties, PyTorch parity and
input validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.softmax import softmax_backward, softmax_forward

F64_RTOL = 1e-12
F32_RTOL = 2e-6


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def naive_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Independent reference: a loop over the 1-D slices along `axis`."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        e = np.exp(row - row.max())
        out[idx] = e / e.sum()
    return np.moveaxis(out, -1, axis)


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_gradcheck_full_every_axis(axis: int) -> None:
    x = 2 * np.random.default_rng(axis + 10).standard_normal((2, 3, 4))
    r = gradcheck_op(
        softmax_forward, softmax_backward, {"x": x}, options={"axis": axis}, mode="full"
    )
    assert r.ok, r.to_text()


@pytest.mark.parametrize("shape, axis", [((5,), 0), ((3, 4), 0), ((2, 3, 2, 2, 3), 3)])
def test_gradcheck_full_other_ranks(shape: tuple[int, ...], axis: int) -> None:
    x = np.random.default_rng(1).standard_normal(shape)
    r = gradcheck_op(
        softmax_forward, softmax_backward, {"x": x}, options={"axis": axis}, mode="full"
    )
    assert r.ok, r.to_text()


@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_fast_moderate(axis: int) -> None:
    """Attention-map sized: (N, L, L) rows, and channels of (N, C, H, W)."""
    shape = (4, 196, 196) if axis == -1 else (4, 64, 14, 14)
    x = 3 * np.random.default_rng(2).standard_normal(shape)
    r = gradcheck_op(
        softmax_forward, softmax_backward, {"x": x}, options={"axis": axis}, mode="fast"
    )
    assert r.ok, r.to_text()


def test_gradcheck_catches_a_wrong_backward() -> None:
    """Forgetting the −Σ(dout ⊙ y) term must fail the check."""

    def wrong(dout, cache):
        return cache.y * dout

    x = np.random.default_rng(3).standard_normal((3, 5))
    r = gradcheck_op(softmax_forward, wrong, {"x": x}, mode="fast")
    assert not r.ok


@pytest.mark.parametrize("axis", [0, -1, 2])
def test_on_backend(xb, axis: int) -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 5))
    xa = xb.asarray(x)
    y, cache = softmax_forward(xa, axis=axis)
    assert backend.device(y) == xb.device
    np.testing.assert_allclose(xb.to_host(y), naive_softmax(x, axis), rtol=1e-13)
    dx = softmax_backward(xb.asarray(np.ones(x.shape)), cache)
    assert backend.device(dx) == xb.device
    r = gradcheck_op(
        softmax_forward,
        softmax_backward,
        {"x": xa},
        options={"axis": axis},
        mode="fast",
    )
    assert r.ok, r.to_text()


# ---------------------------------------------------------------------------
# properties


@st.composite
def softmax_case(draw: st.DrawFn):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1.0, 30.0, 1000.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, axis, dout


@given(softmax_case())
def test_rows_sum_to_one_and_grads_sum_to_zero(case) -> None:
    x, axis, dout = case
    eps = np.finfo(x.dtype).eps
    n = x.shape[axis]
    y, cache = softmax_forward(x, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.all(np.isfinite(y)) and np.all((y >= 0) & (y <= 1))
    np.testing.assert_allclose(np.sum(y, axis=axis), 1.0, atol=4 * n * eps)
    dx = softmax_backward(dout, cache)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    # the softmax is shift-invariant along the axis, so its VJP sums to 0 there
    scale = np.sum(np.abs(dout) * y, axis=axis) + np.max(np.abs(dout))
    assert np.all(np.abs(np.sum(dx, axis=axis)) <= 8 * n * eps * scale)


@given(softmax_case())
def test_matches_loop_reference(case) -> None:
    x, axis, _ = case
    y, _ = softmax_forward(x.astype(np.float64), axis=axis)
    np.testing.assert_allclose(y, naive_softmax(x, axis), rtol=1e-12, atol=1e-300)


@given(softmax_case(), st.floats(-3, 3), st.floats(-3, 3))
def test_backward_linear_in_dout_and_no_mutation(
    case, alpha: float, beta: float
) -> None:
    x, axis, d1 = case
    x, d1 = x.astype(np.float64), d1.astype(np.float64)
    d2 = np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape)
    x0, d10, d20 = x.copy(), d1.copy(), d2.copy()
    y, cache = softmax_forward(x, axis=axis)
    y0 = y.copy()
    g = softmax_backward(alpha * d1 + beta * d2, cache)
    g1, g2 = softmax_backward(d1, cache), softmax_backward(d2, cache)
    np.testing.assert_allclose(g, alpha * g1 + beta * g2, rtol=1e-12, atol=1e-12)
    for a, a0 in [(x, x0), (d1, d10), (d2, d20), (cache.y, y0)]:
        np.testing.assert_array_equal(a, a0)


@given(softmax_case())
def test_vjp_identity_against_explicit_jacobian(case) -> None:
    """<dout, J t> = <J^T dout, t> with J = diag(y) − y y^T built per slice."""
    x, axis, dout = case
    x, dout = x.astype(np.float64), dout.astype(np.float64)
    y, cache = softmax_forward(x, axis=axis)
    dx = softmax_backward(dout, cache)
    ym = np.moveaxis(y, axis, -1)
    dm = np.moveaxis(dout, axis, -1)
    jac = ym[..., :, None] * (np.eye(ym.shape[-1]) - ym[..., None, :])  # J[i, j]
    expected = np.einsum("...i,...ij->...j", dm, jac)
    np.testing.assert_allclose(
        np.moveaxis(dx, axis, -1), expected, rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_for_huge_logits(dtype) -> None:
    x = np.array([[1000.0, -1000.0, 999.0], [-1000.0, -1000.0, -1000.0]], dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = softmax_forward(x, axis=-1)
        dx = softmax_backward(np.ones_like(x), cache)
    assert y.dtype == dtype and np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y[1], 1 / 3, rtol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(y[0], naive_softmax(x, -1)[0], rtol=1e-6)


# ---------------------------------------------------------------------------
# PyTorch parity


@pytest.mark.parametrize(
    "dtype, rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL)]
)
@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_torch_parity(torch, dtype, rtol: float, axis: int) -> None:
    rng = np.random.default_rng(5)
    x = (4 * rng.standard_normal((3, 5, 6, 7))).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    y, cache = softmax_forward(x, axis=axis)
    dx = softmax_backward(dout, cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.softmax(xt, dim=axis)
    yt.backward(torch.tensor(dout))
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, yt.detach().numpy()) <= rtol
    assert rel_err(dx, xt.grad.numpy()) <= rtol


# ---------------------------------------------------------------------------
# bad input


X = np.zeros((2, 3, 4))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: softmax_forward(X, axis=3), ValueError, ["axis", "[-3, 2]", "3"]),
        (lambda: softmax_forward(X, axis=-4), ValueError, ["axis", "[-3, 2]", "-4"]),
        (lambda: softmax_forward(X, axis=1.0), TypeError, ["axis", "int", "1.0"]),
        (lambda: softmax_forward(X, axis=True), TypeError, ["axis", "int", "True"]),
        (lambda: softmax_forward(X, axis=None), TypeError, ["axis", "int", "None"]),
        (lambda: softmax_forward(np.zeros(()), axis=0), ValueError, ["x", "one axis"]),
        (lambda: softmax_forward(np.array([0.0, np.inf])), ValueError, ["x", "finite"]),
        (lambda: softmax_forward(X.astype(np.int32)), TypeError, ["x", "int32"]),
        (
            lambda: softmax_backward(np.zeros((2, 3)), softmax_forward(X)[1]),
            ValueError,
            ["dout", "(2, 3, 4)", "(2, 3)"],
        ),
        (
            lambda: softmax_backward(X.astype(np.float32), softmax_forward(X)[1]),
            TypeError,
            ["dout=float32", "float64"],
        ),
    ],
)
def test_bad_input(call, exc, words: list[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_axis_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        softmax_forward(X, 1)  # type: ignore[misc]
