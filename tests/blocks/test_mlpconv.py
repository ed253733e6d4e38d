"""mlpconv and nin_head blocks: gradient checks of the presets and of every
option that changes the math, ReLU margins, backends and dtypes, properties,
PyTorch parity (and the NIN head without its last ReLU), identities,
validation."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks.mlpconv import NIN_CIFAR_HEAD, MlpconvConfig, NinHeadConfig
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import (
    MIN_MARGIN,
    config_from_dict,
    config_to_dict,
    to_namespace,
)
from refattn.blocks.specs.conv1x1 import SPECS as CONV1X1_SPECS
from refattn.blocks.specs.mlpconv import SPECS
from refattn.ops.elementwise import relu_backward, relu_forward

MLPCONV = SPECS["mlpconv"]
NIN_HEAD = SPECS["nin_head"]
PARITY_RTOL = 1e-11

# (id, block, preset, overrides, x shape): tiny cases for full gradchecks and
# parity; one per option that changes the math, for both blocks
SMALL = {"channels": (6, 5, 4), "kernel_size": 3, "padding": 1}
CASES = [
    (
        "mlp_nin_cifar_1_channels_cut",
        "mlpconv",
        "nin_cifar_1",
        {"channels": (6, 5, 4)},
        (1, 3, 4, 4),
    ),
    (
        "mlp_relu_last_false",
        "mlpconv",
        None,
        SMALL | {"relu_last": False},
        (2, 3, 4, 5),
    ),
    ("mlp_no_bias", "mlpconv", None, SMALL | {"bias": False}, (2, 3, 4, 5)),
    ("mlp_groups2", "mlpconv", None, SMALL | {"groups": 2}, (2, 4, 4, 5)),
    ("mlp_stride2_odd", "mlpconv", None, SMALL | {"stride": 2}, (2, 3, 5, 7)),
    (
        "mlp_dilation2",
        "mlpconv",
        None,
        SMALL | {"dilation": 2, "padding": 2},
        (2, 3, 5, 4),
    ),
    (
        "mlp_nonsquare",
        "mlpconv",
        None,
        SMALL | {"kernel_size": (3, 1), "padding": (1, 0), "stride": (1, 2)},
        (2, 3, 4, 5),
    ),
    (
        "mlp_single_conv",
        "mlpconv",
        None,
        {"channels": (5,), "kernel_size": 3},
        (2, 3, 4, 5),
    ),
    (
        "mlp_two_convs_1x1",
        "mlpconv",
        None,
        {"channels": (4, 3), "kernel_size": 1},
        (2, 3, 4, 5),
    ),
    (
        "head_nin_cifar_head_channels_cut",
        "nin_head",
        "nin_cifar_head",
        {"channels": (6, 5, 4)},
        (2, 5, 4, 4),
    ),
    (
        "head_relu_last_false",
        "nin_head",
        "nin_cifar_head",
        {"channels": (6, 5, 4), "relu_last": False},
        (2, 5, 4, 4),
    ),
    (
        "head_no_bias_groups",
        "nin_head",
        None,
        SMALL | {"bias": False, "groups": 3},
        (2, 6, 4, 5),
    ),
    ("head_stride2", "nin_head", None, SMALL | {"stride": 2}, (2, 3, 5, 5)),
]
CASE_IDS = [c[0] for c in CASES]
PRESETS = [("mlpconv", "nin_cifar_1"), ("nin_head", "nin_cifar_head")]


def preset_config(spec, preset):
    """A named preset, or the CIFAR-10 NIN head (a documented config, too large
    to be a preset of the committed fixture set)."""
    return NIN_CIFAR_HEAD if preset == "nin_cifar_head" else spec.config(preset)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e)), 1e-300))


def clear_case(spec, cfg, shapes=None, seed: int = 0):
    """draw_case, redrawn with the next seeds until every ReLU input keeps
    MIN_MARGIN from its kink."""
    for s in range(seed, seed + 50):
        inputs, params, state = draw_case(spec, cfg, shapes, seed=s)
        _, cache = spec.forward(inputs, params, state, cfg)
        if spec.kink_margin(cache) >= MIN_MARGIN:
            return inputs, params, state
    raise AssertionError(f"no draw kept MIN_MARGIN for {cfg}")


def small_case(block, preset, overrides, shape, seed=0):
    """A preset with overrides, or (preset None) the config class's defaults."""
    spec = SPECS[block]
    if preset:
        cfg = dataclasses.replace(preset_config(spec, preset), **overrides)
    else:
        cfg = spec.config_cls(**overrides)
    return (spec, cfg) + clear_case(spec, cfg, {"x": shape}, seed)


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize(
    ("name", "block", "preset", "overrides", "shape"), CASES, ids=CASE_IDS
)
def test_gradcheck_full_tiny(name, block, preset, overrides, shape):
    spec, cfg, inputs, params, state = small_case(block, preset, overrides, shape)
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


