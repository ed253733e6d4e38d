"""Batch norm (train and eval) and group norm: gradient checks, properties,
PyTorch parity and input validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refattn import backend
from refattn.gradcheck import gradcheck_op
from refattn.ops.norm import (
    BatchNormOut,
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
)

F64_RTOL = 1e-12
F32_RTOL = 5e-6  # reductions over a few hundred float32 values, both sides

# (N, C, *S) with spatial rank 0, 1, 2, 3
TINY = [(4, 3), (2, 3, 5), (2, 3, 3, 4), (2, 2, 2, 3, 2)]
AFFINE = list(itertools.product([True, False], repeat=2))  # (weight?, bias?)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual − expected| relative to the scale of `expected`."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def bn_inputs(shape, seed, *, weight=True, bias=True, stats=True, dtype=np.float64):
    """x with a per-channel offset and scale, γ, β, running statistics."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, bshape) + rng.normal(
        0, 1, bshape
    )
    d = {
        "x": x,
        "weight": rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C) if weight else None,
        "bias": rng.standard_normal(C) if bias else None,
        "running_mean": rng.standard_normal(C) if stats else None,
        "running_var": rng.uniform(0.5, 2.0, C) if stats else None,
    }
    return {k: None if v is None else v.astype(dtype) for k, v in d.items()}


def gn_inputs(shape, seed, *, weight=True, bias=True, dtype=np.float64):
    d = bn_inputs(shape, seed, weight=weight, bias=bias, stats=False, dtype=dtype)
    del d["running_mean"], d["running_var"]
    return d


def reduce_axes(ndim: int) -> tuple[int, ...]:
    return (0,) + tuple(range(2, ndim))


# ---------------------------------------------------------------------------
# batch norm: gradient checks


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", AFFINE, ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize("shape", TINY, ids=lambda s: f"{len(s) - 2}d")
def test_bn_gradcheck_full(shape, affine, training: bool) -> None:
    inputs = bn_inputs(shape, 1, weight=affine[0], bias=affine[1])
    r = gradcheck_op(
        batch_norm_forward,
        batch_norm_backward,
        inputs,
        options={"training": training},
        mode="full",
    )
    assert r.ok, r.to_text()
    checked = ["x"] + [k for k, a in zip(("weight", "bias"), affine) if a]
    assert [t.name for t in r.tensors] == checked  # buffers get no gradient


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape",
    [(64, 32), (8, 16, 49), (8, 16, 14, 14), (2, 8, 4, 8, 8)],
    ids=lambda s: f"{len(s) - 2}d",
)
def test_bn_gradcheck_fast(shape, training: bool) -> None:
    inputs = bn_inputs(shape, 2)
    r = gradcheck_op(
        batch_norm_forward,
        batch_norm_backward,
        inputs,
        options={"training": training, "momentum": 0.01},
        mode="fast",
    )
    assert r.ok, r.to_text()


def test_bn_gradcheck_train_without_running_stats() -> None:
    inputs = bn_inputs((3, 4, 5), 3, stats=False)
    r = gradcheck_op(
        batch_norm_forward,
        batch_norm_backward,
        inputs,
        options={"training": True},
        mode="full",
    )
    assert r.ok, r.to_text()


