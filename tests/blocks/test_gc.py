"""The GC (global context) block: configs and presets, gradient checks over
every preset and pooling/fusion combination, the strict backend, properties,
identities, PyTorch parity with mmcv's ContextBlock structure, and planted
bugs (a wrong refattn backward caught by gradcheck; wrong PyTorch modules,
one with a right forward and a wrong backward, caught by validate)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks import gc
from refattn.blocks.gc import FUSION_TYPES, POOLING_TYPES, GCConfig
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import MIN_MARGIN, config_to_dict, to_namespace
from refattn.blocks.specs import gc as gc_spec

SPEC = gc_spec.SPECS["gc"]
PARITY_RTOL = 1e-11
ZERO_ATOL = 1e-10  # analytically-zero gradients: pure round-off
FUSIONS = (("channel_add",), ("channel_mul",), ("channel_add", "channel_mul"))
COMBOS = list(itertools.product(gc.PRESETS, POOLING_TYPES, FUSIONS))
TINY = {"x": (2, 8, 3, 5)}  # odd, unequal H and W


def cfg_of(preset: str = "mmcv", **kw: Any) -> GCConfig:
    return dataclasses.replace(gc.PRESETS[preset], **kw)


def rel_err(actual: Any, expected: Any) -> float:
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale


def draw_clear(cfg: GCConfig, shapes: dict | None = None, seed: int = 0):
    """draw_case, redrawn until every ReLU input keeps MIN_MARGIN."""
    for s in range(seed, seed + 40):
        inputs, params, state = draw_case(SPEC, cfg, shapes, seed=s)
        _, cache = SPEC.forward(inputs, params, state, cfg)
        if SPEC.kink_margin(cache) >= MIN_MARGIN:
            return inputs, params, state
    raise AssertionError("no draw kept the margin")  # pragma: no cover


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def numpy_gc(cfg: GCConfig, x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """The block written directly from the paper's equations with einsum (an
    independent check of the forward, float64)."""
    n, c, h, w = x.shape
    x3 = x.reshape(n, c, h * w)
    if cfg.pooling_type == "att":
        logits = np.einsum("c,ncl->nl", p["conv_mask.weight"].reshape(c), x3)
        logits = logits + p["conv_mask.bias"][0]
        alpha = np.exp(logits - logits.max(axis=1, keepdims=True))
        alpha /= alpha.sum(axis=1, keepdims=True)
        context = np.einsum("ncl,nl->nc", x3, alpha)
    else:
        context = x3.mean(axis=2)

    def delta(b: str) -> np.ndarray:
        w1 = p[f"{b}.conv1.weight"][:, :, 0, 0]
        u = context @ w1.T + p[f"{b}.conv1.bias"]  # (N, P)
        mu = u.mean(axis=1, keepdims=True)
        var = ((u - mu) ** 2).mean(axis=1, keepdims=True)
        v = (u - mu) / np.sqrt(var + cfg.ln_eps)
        v = v * p[f"{b}.ln.weight"].reshape(-1) + p[f"{b}.ln.bias"].reshape(-1)
        t = np.maximum(v, 0.0) @ p[f"{b}.conv2.weight"][:, :, 0, 0].T
        return (t + p[f"{b}.conv2.bias"])[:, :, None, None]  # (N, C, 1, 1)

    out = x
    if "channel_mul" in cfg.fusion_types:
        out = out * sigmoid(delta("channel_mul"))
    if "channel_add" in cfg.fusion_types:
        out = out + delta("channel_add")
    return out


# ---------------------------------------------------------------------------
# configs, presets, shapes


def test_registry_entry() -> None:
    from refattn.blocks.registry import BLOCKS

    assert BLOCKS["gc"] is SPEC
    assert SPEC.default_preset == "mmcv"
    assert SPEC.presets is gc.PRESETS
    assert GCConfig() == gc.PRESETS["mmcv"]


PRESET_TABLE = {  # mmcv ContextBlock arguments; the paper's r = 16
    "mmcv": dict(ratio=0.25, planes=None, pooling_type="att",
                 fusion_types=("channel_add",), ln_eps=1e-5),
    "gcnet_r16": dict(ratio=0.0625, planes=None, pooling_type="att",
                      fusion_types=("channel_add",), ln_eps=1e-5),
}


def test_presets_are_complete() -> None:
    assert set(gc.PRESETS) == set(PRESET_TABLE)
    fields = {f.name for f in dataclasses.fields(GCConfig)}
    for name, want in PRESET_TABLE.items():
        assert set(want) == fields
        assert dataclasses.asdict(gc.PRESETS[name]) == want, name


@pytest.mark.parametrize("c, ratio, want", [
    (16, 0.25, 4), (64, 1 / 16, 4), (256, 1 / 16, 16), (10, 0.25, 2), (7, 0.5, 3)])
def test_resolved_planes_is_mmcvs_int_c_times_ratio(c, ratio, want) -> None:
    shapes = {"x": (2, c, 3, 3)}
    assert gc_spec.resolve(cfg_of(ratio=ratio), shapes).planes == want
    assert gc_spec.resolve(cfg_of(ratio=ratio, planes=5), shapes).planes == 5
    assert SPEC.param_shapes(cfg_of(ratio=ratio), shapes)[
        "channel_add.conv1.weight"] == (want, c, 1, 1)


@pytest.mark.parametrize("pool, fusion", list(itertools.product(POOLING_TYPES, FUSIONS)))
def test_param_shapes(pool: str, fusion: tuple[str, ...]) -> None:
    shapes = SPEC.param_shapes(cfg_of(pooling_type=pool, fusion_types=fusion),
                               {"x": (2, 12, 3, 5)})
    want: dict[str, tuple] = {}
    if pool == "att":
        want |= {"conv_mask.weight": (1, 12, 1, 1), "conv_mask.bias": (1,)}
    for b in FUSION_TYPES:
        if b in fusion:
            want |= {f"{b}.conv1.weight": (3, 12, 1, 1), f"{b}.conv1.bias": (3,),
                     f"{b}.ln.weight": (3, 1, 1), f"{b}.ln.bias": (3, 1, 1),
                     f"{b}.conv2.weight": (12, 3, 1, 1), f"{b}.conv2.bias": (12,)}
    assert shapes == want
    assert list(shapes) == list(want)  # canonical order, whatever the config's


BAD_CONFIGS = [
    (dict(ratio=0.0), r"ratio: expected a finite float > 0, got 0.0"),
    (dict(ratio=float("nan")), r"ratio: expected a finite number"),
    (dict(ratio="1/4"), r"ratio: expected a real number, got '1/4'"),
    (dict(planes=0), r"planes: expected an int >= 1 or None, got 0"),
    (dict(pooling_type="max"), r"pooling_type: expected one of 'att', 'avg'"),
    (dict(fusion_types=()), r"fusion_types: .* got an empty sequence"),
    (dict(fusion_types=("channel_sub",)), r"fusion_types: unknown item\(s\) "
                                          r"'channel_sub'"),
    (dict(fusion_types="channel_add"), r"fusion_types: expected a non-empty"),
    (dict(fusion_types=("channel_add", "channel_add")), r"each item may appear once"),
    (dict(ln_eps=0.0), r"ln_eps: expected a finite float > 0"),
]


@pytest.mark.parametrize("overrides, match", BAD_CONFIGS)
def test_bad_configs(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gc_spec.check_config(GCConfig(**overrides))
    with pytest.raises(ValueError, match=match):
        SPEC.config("mmcv", **overrides)


def test_fusion_order_in_the_config_does_not_matter() -> None:
    a = cfg_of(fusion_types=("channel_add", "channel_mul"))
    b = cfg_of(fusion_types=["channel_mul", "channel_add"])
    inputs, params, state = draw_case(SPEC, a, TINY)
    assert list(SPEC.param_shapes(b, TINY)) == list(params)
    out_a, _ = SPEC.forward(inputs, params, state, a)
    out_b, _ = SPEC.forward(inputs, params, state, SPEC.check_config(b))
    np.testing.assert_array_equal(out_a["out"], out_b["out"])


@pytest.mark.parametrize("shape, cfg, match", [
    ((2, 4, 5), cfg_of(), r"x: expected a 4-D .*array, got shape \(2, 4, 5\)"),
    ((2, 4, 2, 3, 5), cfg_of(), r"x: expected a 4-D"),
    ((2, 3, 5, 5), cfg_of(), r"ratio: the bottleneck has int\(C \* ratio\) = "
                             r"int\(3 \* 0.25\) = 0 channels; expected >= 1"),
])
def test_bad_input_shapes(shape, cfg, match) -> None:
    with pytest.raises(ValueError, match=match):
        SPEC.param_shapes(cfg, {"x": shape})
    x = np.zeros(shape)
    with pytest.raises(ValueError, match=match):
        SPEC.forward({"x": x}, {}, {}, cfg)


def test_bad_params_and_douts() -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_case(SPEC, cfg, TINY)
    fwd = SPEC.forward
    with pytest.raises(ValueError, match=r"params: missing key\(s\) 'conv_mask.bias'"):
        fwd(inputs, {k: v for k, v in params.items() if k != "conv_mask.bias"},
            state, cfg)
    with pytest.raises(ValueError, match=r"params: unexpected key\(s\) 'conv_mask.*"
                                         r"pooling_type='avg'"):
        fwd(inputs, params, state, dataclasses.replace(cfg, pooling_type="avg"))
    bad = dict(params, **{"channel_mul.ln.weight": np.ones((2,))})
    with pytest.raises(ValueError, match=r"channel_mul.ln.weight: expected shape "
                                         r"\(2, 1, 1\)"):
        fwd(inputs, bad, state, cfg)
    bad = dict(params, **{"channel_add.conv2.bias": np.full(8, np.inf)})
    with pytest.raises(ValueError, match=r"channel_add.conv2.bias: expected finite"):
        fwd(inputs, bad, state, cfg)
    bad = dict(params, **{"conv_mask.weight": params["conv_mask.weight"]
                          .astype(np.float32)})
    with pytest.raises(TypeError, match="one dtype"):
        fwd(inputs, bad, state, cfg)
    with pytest.raises(ValueError, match=r"inputs: gc takes \['x'\], got"):
        fwd(inputs | {"y": inputs["x"]}, params, state, cfg)
    with pytest.raises(TypeError, match="cfg: expected a GCConfig"):
        fwd(inputs, params, state, gc.PRESETS)
    _, cache = fwd(inputs, params, state, cfg)
    with pytest.raises(ValueError, match=r"douts\['out'\]: expected shape"):
        SPEC.backward({"out": np.zeros((2, 8, 5, 3))}, cache)
    with pytest.raises(TypeError, match="dtype"):
        SPEC.backward({"out": np.zeros(TINY["x"], np.float32)}, cache)
    with pytest.raises(ValueError, match="differentiates only 'out'"):
        SPEC.backward({"out": np.zeros(TINY["x"]), "aux.attention": 0}, cache)
    with pytest.raises(TypeError, match="cache: gc backward needs"):
        SPEC.backward({"out": np.zeros(TINY["x"])}, cache._asdict())


def test_fixture_shapes_accumulation_flops_bn_mode() -> None:
    assert SPEC.fixture_shapes(gc.PRESETS["mmcv"]) == {"x": (2, 16, 5, 7)}
    assert SPEC.fixture_shapes(gc.PRESETS["gcnet_r16"]) == {"x": (2, 64, 5, 7)}
    for preset in gc.PRESETS:
        cfg = gc.PRESETS[preset]
        shapes = SPEC.fixture_shapes(cfg)
        assert SPEC.resolve(cfg, shapes).planes == 4
        assert SPEC.with_bn_mode(cfg, "eval") is None
        acc = SPEC.accumulation(cfg, shapes)
        assert acc["grad.param"] > acc["grad.input"] > acc["out"] > 0
    with pytest.raises(ValueError, match="mode: expected 'train' or 'eval'"):
        SPEC.with_bn_mode(gc.PRESETS["mmcv"], "test")
    # FLOPs counted by hand: conv_mask and the pool 2·N·C·L each, and two
    # bottleneck convs 2·N·C·P per branch
    shapes = {"x": (2, 16, 5, 7)}
    both = cfg_of(fusion_types=("channel_add", "channel_mul"))
    assert SPEC.flops(both, shapes) == 2 * (2 * 2 * 16 * 35) + 2 * 2 * (2 * 2 * 16 * 4)
    avg = cfg_of(pooling_type="avg")
    assert SPEC.flops(avg, shapes) == 2 * (2 * 2 * 16 * 4)


def test_init_params() -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    shapes = {"x": (2, 64, 5, 7)}
    params, state = SPEC.init_params(cfg, shapes, seed=3)
    assert state == {} and set(params) == set(SPEC.param_shapes(cfg, shapes))
    for k, v in params.items():
        assert np.all(v != 0), k  # random draws: no zero inits
    again, _ = SPEC.init_params(cfg, shapes, seed=3)
    for k in params:
        np.testing.assert_array_equal(params[k], again[k])
    # mmcv's reset_parameters: last convs zero, LN (1, 0), conv_mask
    # Kaiming-normal fan_in (std sqrt(2 / C)) with zero bias
    anchor, _ = SPEC.init_params(cfg, shapes, seed=3, anchor_init=True)
    for b in FUSION_TYPES:
        assert not np.any(anchor[f"{b}.conv2.weight"]) and not np.any(
            anchor[f"{b}.conv2.bias"])
        assert np.all(anchor[f"{b}.ln.weight"] == 1) and not np.any(
            anchor[f"{b}.ln.bias"])
        assert np.max(np.abs(anchor[f"{b}.conv1.weight"])) <= 1 / 8  # U(±1/sqrt(64))
    assert not np.any(anchor["conv_mask.bias"])
    std = float(np.std(anchor["conv_mask.weight"]))
    assert 0.6 * np.sqrt(2 / 64) < std < 1.4 * np.sqrt(2 / 64)


def test_anchor_init_is_the_identity() -> None:
    """mmcv's zero last convs: δ_add = 0 and σ(δ_mul) = 1/2."""
    for fusion in FUSIONS:
        cfg = cfg_of(fusion_types=fusion)
        inputs, _, _ = draw_case(SPEC, cfg, TINY)
        params, state = SPEC.init_params(cfg, TINY, seed=0, anchor_init=True)
        outputs, _ = SPEC.forward(inputs, params, state, cfg)
        scale = 0.5 if "channel_mul" in fusion else 1.0
        np.testing.assert_array_equal(outputs["out"], scale * inputs["x"])