@pytest.mark.parametrize(("block", "preset"), PRESETS)
def test_preset_gradcheck_fast_at_fixture_shape(block, preset):
    spec = SPECS[block]
    cfg = preset_config(spec, preset)
    inputs, params, state = clear_case(spec, cfg, seed=10)
    report = gradcheck_block(
        spec, cfg, inputs, params, state, mode="fast", n_directions=3, n_coords=4
    )
    assert report.ok, report.to_text()


@pytest.mark.parametrize(("block", "preset"), PRESETS)
def test_preset_gradcheck_full_on_input_and_biases(block, preset):
    """Every element of x and of each bias, at the preset's real widths."""
    spec = SPECS[block]
    cfg = preset_config(spec, preset)
    c = spec.fixture_shapes(cfg)["x"][1]
    inputs, params, state = clear_case(spec, cfg, {"x": (1, c, 3, 3)})
    wrt = ["input.x"] + [f"param.{k}" for k in params if k.endswith("bias")]
    if block == "nin_head":
        wrt = wrt[2:]  # x (1728) and convs.0.bias: covered by the fast check
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="full", wrt=wrt)
    assert report.ok, report.to_text()


@pytest.mark.parametrize("block", ["mlpconv", "nin_head"])
def test_gradcheck_on_backends(xb, block):
    spec, cfg, inputs, params, state = small_case(
        block, None, SMALL | {"groups": 2, "stride": 2}, (2, 4, 5, 5)
    )
    report = gradcheck_block(
        spec,
        cfg,
        to_namespace(inputs, xb.xp, xb.device),
        to_namespace(params, xb.xp, xb.device),
        state,
    )
    assert report.ok, report.to_text()


def test_planted_bug_fails_gradcheck():
    """A backward that lets gradient through the last ReLU's dead units fails."""
    spec, cfg, inputs, params, state = small_case("nin_head", None, SMALL, (1, 3, 3, 3))

    def wrong_backward(douts, cache):
        stack = cache.stack
        relus = stack.relus[:-1] + (None,)
        return spec.backward(douts, cache._replace(stack=stack._replace(relus=relus)))

    bad = dataclasses.replace(spec, backward=wrong_backward)
    report = gradcheck_block(bad, cfg, inputs, params, state, mode="fast")
    assert not report.ok


# ---------------------------------------------------------------------------
# ReLU margins


def test_kink_margin_is_the_smallest_relative_relu_input(torch):
    """Against pre-activations computed independently by the PyTorch anchor."""
    from anchors.simple import make_mlpconv

    for relu_last in (True, False):
        spec, cfg, inputs, params, state = small_case(
            "mlpconv", None, SMALL | {"relu_last": relu_last}, (2, 3, 4, 5)
        )
        _, cache = spec.forward(inputs, params, state, cfg)
        module = make_mlpconv(config_to_dict(cfg) | {"in_channels": 3}).double()
        names = spec.anchor_names(None, cfg, {"x": inputs["x"].shape})
        module.load_state_dict(
            {names[k]: torch.from_numpy(v) for k, v in params.items()}
        )
        h = torch.from_numpy(inputs["x"])
        margins = []
        with torch.no_grad():
            for layer in module:
                if isinstance(layer, torch.nn.ReLU):
                    z = h.numpy()
                    margins.append(np.min(np.abs(z)) / np.sqrt(np.mean(z * z)))
                h = layer(h)
        assert len(margins) == (3 if relu_last else 2)
        assert spec.kink_margin(cache) == pytest.approx(min(margins), rel=1e-9)