def test_bn_gradcheck_catches_the_eval_formula_in_train_mode() -> None:
    """Dropping the batch-statistics terms (eval's dx in train mode) must fail."""

    def wrong(dout, cache):
        dx, dw, db = batch_norm_backward(dout, cache._replace(training=False))
        return dx, dw, db

    inputs = bn_inputs((4, 3, 5), 4)
    r = gradcheck_op(batch_norm_forward, wrong, inputs, options={"training": True})
    assert not r.ok and r.failed == ["x"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_on_backend(xb, training: bool) -> None:
    inputs = bn_inputs((3, 4, 5, 6), 5)
    args = {k: xb.asarray(v) for k, v in inputs.items()}
    out, cache = batch_norm_forward(*args.values(), training=training)
    for a in out:
        assert backend.device(a) == xb.device
    grads = batch_norm_backward(xb.asarray(np.ones(inputs["x"].shape)), cache)
    assert all(backend.device(g) == xb.device for g in grads)
    ref, _ = batch_norm_forward(*inputs.values(), training=training)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(xb.to_host(a), b, rtol=1e-13, atol=1e-13)
    r = gradcheck_op(
        batch_norm_forward,
        batch_norm_backward,
        args,
        options={"training": training},
        mode="fast",
    )
    assert r.ok, r.to_text()


# ---------------------------------------------------------------------------
# batch norm: semantics and properties


@pytest.mark.parametrize("shape", TINY + [(5, 3, 7, 2)], ids=lambda s: f"{len(s) - 2}d")
@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.0, 1.0])
def test_bn_train_statistics(shape, momentum: float) -> None:
    """Biased variance normalises; the unbiased one enters the running average."""
    p = bn_inputs(shape, 6, weight=False, bias=False)
    out, _ = batch_norm_forward(*p.values(), training=True, momentum=momentum, eps=1e-5)
    axes = reduce_axes(len(shape))
    mu = np.mean(p["x"], axis=axes, keepdims=True)
    var = np.var(p["x"], axis=axes, keepdims=True)  # biased
    np.testing.assert_allclose(
        out.y, (p["x"] - mu) / np.sqrt(var + 1e-5), rtol=1e-12, atol=1e-13
    )
    want_mean = (1 - momentum) * p["running_mean"] + momentum * mu.ravel()
    want_var = (1 - momentum) * p["running_var"] + momentum * np.var(
        p["x"], axis=axes, ddof=1
    )
    np.testing.assert_allclose(out.running_mean, want_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out.running_var, want_var, rtol=1e-13, atol=1e-15)


def test_bn_eval_uses_and_returns_the_running_statistics() -> None:
    p = bn_inputs((4, 3, 5, 5), 7)
    out, _ = batch_norm_forward(*p.values(), training=False, eps=1e-3)
    assert isinstance(out, BatchNormOut)
    assert out.running_mean is p["running_mean"] and out.running_var is p["running_var"]
    b = (1, 3, 1, 1)
    want = (p["x"] - p["running_mean"].reshape(b)) / np.sqrt(
        p["running_var"].reshape(b) + 1e-3
    ) * p["weight"].reshape(b) + p["bias"].reshape(b)
    np.testing.assert_allclose(out.y, want, rtol=1e-13, atol=1e-13)


def test_bn_train_without_running_stats_returns_none() -> None:
    p = bn_inputs((4, 3, 2), 8, stats=False)
    out, _ = batch_norm_forward(*p.values(), training=True)
    assert out.running_mean is None and out.running_var is None


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 2, 1, 1), (1, 2, 1, 1, 1)])
def test_bn_train_needs_more_than_one_value(shape) -> None:
    p = bn_inputs(shape, 9)
    with pytest.raises(ValueError) as info:
        batch_norm_forward(*p.values(), training=True)
    assert str(info.value) == (
        "batch_norm: training needs more than one value per channel, "
        f"got input shape {shape}"
    )
    out, _ = batch_norm_forward(*p.values(), training=False)  # eval is fine
    assert out.y.shape == shape


