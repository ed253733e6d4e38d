"""conv1x1 block: gradient checks over every option that changes the math,
backends and dtypes, properties, PyTorch parity, identities, validation."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks.conv1x1 import Conv1x1Config
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import config_from_dict, config_to_dict, to_namespace
from refattn.blocks.specs.conv1x1 import SPECS
from refattn.ops.linear import linear_backward, linear_forward

SPEC = SPECS["conv1x1"]
PARITY_RTOL = 1e-11

# (id, config overrides, input channels): every option that changes the math
CASES = [
    ("default", {}, 4),
    ("stride2_odd", {"stride": 2}, 4),
    ("stride_pair", {"stride": (2, 3)}, 4),
    ("padding1", {"padding": 1}, 4),
    ("padding_pair_stride2", {"padding": (2, 1), "stride": 2}, 4),
    ("groups2", {"groups": 2}, 4),
    ("groups_depthwise", {"groups": 4, "out_channels": 8}, 4),
    ("no_bias", {"bias": False}, 4),
    ("all", {"stride": (3, 2), "padding": 1, "groups": 3, "bias": False}, 6),
]
CASE_IDS = [c[0] for c in CASES]


def case(
    overrides: dict, c: int, hw: tuple[int, int] = (5, 7), n: int = 2, seed: int = 0
):
    cfg = SPEC.config(**overrides)
    shapes = {"x": (n, c) + hw}
    inputs, params, state = draw_case(SPEC, cfg, shapes, seed=seed)
    return cfg, inputs, params, state


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize(("name", "overrides", "c"), CASES, ids=CASE_IDS)
def test_gradcheck_full_tiny(name, overrides, c):
    cfg, inputs, params, state = case(overrides, c, hw=(3, 4), n=1)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


@pytest.mark.parametrize(("name", "overrides", "c"), CASES, ids=CASE_IDS)
def test_gradcheck_fast_fixture(name, overrides, c):
    cfg = SPEC.config(**overrides)
    inputs, params, state = draw_case(SPEC, cfg, seed=3)
    assert inputs["x"].shape == SPEC.fixture_shapes(cfg)["x"]
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


def test_gradcheck_on_strict_backend(xb):
    cfg, inputs, params, state = case({"stride": 2, "padding": 1, "groups": 2}, 4)
    report = gradcheck_block(
        SPEC,
        cfg,
        to_namespace(inputs, xb.xp, xb.device),
        to_namespace(params, xb.xp, xb.device),
        state,
        mode="fast",
    )
    assert report.ok, report.to_text()


def test_planted_bug_fails_gradcheck():
    """A backward that forgets the stride's zero gaps must not pass."""
    cfg, inputs, params, state = case({"stride": 2}, 4, hw=(3, 3), n=1)

    def wrong_backward(douts, cache):
        dinputs, dparams = SPEC.backward(douts, cache)
        return {"x": dinputs["x"] + 1e-3}, dparams

    bad = dataclasses.replace(SPEC, backward=wrong_backward)
    report = gradcheck_block(bad, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    assert "input.x" in report.failed


# ---------------------------------------------------------------------------
# backends and dtypes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_runs_on_backend_device_and_keeps_dtype(xb, dtype):
    cfg, inputs, params, _ = case({"stride": 2, "padding": 1, "groups": 2}, 4)
    x = to_namespace(inputs, xb.xp, xb.device, dtype)
    p = to_namespace(params, xb.xp, xb.device, dtype)
    dout_host = np.random.default_rng(1).standard_normal((2, 6, 4, 5))
    dout = xb.asarray(dout_host.astype(dtype))
    outputs, dinputs, dparams = run_block(SPEC, cfg, x, p, {}, dout)
    for arr in [outputs["out"], dinputs["x"], *dparams.values()]:
        assert backend.dtype_name(arr) == dtype
        assert backend.device(arr) == xb.device
    ref_out, ref_dx, ref_dp = run_block(SPEC, cfg, inputs, params, {}, dout_host)
    tol = 1e-12 if dtype == "float64" else 2e-6
    assert rel_err(xb.to_host(outputs["out"]), ref_out["out"]) < tol
    assert rel_err(xb.to_host(dinputs["x"]), ref_dx["x"]) < tol
    for k in ref_dp:
        assert rel_err(xb.to_host(dparams[k]), ref_dp[k]) < tol


# ---------------------------------------------------------------------------
# properties


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cfg = Conv1x1Config(
        out_channels=groups * draw(st.integers(1, 3)),
        stride=draw(st.sampled_from([1, 2, (1, 2), (3, 1)])),
        padding=draw(st.sampled_from([0, 1, (0, 2)])),
        groups=groups,
        bias=draw(st.booleans()),
    )
    shape = (
        draw(st.integers(1, 3)),
        groups * draw(st.integers(1, 3)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
    )
    return cfg, shape, draw(st.integers(0, 2**31 - 1))


@given(conv_cases())
def test_backward_is_linear_in_dout_and_keyed_like_params(c):
    cfg, shape, seed = c
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    before = copy.deepcopy((inputs, params))
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    rng = np.random.default_rng(seed)
    d1 = rng.standard_normal(outputs["out"].shape)
    d2 = rng.standard_normal(outputs["out"].shape)
    d1_copy = d1.copy()
    g1 = SPEC.backward({"out": d1}, cache)
    g2 = SPEC.backward({"out": d2}, cache)
    g12 = SPEC.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    for part in (0, 1):
        assert g12[part].keys() == g1[part].keys()
        for k in g12[part]:
            expect = 2.0 * g1[part][k] - 3.0 * g2[part][k]
            assert rel_err(g12[part][k], expect) < 1e-12
    assert g1[0].keys() == inputs.keys()
    assert g1[1].keys() == params.keys()
    assert all(g1[0][k].shape == inputs[k].shape for k in inputs)
    assert all(g1[1][k].shape == params[k].shape for k in params)
    # nothing mutated: inputs, params, the cotangent
    assert np.array_equal(d1, d1_copy)
    for a, b in zip(before, (inputs, params)):
        assert all(np.array_equal(a[k], b[k]) for k in a)


@given(conv_cases())
def test_output_shape_matches_the_pytorch_formula(c):
    cfg, shape, seed = c
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    out = SPEC.forward(inputs, params, state, cfg)[0]["out"]
    sh, sw = backend.as_tuple("stride", cfg.stride, 2)
    ph, pw = backend.as_tuple("padding", cfg.padding, 2)
    ho = (shape[2] + 2 * ph - 1) // sh + 1
    wo = (shape[3] + 2 * pw - 1) // sw + 1
    assert out.shape == (shape[0], cfg.out_channels, ho, wo)


# ---------------------------------------------------------------------------
# identities


def test_equals_a_linear_layer_at_every_position():
    cfg, inputs, params, state = case({"out_channels": 5}, 4)
    x = inputs["x"]
    rng = np.random.default_rng(7)
    dout = rng.standard_normal((2, 5, 5, 7))
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    w2 = params["weight"][:, :, 0, 0]  # (O, C)
    x_nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # (N, H, W, C)
    y, lin = linear_forward(x_nhwc, w2, params["bias"])  # (N, H, W, O)
    dx, dw, db = linear_backward(np.ascontiguousarray(np.moveaxis(dout, 1, -1)), lin)
    assert rel_err(outputs["out"], np.moveaxis(y, -1, 1)) < 1e-13
    assert rel_err(dinputs["x"], np.moveaxis(dx, -1, 1)) < 1e-13
    assert rel_err(dparams["weight"][:, :, 0, 0], dw) < 1e-13
    assert rel_err(dparams["bias"], db) < 1e-13


def test_stride_skips_positions_and_gives_them_zero_gradient():
    cfg, inputs, params, state = case({"stride": 2}, 4)  # x (2, 4, 5, 7)
    dout = np.random.default_rng(2).standard_normal((2, 6, 3, 4))
    outputs, dinputs, _ = run_block(SPEC, cfg, inputs, params, state, dout)
    dx = dinputs["x"]
    assert np.all(dx[:, :, 1::2, :] == 0.0)
    assert np.all(dx[:, :, :, 1::2] == 0.0)
    assert np.all(dx[:, :, ::2, ::2] != 0.0)
    # the kept positions are exactly the even ones, ends included (5 -> 3, 7 -> 4)
    cfg1 = SPEC.config()
    sub = {"x": np.ascontiguousarray(inputs["x"][:, :, ::2, ::2])}
    out1 = SPEC.forward(sub, params, state, cfg1)[0]["out"]
    assert rel_err(outputs["out"], out1) < 1e-15


def test_padding_border_outputs_equal_the_bias():
    cfg, inputs, params, state = case({"padding": (2, 1)}, 4)  # x (2, 4, 5, 7)
    out = SPEC.forward(inputs, params, state, cfg)[0]["out"]
    assert out.shape == (2, 6, 9, 9)
    bias = params["bias"][None, :, None]
    for border in (out[:, :, :2, :], out[:, :, -2:, :]):
        assert np.array_equal(border, np.broadcast_to(bias[..., None], border.shape))
    for border in (out[:, :, :, :1], out[:, :, :, -1:]):
        assert np.array_equal(border, np.broadcast_to(bias[..., None], border.shape))
    inner = SPEC.forward(inputs, params, state, SPEC.config())[0]["out"]
    assert rel_err(out[:, :, 2:-2, 1:-1], inner) < 1e-15


def test_groups_mix_only_within_their_block():
    cfg, inputs, params, state = case({"groups": 2}, 4)  # 2 in / 3 out per group
    x = inputs["x"].copy()
    out = SPEC.forward(inputs, params, state, cfg)[0]["out"]
    x[:, 2:] += 1.0  # change only the second input block
    out2 = SPEC.forward({"x": x}, params, state, cfg)[0]["out"]
    assert np.array_equal(out[:, :3], out2[:, :3])
    assert not np.allclose(out[:, 3:], out2[:, 3:])


# ---------------------------------------------------------------------------
# PyTorch parity


@pytest.mark.parametrize(("name", "overrides", "c"), CASES, ids=CASE_IDS)
def test_matches_pytorch_conv2d(torch, name, overrides, c):
    from anchors.simple import make_conv1x1, run_torch

    cfg, inputs, params, state = case(overrides, c)
    shapes = {"x": inputs["x"].shape}
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    dout = np.random.default_rng(5).standard_normal(outputs["out"].shape)
    dinputs, dparams = SPEC.backward({"out": dout}, cache)
    module = make_conv1x1(config_to_dict(cfg) | {"in_channels": c})
    names = SPEC.anchor_names(None, cfg, shapes)
    t_out, t_dx, t_dp = run_torch(module, names, inputs["x"], params, dout)
    assert rel_err(outputs["out"], t_out) < PARITY_RTOL
    assert rel_err(dinputs["x"], t_dx) < PARITY_RTOL
    for k in params:
        assert rel_err(dparams[k], t_dp[k]) < PARITY_RTOL, k


# ---------------------------------------------------------------------------
# contract details


def test_param_shapes_and_init():
    cfg = SPEC.config(groups=2, out_channels=4)
    shapes = SPEC.param_shapes(cfg, {"x": (2, 6, 3, 3)})
    assert shapes == {"weight": (4, 3, 1, 1), "bias": (4,)}
    params, state = SPEC.init_params(cfg, {"x": (2, 6, 3, 3)}, seed=0)
    assert state == {} and {k: v.shape for k, v in params.items()} == shapes
    again, _ = SPEC.init_params(cfg, {"x": (2, 6, 3, 3)}, seed=0)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    torch_like, _ = SPEC.init_params(cfg, {"x": (2, 6, 3, 3)}, seed=0, anchor_init=True)
    bound = 1 / np.sqrt(3)  # fan_in = C/G = 3
    assert all(np.max(np.abs(v)) <= bound for v in torch_like.values())
    assert SPEC.anchor_names(None, cfg, {"x": (2, 6, 3, 3)}) == {
        "weight": "weight",
        "bias": "bias",
    }
    assert SPEC.with_bn_mode(cfg, "train") is None
    assert SPEC.presets == {} and SPEC.config() == Conv1x1Config()


def test_config_round_trips_through_json_dicts():
    cfg = SPEC.config(stride=[2, 1], padding=(0, 1))
    assert cfg.stride == (2, 1)
    again = config_from_dict(Conv1x1Config, config_to_dict(cfg))
    assert again == cfg
    assert hash(again) == hash(cfg)


def test_accumulation_lengths():
    cfg = SPEC.config(groups=2, out_channels=6, stride=2)
    acc = SPEC.accumulation(cfg, {"x": (2, 4, 5, 7)})
    assert acc == {"out": 2 + 1, "grad.input": 3, "grad.param": 2 * 3 * 4}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"out_channels": 6, "groups": 4},
            r"out_channels \(6\) must be divisible by groups \(4\)",
        ),
        ({"out_channels": 0}, "out_channels: expected an int >= 1, got 0"),
        ({"stride": 0}, "stride: expected values >= 1"),
        ({"stride": (1, 2, 3)}, "stride: expected an int or 2 ints"),
        ({"padding": -1}, "padding: expected values >= 0"),
        ({"groups": 0}, "groups: expected an int >= 1, got 0"),
    ],
)
def test_bad_configs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        SPEC.config(**overrides)


