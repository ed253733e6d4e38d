"""ReLU, sigmoid, the sigmoid gate, broadcasting mul and add: gradient checks,
properties, PyTorch parity and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.elementwise import (
    add_backward,
    add_forward,
    gate_mul_backward,
    gate_mul_forward,
    mul_backward,
    mul_forward,
    relu_backward,
    relu_forward,
    sigmoid,
    sigmoid_backward,
    sigmoid_forward,
)

F64_RTOL = 1e-12
F32_RTOL = 2e-6  # a few float32 ulps relative to the tensor's scale


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def away_from_zero(x: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Keep ReLU inputs off the kink: every |x| >= margin."""
    return np.where(x >= 0, x + margin, x - margin)


# broadcast patterns: (name, x shape, z shape) with z broadcasting to x
GATE_PATTERNS = [
    ("channel", (2, 3, 4, 5), (2, 3, 1, 1)),
    ("spatial", (2, 3, 4, 5), (2, 1, 4, 5)),
    ("scalar_like", (2, 3, 4, 5), (1, 1, 1, 1)),
    ("leading_dims", (2, 3, 4, 5), (4, 5)),
    ("same", (2, 3, 4, 5), (2, 3, 4, 5)),
]
GATE_MODERATE = [
    ("channel", (4, 32, 14, 14), (4, 32, 1, 1)),
    ("spatial", (4, 32, 14, 14), (4, 1, 14, 14)),
]
# (name, a shape, b shape): either side, or both, may broadcast
BINARY_PATTERNS = GATE_PATTERNS + [
    ("a_broadcast", (2, 1, 1, 5), (2, 3, 4, 5)),
    ("both_broadcast", (2, 1, 4), (3, 1)),
    ("vector", (3, 4), (4,)),
]
BINARY_MODERATE = [
    ("channel", (4, 32, 14, 14), (4, 32, 1, 1)),
    ("both_broadcast", (8, 1, 196), (64, 1)),
]