@st.composite
def bn_case(draw: st.DrawFn):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    shape = (n, c) + spatial
    training = draw(st.booleans())
    weight, bias = draw(st.booleans()), draw(st.booleans())
    stats = draw(st.booleans()) or not training
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    momentum = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
    if training:
        assume(np.prod(shape) // c > 1)
    seed = draw(st.integers(0, 2**32 - 1))
    p = bn_inputs(shape, seed, weight=weight, bias=bias, stats=stats, dtype=dtype)
    return p, {"training": training, "momentum": momentum}


def _snapshot(d: dict) -> dict:
    return {k: None if v is None else v.copy() for k, v in d.items()}


def _assert_same(d: dict, snap: dict) -> None:
    for k, v in d.items():
        if v is not None:
            np.testing.assert_array_equal(v, snap[k], err_msg=k)


def _term_scales(p: dict, cache, d: np.ndarray) -> list[float]:
    """Sizes of the terms each gradient adds up (what round-off is relative to):
    dx ~ γ/σ ⊙ dout, dweight = Σ dout ⊙ x̂, dbias = Σ dout."""
    w = 1.0 if p["weight"] is None else float(np.max(np.abs(p["weight"])))
    inv = float(np.max(cache.inv_std))
    ad = np.abs(d.astype(np.float64))
    return [
        4 * w * inv * float(np.max(ad)),
        float(np.sum(ad * np.abs(cache.xhat))),
        float(np.sum(ad)),
    ]


def _assert_linear(p: dict, cache, ds, gs) -> None:
    """bwd(2 d1 − 3 d2) == 2 bwd(d1) − 3 bwd(d2), and gradient shapes and dtypes."""
    (d1, d2), (g1, g2, g12) = ds, gs
    dtype = p["x"].dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    s1, s2 = _term_scales(p, cache, d1), _term_scales(p, cache, d2)
    names = ("x", "weight", "bias")
    for i, (name, a, ga, gb, gab) in enumerate(zip(names, p.values(), g1, g2, g12)):
        if a is None:
            assert ga is None and gb is None and gab is None, name
            continue
        assert ga.shape == a.shape and ga.dtype == dtype, name
        err = np.max(np.abs(gab - (2 * ga - 3 * gb)))
        assert err <= tol * (2 * s1[i] + 3 * s2[i]) + 1e-300, name


@given(bn_case())
def test_bn_properties(case) -> None:
    """dtype kept, no mutation (running statistics included), grad shapes,
    backward linear in dout, dx sums to zero per channel in train mode."""
    p, opts = case
    dtype = p["x"].dtype
    before = _snapshot(p)
    out, cache = batch_norm_forward(*p.values(), **opts)
    _assert_same(p, before)
    assert out.y.dtype == dtype and out.y.shape == p["x"].shape
    if p["running_mean"] is not None:
        assert out.running_mean.dtype == dtype and out.running_var.dtype == dtype
        assert (
            out.running_mean.shape == out.running_var.shape == p["running_mean"].shape
        )
        if opts["training"]:  # new arrays, never the caller's
            assert out.running_mean is not p["running_mean"]
            assert out.running_var is not p["running_var"]
    rng = np.random.default_rng(0)
    d1 = rng.standard_normal(out.y.shape).astype(dtype)
    d2 = rng.standard_normal(out.y.shape).astype(dtype)
    d1_before = d1.copy()
    cache_before = [v.copy() if hasattr(v, "copy") else v for v in cache]
    g1 = batch_norm_backward(d1, cache)
    np.testing.assert_array_equal(d1, d1_before)
    for v, v0 in zip(cache, cache_before):
        np.testing.assert_array_equal(v, v0)
    _assert_same(p, before)
    g2 = batch_norm_backward(d2, cache)
    g12 = batch_norm_backward(2.0 * d1 - 3.0 * d2, cache)
    _assert_linear(p, cache, (d1, d2), (g1, g2, g12))
    if opts["training"]:
        axes = reduce_axes(p["x"].ndim)
        tol = 1e-4 if dtype == np.float32 else 1e-11
        w = 1.0 if p["weight"] is None else np.abs(p["weight"])
        # the per-channel sum of dx cancels exactly; bound its round-off
        terms = np.sum(np.abs(g1[0]), axis=axes) + w * cache.inv_std.ravel() * np.sum(
            np.abs(d1), axis=axes
        )
        assert np.all(np.abs(np.sum(g1[0], axis=axes)) <= tol * terms + 1e-30)


# ---------------------------------------------------------------------------
# batch norm: PyTorch parity


def _bn_torch(torch, p, training, momentum, eps, dout):
    t = {k: None if v is None else torch.tensor(v) for k, v in p.items()}
    for k in ("x", "weight", "bias"):
        if t[k] is not None:
            t[k].requires_grad_(True)
    y = torch.nn.functional.batch_norm(
        t["x"],
        t["running_mean"],
        t["running_var"],
        t["weight"],
        t["bias"],
        training=training,
        momentum=momentum,
        eps=eps,
    )  # updates the running statistics in place (train mode)
    y.backward(torch.tensor(dout))

    def np_(v):
        return None if v is None else v.detach().numpy()

    grads = [
        None if t[k] is None else t[k].grad.numpy() for k in ("x", "weight", "bias")
    ]
    return [np_(y), np_(t["running_mean"]), np_(t["running_var"])], grads


@pytest.mark.parametrize(
    "dtype, rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL)]
)
@pytest.mark.parametrize("momentum", [0.1, 0.01])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape",
    [(16, 6), (4, 6, 10), (4, 6, 7, 5), (2, 6, 3, 4, 5)],
    ids=lambda s: f"{len(s) - 2}d",
)
def test_bn_torch_parity(torch, shape, training, momentum, dtype, rtol) -> None:
    eps = 1e-5
    for weight, bias in [(True, True), (False, False)]:
        p = bn_inputs(shape, 10, weight=weight, bias=bias, dtype=dtype)
        dout = np.random.default_rng(11).standard_normal(shape).astype(dtype)
        out, cache = batch_norm_forward(
            *p.values(), training=training, momentum=momentum, eps=eps
        )
        grads = batch_norm_backward(dout, cache)
        t_out, t_grads = _bn_torch(torch, p, training, momentum, eps, dout)
        for name, a, b in zip(("y", "running_mean", "running_var"), out, t_out):
            assert a.dtype == dtype, name
            assert rel_err(a, b) <= rtol, f"{name}: {rel_err(a, b):.3e}"
        for name, a, b in zip(("dx", "dweight", "dbias"), grads, t_grads):
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == dtype, name
                assert rel_err(a, b) <= rtol, f"{name}: {rel_err(a, b):.3e}"


