"""gap block: gradient checks, the uniform backward, backends and dtypes,
properties, PyTorch parity (and the non-global AvgPool2d(7)), validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks.gap import GapConfig
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import config_to_dict, to_namespace
from refattn.blocks.specs.gap import SPECS

SPEC = SPECS["gap"]
PARITY_RTOL = 1e-12

# (id, keepdim, x shape): both output layouts, 1-, 2- and 3-D spatial inputs
CASES = [
    ("2d", False, (2, 3, 5, 7)),
    ("2d_keepdim", True, (2, 3, 5, 7)),
    ("1d", False, (2, 3, 6)),
    ("3d_keepdim", True, (2, 2, 3, 4, 5)),
    ("single_position", False, (3, 4, 1, 1)),
]
CASE_IDS = [c[0] for c in CASES]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def case(keepdim: bool, shape: tuple[int, ...], seed: int = 0):
    cfg = SPEC.config(keepdim=keepdim)
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    return cfg, inputs, params, state


@pytest.mark.parametrize(("name", "keepdim", "shape"), CASES, ids=CASE_IDS)
def test_gradcheck_full(name, keepdim, shape):
    cfg, inputs, params, state = case(keepdim, shape)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


def test_gradcheck_fast_fixture_on_backends(xb):
    cfg = SPEC.config()
    inputs, _, _ = draw_case(SPEC, cfg, seed=1)
    assert inputs["x"].shape == SPEC.fixture_shapes(cfg)["x"]
    report = gradcheck_block(SPEC, cfg, to_namespace(inputs, xb.xp, xb.device), {}, {})
    assert report.ok, report.to_text()


@pytest.mark.parametrize("keepdim", [False, True])
def test_backward_spreads_dout_over_hw_uniformly(keepdim):
    cfg, inputs, params, state = case(keepdim, (2, 3, 5, 7))
    dout_shape = (2, 3, 1, 1) if keepdim else (2, 3)
    dout = np.random.default_rng(3).standard_normal(dout_shape)
    _, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    dx = dinputs["x"]
    assert dparams == {}
    assert dx.shape == (2, 3, 5, 7)
    expect = np.reshape(dout, (2, 3, 1, 1)) / 35.0
    assert np.array_equal(dx, np.broadcast_to(expect, dx.shape))


@pytest.mark.parametrize(("name", "keepdim", "shape"), CASES, ids=CASE_IDS)
def test_forward_is_the_mean_of_every_map(name, keepdim, shape):
    cfg, inputs, params, state = case(keepdim, shape)
    out = SPEC.forward(inputs, params, state, cfg)[0]["out"]
    axes = tuple(range(2, len(shape)))
    assert rel_err(out, inputs["x"].mean(axis=axes, keepdims=keepdim)) < 1e-15


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_runs_on_backend_device_and_keeps_dtype(xb, dtype):
    cfg, inputs, _, _ = case(True, (2, 3, 5, 7))
    dout_host = np.random.default_rng(1).standard_normal((2, 3, 1, 1))
    outputs, dinputs, _ = run_block(
        SPEC,
        cfg,
        to_namespace(inputs, xb.xp, xb.device, dtype),
        {},
        {},
        xb.asarray(dout_host.astype(dtype)),
    )
    for arr in (outputs["out"], dinputs["x"]):
        assert backend.dtype_name(arr) == dtype
        assert backend.device(arr) == xb.device
    ref_out, ref_dx, _ = run_block(SPEC, cfg, inputs, {}, {}, dout_host)
    tol = 1e-15 if dtype == "float64" else 1e-6
    assert rel_err(xb.to_host(outputs["out"]), ref_out["out"]) < tol
    assert rel_err(xb.to_host(dinputs["x"]), ref_dx["x"]) < tol


@st.composite
def gap_cases(draw):
    rank = draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4))) + tuple(
        draw(st.integers(1, 5)) for _ in range(rank)
    )
    cfg = GapConfig(keepdim=draw(st.booleans()))
    return cfg, shape, draw(st.integers(0, 2**31 - 1))


@given(gap_cases())
def test_backward_is_linear_in_dout_and_mutates_nothing(c):
    cfg, shape, seed = c
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    before = copy.deepcopy(inputs)
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    rng = np.random.default_rng(seed)
    d1, d2 = (rng.standard_normal(outputs["out"].shape) for _ in range(2))
    d1_copy = d1.copy()
    g1 = SPEC.backward({"out": d1}, cache)[0]["x"]
    g2 = SPEC.backward({"out": d2}, cache)[0]["x"]
    g12 = SPEC.backward({"out": 0.5 * d1 + 4.0 * d2}, cache)[0]["x"]
    assert g1.shape == shape
    assert rel_err(g12, 0.5 * g1 + 4.0 * g2) < 1e-13
    assert np.array_equal(d1, d1_copy)
    assert np.array_equal(before["x"], inputs["x"])


# ---------------------------------------------------------------------------
# PyTorch parity, and the AvgPool2d(7) head that is not global


@pytest.mark.parametrize(("name", "keepdim", "shape"), CASES, ids=CASE_IDS)
def test_matches_pytorch_mean(torch, name, keepdim, shape):
    from anchors.simple import make_gap, run_torch

    cfg, inputs, params, state = case(keepdim, shape)
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    dout = np.random.default_rng(5).standard_normal(outputs["out"].shape)
    dx = SPEC.backward({"out": dout}, cache)[0]["x"]
    names = SPEC.anchor_names(None, cfg, {"x": shape})
    module = make_gap(config_to_dict(cfg))
    t_out, t_dx, _ = run_torch(module, names, inputs["x"], {}, dout)
    assert rel_err(outputs["out"], t_out) < PARITY_RTOL
    assert rel_err(dx, t_dx) < PARITY_RTOL


def test_matches_adaptive_avg_pool(torch):
    import torch.nn.functional as F

    cfg, inputs, params, state = case(True, (2, 3, 5, 7))
    out = SPEC.forward(inputs, params, state, cfg)[0]["out"]
    ref = F.adaptive_avg_pool2d(torch.from_numpy(inputs["x"]), 1).numpy()
    assert rel_err(out, ref) < PARITY_RTOL


def _avgpool7(torch, x: np.ndarray, keepdim: bool) -> np.ndarray:
    from anchors.simple import make_gap_avgpool7

    module = make_gap_avgpool7({"keepdim": keepdim}).double()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("keepdim", [False, True])
def test_avgpool7_is_global_only_on_7x7_maps(torch, keepdim):
    """The buggy head agrees at 224x224 ResNet resolution (7x7 maps) and
    silently disagrees on 9x9 maps (one window over the top-left 7x7) and
    14x14 maps (four windows: a different shape)."""
    cfg = SPEC.config(keepdim=keepdim)
    for hw, agrees in (((7, 7), True), ((9, 9), False), ((14, 14), False)):
        inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 3) + hw}, seed=4)
        ours = SPEC.forward(inputs, params, state, cfg)[0]["out"]
        theirs = _avgpool7(torch, inputs["x"], keepdim)
        if agrees:
            assert rel_err(theirs, ours) < PARITY_RTOL
        elif theirs.shape == ours.shape:  # 9x9: same shape, wrong values
            assert rel_err(theirs, ours) > 1e-2
        else:  # 14x14: (N, C, 2, 2) windows instead of one number per map
            assert theirs.size == 4 * ours.size


# ---------------------------------------------------------------------------
# contract details and validation


def test_contract_details():
    cfg = SPEC.config()
    assert cfg == GapConfig(keepdim=False) and SPEC.presets == {}
    assert SPEC.param_shapes(cfg, {"x": (2, 3, 4, 5)}) == {}
    assert SPEC.init_params(cfg, {"x": (2, 3, 4, 5)}, seed=0) == ({}, {})
    assert SPEC.anchor_names(None, cfg, {"x": (2, 3, 4, 5)}) == {}
    assert SPEC.accumulation(cfg, {"x": (2, 3, 4, 5)}) == {"out": 20, "grad.input": 1}
    assert SPEC.with_bn_mode(cfg, "eval") is None
    _, cache = SPEC.forward({"x": np.ones((1, 1, 2, 2))}, {}, {}, cfg)
    assert SPEC.kink_margin(cache) == float("inf")


def test_bad_input_raises():
    cfg = SPEC.config()
    with pytest.raises(TypeError, match="keepdim: expected True or False, got 1"):
        SPECS["gap"].check_config(GapConfig(keepdim=1))
    with pytest.raises(ValueError, match="x: expected a 3 or 4 or 5-D array"):
        SPEC.forward({"x": np.zeros((2, 3))}, {}, {}, cfg)
    with pytest.raises(ValueError, match=r"params: unexpected key\(s\) 'weight'.*gap config"):
        SPEC.forward({"x": np.zeros((2, 3, 4, 4))}, {"weight": np.zeros(3)}, {}, cfg)
    x = np.zeros((2, 3, 4, 4))
    x[1, 2, 3, 3] = np.inf
    with pytest.raises(ValueError, match="x: expected finite values, got 1 NaN/Inf"):
        SPEC.forward({"x": x}, {}, {}, cfg)
    _, cache = SPEC.forward({"x": np.zeros((2, 3, 4, 4))}, {}, {}, cfg)
    with pytest.raises(ValueError, match="dout"):
        SPEC.backward({"out": np.zeros((2, 4))}, cache)
    with pytest.raises(ValueError, match="douts: gap differentiates only 'out'"):
        SPEC.backward({"out": np.zeros((2, 3)), "aux.x": np.zeros(1)}, cache)
