"""CBAM and its two gates (``cbam``, ``cbam_channel``, ``cbam_spatial``):
configs, gradient checks over every preset and option, the strict backend,
properties, identities, PyTorch parity with the anchors (Jongchan, luuuyi,
seed; ultralytics, timm's CbamModule, LightCbamModule and SEModule), and the
known buggy variants the validation tests use."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks import cbam
from refattn.blocks.registry import (
    draw_case,
    gradcheck_block,
    run_block,
)
from refattn.blocks.spec import MIN_MARGIN, config_to_dict, to_namespace
from refattn.blocks.specs import cbam as cbam_spec
from refattn.params import is_buffer

SPECS = cbam_spec.SPECS
PARTS = {"cbam": "cbam", "cbam_channel": "channel", "cbam_spatial": "spatial"}
PARITY_RTOL = 1e-11


def rel_err(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """max |actual − expected| relative to the scale of `expected` (or `floor`)."""
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e), initial=0.0)), floor, 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale


def draw_clear(spec, cfg, shapes=None, seed=0):
    """draw_case, redrawn until every kink and tie keeps MIN_MARGIN."""
    for s in range(seed, seed + 40):
        inputs, params, state = draw_case(spec, cfg, shapes, seed=s)
        _, cache = spec.forward(inputs, params, state, cfg)
        if spec.kink_margin(cache) >= MIN_MARGIN:
            return inputs, params, state
    raise AssertionError("no draw kept the margin")  # pragma: no cover


def refattn_tensors(spec, cfg, inputs, params, state, dout) -> dict[str, np.ndarray]:
    """Every comparable tensor of one forward + backward, keyed like a fixture."""
    outputs, dinputs, dparams = run_block(spec, cfg, inputs, params, state, dout)
    res = {k: v for k, v in outputs.items() if k != "aux.spatial_descriptor"}
    res["grad.input.x"] = dinputs["x"]
    res |= {f"grad.param.{k}": v for k, v in dparams.items()}
    if spec.with_bn_mode(cfg, "train") is not None and cfg.spatial_bn == "eval":
        res |= {f"state.{k}": v for k, v in state.items()}  # unchanged in eval
    return res


# ---------------------------------------------------------------------------
# configs and presets


def test_registry_has_the_three_entries() -> None:
    from refattn.blocks.registry import BLOCKS

    for name in ("cbam", "cbam_channel", "cbam_spatial"):
        assert BLOCKS[name] is SPECS[name]
        assert BLOCKS[name].presets is cbam.PRESETS


_WIDTH = dict(hidden_channels=None, hidden_divisor=None, mlp_layers=2)
BLOCKS_MD_PRESETS = {  # reference/blocks.md section 9.3, then the libraries'
    "jongchan": dict(reduction=16, pool_types=("avg", "max"), mlp_bias=True,
                     spatial=True, spatial_kernel=7, channel_pool_order="max_mean",
                     spatial_bias=False, spatial_bn="train", bn_eps=1e-5,
                     bn_momentum=0.01, spatial_relu=False, **_WIDTH),
    "luuuyi": dict(reduction=16, pool_types=("avg", "max"), mlp_bias=False,
                   spatial=True, spatial_kernel=7, channel_pool_order="mean_max",
                   spatial_bias=False, spatial_bn=None, bn_eps=1e-5,
                   bn_momentum=0.01, spatial_relu=False, **_WIDTH),
    "seed": dict(reduction=16, pool_types=("avg", "max"), mlp_bias=True,
                 spatial=True, spatial_kernel=7, channel_pool_order="mean_max",
                 spatial_bias=True, spatial_bn=None, bn_eps=1e-5, bn_momentum=0.01,
                 spatial_relu=False, **_WIDTH),
    # ultralytics nn/modules/conv.py: ChannelAttention = avg pool, Conv2d(C, C,
    # 1, bias=True), sigmoid; SpatialAttention = cat([mean, max]), Conv2d(2, 1,
    # 7, padding=3, bias=False), sigmoid
    "ultralytics": dict(reduction=16, hidden_channels=None, hidden_divisor=None,
                        mlp_layers=1, pool_types=("avg",), mlp_bias=True,
                        spatial=True, spatial_kernel=7, channel_pool_order="mean_max",
                        spatial_bias=False, spatial_bn=None, bn_eps=1e-5,
                        bn_momentum=0.01, spatial_relu=False),
    # timm layers/cbam.py CbamModule defaults: rd_ratio 1/16, rd_divisor 1
    # (make_divisible, round_limit 0), mlp_bias False; SpatialAttn =
    # ConvNormAct(2, 1, 7, apply_act=False): conv without bias + BatchNorm2d
    # (eps 1e-5, momentum 0.1)
    "timm": dict(reduction=16, hidden_channels=None, hidden_divisor=1, mlp_layers=2,
                 pool_types=("avg", "max"), mlp_bias=False, spatial=True,
                 spatial_kernel=7, channel_pool_order="mean_max", spatial_bias=False,
                 spatial_bn="train", bn_eps=1e-5, bn_momentum=0.1,
                 spatial_relu=False),
    "timm_light": dict(reduction=16, hidden_channels=None, hidden_divisor=1,
                       mlp_layers=2, pool_types=("avgmax",), mlp_bias=False,
                       spatial=True, spatial_kernel=7, channel_pool_order="avgmax",
                       spatial_bias=False, spatial_bn="train", bn_eps=1e-5,
                       bn_momentum=0.1, spatial_relu=False),
}

PRESET_KEYS = {
    "jongchan": {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                 "spatial.conv.weight", "spatial.bn.weight", "spatial.bn.bias",
                 "spatial.bn.running_mean", "spatial.bn.running_var"},
    "luuuyi": {"mlp.fc1.weight", "mlp.fc2.weight", "spatial.conv.weight"},
    "seed": {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
             "spatial.conv.weight", "spatial.conv.bias"},
    "ultralytics": {"mlp.fc1.weight", "mlp.fc1.bias", "spatial.conv.weight"},
    "timm": {"mlp.fc1.weight", "mlp.fc2.weight", "spatial.conv.weight",
             "spatial.bn.weight", "spatial.bn.bias", "spatial.bn.running_mean",
             "spatial.bn.running_var"},
    "timm_light": {"mlp.fc1.weight", "mlp.fc2.weight", "spatial.conv.weight",
                   "spatial.bn.weight", "spatial.bn.bias", "spatial.bn.running_mean",
                   "spatial.bn.running_var"},
}


def test_presets_are_complete_and_match_blocks_md() -> None:
    assert set(cbam.PRESETS) == set(BLOCKS_MD_PRESETS)
    fields = {f.name for f in dataclasses.fields(cbam.CBAMConfig)}
    for name, want in BLOCKS_MD_PRESETS.items():
        assert set(want) == fields
        assert dataclasses.asdict(cbam.PRESETS[name]) == want, name
    assert cbam.CBAMConfig() == cbam.PRESETS["jongchan"]


@pytest.mark.parametrize("preset", sorted(PRESET_KEYS))
def test_preset_parameter_keys(preset: str) -> None:
    cfg = cbam.PRESETS[preset]
    shapes = {"x": (2, 32, 5, 5)}
    keys = set(cbam_spec.param_shapes(cfg, shapes))
    assert keys == PRESET_KEYS[preset]
    assert set(SPECS["cbam_channel"].param_shapes(cfg, shapes)) == {
        k for k in keys if k.startswith("mlp.")}
    assert set(SPECS["cbam_spatial"].param_shapes(cfg, shapes)) == {
        k for k in keys if k.startswith("spatial.")}
    params, state = cbam_spec.init_params(cfg, shapes, seed=0)
    assert set(params) | set(state) == keys
    assert all(is_buffer(k) for k in state) and not any(is_buffer(k) for k in params)


def test_param_shapes() -> None:
    cfg = dataclasses.replace(cbam.PRESETS["jongchan"], spatial_bias=True,
                              spatial_kernel=3)
    assert cbam_spec.param_shapes(cfg, {"x": (2, 40, 5, 5)}) == {
        "mlp.fc1.weight": (2, 40), "mlp.fc1.bias": (2,),
        "mlp.fc2.weight": (40, 2), "mlp.fc2.bias": (40,),
        "spatial.conv.weight": (1, 2, 3, 3), "spatial.conv.bias": (1,),
        "spatial.bn.weight": (1,), "spatial.bn.bias": (1,),
        "spatial.bn.running_mean": (1,), "spatial.bn.running_var": (1,),
    }
    assert cbam_spec.param_shapes(dataclasses.replace(cfg, spatial=False),
                             {"x": (2, 40, 5, 5)}).keys() == {
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def test_config_round_trip_and_list_pool_types() -> None:
    from refattn.blocks.spec import config_from_dict

    cfg = SPECS["cbam"].config(pool_types=["lse", "avg"])
    assert cfg.pool_types == ("lse", "avg")
    d = config_to_dict(cfg)
    assert d["pool_types"] == ["lse", "avg"]
    assert config_from_dict(cbam.CBAMConfig, d) == cfg


BAD_CONFIGS = [
    (dict(reduction=0), ["reduction", "0"]),
    (dict(reduction=True), ["reduction", "True"]),
    (dict(reduction=2.0), ["reduction", "2.0"]),
    (dict(pool_types=()), ["pool_types", "empty"]),
    (dict(pool_types=("avg", "median")), ["pool_types", "'median'"]),
    (dict(pool_types=("avg", "avg")), ["pool_types", "once"]),
    (dict(pool_types="avg"), ["pool_types", "'avg'"]),
    (dict(spatial_kernel=4), ["spatial_kernel (4)", "odd"]),
    (dict(spatial_kernel=0), ["spatial_kernel", "0"]),
    (dict(channel_pool_order="max_first"), ["channel_pool_order", "'max_first'"]),
    (dict(spatial_bn="training"), ["spatial_bn", "'training'"]),
    (dict(spatial_bn=True), ["spatial_bn", "True"]),
    (dict(bn_eps=0.0), ["bn_eps", "0.0"]),
    (dict(bn_eps=float("nan")), ["bn_eps", "nan"]),
    (dict(bn_momentum=1.5), ["bn_momentum", "1.5"]),
    (dict(mlp_bias=1), ["mlp_bias", "1"]),
    (dict(spatial="yes"), ["spatial", "'yes'"]),
    (dict(spatial_relu=None), ["spatial_relu", "None"]),
    (dict(hidden_channels=0), ["hidden_channels", "int >= 1 or None", "0"]),
    (dict(hidden_channels=2.0), ["hidden_channels", "2.0"]),
    (dict(hidden_divisor=0), ["hidden_divisor", "int >= 1 or None", "0"]),
    (dict(hidden_divisor=True), ["hidden_divisor", "True"]),
    (dict(mlp_layers=3), ["mlp_layers", "3", "ultralytics"]),
    (dict(mlp_layers="1"), ["mlp_layers", "'1'"]),
    (dict(pool_types=("avgmax", "avgmax")), ["pool_types", "once"]),
    (dict(pool_types=("avg_max",)), ["pool_types", "'avg_max'", "'avgmax'"]),
    (dict(channel_pool_order="avg_max"), ["channel_pool_order", "'avgmax'",
                                          "LightCbam"]),
]


@pytest.mark.parametrize("overrides, words", BAD_CONFIGS)
def test_bad_configs_name_the_rule_and_value(overrides, words) -> None:
    with pytest.raises(ValueError) as err:
        cbam_spec.check_config(cbam.CBAMConfig(**overrides))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_unknown_key_and_preset() -> None:
    with pytest.raises(ValueError, match="no key"):
        SPECS["cbam"].config("jongchan", ratio=8)
    with pytest.raises(ValueError, match="no preset 'woo'"):
        SPECS["cbam"].config("woo")


@pytest.mark.parametrize("block", ["cbam", "cbam_channel"])
def test_reduction_larger_than_channels(block: str) -> None:
    spec = SPECS[block]
    cfg = spec.config("jongchan")  # reduction 16
    msg = r"reduction \(16\) must not exceed the channels C \(8\).* would be 0"
    with pytest.raises(ValueError, match=msg):
        spec.param_shapes(cfg, {"x": (2, 8, 4, 4)})
    inputs, params, state = draw_case(spec, cfg, {"x": (2, 16, 4, 4)})
    inputs = {"x": inputs["x"][:, :8]}
    with pytest.raises(ValueError, match=msg):
        spec.forward(inputs, params, state, cfg)
    assert SPECS["cbam"].resolve(cfg, {"x": (2, 8, 4, 4)}) is cfg  # param_shapes decides


def test_reduction_inert_for_the_spatial_gate() -> None:
    spec = SPECS["cbam_spatial"]
    cfg = spec.config("jongchan")
    assert set(spec.param_shapes(cfg, {"x": (2, 3, 4, 4)})) == {
        "spatial.conv.weight", "spatial.bn.weight", "spatial.bn.bias",
        "spatial.bn.running_mean", "spatial.bn.running_var"}


def test_channels_need_not_divide_by_reduction() -> None:
    """Cr = C // r as in both anchors: C = 20, r = 16 gives Cr = 1."""
    shapes = cbam_spec.param_shapes(cbam.PRESETS["jongchan"], {"x": (1, 20, 3, 3)})
    assert shapes["mlp.fc1.weight"] == (1, 20)
    assert shapes["mlp.fc2.weight"] == (20, 1)