@pytest.mark.parametrize("block", ["mlpconv", "nin_head"])
def test_kink_margin_runs_on_backends(xb, block):
    spec, cfg, inputs, params, state = small_case(block, None, SMALL, (2, 3, 4, 5))
    host = spec.kink_margin(spec.forward(inputs, params, state, cfg)[1])
    _, cache = spec.forward(
        to_namespace(inputs, xb.xp, xb.device),
        to_namespace(params, xb.xp, xb.device),
        {},
        cfg,
    )
    assert spec.kink_margin(cache) == pytest.approx(host, rel=1e-12)


def test_kink_margin_is_zero_at_a_kink():
    spec, cfg, inputs, params, state = small_case("mlpconv", None, SMALL, (1, 3, 3, 3))
    params = dict(params)
    params["convs.0.weight"] = np.zeros_like(params["convs.0.weight"])
    params["convs.0.bias"] = np.r_[0.0, np.ones(5)]  # channel 0 sits at the kink
    _, cache = spec.forward(inputs, params, state, cfg)
    assert spec.kink_margin(cache) == 0.0


# ---------------------------------------------------------------------------
# backends and dtypes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("block", ["mlpconv", "nin_head"])
def test_runs_on_backend_device_and_keeps_dtype(xb, block, dtype):
    spec, cfg, inputs, params, state = small_case(
        block, None, SMALL | {"groups": 3, "dilation": 2, "padding": 2}, (2, 3, 5, 6)
    )
    host_out = spec.forward(inputs, params, state, cfg)[0]
    dout_host = np.random.default_rng(1).standard_normal(host_out["out"].shape)
    outputs, dinputs, dparams = run_block(
        spec,
        cfg,
        to_namespace(inputs, xb.xp, xb.device, dtype),
        to_namespace(params, xb.xp, xb.device, dtype),
        {},
        xb.asarray(dout_host.astype(dtype)),
    )
    _, ref_dx, ref_dp = run_block(spec, cfg, inputs, params, {}, dout_host)
    tol = 1e-12 if dtype == "float64" else 2e-5
    assert outputs.keys() == host_out.keys()
    for k in outputs:
        assert backend.dtype_name(outputs[k]) == dtype
        assert backend.device(outputs[k]) == xb.device
        assert rel_err(xb.to_host(outputs[k]), host_out[k]) < tol
    for got, want in [(dinputs["x"], ref_dx["x"])] + [
        (dparams[k], ref_dp[k]) for k in ref_dp
    ]:
        assert backend.dtype_name(got) == dtype
        assert backend.device(got) == xb.device
        assert rel_err(xb.to_host(got), want) < tol


# ---------------------------------------------------------------------------
# properties


@st.composite
def stack_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    k = draw(st.integers(1, 3))
    d = draw(st.integers(1, 2))
    p = draw(st.integers(0, 1))
    n_convs = draw(st.integers(1, 3))
    channels = (groups * draw(st.integers(1, 3)),) + tuple(
        draw(st.integers(1, 4)) for _ in range(n_convs - 1)
    )
    cls = draw(st.sampled_from([MlpconvConfig, NinHeadConfig]))
    cfg = cls(
        channels=channels,
        kernel_size=k,
        stride=draw(st.integers(1, 2)),
        padding=p,
        dilation=d,
        groups=groups,
        relu_last=draw(st.booleans()),
        bias=draw(st.booleans()),
    )
    least = max(1, d * (k - 1) + 1 - 2 * p)
    shape = (
        draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 2)),
        draw(st.integers(least, least + 3)),
        draw(st.integers(least, least + 3)),
    )
    return cfg, shape, draw(st.integers(0, 2**31 - 1))


