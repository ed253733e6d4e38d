"""Max/avg pooling (1-3 spatial dims), global pools (avg, max, lp, lse) and
channel pools (max, mean): gradient checks, tie conventions, properties,
PyTorch parity and input validation."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import product
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.pool import (
    CHANNEL_POOL_KINDS,
    GLOBAL_POOL_KINDS,
    avg_pool_backward,
    avg_pool_forward,
    channel_pool_backward,
    channel_pool_forward,
    global_pool_backward,
    global_pool_forward,
    max_pool_backward,
    max_pool_forward,
)

F64_RTOL = 1e-12
F32_RTOL = 2e-6  # a few float32 ulps relative to the tensor's scale

WINDOWED = {
    "max": (max_pool_forward, max_pool_backward),
    "avg": (avg_pool_forward, avg_pool_backward),
}


def tie_free(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct values with a margin: a random permutation of an evenly spaced
    grid over [-4, 4] plus noise of at most a quarter of the spacing, so any two
    elements differ by at least half the spacing (>= 1e-3 for up to 4000
    elements, far above a gradcheck step of ~6e-6)."""
    n = int(np.prod(shape))
    spacing = 8.0 / max(n, 1)
    grid = (rng.permutation(n) - (n - 1) / 2.0) * spacing
    noise = rng.uniform(-0.25, 0.25, n) * spacing
    return (grid + noise).reshape(shape)


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def naive_pool(
    x: np.ndarray, k: tuple[int, ...], s: tuple[int, ...], kind: str, dout: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Loop-over-windows reference: forward and the first-arg-max / uniform VJP."""
    n, c = x.shape[:2]
    so = tuple((d - kk) // ss + 1 for d, kk, ss in zip(x.shape[2:], k, s))
    out = np.zeros((n, c) + so)
    dx = np.zeros_like(x)
    for o in product(*(range(v) for v in so)):
        win = tuple(slice(oi * si, oi * si + ki) for oi, si, ki in zip(o, s, k))
        for b, ch in product(range(n), range(c)):
            w = x[(b, ch) + win]
            g = dout[(b, ch) + o]
            if kind == "max":
                t = int(np.argmax(w))  # first occurrence in row-major order
                out[(b, ch) + o] = w.flat[t]
                pos = np.unravel_index(t, w.shape)
                at = tuple(oi * si + pi for oi, si, pi in zip(o, s, pos))
                dx[(b, ch) + at] += g
            else:
                out[(b, ch) + o] = w.mean()
                dx[(b, ch) + win] += g / w.size
    return out, dx


# windowed cases: (shape, kernel_size, stride); tiny for full mode
TINY_WINDOWED = [
    ((2, 2, 8), 2, None),  # 1-D, kernel == stride
    ((2, 2, 7), 3, 2),  # 1-D, overlapping, odd
    ((1, 2, 7), 2, 2),  # 1-D, floor drops the tail
    ((2, 2, 4, 6), 2, None),  # 2-D tiles
    ((1, 2, 5, 7), 2, None),  # 2-D floor in both dims
    ((1, 2, 5, 5), 3, 2),  # 2-D overlapping
    ((1, 2, 6, 7), (2, 3), (1, 2)),  # mixed per-axis overlap
    ((1, 2, 7, 7), 2, 3),  # gaps: stride > kernel
    ((1, 2, 2, 4, 5), (1, 2, 2), None),  # 3-D non-local sub-sampling, floor in W
    ((1, 1, 4, 4, 3), 2, 1),  # 3-D overlapping
    ((1, 2, 3, 5, 6), (2, 3, 2), (1, 2, 3)),  # 3-D mixed with a gap
]
MODERATE_WINDOWED = [
    ((4, 16, 33), 2, None),
    ((4, 16, 16, 16), 2, None),
    ((2, 8, 15, 17), 3, 2),
    ((2, 8, 4, 14, 14), (1, 2, 2), None),
    ((2, 4, 5, 9, 9), 3, (2, 2, 3)),
]


def _ids(case: tuple) -> str:
    shape, k, s = case
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}".replace(" ", "")


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", TINY_WINDOWED, ids=_ids)
def test_windowed_gradcheck_full(kind: str, case: tuple) -> None:
    shape, k, s = case
    fwd, bwd = WINDOWED[kind]
    x = tie_free(np.random.default_rng(1), shape)
    r = gradcheck_op(
        fwd, bwd, {"x": x}, options={"kernel_size": k, "stride": s}, mode="full"
    )
    assert r.ok, r.to_text()
    assert all(t.status == "pass" for t in r.tensors), r.to_text()


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", MODERATE_WINDOWED, ids=_ids)
def test_windowed_gradcheck_fast(kind: str, case: tuple) -> None:
    shape, k, s = case
    fwd, bwd = WINDOWED[kind]
    x = tie_free(np.random.default_rng(2), shape)
    r = gradcheck_op(fwd, bwd, {"x": x}, options={"kernel_size": k, "stride": s})
    assert r.ok, r.to_text()
    assert all(t.status == "pass" for t in r.tensors), r.to_text()


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("kind", GLOBAL_POOL_KINDS)
@pytest.mark.parametrize(
    "mode, shape",
    [("full", (2, 3, 5)), ("full", (2, 2, 3, 4)), ("full", (1, 2, 2, 3, 2))]
    + [("fast", (4, 32, 14, 14)), ("fast", (2, 8, 4, 7, 7))],
)
def test_global_pool_gradcheck(
    mode: str, shape: tuple, kind: str, keepdim: bool
) -> None:
    x = tie_free(np.random.default_rng(3), shape)
    r = gradcheck_op(
        global_pool_forward,
        global_pool_backward,
        {"x": x},
        options={"kind": kind, "keepdim": keepdim},
        mode=mode,
    )
    assert r.ok, r.to_text()
    assert all(t.status == "pass" for t in r.tensors), r.to_text()


@pytest.mark.parametrize("kind", CHANNEL_POOL_KINDS)
@pytest.mark.parametrize(
    "mode, shape",
    [("full", (2, 4, 5)), ("full", (2, 3, 3, 4)), ("full", (1, 3, 2, 2, 3))]
    + [("fast", (4, 64, 14, 14)), ("fast", (2, 16, 4, 7, 7))],
)
def test_channel_pool_gradcheck(mode: str, shape: tuple, kind: str) -> None:
    x = tie_free(np.random.default_rng(4), shape)
    r = gradcheck_op(
        channel_pool_forward,
        channel_pool_backward,
        {"x": x},
        options={"kind": kind},
        mode=mode,
    )
    assert r.ok, r.to_text()
    assert all(t.status == "pass" for t in r.tensors), r.to_text()


def test_gradcheck_catches_a_wrong_max_pool_backward() -> None:
    """A backward that routes to the LAST window position must fail."""

    def wrong(dout, cache):
        k = cache.kernel_size
        return max_pool_backward(dout, cache._replace(idx=cache.idx * 0 + k[0] - 1))

    x = tie_free(np.random.default_rng(5), (2, 3, 8))
    r = gradcheck_op(max_pool_forward, wrong, {"x": x}, options={"kernel_size": 2})
    assert not r.ok and r.failed == ["x"]


# ---------------------------------------------------------------------------
# the backend matrix: numpy and array_api_strict on a non-default device


def _backend_cases(rng: np.random.Generator) -> list[tuple]:
    """(forward, backward, x, options): a representative subset of every op."""
    x2 = tie_free(rng, (2, 3, 6, 7))
    mp, ap = WINDOWED["max"], WINDOWED["avg"]
    gp = (global_pool_forward, global_pool_backward)
    cp = (channel_pool_forward, channel_pool_backward)
    cases = [
        (*mp, tie_free(rng, (2, 3, 7)), {"kernel_size": 3, "stride": 2}),
        (*mp, x2, {"kernel_size": 2}),
        (*mp, tie_free(rng, (1, 2, 3, 4, 5)), {"kernel_size": (1, 2, 2)}),
        (*mp, x2, {"kernel_size": 1}),
        (*ap, x2, {"kernel_size": (3, 2), "stride": (2, 1)}),
        (*ap, tie_free(rng, (1, 2, 4, 4, 4)), {"kernel_size": 2}),
    ]
    cases += [
        (*gp, x2, {"kind": k, "keepdim": kd})
        for k in GLOBAL_POOL_KINDS
        for kd in (False, True)
    ]
    cases += [(*cp, x2, {"kind": k}) for k in CHANNEL_POOL_KINDS]
    return cases


def test_ops_on_backend(xb) -> None:
    for fwd, bwd, x, opts in _backend_cases(np.random.default_rng(6)):
        xa = xb.asarray(x)
        out, cache = fwd(xa, **opts)
        assert backend.device(out) == xb.device, (fwd.__name__, opts)
        dx = bwd(xb.asarray(np.ones(tuple(out.shape))), cache)
        assert backend.device(dx) == xb.device, (fwd.__name__, opts)
        assert tuple(dx.shape) == x.shape
        # same numbers as the NumPy run
        out_np, cache_np = fwd(x, **opts)
        np.testing.assert_array_equal(xb.to_host(out), out_np)
        np.testing.assert_array_equal(
            xb.to_host(dx), bwd(np.ones(out_np.shape), cache_np)
        )
        r = gradcheck_op(fwd, bwd, {"x": xa}, options=opts, mode="fast")
        assert r.ok, f"{fwd.__name__} {opts}\n{r.to_text()}"
        if bwd in (global_pool_backward, channel_pool_backward):
            base = np.random.default_rng(7).standard_normal(x.shape)
            total = bwd(xb.asarray(np.ones(tuple(out.shape))), cache,
                        into=xb.asarray(base.copy()))
            assert backend.device(total) == xb.device, (fwd.__name__, opts)
            np.testing.assert_array_equal(
                xb.to_host(total), base + bwd(np.ones(out_np.shape), cache_np)
            )


# ---------------------------------------------------------------------------
# ties: the whole gradient goes to the first arg-max


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", TINY_WINDOWED, ids=_ids)
def test_windowed_matches_naive_loops_with_ties(kind: str, case: tuple) -> None:
    """Integer inputs from {0, 1, 2} tie in most windows."""
    shape, k, s = case
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, shape).astype(np.float64)
    fwd, bwd = WINDOWED[kind]
    out, cache = fwd(x, kernel_size=k, stride=s)
    dout = rng.standard_normal(out.shape)
    kt = cache.kernel_size
    st_ = cache.stride
    ref_out, ref_dx = naive_pool(x, kt, st_, kind, dout)
    np.testing.assert_allclose(out, ref_out, rtol=1e-15, atol=0)
    np.testing.assert_allclose(bwd(dout, cache), ref_dx, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "x_shape,k,s",
    [((2, 3, 8), 2, 2),  # the windows tile x
     ((2, 3, 7, 6), 2, 2),  # a floor-mode tail row that gets no gradient
     ((2, 3, 7, 7), 3, 2),  # overlapping windows
     ((1, 2, 4, 5, 6), (2, 2, 3), (2, 2, 3))],
)
def test_max_pool_backward_into_channels_of_a_buffer(x_shape, k, s) -> None:
    """out=(buf, c0) writes exactly the fresh dx into channels c0 : c0 + C,
    every one of them (buf starts as NaN), and leaves the others alone."""
    from refattn.cuda import use_kernels
    from refattn.ops.pool import _max_pool_backward

    rng = np.random.default_rng(5)
    x = tie_free(rng, x_shape)
    with use_kernels(False):  # the generic math (the CPU tier's is in tests/cpu)
        out, cache = max_pool_forward(x, kernel_size=k, stride=s)
        dout = rng.standard_normal(out.shape)
        want = max_pool_backward(dout, cache)
        n, c = x_shape[:2]
        buf = np.full((n, c + 3) + x_shape[2:], np.nan)
        got = _max_pool_backward(dout, cache, out=(buf, 2))
    assert got is buf
    np.testing.assert_array_equal(buf[:, 2 : 2 + c], want)
    assert np.isnan(buf[:, :2]).all() and np.isnan(buf[:, 2 + c :]).all()


def test_all_equal_window_sends_everything_to_its_first_element() -> None:
    x = np.ones((1, 1, 4, 4))
    out, cache = max_pool_forward(x, kernel_size=2)
    dx = max_pool_backward(np.full(out.shape, 3.0), cache)
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 3.0
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_channel_and_global_max_ties_go_to_first() -> None:
    x = np.zeros((1, 3, 2, 2))
    x[0, 1] = 5.0
    x[0, 2] = 5.0  # channels 1 and 2 tie everywhere
    _, cache = channel_pool_forward(x, kind="max")
    dx = channel_pool_backward(np.ones((1, 1, 2, 2)), cache)
    np.testing.assert_array_equal(dx[0, 1], np.ones((2, 2)))
    np.testing.assert_array_equal(dx[0, [0, 2]], np.zeros((2, 2, 2)))
    _, cache = global_pool_forward(x, kind="max")
    dx = global_pool_backward(np.ones((1, 3)), cache)
    # every map ties across its 4 positions: the first (row-major) wins
    np.testing.assert_array_equal(dx[0].reshape(3, 4), np.eye(1, 4).repeat(3, 0))


def _ties(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 3, shape).astype(np.float64)


@pytest.mark.parametrize("case", TINY_WINDOWED + MODERATE_WINDOWED[:3], ids=_ids)
def test_max_pool_ties_match_torch(torch, case: tuple) -> None:
    shape, k, s = case
    rng = np.random.default_rng(8)
    x = _ties(rng, shape)
    out, cache = max_pool_forward(x, kernel_size=k, stride=s)
    dout = rng.standard_normal(out.shape)
    F = torch.nn.functional
    tfn = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[x.ndim]
    xt = torch.tensor(x, requires_grad=True)
    tfn(xt, k, s).backward(torch.tensor(dout))
    # exact routing; overlapping windows may sum in another order (last ulp)
    np.testing.assert_allclose(
        max_pool_backward(dout, cache), xt.grad.numpy(), rtol=1e-15, atol=1e-15
    )


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 3, 3), (1, 6, 2, 3, 2)])
def test_channel_and_global_max_ties_match_torch(torch, shape: tuple) -> None:
    rng = np.random.default_rng(9)
    x = _ties(rng, shape)
    # channel max: torch.max(x, dim=1, keepdim=True)
    out, cache = channel_pool_forward(x, kind="max")
    dout = rng.standard_normal(out.shape)
    xt = torch.tensor(x, requires_grad=True)
    torch.max(xt, dim=1, keepdim=True)[0].backward(torch.tensor(dout))
    np.testing.assert_array_equal(channel_pool_backward(dout, cache), xt.grad.numpy())
    # global max: torch.max over the flattened positions
    out, cache = global_pool_forward(x, kind="max")
    dout = rng.standard_normal(out.shape)
    xt = torch.tensor(x, requires_grad=True)
    torch.max(xt.flatten(2), dim=2)[0].backward(torch.tensor(dout))
    np.testing.assert_array_equal(global_pool_backward(dout, cache), xt.grad.numpy())


# ---------------------------------------------------------------------------
# other conventions and edge cases


def test_lp_gradient_is_zero_on_an_all_zero_map() -> None:
    x = np.zeros((2, 3, 4, 4))
    x[1, 2] = np.arange(16.0).reshape(4, 4)
    out, cache = global_pool_forward(x, kind="lp")
    dx = global_pool_backward(np.ones(out.shape), cache)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx[0], 0.0)
    np.testing.assert_array_equal(dx[1, :2], 0.0)
    norm = np.sqrt(np.sum(x[1, 2] ** 2))
    assert out[1, 2] == pytest.approx(norm, rel=1e-15)
    np.testing.assert_allclose(dx[1, 2], x[1, 2] / norm, rtol=1e-15)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "dtype, scale",
    [
        (np.float32, 1e-30),
        (np.float32, 1e30),
        (np.float64, 1e-200),
        (np.float64, 1e200),
    ],
)
def test_lp_survives_overflow_and_underflow(dtype, scale: float) -> None:
    """The squares under- or overflow; the rescaled norm does not."""
    info = np.finfo(dtype)
    base = np.arange(1.0, 13.0).reshape(1, 1, 3, 4)
    x = (base * scale).astype(dtype)
    out, cache = global_pool_forward(x, kind="lp")
    dx = global_pool_backward(np.ones(out.shape, dtype), cache)
    tol = float(10 * info.eps)
    assert out.dtype == dtype and dx.dtype == dtype
    assert out[0, 0] / scale == pytest.approx(np.sqrt(np.sum(base**2)), rel=tol)
    np.testing.assert_allclose(dx, base / np.sqrt(np.sum(base**2)), rtol=tol)


def test_lse_is_stable_for_large_inputs() -> None:
    x = np.array([1000.0, 999.0, -1000.0, 1000.0]).reshape(1, 1, 2, 2)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        out, cache = global_pool_forward(x, kind="lse")
        dx = global_pool_backward(np.ones((1, 1)), cache)
    e = np.exp(np.array([0.0, -1.0, -2000.0, 0.0]))
    assert out[0, 0] == pytest.approx(1000.0 + np.log(e.sum()), rel=1e-15)
    np.testing.assert_allclose(dx.ravel(), e / e.sum(), rtol=1e-15)


def test_avg_pool_backward_spreads_uniformly() -> None:
    """2x2 tiles of a 5x5 map: each tile gets dout/4, the floor-mode tail 0."""
    out, cache = avg_pool_forward(np.zeros((1, 1, 5, 5)), kernel_size=2)
    dout = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    dx = avg_pool_backward(dout, cache)
    expected = np.zeros((5, 5))
    expected[:4, :4] = np.kron(dout[0, 0], np.ones((2, 2))) / 4
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_unit_kernel_copies_rather_than_aliases() -> None:
    x = np.random.default_rng(10).standard_normal((2, 3, 4, 5))
    for fwd in (max_pool_forward, avg_pool_forward):
        out, _ = fwd(x, kernel_size=1)
        np.testing.assert_array_equal(out, x)
        assert not np.shares_memory(out, x), fwd.__name__


def test_empty_batch() -> None:
    """N = 0 is allowed and gives empty outputs and gradients."""
    x = np.zeros((0, 3, 5, 4))
    cases = [
        (max_pool_forward, max_pool_backward, {"kernel_size": 2}),
        (avg_pool_forward, avg_pool_backward, {"kernel_size": 3, "stride": 1}),
    ]
    cases += [
        (global_pool_forward, global_pool_backward, {"kind": k})
        for k in GLOBAL_POOL_KINDS
    ]
    cases += [
        (channel_pool_forward, channel_pool_backward, {"kind": k})
        for k in CHANNEL_POOL_KINDS
    ]
    for fwd, bwd, opts in cases:
        out, cache = fwd(x, **opts)
        assert out.shape[0] == 0, (fwd.__name__, opts)
        assert bwd(np.zeros(out.shape), cache).shape == x.shape, (fwd.__name__, opts)


# ---------------------------------------------------------------------------
# properties


OPS = (
    ["max_pool", "avg_pool"]
    + [f"global_{k}" for k in GLOBAL_POOL_KINDS]
    + [f"channel_{k}" for k in CHANNEL_POOL_KINDS]
)
LINEAR_OPS = ["avg_pool", "global_avg", "channel_mean"]


@st.composite
def pool_cases(draw_: st.DrawFn, ops: list[str] = OPS) -> tuple:
    """(op name, forward, backward, x, options) at a drawn shape and geometry."""
    name = draw_(st.sampled_from(ops))
    d = draw_(st.integers(1, 3))
    n, c = draw_(st.integers(1, 2)), draw_(st.integers(1, 4))
    k = tuple(draw_(st.integers(1, 3)) for _ in range(d))
    spatial = tuple(kk + draw_(st.integers(0, 4)) for kk in k)
    rng = np.random.default_rng(draw_(st.integers(0, 2**32 - 1)))
    x = tie_free(rng, (n, c) + spatial)
    if name in ("max_pool", "avg_pool"):
        stride = draw_(st.one_of(st.none(), st.tuples(*[st.integers(1, 3)] * d)))
        fwd, bwd = WINDOWED[name[:3]]
        return name, fwd, bwd, x, {"kernel_size": k, "stride": stride}
    if name.startswith("global"):
        opts = {"kind": name[7:], "keepdim": draw_(st.booleans())}
        return name, global_pool_forward, global_pool_backward, x, opts
    return name, channel_pool_forward, channel_pool_backward, x, {"kind": name[8:]}


@given(pool_cases(LINEAR_OPS))
def test_adjoint_identity(case: tuple) -> None:
    """Linear ops: <f(x), y> = <x, f^T(y)> with f^T the backward."""
    name, fwd, bwd, x, opts = case
    out, cache = fwd(x, **opts)
    y = np.random.default_rng(12).standard_normal(out.shape)
    lhs = float(np.sum(out * y))
    rhs = float(np.sum(x * bwd(y, cache)))
    bound = float(np.sum(np.abs(out * y))) + 1e-300
    assert abs(lhs - rhs) <= 1e-12 * bound, name


@given(pool_cases(), st.floats(-3, 3), st.floats(-3, 3))
def test_backward_is_linear_in_dout(case: tuple, alpha: float, beta: float) -> None:
    name, fwd, bwd, x, opts = case
    out, cache = fwd(x, **opts)
    rng = np.random.default_rng(13)
    d1, d2 = rng.standard_normal(out.shape), rng.standard_normal(out.shape)
    g = bwd(alpha * d1 + beta * d2, cache)
    assert g.shape == x.shape, name
    np.testing.assert_allclose(
        g, alpha * bwd(d1, cache) + beta * bwd(d2, cache), rtol=1e-12, atol=1e-12
    )


def _arrays(cache: tuple) -> list[Any]:
    return [v for v in cache if hasattr(v, "shape") and hasattr(v, "dtype")]


@given(pool_cases())
def test_nothing_is_mutated(case: tuple) -> None:
    name, fwd, bwd, x, opts = case
    x0 = x.copy()
    out, cache = fwd(x, **opts)
    dout = np.random.default_rng(14).standard_normal(out.shape)
    dout0, cache0 = dout.copy(), [np.copy(v) for v in _arrays(cache)]
    dx = bwd(dout, cache)
    assert dx.shape == x.shape, name
    np.testing.assert_array_equal(x, x0, err_msg=name)
    np.testing.assert_array_equal(dout, dout0, err_msg=name)
    for v, v0 in zip(_arrays(cache), cache0):
        np.testing.assert_array_equal(v, v0, err_msg=name)


@given(pool_cases([n for n in OPS if not n.endswith("_pool")]))
def test_into_adds_the_gradient_in_place(case: tuple) -> None:
    """global/channel pools: bwd(dout, cache, into=t) is t + bwd(dout, cache),
    bit for bit, written into t itself (a max touches only its arg-maxes)."""
    name, fwd, bwd, x, opts = case
    out, cache = fwd(x, **opts)
    rng = np.random.default_rng(15)
    dout, base = rng.standard_normal(out.shape), rng.standard_normal(x.shape)
    into = base.copy()
    total = bwd(dout, cache, into=into)
    np.testing.assert_array_equal(total, base + bwd(dout, cache), err_msg=name)
    np.testing.assert_array_equal(into, total, err_msg=name)  # written in place


@given(pool_cases())
def test_float32_stays_float32(case: tuple) -> None:
    name, fwd, bwd, x, opts = case
    x = x.astype(np.float32)
    out, cache = fwd(x, **opts)
    assert out.dtype == np.float32, name
    dx = bwd(np.ones(out.shape, np.float32), cache)
    assert dx.dtype == np.float32 and dx.shape == x.shape, name


@given(
    st.integers(1, 3),
    st.lists(st.integers(1, 3), min_size=1, max_size=3),
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.integers(0, 2**32 - 1),
)
def test_max_pool_equals_reshape_max(
    n: int, k: list[int], counts: list[int], seed: int
) -> None:
    """kernel == stride on a tiled input: max over a (.., So, K, ..) reshape."""
    d = len(k)
    so = counts[:d]
    c = 2
    shape = (n, c) + tuple(o * kk for o, kk in zip(so, k))
    x = np.random.default_rng(seed).standard_normal(shape)
    out, _ = max_pool_forward(x, kernel_size=tuple(k))
    tiled = x.reshape((n, c) + tuple(v for pair in zip(so, k) for v in pair))
    ref = tiled.max(axis=tuple(3 + 2 * i for i in range(d)))
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------------------
# PyTorch parity


def _torch_windowed(torch, kind: str, ndim: int) -> Callable:
    F = torch.nn.functional
    return {
        ("max", 3): F.max_pool1d,
        ("max", 4): F.max_pool2d,
        ("max", 5): F.max_pool3d,
        ("avg", 3): F.avg_pool1d,
        ("avg", 4): F.avg_pool2d,
        ("avg", 5): F.avg_pool3d,
    }[kind, ndim]


def _torch_global(torch, kind: str, keepdim: bool, x: Any) -> Any:
    dims = tuple(range(2, x.ndim))
    if kind == "avg":
        return x.mean(dim=dims, keepdim=keepdim)
    if kind == "max":
        return torch.amax(x, dim=dims, keepdim=keepdim)
    if kind == "lp":
        if x.ndim == 4:  # the CBAM anchor: lp_pool2d over the whole map
            out = torch.nn.functional.lp_pool2d(x, 2, kernel_size=tuple(x.shape[2:]))
        else:
            out = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True)
        return out if keepdim else out.flatten(1)
    out = torch.logsumexp(x.flatten(2), dim=2)
    return out.reshape(out.shape + (1,) * len(dims)) if keepdim else out


def _parity(torch, fwd, bwd, tfn, x: np.ndarray, opts: dict, dtype) -> float:
    x = x.astype(dtype)
    out, cache = fwd(x, **opts)
    dout = np.random.default_rng(15).standard_normal(out.shape).astype(dtype)
    dx = bwd(dout, cache)
    assert out.dtype == dtype and dx.dtype == dtype
    xt = torch.tensor(x, requires_grad=True)
    tout = tfn(xt)
    assert tuple(tout.shape) == out.shape
    tout.backward(torch.tensor(dout))
    return max(rel_err(out, tout.detach().numpy()), rel_err(dx, xt.grad.numpy()))


def _torch_channel(torch, kind: str, x: Any) -> Any:
    if kind == "max":
        return torch.max(x, dim=1, keepdim=True)[0]
    return x.mean(dim=1, keepdim=True)


def _parity_cases(torch, rng: np.random.Generator) -> list[tuple]:
    """(name, forward, backward, torch function, x, options) for every op."""
    cases = []
    for kind, (shape, k, s) in product(
        ["max", "avg"], TINY_WINDOWED + MODERATE_WINDOWED
    ):
        tfn = partial(_torch_windowed(torch, kind, len(shape)), kernel_size=k, stride=s)
        opts = {"kernel_size": k, "stride": s}
        name = f"{kind}_pool {_ids((shape, k, s))}"
        cases.append((name, *WINDOWED[kind], tfn, tie_free(rng, shape), opts))
    for shape in [(4, 32, 14, 14), (2, 8, 9), (2, 8, 3, 5, 5)]:
        x = tie_free(rng, shape) + 0.5  # keeps ||x|| well away from 0 for lp
        for kind, keepdim in product(GLOBAL_POOL_KINDS, (False, True)):
            tfn = partial(_torch_global, torch, kind, keepdim)
            opts = {"kind": kind, "keepdim": keepdim}
            name = f"global_{kind} {shape} keepdim={keepdim}"
            cases.append(
                (name, global_pool_forward, global_pool_backward, tfn, x, opts)
            )
        for kind in CHANNEL_POOL_KINDS:
            tfn = partial(_torch_channel, torch, kind)
            name = f"channel_{kind} {shape}"
            cases.append(
                (
                    name,
                    channel_pool_forward,
                    channel_pool_backward,
                    tfn,
                    x,
                    {"kind": kind},
                )
            )
    return cases


@pytest.mark.parametrize(
    "dtype, rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL)]
)
def test_torch_parity(torch, dtype, rtol) -> None:
    errors = {
        name: _parity(torch, fwd, bwd, tfn, x, opts, dtype)
        for name, fwd, bwd, tfn, x, opts in _parity_cases(
            torch, np.random.default_rng(16)
        )
    }
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"relative error above {rtol:g}: {bad}"


# ---------------------------------------------------------------------------
# bad input


X = np.zeros((2, 3, 6, 6))
MP = max_pool_forward
AP = avg_pool_forward
GP = global_pool_forward
CP = channel_pool_forward


def _dout_case(fwd, bwd, opts, dout):
    _, cache = fwd(X, **opts)
    return lambda: bwd(dout, cache)


def test_bad_into_is_refused_by_name() -> None:
    for fwd, bwd, opts in [(GP, global_pool_backward, {"kind": "max"}),
                           (CP, channel_pool_backward, {"kind": "max"})]:
        out, cache = fwd(X, **opts)
        dout = np.ones(out.shape)
        with pytest.raises(ValueError, match=r"into.*\(2, 3, 6, 6\).*\(2, 3, 6\)"):
            bwd(dout, cache, into=np.zeros((2, 3, 6)))
        with pytest.raises(TypeError, match="into"):
            bwd(dout, cache, into=np.zeros(X.shape, np.float32))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (
            lambda: MP(np.zeros((3, 4)), kernel_size=2),
            ValueError,
            ["x", "3-D", "(3, 4)"],
        ),
        (
            lambda: AP(np.zeros((1,) * 6), kernel_size=1),
            ValueError,
            ["x", "5-D", "(1, 1, 1, 1, 1, 1)"],
        ),
        (
            lambda: GP(np.zeros((2, 3)), kind="avg"),
            ValueError,
            ["x", "spatial", "(2, 3)"],
        ),
        (
            lambda: CP(np.zeros((2, 3)), kind="max"),
            ValueError,
            ["x", "spatial", "(2, 3)"],
        ),
        (
            lambda: CP(np.zeros((2, 0, 3)), kind="max"),
            ValueError,
            ["x", "non-empty", "(2, 0, 3)"],
        ),
        (lambda: MP(X, kernel_size=7), ValueError, ["kernel_size", "(6, 6)", "(7, 7)"]),
        (lambda: AP(X, kernel_size=(2, 7)), ValueError, ["kernel_size", "(2, 7)"]),
        (lambda: MP(X, kernel_size=0), ValueError, ["kernel_size", ">= 1", "0"]),
        (lambda: MP(X, kernel_size=2, stride=0), ValueError, ["stride", ">= 1", "0"]),
        (
            lambda: AP(X, kernel_size=2, stride=(1, -1)),
            ValueError,
            ["stride", "(1, -1)"],
        ),
        (
            lambda: MP(X, kernel_size=(2, 2, 2)),
            ValueError,
            ["kernel_size", "2 ints", "(2, 2, 2)"],
        ),
        (lambda: MP(X, kernel_size=2.0), TypeError, ["kernel_size", "2.0"]),
        (lambda: MP(X, kernel_size=True), TypeError, ["kernel_size", "True"]),
        (
            lambda: GP(X, kind="mean"),
            ValueError,
            ["kind", "'avg', 'max', 'lp', 'lse'", "'mean'"],
        ),
        (lambda: CP(X, kind="avg"), ValueError, ["kind", "'max', 'mean'", "'avg'"]),
        (lambda: CP(X, kind=None), TypeError, ["kind", "'max', 'mean'", "None"]),
        (lambda: GP(X, kind="avg", keepdim=1), TypeError, ["keepdim", "bool", "1"]),
        (
            lambda: MP(X.astype(np.int64), kernel_size=2),
            TypeError,
            ["x", "float32", "int64"],
        ),
        (lambda: GP(X.astype(np.float16), kind="max"), TypeError, ["x", "float16"]),
        (lambda: CP([[[1.0]]], kind="max"), TypeError, ["x", "array", "list"]),
        (
            lambda: MP(np.full((1, 1, 2, 2), np.nan), kernel_size=2),
            ValueError,
            ["x", "finite", "4"],
        ),
        (
            lambda: GP(np.array([[[1.0, np.inf]]]), kind="lse"),
            ValueError,
            ["x", "finite", "1"],
        ),
        (
            _dout_case(
                MP, max_pool_backward, {"kernel_size": 2}, np.zeros((2, 3, 2, 2))
            ),
            ValueError,
            ["dout", "(2, 3, 3, 3)", "(2, 3, 2, 2)"],
        ),
        (
            _dout_case(
                AP,
                avg_pool_backward,
                {"kernel_size": 4},
                np.zeros((2, 3, 1, 1), np.int32),
            ),
            TypeError,
            ["dout", "int32"],
        ),
        (
            _dout_case(
                GP,
                global_pool_backward,
                {"kind": "lp", "keepdim": True},
                np.zeros((2, 3)),
            ),
            ValueError,
            ["dout", "(2, 3, 1, 1)", "(2, 3)"],
        ),
        (
            _dout_case(
                GP, global_pool_backward, {"kind": "max"}, np.full((2, 3), np.nan)
            ),
            ValueError,
            ["dout", "finite"],
        ),
        (
            _dout_case(
                CP, channel_pool_backward, {"kind": "mean"}, np.zeros((2, 3, 6, 6))
            ),
            ValueError,
            ["dout", "(2, 1, 6, 6)"],
        ),
    ],
)
def test_bad_input_is_refused_by_name(call, exc, words) -> None:
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