def _case(block: str, preset: str, **overrides: Any):
    spec = SPECS[block]
    cfg = spec.config(preset, **overrides)
    inputs, params, state = draw_case(spec, cfg)
    return spec, cfg, inputs, params, state


FLAG_MISMATCHES = [
    # (block, preset, overrides, edit, words in the message)
    ("cbam", "luuuyi", {}, lambda p, s: p.update(
        {"mlp.fc1.bias": np.zeros(2), "mlp.fc2.bias": np.zeros(32)}),
     ["unexpected", "'mlp.fc1.bias'", "mlp_bias=False"]),
    ("cbam", "seed", {}, lambda p, s: p.pop("mlp.fc2.bias"),
     ["missing", "'mlp.fc2.bias'", "mlp_bias=True"]),
    ("cbam", "jongchan", {}, lambda p, s: p.update({"spatial.conv.bias": np.zeros(1)}),
     ["unexpected", "'spatial.conv.bias'", "spatial_bias=False"]),
    ("cbam", "seed", {}, lambda p, s: p.pop("spatial.conv.bias"),
     ["missing", "'spatial.conv.bias'", "spatial_bias=True"]),
    ("cbam", "luuuyi", {}, lambda p, s: p.update(
        {"spatial.bn.weight": np.ones(1), "spatial.bn.bias": np.zeros(1)}),
     ["unexpected", "'spatial.bn.weight'", "spatial_bn=None"]),
    ("cbam", "jongchan", {}, lambda p, s: s.clear(),
     ["state", "missing", "'spatial.bn.running_mean'", "spatial_bn='train'"]),
    ("cbam", "jongchan", {}, lambda p, s: p.pop("spatial.bn.weight"),
     ["missing", "'spatial.bn.weight'", "spatial_bn='train'"]),
    ("cbam", "seed", {"spatial": False}, lambda p, s: p.update(
        {"spatial.conv.weight": np.zeros((1, 2, 7, 7))}),
     ["unexpected", "'spatial.conv.weight'", "spatial=False"]),
    ("cbam_channel", "seed", {}, lambda p, s: p.update(
        {"spatial.conv.weight": np.zeros((1, 2, 7, 7))}),
     ["unexpected", "'spatial.conv.weight'", "cbam_channel"]),
    ("cbam", "jongchan", {}, lambda p, s: p.update(
        {"spatial.bn.running_mean": s["spatial.bn.running_mean"]}),
     ["state", "given in both params and state", "'spatial.bn.running_mean'"]),
    ("cbam", "ultralytics", {}, lambda p, s: p.update(
        {"mlp.fc2.weight": np.zeros((8, 8))}),
     ["unexpected", "'mlp.fc2.weight'", "mlp_layers=1"]),
    ("cbam_channel", "ultralytics", {}, lambda p, s: p.update(
        {"mlp.fc2.bias": np.zeros(8)}),
     ["unexpected", "'mlp.fc2.bias'", "mlp_layers=1"]),
]


