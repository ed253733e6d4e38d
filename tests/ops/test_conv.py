"""conv2d and pointwise_conv: gradient checks, adjoint and linearity
properties, a loop reference, PyTorch parity and input validation."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.conv import (
    _pointwise_conv_backward,
    conv2d_backward,
    conv2d_forward,
    pointwise_conv_backward,
    pointwise_conv_forward,
)

F64_RTOL = 1e-12
F32_RTOL = 1e-5


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def conv_inputs(
    seed: int,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    bias: bool,
    dtype: Any = np.float64,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal(x_shape).astype(dtype),
        "weight": rng.standard_normal(w_shape).astype(dtype),
        "bias": rng.standard_normal(w_shape[0]).astype(dtype) if bias else None,
    }


def naive_conv2d(x, weight, bias, stride, padding, dilation, groups) -> np.ndarray:
    """Independent reference: explicit loops over every output element."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n_, c_, h_, w_ = x.shape
    o_, cg, kh, kw = weight.shape
    og = o_ // groups
    xp = np.zeros((n_, c_, h_ + 2 * ph, w_ + 2 * pw))
    xp[:, :, ph : ph + h_, pw : pw + w_] = x
    ho = (h_ + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n_, o_, ho, wo))
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for i in range(ho):
                for j in range(wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for c in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                acc += (
                                    weight[o, c, u, v]
                                    * xp[
                                        n, g * cg + c, i * sh + u * dh, j * sw + v * dw
                                    ]
                                )
                    out[n, o, i, j] = acc
    return out


# ---------------------------------------------------------------------------
# gradient checks: every option that changes the math

# (id, kernel, stride, padding, dilation, groups, bias); x is (2, 4, 7, 6), O = 8
CONV_CASES = [
    ("k3", (3, 3), 1, 0, 1, 1, True),
    ("k3_s2_p1", (3, 3), 2, 1, 1, 1, True),
    ("k3_p2_d2_nobias", (3, 3), 1, 2, 2, 1, False),
    ("k5_s2_p2", (5, 5), 2, 2, 1, 1, True),
    ("k2x3_s21_p12_d12", (2, 3), (2, 1), (1, 2), (1, 2), 1, True),
    ("k3x1_s12_p10", (3, 1), (1, 2), (1, 0), 1, 1, False),
    ("k3_g2", (3, 3), 1, 1, 1, 2, True),
    ("k3_depthwise_s2", (3, 3), 2, 1, 1, 4, False),
    ("k3_s2_d2_g2", (3, 3), 2, 2, 2, 2, True),
    ("k1", (1, 1), 1, 0, 1, 1, True),
    ("k1_nobias", (1, 1), 1, 0, 1, 1, False),
    ("k1_s2", (1, 1), 2, 0, 1, 1, True),
    ("k1_p1", (1, 1), 1, 1, 1, 1, True),
    ("k1_s2_p1_g2", (1, 1), 2, 1, 1, 2, True),
    ("k1_s13_p20_depthwise", (1, 1), (1, 3), (2, 0), 2, 4, False),
]


def _options(stride, padding, dilation, groups) -> dict[str, Any]:
    return {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_gradcheck_full(case) -> None:
    _, kernel, stride, padding, dilation, groups, bias = case
    inputs = conv_inputs(1, (2, 4, 7, 6), (8, 4 // groups) + kernel, bias)
    r = gradcheck_op(
        conv2d_forward,
        conv2d_backward,
        inputs,
        options=_options(stride, padding, dilation, groups),
        mode="full",
    )
    assert r.ok, r.to_text()


FAST_CASES = [
    ("k3_p1", (3, 3), 1, 1, 1, 1),
    ("k5_s2_p2_d2", (5, 5), 2, 2, 2, 1),
    ("k3_g4_s2", (3, 3), 2, 1, 1, 4),
    ("k7_p3", (7, 7), 1, 3, 1, 1),
    ("k1", (1, 1), 1, 0, 1, 1),
    ("k1_s2_p1_g2", (1, 1), 2, 1, 1, 2),
]


@pytest.mark.parametrize("case", FAST_CASES, ids=[c[0] for c in FAST_CASES])
def test_conv2d_gradcheck_fast_moderate(case) -> None:
    _, kernel, stride, padding, dilation, groups = case
    inputs = conv_inputs(2, (3, 16, 17, 15), (24, 16 // groups) + kernel, True)
    r = gradcheck_op(
        conv2d_forward,
        conv2d_backward,
        inputs,
        options=_options(stride, padding, dilation, groups),
        mode="fast",
    )
    assert r.ok, r.to_text()


def test_conv2d_gradcheck_catches_a_wrong_backward() -> None:
    """A backward with a wrong bias gradient must fail the check."""

    def wrong(dout, cache):
        dx, dweight, dbias = conv2d_backward(dout, cache)
        return dx, dweight, 2 * dbias

    inputs = conv_inputs(3, (2, 4, 6, 6), (4, 4, 3, 3), True)
    r = gradcheck_op(conv2d_forward, wrong, inputs, options={"padding": 1})
    assert not r.ok


XB_CASES = [CONV_CASES[1], CONV_CASES[4], CONV_CASES[7], CONV_CASES[13]]


@pytest.mark.parametrize("case", XB_CASES, ids=[c[0] for c in XB_CASES])
def test_conv2d_on_backend(xb, case) -> None:
    _, kernel, stride, padding, dilation, groups, bias = case
    host = conv_inputs(4, (2, 4, 7, 6), (8, 4 // groups) + kernel, bias)
    inputs = {k: None if v is None else xb.asarray(v) for k, v in host.items()}
    opts = _options(stride, padding, dilation, groups)
    out, cache = conv2d_forward(*inputs.values(), **opts)
    ref, _ = conv2d_forward(*host.values(), **opts)
    assert backend.device(out) == xb.device
    assert rel_err(xb.to_host(out), ref) <= F64_RTOL
    grads = conv2d_backward(xb.asarray(np.ones(ref.shape)), cache)
    for g in grads:
        assert g is None or backend.device(g) == xb.device
    r = gradcheck_op(conv2d_forward, conv2d_backward, inputs, options=opts, mode="full")
    assert r.ok, r.to_text()


# (id, spatial shape S, groups, weight with trailing ones, bias); x is (2, 4, *S)
POINTWISE_CASES = [
    ("rank0", (), 1, False, True),
    ("rank0_g2", (), 2, False, False),
    ("rank1", (5,), 1, True, True),
    ("rank1_g4", (5,), 4, False, True),
    ("rank2", (3, 4), 1, True, False),
    ("rank2_g2", (3, 4), 2, True, True),
    ("rank3", (2, 3, 2), 1, False, True),
    ("rank3_g2", (2, 3, 2), 2, True, True),
]


def pointwise_inputs(
    seed, spatial, groups, ones, bias, dtype=np.float64, n=2, c=4, o=6
):
    w_shape = (o, c // groups) + ((1,) * len(spatial) if ones else ())
    return conv_inputs(seed, (n, c) + tuple(spatial), w_shape, bias, dtype)


@pytest.mark.parametrize("case", POINTWISE_CASES, ids=[c[0] for c in POINTWISE_CASES])
def test_pointwise_gradcheck_full(case) -> None:
    _, spatial, groups, ones, bias = case
    inputs = pointwise_inputs(5, spatial, groups, ones, bias, o=8)
    r = gradcheck_op(
        pointwise_conv_forward,
        pointwise_conv_backward,
        inputs,
        options={"groups": groups},
        mode="full",
    )
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "spatial, groups", [((196,), 1), ((14, 14), 4), ((4, 7, 7), 2)]
)
def test_pointwise_gradcheck_fast_moderate(spatial, groups) -> None:
    inputs = pointwise_inputs(6, spatial, groups, True, True, n=3, c=32, o=16)
    r = gradcheck_op(
        pointwise_conv_forward,
        pointwise_conv_backward,
        inputs,
        options={"groups": groups},
        mode="fast",
    )
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "case", [POINTWISE_CASES[1], POINTWISE_CASES[7]], ids=["rank0_g2", "rank3_g2"]
)
def test_pointwise_on_backend(xb, case) -> None:
    _, spatial, groups, ones, bias = case
    host = pointwise_inputs(7, spatial, groups, ones, bias)
    inputs = {k: None if v is None else xb.asarray(v) for k, v in host.items()}
    out, cache = pointwise_conv_forward(*inputs.values(), groups=groups)
    ref, _ = pointwise_conv_forward(*host.values(), groups=groups)
    assert backend.device(out) == xb.device
    assert rel_err(xb.to_host(out), ref) <= F64_RTOL
    for g in pointwise_conv_backward(xb.asarray(np.ones(ref.shape)), cache):
        assert g is None or backend.device(g) == xb.device
    r = gradcheck_op(
        pointwise_conv_forward,
        pointwise_conv_backward,
        inputs,
        options={"groups": groups},
        mode="full",
    )
    assert r.ok, r.to_text()


# ---------------------------------------------------------------------------
# known answers


def test_conv2d_matches_loop_reference() -> None:
    """An awkward configuration: non-square kernel, mixed stride, padding and
    dilation, groups, odd sizes."""
    opts = {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1), "groups": 3}
    inp = conv_inputs(8, (2, 6, 9, 7), (6, 2, 3, 2), True)
    out, _ = conv2d_forward(*inp.values(), **opts)
    ref = naive_conv2d(
        *inp.values(), opts["stride"], opts["padding"], opts["dilation"], opts["groups"]
    )
    assert out.shape == ref.shape == (2, 6, 4, 10)
    assert rel_err(out, ref) <= F64_RTOL


def test_conv2d_1x1_stride_gives_zero_gradient_at_skipped_positions() -> None:
    inp = conv_inputs(9, (2, 4, 7, 6), (5, 4, 1, 1), True)
    out, cache = conv2d_forward(*inp.values(), stride=2)
    dx, _, _ = conv2d_backward(np.ones(out.shape), cache)
    mask = np.zeros(dx.shape, dtype=bool)
    mask[:, :, ::2, ::2] = True
    assert np.all(dx[~mask] == 0.0)
    # with dout = 1, every read position gets Σ_o W[o, c]
    expected = inp["weight"].sum(axis=0)[None, :, 0:1, 0:1]  # (1, C, 1, 1)
    np.testing.assert_allclose(
        dx[:, :, ::2, ::2], np.broadcast_to(expected, (2, 4, 4, 3)), rtol=1e-13
    )


def test_conv2d_1x1_padding_border_equals_bias() -> None:
    inp = conv_inputs(10, (1, 3, 4, 4), (2, 3, 1, 1), True)
    out, _ = conv2d_forward(*inp.values(), padding=2)
    assert out.shape == (1, 2, 8, 8)
    border = np.ones((8, 8), dtype=bool)
    border[2:6, 2:6] = False
    np.testing.assert_array_equal(
        out[0][:, border], np.repeat(inp["bias"][:, None], 48, 1)
    )


def test_pointwise_rank2_equals_conv2d_1x1() -> None:
    inp = conv_inputs(11, (2, 6, 5, 3), (4, 3, 1, 1), True)
    a, ca = pointwise_conv_forward(*inp.values(), groups=2)
    b, cb = conv2d_forward(*inp.values(), groups=2)
    np.testing.assert_array_equal(a, b)
    dout = np.random.default_rng(0).standard_normal(a.shape)
    for ga, gb in zip(pointwise_conv_backward(dout, ca), conv2d_backward(dout, cb)):
        np.testing.assert_array_equal(ga, gb)


# ---------------------------------------------------------------------------
# properties


@st.composite
def conv_case(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 2))
    o = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    hw = tuple(
        max(1, d * (k - 1) + 1 - 2 * p + draw(st.integers(0, 4)))
        for k, p, d in zip(kernel, padding, dilation)
    )
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    bias = draw(st.booleans())
    inputs = conv_inputs(seed, (n, c) + hw, (o, c // groups) + kernel, bias)
    opts = {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }
    return {"inputs": inputs, "options": opts, "seed": seed}


@st.composite
def pointwise_case(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    rank = draw(st.integers(0, 3))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    ones = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    inputs = pointwise_inputs(
        seed,
        spatial,
        groups,
        ones,
        draw(st.booleans()),
        n=draw(st.integers(1, 3)),
        c=c,
        o=o,
    )
    return {"inputs": inputs, "options": {"groups": groups}, "seed": seed}


OPS = {
    "conv2d": (conv2d_forward, conv2d_backward, conv_case),
    "pointwise": (pointwise_conv_forward, pointwise_conv_backward, pointwise_case),
}


def _dot(a: Any, b: Any) -> float:
    return float(
        np.sum(np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64))
    )


def _check_adjoint(fwd, bwd, case, to_host=np.asarray, asarray=np.asarray) -> None:
    """<conv(x, W), g> = <x, dx(g)> = <W, dW(g)>: conv is bilinear in (x, W)
    without bias, so both partial VJPs are adjoints of the same map."""
    inp = dict(case["inputs"], bias=None)
    out, cache = fwd(
        *(None if v is None else asarray(v) for v in inp.values()), **case["options"]
    )
    g = np.random.default_rng(case["seed"] + 1).standard_normal(tuple(out.shape))
    dx, dweight, dbias = bwd(asarray(g), cache)
    assert dbias is None
    lhs = _dot(to_host(out), g)
    scale = _dot(np.abs(to_host(out)), np.abs(g)) + 1e-300
    assert abs(lhs - _dot(inp["x"], to_host(dx))) <= 1e-12 * scale
    assert abs(lhs - _dot(inp["weight"], to_host(dweight))) <= 1e-12 * scale


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conv_case())
def test_conv2d_adjoint_identity(xb, case) -> None:
    _check_adjoint(conv2d_forward, conv2d_backward, case, xb.to_host, xb.asarray)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pointwise_case())
def test_pointwise_adjoint_identity(xb, case) -> None:
    _check_adjoint(
        pointwise_conv_forward, pointwise_conv_backward, case, xb.to_host, xb.asarray
    )


@pytest.mark.parametrize("op", OPS)
@given(data=st.data(), alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_backward_linear_in_dout_shapes_and_no_mutation(op, data, alpha, beta) -> None:
    fwd, bwd, strategy = OPS[op]
    case = data.draw(strategy())
    inp = case["inputs"]
    saved = {k: None if v is None else v.copy() for k, v in inp.items()}
    out, cache = fwd(*inp.values(), **case["options"])
    cache_saved = [
        np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in cache
    ]
    rng = np.random.default_rng(case["seed"] + 2)
    d1, d2 = rng.standard_normal(out.shape), rng.standard_normal(out.shape)
    d1_saved = d1.copy()
    g = bwd(alpha * d1 + beta * d2, cache)
    g1, g2 = bwd(d1, cache), bwd(d2, cache)
    for name, gi, a, b in zip(inp, g, g1, g2):
        if inp[name] is None:
            assert gi is None and a is None and b is None
            continue
        assert gi.shape == inp[name].shape, name
        np.testing.assert_allclose(
            gi, alpha * a + beta * b, rtol=1e-12, atol=1e-12, err_msg=name
        )
    for k, v in inp.items():
        if v is not None:
            np.testing.assert_array_equal(v, saved[k], err_msg=k)
    np.testing.assert_array_equal(d1, d1_saved)
    for a, a0 in zip(cache, cache_saved):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, a0)
        else:
            assert a == a0


@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_float32_stays_float32(op, data) -> None:
    fwd, bwd, strategy = OPS[op]
    case = data.draw(strategy())
    inp = {
        k: None if v is None else v.astype(np.float32)
        for k, v in case["inputs"].items()
    }
    out, cache = fwd(*inp.values(), **case["options"])
    assert out.dtype == np.float32
    for name, g in zip(inp, bwd(np.ones(out.shape, np.float32), cache)):
        assert (g is None) == (inp[name] is None)
        assert g is None or g.dtype == np.float32, name


# ---------------------------------------------------------------------------
# PyTorch parity: every option combination


@pytest.mark.parametrize(
    "dtype, rtol",
    [(np.float64, F64_RTOL), (np.float32, F32_RTOL)],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 2, 4], ids=["g1", "g2", "g4"])
@pytest.mark.parametrize(
    "kernel", [(1, 1), (3, 3), (5, 5), (2, 3)], ids=["k1", "k3", "k5", "k2x3"]
)
def test_conv2d_torch_parity(torch, kernel, groups, bias, dtype, rtol) -> None:
    """Stride 1/2 x padding 0/1/2 x dilation 1/2 for each kernel/groups/bias;
    groups = 4 = C is the depthwise case."""
    F = torch.nn.functional
    failures = []
    for stride, padding, dilation in itertools.product([1, 2], [0, 1, 2], [1, 2]):
        inp = conv_inputs(12, (2, 4, 11, 10), (8, 4 // groups) + kernel, bias, dtype)
        opts = _options(stride, padding, dilation, groups)
        out, cache = conv2d_forward(*inp.values(), **opts)
        dout = np.random.default_rng(13).standard_normal(out.shape).astype(dtype)
        grads = conv2d_backward(dout, cache)
        tin = {
            k: None if v is None else torch.tensor(v, requires_grad=True)
            for k, v in inp.items()
        }
        tout = F.conv2d(*tin.values(), **opts)
        tout.backward(torch.tensor(dout))
        errs = {"out": rel_err(out, tout.detach().numpy())}
        for (name, t), g in zip(tin.items(), grads):
            if t is None:
                assert g is None
            else:
                assert g.dtype == dtype
                errs[name] = rel_err(g, t.grad.numpy())
        if max(errs.values()) > rtol:
            failures.append((opts, errs))
    assert not failures, failures


@pytest.mark.parametrize(
    "dtype, rtol",
    [(np.float64, F64_RTOL), (np.float32, F32_RTOL)],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_pointwise_torch_parity(torch, rank, dtype, rtol) -> None:
    """Against conv1d/conv2d/conv3d with a 1x1 kernel (rank 0: conv1d on a
    length-1 axis), for groups 1/2/4, bias on/off and both weight layouts."""
    F = torch.nn.functional
    spatial = [(), (9,), (5, 6), (3, 4, 5)][rank]
    failures = []
    for groups, bias, ones in itertools.product(
        [1, 2, 4], [True, False], [True, False]
    ):
        inp = pointwise_inputs(14, spatial, groups, ones, bias, dtype, n=3, c=8, o=12)
        out, cache = pointwise_conv_forward(*inp.values(), groups=groups)
        dout = np.random.default_rng(15).standard_normal(out.shape).astype(dtype)
        grads = pointwise_conv_backward(dout, cache)
        tin = {
            k: None if v is None else torch.tensor(v, requires_grad=True)
            for k, v in inp.items()
        }
        k = max(rank, 1)
        tx = tin["x"].reshape(tin["x"].shape + (1,) * (k - rank))
        tw = tin["weight"].reshape(tin["weight"].shape[:2] + (1,) * k)
        conv = [F.conv1d, F.conv2d, F.conv3d][k - 1]
        tout = conv(tx, tw, tin["bias"], groups=groups).reshape(out.shape)
        tout.backward(torch.tensor(dout))
        errs = {"out": rel_err(out, tout.detach().numpy())}
        for (name, t), g in zip(tin.items(), grads):
            if t is None:
                assert g is None
            else:
                assert g.dtype == dtype and g.shape == t.shape
                errs[name] = rel_err(g, t.grad.numpy())
        if max(errs.values()) > rtol:
            failures.append(((groups, bias, ones), errs))
    assert not failures, failures


# ---------------------------------------------------------------------------
# input validation


def _good() -> dict[str, Any]:
    return conv_inputs(16, (2, 4, 6, 6), (6, 2, 3, 3), True)


def _strict(a: np.ndarray) -> Any:
    import array_api_strict as xs

    return xs.asarray(a)


BAD_CONV = [
    ("x_rank", {"x": np.zeros((4, 6, 6))}, {}, ValueError, r"^x: expected a 4-D array"),
    (
        "weight_rank",
        {"weight": np.zeros((6, 2, 3))},
        {},
        ValueError,
        r"^weight: expected a 4-D",
    ),
    (
        "bias_shape",
        {"bias": np.zeros(5)},
        {},
        ValueError,
        r"^bias: expected shape \(O,\)",
    ),
    (
        "channels",
        {"weight": np.zeros((6, 3, 3, 3))},
        {},
        ValueError,
        r"^weight: expected shape .*C/groups = 4/2 = 2.*got shape \(6, 3, 3, 3\)",
    ),
    (
        "groups_c",
        {"weight": np.zeros((6, 1, 3, 3))},
        {"groups": 3},
        ValueError,
        (
            r"^groups: expected a divisor of the input channels C = x.shape\[1\] = 4, "
            r"got groups=3"
        ),
    ),
    (
        "groups_o",
        {"weight": np.zeros((6, 1, 3, 3))},
        {"groups": 4},
        ValueError,
        r"^groups: expected a divisor of the output channels O = weight.shape\[0\] = 6",
    ),
    (
        "groups_zero",
        {},
        {"groups": 0},
        ValueError,
        r"^groups: expected a positive int, got 0",
    ),
    (
        "groups_float",
        {},
        {"groups": 2.0},
        TypeError,
        r"^groups: expected a positive int",
    ),
    ("stride_zero", {}, {"stride": 0}, ValueError, r"^stride: expected values >= 1"),
    (
        "stride_len",
        {},
        {"stride": (1, 2, 3)},
        ValueError,
        r"^stride: expected an int or 2",
    ),
    (
        "dilation_zero",
        {},
        {"dilation": (1, 0)},
        ValueError,
        r"^dilation: expected values >= 1",
    ),
    (
        "padding_negative",
        {},
        {"padding": -1},
        ValueError,
        r"^padding: expected values >= 0",
    ),
    (
        "no_output",
        {},
        {"dilation": 3},
        ValueError,
        (
            r"^x: padded input size H \+ 2\*padding = 6 \+ 2\*0 = 6 "
            r"is smaller than the "
            r"dilated kernel extent"
        ),
    ),
    (
        "int_dtype",
        {"x": np.zeros((2, 4, 6, 6), dtype=np.int64)},
        {},
        TypeError,
        r"^x: expected dtype float32 or float64, got int64",
    ),
    (
        "mixed_dtype",
        {"x": np.zeros((2, 4, 6, 6), dtype=np.float32)},
        {},
        TypeError,
        r"x=float32, weight=float64",
    ),
    (
        "nan_x",
        {"x": np.full((2, 4, 6, 6), np.nan)},
        {},
        ValueError,
        r"^x: expected finite values, got 288 NaN/Inf",
    ),
    (
        "inf_weight",
        {"weight": np.full((6, 2, 3, 3), np.inf)},
        {},
        ValueError,
        r"^weight: expected finite values",
    ),
    (
        "inf_bias",
        {"bias": np.full(6, -np.inf)},
        {},
        ValueError,
        r"^bias: expected finite",
    ),
    ("list_x", {"x": [[[[1.0]]]]}, {}, TypeError, r"^x: expected an array"),
    (
        "mixed_namespace",
        {"weight": "strict"},
        {},
        TypeError,
        (
            r"arrays from different libraries were mixed "
            r"\(x: numpy, weight: array_api_strict"
        ),
    ),
]


@pytest.mark.parametrize(
    "override, opts, exc, match",
    [c[1:] for c in BAD_CONV],
    ids=[c[0] for c in BAD_CONV],
)
def test_conv2d_rejects_bad_input(override, opts, exc, match) -> None:
    args = dict(_good(), **override)
    if isinstance(args["weight"], str):
        args["weight"] = _strict(_good()["weight"])
    with pytest.raises(exc, match=match):
        conv2d_forward(*args.values(), **{"groups": 2, **opts})


BAD_POINTWISE = [
    ("x_rank1", {"x": np.zeros(4)}, ValueError, r"^x: expected a 2-D to 5-D array"),
    (
        "x_rank6",
        {"x": np.zeros((2, 4, 1, 1, 1, 1))},
        ValueError,
        r"^x: expected a 2-D to 5-D",
    ),
    (
        "weight_kernel",
        {"weight": np.zeros((6, 2, 3, 1))},
        ValueError,
        (
            r"^weight: expected shape \(O, C/groups\) or \(O, C/groups, 1, 1\) "
            r"for a 4-D x, "
            r"got shape \(6, 2, 3, 1\)"
        ),
    ),
    (
        "weight_ones_count",
        {"weight": np.zeros((6, 2, 1))},
        ValueError,
        r"^weight: expected shape",
    ),
    (
        "channels",
        {"weight": np.zeros((6, 4))},
        ValueError,
        r"^weight: expected shape .*C/groups = 4/2 = 2",
    ),
    ("bias_shape", {"bias": np.zeros((6, 1))}, ValueError, r"^bias: expected shape"),
    ("nan_x", {"x": np.full((2, 4, 3, 3), np.nan)}, ValueError, r"^x: expected finite"),
    ("mixed_dtype", {"bias": np.zeros(6, np.float32)}, TypeError, r"bias=float32"),
]


@pytest.mark.parametrize(
    "override, exc, match",
    [c[1:] for c in BAD_POINTWISE],
    ids=[c[0] for c in BAD_POINTWISE],
)
def test_pointwise_rejects_bad_input(override, exc, match) -> None:
    args = dict(conv_inputs(17, (2, 4, 3, 3), (6, 2, 1, 1), True), **override)
    with pytest.raises(exc, match=match):
        pointwise_conv_forward(*args.values(), groups=2)


@pytest.mark.parametrize("op", OPS)
def test_backward_rejects_bad_dout(op) -> None:
    fwd, bwd, _ = OPS[op]
    inp = conv_inputs(18, (2, 4, 5, 5), (6, 4, 1, 1), True)
    out, cache = fwd(*inp.values())
    with pytest.raises(ValueError, match=r"^dout: expected the forward's output shape"):
        bwd(np.zeros((2, 6, 5, 4)), cache)
    with pytest.raises(TypeError, match=r"dout=float32, weight=float64"):
        bwd(np.zeros(out.shape, np.float32), cache)


@pytest.mark.parametrize("groups", [1, 2])
def test_pointwise_backward_without_dx_gives_the_same_weight_grads(groups) -> None:
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 4, 5, 3))
    w = rng.standard_normal((6, 4 // groups, 1, 1))
    b = rng.standard_normal(6)
    out, cache = pointwise_conv_forward(x, w, b, groups=groups)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = _pointwise_conv_backward(dout, cache)
    none, dw_only, db_only = _pointwise_conv_backward(dout, cache, need_dx=False)
    assert none is None and dx is not None
    np.testing.assert_array_equal(dw_only, dw)
    np.testing.assert_array_equal(db_only, db)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_shape,b_shape", [((8, 24, 50), (8, 16, 50)),  # groups == 1
                                             ((3, 2, 12, 40), (3, 2, 8, 40)),  # 2 groups
                                             ((1, 5, 7), (1, 3, 7))])
def test_weight_gradient_sum_is_the_batched_sums_bits(dtype, a_shape, b_shape) -> None:
    """dW's per-sample products added in order are the bits of the batched
    product summed over the batch (and a reordered sum is not)."""
    from refattn.ops.conv import _sum_of_products

    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    products = np.matmul(a, np.swapaxes(b, -1, -2))
    got = _sum_of_products(np, a, b)
    np.testing.assert_array_equal(got, np.sum(products, axis=0))
    if a_shape[0] > 2:  # the same terms added in another order move some bits
        assert not np.array_equal(got, np.sum(products[::-1], axis=0))