@given(stack_cases())
def test_backward_is_linear_in_dout_keyed_like_params_and_pure(c):
    cfg, shape, seed = c
    spec = NIN_HEAD if isinstance(cfg, NinHeadConfig) else MLPCONV
    inputs, params, state = draw_case(spec, cfg, {"x": shape}, seed=seed)
    before = copy.deepcopy((inputs, params))
    outputs, cache = spec.forward(inputs, params, state, cfg)
    rng = np.random.default_rng(seed)
    d1, d2 = (rng.standard_normal(outputs["out"].shape) for _ in range(2))
    d1_copy = d1.copy()
    g1 = spec.backward({"out": d1}, cache)
    g2 = spec.backward({"out": d2}, cache)
    g12 = spec.backward({"out": -1.5 * d1 + 0.25 * d2}, cache)
    assert list(g1[0]) == ["x"] and list(g1[1]) == list(params)
    assert g1[0]["x"].shape == shape
    assert all(g1[1][k].shape == params[k].shape for k in params)
    for part in (0, 1):
        for k in g12[part]:
            expect = -1.5 * g1[part][k] + 0.25 * g2[part][k]
            scale = max(np.max(np.abs(g1[part][k])), np.max(np.abs(g2[part][k])), 1.0)
            assert np.max(np.abs(g12[part][k] - expect)) <= 1e-12 * scale
    assert np.array_equal(d1, d1_copy)
    for a, b in zip(before, (inputs, params)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    if isinstance(cfg, NinHeadConfig):
        assert outputs["out"].shape == shape[:1] + cfg.channels[-1:]
        assert outputs["aux.class_maps"].shape[:2] == shape[:1] + cfg.channels[-1:]


# ---------------------------------------------------------------------------
# identities


def test_one_1x1_conv_equals_conv1x1_then_relu():
    spec, cfg, inputs, params, state = small_case(
        "mlpconv", None, {"channels": (5,), "kernel_size": 1}, (2, 3, 4, 5)
    )
    conv = CONV1X1_SPECS["conv1x1"]
    ccfg = conv.config(out_channels=5)
    cparams = {"weight": params["convs.0.weight"], "bias": params["convs.0.bias"]}
    dout = np.random.default_rng(2).standard_normal((2, 5, 4, 5))
    out, dx, dp = run_block(spec, cfg, inputs, params, state, dout)
    z, ccache = conv.forward(inputs, cparams, {}, ccfg)
    y, rcache = relu_forward(z["out"])
    cdx, cdp = conv.backward({"out": relu_backward(dout, rcache)}, ccache)
    assert np.array_equal(out["out"], y)
    assert np.array_equal(dx["x"], cdx["x"])
    assert np.array_equal(dp["convs.0.weight"], cdp["weight"])
    assert np.array_equal(dp["convs.0.bias"], cdp["bias"])


def test_nin_head_pools_the_mlpconv_class_maps():
    spec, cfg, inputs, params, state = small_case(
        "nin_head", None, SMALL | {"stride": 2}, (2, 3, 5, 5)
    )
    out = spec.forward(inputs, params, state, cfg)[0]
    as_mlpconv = MlpconvConfig(**dataclasses.asdict(cfg))
    maps = MLPCONV.forward(inputs, params, state, as_mlpconv)[0]["out"]
    assert np.array_equal(out["aux.class_maps"], maps)
    assert rel_err(out["out"], maps.mean(axis=(2, 3))) < 1e-15
    assert np.all(out["out"] >= 0)  # relu_last: pooled logits are >= 0


# ---------------------------------------------------------------------------
# PyTorch parity


def _parity(torch, spec, cfg, inputs, params, state, factory) -> dict[str, float]:
    """Relative errors of out, dx and every param gradient vs the anchor."""
    from anchors.simple import run_torch

    x = inputs["x"]
    outputs, cache = spec.forward(inputs, params, state, cfg)
    dout = np.random.default_rng(5).standard_normal(outputs["out"].shape)
    dinputs, dparams = spec.backward({"out": dout}, cache)
    module = factory(config_to_dict(cfg) | {"in_channels": x.shape[1]})
    names = spec.anchor_names(None, cfg, {"x": x.shape})
    t_out, t_dx, t_dp = run_torch(module, names, x, params, dout)
    errs = {"out": rel_err(outputs["out"], t_out), "x": rel_err(dinputs["x"], t_dx)}
    errs |= {k: rel_err(dparams[k], t_dp[k]) for k in params}
    return errs


def _factory(block):
    from anchors.simple import make_mlpconv, make_nin_head

    return make_mlpconv if block == "mlpconv" else make_nin_head


@pytest.mark.parametrize(
    ("name", "block", "preset", "overrides", "shape"), CASES, ids=CASE_IDS
)
def test_matches_pytorch_sequential(torch, name, block, preset, overrides, shape):
    spec, cfg, inputs, params, state = small_case(block, preset, overrides, shape)
    errs = _parity(torch, spec, cfg, inputs, params, state, _factory(block))
    assert max(errs.values()) < PARITY_RTOL, errs


@pytest.mark.parametrize(("block", "preset"), PRESETS)
def test_preset_matches_pytorch_at_fixture_shape(torch, block, preset):
    spec = SPECS[block]
    cfg = preset_config(spec, preset)
    inputs, params, state = clear_case(spec, cfg, seed=10)
    errs = _parity(torch, spec, cfg, inputs, params, state, _factory(block))
    assert max(errs.values()) < PARITY_RTOL, errs


def test_nin_head_without_last_relu_disagrees(torch):
    """The common re-implementation drops the ReLU after the class conv: on the
    preset (relu_last=True) its logits are wrong; it computes relu_last=False."""
    from anchors.simple import make_nin_head_no_last_relu

    cfg = NIN_CIFAR_HEAD
    inputs, params, state = clear_case(NIN_HEAD, cfg, seed=10)
    maps = NIN_HEAD.forward(inputs, params, state, cfg)[0]["aux.class_maps"]
    assert np.any(maps == 0.0)  # some class pre-activations were negative
    errs = _parity(
        torch, NIN_HEAD, cfg, inputs, params, state, make_nin_head_no_last_relu
    )
    assert errs["out"] > 1e-2 and errs["x"] > 1e-2, errs
    fixed = dataclasses.replace(cfg, relu_last=False)
    errs = _parity(
        torch, NIN_HEAD, fixed, inputs, params, state, make_nin_head_no_last_relu
    )
    assert max(errs.values()) < PARITY_RTOL, errs


# ---------------------------------------------------------------------------
# presets and contract details


def test_presets_are_complete_and_as_documented():
    p = MLPCONV.presets["nin_cifar_1"]
    assert config_to_dict(p) == {
        "channels": [192, 160, 96],
        "kernel_size": 5,
        "stride": 1,
        "padding": 2,
        "dilation": 1,
        "groups": 1,
        "relu_last": True,
        "bias": True,
    }
    shapes = MLPCONV.param_shapes(p, MLPCONV.fixture_shapes(p))
    assert MLPCONV.fixture_shapes(p) == {"x": (2, 3, 8, 8)}
    assert shapes == {
        "convs.0.weight": (192, 3, 5, 5),
        "convs.0.bias": (192,),
        "convs.1.weight": (160, 192, 1, 1),
        "convs.1.bias": (160,),
        "convs.2.weight": (96, 160, 1, 1),
        "convs.2.bias": (96,),
    }
    h = NIN_CIFAR_HEAD
    assert isinstance(h, NinHeadConfig)
    assert config_to_dict(h) == {
        "channels": [192, 192, 10],
        "kernel_size": 3,
        "stride": 1,
        "padding": 1,
        "dilation": 1,
        "groups": 1,
        "relu_last": True,
        "bias": True,
    }
    assert NIN_HEAD.fixture_shapes(h) == {"x": (2, 192, 8, 8)}
    assert NIN_HEAD.param_shapes(h, {"x": (2, 192, 8, 8)})["convs.0.weight"] == (
        192,
        192,
        3,
        3,
    )
    assert MLPCONV.config() == p
    assert NIN_HEAD.presets == {}  # the CIFAR head is a documented config, not a preset
    assert NIN_HEAD.config() == NinHeadConfig()
    assert config_to_dict(NinHeadConfig())["channels"] == [16, 16, 10]
    assert NIN_HEAD.fixture_shapes(NinHeadConfig()) == {"x": (2, 8, 6, 6)}
    assert config_from_dict(NinHeadConfig, config_to_dict(h)) == h


def test_anchor_names_follow_the_sequential_indices():
    cfg = MLPCONV.config("nin_cifar_1")
    names = MLPCONV.anchor_names("nin_cifar_1", cfg, {"x": (2, 3, 8, 8)})
    assert names == {
        "convs.0.weight": "0.weight",
        "convs.0.bias": "0.bias",
        "convs.1.weight": "2.weight",
        "convs.1.bias": "2.bias",
        "convs.2.weight": "4.weight",
        "convs.2.bias": "4.bias",
    }
    no_bias = dataclasses.replace(cfg, bias=False)
    assert list(MLPCONV.anchor_names(None, no_bias, {"x": (2, 3, 8, 8)}).values()) == [
        "0.weight",
        "2.weight",
        "4.weight",
    ]


def test_init_params_and_accumulation():
    cfg = MLPCONV.config(None, channels=(4, 3), kernel_size=3, groups=2, padding=1)
    shapes = {"x": (2, 6, 5, 5)}
    params, state = MLPCONV.init_params(cfg, shapes, seed=3)
    assert state == {}
    assert {k: v.shape for k, v in params.items()} == MLPCONV.param_shapes(cfg, shapes)
    torch_like, _ = MLPCONV.init_params(cfg, shapes, seed=3, anchor_init=True)
    assert np.max(np.abs(torch_like["convs.0.weight"])) <= 1 / np.sqrt(3 * 9)
    assert np.max(np.abs(torch_like["convs.1.bias"])) <= 1 / np.sqrt(4)
    assert MLPCONV.accumulation(cfg, shapes) == {
        "out": 27 + 1 + 4 + 1,
        "grad.input": 3 + 2 * 9,
        "grad.param": 3 + 2 * 25,
    }
    head = NIN_HEAD.accumulation(NinHeadConfig(**dataclasses.asdict(cfg)), shapes)
    assert head == {"out": 33 + 25, "aux": 33, "grad.input": 22, "grad.param": 54}
    assert MLPCONV.with_bn_mode(cfg, "train") is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"channels": ()}, ValueError, "channels: expected a non-empty tuple"),
        (
            {"channels": (4, 0)},
            ValueError,
            r"channels\[1\]: expected an int >= 1, got 0",
        ),
        (
            {"channels": (5, 3), "groups": 2},
            ValueError,
            r"channels\[0\] \(5\) must be divisible by groups \(2\)",
        ),
        ({"kernel_size": 0}, ValueError, "kernel_size: expected values >= 1"),
        ({"stride": (1, 0)}, ValueError, "stride: expected values >= 1"),
        ({"padding": -2}, ValueError, "padding: expected values >= 0"),
        ({"dilation": 0}, ValueError, "dilation: expected values >= 1"),
        ({"relu_last": "yes"}, TypeError, "relu_last: expected True or False"),
        ({"bias": None}, TypeError, "bias: expected True or False"),
        ({"channels": 5}, ValueError, "channels: expected a non-empty tuple"),
    ],
)
def test_bad_configs_raise(kwargs, error, message):
    base = {"channels": (4, 3), "kernel_size": 3}
    with pytest.raises(error, match=message):
        SPECS["mlpconv"].check_config(MlpconvConfig(**(base | kwargs)))