@pytest.mark.parametrize("block, preset, overrides, edit, words", FLAG_MISMATCHES)
def test_presence_flags_must_agree_with_keys(block, preset, overrides, edit, words):
    spec, cfg, inputs, params, state = _case(block, preset, **overrides)
    params, state = dict(params), dict(state)
    edit(params, state)
    with pytest.raises(ValueError) as err:
        spec.forward(inputs, params, state, cfg)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bad_inputs() -> None:
    spec, cfg, inputs, params, state = _case("cbam", "seed")
    x = inputs["x"]
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        spec.forward({"x": x[0]}, params, state, cfg)
    with pytest.raises(ValueError, match=r"inputs: cbam takes \['x'\]"):
        spec.forward({"x": x, "y": x}, params, state, cfg)
    bad = dict(params, **{"mlp.fc1.weight": params["mlp.fc1.weight"].T})
    with pytest.raises(ValueError, match=r"mlp.fc1.weight: expected shape"):
        spec.forward(inputs, bad, state, cfg)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        spec.forward({"x": nan}, params, state, cfg)
    mixed = dict(params, **{"spatial.conv.bias": params["spatial.conv.bias"]
                            .astype(np.float32)})
    with pytest.raises(TypeError, match="dtype"):
        spec.forward(inputs, mixed, state, cfg)
    with pytest.raises(TypeError, match="dtype"):
        spec.forward({"x": x.astype(np.int64)}, params, state, cfg)
    _, cache = spec.forward(inputs, params, state, cfg)
    with pytest.raises(ValueError, match="douts"):
        spec.backward({"out": x[:, :3]}, cache)
    with pytest.raises(ValueError, match=r"with the cotangent 'out', got \['y'\]"):
        spec.backward({"y": x}, cache)


def test_train_bn_needs_more_than_one_value() -> None:
    spec = SPECS["cbam"]
    cfg = spec.config("jongchan")
    inputs, params, state = draw_case(spec, cfg, {"x": (1, 32, 1, 1)})
    with pytest.raises(ValueError, match="more than one value"):
        spec.forward(inputs, params, state, cfg)
    out, _ = spec.forward(inputs, params, state, dataclasses.replace(cfg,
                                                                     spatial_bn="eval"))
    assert out["out"].shape == (1, 32, 1, 1)


def test_with_bn_mode_and_anchor_names() -> None:
    jc = cbam.PRESETS["jongchan"]
    for block in ("cbam", "cbam_spatial"):
        assert SPECS[block].with_bn_mode(jc, "eval").spatial_bn == "eval"
        assert SPECS[block].with_bn_mode(jc, "train") == jc
    assert SPECS["cbam_channel"].with_bn_mode(jc, "train") is None
    assert SPECS["cbam"].with_bn_mode(dataclasses.replace(jc, spatial=False),
                                      "train") is None
    assert SPECS["cbam"].with_bn_mode(cbam.PRESETS["seed"], "train") is None
    shapes = {"x": (2, 32, 7, 6)}
    names = SPECS["cbam"].anchor_names("jongchan", jc, shapes)
    assert names == {
        "mlp.fc1.weight": "ChannelGate.mlp.1.weight",
        "mlp.fc1.bias": "ChannelGate.mlp.1.bias",
        "mlp.fc2.weight": "ChannelGate.mlp.3.weight",
        "mlp.fc2.bias": "ChannelGate.mlp.3.bias",
        "spatial.conv.weight": "SpatialGate.spatial.conv.weight",
        "spatial.bn.weight": "SpatialGate.spatial.bn.weight",
        "spatial.bn.bias": "SpatialGate.spatial.bn.bias",
        "spatial.bn.running_mean": "SpatialGate.spatial.bn.running_mean",
        "spatial.bn.running_var": "SpatialGate.spatial.bn.running_var",
    }
    assert SPECS["cbam"].anchor_names("luuuyi", cbam.PRESETS["luuuyi"], shapes) == {
        "mlp.fc1.weight": "ca.fc.0.weight", "mlp.fc2.weight": "ca.fc.2.weight",
        "spatial.conv.weight": "sa.conv1.weight"}
    assert SPECS["cbam_spatial"].anchor_names("seed", cbam.PRESETS["seed"], shapes) == {
        "spatial.conv.weight": "spatial_attention.conv2d.weight",
        "spatial.conv.bias": "spatial_attention.conv2d.bias"}
    assert SPECS["cbam"].anchor_names(None, jc, shapes) == {}


def test_accumulation_families() -> None:
    for block, spec in SPECS.items():
        for preset, cfg in cbam.PRESETS.items():
            acc = spec.accumulation(cfg, spec.fixture_shapes(cfg))
            assert set(acc) == {"out", "aux", "state", "grad.input", "grad.param"}
            assert all(isinstance(v, int) and v >= 1 for v in acc.values())
            assert acc["grad.param"] >= acc["grad.input"] >= acc["out"]


def test_anchor_init_jongchan_spatial_gate_is_one_half() -> None:
    """blocks.md 4.1: with the anchor's init (BN gamma 0, every bias 0) the
    spatial gate is the constant 0.5, in train and in eval."""
    for mode in ("train", "eval"):
        cfg = dataclasses.replace(cbam.PRESETS["jongchan"], spatial_bn=mode)
        shapes = {"x": (2, 32, 5, 4)}
        params, state = cbam_spec.init_params(cfg, shapes, seed=3, anchor_init=True)
        assert all(np.all(params[k] == 0) for k in params if k.endswith("bias"))
        x = np.random.default_rng(0).standard_normal(shapes["x"])
        out, _ = cbam_spec.forward({"x": x}, params, state, cfg)
        assert np.all(out["aux.spatial_gate"] == 0.5)
    for preset in ("luuuyi", "seed"):
        params, _ = cbam_spec.init_params(cbam.PRESETS[preset], {"x": (2, 32, 5, 4)},
                                     seed=1, anchor_init=True)
        assert all(np.any(v != 0) for v in params.values())


def test_kink_margin_sees_ties_and_dead_branches() -> None:
    spec = SPECS["cbam"]
    cfg = spec.config("seed")
    inputs, params, state = draw_clear(spec, cfg)
    _, cache = spec.forward(inputs, params, state, cfg)
    assert spec.kink_margin(cache) >= MIN_MARGIN
    x = inputs["x"].copy()
    x[1, 3, 0, 0] = x[1, 3, 4, 2] = 9.0  # a tie in the max over positions
    assert spec.kink_margin(spec.forward({"x": x}, params, state, cfg)[1]) == 0.0
    dead = dict(params, **{"mlp.fc1.bias": np.full(2, -100.0)})  # every ReLU off
    assert spec.kink_margin(spec.forward(inputs, dead, state, cfg)[1]) == 0.0
    sp = SPECS["cbam_spatial"]
    inputs, params, state = draw_clear(sp, cfg)
    x = inputs["x"].copy()
    x[0, 1, 2, 2] = x[0, 3, 2, 2] = 9.0  # a tie in the max over channels
    assert sp.kink_margin(sp.forward({"x": x}, params, state, cfg)[1]) == 0.0
    relu = dataclasses.replace(cfg, spatial_relu=True)
    pre = sp.forward(inputs, params, state, relu)[1].gate.pre_relu
    bias = params["spatial.conv.bias"] - pre[0, 0, 1, 1]  # one ReLU input at 0
    _, cache = sp.forward(inputs, dict(params, **{"spatial.conv.bias": bias}), state,
                          relu)
    assert sp.kink_margin(cache) < 1e-12


# ---------------------------------------------------------------------------
# gradient checks

TINY = {"x": (2, 16, 3, 4)}


def preset_configs():
    for block in SPECS:
        for preset in cbam.PRESETS:
            cfg = cbam.PRESETS[preset]
            modes = (["train", "eval"] if SPECS[block].with_bn_mode(cfg, "train")
                     else [None])
            for mode in modes:
                c = cfg if mode is None else SPECS[block].with_bn_mode(cfg, mode)
                yield pytest.param(block, c, id=f"{block}-{preset}" + (
                    f"-{mode}" if mode else ""))


@pytest.mark.parametrize("block, cfg", list(preset_configs()))
def test_gradcheck_presets_full_tiny(block: str, cfg) -> None:
    spec = SPECS[block]
    shapes = {"x": (2, 4, 4, 5)} if block == "cbam_spatial" else TINY
    inputs, params, state = draw_clear(spec, cfg, shapes)
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


@pytest.mark.parametrize("block, cfg", list(preset_configs()))
def test_gradcheck_presets_fast_fixture_shapes(block: str, cfg) -> None:
    spec = SPECS[block]
    inputs, params, state = draw_clear(spec, cfg)
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


