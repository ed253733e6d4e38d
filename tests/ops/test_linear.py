"""linear and batched matmul: gradient checks, adjoint and linearity
properties, PyTorch parity and input validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.linear import (
    _add_outer_products,
    _add_product_into,
    _matmul_backward,
    _product_into,
    linear_backward,
    linear_forward,
    matmul_backward,
    matmul_forward,
)

F64_RTOL = 1e-12
F32_RTOL = 1e-5


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def linear_inputs(seed, lead, n_in, n_out, bias, dtype=np.float64) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal(tuple(lead) + (n_in,)).astype(dtype),
        "weight": rng.standard_normal((n_out, n_in)).astype(dtype),
        "bias": rng.standard_normal(n_out).astype(dtype) if bias else None,
    }


def matmul_inputs(seed, a_shape, b_shape, dtype=np.float64) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal(a_shape).astype(dtype),
        "b": rng.standard_normal(b_shape).astype(dtype),
    }


# ---------------------------------------------------------------------------
# gradient checks

LINEAR_CASES = [
    ((), True),
    ((3,), True),
    ((3,), False),
    ((2, 3), True),
    ((2, 1, 3), False),
]
MATMUL_CASES = [
    ((3, 4), (4, 2)),  # plain
    ((2, 3, 4), (2, 4, 5)),  # same batch
    ((2, 3, 4), (4, 5)),  # b shared by the batch
    ((3, 4), (2, 4, 5)),  # a shared by the batch
    ((2, 1, 3, 4), (5, 4, 2)),  # broadcast both ways, different ranks
    ((1, 3, 4), (2, 4, 2)),  # a size-1 batch axis
    ((2, 2, 3, 4), (1, 4, 2)),  # size-1 axis and rank difference on b
]


def _id(shapes) -> str:
    return "@".join("x".join(map(str, s)) for s in shapes)


@pytest.mark.parametrize("lead, bias", LINEAR_CASES)
def test_linear_gradcheck_full(lead, bias) -> None:
    inputs = linear_inputs(1, lead, 4, 5, bias)
    r = gradcheck_op(linear_forward, linear_backward, inputs, mode="full")
    assert r.ok, r.to_text()


def test_linear_gradcheck_fast_moderate() -> None:
    """Attention-sized: (N, L, C) tokens through a (C/2, C) projection."""
    inputs = linear_inputs(2, (4, 196), 64, 32, True)
    r = gradcheck_op(linear_forward, linear_backward, inputs, mode="fast")
    assert r.ok, r.to_text()


@pytest.mark.parametrize("shapes", MATMUL_CASES, ids=[_id(c) for c in MATMUL_CASES])
def test_matmul_gradcheck_full(shapes) -> None:
    inputs = matmul_inputs(3, *shapes)
    r = gradcheck_op(matmul_forward, matmul_backward, inputs, mode="full")
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "shapes",
    [
        ((4, 196, 64), (4, 64, 196)),
        ((4, 196, 64), (64, 32)),
        ((8, 1, 49, 16), (8, 16, 49)),
    ],
)
def test_matmul_gradcheck_fast_moderate(shapes) -> None:
    inputs = matmul_inputs(4, *shapes)
    r = gradcheck_op(matmul_forward, matmul_backward, inputs, mode="fast")
    assert r.ok, r.to_text()


def test_gradcheck_catches_a_wrong_backward() -> None:
    """Forgetting to sum a broadcast batch axis back down must fail."""

    def wrong(dout, cache):
        da, db = matmul_backward(dout, cache)
        return da, db / 2  # as if only one of the two batch entries counted

    inputs = matmul_inputs(5, (2, 3, 4), (4, 5))
    r = gradcheck_op(matmul_forward, wrong, inputs, mode="fast")
    assert not r.ok


def test_linear_on_backend(xb) -> None:
    host = linear_inputs(6, (2, 3), 4, 5, True)
    inputs = {k: xb.asarray(v) for k, v in host.items()}
    out, cache = linear_forward(*inputs.values())
    assert backend.device(out) == xb.device
    assert rel_err(xb.to_host(out), linear_forward(*host.values())[0]) <= F64_RTOL
    for g in linear_backward(xb.asarray(np.ones((2, 3, 5))), cache):
        assert backend.device(g) == xb.device
    r = gradcheck_op(linear_forward, linear_backward, inputs, mode="full")
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "shapes",
    [MATMUL_CASES[2], MATMUL_CASES[4]],
    ids=[_id(MATMUL_CASES[2]), _id(MATMUL_CASES[4])],
)
def test_matmul_on_backend(xb, shapes) -> None:
    host = matmul_inputs(7, *shapes)
    inputs = {k: xb.asarray(v) for k, v in host.items()}
    out, cache = matmul_forward(*inputs.values())
    assert backend.device(out) == xb.device
    np.testing.assert_allclose(xb.to_host(out), host["a"] @ host["b"], rtol=1e-13)
    for g in matmul_backward(xb.asarray(np.ones(out.shape)), cache):
        assert backend.device(g) == xb.device
    r = gradcheck_op(matmul_forward, matmul_backward, inputs, mode="full")
    assert r.ok, r.to_text()


# ---------------------------------------------------------------------------
# properties


@st.composite
def linear_case(draw: st.DrawFn) -> dict[str, Any]:
    lead = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    seed = draw(st.integers(0, 2**32 - 1))
    inputs = linear_inputs(
        seed,
        lead,
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
        draw(st.booleans()),
    )
    return {"inputs": inputs, "seed": seed}


@st.composite
def matmul_case(draw: st.DrawFn) -> dict[str, Any]:
    batch = draw(st.lists(st.integers(1, 3), max_size=3))
    # each operand keeps a suffix of the batch axes, some of them squeezed to 1
    a_batch = [
        1 if draw(st.booleans()) else s
        for s in batch[draw(st.integers(0, len(batch))) :]
    ]
    b_batch = [
        1 if draw(st.booleans()) else s
        for s in batch[draw(st.integers(0, len(batch))) :]
    ]
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    seed = draw(st.integers(0, 2**32 - 1))
    inputs = matmul_inputs(seed, tuple(a_batch) + (n, k), tuple(b_batch) + (k, m))
    return {"inputs": inputs, "seed": seed}


OPS = {
    "linear": (linear_forward, linear_backward, linear_case),
    "matmul": (matmul_forward, matmul_backward, matmul_case),
}


def _dot(a: Any, b: Any) -> float:
    return float(
        np.sum(np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64))
    )


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_adjoint_identity(xb, op, data) -> None:
    """<f(u, v), g> = <u, du(g)> = <v, dv(g)>: both ops are bilinear (linear
    without its bias), so each partial VJP is the adjoint of the same map."""
    fwd, bwd, strategy = OPS[op]
    case = data.draw(strategy())
    inp = dict(case["inputs"])
    if "bias" in inp:
        inp["bias"] = None
    out, cache = fwd(*(None if v is None else xb.asarray(v) for v in inp.values()))
    g = np.random.default_rng(case["seed"] + 1).standard_normal(tuple(out.shape))
    grads = bwd(xb.asarray(g), cache)
    lhs = _dot(xb.to_host(out), g)
    scale = _dot(np.abs(xb.to_host(out)), np.abs(g)) + 1e-300
    for (name, v), gv in zip(inp.items(), grads):
        if v is None:
            assert gv is None
        else:
            assert abs(lhs - _dot(v, xb.to_host(gv))) <= 1e-12 * scale, name


@pytest.mark.parametrize("op", OPS)
@given(data=st.data(), alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_backward_linear_in_dout_shapes_and_no_mutation(op, data, alpha, beta) -> None:
    fwd, bwd, strategy = OPS[op]
    case = data.draw(strategy())
    inp = case["inputs"]
    saved = {k: None if v is None else v.copy() for k, v in inp.items()}
    out, cache = fwd(*inp.values())
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
    out, cache = fwd(*inp.values())
    assert out.dtype == np.float32
    for name, g in zip(inp, bwd(np.ones(out.shape, np.float32), cache)):
        assert (g is None) == (inp[name] is None)
        assert g is None or g.dtype == np.float32, name


@given(case=matmul_case())
def test_matmul_matches_numpy_matmul(case) -> None:
    a, b = case["inputs"].values()
    out, _ = matmul_forward(a, b)
    np.testing.assert_array_equal(out, np.matmul(a, b))


# ---------------------------------------------------------------------------
# PyTorch parity


DTYPES = pytest.mark.parametrize(
    "dtype, rtol",
    [(np.float64, F64_RTOL), (np.float32, F32_RTOL)],
    ids=["float64", "float32"],
)


def _torch_grads(torch, fn, inputs: dict[str, Any], dout: np.ndarray):
    tin = {
        k: None if v is None else torch.tensor(v, requires_grad=True)
        for k, v in inputs.items()
    }
    tout = fn(*tin.values())
    tout.backward(torch.tensor(dout))
    return tout.detach().numpy(), [
        None if t is None else t.grad.numpy() for t in tin.values()
    ]


def _assert_parity(out, grads, tout, tgrads, dtype, rtol) -> None:
    assert out.dtype == dtype
    assert rel_err(out, tout) <= rtol
    for g, tg in zip(grads, tgrads):
        assert (g is None) == (tg is None)
        if g is not None:
            assert g.dtype == dtype and rel_err(g, tg) <= rtol


@DTYPES
@pytest.mark.parametrize("lead, bias", LINEAR_CASES + [((8, 196), True)])
def test_linear_torch_parity(torch, lead, bias, dtype, rtol) -> None:
    inputs = linear_inputs(8, lead, 48, 24, bias, dtype)
    out, cache = linear_forward(*inputs.values())
    dout = np.random.default_rng(9).standard_normal(out.shape).astype(dtype)
    grads = linear_backward(dout, cache)
    tout, tgrads = _torch_grads(torch, torch.nn.functional.linear, inputs, dout)
    _assert_parity(out, grads, tout, tgrads, dtype, rtol)


@DTYPES
@pytest.mark.parametrize(
    "shapes",
    MATMUL_CASES + [((4, 196, 64), (4, 64, 196))],
    ids=[_id(c) for c in MATMUL_CASES] + ["attention"],
)
def test_matmul_torch_parity(torch, shapes, dtype, rtol) -> None:
    inputs = matmul_inputs(10, *shapes, dtype=dtype)
    out, cache = matmul_forward(*inputs.values())
    dout = np.random.default_rng(11).standard_normal(out.shape).astype(dtype)
    grads = matmul_backward(dout, cache)
    tout, tgrads = _torch_grads(torch, torch.matmul, inputs, dout)
    _assert_parity(out, grads, tout, tgrads, dtype, rtol)


# ---------------------------------------------------------------------------
# input validation


def _strict(a: np.ndarray) -> Any:
    import array_api_strict as xs

    return xs.asarray(a)


BAD_LINEAR = [
    (
        "x_scalar",
        {"x": np.zeros(())},
        ValueError,
        r"^x: expected an array \(\.\.\., in\)",
    ),
    (
        "weight_rank",
        {"weight": np.zeros((5, 4, 1))},
        ValueError,
        r"^weight: expected a 2-D array",
    ),
    (
        "in_features",
        {"x": np.zeros((2, 3))},
        ValueError,
        (
            r"^x: expected last axis of size in = weight.shape\[1\] = 4, "
            r"got shape \(2, 3\)"
        ),
    ),
    (
        "bias_shape",
        {"bias": np.zeros(4)},
        ValueError,
        r"^bias: expected shape \(out,\) = \(5,\)",
    ),
    (
        "int_dtype",
        {"weight": np.zeros((5, 4), np.int32)},
        TypeError,
        r"^weight: expected dtype float32 or float64, got int32",
    ),
    ("mixed_dtype", {"bias": np.zeros(5, np.float32)}, TypeError, r"bias=float32"),
    (
        "nan_x",
        {"x": np.full((2, 4), np.nan)},
        ValueError,
        r"^x: expected finite values",
    ),
    (
        "inf_weight",
        {"weight": np.full((5, 4), np.inf)},
        ValueError,
        r"^weight: expected finite",
    ),
    (
        "mixed_namespace",
        {"x": "strict"},
        TypeError,
        r"mixed \(x: array_api_strict.*weight: numpy",
    ),
]


@pytest.mark.parametrize(
    "override, exc, match", [c[1:] for c in BAD_LINEAR], ids=[c[0] for c in BAD_LINEAR]
)
def test_linear_rejects_bad_input(override, exc, match) -> None:
    args = dict(linear_inputs(12, (2,), 4, 5, True), **override)
    if isinstance(args["x"], str):
        args["x"] = _strict(np.zeros((2, 4)))
    with pytest.raises(exc, match=match):
        linear_forward(*args.values())


BAD_MATMUL = [
    (
        "a_rank",
        {"a": np.zeros(4)},
        ValueError,
        r"^a: expected an array with at least 2 axes",
    ),
    (
        "b_rank",
        {"b": np.zeros(4)},
        ValueError,
        r"^b: expected an array with at least 2 axes",
    ),
    (
        "inner",
        {"b": np.zeros((3, 5))},
        ValueError,
        (
            r"^b: expected b.shape\[-2\] = a.shape\[-1\] = 4, "
            r"got shapes a \(2, 3, 4\) and b \(3, 5\)"
        ),
    ),
    (
        "batch",
        {"b": np.zeros((3, 4, 5))},
        ValueError,
        r"^b: expected batch axes broadcastable with a's",
    ),
    (
        "mixed_dtype",
        {"a": np.zeros((2, 3, 4), np.float32)},
        TypeError,
        r"a=float32, b=float64",
    ),
    (
        "bool_dtype",
        {"b": np.zeros((4, 5), bool)},
        TypeError,
        r"^b: expected dtype float32",
    ),
    (
        "nan_b",
        {"b": np.full((4, 5), np.nan)},
        ValueError,
        r"^b: expected finite values",
    ),
    (
        "mixed_namespace",
        {"b": "strict"},
        TypeError,
        r"mixed \(a: numpy, b: array_api_strict",
    ),
]


@pytest.mark.parametrize(
    "override, exc, match", [c[1:] for c in BAD_MATMUL], ids=[c[0] for c in BAD_MATMUL]
)
def test_matmul_rejects_bad_input(override, exc, match) -> None:
    args = dict(matmul_inputs(13, (2, 3, 4), (4, 5)), **override)
    if isinstance(args["b"], str):
        args["b"] = _strict(np.zeros((4, 5)))
    with pytest.raises(exc, match=match):
        matmul_forward(*args.values())


@pytest.mark.parametrize("op", OPS)
def test_backward_rejects_bad_dout(op) -> None:
    fwd, bwd, _ = OPS[op]
    inp = (
        linear_inputs(14, (2, 3), 4, 5, True)
        if op == "linear"
        else matmul_inputs(14, (2, 3, 4), (4, 5))
    )
    out, cache = fwd(*inp.values())
    with pytest.raises(ValueError, match=r"^dout: expected the forward's output shape"):
        bwd(np.zeros((2, 5, 3)), cache)
    with pytest.raises(TypeError, match=r"dout=float32"):
        bwd(np.zeros(out.shape, np.float32), cache)


# ---------------------------------------------------------------------------
# the rank-2 update of the GC block's x gradient, and skipping da


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("u2_shape", [(6, 1), (3, 6, 1)])
def test_add_outer_products_is_the_three_passes_bit_for_bit(xb, dtype, u2_shape) -> None:
    """base + (u1 v1 + u2 v2) with each product one term: the bits of the
    products and sums written out (NumPy, whichever tier, and array_api_strict)."""
    rng = np.random.default_rng(21)
    host = [rng.standard_normal(s).astype(dtype)
            for s in ((3, 6, 50), (3, 6, 1), (3, 1, 50), u2_shape, (3, 1, 50))]
    base, u1, v1, u2, v2 = (xb.asarray(h) for h in host)
    out = backend.to_host(_add_outer_products(base, u1, v1, u2, v2))
    hb, hu1, hv1, hu2, hv2 = host
    np.testing.assert_array_equal(out, hb + (hu1 * hv1 + hu2 * hv2))
    assert out.dtype == np.dtype(dtype)
    # the check sees a regrouped sum: (base + u1 v1) + u2 v2 differs in the last bits
    regrouped = (hb + hu1 * hv1) + hu2 * hv2
    assert not np.array_equal(regrouped, out)


def test_add_outer_products_leaves_its_operands_alone() -> None:
    rng = np.random.default_rng(22)
    ops = [rng.standard_normal(s) for s in ((2, 4, 9), (2, 4, 1), (2, 1, 9), (4, 1),
                                            (2, 1, 9))]
    copies = [o.copy() for o in ops]
    out = _add_outer_products(*ops)
    for o, c in zip(ops, copies):
        np.testing.assert_array_equal(o, c)
        assert not np.shares_memory(out, o)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_add_product_into_writes_into_a_window_of_its_buffer(xb, dtype) -> None:
    """c += a·b into a window of a wider array (the shifted convolution's
    dX[:, s : s + Q]): the window holds c + a·b, the columns beside it are
    untouched, on NumPy (whichever tier) and on array_api_strict."""
    rng = np.random.default_rng(25)
    host = rng.standard_normal((48, 160)).astype(dtype)
    ha, hb = (rng.standard_normal(s).astype(dtype) for s in ((48, 64), (64, 130)))
    buf, a, b = xb.asarray(host.copy()), xb.asarray(ha), xb.asarray(hb)
    out = _add_product_into(buf[:, 20:150], a, b)
    got = backend.to_host(buf)
    want = host.copy()
    want[:, 20:150] += ha @ hb
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12,
                               atol=1e-5 if dtype == "float32" else 1e-12)
    np.testing.assert_array_equal(got[:, :20], host[:, :20])
    np.testing.assert_array_equal(got[:, 150:], host[:, 150:])
    np.testing.assert_array_equal(backend.to_host(out), got[:, 20:150])
    # the comparison sees a product left out or added twice
    assert not np.allclose(host[:, 20:150], want[:, 20:150], rtol=1e-5, atol=1e-5)
    assert not np.allclose(want[:, 20:150] + ha @ hb, want[:, 20:150], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 37])
def test_product_into_writes_its_rows_of_the_buffer(xb, dtype, k) -> None:
    """a·b into rows r0 : r0 + M of a stacked buffer (non_local's [dΘ | dΦ |
    dG]): those rows hold the product, bit for bit as ``backend.matmul``
    forms it, the rows around them are untouched, on NumPy (whichever tier)
    and on array_api_strict.  k = 1 is a broadcast multiply there."""
    rng = np.random.default_rng(26)
    host = rng.standard_normal((3, 40, 50)).astype(dtype)
    ha = rng.standard_normal((3, 12, k)).astype(dtype)
    hb = np.swapaxes(rng.standard_normal((3, 50, k)).astype(dtype), 1, 2)  # a transposed view
    buf, a, b = xb.asarray(host.copy()), xb.asarray(ha), xb.asarray(hb)
    out = _product_into(buf, 17, a, b)
    got = backend.to_host(out)
    want = host.copy()
    want[:, 17:29, :] = backend.to_host(backend.matmul(xb.xp, a, b))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[:, 17:29, :], ha @ hb, rtol=1e-5 if dtype == "float32"
                               else 1e-12, atol=1e-5 if dtype == "float32" else 1e-12)
    np.testing.assert_array_equal(backend.to_host(buf), got)  # written into buf itself
    # the exact comparison sees rows written one too low, or a product scaled by an ulp
    shifted = host.copy()
    shifted[:, 18:30, :] = ha @ hb
    assert not np.array_equal(shifted, want)
    nudged = want.copy()
    nudged[:, 17:29, :] = np.nextafter(nudged[:, 17:29, :], np.inf)
    assert not np.array_equal(nudged, want)


def test_matmul_backward_without_da_gives_the_same_db() -> None:
    inp = matmul_inputs(23, (3, 7, 1), (3, 1, 9))
    _, cache = matmul_forward(*inp.values())
    dout = np.random.default_rng(24).standard_normal((3, 7, 9))
    da, db = _matmul_backward(dout, cache)
    none, db_only = _matmul_backward(dout, cache, need_da=False)
    assert none is None and da is not None
    np.testing.assert_array_equal(db_only, db)