def test_bn_torch_parity_without_running_stats(torch) -> None:
    p = bn_inputs((4, 3, 6), 12, stats=False)
    dout = np.random.default_rng(13).standard_normal((4, 3, 6))
    out, cache = batch_norm_forward(*p.values(), training=True)
    t_out, t_grads = _bn_torch(torch, p, True, 0.1, 1e-5, dout)
    assert rel_err(out.y, t_out[0]) <= F64_RTOL
    for a, b in zip(batch_norm_backward(dout, cache), t_grads):
        assert rel_err(a, b) <= F64_RTOL


# ---------------------------------------------------------------------------
# group norm


@pytest.mark.parametrize("affine", AFFINE, ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((3, 4), 2),
        ((2, 4, 5), 1),
        ((2, 4, 5), 4),
        ((2, 6, 3, 2), 3),
        ((1, 4, 2, 3, 2), 2),
    ],
    ids=str,
)
def test_gn_gradcheck_full(shape, groups: int, affine) -> None:
    inputs = gn_inputs(shape, 20, weight=affine[0], bias=affine[1])
    r = gradcheck_op(
        group_norm_forward,
        group_norm_backward,
        inputs,
        options={"num_groups": groups},
        mode="full",
    )
    assert r.ok, r.to_text()


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((8, 32, 14, 14), 8),
        ((8, 32, 14, 14), 32),
        ((4, 16, 49), 1),
        ((2, 8, 4, 6, 6), 2),
    ],
)
def test_gn_gradcheck_fast(shape, groups: int) -> None:
    inputs = gn_inputs(shape, 21)
    r = gradcheck_op(
        group_norm_forward,
        group_norm_backward,
        inputs,
        options={"num_groups": groups},
        mode="fast",
    )
    assert r.ok, r.to_text()


def test_gn_on_backend(xb) -> None:
    inputs = gn_inputs((2, 6, 4, 5), 22)
    args = {k: xb.asarray(v) for k, v in inputs.items()}
    y, cache = group_norm_forward(*args.values(), num_groups=3)
    assert backend.device(y) == xb.device
    grads = group_norm_backward(xb.asarray(np.ones(tuple(y.shape))), cache)
    assert all(backend.device(g) == xb.device for g in grads)
    r = gradcheck_op(
        group_norm_forward,
        group_norm_backward,
        args,
        options={"num_groups": 3},
        mode="fast",
    )
    assert r.ok, r.to_text()