OPTIONS = [  # (block, overrides of the jongchan preset with reduction 4)
    ("cbam", dict(pool_types=("avg",))),
    ("cbam", dict(pool_types=("max",))),
    ("cbam", dict(pool_types=("lp",))),
    ("cbam", dict(pool_types=("lse",))),
    ("cbam", dict(pool_types=("lse", "max", "lp", "avg"))),
    ("cbam", dict(mlp_bias=False)),
    ("cbam", dict(spatial=False)),
    ("cbam", dict(spatial=False, mlp_bias=False, pool_types=("lp", "avg"))),
    ("cbam", dict(spatial_kernel=3)),
    ("cbam", dict(spatial_kernel=5, spatial_bn="eval")),
    ("cbam", dict(channel_pool_order="mean_max")),
    ("cbam", dict(channel_pool_order="mean_max", spatial_kernel=3, spatial_bn=None)),
    ("cbam", dict(spatial_bias=True)),
    ("cbam", dict(spatial_bias=True, spatial_bn="eval")),
    ("cbam", dict(spatial_bias=True, spatial_bn=None)),
    ("cbam", dict(spatial_bn=None)),
    ("cbam", dict(spatial_bn="eval")),
    ("cbam", dict(spatial_relu=True)),
    ("cbam", dict(spatial_relu=True, spatial_bn=None, spatial_bias=True)),
    ("cbam", dict(spatial_relu=True, spatial_bn="eval")),
    ("cbam_channel", dict(pool_types=("max", "lse", "avg", "lp"))),
    ("cbam_channel", dict(mlp_bias=False, pool_types=("lse",))),
    ("cbam_spatial", dict(spatial_kernel=3, channel_pool_order="mean_max")),
    ("cbam_spatial", dict(spatial_bn="eval", spatial_relu=True)),
    ("cbam_spatial", dict(spatial_bn=None, spatial_bias=True, spatial_relu=True)),
    # the variants' keys (ultralytics, timm, LightCbam, SE)
    ("cbam", dict(mlp_layers=1)),
    ("cbam", dict(mlp_layers=1, mlp_bias=False, pool_types=("max", "avgmax"))),
    ("cbam", dict(hidden_channels=3)),
    ("cbam", dict(hidden_channels=11, mlp_bias=False)),  # wider than C
    ("cbam", dict(hidden_divisor=3)),  # Cr = 3, where C // r = 2
    ("cbam", dict(pool_types=("avgmax",))),
    ("cbam", dict(pool_types=("avgmax", "lse", "avg"))),
    ("cbam", dict(channel_pool_order="avgmax")),
    ("cbam", dict(channel_pool_order="avgmax", spatial_bn="eval", spatial_bias=True)),
    ("cbam", dict(channel_pool_order="avgmax", spatial_bn=None, spatial_relu=True)),
    ("cbam_channel", dict(mlp_layers=1, pool_types=("avg",))),
    ("cbam_channel", dict(hidden_divisor=8, pool_types=("avgmax",))),
    ("cbam_spatial", dict(channel_pool_order="avgmax", spatial_kernel=3)),
]