@pytest.mark.parametrize(
    "overrides", [{"bias": 1}, {"out_channels": 2.0}, {"groups": True}]
)
def test_mistyped_configs_raise_type_error(overrides):
    with pytest.raises(TypeError):
        SPEC.config(**overrides)


def test_bad_arrays_raise():
    cfg, inputs, params, state = case({"groups": 2}, 4)
    fwd = SPEC.forward
    rule = r"C = x.shape\[1\] \(5\) must be divisible by groups \(2\)"
    with pytest.raises(ValueError, match=rule):
        fwd({"x": np.zeros((2, 5, 3, 3))}, params, state, cfg)
    with pytest.raises(ValueError, match="missing key\\(s\\) 'bias'"):
        fwd(inputs, {"weight": params["weight"]}, state, cfg)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) 'bias'"):
        fwd(inputs, params, state, dataclasses.replace(cfg, bias=False))
    shape_rule = r"weight: expected shape \(6, 2, 1, 1\)"
    with pytest.raises(ValueError, match=shape_rule):
        fwd(inputs, params | {"weight": np.zeros((6, 4, 1, 1))}, state, cfg)
    with pytest.raises(TypeError, match="dtype"):
        fwd(inputs, params | {"bias": params["bias"].astype(np.float32)}, state, cfg)
    bad = params["weight"].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"weight: expected finite values"):
        fwd(inputs, params | {"weight": bad}, state, cfg)
    with pytest.raises(ValueError, match="inputs: conv1x1 takes"):
        fwd({"y": inputs["x"]}, params, state, cfg)
    with pytest.raises(ValueError, match="x: expected a 4-D array"):
        fwd({"x": inputs["x"][0]}, params, state, cfg)
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64"):
        fwd({"x": inputs["x"].astype(np.int64)}, params, state, cfg)
    with pytest.raises(ValueError, match=r"state: unexpected key\(s\) 'running_mean'"):
        fwd(inputs, params, {"running_mean": np.zeros(6)}, cfg)
    _, cache = fwd(inputs, params, state, cfg)
    with pytest.raises(ValueError, match=r"douts\['out'\]: expected shape \(2, 6, 5, 7\)"):
        SPEC.backward({"out": np.zeros((2, 6, 1, 1))}, cache)
    with pytest.raises(ValueError, match="douts: conv1x1 backward needs"):
        SPEC.backward({}, cache)