# ---------------------------------------------------------------------------
# forward semantics


@pytest.mark.parametrize("preset, pool, fusion", COMBOS)
def test_forward_matches_the_equations(preset, pool, fusion) -> None:
    cfg = SPEC.resolve(cfg_of(preset, pooling_type=pool, fusion_types=fusion),
                       {"x": (2, 32, 3, 5)})
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 32, 3, 5)}, seed=4)
    outputs, _ = SPEC.forward(inputs, params, state, cfg)
    want = numpy_gc(cfg, inputs["x"], params)
    assert rel_err(outputs["out"], want) < 1e-13


def test_mul_is_applied_before_add_and_aux_outputs() -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_case(SPEC, cfg, TINY, seed=5)
    outputs, _ = SPEC.forward(inputs, params, state, cfg)
    x = inputs["x"]
    gate = outputs["aux.channel_mul"]
    add_only = {k: v for k, v in params.items() if not k.startswith("channel_mul")}
    added, _ = SPEC.forward(inputs, add_only, {}, cfg_of())
    add_term = added["out"] - x  # δ_add, broadcast
    np.testing.assert_allclose(outputs["out"], x * gate + add_term, rtol=1e-13,
                               atol=1e-13)
    wrong = (x + add_term) * gate  # add before mul
    assert rel_err(outputs["out"], wrong) > 1e-2
    att = outputs["aux.attention"]
    assert att.shape == (2, 1, 3, 5) and gate.shape == (2, 8, 1, 1)
    np.testing.assert_allclose(att.sum(axis=(1, 2, 3)), 1.0, rtol=1e-14)
    assert np.all(att > 0) and np.all((gate > 0) & (gate < 1))