@pytest.mark.parametrize("block, overrides", OPTIONS,
                         ids=[f"{b}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for b, o in OPTIONS])
def test_gradcheck_options_full(block: str, overrides: dict) -> None:
    spec = SPECS[block]
    cfg = spec.config("jongchan", reduction=4, **overrides)
    shapes = {"x": (2, 8, 5, 4)}
    inputs, params, state = draw_clear(spec, cfg, shapes, seed=10)
    _, cache = spec.forward(inputs, params, state, cfg)
    assert spec.kink_margin(cache) >= MIN_MARGIN
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    assert not any(t.skipped_probes for t in report.tensors), report.to_text()


def test_gradcheck_catches_a_dropped_descriptor_branch(monkeypatch) -> None:
    """A backward that gives the MLP only one branch's share must fail."""
    spec = SPECS["cbam_channel"]
    cfg = spec.config("seed", reduction=4)
    inputs, params, state = draw_clear(spec, cfg, {"x": (2, 8, 3, 4)})
    real = cbam._linear_backward

    def one_branch(dout, c):
        dx, dw, db = real(dout[:1], c._replace(x2=c.x2[: c.x2.shape[0] // 2],
                                               x_shape=(1,) + c.x_shape[1:]))
        full_dx, _, _ = real(dout, c)
        return full_dx, dw, db

    monkeypatch.setattr(cbam, "_linear_backward", one_branch)
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    assert set(report.failed) <= {f"param.{k}" for k in params}
    assert "param.mlp.fc2.weight" in report.failed


# ---------------------------------------------------------------------------
# backends, dtypes


@pytest.mark.parametrize("block", sorted(SPECS))
@pytest.mark.parametrize("preset", sorted(cbam.PRESETS))
def test_backend_and_float32(xb, block: str, preset: str) -> None:
    spec = SPECS[block]
    cfg = spec.config(preset)
    inputs, params, state = draw_clear(spec, cfg)
    dout = np.random.default_rng(5).standard_normal(inputs["x"].shape)
    ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
    for dtype, tol in (("float64", 1e-13), ("float32", 2e-5)):
        ins, ps, st_ = (to_namespace(d, xb.xp, xb.device, dtype)
                        for d in (inputs, params, state))
        d = to_namespace({"d": dout}, xb.xp, xb.device, dtype)["d"]
        got = refattn_tensors(spec, cfg, ins, ps, st_, d)
        assert set(got) == set(ref)
        for k, v in got.items():
            assert backend.device(v) == xb.device, k
            assert backend.dtype_name(v) == dtype, k
            assert rel_err(xb.to_host(v), ref[k]) < tol, k


def test_gradcheck_strict_backend(xb) -> None:
    spec = SPECS["cbam"]
    cfg = spec.config("jongchan", reduction=4)
    inputs, params, state = draw_clear(spec, cfg, {"x": (2, 8, 5, 4)})
    ins, ps, st_ = (to_namespace(d, xb.xp, xb.device) for d in (inputs, params, state))
    report = gradcheck_block(spec, cfg, ins, ps, st_, mode="fast")
    assert report.ok, report.to_text()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "generic"])
@pytest.mark.parametrize("block", sorted(SPECS))
def test_cupy_matches_numpy(block: str, kernels: bool) -> None:
    """Every preset on CuPy (raw kernels and the generic path) against NumPy."""
    import refattn.cuda as rc

    if not rc.cupy_available():
        pytest.skip("no CUDA device answers through CuPy")
    import array_api_compat.cupy as cxp

    spec = SPECS[block]
    with rc.use_kernels(kernels):
        for preset in cbam.PRESETS:
            cfg = spec.config(preset)
            inputs, params, state = draw_clear(spec, cfg, {"x": (4, 64, 15, 13)})
            dout = np.random.default_rng(5).standard_normal(inputs["x"].shape)
            ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
            for dtype, tol in (("float64", 1e-12), ("float32", 2e-5)):
                ins, ps, st_ = (to_namespace(d, cxp, None, dtype)
                                for d in (inputs, params, state))
                d = to_namespace({"d": dout}, cxp, None, dtype)["d"]
                got = refattn_tensors(spec, cfg, ins, ps, st_, d)
                for k, v in got.items():
                    assert backend.is_cupy(backend.namespace(v)), k
                    assert backend.dtype_name(v) == dtype, k
                    assert rel_err(backend.to_host(v), ref[k]) < tol, (preset, dtype, k)


# ---------------------------------------------------------------------------
# properties


@st.composite
def block_cases(draw):
    block = draw(st.sampled_from(sorted(SPECS)))
    r = draw(st.integers(1, 4))
    C = draw(st.integers(r, 3 * r + 1))
    width = draw(st.sampled_from(["floor", "channels", "divisor"]))
    hidden_channels = draw(st.integers(1, 6)) if width == "channels" else None
    hidden_divisor = draw(st.integers(1, 4)) if width == "divisor" else None
    N, H, W = (draw(st.integers(1, 3)) for _ in range(3))
    pools = draw(st.permutations(cbam.POOL_TYPES))[
        : draw(st.integers(1, len(cbam.POOL_TYPES)))]
    bn = draw(st.sampled_from([None, "train", "eval"]))
    if bn == "train" and N * H * W < 2:
        bn = "eval"
    cfg = cbam.CBAMConfig(
        reduction=r, hidden_channels=hidden_channels, hidden_divisor=hidden_divisor,
        mlp_layers=draw(st.sampled_from([1, 2])),
        pool_types=tuple(pools), mlp_bias=draw(st.booleans()),
        spatial=draw(st.booleans()), spatial_kernel=draw(st.sampled_from([1, 3, 5, 7])),
        channel_pool_order=draw(st.sampled_from(cbam.CHANNEL_POOL_ORDERS)),
        spatial_bias=draw(st.booleans()), spatial_bn=bn,
        bn_momentum=draw(st.floats(0.0, 1.0)), spatial_relu=draw(st.booleans()),
    )
    return block, cfg, (N, C, H, W), draw(st.integers(0, 2**16))


@given(block_cases())
def test_backward_is_linear_keys_match_nothing_mutated(case) -> None:
    block, cfg, shape, seed = case
    spec = SPECS[block]
    inputs, params, state = draw_case(spec, cfg, {"x": shape}, seed=seed)
    rng = np.random.default_rng(seed)
    d1, d2 = rng.standard_normal(shape), rng.standard_normal(shape)
    saved = copy.deepcopy((inputs, params, state, d1, d2))
    outputs, cache = spec.forward(inputs, params, state, cfg)
    assert outputs["out"].shape == shape
    g1 = spec.backward({"out": d1}, cache)
    g2 = spec.backward({"out": d2}, cache)
    g12 = spec.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    for a, b, ab in zip(g1, g2, g12):
        assert set(a) == set(b) == set(ab)
        for k in a:
            want = 2.0 * a[k] - 3.0 * b[k]
            assert np.allclose(ab[k], want, rtol=1e-10, atol=1e-10), k
    dinputs, dparams = g1
    assert {k: v.shape for k, v in dinputs.items()} == {"x": shape}
    assert {k: v.shape for k, v in dparams.items()} == {
        k: v.shape for k, v in params.items()}
    for now, before in zip((inputs, params, state, d1, d2), saved):
        if isinstance(now, dict):
            assert all(np.array_equal(now[k], before[k]) for k in now)
        else:
            assert np.array_equal(now, before)
    if cfg.spatial_bn == "train" and (block == "cbam_spatial"
                                       or (block == "cbam" and cfg.spatial)):
        assert {k for k in outputs if k.startswith("state.")} == {
            f"state.{k}" for k in state}
    else:
        assert not any(k.startswith("state.") for k in outputs)
    if "aux.channel_gate" in outputs:
        a = outputs["aux.channel_gate"]
        assert a.shape == shape[:2] and np.all((a >= 0) & (a <= 1))
    if "aux.spatial_gate" in outputs:
        assert outputs["aux.spatial_gate"].shape == (shape[0], 1) + shape[2:]
        D = 1 if cfg.channel_pool_order == "avgmax" else 2
        assert outputs["aux.spatial_descriptor"].shape == (shape[0], D) + shape[2:]


# ---------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("preset", sorted(cbam.PRESETS))
def test_zero_mlp_gives_half(preset: str) -> None:
    spec = SPECS["cbam_channel"]
    cfg = cbam.PRESETS[preset]
    inputs, params, state = draw_case(spec, cfg)
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    outputs, _ = spec.forward(inputs, zero, state, cfg)
    assert np.all(outputs["aux.channel_gate"] == 0.5)
    assert np.array_equal(outputs["out"], 0.5 * inputs["x"])


@pytest.mark.parametrize("preset, mode", [("jongchan", "train"), ("jongchan", "eval"),
                                          ("luuuyi", None), ("seed", None),
                                          ("ultralytics", None), ("timm", "train"),
                                          ("timm_light", "eval")])
def test_zero_mlp_and_spatial_conv_give_a_quarter(preset: str, mode) -> None:
    spec = SPECS["cbam"]
    cfg = cbam.PRESETS[preset]
    if mode is not None:
        cfg = spec.with_bn_mode(cfg, mode)
    inputs, params, state = draw_case(spec, cfg)
    zero = {k: np.zeros_like(v) for k, v in params.items() if k != "spatial.bn.weight"}
    zero |= {k: params[k] for k in params if k == "spatial.bn.weight"}  # gamma kept
    if mode == "eval":
        state = dict(state, **{"spatial.bn.running_mean": np.zeros(1)})
    outputs, _ = spec.forward(inputs, zero, state, cfg)
    assert np.all(outputs["aux.spatial_gate"] == 0.5)
    assert np.array_equal(outputs["out"], 0.25 * inputs["x"])


def test_jongchan_weights_in_a_mean_first_gate_need_swapped_channels() -> None:
    """blocks.md 4.5: cat([max, mean]) with W equals cat([mean, max]) with
    W[:, [1, 0]], and differs with W itself."""
    spec = SPECS["cbam"]
    cfg = spec.config("jongchan")
    mean_first = dataclasses.replace(cfg, channel_pool_order="mean_max")
    inputs, params, state = draw_clear(spec, cfg)
    dout = np.random.default_rng(1).standard_normal(inputs["x"].shape)
    ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
    w = params["spatial.conv.weight"]
    swapped = dict(params, **{"spatial.conv.weight": w[:, [1, 0]]})
    got = refattn_tensors(spec, mean_first, inputs, swapped, state, dout)
    dw = got["grad.param.spatial.conv.weight"]
    got["grad.param.spatial.conv.weight"] = dw[:, [1, 0]]
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-13, k
    wrong = refattn_tensors(spec, mean_first, inputs, params, state, dout)
    assert rel_err(wrong["out"], ref["out"]) > 1e-3
    assert rel_err(wrong["aux.spatial_gate"], ref["aux.spatial_gate"]) > 1e-3
    assert np.array_equal(wrong["aux.channel_gate"], ref["aux.channel_gate"])


def test_gates_compose_into_cbam() -> None:
    """cbam = cbam_spatial ∘ cbam_channel, forward and backward."""
    cfg = cbam.PRESETS["seed"]
    inputs, params, state = draw_clear(SPECS["cbam"], cfg)
    dout = np.random.default_rng(2).standard_normal(inputs["x"].shape)
    full = refattn_tensors(SPECS["cbam"], cfg, inputs, params, state, dout)
    ch = {k: v for k, v in params.items() if k.startswith("mlp.")}
    sp = {k: v for k, v in params.items() if k.startswith("spatial.")}
    x1 = SPECS["cbam_channel"].forward(inputs, ch, {}, cfg)[0]["out"]
    o2, d2, p2 = run_block(SPECS["cbam_spatial"], cfg, {"x": x1}, sp, {}, dout)
    o1, d1, p1 = run_block(SPECS["cbam_channel"], cfg, inputs, ch, {}, d2["x"])
    assert rel_err(o2["out"], full["out"]) < 1e-14
    assert rel_err(d1["x"], full["grad.input.x"]) < 1e-14
    for k, v in (p1 | p2).items():
        assert rel_err(v, full[f"grad.param.{k}"]) < 1e-14, k


# ---------------------------------------------------------------------------
# PyTorch parity with the anchors


class _Anchors:
    """The factories of anchors.cbam and anchors.cbam_variants, by name."""

    def __init__(self) -> None:
        self.modules = [importlib.import_module("anchors.cbam"),
                        importlib.import_module("anchors.cbam_variants")]

    def __getattr__(self, name: str) -> Any:
        for module in self.modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


@pytest.fixture
def anchors(torch):
    torch.set_default_dtype(torch.float64)
    return _Anchors()


def torch_tensors(torch, module, names, inputs, params, state, dout):
    """Load refattn's tensors through `names`, run forward + backward."""
    own = module.state_dict()
    values = params | state
    sd = {a: torch.tensor(values[c]).reshape(own[a].shape) for c, a in names.items()}
    result = module.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result
    x = torch.tensor(inputs["x"], requires_grad=True)
    out = module(x)
    out.backward(torch.tensor(dout))
    res = {"out": out.detach().numpy(), "grad.input.x": x.grad.numpy()}
    named = dict(module.named_parameters())
    after = module.state_dict()
    for c, a in names.items():
        if is_buffer(c):
            res[f"state.{c}"] = after[a].numpy()
        else:
            res[f"grad.param.{c}"] = named[a].grad.numpy().reshape(values[c].shape)
    for m in module.modules():
        gate = getattr(m, "last_gate", None)
        if gate is not None:
            kind = "spatial" if gate.ndim == 4 else "channel"
            res[f"aux.{kind}_gate"] = gate.numpy()
    for kind in ("channel", "spatial"):
        gate = getattr(module, f"last_{kind}_gate", None)
        if gate is not None:
            res[f"aux.{kind}_gate"] = gate.numpy()
    return res


def compare(got: dict, ref: dict) -> dict[str, float]:
    """Relative error per tensor; an analytically-zero gradient (a conv bias
    in front of train-mode BN: pure round-off on both sides) is measured on
    the scale of the largest gradient instead (blocks.md section 10)."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    fam = max(float(np.max(np.abs(v))) for k, v in ref.items() if k.startswith("grad."))
    errors = {}
    for k, v in ref.items():
        zero = k.startswith("grad.") and float(np.max(np.abs(v))) < 1e-9 * fam
        errors[k] = rel_err(got[k], v, floor=fam if zero else 0.0)
    return errors


ANCHOR_CASES = [  # (block, preset, bn mode, overrides, factory)
    ("cbam", "jongchan", "train", {}, "make_jongchan"),
    ("cbam", "jongchan", "eval", {}, "make_jongchan"),
    ("cbam", "luuuyi", None, {}, "make_luuuyi"),
    ("cbam", "luuuyi", None, {"spatial_kernel": 3}, "make_luuuyi"),
    ("cbam", "seed", None, {}, "make_seed"),
    ("cbam_channel", "jongchan", None, {}, "make_jongchan_channel"),
    ("cbam_channel", "luuuyi", None, {}, "make_luuuyi_channel"),
    ("cbam_channel", "seed", None, {}, "make_seed_channel"),
    ("cbam_spatial", "jongchan", "train", {}, "make_jongchan_spatial"),
    ("cbam_spatial", "jongchan", "eval", {}, "make_jongchan_spatial"),
    ("cbam_spatial", "luuuyi", None, {}, "make_luuuyi_spatial"),
    ("cbam_spatial", "seed", None, {}, "make_seed_spatial"),
    # every switch Jongchan's classes have
    ("cbam", "jongchan", "train", {"pool_types": ("lse", "max", "lp", "avg"),
                                   "reduction": 3}, "make_jongchan"),
    ("cbam", "jongchan", "eval", {"spatial_kernel": 3, "spatial_bias": True,
                                  "spatial_relu": True}, "make_jongchan"),
    ("cbam", "jongchan", "train", {"spatial_bias": True, "spatial_relu": True,
                                   "bn_momentum": 0.3, "bn_eps": 1e-3},
     "make_jongchan"),
    ("cbam", "jongchan", None, {"spatial_bn": None, "spatial_bias": True,
                                "pool_types": ("lp",)}, "make_jongchan"),
    ("cbam", "jongchan", None, {"spatial": False, "pool_types": ("max", "lse")},
     "make_jongchan"),
    # ultralytics, timm CbamModule and LightCbamModule, and their gates
    ("cbam", "ultralytics", None, {}, "make_ultralytics"),
    ("cbam", "ultralytics", None, {"spatial_kernel": 3}, "make_ultralytics"),
    ("cbam_channel", "ultralytics", None, {}, "make_ultralytics_channel"),
    ("cbam_spatial", "ultralytics", None, {}, "make_ultralytics_spatial"),
    ("cbam", "timm", "train", {}, "make_timm"),
    ("cbam", "timm", "eval", {}, "make_timm"),
    ("cbam_channel", "timm", None, {}, "make_timm_channel"),
    ("cbam_spatial", "timm", "train", {}, "make_timm_spatial"),
    ("cbam_spatial", "timm", "eval", {}, "make_timm_spatial"),
    ("cbam", "timm_light", "train", {}, "make_timm_light"),
    ("cbam", "timm_light", "eval", {}, "make_timm_light"),
    ("cbam_channel", "timm_light", None, {}, "make_timm_light_channel"),
    ("cbam_spatial", "timm_light", "train", {}, "make_timm_light_spatial"),
    ("cbam_spatial", "timm_light", "eval", {}, "make_timm_light_spatial"),
    # every switch timm's classes have: mlp_bias, rd_channels, rd_ratio,
    # rd_divisor, the kernel size
    ("cbam", "timm", "train", {"mlp_bias": True, "hidden_channels": 5,
                               "spatial_kernel": 3}, "make_timm"),
    ("cbam", "timm", "eval", {"reduction": 4, "hidden_divisor": 8}, "make_timm"),
    ("cbam", "timm_light", "train", {"mlp_bias": True, "reduction": 8,
                                     "spatial_kernel": 5}, "make_timm_light"),
]


def _ids(cases):
    return [f"{b}-{p}-{m}-{f}" + ("-" + "-".join(map(str, o)) if o else "")
            for b, p, m, o, f in cases]


@pytest.mark.parametrize("block, preset, mode, overrides, factory", ANCHOR_CASES,
                         ids=_ids(ANCHOR_CASES))
def test_parity_with_anchor(torch, anchors, block, preset, mode, overrides, factory):
    spec = SPECS[block]
    cfg = spec.config(preset, **overrides)
    if mode is not None:
        cfg = spec.with_bn_mode(cfg, mode)
    shapes = {"x": (3, 32, 7, 6)}
    inputs, params, state = draw_clear(spec, cfg, shapes, seed=4)
    dout = np.random.default_rng(7).standard_normal(shapes["x"])
    ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
    module = getattr(anchors, factory)(config_to_dict(cfg) | {"channels": 32})
    assert module.training == (mode != "eval")
    names = spec.anchor_names(preset, cfg, shapes)
    assert set(names) == set(params) | set(state)
    got = torch_tensors(torch, module, names, inputs, params, state, dout)
    errors = compare(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] < PARITY_RTOL, (worst, errors)


def _logsumexp_exact(x: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis: s + log Σ exp(x − s), each sum exact
    (math.fsum), so only exp and log round (a few ulp)."""
    import math

    s = x.max(axis=-1)
    e = np.exp(x - s[..., None])
    sums = np.array([math.fsum(r) for r in e.reshape(-1, e.shape[-1])])
    return s + np.log(sums.reshape(s.shape))


def test_anchor_lse_pool_is_round_off_exact_over_many_threads(torch, anchors) -> None:
    """The parity input's lse pool is one exp over 4,032 float64 values, two
    threads' chunks.  On the MKL in torch 2.13's wheels the first such call of
    a process could run one chunk through a low-accuracy kernel (errors up to
    3.3e-9, ~1e-10 in the pool, pytorch/pytorch#188792); the torch fixture
    settles MKL's choice on one thread first (settle_vml_dispatch of the torch
    adapter, which ``refattn validate --torch`` runs too).
    The pool agrees with an exactly summed logsumexp to round-off, and an
    error a tenth the size of that one fails the check."""
    from refattn.adapters import torch as adapter

    assert id(torch) in adapter._settled
    x = np.random.default_rng(11).standard_normal((3, 32, 7, 6))
    got = anchors.logsumexp_2d(torch.tensor(x)).numpy()[..., 0]  # (N, C)
    want = _logsumexp_exact(x.reshape(3, 32, -1))
    assert rel_err(got, want) < 1e-14
    for bad in (got * (1 + 1e-11), got[::-1], np.zeros_like(got)):
        assert rel_err(bad, want) > 1e-14


def test_luuuyi_ignores_its_ratio(torch, anchors) -> None:
    """luuuyi PR #16: the width is C // 16 whatever the ratio, so reduction 8
    weights do not fit the anchor."""
    cfg = SPECS["cbam"].config("luuuyi", reduction=8)
    module = anchors.make_luuuyi(config_to_dict(cfg) | {"channels": 32})
    assert tuple(module.ca.fc[0].weight.shape) == (2, 32, 1, 1)
    assert cbam_spec.param_shapes(cfg, {"x": (2, 32, 5, 5)})["mlp.fc1.weight"] == (4, 32)


def test_anchor_factories_refuse_what_they_cannot_express(anchors) -> None:
    d = config_to_dict(cbam.PRESETS["jongchan"]) | {"channels": 32}
    with pytest.raises(ValueError, match="channel_pool_order"):
        anchors.make_jongchan(d | {"channel_pool_order": "mean_max"})
    with pytest.raises(ValueError, match="spatial_bn"):
        anchors.make_luuuyi(config_to_dict(cbam.PRESETS["luuuyi"]) | {
            "channels": 32, "spatial_bn": "train"})
    with pytest.raises(ValueError, match="spatial_kernel"):
        anchors.make_seed(config_to_dict(cbam.PRESETS["seed"]) | {
            "channels": 32, "spatial_kernel": 3})
    with pytest.raises(ValueError, match="channels"):
        anchors.make_jongchan(config_to_dict(cbam.PRESETS["jongchan"]))


ALL_JONGCHAN = {"out", "aux.channel_gate", "aux.spatial_gate", "grad.input.x",
                "state.spatial.bn.running_mean", "state.spatial.bn.running_var"} | {
    f"grad.param.{k}" for k in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                                "mlp.fc2.bias", "spatial.conv.weight",
                                "spatial.bn.weight", "spatial.bn.bias")}