def naive_group_norm(x, weight, bias, groups, eps):
    """Independent reference: a loop over samples and groups."""
    y = np.empty_like(x, dtype=np.float64)
    cg = x.shape[1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            blk = x[n, g * cg : (g + 1) * cg].astype(np.float64)
            y[n, g * cg : (g + 1) * cg] = (blk - blk.mean()) / np.sqrt(blk.var() + eps)
    b = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(b)
    if bias is not None:
        y = y + bias.reshape(b)
    return y


@st.composite
def gn_case(draw: st.DrawFn):
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    c = groups * draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    weight, bias = draw(st.booleans()), draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    return gn_inputs(
        (n, c) + spatial, seed, weight=weight, bias=bias, dtype=dtype
    ), groups


@given(gn_case())
def test_gn_properties(case) -> None:
    p, groups = case
    dtype = p["x"].dtype
    before = _snapshot(p)
    y, cache = group_norm_forward(*p.values(), num_groups=groups, eps=1e-5)
    assert y.dtype == dtype
    ref = naive_group_norm(p["x"], p["weight"], p["bias"], groups, 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert rel_err(y, ref) <= tol
    rng = np.random.default_rng(0)
    d1 = rng.standard_normal(y.shape).astype(dtype)
    d2 = rng.standard_normal(y.shape).astype(dtype)
    d1_before = d1.copy()
    g1, g2 = group_norm_backward(d1, cache), group_norm_backward(d2, cache)
    g12 = group_norm_backward(2.0 * d1 - 3.0 * d2, cache)
    np.testing.assert_array_equal(d1, d1_before)
    _assert_same(p, before)
    _assert_linear(p, cache, (d1, d2), (g1, g2, g12))


@pytest.mark.parametrize(
    "dtype, rtol", [(np.float64, F64_RTOL), (np.float32, F32_RTOL)]
)
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((4, 8), 2),
        ((4, 8, 12), 4),
        ((3, 12, 7, 5), 3),
        ((3, 12, 7, 5), 12),
        ((2, 8, 3, 4, 5), 1),
    ],
)
def test_gn_torch_parity(torch, shape, groups, dtype, rtol) -> None:
    for weight, bias in [(True, True), (False, False)]:
        p = gn_inputs(shape, 23, weight=weight, bias=bias, dtype=dtype)
        dout = np.random.default_rng(24).standard_normal(shape).astype(dtype)
        y, cache = group_norm_forward(*p.values(), num_groups=groups, eps=1e-5)
        grads = group_norm_backward(dout, cache)
        t = {
            k: None if v is None else torch.tensor(v, requires_grad=True)
            for k, v in p.items()
        }
        yt = torch.nn.functional.group_norm(
            t["x"], groups, t["weight"], t["bias"], 1e-5
        )
        yt.backward(torch.tensor(dout))
        assert y.dtype == dtype
        assert rel_err(y, yt.detach().numpy()) <= rtol
        for name, g in zip(("x", "weight", "bias"), grads):
            if t[name] is None:
                assert g is None, name
            else:
                assert g.dtype == dtype, name
                err = rel_err(g, t[name].grad.numpy())
                assert err <= rtol, f"d{name}: {err:.3e}"


# ---------------------------------------------------------------------------
# bad input


P = bn_inputs((2, 3, 4, 4), 30)
C3 = np.ones(3)
X_HUGE = np.where(P["x"] > 0, 3e30, -3e30).astype(np.float32)  # finite; x² is not


def bn(**kw):
    args = {**P, **{k: v for k, v in kw.items() if k in P}}
    opts = {"training": True, **{k: v for k, v in kw.items() if k not in P}}
    return batch_norm_forward(*args.values(), **opts)


def gn(**kw):
    args = {"x": P["x"], "weight": P["weight"], "bias": P["bias"]}
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {"num_groups": 3, **{k: v for k, v in kw.items() if k not in args}}
    return group_norm_forward(*args.values(), **opts)