def test_avg_pooling_is_the_spatial_mean() -> None:
    """With a constant attention (zero conv_mask) 'att' equals 'avg'."""
    cfg = cfg_of()
    inputs, params, state = draw_case(SPEC, cfg, TINY, seed=6)
    flat = params | {"conv_mask.weight": np.zeros((1, 8, 1, 1))}
    att, _ = SPEC.forward(inputs, flat, state, cfg)
    avg_params = {k: v for k, v in params.items() if not k.startswith("conv_mask")}
    avg, _ = SPEC.forward(inputs, avg_params, state, cfg_of(pooling_type="avg"))
    np.testing.assert_allclose(att["out"], avg["out"], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(att["aux.attention"], 1 / 15, rtol=1e-14)


def test_conv_mask_bias_gradient_vanishes() -> None:
    """The mask bias shifts every logit of a sample alike, which the softmax
    cancels: its gradient is round-off, while the weight's is not."""
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_case(SPEC, cfg, TINY, seed=7)
    dout = np.random.default_rng(7).standard_normal(TINY["x"])
    _, _, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    assert np.max(np.abs(dparams["conv_mask.bias"])) < ZERO_ATOL
    assert np.max(np.abs(dparams["conv_mask.weight"])) > 1e-3


# ---------------------------------------------------------------------------
# gradient checks


@pytest.mark.parametrize("preset, pool, fusion", COMBOS)
def test_gradcheck_full_tiny_every_combination(preset, pool, fusion) -> None:
    i = COMBOS.index((preset, pool, fusion))
    cfg = cfg_of(preset, pooling_type=pool, fusion_types=fusion)
    shapes = {"x": (2, 32, 3, 5)}  # P = 8 (mmcv) or 2 (gcnet_r16)
    inputs, params, state = draw_clear(cfg, shapes, seed=i)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


@pytest.mark.parametrize("preset", sorted(gc.PRESETS))
def test_gradcheck_presets_at_fixture_shapes(preset: str) -> None:
    cfg = gc.PRESETS[preset]
    inputs, params, state = draw_clear(cfg, seed=1)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


def test_gradcheck_with_a_one_channel_bottleneck() -> None:
    """P = 1: the LayerNorm of one value is β alone; the gradients behind it
    are exactly zero, and the check still passes."""
    cfg = cfg_of(planes=1, fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_case(SPEC, cfg, TINY, seed=2)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    dout = np.random.default_rng(2).standard_normal(TINY["x"])
    _, _, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    assert not np.any(dparams["channel_add.conv1.weight"])


@pytest.mark.parametrize("pool", POOLING_TYPES)
def test_gradcheck_on_backends(xb, pool: str) -> None:
    cfg = cfg_of(pooling_type=pool, fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_clear(cfg, TINY)
    report = gradcheck_block(SPEC, cfg, to_namespace(inputs, xb.xp, xb.device),
                             to_namespace(params, xb.xp, xb.device),
                             to_namespace(state, xb.xp, xb.device), mode="fast")
    assert report.ok, report.to_text()


PLANTED = [
    # (what the bug does, module attribute replaced, replacement, a tensor that
    # must fail)
    ("softmax Jacobian dropped", "_softmax_backward", lambda d, cache: d,
     "param.conv_mask.weight"),
    ("LayerNorm mean terms dropped", "_group_norm_backward",
     lambda d, cache: (d * cache.inv_std[:, :, None] * cache.weight[None, :, None],
                       (d * cache.xhat).sum(axis=(0, 2)), d.sum(axis=(0, 2))),
     "param.channel_add.conv1.weight"),
    ("sigmoid derivative dropped", "_gate_mul_backward",
     lambda d, cache: (d * cache.s, (d * cache.x).sum(axis=(2, 3), keepdims=True)),
     "param.channel_mul.conv2.weight"),
]


@pytest.mark.parametrize("what, attr, wrong, fails", PLANTED,
                         ids=[p[0] for p in PLANTED])
def test_a_planted_backward_bug_fails_the_check(monkeypatch, what, attr, wrong,
                                                fails) -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_clear(cfg, TINY)
    assert gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast").ok
    monkeypatch.setattr(gc, attr, wrong)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    assert fails in report.failed, report.failed


# ---------------------------------------------------------------------------
# backends, dtypes, properties


def test_strict_device_and_float32(xb) -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    inputs, params, state = draw_clear(cfg, TINY)
    f32 = {k: to_namespace(d, xb.xp, xb.device, "float32")
           for k, d in (("i", inputs), ("p", params), ("s", state))}
    dout64 = np.random.default_rng(0).standard_normal(TINY["x"])
    dout = xb.asarray(dout64.astype(np.float32))
    outputs, cache = SPEC.forward(f32["i"], f32["p"], f32["s"], cfg)
    dinputs, dparams = SPEC.backward({"out": dout}, cache)
    assert set(outputs) == {"out", "aux.attention", "aux.channel_mul"}
    for a in list(outputs.values()) + list(dinputs.values()) + list(dparams.values()):
        assert backend.dtype_name(a) == "float32"
        assert backend.device(a) == xb.device
    ref_out, ref_din, ref_dp = run_block(SPEC, cfg, inputs, params, state, dout64)
    assert rel_err(outputs["out"], ref_out["out"]) < 1e-5
    assert rel_err(dinputs["x"], ref_din["x"]) < 1e-4
    assert rel_err(dparams["conv_mask.weight"], ref_dp["conv_mask.weight"]) < 1e-3


@st.composite
def small_cases(draw):
    pool = draw(st.sampled_from(POOLING_TYPES))
    fusion = draw(st.sampled_from(FUSIONS))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    cfg = cfg_of(pooling_type=pool, fusion_types=fusion, ratio=1.0,
                 planes=draw(st.sampled_from([None, 1, 2, 5])))
    return cfg, (n, c, h, w), draw(st.integers(0, 2**16))


@settings(deadline=None)
@given(small_cases())
def test_properties_linearity_keys_no_mutation(case) -> None:
    cfg, shape, seed = case
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    saved = copy.deepcopy((inputs, params, state))
    rng = np.random.default_rng(seed)
    d1, d2 = rng.standard_normal(shape), rng.standard_normal(shape)
    d1_saved = d1.copy()
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    assert outputs["out"].shape == shape
    g1 = SPEC.backward({"out": d1}, cache)
    np.testing.assert_array_equal(d1, d1_saved)  # the caller's dout is read only
    g2 = SPEC.backward({"out": d2}, cache)
    g12 = SPEC.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    assert set(g1[0]) == {"x"} and g1[0]["x"].shape == shape
    assert list(g1[1]) == list(params)
    for k, v in g1[1].items():
        assert v.shape == params[k].shape, k
    for a, b, ab in zip((g1[0] | g1[1]).values(), (g2[0] | g2[1]).values(),
                        (g12[0] | g12[1]).values()):
        np.testing.assert_allclose(ab, 2.0 * a - 3.0 * b, rtol=1e-9, atol=1e-9)
    for before, after in zip(saved, (inputs, params, state)):
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])


@settings(deadline=None, max_examples=25)
@given(small_cases(), st.floats(-1.0, 1.0))
def test_property_directional_derivative_is_adjoint(case, t) -> None:
    """<dx, v> + Σ <dθ, u> equals the central difference of <dout, f> along
    (v, u): the backward is the adjoint of the forward's linearisation."""
    cfg, shape, seed = case
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    rng = np.random.default_rng(seed + 1)
    dout = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    u = {k: rng.standard_normal(a.shape) for k, a in params.items()}
    _, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    predicted = float(np.sum(dinputs["x"] * v)) + sum(
        float(np.sum(dparams[k] * u[k])) for k in params)
    h = 1e-6 * (1.0 + abs(t))

    def f(s: float) -> float:
        out, _ = SPEC.forward({"x": inputs["x"] + s * v},
                              {k: a + s * u[k] for k, a in params.items()}, state, cfg)
        return float(np.sum(out["out"] * dout))

    _, cache = SPEC.forward(inputs, params, state, cfg)
    if SPEC.kink_margin(cache) < 1e-3:
        return  # a ReLU input near its kink: the difference straddles it
    numeric = (f(h) - f(-h)) / (2 * h)
    assert abs(numeric - predicted) <= 1e-5 * (1.0 + abs(predicted))


# ---------------------------------------------------------------------------
# PyTorch parity (mmcv ContextBlock structure)


def torch_tensors(torch, module, names, inputs, params, dout) -> dict[str, np.ndarray]:
    sd = {names[k]: torch.from_numpy(np.array(v)) for k, v in params.items()}
    missing, unexpected = module.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    x = torch.tensor(inputs["x"], requires_grad=True)
    out = module(x)
    out.backward(torch.from_numpy(dout))
    named = dict(module.named_parameters())
    res = {"out": out, "grad.input.x": x.grad}
    if module.last_attention is not None:
        res["aux.attention"] = module.last_attention
    if module.last_gate is not None:
        res["aux.channel_mul"] = module.last_gate
    res |= {f"grad.param.{k}": named[names[k]].grad for k in params}
    return {k: v.detach().numpy() for k, v in res.items()}


def parity_errors(torch, factory, preset, cfg, shape, seed=0) -> dict[str, float]:
    """Error per tensor, refattn vs the PyTorch module (relative to the
    module's max |value|; absolute, key suffix " (abs)", for the mask bias)."""
    shapes = {"x": shape}
    cfg = gc_spec.resolve(cfg, shapes)
    inputs, params, state = draw_clear(cfg, shapes, seed=seed)
    dout = np.random.default_rng(seed + 100).standard_normal(shape)
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    mine = dict(outputs) | {"grad.input.x": dinputs["x"]}
    mine |= {f"grad.param.{k}": v for k, v in dparams.items()}
    names = SPEC.anchor_names(preset, cfg, shapes)
    conf = config_to_dict(cfg) | {"channels": shape[1]}
    theirs = torch_tensors(torch, factory(conf), names, inputs, params, dout)
    assert set(theirs) == set(mine)
    errors = {}
    for k, e in theirs.items():
        if k == "grad.param.conv_mask.bias":
            errors[f"{k} (abs)"] = float(np.max(np.abs(mine[k] - e)))
        else:
            errors[k] = rel_err(mine[k], e)
    return errors


def assert_parity(errors: dict[str, float]) -> None:
    bad = {k: v for k, v in errors.items()
           if not v <= (ZERO_ATOL if k.endswith("(abs)") else PARITY_RTOL)}
    assert not bad, bad


@pytest.mark.parametrize("preset, pool, fusion", COMBOS)
def test_parity_with_mmcv_structure(torch, preset, pool, fusion) -> None:
    from anchors import context_block as anchors

    factory = getattr(anchors, f"make_{preset}")
    cfg = cfg_of(preset, pooling_type=pool, fusion_types=fusion)
    for seed, shape in enumerate([(2, 32, 5, 7), (1, 64, 4, 4)]):
        assert_parity(parity_errors(torch, factory, preset, cfg, shape, seed=seed))


def test_anchor_names() -> None:
    cfg = cfg_of(fusion_types=("channel_add", "channel_mul"))
    names = SPEC.anchor_names("mmcv", cfg, TINY)
    assert names["conv_mask.weight"] == "conv_mask.weight"
    assert names["channel_add.conv1.weight"] == "channel_add_conv.0.weight"
    assert names["channel_mul.ln.bias"] == "channel_mul_conv.1.bias"
    assert names["channel_mul.conv2.bias"] == "channel_mul_conv.3.bias"
    assert set(names) == set(SPEC.param_shapes(cfg, TINY))
    assert SPEC.anchor_names(None, cfg, TINY) == {}


def test_anchor_state_dict_keys_are_mmcvs(torch) -> None:
    from anchors import context_block as anchors

    cfg = gc_spec.resolve(cfg_of(fusion_types=("channel_add", "channel_mul")), TINY)
    module = anchors.make_mmcv(config_to_dict(cfg) | {"channels": 8})
    assert set(module.state_dict()) == set(SPEC.anchor_names("mmcv", cfg, TINY).values())
    # the module's own init is mmcv's: the block starts as x (add) / x/2 (mul)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    np.testing.assert_allclose(module(x).detach().numpy(), 0.5 * x.numpy(), atol=0)


def test_anchor_factories_refuse_what_the_bug_cannot_express() -> None:
    pytest.importorskip("torch")
    from anchors import context_block as anchors

    conf = config_to_dict(gc_spec.resolve(cfg_of(pooling_type="avg"), TINY))
    with pytest.raises(ValueError, match="pooling_type='att'"):
        anchors.make_mmcv_softmax_over_channels(conf | {"channels": 8})
    with pytest.raises(ValueError, match="both fusion types"):
        anchors.make_mmcv_add_before_mul(conf | {"channels": 8})
    with pytest.raises(ValueError, match="'channels'"):
        anchors.make_mmcv(conf)


BUGS = [
    # (factory, fusion, tensors that must disagree, tensors that must agree)
    ("make_mmcv_softmax_over_channels", ("channel_add",),
     {"aux.attention", "out", "grad.input.x", "grad.param.conv_mask.weight"}, set()),
    ("make_mmcv_add_before_mul", ("channel_add", "channel_mul"),
     {"out", "grad.input.x", "grad.param.channel_add.conv2.weight"},
     {"aux.attention", "aux.channel_mul"}),
    ("make_mmcv_norm_without_mean", ("channel_add",),
     {"out", "grad.param.channel_add.conv1.weight"}, {"aux.attention"}),
    # right forward, wrong backward
    ("make_mmcv_layernorm_backward_without_means", ("channel_add",),
     {"grad.input.x", "grad.param.channel_add.conv1.weight",
      "grad.param.conv_mask.weight"},
     {"out", "aux.attention", "grad.param.channel_add.conv2.weight",
      "grad.param.channel_add.ln.weight"}),
]


@pytest.mark.parametrize("factory, fusion, fails, passes", BUGS,
                         ids=[b[0] for b in BUGS])
def test_buggy_module_disagrees_on_the_right_tensors(torch, factory, fusion, fails,
                                                    passes) -> None:
    from anchors import context_block as anchors

    errors = parity_errors(torch, getattr(anchors, factory), "mmcv",
                           cfg_of(fusion_types=fusion), (2, 16, 5, 7))
    for key in fails:
        assert errors[key] > 1e-3, (key, errors[key])
    for key in passes:
        assert errors[key] <= PARITY_RTOL, (key, errors[key])


# ---------------------------------------------------------------------------
# refattn validate: the anchor passes a fresh case, a wrong backward fails it


def _cli(*args: Any) -> Any:
    from refattn.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def gc_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gc-golden")
    cases = {}
    for name, sets in (("mmcv", ()), ("both", ("fusion_types=[\"channel_add\","
                                               "\"channel_mul\"]",))):
        args = ["golden", "-b", "gc", "-p", "mmcv", "--out", root / name, "--json"]
        for s in sets:
            args += ["--set", s]
        result = _cli(*args)
        assert result.exit_code == 0, result.output
        cases[name] = Path(json.loads(result.stdout)[0]["path"])
    return cases


@pytest.mark.parametrize("case", ["mmcv", "both"])
def test_validate_passes_the_anchor(torch, gc_cases, case) -> None:
    result = _cli("validate", gc_cases[case], "--torch",
                  "anchors.context_block:make_mmcv", "--names", "anchor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and not report["failed"]
    assert set(report["not_checked"]) == {
        r["name"] for r in report["rows"] if r["name"].startswith("aux.")}


@pytest.mark.parametrize("factory, case, fails, passes", [
    ("make_mmcv_layernorm_backward_without_means", "mmcv",
     {"grad.input.x", "grad.param.channel_add.conv1.weight",
      "grad.param.conv_mask.weight"},
     {"output.out", "grad.param.channel_add.conv2.weight"}),
    ("make_mmcv_add_before_mul", "both",
     {"output.out", "grad.input.x", "grad.param.channel_mul.conv2.weight"}, set()),
])
def test_validate_catches_a_wrong_module(torch, gc_cases, factory, case, fails,
                                         passes) -> None:
    result = _cli("validate", gc_cases[case], "--torch",
                  f"anchors.context_block:{factory}", "--names", "anchor", "--json")
    assert result.exit_code == 1, result.output
    status = {r["name"]: r["status"] for r in json.loads(result.stdout)["rows"]}
    assert all(status[k] == "FAIL" for k in fails), status
    assert all(status[k] == "PASS" for k in passes), status