MLP_GRADS = {f"grad.param.mlp.{k}" for k in ("fc1.weight", "fc1.bias", "fc2.weight",
                                             "fc2.bias")}
BUGS = {  # factory -> the tensors that must differ (all others must agree)
    "make_jongchan_swapped_pool_order": ALL_JONGCHAN - {"aux.channel_gate"},
    "make_jongchan_summed_descriptors": ALL_JONGCHAN,
    "make_jongchan_separate_mlps": MLP_GRADS,
    "make_jongchan_no_spatial_sigmoid": ALL_JONGCHAN - {
        "aux.channel_gate", "state.spatial.bn.running_mean",
        "state.spatial.bn.running_var"},
}


def jongchan_case(seed: int = 4):
    """The jongchan preset, drawn so that every pool type's MLP branch has
    active hidden units (kink_margin redraws a dead branch, which would hide
    a per-branch MLP bug from the fc1 gradients)."""
    spec = SPECS["cbam"]
    cfg = spec.config("jongchan")
    shapes = {"x": (3, 32, 7, 6)}
    inputs, params, state = draw_clear(spec, cfg, shapes, seed=seed)
    _, cache = spec.forward(inputs, params, state, cfg)
    assert all(np.any(h > 0) for h in cache.channel.hidden)
    dout = np.random.default_rng(7).standard_normal(shapes["x"])
    ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
    names = spec.anchor_names("jongchan", cfg, shapes)
    return cfg, names, inputs, params, state, dout, ref