BAD = [
    (lambda: bn(x=np.zeros(5)), ValueError, ["x", "2 or 3 or 4 or 5-D", "(5,)"]),
    (
        lambda: bn(x=np.zeros((1, 2, 1, 1, 1, 2))),
        ValueError,
        ["x", "(1, 2, 1, 1, 1, 2)"],
    ),
    (lambda: bn(x=np.zeros((0, 3, 2))), ValueError, ["x", "non-empty", "(0, 3, 2)"]),
    (lambda: bn(x=P["x"].astype(np.int64)), TypeError, ["x", "int64"]),
    (lambda: bn(x=np.full((2, 3), np.nan)), ValueError, ["x", "finite", "6 NaN"]),
    (
        lambda: bn(x=np.where(P["x"] > 2, np.inf, P["x"]), training=False),
        ValueError,
        ["x", "finite"],
    ),
    (
        lambda: bn(
            **{k: v.astype(np.float32) for k, v in P.items() if k != "x"}, x=X_HUGE
        ),
        ValueError,
        ["x", "per-channel variance overflows float32", "3e+30"],
    ),
    (lambda: bn(weight=np.ones(4)), ValueError, ["weight", "(3)", "(4,)"]),
    (lambda: bn(bias=np.ones((3, 1))), ValueError, ["bias", "(3)", "(3, 1)"]),
    (lambda: bn(bias=[0.0, 0.0, 0.0]), TypeError, ["bias", "list"]),
    (lambda: bn(weight=np.array([1.0, np.inf, 1.0])), ValueError, ["weight", "finite"]),
    (lambda: bn(running_mean=np.zeros(2)), ValueError, ["running_mean", "(3)", "(2,)"]),
    (lambda: bn(running_var=np.ones(5)), ValueError, ["running_var", "(3)", "(5,)"]),
    (lambda: bn(running_var=None), ValueError, ["running_mean, running_var", "both"]),
    (
        lambda: bn(running_mean=None, running_var=None, training=False),
        ValueError,
        ["running_mean, running_var", "eval", "None"],
    ),
    (
        lambda: bn(running_var=-C3, training=False),
        ValueError,
        ["running_var", "non-negative", "-1.0"],
    ),
    (lambda: bn(running_mean=C3 * np.nan), ValueError, ["running_mean", "finite"]),
    (
        lambda: bn(weight=C3.astype(np.float32)),
        TypeError,
        ["x=float64", "weight=float32"],
    ),
    (
        lambda: bn(running_var=C3.astype(np.float32)),
        TypeError,
        ["running_var=float32"],
    ),
    (lambda: bn(training=1), TypeError, ["training", "bool", "1"]),
    (lambda: bn(training="eval"), TypeError, ["training", "bool", "'eval'"]),
    (lambda: bn(momentum=1.5), ValueError, ["momentum", "[0.0, 1.0]", "1.5"]),
    (lambda: bn(momentum=-0.1), ValueError, ["momentum", "-0.1"]),
    (lambda: bn(momentum=None), TypeError, ["momentum", "real", "None"]),
    (lambda: bn(eps=0.0), ValueError, ["eps", "(0.0, inf)", "0.0"]),
    (lambda: bn(eps=-1e-5), ValueError, ["eps", "-1e-05"]),
    (lambda: bn(eps=float("nan")), ValueError, ["eps", "nan"]),
    (lambda: bn(eps="1e-5"), TypeError, ["eps", "real", "'1e-5'"]),
    (lambda: gn(num_groups=2), ValueError, ["num_groups", "divisor", "C=3", "2"]),
    (lambda: gn(num_groups=0), ValueError, ["num_groups", "C=3", "0"]),
    (lambda: gn(num_groups=1.0), TypeError, ["num_groups", "int", "1.0"]),
    (lambda: gn(num_groups=True), TypeError, ["num_groups", "int", "True"]),
    (lambda: gn(x=np.zeros(3)), ValueError, ["x", "(3,)"]),
    (lambda: gn(x=np.full((2, 3), np.inf)), ValueError, ["x", "finite"]),
    (
        lambda: gn(
            x=X_HUGE, weight=P["weight"].astype(np.float32), bias=None, num_groups=1
        ),
        ValueError,
        ["x", "per-group variance overflows float32"],
    ),
    (lambda: gn(weight=np.ones(6)), ValueError, ["weight", "(6,)"]),
    (lambda: gn(bias=C3.astype(np.float32)), TypeError, ["bias=float32"]),
    (lambda: gn(eps=0), ValueError, ["eps", "0"]),
    (
        lambda: batch_norm_backward(np.zeros((2, 3)), bn()[1]),
        ValueError,
        ["dout", "(2, 3, 4, 4)", "(2, 3)"],
    ),
    (
        lambda: group_norm_backward(P["x"].astype(np.float32), gn()[1]),
        TypeError,
        ["dout=float32"],
    ),
]


@pytest.mark.parametrize("call, exc, words", BAD)
def test_bad_input(call, exc, words: list[str]) -> None:
    with pytest.raises(exc) as info, np.errstate(over="ignore", invalid="ignore"):
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        batch_norm_forward(*P.values(), True)  # type: ignore[misc]
    with pytest.raises(TypeError):
        group_norm_forward(P["x"], None, None, 3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        batch_norm_forward(*P.values())  # training has no default  # type: ignore