def draw(rng: np.random.Generator, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    return [rng.standard_normal(s) for s in shapes]


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize(
    "mode, shape", [("full", (2, 3, 3, 2)), ("fast", (4, 32, 14, 14))]
)
def test_relu_gradcheck(mode: str, shape: tuple[int, ...]) -> None:
    x = away_from_zero(np.random.default_rng(1).standard_normal(shape))
    r = gradcheck_op(relu_forward, relu_backward, {"x": x}, mode=mode)
    assert r.ok, r.to_text()
    assert all(t.status == "pass" for t in r.tensors), r.to_text()


@pytest.mark.parametrize(
    "mode, shape", [("full", (2, 3, 3, 2)), ("fast", (4, 32, 14, 14))]
)
def test_sigmoid_gradcheck(mode: str, shape: tuple[int, ...]) -> None:
    z = 3.0 * np.random.default_rng(2).standard_normal(shape)
    r = gradcheck_op(sigmoid_forward, sigmoid_backward, {"z": z}, mode=mode)
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "mode, pattern",
    [("full", p) for p in GATE_PATTERNS] + [("fast", p) for p in GATE_MODERATE],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_gate_mul_gradcheck(mode: str, pattern: tuple) -> None:
    _, xs, zs = pattern
    x, z = draw(np.random.default_rng(3), xs, zs)
    r = gradcheck_op(gate_mul_forward, gate_mul_backward, {"x": x, "z": z}, mode=mode)
    assert r.ok, r.to_text()
    assert [t.name for t in r.tensors] == ["x", "z"]


@pytest.mark.parametrize("op", ["mul", "add"])
@pytest.mark.parametrize(
    "mode, pattern",
    [("full", p) for p in BINARY_PATTERNS] + [("fast", p) for p in BINARY_MODERATE],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_binary_gradcheck(op: str, mode: str, pattern: tuple) -> None:
    fwd, bwd = (
        (mul_forward, mul_backward) if op == "mul" else (add_forward, add_backward)
    )
    _, sa, sb = pattern
    a, b = draw(np.random.default_rng(4), sa, sb)
    r = gradcheck_op(fwd, bwd, {"a": a, "b": b}, mode=mode)
    assert r.ok, r.to_text()
    assert [t.name for t in r.tensors] == ["a", "b"]


def test_gradcheck_catches_a_wrong_gate_backward() -> None:
    """The checks above can fail: drop σ′ from dz and the check must flag z."""

    def wrong(dout, cache):
        dx, dz = gate_mul_backward(dout, cache)
        return dx, backend.sum_to_shape(dout * cache.x, tuple(cache.s.shape))

    x, z = draw(np.random.default_rng(5), (2, 3, 4, 5), (2, 3, 1, 1))
    r = gradcheck_op(gate_mul_forward, wrong, {"x": x, "z": z}, mode="fast")
    assert not r.ok and r.failed == ["z"]


# ---------------------------------------------------------------------------
# the backend matrix: numpy and array_api_strict on a non-default device


def test_ops_on_backend(xb) -> None:
    rng = np.random.default_rng(6)
    x = away_from_zero(rng.standard_normal((2, 3, 4, 5)))
    z_c, z_s = rng.standard_normal((2, 3, 1, 1)), rng.standard_normal((2, 1, 4, 5))
    cases = [
        (relu_forward, relu_backward, {"x": x}),
        (sigmoid_forward, sigmoid_backward, {"z": x}),
        (gate_mul_forward, gate_mul_backward, {"x": x, "z": z_c}),
        (gate_mul_forward, gate_mul_backward, {"x": x, "z": z_s}),
        (mul_forward, mul_backward, {"a": z_c, "b": x}),
        (add_forward, add_backward, {"a": x, "b": z_s[0]}),
    ]
    for fwd, bwd, inputs in cases:
        args = {k: xb.asarray(v) for k, v in inputs.items()}
        out, cache = fwd(*args.values())
        assert backend.device(out) == xb.device
        grads = bwd(xb.asarray(np.ones(tuple(out.shape))), cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        for g, (k, v) in zip(grads, args.items()):
            assert backend.device(g) == xb.device
            assert tuple(g.shape) == tuple(v.shape), k
        r = gradcheck_op(fwd, bwd, args, mode="fast")
        assert r.ok, f"{fwd.__name__}\n{r.to_text()}"


# ---------------------------------------------------------------------------
# properties


@st.composite
def broadcast_pair(draw_: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A full shape, a shape broadcasting to it (both at least 1-D), in a random
    order, and a cotangent of the broadcast shape."""
    full = tuple(draw_(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    keep = draw_(st.lists(st.booleans(), min_size=len(full), max_size=len(full)))
    small = tuple(n if k else 1 for n, k in zip(full, keep))
    small = small[draw_(st.integers(0, len(small) - 1)) :]  # drop leading axes
    rng = np.random.default_rng(draw_(st.integers(0, 2**32 - 1)))
    a, b = np.asarray(rng.standard_normal(full)), np.asarray(rng.standard_normal(small))
    if draw_(st.booleans()):
        a, b = b, a
    c = np.asarray(rng.standard_normal(np.broadcast_shapes(a.shape, b.shape)))
    return a, b, c


@given(broadcast_pair())
def test_mul_adjoint_identity(case) -> None:
    """For fixed b, a ↦ a ⊙ b is linear: <a ⊙ b, c> = <a, da(c)>, and the same in b."""
    a, b, c = case
    out, cache = mul_forward(a, b)
    da, db = mul_backward(c, cache)
    lhs = float(np.sum(out * c))
    bound = float(np.sum(np.abs(out * c))) + 1e-300
    assert abs(lhs - float(np.sum(a * da))) <= 1e-12 * bound
    assert abs(lhs - float(np.sum(b * db))) <= 1e-12 * bound


@given(broadcast_pair())
def test_add_adjoint_identity(case) -> None:
    """(a, b) ↦ a + b is linear: <a + b, c> = <a, da(c)> + <b, db(c)>."""
    a, b, c = case
    out, cache = add_forward(a, b)
    da, db = add_backward(c, cache)
    assert da.shape == a.shape and db.shape == b.shape
    lhs = float(np.sum(out * c))
    bound = float(np.sum(np.abs(out * c))) + 1e-300
    assert abs(lhs - float(np.sum(a * da) + np.sum(b * db))) <= 1e-12 * bound


def _all_ops(a: np.ndarray, b: np.ndarray):
    """(name, forward, backward, inputs) for every op at one drawn pair."""
    full, small = (a, b) if a.ndim >= b.ndim and a.size >= b.size else (b, a)
    gate_ok = np.broadcast_shapes(full.shape, small.shape) == full.shape
    ops = [
        ("relu", relu_forward, relu_backward, (away_from_zero(a),)),
        ("sigmoid", sigmoid_forward, sigmoid_backward, (a,)),
        ("mul", mul_forward, mul_backward, (a, b)),
        ("add", add_forward, add_backward, (a, b)),
    ]
    if gate_ok:
        ops.append(("gate_mul", gate_mul_forward, gate_mul_backward, (full, small)))
    return ops


def _as_tuple(g):
    return g if isinstance(g, tuple) else (g,)


@given(broadcast_pair(), st.floats(-3, 3), st.floats(-3, 3))
def test_backward_is_linear_in_dout(case, alpha: float, beta: float) -> None:
    a, b, _ = case
    rng = np.random.default_rng(0)
    for name, fwd, bwd, inputs in _all_ops(a, b):
        out, cache = fwd(*inputs)
        d1, d2 = rng.standard_normal(out.shape), rng.standard_normal(out.shape)
        g12 = _as_tuple(bwd(alpha * d1 + beta * d2, cache))
        g1, g2 = _as_tuple(bwd(d1, cache)), _as_tuple(bwd(d2, cache))
        for x, g, h1, h2 in zip(inputs, g12, g1, g2):
            assert g.shape == x.shape, name
            np.testing.assert_allclose(
                g, alpha * h1 + beta * h2, rtol=1e-12, atol=1e-12
            )


@given(broadcast_pair())
def test_nothing_is_mutated(case) -> None:
    a, b, c = case
    for name, fwd, bwd, inputs in _all_ops(a, b):
        before = [x.copy() for x in inputs]
        out, cache = fwd(*inputs)
        dout = np.random.default_rng(1).standard_normal(out.shape)
        dout_before, cache_before = dout.copy(), [np.copy(v) for v in cache]
        bwd(dout, cache)
        for x, x0 in zip(inputs, before):
            np.testing.assert_array_equal(x, x0, err_msg=name)
        np.testing.assert_array_equal(dout, dout_before, err_msg=name)
        for v, v0 in zip(cache, cache_before):
            np.testing.assert_array_equal(np.asarray(v), v0, err_msg=name)


@given(broadcast_pair())
def test_float32_stays_float32(case) -> None:
    a, b, _ = case
    a, b = a.astype(np.float32), b.astype(np.float32)
    for name, fwd, bwd, inputs in _all_ops(a, b):
        out, cache = fwd(*inputs)
        assert out.dtype == np.float32, name
        for g in _as_tuple(bwd(np.ones(out.shape, np.float32), cache)):
            assert g.dtype == np.float32, name


@given(broadcast_pair())
def test_gate_never_enlarges(case) -> None:
    """|x ⊙ σ(z)| <= |x| elementwise, since σ ∈ [0, 1]."""
    a, b, _ = case
    for name, fwd, _, (x, z) in [o for o in _all_ops(a, b) if o[0] == "gate_mul"]:
        out, _ = fwd(x, 50.0 * z)
        assert np.all(np.abs(out) <= np.abs(x)), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_stable_at_large_inputs(dtype) -> None:
    z = np.array([-1000.0, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1000.0], dtype)
    with np.errstate(
        over="raise", invalid="raise", divide="raise"
    ):  # underflow is fine
        s = sigmoid(z)
        out, cache = sigmoid_forward(z)
        dz = sigmoid_backward(np.ones_like(z), cache)
    assert s.dtype == dtype and out.dtype == dtype and dz.dtype == dtype
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 1))
    assert np.all(np.isfinite(dz)) and np.all(dz >= 0)
    assert s[0] == 0.0 and s[-1] == 1.0 and s[4] == 0.5
    # symmetric: σ(−z) = 1 − σ(z), exactly where 1 − σ(z) is representable
    np.testing.assert_allclose(s[::-1], 1 - s, atol=np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_the_stable_select_bit_for_bit(dtype) -> None:
    """sigmoid evaluates where(z >= 0, 1/(1+e), e/(1+e)), e = exp(−|z|), exactly."""
    rng = np.random.default_rng(7)
    z = np.concatenate(
        [rng.standard_normal(500) * s for s in (1.0, 10.0, 100.0)]
        + [np.array([0.0, -0.0, 88.0, -88.0, 750.0, -750.0, 1e30, -1e30])]
    ).astype(dtype)
    with np.errstate(under="ignore"):
        e = np.exp(-np.abs(z))
        want = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
        got = sigmoid(z)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


@given(
    st.lists(
        st.floats(-1000, 1000, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=32,
    ),
    st.sampled_from([np.float32, np.float64]),
)
def test_sigmoid_range_property(values: list[float], dtype) -> None:
    z = np.asarray(values, dtype=dtype)
    s = sigmoid(z)
    assert s.dtype == dtype
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 1))
    # monotone: sorting z sorts σ(z)
    order = np.argsort(z, kind="stable")
    assert np.all(np.diff(s[order]) >= 0)


def test_finite_screen_has_no_false_positives() -> None:
    """Huge finite float32 inputs whose sum overflows are still accepted."""
    x = np.full((4, 1000), 3e38, dtype=np.float32)
    with np.errstate(over="ignore"):
        out, _ = relu_forward(x)
        s, _ = sigmoid_forward(-x)
    np.testing.assert_array_equal(out, x)
    assert np.all(s == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_counted(bad: float) -> None:
    x = np.ones((3, 4))
    x[1, 2] = bad
    x[2, 0] = -bad
    with np.errstate(invalid="ignore"):  # inf − inf in the screening sum
        _check_raises(x)


def _check_raises(x: np.ndarray) -> None:
    for fwd in (relu_forward, sigmoid_forward):
        with pytest.raises(ValueError, match="expected finite values, got 2 NaN/Inf"):
            fwd(x)
    with pytest.raises(ValueError, match="^b: expected finite values, got 2"):
        add_forward(np.ones(4), x)


def test_relu_kink_convention() -> None:
    """relu'(0) = 0: inputs at ±0 pass no gradient."""
    x = np.array([-1.0, -0.0, 0.0, 2.0])
    out, cache = relu_forward(x)
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(relu_backward(np.full(4, 5.0), cache), [0, 0, 0, 5.0])


# ---------------------------------------------------------------------------
# PyTorch parity


def _torch_case(torch, fwd, bwd, tfn, inputs, dtype):
    """Run our op and torch autograd on the same inputs and cotangent."""
    inputs = [np.asarray(v, dtype=dtype) for v in inputs]
    out, cache = fwd(*inputs)
    dout = np.random.default_rng(9).standard_normal(out.shape).astype(dtype)
    grads = _as_tuple(bwd(dout, cache))
    ts = [torch.tensor(v, requires_grad=True) for v in inputs]
    tout = tfn(*ts)
    tout.backward(torch.tensor(dout))
    errs = [rel_err(out, tout.detach().numpy())]
    errs += [rel_err(g, t.grad.numpy()) for g, t in zip(grads, ts)]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return max(errs)


@pytest.mark.parametrize(
    "dtype, rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL)]
)
def test_torch_parity(torch, dtype, rtol) -> None:
    rng = np.random.default_rng(10)
    x = away_from_zero(3 * rng.standard_normal((4, 8, 6, 5)))
    zc, zs = (
        3 * rng.standard_normal((4, 8, 1, 1)),
        3 * rng.standard_normal((4, 1, 6, 5)),
    )
    big = np.concatenate([x.ravel()[:100], [-1000.0, -80.0, 80.0, 1000.0]])
    F = torch.nn.functional
    cases = {
        "relu": (relu_forward, relu_backward, F.relu, [x]),
        "sigmoid": (sigmoid_forward, sigmoid_backward, torch.sigmoid, [x]),
        "sigmoid_large": (sigmoid_forward, sigmoid_backward, torch.sigmoid, [big]),
        "gate_channel": (
            gate_mul_forward,
            gate_mul_backward,
            lambda a, b: a * torch.sigmoid(b),
            [x, zc],
        ),
        "gate_spatial": (
            gate_mul_forward,
            gate_mul_backward,
            lambda a, b: a * torch.sigmoid(b),
            [x, zs],
        ),
        "mul": (mul_forward, mul_backward, torch.mul, [zs, x]),
        "add": (add_forward, add_backward, torch.add, [x, zs[0, 0, 0]]),
    }
    for name, (fwd, bwd, tfn, inputs) in cases.items():
        err = _torch_case(torch, fwd, bwd, tfn, inputs, dtype)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:g}"


# ---------------------------------------------------------------------------
# bad input


X = np.zeros((2, 3, 4, 5))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (
            lambda: relu_forward(X.astype(np.int64)),
            TypeError,
            ["x", "float32", "int64"],
        ),
        (lambda: relu_forward([1.0, 2.0]), TypeError, ["x", "array", "list"]),
        (
            lambda: relu_forward(np.array([1.0, np.nan])),
            ValueError,
            ["x", "finite", "1"],
        ),
        (lambda: sigmoid_forward(np.array([np.inf])), ValueError, ["z", "finite"]),
        (lambda: sigmoid_forward(X.astype(np.float16)), TypeError, ["z", "float16"]),
        (
            lambda: gate_mul_forward(X, np.zeros((2, 3, 4, 5, 1))),
            ValueError,
            ["z", "broadcast", "(2, 3, 4, 5)", "(2, 3, 4, 5, 1)"],
        ),
        (
            lambda: gate_mul_forward(X, np.zeros((2, 3, 2, 1))),
            ValueError,
            ["z", "(2, 3, 2, 1)"],
        ),
        (
            lambda: gate_mul_forward(X[:, :, :1, :1], np.zeros((2, 3, 4, 5))),
            ValueError,
            ["z", "broadcasts to x", "(2, 3, 1, 1)"],
        ),
        (
            lambda: gate_mul_forward(X, np.zeros((2, 3, 1, 1), np.float32)),
            TypeError,
            ["x=float64", "z=float32"],
        ),
        (
            lambda: mul_forward(X, np.zeros((3, 3))),
            ValueError,
            ["a, b", "broadcast", "(2, 3, 4, 5)", "(3, 3)"],
        ),
        (lambda: add_forward(X, np.zeros(4)), ValueError, ["a, b", "(4,)"]),
        (
            lambda: add_forward(X, np.zeros(5, np.float32)),
            TypeError,
            ["a=float64", "b=float32"],
        ),
        (lambda: add_forward(X, 1.0), TypeError, ["b", "array", "float"]),
        (
            lambda: relu_backward(np.zeros((2, 3)), relu_forward(X)[1]),
            ValueError,
            ["dout", "(2, 3, 4, 5)", "(2, 3)"],
        ),
        (
            lambda: sigmoid_backward(X.astype(np.float32), sigmoid_forward(X)[1]),
            TypeError,
            ["dout=float32"],
        ),
        (
            lambda: add_backward(np.zeros((2, 3)), add_forward(X, X)[1]),
            ValueError,
            ["dout", "(2, 3, 4, 5)"],
        ),
        (
            lambda: mul_backward(np.zeros((5,)), mul_forward(X, X[0, 0])[1]),
            ValueError,
            ["dout", "(2, 3, 4, 5)", "(5,)"],
        ),
    ],
)
def test_bad_input(call, exc, words: list[str]) -> None:
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