@pytest.mark.parametrize("factory", sorted(BUGS))
def test_buggy_variants_disagree(torch, anchors, factory: str) -> None:
    cfg, names, inputs, params, state, dout, ref = jongchan_case()
    module = getattr(anchors, factory)(config_to_dict(cfg) | {"channels": 32})
    errors = compare(torch_tensors(torch, module, names, inputs, params, state, dout),
                     ref)
    differ = {k for k, e in errors.items() if e > 1e-6}
    agree = {k for k, e in errors.items() if e < PARITY_RTOL}
    assert differ == BUGS[factory], errors
    assert agree == set(errors) - differ, errors


def test_swapped_pool_order_agrees_with_swapped_weights(torch, anchors) -> None:
    cfg, names, inputs, params, state, dout, ref = jongchan_case()
    w = params["spatial.conv.weight"]
    swapped = dict(params, **{"spatial.conv.weight": w[:, [1, 0]]})
    module = anchors.make_jongchan_swapped_pool_order(config_to_dict(cfg) | {
        "channels": 32})
    got = torch_tensors(torch, module, names, inputs, swapped, state, dout)
    got["grad.param.spatial.conv.weight"] = got["grad.param.spatial.conv.weight"][
        :, [1, 0]]
    errors = compare(got, ref)
    assert max(errors.values()) < PARITY_RTOL, errors


# ---------------------------------------------------------------------------
# the library variants: hidden width, one-layer MLP, avgmax pools, SE


@pytest.mark.parametrize("divisor", [1, 8])
def test_hidden_divisor_is_timms_make_divisible(anchors, divisor: int) -> None:
    """Cr = make_divisible(C / r, d, round_limit=0.) as timm computes it (in
    floats, C * (1 / r)), for every C up to 300 and power-of-two r; and it
    differs from C // r where rounding half up does."""
    differs = 0
    for r in (1, 2, 4, 8, 16, 32):
        cfg = SPECS["cbam"].config("timm", reduction=r, hidden_divisor=divisor)
        for C in range(1, 301):
            want = anchors.make_divisible(C * (1.0 / r), divisor, round_limit=0.0)
            got = cbam_spec.param_shapes(cfg, {"x": (1, C, 2, 2)})["mlp.fc1.weight"]
            assert got == (want, C), (r, C)
            differs += want != C // r
    assert differs > 100


def test_hidden_width_keys() -> None:
    shapes = {"x": (2, 40, 3, 3)}

    def width(**overrides):
        cfg = SPECS["cbam"].config("jongchan", **overrides)
        return cbam_spec.param_shapes(cfg, shapes)["mlp.fc1.weight"][0]

    assert width() == 2  # 40 // 16
    assert width(hidden_divisor=1) == 3  # 40 / 16 = 2.5, rounded half up
    assert width(hidden_divisor=8) == 8  # at least the divisor
    assert width(hidden_divisor=2, reduction=4) == 10
    assert width(hidden_channels=7) == 7
    assert width(hidden_channels=7, hidden_divisor=8, reduction=2) == 7  # it wins
    assert width(hidden_channels=64) == 64  # wider than C is allowed
    one = SPECS["cbam"].config("ultralytics", hidden_channels=3, reduction=64)
    assert cbam_spec.param_shapes(one, shapes)["mlp.fc1.weight"] == (40, 40)
    # C < r, which the floor rule refuses, has a width with a divisor
    small = SPECS["cbam"].config("timm")
    fc1 = cbam_spec.param_shapes(small, {"x": (1, 8, 2, 2)})["mlp.fc1.weight"]
    assert fc1 == (1, 8)
    with pytest.raises(ValueError, match="would be 0 .*hidden_channels or hidden_div"):
        SPECS["cbam"].param_shapes(SPECS["cbam"].config("seed"), {"x": (1, 8, 2, 2)})


def test_variant_anchor_names() -> None:
    shapes = {"x": (2, 8, 7, 6)}
    ul = cbam.PRESETS["ultralytics"]
    assert SPECS["cbam"].anchor_names("ultralytics", ul, shapes) == {
        "mlp.fc1.weight": "channel_attention.fc.weight",
        "mlp.fc1.bias": "channel_attention.fc.bias",
        "spatial.conv.weight": "spatial_attention.cv1.weight"}
    for preset in ("timm", "timm_light"):
        assert SPECS["cbam"].anchor_names(preset, cbam.PRESETS[preset], shapes) == {
            "mlp.fc1.weight": "channel.fc1.weight",
            "mlp.fc2.weight": "channel.fc2.weight",
            "spatial.conv.weight": "spatial.conv.conv.weight",
            "spatial.bn.weight": "spatial.conv.bn.weight",
            "spatial.bn.bias": "spatial.conv.bn.bias",
            "spatial.bn.running_mean": "spatial.conv.bn.running_mean",
            "spatial.bn.running_var": "spatial.conv.bn.running_var"}
    light = cbam.PRESETS["timm_light"]
    assert cbam_spec.param_shapes(light, shapes)["spatial.conv.weight"] == (1, 1, 7, 7)


def test_variant_fixture_shapes_and_anchor_init() -> None:
    assert SPECS["cbam"].fixture_shapes(cbam.PRESETS["seed"]) == {"x": (2, 32, 7, 6)}
    for preset in ("ultralytics", "timm", "timm_light"):
        cfg = cbam.PRESETS[preset]
        assert SPECS["cbam"].fixture_shapes(cfg) == {"x": (2, 8, 7, 6)}
        assert SPECS["cbam_spatial"].fixture_shapes(cfg) == {"x": (2, 4, 7, 6)}
    # PyTorch's defaults: BN gamma 1, beta 0, running statistics (0, 1); every
    # weight and bias within ±1/sqrt(fan_in)
    shapes = {"x": (2, 8, 7, 6)}
    for preset in ("ultralytics", "timm", "timm_light"):
        params, state = cbam_spec.init_params(cbam.PRESETS[preset], shapes, seed=2,
                                              anchor_init=True)
        for k, v in params.items():
            if k.startswith("spatial.bn."):
                assert np.all(v == (1.0 if k.endswith("weight") else 0.0)), k
                continue
            w = params[k.rsplit(".", 1)[0] + ".weight"]
            bound = 1 / np.sqrt(np.prod(w.shape[1:]))
            assert np.all(np.abs(v) <= bound) and np.any(v != 0), k
        assert {k: float(v[0]) for k, v in state.items()} in ({}, {
            "spatial.bn.running_mean": 0.0, "spatial.bn.running_var": 1.0})


