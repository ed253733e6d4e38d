"""The checker is trusted only because it fails on planted bugs.

The functions here are deliberately tiny NumPy functions with a correct
backward and several wrong ones; the planted bugs are the classic mistakes
(a factor off, a transposed weight gradient, a dropped broadcast sum, a
wrong arg-max).  Each must be reported as failed, on the right tensor, with
a worst index where the bug lives; the correct backward must pass; a step
across a ReLU kink must be reported as skipped, not failed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refattn.gradcheck import gradcheck, gradcheck_op

MODES = ["fast", "full", "taylor"]


# -- a linear layer with a broadcast bias: y = x W^T + b ---------------------


def linear_forward(x, w, b):
    return x @ w.T + b, (x, w)


def linear_backward(dy, cache, bug=None):
    x, w = cache
    dx = dy @ w
    dw = dy.T @ x
    db = dy.sum(axis=0)
    if bug == "factor":
        dw = dw * 1.001
    elif bug == "transpose":
        dw = dw.T
    elif bug == "dropped_sum":
        db = dy[0]
    elif bug == "one_element":
        dx = dx.copy()
        dx[2, 1] += 1e-3
    return dx, dw, db


@pytest.fixture
def linear_args():
    rng = np.random.default_rng(3)
    return {
        "x": rng.standard_normal((5, 4)),
        "w": rng.standard_normal((4, 4)),  # square, so a transposed dw has the right shape
        "b": rng.standard_normal(4),
    }


@pytest.mark.parametrize("mode", MODES)
def test_correct_backward_passes(mode, linear_args):
    report = gradcheck_op(linear_forward, linear_backward, linear_args, mode=mode)
    assert report.ok, report.to_text()
    assert [t.name for t in report.tensors] == ["x", "w", "b"]
    assert all(t.status == "pass" for t in report.tensors)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "bug, tensor", [("factor", "w"), ("transpose", "w"), ("dropped_sum", "b")]
)
def test_planted_bug_fails_on_the_right_tensor(mode, bug, tensor, linear_args):
    report = gradcheck_op(
        linear_forward,
        lambda dy, c: linear_backward(dy, c, bug),
        linear_args,
        mode=mode,
    )
    assert not report.ok
    assert report.failed == [tensor], report.to_text()
    assert "FAIL" in report.to_text()


def test_worst_index_points_at_the_bug(linear_args):
    # a single wrong element of dx: the element-by-element re-check finds it
    report = gradcheck_op(
        linear_forward,
        lambda dy, c: linear_backward(dy, c, "one_element"),
        linear_args,
        mode="full",
    )
    (x,) = [t for t in report.tensors if t.name == "x"]
    assert x.status == "fail"
    assert x.worst_index == (2, 1)
    assert x.numeric is not None and abs(x.analytic - x.numeric) == pytest.approx(
        1e-3, rel=1e-4
    )


def test_transposed_weight_worst_index_is_off_diagonal(linear_args):
    report = gradcheck_op(
        linear_forward,
        lambda dy, c: linear_backward(dy, c, "transpose"),
        linear_args,
        mode="fast",
    )
    (w,) = [t for t in report.tensors if t.name == "w"]
    assert w.method == "fast+full"  # fell back to every element of the failing tensor
    i, j = w.worst_index
    assert i != j  # a transpose leaves the diagonal right


def test_fast_mode_falls_back_to_full_on_the_failing_tensor_only(linear_args):
    report = gradcheck_op(
        linear_forward,
        lambda dy, c: linear_backward(dy, c, "dropped_sum"),
        linear_args,
    )
    methods = {t.name: t.method for t in report.tensors}
    assert methods == {"x": "fast", "w": "fast", "b": "fast+full"}
    (b,) = [t for t in report.tensors if t.name == "b"]
    assert b.probes == b.size == 4


# -- a global max with the gradient routed to the wrong element --------------


def gmax_forward(x):
    i = int(np.argmax(x))
    return np.asarray(x.reshape(-1)[i]), (x.shape, i)


def gmax_backward(dy, cache, bug=False):
    shape, i = cache
    dx = np.zeros(shape)
    j = i
    if bug:  # the classic off-by-one routing: to the next element
        j = (i + 1) % dx.size
    dx.reshape(-1)[j] = dy
    return dx


@pytest.mark.parametrize("mode", MODES)
def test_wrong_argmax_routing_fails(mode):
    x = np.array([[0.3, 2.0, -1.0], [0.9, 0.1, 1.2]])  # max 2.0 at (0, 1), no ties
    good = gradcheck_op(gmax_forward, gmax_backward, {"x": x}, mode=mode)
    assert good.ok, good.to_text()
    bad = gradcheck_op(
        gmax_forward, lambda d, c: gmax_backward(d, c, bug=True), {"x": x}, mode=mode
    )
    assert bad.failed == ["x"], bad.to_text()
    if mode != "taylor":
        assert bad.tensors[0].worst_index in {(0, 1), (0, 2)}


# -- kinks and ties are skipped, not failed ----------------------------------


def relu_forward(x):
    return np.maximum(x, 0.0), x > 0


def relu_backward(dy, mask):
    return dy * mask


@pytest.mark.parametrize("mode", MODES)
def test_step_across_relu_kink_is_skipped(mode):
    x = np.array([1.0, -2.0, 1e-7, 3.0])  # element 2 sits within a step of the kink
    report = gradcheck_op(relu_forward, relu_backward, {"x": x}, mode=mode)
    assert report.ok, report.to_text()
    assert report.tensors[0].status == "skipped"
    if mode == "full":
        assert report.tensors[0].skipped_at == [(2,)]


def test_kink_detection_does_not_hide_a_wrong_gradient():
    x = np.array([1.0, -2.0, 0.5, 3.0])  # far from the kink
    report = gradcheck_op(relu_forward, lambda d, m: 2 * d * m, {"x": x}, mode="full")
    assert report.failed == ["x"]
    assert report.tensors[0].skipped_probes == 0


def test_tie_in_a_max_is_skipped():
    x = np.array([[1.0, 1.0 + 1e-8, 0.2]])  # within a step of a tie
    report = gradcheck_op(gmax_forward, gmax_backward, {"x": x}, mode="full")
    assert report.ok
    assert report.tensors[0].status == "skipped"


# -- a function that bends within a few steps --------------------------------


K_STIFF = 1.5e3  # sin(K x): the third derivative is K^3, the step 6e-6


def stiff_forward(x):
    return np.sin(K_STIFF * x), x


def stiff_backward(dy, x, factor=1.0):
    return factor * K_STIFF * np.cos(K_STIFF * x) * dy


def test_stiff_function_fails_at_the_default_step_alone():
    """The premise: at h = 6e-6 the central difference of sin(K x) errs by
    (K h)^2 / 6 ~ 1.4e-5 of the slope, above rtol = 1e-6."""
    from refattn.gradcheck import STEP

    assert (K_STIFF * STEP) ** 2 / 6 > 1e-5
    x = np.array([0.3, -0.1, 0.7])
    numeric = (np.sin(K_STIFF * (x + STEP)) - np.sin(K_STIFF * (x - STEP))) / (2 * STEP)
    exact = K_STIFF * np.cos(K_STIFF * x)
    assert np.max(np.abs(numeric - exact) / np.abs(exact)) > 1e-5


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_correct_stiff_gradient_passes_at_the_refined_step(mode):
    x = np.array([0.3, -0.1, 0.7])
    report = gradcheck_op(stiff_forward, stiff_backward, {"x": x}, mode=mode)
    assert report.ok, report.to_text()
    assert report.tensors[0].status == "pass"


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.parametrize("factor", [1.0001, 0.999, -1.0, 0.0])
def test_a_wrong_stiff_gradient_still_fails(mode, factor):
    """The refined step does not forgive: 1e-4 off fails like a sign flip."""
    x = np.array([0.3, -0.1, 0.7])
    report = gradcheck_op(
        stiff_forward, lambda d, c: stiff_backward(d, c, factor), {"x": x}, mode=mode)
    assert report.failed == ["x"], report.to_text()


# -- the generic interface ---------------------------------------------------


def test_generic_fn_with_two_outputs_and_a_none_gradient():
    rng = np.random.default_rng(0)
    args = {"a": rng.standard_normal((3, 2)), "k": rng.standard_normal(2)}

    def fn(p):
        a, k = p["a"], p["k"]
        outs = {"y": np.tanh(a) * k, "s": np.sum(a**2, axis=0)}

        def vjp(d):
            da = d["y"] * k * (1 - np.tanh(a) ** 2) + 2 * a * d["s"]
            return {"a": da, "k": None}  # k treated as a constant

        return outs, vjp

    report = gradcheck(fn, args)
    assert report.ok
    assert [t.name for t in report.tensors] == ["a"]
    with pytest.raises(ValueError, match="no gradient for 'k'"):
        gradcheck(fn, args, wrt=["a", "k"])


def test_args_are_not_mutated_and_float32_is_checked_in_float64(linear_args):
    args32 = {k: v.astype(np.float32) for k, v in linear_args.items()}
    before = {k: v.copy() for k, v in args32.items()}
    seen = []

    def fwd(x, w, b):
        seen.append(x.dtype)
        return linear_forward(x, w, b)

    report = gradcheck_op(fwd, linear_backward, args32, mode="full")
    assert report.ok
    assert set(seen) == {np.dtype(np.float64)}
    for k in before:
        np.testing.assert_array_equal(args32[k], before[k])


def test_report_text_and_json(linear_args):
    report = gradcheck_op(
        linear_forward, lambda d, c: linear_backward(d, c, "factor"), linear_args
    )
    data = json.loads(report.to_json())
    assert data["ok"] is False
    assert {t["name"]: t["status"] for t in data["tensors"]} == {
        "x": "pass",
        "w": "fail",
        "b": "pass",
    }
    text = report.to_text()
    assert text.splitlines()[0].startswith("gradcheck (fast, float64")
    assert "analytic=" in text and "numeric=" in text


def test_runs_on_array_api_strict_device(xb, linear_args):
    xp = xb.xp

    def fwd(x, w, b):
        return xp.matmul(x, xp.matrix_transpose(w)) + b, (x, w)

    def bwd(dy, c):
        x, w = c
        return xp.matmul(dy, w), xp.matmul(xp.matrix_transpose(dy), x), xp.sum(dy, axis=0)

    args = {k: xb.asarray(v) for k, v in linear_args.items()}
    report = gradcheck_op(fwd, bwd, args)
    assert report.ok, report.to_text()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        gradcheck_op(relu_forward, relu_backward, {"x": np.ones(2)}, mode="slow")
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        gradcheck_op(relu_forward, relu_backward, {"x": np.ones(2, dtype=np.int64)})
    with pytest.raises(ValueError, match="shape"):
        gradcheck_op(relu_forward, lambda d, m: d[:1], {"x": np.ones(2)})