def test_list_channels_are_stored_as_a_tuple():
    cfg = SPECS["mlpconv"].config(channels=[4, 3], kernel_size=[3, 1])
    assert cfg.channels == (4, 3) and cfg.kernel_size == (3, 1)
    hash(cfg)


def test_bad_arrays_raise():
    spec, cfg, inputs, params, state = small_case(
        "nin_head", None, SMALL | {"groups": 2}, (2, 4, 4, 5)
    )
    fwd = spec.forward
    rule = r"C = x.shape\[1\] \(3\) must be divisible by groups \(2\)"
    with pytest.raises(ValueError, match=rule):
        fwd({"x": np.zeros((2, 3, 4, 5))}, params, state, cfg)
    with pytest.raises(ValueError, match="must be at least the dilated kernel extent"):
        fwd(
            {"x": np.zeros((2, 4, 4, 5))},
            params,
            state,
            dataclasses.replace(cfg, padding=0, dilation=2),
        )
    missing = {k: v for k, v in params.items() if k != "convs.2.bias"}
    with pytest.raises(ValueError, match=r"params: missing key\(s\) 'convs.2.bias'.*nin_head config"):
        fwd(inputs, missing, state, cfg)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) 'convs.3.weight'"):
        fwd(inputs, params | {"convs.3.weight": np.zeros((2, 4, 1, 1))}, state, cfg)
    shape_rule = r"convs.1.weight: expected shape \(5, 6, 1, 1\)"
    with pytest.raises(ValueError, match=shape_rule):
        fwd(inputs, params | {"convs.1.weight": np.zeros((5, 6))}, state, cfg)
    with pytest.raises(TypeError, match="dtype"):
        fwd({"x": inputs["x"].astype(np.float32)}, params, state, cfg)
    _, cache = fwd(inputs, params, state, cfg)
    with pytest.raises(ValueError, match="douts: nin_head differentiates only 'out'"):
        spec.backward({"out": np.zeros((2, 4)), "aux.class_maps": np.zeros(1)}, cache)