def test_avgmax_with_a_linear_mlp_halves_the_two_pool_logits() -> None:
    """One linear layer is linear: W ½(avg + max) = ½ (W avg + W max), so
    pool_types ['avgmax'] with W equals ['avg', 'max'] with W / 2 (no bias),
    forward and backward (dW = ½ dW')."""
    spec = SPECS["cbam_channel"]
    light = spec.config("ultralytics", mlp_bias=False, pool_types=("avgmax",))
    two = dataclasses.replace(light, pool_types=("avg", "max"))
    inputs, params, state = draw_clear(spec, light, {"x": (2, 6, 4, 5)})
    dout = np.random.default_rng(3).standard_normal((2, 6, 4, 5))
    got = refattn_tensors(spec, light, inputs, params, state, dout)
    half = {k: v / 2 for k, v in params.items()}
    ref = refattn_tensors(spec, two, inputs, half, state, dout)
    ref["grad.param.mlp.fc1.weight"] = ref["grad.param.mlp.fc1.weight"] / 2
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-13, k
    # and it is not the sum of the two pools' logits (a missing ½)
    wrong = refattn_tensors(spec, two, inputs, params, state, dout)
    assert rel_err(wrong["aux.channel_gate"], got["aux.channel_gate"]) > 1e-3


def test_avgmax_spatial_descriptor_is_a_halved_two_map_conv() -> None:
    """The 1-map conv with w on ½(mean + max) equals the 2-map conv with
    [w/2, w/2] on [mean, max], forward and backward (dw = ½ Σ dW')."""
    spec = SPECS["cbam_spatial"]
    one = spec.config("timm_light", spatial_bn="eval")
    two = dataclasses.replace(one, channel_pool_order="mean_max")
    inputs, params, state = draw_clear(spec, one, {"x": (2, 5, 6, 4)})
    dout = np.random.default_rng(4).standard_normal((2, 5, 6, 4))
    got = refattn_tensors(spec, one, inputs, params, state, dout)
    w = params["spatial.conv.weight"]  # (1, 1, k, k)
    split = dict(params, **{"spatial.conv.weight": np.concatenate([w / 2, w / 2], 1)})
    ref = refattn_tensors(spec, two, inputs, split, state, dout)
    dw = ref["grad.param.spatial.conv.weight"]
    ref["grad.param.spatial.conv.weight"] = 0.5 * (dw[:, :1] + dw[:, 1:])
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-13, k
    x = inputs["x"]
    want = 0.5 * (x.mean(axis=1, keepdims=True) + x.max(axis=1, keepdims=True))
    out, _ = spec.forward(inputs, params, state, one)
    assert rel_err(out["aux.spatial_descriptor"], want) < 1e-15


def test_kink_margin_of_the_variants() -> None:
    """avgmax holds a max (ties count); one layer has no ReLU (no dead-branch
    redraw)."""
    spec = SPECS["cbam_channel"]
    cfg = spec.config("timm_light")
    inputs, params, state = draw_clear(spec, cfg)
    x = inputs["x"].copy()
    x[0, 2, 1, 1] = x[0, 2, 3, 4] = 9.0
    assert spec.kink_margin(spec.forward({"x": x}, params, state, cfg)[1]) == 0.0
    one = spec.config("ultralytics")
    inputs, params, state = draw_case(spec, one)
    _, cache = spec.forward(inputs, params, state, one)
    assert cache.gate.hidden is None and cache.gate.fc2 is None
    assert spec.kink_margin(cache) == np.inf  # avg pool, no ReLU: no kink at all
    dead = dict(params, **{"mlp.fc1.bias": np.full(8, -100.0)})  # no ReLU to kill
    assert spec.kink_margin(spec.forward(inputs, dead, state, one)[1]) == np.inf


SE_CASES = [  # (overrides of the timm preset, SEModule arguments they stand for)
    ({"pool_types": ["avg"], "mlp_bias": True, "hidden_divisor": 8}, "defaults"),
    ({"pool_types": ["avgmax"], "mlp_bias": True, "hidden_divisor": 8},
     "add_maxpool=True"),
    ({"pool_types": ["avg"], "mlp_bias": False, "hidden_divisor": 8,
      "reduction": 4}, "bias=False, rd_ratio=0.25"),
    ({"pool_types": ["avg"], "mlp_bias": True, "hidden_channels": 5},
     "rd_channels=5"),
]


@pytest.mark.parametrize("overrides, what", SE_CASES, ids=[w for _, w in SE_CASES])
def test_parity_with_timm_se_module(torch, anchors, overrides, what) -> None:
    """timm's SEModule is cbam_channel with the mean (or avgmax) pool, the
    MLP with biases and hidden_divisor 8; its names are the gate's own
    (fc1.*, fc2.*)."""
    spec = SPECS["cbam_channel"]
    cfg = spec.config("timm", **overrides)
    shapes = {"x": (3, 40, 5, 6)}
    inputs, params, state = draw_clear(spec, cfg, shapes, seed=4)
    dout = np.random.default_rng(7).standard_normal(shapes["x"])
    ref = refattn_tensors(spec, cfg, inputs, params, state, dout)
    module = anchors.make_timm_se(config_to_dict(cfg) | {"channels": 40})
    names = {k: k.removeprefix("mlp.") for k in params}
    assert set(names.values()) == set(module.state_dict())
    errors = compare(torch_tensors(torch, module, names, inputs, params, state, dout),
                     ref)
    assert max(errors.values()) < PARITY_RTOL, errors


MISCONFIGURED = [  # (block, factory, preset, refattn's overrides, tensors that differ)
    # the light anchor against refattn's two-descriptor CBAM: the MLP sees the
    # avg and max descriptors separately instead of their average
    ("cbam_channel", "make_timm_light_channel", "timm_light",
     {"pool_types": ("avg", "max")},
     {"out", "aux.channel_gate", "grad.input.x", "grad.param.mlp.fc1.weight",
      "grad.param.mlp.fc2.weight"}),
    # ultralytics' [mean, max] against refattn's [max, mean]
    ("cbam", "make_ultralytics", "ultralytics", {"channel_pool_order": "max_mean"},
     {"out", "aux.spatial_gate", "grad.input.x", "grad.param.mlp.fc1.weight",
      "grad.param.mlp.fc1.bias", "grad.param.spatial.conv.weight"}),
]


@pytest.mark.parametrize("block, factory, preset, overrides, differ", MISCONFIGURED,
                         ids=[m[1] for m in MISCONFIGURED])
def test_variant_parity_fails_on_a_wrong_config(torch, anchors, block, factory, preset,
                                               overrides, differ) -> None:
    """The parity comparison can fail: the anchor built for the preset, refattn
    run with one key changed (same parameters); every other tensor agrees."""
    spec = SPECS[block]
    cfg = spec.config(preset)
    wrong = dataclasses.replace(cfg, **overrides)
    shapes = {"x": (3, 16, 7, 6)}
    inputs, params, state = draw_clear(spec, wrong, shapes, seed=4)
    dout = np.random.default_rng(7).standard_normal(shapes["x"])
    ref = refattn_tensors(spec, wrong, inputs, params, state, dout)
    module = getattr(anchors, factory)(config_to_dict(cfg) | {"channels": 16})
    names = spec.anchor_names(preset, cfg, shapes)
    errors = compare(torch_tensors(torch, module, names, inputs, params, state, dout),
                     ref)
    assert {k for k, e in errors.items() if e > 1e-6} == differ, errors
    assert all(e < PARITY_RTOL for k, e in errors.items() if k not in differ), errors


def test_variant_factories_refuse_what_they_cannot_express(anchors) -> None:
    def d(preset, **over):
        return config_to_dict(cbam.PRESETS[preset]) | {"channels": 16} | over

    with pytest.raises(ValueError, match="spatial_kernel 3 or 7"):
        anchors.make_ultralytics(d("ultralytics", spatial_kernel=5))
    with pytest.raises(ValueError, match="mlp_layers"):
        anchors.make_ultralytics(d("ultralytics", mlp_layers=2))
    with pytest.raises(ValueError, match="always has a BatchNorm2d"):
        anchors.make_timm(d("timm", spatial_bn=None))
    with pytest.raises(ValueError, match="bn_momentum"):
        anchors.make_timm_spatial(d("timm", bn_momentum=0.01))
    with pytest.raises(ValueError, match="channel_pool_order"):
        anchors.make_timm_light(d("timm_light", channel_pool_order="mean_max"))
    with pytest.raises(ValueError, match="pool_types"):
        anchors.make_timm(d("timm", pool_types=["avgmax"]))
    with pytest.raises(ValueError, match=r"add_maxpool.*\['avg', 'max'\]"):
        anchors.make_timm_se(d("timm"))
