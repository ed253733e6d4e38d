"""conv2d's shifted-view route (stride 1, groups 1, >= SHIFTED_MIN_CHANNELS
channels): when it is taken, agreement with the im2col route and with an
explicit loop, float64 gradient checks, PyTorch parity, the array API
backends, and that the comparison fails on a wrong result."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops import conv
from refattn.ops.conv import (
    Conv2dCache,
    Conv2dShiftedCache,
    conv2d_backward,
    conv2d_forward,
)

WIDE = conv.SHIFTED_MIN_CHANNELS
RTOL = {"float32": 2e-5, "float64": 1e-13}  # relative to the largest magnitude


def inputs(seed: int, x_shape: tuple[int, ...], w_shape: tuple[int, ...],
           bias: bool, dtype: str = "float64") -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    return {
        "x": rng.standard_normal(x_shape).astype(dtype),
        "weight": (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(dtype),
        "bias": rng.standard_normal(w_shape[0]).astype(dtype) if bias else None,
    }


def im2col(f: Any, *args: Any, **kwargs: Any) -> Any:
    """f with the shifted route switched off (every conv through im2col)."""
    saved = conv.SHIFTED_MIN_CHANNELS
    conv.SHIFTED_MIN_CHANNELS = 10**9
    try:
        return f(*args, **kwargs)
    finally:
        conv.SHIFTED_MIN_CHANNELS = saved


def assert_close(actual: Any, expected: Any, dtype: str) -> None:
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * scale)


def both_routes(case: dict[str, Any], padding: Any, dtype: str,
                seed: int = 5) -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
    out, cache = conv2d_forward(case["x"], case["weight"], case["bias"],
                                padding=padding)
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    grads = conv2d_backward(dout, cache)

    def reference() -> tuple[Any, ...]:
        o, c = conv2d_forward(case["x"], case["weight"], case["bias"],
                              padding=padding)
        assert type(c) is Conv2dCache
        return (o, *conv2d_backward(dout, c))

    return (out, *grads), im2col(reference), cache


# ---------------------------------------------------------------------------
# which route


@pytest.mark.parametrize("options, shifted", [
    ({"padding": 1}, True),
    ({"padding": 1, "stride": 2}, False),
    ({"padding": 2, "dilation": 2}, False),
    ({"padding": 1, "groups": 2}, False),
])
def test_the_route_taken(options: dict[str, Any], shifted: bool) -> None:
    case = inputs(0, (2, WIDE, 9, 8),
                  (WIDE, WIDE // options.get("groups", 1), 3, 3), True)
    _, cache = conv2d_forward(case["x"], case["weight"], case["bias"], **options)
    assert (type(cache) is Conv2dShiftedCache) == shifted


def test_narrow_and_pointwise_convs_keep_im2col() -> None:
    narrow = inputs(0, (2, WIDE - 1, 9, 8), (WIDE, WIDE - 1, 3, 3), False)
    _, cache = conv2d_forward(narrow["x"], narrow["weight"], padding=1)
    assert type(cache) is Conv2dCache
    pointwise = inputs(0, (2, WIDE, 9, 8), (WIDE, WIDE, 1, 1), False)
    _, cache = conv2d_forward(pointwise["x"], pointwise["weight"])
    assert type(cache) is Conv2dCache


# ---------------------------------------------------------------------------
# the same numbers as im2col


CASES = [  # (x shape, weight shape, padding, bias)
    ((2, 16, 9, 8), (24, 16, 3, 3), 1, True),
    ((1, 20, 7, 11), (16, 20, 3, 5), (1, 2), False),
    ((3, 16, 6, 6), (16, 16, 3, 3), 0, True),
    ((2, 16, 5, 9), (18, 16, 2, 4), (2, 0), True),
    ((2, 17, 12, 10), (16, 17, 7, 7), 3, False),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[str(c[1]) for c in CASES])
def test_matches_im2col(case: Any, dtype: str) -> None:
    x_shape, w_shape, padding, bias = case
    c = inputs(1, x_shape, w_shape, bias, dtype)
    got, want, cache = both_routes(c, padding, dtype)
    assert type(cache) is Conv2dShiftedCache
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if e is not None:
            assert a.shape == e.shape and a.dtype == e.dtype
            assert a.flags.c_contiguous
            assert_close(a, e, dtype)


@pytest.mark.parametrize("wrong", ["scaled", "transposed taps", "zeroed"])
def test_the_comparison_rejects_a_wrong_weight_gradient(wrong: str) -> None:
    c = inputs(1, (2, 16, 9, 8), (24, 16, 3, 3), True)
    got, want, _ = both_routes(c, 1, "float64")
    dw = got[2]
    bad = {"scaled": dw * (1 + 1e-9), "transposed taps": dw.transpose(0, 1, 3, 2),
           "zeroed": np.zeros_like(dw)}[wrong]
    with pytest.raises(AssertionError):
        assert_close(bad, want[2], "float64")


def test_matches_an_explicit_loop() -> None:
    c = inputs(3, (2, 16, 6, 5), (16, 16, 3, 2), True)
    out, cache = conv2d_forward(c["x"], c["weight"], c["bias"], padding=(1, 1))
    assert type(cache) is Conv2dShiftedCache
    xpad = np.pad(c["x"], ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros(out.shape)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = xpad[:, :, i : i + 3, j : j + 2]  # (N, C, 3, 2)
            ref[:, :, i, j] = np.einsum("ncuv,ocuv->no", patch, c["weight"])
    ref += c["bias"][None, :, None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(WIDE, WIDE + 4),
       cout=st.integers(WIDE, WIDE + 4), h=st.integers(3, 9), w=st.integers(3, 9),
       kh=st.integers(1, 3), kw=st.integers(2, 3), ph=st.integers(0, 2),
       pw=st.integers(0, 2), bias=st.booleans())
def test_matches_im2col_property(n: int, cin: int, cout: int, h: int, w: int,
                                 kh: int, kw: int, ph: int, pw: int,
                                 bias: bool) -> None:
    c = inputs(n * h + w, (n, cin, h, w), (cout, cin, kh, kw), bias)
    got, want, _ = both_routes(c, (ph, pw), "float64")
    for a, e in zip(got, want):
        if e is not None:
            assert_close(a, e, "float64")


# ---------------------------------------------------------------------------
# gradients, PyTorch, backends


@pytest.mark.parametrize("padding", [1, (0, 2)])
def test_gradcheck_full(padding: Any) -> None:
    c = inputs(2, (2, 16, 5, 4), (16, 16, 3, 3), True)
    r = gradcheck_op(conv2d_forward, conv2d_backward, c,
                     options={"padding": padding}, mode="full")
    assert r.ok, r.to_text()


def test_gradcheck_catches_a_wrong_shifted_backward() -> None:
    def wrong(dout: Any, cache: Any) -> Any:
        dx, dw, db = conv2d_backward(dout, cache)
        return dx, dw.transpose(0, 1, 3, 2), db  # taps in the wrong order

    c = inputs(2, (2, 16, 5, 4), (16, 16, 3, 3), True)
    r = gradcheck_op(conv2d_forward, wrong, c, options={"padding": 1})
    assert not r.ok


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_parity(torch: Any, dtype: str) -> None:
    c = inputs(4, (2, 16, 10, 9), (24, 16, 3, 3), True, dtype)
    out, cache = conv2d_forward(c["x"], c["weight"], c["bias"], padding=1)
    dout = np.random.default_rng(9).standard_normal(out.shape).astype(dtype)
    grads = conv2d_backward(dout, cache)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in c.items()}
    tout = torch.nn.functional.conv2d(t["x"], t["weight"], t["bias"], padding=1)
    tout.backward(torch.tensor(dout))
    assert_close(out, tout.detach().numpy(), dtype)
    for g, k in zip(grads, ("x", "weight", "bias")):
        assert_close(g, t[k].grad.numpy(), dtype)


def test_on_backend(xb: Any) -> None:
    host = inputs(6, (2, 16, 6, 7), (16, 16, 3, 3), True)
    args = {k: xb.asarray(v) for k, v in host.items()}
    out, cache = conv2d_forward(args["x"], args["weight"], args["bias"], padding=1)
    assert type(cache) is Conv2dShiftedCache
    assert backend.device(out) == xb.device
    ref, _ = im2col(conv2d_forward, host["x"], host["weight"], host["bias"],
                    padding=1)
    assert_close(xb.to_host(out), ref, "float64")
    dout = np.ones(ref.shape)
    grads = conv2d_backward(xb.asarray(dout), cache)
    _, c0 = im2col(conv2d_forward, host["x"], host["weight"], host["bias"],
                   padding=1)
    for g, e in zip(grads, conv2d_backward(dout, c0)):
        assert backend.device(g) == xb.device
        assert_close(xb.to_host(g), e, "float64")
