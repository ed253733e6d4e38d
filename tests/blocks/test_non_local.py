"""The non-local block: configs and presets, gradient checks over every mode,
rank, sub-sampling position and option, the strict backend, properties,
identities, PyTorch parity with the three anchors (and a direct PyTorch
version of every option), and the known buggy variants."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks import non_local
from refattn.blocks.non_local import MODES, SOFTMAX_MODES, NonLocalConfig
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import MIN_MARGIN, config_to_dict, to_namespace
from refattn.blocks.specs import non_local as non_local_spec
from refattn.params import is_buffer

SPEC = non_local_spec.SPECS["non_local"]
PARITY_RTOL = 1e-11
ZERO_ATOL = 1e-10  # analytically-zero gradients: pure round-off (blocks.md 5.5)
RANK_SHAPES = {1: (2, 4, 7), 2: (2, 4, 3, 5), 3: (2, 4, 2, 3, 5)}  # tiny, odd
POOLS = ("none", "after_proj", "before_proj")


def cfg_of(mode: str = "embedded_gaussian", pool: str = "after_proj",
           **kw: Any) -> NonLocalConfig:
    """A config from the alexhex7 preset with the sub-sampling given as one word."""
    base = dict(mode=mode, sub_sample=pool != "none",
                pool_position="after_proj" if pool == "none" else pool)
    return dataclasses.replace(non_local.PRESETS["alexhex7"], **(base | kw))


def rel_err(actual: Any, expected: Any) -> float:
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale


def draw_clear(cfg: NonLocalConfig, shapes: dict | None = None, seed: int = 0):
    """draw_case, redrawn until every pool window and ReLU keeps MIN_MARGIN."""
    for s in range(seed, seed + 40):
        inputs, params, state = draw_case(SPEC, cfg, shapes, seed=s)
        _, cache = SPEC.forward(inputs, params, state, cfg)
        if SPEC.kink_margin(cache) >= MIN_MARGIN:
            return inputs, params, state
    raise AssertionError("no draw kept the margin")  # pragma: no cover


def zero_grad_keys(cfg: NonLocalConfig) -> set[str]:
    """Gradients that are zero analytically: the phi bias under a softmax (it
    shifts a whole row of logits), the W bias before a train-mode BN, and the g
    bias under a softmax before a train-mode BN (rows of A sum to 1, so b_g
    adds the same W b_g at every position, which the batch mean removes)."""
    keys = set()
    if cfg.bias and cfg.mode == "embedded_gaussian":
        keys.add("grad.param.phi.bias")
    out_bias = cfg.bias if cfg.out_bias is None else cfg.out_bias
    if out_bias and cfg.bn == "train":
        keys.add("grad.param.W.bias")
    if cfg.bias and cfg.bn == "train":
        if cfg.mode in SOFTMAX_MODES:
            keys.add("grad.param.g.bias")
    return keys


def refattn_tensors(cfg, inputs, params, state, dout) -> dict[str, np.ndarray]:
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    res = dict(outputs)
    res["grad.input.x"] = dinputs["x"]
    res |= {f"grad.param.{k}": v for k, v in dparams.items()}
    return {k: backend.to_host(v) for k, v in res.items()}


# ---------------------------------------------------------------------------
# configs, presets, shapes


def test_registry_entry() -> None:
    from refattn.blocks.registry import BLOCKS

    assert BLOCKS["non_local"] is SPEC
    assert SPEC.default_preset == "alexhex7"
    assert SPEC.presets is non_local.PRESETS


_NEW_KEYS = dict(reduction=2, divisor=None, value_channels=None, out_proj=True,
                out_bias=None, gamma=False, scale_channels="inter", concat_bias=False)
BLOCKS_MD_PRESETS = {  # reference/blocks.md section 9.3, and the sources named
    "alexhex7": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=True,
                     pool_position="after_proj", use_scale=False, bias=True,
                     bn="train", bn_eps=1e-5, bn_momentum=0.1, residual=True,
                     **_NEW_KEYS),
    "facebook": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=True,
                     pool_position="before_proj", use_scale=True, bias=True,
                     bn="train", bn_eps=1e-5, bn_momentum=0.1, residual=True,
                     **_NEW_KEYS),
    "cgnl_repo": dict(mode="embedded_gaussian", inter_channels=None,
                      sub_sample=False, pool_position="after_proj", use_scale=True,
                      bias=False, bn="train", bn_eps=1e-5, bn_momentum=0.1,
                      residual=True, **_NEW_KEYS),
    "mmcv": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=False,
                 pool_position="after_proj", use_scale=True, bias=True, bn=None,
                 bn_eps=1e-5, bn_momentum=0.1, residual=True, **_NEW_KEYS),
    "mmcv_bn": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=False,
                    pool_position="after_proj", use_scale=True, bias=True, bn="train",
                    bn_eps=1e-5, bn_momentum=0.1, residual=True,
                    **(_NEW_KEYS | dict(out_bias=False))),
    "timm": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=False,
                 pool_position="after_proj", use_scale=True, bias=True, bn="train",
                 bn_eps=1e-5, bn_momentum=0.1, residual=True,
                 **(_NEW_KEYS | dict(scale_channels="in", reduction=8, divisor=8))),
    "sagan": dict(mode="embedded_gaussian", inter_channels=None, sub_sample=False,
                  pool_position="after_proj", use_scale=False, bias=True, bn=None,
                  bn_eps=1e-5, bn_momentum=0.1, residual=True,
                  **(_NEW_KEYS | dict(reduction=8, out_proj=False, gamma=True))),
}


def test_presets_are_complete_and_match_blocks_md() -> None:
    assert set(non_local.PRESETS) == set(BLOCKS_MD_PRESETS)
    fields = {f.name for f in dataclasses.fields(NonLocalConfig)}
    for name, want in BLOCKS_MD_PRESETS.items():
        assert set(want) == fields
        assert dataclasses.asdict(non_local.PRESETS[name]) == want, name
    assert NonLocalConfig() == non_local.PRESETS["alexhex7"]


@pytest.mark.parametrize("c, want", [
    (64, 8),  # C/8 = 8 exactly
    (100, 16),  # 12.5 rounds half up to 16
    (200, 24),  # 25 rounds down to 24, within 10 %
    (72, 16),  # 9 rounds down to 8, over 10 % lost: one more divisor
    (20, 8),  # 2.5 rounds to 0: at least the divisor
])
def test_resolved_inter_channels_timm(c: int, want: int) -> None:
    """timm's rd_channels = make_divisible(C / 8, 8), worked by hand."""
    shapes = {"x": (2, c, 4, 4)}
    assert non_local_spec.resolve(non_local.PRESETS["timm"], shapes).inter_channels == want
    sagan = non_local_spec.resolve(non_local.PRESETS["sagan"], shapes)
    assert sagan.inter_channels == max(c // 8, 1)  # SAGAN floors


def test_resolved_widths_and_out_bias() -> None:
    shapes = {"x": (2, 12, 4, 4)}
    sagan = non_local_spec.resolve(non_local.PRESETS["sagan"], shapes)
    assert (sagan.inter_channels, sagan.value_channels, sagan.out_bias) == (1, 12, False)
    mmcv_bn = non_local_spec.resolve(non_local.PRESETS["mmcv_bn"], shapes)
    assert (mmcv_bn.inter_channels, mmcv_bn.value_channels, mmcv_bn.out_bias) == (6, 6, False)
    assert non_local_spec.resolve(cfg_of(reduction=4), shapes).inter_channels == 3
    assert non_local_spec.resolve(cfg_of(value_channels=5), shapes).value_channels == 5
    shapes_p = SPEC.param_shapes(cfg_of(value_channels=5, bias=False), shapes)
    assert shapes_p["g.weight"] == (5, 12, 1, 1) and shapes_p["W.weight"] == (12, 5, 1, 1)
    assert shapes_p["theta.weight"] == (6, 12, 1, 1) and "W.bias" not in shapes_p
    sagan_p = SPEC.param_shapes(non_local.PRESETS["sagan"], shapes)
    assert sagan_p["gamma"] == (1,) and "W.weight" not in sagan_p
    cat = SPEC.param_shapes(cfg_of("concatenation", concat_bias=True), shapes)
    assert cat["concat_project.bias"] == (1,)


@pytest.mark.parametrize("overrides, names", [
    (dict(scale_channels="in"), ["scale_channels", "use_scale"]),
    (dict(concat_bias=True), ["concat_bias", "mode"]),
    (dict(out_proj=False), ["bn", "out_proj"]),
    (dict(out_proj=False, bn=None, out_bias=True), ["out_bias", "out_proj"]),
    (dict(reduction=0), ["reduction"]),
    (dict(divisor=0), ["divisor"]),
    (dict(out_bias=1), ["out_bias"]),
    (dict(scale_channels="out"), ["scale_channels"]),
])
def test_new_switches_refuse_what_means_nothing(overrides, names) -> None:
    with pytest.raises(ValueError) as err:
        SPEC.check_config(cfg_of(**overrides))
    assert all(n in str(err.value) for n in names), str(err.value)


def test_without_w_z_the_value_width_must_be_c() -> None:
    cfg = cfg_of(pool="none", out_proj=False, bn=None, value_channels=3)
    with pytest.raises(ValueError, match=r"value_channels: out_proj=False .* C = 4"):
        SPEC.param_shapes(cfg, {"x": (2, 4, 3, 5)})


@pytest.mark.parametrize("c, want", [(1, 1), (2, 1), (7, 3), (256, 128)])
def test_resolved_inter_channels(c: int, want: int) -> None:
    shapes = {"x": (2, c, 4, 4)}
    assert non_local_spec.resolve(non_local.PRESETS["alexhex7"], shapes).inter_channels == want
    assert non_local_spec.resolve(cfg_of(inter_channels=5), shapes).inter_channels == 5
    assert SPEC.param_shapes(cfg_of(), shapes)["theta.weight"] == (want, c, 1, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", (1, 2, 3))
def test_param_shapes(mode: str, rank: int) -> None:
    shape = RANK_SHAPES[rank]
    ones = (1,) * rank
    shapes = SPEC.param_shapes(cfg_of(mode, inter_channels=3), {"x": shape})
    want = {"g.weight": (3, 4) + ones, "g.bias": (3,),
            "W.weight": (4, 3) + ones, "W.bias": (4,)}
    if mode != "gaussian":
        want |= {"theta.weight": (3, 4) + ones, "theta.bias": (3,),
                 "phi.weight": (3, 4) + ones, "phi.bias": (3,)}
    if mode == "concatenation":
        want["concat_project.weight"] = (1, 6, 1, 1)
    buffers_and_affine = ("weight", "bias", "running_mean", "running_var")
    want |= {f"W_bn.{k}": (4,) for k in buffers_and_affine}
    assert shapes == want
    bare = SPEC.param_shapes(cfg_of(mode, bias=False, bn=None), {"x": shape})
    assert not any(k.endswith("bias") or k.startswith("W_bn") for k in bare)


BAD_CONFIGS = [
    (dict(mode="softmax"), r"mode: expected one of .*got 'softmax'"),
    (dict(inter_channels=0), r"inter_channels: expected an int >= 1 or None, got 0"),
    (dict(inter_channels=-3), r"inter_channels: .* got -3"),
    (dict(inter_channels=2.5), r"inter_channels: .* got 2.5"),
    (dict(inter_channels=True), r"inter_channels: .* got True"),
    (dict(pool_position="inside"), r"pool_position: .* got 'inside'"),
    (dict(bn="batch"), r"bn: expected one of None, 'train', 'eval', got 'batch'"),
    (dict(bn_eps=0.0), r"bn_eps: expected a finite float > 0, got 0.0"),
    (dict(bn_momentum=1.5), r"bn_momentum: expected a float in \[0, 1\], got 1.5"),
    (dict(sub_sample=1), r"sub_sample: expected True or False, got 1"),
    (dict(residual="yes"), r"residual: expected True or False, got 'yes'"),
    (dict(mode="dot_product", use_scale=True),
     r"use_scale \(True\) applies to the softmax modes .* 'dot_product'"),
    (dict(mode="concatenation", use_scale=True),
     r"use_scale \(True\) .* mode 'concatenation' normalises by the key count"),
]


@pytest.mark.parametrize("overrides, match", BAD_CONFIGS)
def test_bad_configs(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        non_local_spec.check_config(NonLocalConfig(**overrides))
    with pytest.raises(ValueError, match=match):
        SPEC.config("alexhex7", **overrides)


def test_use_scale_is_accepted_in_softmax_modes() -> None:
    for mode in SOFTMAX_MODES:
        assert NonLocalConfig(mode=mode, use_scale=True).use_scale


@pytest.mark.parametrize("shape, cfg, match", [
    ((4, 6), cfg_of(), r"x: expected a 3.* got shape \(4, 6\)"),
    ((1, 4, 2, 2, 2, 2), cfg_of(),
     r"x: expected a 3.*got shape \(1, 4, 2, 2, 2, 2\)"),
    ((2, 4, 1), cfg_of(), r"sub_sample=True pools with kernel = stride = \(2,\)"),
    ((2, 4, 5, 1), cfg_of(), r"needs every pooled spatial dim >= 2, got spatial "
                             r"shape \(5, 1\)"),
    ((2, 4, 3, 1, 5), cfg_of(pool="before_proj"),
     r"kernel = stride = \(1, 2, 2\) .* got spatial shape \(3, 1, 5\)"),
    ((2, 0, 4, 4), cfg_of(), r"x: expected every dim >= 1"),
])
def test_bad_input_shapes(shape, cfg, match) -> None:
    with pytest.raises(ValueError, match=match):
        SPEC.param_shapes(cfg, {"x": shape})
    if 0 not in shape:
        x = np.zeros(shape)
        with pytest.raises(ValueError, match=match):
            SPEC.forward({"x": x}, {}, {}, cfg)


def test_3d_sub_sampling_never_pools_time() -> None:
    # T = 1 is fine: the 3-D kernel is (1, 2, 2)
    cfg = cfg_of()
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 1, 3, 5)})
    outputs, _ = SPEC.forward(inputs, params, state, cfg)
    assert outputs["aux.attention"].shape == (2, 15, 1 * 1 * 2)


def test_bad_params_and_state() -> None:
    cfg = cfg_of()
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 3, 5)})
    fwd = SPEC.forward

    with pytest.raises(ValueError, match=r"params: missing key\(s\) 'theta.bias'"):
        fwd(inputs, {k: v for k, v in params.items() if k != "theta.bias"}, state, cfg)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) 'concat_project.weight'"):
        fwd(inputs, params | {"concat_project.weight": np.ones((1, 4, 1, 1))}, state,
            cfg)
    with pytest.raises(ValueError, match=r"params: unexpected .*bias=False"):
        fwd(inputs, params, state, dataclasses.replace(cfg, bias=False))
    with pytest.raises(ValueError, match=r"state: missing key\(s\) 'W_bn.running_mean'"):
        fwd(inputs, params, {}, dataclasses.replace(cfg, bn="eval"))
    with pytest.raises(ValueError, match=r"state: unexpected key\(s\) 'W_bn.running_mean'"):
        fwd(inputs, {k: v for k, v in params.items() if "W_bn" not in k}, state,
            dataclasses.replace(cfg, bn=None))
    bad = dict(params, **{"phi.weight": np.ones((3, 4, 1, 1))})
    with pytest.raises(ValueError, match=r"phi.weight: expected shape \(2, 4, 1, 1\)"):
        fwd(inputs, bad, state, cfg)
    with pytest.raises(ValueError, match=r"\.weight: expected shape \(3, 4, 1, 1\)"):
        fwd(inputs, params, state, dataclasses.replace(cfg, inter_channels=3))
    bad = dict(params, **{"W.weight": params["W.weight"].astype(np.float32)})
    with pytest.raises(TypeError, match="one dtype"):
        fwd(inputs, bad, state, cfg)
    bad = dict(params, **{"g.bias": np.array([np.nan, 0.0])})
    with pytest.raises(ValueError, match=r"g.bias: expected finite values"):
        fwd(inputs, bad, state, cfg)
    with pytest.raises(ValueError, match=r"inputs: non_local takes \['x'\], got"):
        fwd(inputs | {"x_kv": inputs["x"]}, params, state, cfg)
    with pytest.raises(TypeError, match="cfg: expected a NonLocalConfig"):
        fwd(inputs, params, state, non_local.PRESETS)
    # buffers are accepted among the params too, but not twice
    out_a, _ = fwd(inputs, params | state, {}, cfg)
    out_b, _ = fwd(inputs, params, state, cfg)
    np.testing.assert_array_equal(out_a["out"], out_b["out"])
    with pytest.raises(ValueError, match="given in both params and state"):
        fwd(inputs, params | state, state, cfg)


def test_bn_train_needs_two_values_per_channel() -> None:
    cfg = cfg_of(pool="none")
    inputs, params, state = draw_case(SPEC, cfg, {"x": (1, 4, 1)})
    with pytest.raises(ValueError, match=r"bn='train' .* N·\|S\| >= 2, got shape"):
        SPEC.forward(inputs, params, state, cfg)
    SPEC.forward(inputs, params, state, dataclasses.replace(cfg, bn="eval"))


def test_bad_douts() -> None:
    cfg = cfg_of()
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 3, 5)})
    _, cache = SPEC.forward(inputs, params, state, cfg)
    with pytest.raises(ValueError, match="douts: non_local backward needs a dict"):
        SPEC.backward({}, cache)
    with pytest.raises(ValueError, match="non_local differentiates only 'out'"):
        SPEC.backward({"out": inputs["x"], "aux.attention": inputs["x"]}, cache)
    with pytest.raises(ValueError, match=r"expected shape \(2, 4, 3, 5\)"):
        SPEC.backward({"out": inputs["x"][:1]}, cache)
    with pytest.raises(TypeError, match="one dtype"):
        SPEC.backward({"out": inputs["x"].astype(np.float32)}, cache)


def test_with_bn_mode_fixture_shapes_accumulation() -> None:
    cfg = cfg_of()
    assert SPEC.with_bn_mode(cfg, "eval").bn == "eval"
    assert SPEC.with_bn_mode(cfg_of(bn=None), "train") is None
    with pytest.raises(ValueError, match="mode: expected 'train' or 'eval'"):
        SPEC.with_bn_mode(cfg, "inference")
    for name, preset in non_local.PRESETS.items():
        shapes = SPEC.fixture_shapes(preset)
        x = shapes["x"]
        assert len(x) == (5 if name == "facebook" else 4)
        assert all(s % 2 for s in x[-2:])  # odd: floor-mode pooling is exercised
        acc = SPEC.accumulation(preset, shapes)
        assert set(acc) == {"out", "aux", "state", "grad.input", "grad.param"}
        assert all(isinstance(v, int) and v >= 1 for v in acc.values())
        assert acc["grad.param"] > acc["grad.input"] > acc["out"] > acc["aux"]


def test_init_params() -> None:
    for cfg in (cfg_of("concatenation"), cfg_of("gaussian", bn=None, bias=False)):
        shapes = {"x": (2, 6, 3, 5)}
        params, state = SPEC.init_params(cfg, shapes, seed=3)
        want = SPEC.param_shapes(cfg, shapes)
        assert {k: v.shape for k, v in params.items()} == {
            k: v for k, v in want.items() if not is_buffer(k)}
        assert {k: v.shape for k, v in state.items()} == {
            k: v for k, v in want.items() if is_buffer(k)}
        again, _ = SPEC.init_params(cfg, shapes, seed=3)
        for k in params:
            np.testing.assert_array_equal(params[k], again[k])
            assert params[k].dtype == np.float64
            assert np.all(params[k] != 0), k  # non-degenerate: never a zero init


# ---------------------------------------------------------------------------
# gradient checks


def _options(i: int, mode: str) -> dict[str, Any]:
    """The option set of case i: cycles bias, scale and its width, BN mode,
    residual, the value width, W_z and its bias, the learned scalar γ and the
    concatenation bias, so that every value meets every mode."""
    bias, bn = i % 2 == 0, ("train", "eval", None)[i % 3]
    use_scale = mode in SOFTMAX_MODES and i % 3 != 1
    out_proj = bn is not None or i % 2 == 0
    return dict(
        bias=bias,
        use_scale=use_scale,
        bn=bn,
        residual=i % 4 != 3,
        inter_channels=(None, 3, 1)[i % 3],
        value_channels=(None, 2)[i // 2 % 2] if out_proj else None,
        out_proj=out_proj,
        out_bias=(None, not bias)[i // 3 % 2] if out_proj else None,
        gamma=i % 5 in (1, 3),
        scale_channels="in" if use_scale and i // 2 % 2 else "inter",
        concat_bias=mode == "concatenation" and i // 3 % 2 == 0,
    )


def test_the_option_cycle_meets_every_new_value() -> None:
    """The gradcheck and parity cases below reach every value of every switch."""
    seen: dict[str, set] = {}
    for mode, _, _, i in FAST_CASES:
        for key, value in _options(i, mode).items():
            seen.setdefault(key, set()).add(value)
    for key in ("out_proj", "gamma", "concat_bias", "bias", "residual"):
        assert seen[key] == {True, False}, key
    assert seen["scale_channels"] == {"in", "inter"}
    assert seen["value_channels"] == {None, 2}
    assert seen["out_bias"] == {None, True, False}


FULL_CASES = [(m, r, POOLS[(i + r) % 3])
              for i, m in enumerate(MODES) for r in (1, 2, 3)]


@pytest.mark.parametrize("mode, rank, pool", FULL_CASES)
def test_gradcheck_full_tiny(mode: str, rank: int, pool: str) -> None:
    i = MODES.index(mode) + rank
    cfg = cfg_of(mode, pool, **_options(i, mode))
    inputs, params, state = draw_clear(cfg, {"x": RANK_SHAPES[rank]}, seed=i)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


FAST_CASES = [(m, r, p, i) for i, (m, r, p) in
              enumerate(itertools.product(MODES, (1, 2, 3), POOLS))]


@pytest.mark.parametrize("mode, rank, pool, i", FAST_CASES)
def test_gradcheck_fast_every_mode_rank_pool(mode, rank, pool, i) -> None:
    cfg = cfg_of(mode, pool, **_options(i, mode))
    inputs, params, state = draw_clear(cfg, {"x": RANK_SHAPES[rank]}, seed=i)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast", seed=i)
    assert report.ok, report.to_text()


PRESET_CASES = [(p, bn) for p, cfg in non_local.PRESETS.items()
                for bn in (("train", "eval") if cfg.out_proj else (None,))]
PRESET_CASES += [("alexhex7", None), ("mmcv_bn", None)]


@pytest.mark.parametrize("preset, bn", PRESET_CASES)
def test_gradcheck_presets_at_fixture_shapes(preset: str, bn: str | None) -> None:
    cfg = dataclasses.replace(non_local.PRESETS[preset], bn=bn)
    inputs, params, state = draw_clear(cfg, seed=1)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_alexhex7_modes_at_fixture_shapes(mode: str) -> None:
    cfg = cfg_of(mode)
    inputs, params, state = draw_clear(cfg, seed=2)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_on_backends(xb, mode: str) -> None:
    cfg = cfg_of(mode, "before_proj" if mode == "gaussian" else "after_proj")
    inputs, params, state = draw_clear(cfg, {"x": (2, 4, 3, 5)})
    report = gradcheck_block(SPEC, cfg, to_namespace(inputs, xb.xp, xb.device),
                             to_namespace(params, xb.xp, xb.device),
                             to_namespace(state, xb.xp, xb.device), mode="fast")
    assert report.ok, report.to_text()


def test_a_planted_backward_bug_fails_the_check(monkeypatch) -> None:
    """Dropping the softmax's Jacobian (df = dA) must be caught."""
    cfg = cfg_of()
    inputs, params, state = draw_clear(cfg, {"x": (2, 4, 3, 5)})
    monkeypatch.setattr(non_local, "_softmax_backward", lambda d, cache: d)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    assert "param.theta.weight" in report.failed


# ---------------------------------------------------------------------------
# backends, dtypes, properties


@pytest.mark.parametrize("mode", MODES)
def test_strict_device_and_float32(xb, mode: str) -> None:
    cfg = cfg_of(mode, "before_proj" if mode == "dot_product" else "after_proj")
    inputs, params, state = draw_clear(cfg, {"x": (2, 4, 2, 3, 5)})
    f32 = {k: to_namespace(d, xb.xp, xb.device, "float32")
           for k, d in (("i", inputs), ("p", params), ("s", state))}
    dout64 = np.random.default_rng(0).standard_normal((2, 4, 2, 3, 5))
    dout = xb.asarray(dout64.astype(np.float32))
    outputs, cache = SPEC.forward(f32["i"], f32["p"], f32["s"], cfg)
    dinputs, dparams = SPEC.backward({"out": dout}, cache)
    arrays = list(outputs.values()) + list(dinputs.values()) + list(dparams.values())
    assert set(outputs) == {"out", "aux.attention",
                            "state.W_bn.running_mean", "state.W_bn.running_var"}
    for a in arrays:
        assert backend.dtype_name(a) == "float32"
        assert backend.device(a) == xb.device
    # float32 agrees with the float64 reference to float32 accuracy
    ref = refattn_tensors(cfg, inputs, params, state, dout64)
    assert rel_err(outputs["out"], ref["out"]) < 1e-5
    assert rel_err(dparams["g.weight"], ref["grad.param.g.weight"]) < 1e-4


@st.composite
def small_cases(draw):
    mode = draw(st.sampled_from(MODES))
    rank = draw(st.integers(1, 3))
    pool = draw(st.sampled_from(POOLS))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    spatial = tuple(draw(st.integers(2, 4)) for _ in range(rank))
    if rank == 3 and pool != "none":
        spatial = (draw(st.integers(1, 2)),) + spatial[1:]
    cfg = cfg_of(
        mode, pool,
        inter_channels=draw(st.sampled_from([None, 1, 2, 3])),
        use_scale=mode in SOFTMAX_MODES and draw(st.booleans()),
        bias=draw(st.booleans()),
        bn=draw(st.sampled_from(["train", "eval", None])),
        residual=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**16))
    return cfg, (n, c) + spatial, seed


@given(small_cases())
def test_properties_linearity_keys_no_mutation(case) -> None:
    cfg, shape, seed = case
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    saved = copy.deepcopy((inputs, params, state))
    rng = np.random.default_rng(seed)
    d1, d2 = rng.standard_normal(shape), rng.standard_normal(shape)
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    lq = int(np.prod(shape[2:]))
    assert outputs["out"].shape == shape
    assert outputs["aux.attention"].shape[:2] == (shape[0], lq)
    g1 = SPEC.backward({"out": d1}, cache)
    g2 = SPEC.backward({"out": d2}, cache)
    g12 = SPEC.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    assert set(g1[0]) == {"x"} and g1[0]["x"].shape == shape
    assert set(g1[1]) == set(params)  # buffers never get a gradient
    for k, v in g1[1].items():
        assert v.shape == params[k].shape, k
    for a, b, ab in zip((g1[0] | g1[1]).values(), (g2[0] | g2[1]).values(),
                        (g12[0] | g12[1]).values()):
        np.testing.assert_allclose(ab, 2.0 * a - 3.0 * b, rtol=1e-9, atol=1e-9)
    for before, after in zip(saved, (inputs, params, state)):
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])


def test_attention_rows_and_key_count() -> None:
    shape = (2, 4, 5, 7)  # keys after floor-mode pooling: 2 x 3 = 6
    for mode in MODES:
        cfg = cfg_of(mode)
        inputs, params, state = draw_case(SPEC, cfg, {"x": shape})
        outputs, cache = SPEC.forward(inputs, params, state, cfg)
        attention = outputs["aux.attention"]
        assert attention.shape == (2, 35, 6) and cache.lk == 6
        if mode in SOFTMAX_MODES:
            np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-13)
        else:  # f / N_k: rows do not sum to 1 (AlexHex7 #43)
            assert not np.allclose(attention.sum(-1), 1.0)
        if mode == "concatenation":
            assert np.all(attention >= 0) and np.any(attention == 0)  # a ReLU


def test_pool_position_changes_the_result() -> None:
    """max does not commute with a channel-mixing 1x1 conv (blocks.md 5.3)."""
    after = cfg_of()
    before = dataclasses.replace(after, pool_position="before_proj")
    inputs, params, state = draw_case(SPEC, after, {"x": (2, 4, 4, 6)})
    out_a, _ = SPEC.forward(inputs, params, state, after)
    out_b, _ = SPEC.forward(inputs, params, state, before)
    assert rel_err(out_b["out"], out_a["out"]) > 1e-3
    out_n, _ = SPEC.forward(inputs, params, state, dataclasses.replace(
        after, sub_sample=False))
    assert out_n["aux.attention"].shape == (2, 24, 24)


def test_kink_margin_sees_pool_ties_and_relu_kinks() -> None:
    cfg = cfg_of("concatenation", "before_proj")
    inputs, params, state = draw_clear(cfg, {"x": (2, 4, 4, 6)})
    _, cache = SPEC.forward(inputs, params, state, cfg)
    assert SPEC.kink_margin(cache) >= MIN_MARGIN
    tied = inputs["x"].copy()
    tied[1, 2, 2, 5] = tied[1, 2, 3, 4] = 10.0  # a tied max in one 2x2 window of x
    _, cache = SPEC.forward({"x": tied}, params, state, cfg)
    assert SPEC.kink_margin(cache) == 0.0
    # a ReLU input at exactly 0: zero theta and phi weights and biases
    zeroed = params | {k: np.zeros_like(v) for k, v in params.items()
                       if k.startswith(("theta", "phi"))}
    _, cache = SPEC.forward(inputs, zeroed, state, cfg)
    assert SPEC.kink_margin(cache) == 0.0
    plain = cfg_of("embedded_gaussian", "none")
    _, cache = SPEC.forward(*draw_case(SPEC, plain, {"x": (2, 4, 4, 6)}), plain)
    assert SPEC.kink_margin(cache) == float("inf")


# ---------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn", ["train", "eval", None])
def test_identity_at_zero_output_affine(mode: str, bn: str | None) -> None:
    """BN gamma = beta = 0 (or, without BN, a zero W) makes the block the identity,
    and then no gradient reaches theta, phi, g or concat_project."""
    cfg = cfg_of(mode, "before_proj" if mode == "gaussian" else "after_proj", bn=bn)
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 5, 7)})
    zero = ("W_bn.weight", "W_bn.bias") if bn else ("W.weight", "W.bias")
    params = params | {k: np.zeros_like(params[k]) for k in zero}
    dout = np.random.default_rng(5).standard_normal((2, 4, 5, 7))
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    np.testing.assert_array_equal(outputs["out"], inputs["x"])
    np.testing.assert_array_equal(dinputs["x"], dout)
    for k, v in dparams.items():
        if k.startswith(("theta", "phi", "g.", "concat_project")) or (
                bn and k.startswith("W.")):
            assert np.all(v == 0.0), k
    alive = "W_bn.weight" if bn else "W.weight"
    assert np.max(np.abs(dparams[alive])) > 1e-3


@pytest.mark.parametrize("preset", sorted(non_local.PRESETS))
def test_anchor_init_is_the_identity(preset: str) -> None:
    cfg = non_local.PRESETS[preset]
    shapes = SPEC.fixture_shapes(cfg)
    params, state = SPEC.init_params(cfg, shapes, seed=0, anchor_init=True)
    x = np.random.default_rng(0).standard_normal(shapes["x"])
    outputs, _ = SPEC.forward({"x": x}, params, state, cfg)
    np.testing.assert_array_equal(outputs["out"], x)
    if cfg.bn is not None:
        np.testing.assert_array_equal(state["W_bn.running_var"], 1.0)
    if cfg.gamma:  # SAGAN: γ = 0
        np.testing.assert_array_equal(params["gamma"], 0.0)
    if cfg.use_scale:  # facebook / CGNL repo: N(0, 0.01^2) convs
        assert np.std(params["theta.weight"]) < 0.05
    params, state = SPEC.init_params(cfg_of(bn=None), shapes, seed=0, anchor_init=True)
    assert np.all(params["W.weight"] == 0) and np.all(params["W.bias"] == 0)


@pytest.mark.parametrize("pool", POOLS)
def test_phi_bias_gradient_vanishes_under_softmax(pool: str) -> None:
    """A phi bias adds theta_i . b to the whole row i of logits: the softmax
    cancels it (also through the pool: max(z + b) = max(z) + b)."""
    grads = {}
    for mode in ("embedded_gaussian", "dot_product"):
        cfg = cfg_of(mode, pool, bn="eval")
        inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 5, 7)})
        dout = np.random.default_rng(1).standard_normal((2, 4, 5, 7))
        _, _, grads[mode] = run_block(SPEC, cfg, inputs, params, state, dout)
    g = grads["embedded_gaussian"]
    scale = np.max(np.abs(g["theta.bias"]))
    assert np.max(np.abs(g["phi.bias"])) < 1e-13 * scale + 1e-15
    assert np.max(np.abs(grads["dot_product"]["phi.bias"])) > 1e-3


def test_w_bias_gradient_vanishes_before_train_bn() -> None:
    cfg = cfg_of()
    inputs, params, state = draw_case(SPEC, cfg, {"x": (2, 4, 5, 7)})
    dout = np.random.default_rng(1).standard_normal((2, 4, 5, 7))
    _, _, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    assert np.max(np.abs(dparams["W.bias"])) < ZERO_ATOL
    _, _, dparams = run_block(SPEC, cfg_of(bn="eval"), inputs, params, state, dout)
    assert np.max(np.abs(dparams["W.bias"])) > 1e-3


# ---------------------------------------------------------------------------
# PyTorch parity


def torch_tensors(torch, module, names, cfg, inputs, params, state, dout):
    """Load refattn's params through `names`, run forward + autograd backward."""
    sd = {names[k]: torch.from_numpy(np.array(v)) for k, v in (params | state).items()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    x = torch.tensor(inputs["x"], requires_grad=True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.from_numpy(dout))
    named = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    res = {"out": out, "aux.attention": module.last_attention, "grad.input.x": x.grad}
    res |= {f"grad.param.{k}": named[names[k]].grad for k in params}
    if cfg.bn == "train":
        res |= {f"state.{k}": buffers[names[k]] for k in state}
    return {k: v.detach().numpy() for k, v in res.items()}


def parity_errors(torch, factory, preset, cfg, shape, seed=0) -> dict[str, float]:
    """Error per tensor, refattn vs the PyTorch module: relative to the module's
    max |value|, or absolute for the analytically-zero gradients (whose keys get
    the suffix " (abs)"); inf where the shapes differ."""
    shapes = {"x": shape}
    cfg = non_local_spec.resolve(cfg, shapes)
    inputs, params, state = draw_clear(cfg, shapes, seed=seed)
    dout = np.random.default_rng(seed + 100).standard_normal(shape)
    mine = refattn_tensors(cfg, inputs, params, state, dout)
    if preset is None:
        names = {k: k for k in SPEC.param_shapes(cfg, shapes)}
    else:
        names = SPEC.anchor_names(preset, cfg, shapes)
    conf = config_to_dict(cfg) | {"channels": shape[1], "spatial_rank": len(shape) - 2}
    theirs = torch_tensors(torch, factory(conf), names, cfg, inputs, params, state,
                           dout)
    assert set(theirs) == set(mine)
    zero = zero_grad_keys(cfg)
    errors = {}
    for k, e in theirs.items():
        if mine[k].shape != e.shape:
            errors[k] = float("inf")
        elif k in zero:
            assert np.max(np.abs(mine[k])) < ZERO_ATOL, k
            errors[f"{k} (abs)"] = float(np.max(np.abs(mine[k] - e)))
        else:
            errors[k] = rel_err(mine[k], e)
    return errors


def assert_parity(errors: dict[str, float]) -> None:
    bad = {k: v for k, v in errors.items()
           if not v <= (ZERO_ATOL if k.endswith("(abs)") else PARITY_RTOL)}
    assert not bad, bad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", (1, 2, 3))
@pytest.mark.parametrize("sub_sample", (True, False))
def test_parity_alexhex7(torch, mode: str, rank: int, sub_sample: bool) -> None:
    from anchors import non_local as anchors

    shape = {1: (2, 6, 7), 2: (2, 6, 5, 7), 3: (2, 6, 2, 5, 7)}[rank]
    for i, bn in enumerate(("train", "eval", None)):
        cfg = cfg_of(mode, "after_proj" if sub_sample else "none", bn=bn)
        assert_parity(parity_errors(torch, anchors.make_alexhex7, "alexhex7", cfg,
                                    shape, seed=i))


@pytest.mark.parametrize("bn", ("train", "eval", None))
@pytest.mark.parametrize("mode", ("embedded_gaussian", "dot_product"))
def test_parity_facebook(torch, bn: str | None, mode: str) -> None:
    from anchors import non_local as anchors

    for i, (sub_sample, bias) in enumerate(itertools.product((True, False),
                                                             (True, False))):
        cfg = dataclasses.replace(
            non_local.PRESETS["facebook"], bn=bn, mode=mode, sub_sample=sub_sample,
            bias=bias, use_scale=mode == "embedded_gaussian")
        assert_parity(parity_errors(torch, anchors.make_facebook, "facebook", cfg,
                                    (2, 6, 2, 5, 7), seed=i))


@pytest.mark.parametrize("bn", ("train", "eval"))
@pytest.mark.parametrize("use_scale", (True, False))
def test_parity_cgnl_repo(torch, bn: str, use_scale: bool) -> None:
    from anchors import non_local as anchors

    cfg = dataclasses.replace(non_local.PRESETS["cgnl_repo"], bn=bn,
                              use_scale=use_scale)
    assert_parity(parity_errors(torch, anchors.make_cgnl_repo, "cgnl_repo", cfg,
                                (2, 6, 5, 7)))


def test_parity_sagan(torch) -> None:
    from anchors import non_local as anchors

    for seed in range(2):
        assert_parity(parity_errors(torch, anchors.make_sagan, "sagan",
                                    non_local.PRESETS["sagan"], (2, 16, 3, 5),
                                    seed=seed))


@pytest.mark.parametrize("preset, bn", [("mmcv", None), ("mmcv_bn", "train"),
                                        ("mmcv_bn", "eval")])
@pytest.mark.parametrize("mode", ("embedded_gaussian", "gaussian", "dot_product"))
@pytest.mark.parametrize("rank", (1, 2, 3))
def test_parity_mmcv(torch, preset: str, bn, mode: str, rank: int) -> None:
    from anchors import non_local as anchors

    shape = {1: (2, 6, 7), 2: (2, 6, 5, 7), 3: (2, 6, 2, 5, 7)}[rank]
    for i, sub_sample in enumerate((False, True)):
        cfg = dataclasses.replace(non_local.PRESETS[preset], bn=bn, mode=mode,
                                  sub_sample=sub_sample,
                                  use_scale=mode == "embedded_gaussian")
        assert_parity(parity_errors(torch, anchors.make_mmcv, preset, cfg, shape,
                                    seed=i))


@pytest.mark.parametrize("bn", ("train", "eval"))
@pytest.mark.parametrize("use_scale", (True, False))
def test_parity_timm(torch, bn: str, use_scale: bool) -> None:
    from anchors import non_local as anchors

    cfg = dataclasses.replace(non_local.PRESETS["timm"], bn=bn, use_scale=use_scale,
                              scale_channels="in" if use_scale else "inter")
    assert_parity(parity_errors(torch, anchors.make_timm, "timm", cfg, (2, 24, 5, 7)))


def test_each_new_switch_is_needed_for_its_source(torch) -> None:
    """Each source differs from the preset next to it in the switch that was
    added for it: validated with that switch flipped, the anchor disagrees."""
    from anchors import non_local as anchors

    def worst(factory, preset, cfg, shape, **flip):
        cfg = non_local_spec.resolve(cfg, {"x": shape})
        conf = config_to_dict(cfg) | {"channels": shape[1], "spatial_rank": 2}
        names = SPEC.anchor_names(preset, cfg, {"x": shape})
        module = factory(conf)
        wrong = dataclasses.replace(cfg, **flip)
        inputs, params, state = draw_clear(cfg, {"x": shape}, seed=0)
        dout = np.random.default_rng(5).standard_normal(shape)
        theirs = torch_tensors(torch, module, names, cfg, inputs, params, state, dout)
        keep = SPEC.param_shapes(wrong, {"x": shape})
        mine = refattn_tensors(wrong, inputs, {k: v for k, v in params.items()
                                               if k in keep}, state, dout)
        return rel_err(mine["out"], theirs["out"])

    timm = non_local.PRESETS["timm"]
    assert worst(anchors.make_timm, "timm", timm, (2, 24, 5, 7),
                 scale_channels="inter") > 1e-3  # 1/sqrt(Ci) is not timm's
    sagan = non_local.PRESETS["sagan"]
    assert worst(anchors.make_sagan, "sagan", sagan, (2, 16, 3, 5),
                 gamma=False) > 1e-3  # without γ the attention branch is unscaled


@pytest.mark.parametrize("mode, rank, pool, i", FAST_CASES)
def test_parity_every_option_with_direct_torch(torch, mode, rank, pool, i) -> None:
    from anchors import non_local as anchors

    cfg = cfg_of(mode, pool, **_options(i, mode))
    shape = {1: (2, 6, 7), 2: (2, 6, 5, 7), 3: (2, 6, 2, 5, 7)}[rank]
    assert_parity(parity_errors(torch, anchors.make_reference, None, cfg, shape,
                                seed=i))


def test_anchor_names() -> None:
    shapes = {"x": (2, 6, 5, 7)}
    names = SPEC.anchor_names("alexhex7", cfg_of("concatenation"), shapes)
    assert names == {
        "theta.weight": "theta.weight", "theta.bias": "theta.bias",
        "phi.weight": "phi.0.weight", "phi.bias": "phi.0.bias",
        "g.weight": "g.0.weight", "g.bias": "g.0.bias",
        "concat_project.weight": "concat_project.0.weight",
        "W.weight": "W.0.weight", "W.bias": "W.0.bias",
        "W_bn.weight": "W.1.weight", "W_bn.bias": "W.1.bias",
        "W_bn.running_mean": "W.1.running_mean", "W_bn.running_var": "W.1.running_var",
    }
    names = SPEC.anchor_names("alexhex7", cfg_of("gaussian", "none", bn=None), shapes)
    assert names == {"g.weight": "g.weight", "g.bias": "g.bias",
                     "W.weight": "W.weight", "W.bias": "W.bias"}
    names = SPEC.anchor_names("facebook", non_local.PRESETS["facebook"], shapes)
    assert names["W.weight"] == "out.weight" and names["W_bn.running_var"] == (
        "bn.running_var") and names["phi.bias"] == "phi.bias"
    names = SPEC.anchor_names("cgnl_repo", non_local.PRESETS["cgnl_repo"], shapes)
    assert names == {"theta.weight": "t.weight", "phi.weight": "p.weight",
                     "g.weight": "g.weight", "W.weight": "z.weight",
                     "W_bn.weight": "bn.weight", "W_bn.bias": "bn.bias",
                     "W_bn.running_mean": "bn.running_mean",
                     "W_bn.running_var": "bn.running_var"}
    # configs the anchor cannot express, and no preset
    assert SPEC.anchor_names("alexhex7", cfg_of(use_scale=True), shapes) == {}
    assert SPEC.anchor_names("alexhex7", cfg_of(pool="before_proj"), shapes) == {}
    assert SPEC.anchor_names("facebook", cfg_of(), shapes) == {}
    assert SPEC.anchor_names("cgnl_repo", non_local.PRESETS["cgnl_repo"],
                             {"x": (2, 6, 2, 5, 7)}) == {}
    assert SPEC.anchor_names(None, cfg_of(), shapes) == {}


def test_anchor_factories_refuse_what_they_cannot_express() -> None:
    pytest.importorskip("torch")
    from anchors import non_local as anchors

    conf = config_to_dict(cfg_of(use_scale=True)) | {"channels": 4, "spatial_rank": 2}
    with pytest.raises(ValueError, match="AlexHex7 anchor has no switch for use_scale"):
        anchors.make_alexhex7(conf)
    conf = config_to_dict(cfg_of()) | {"channels": 4, "spatial_rank": 2}
    with pytest.raises(ValueError, match="pool_position='before_proj'"):
        anchors.make_facebook(conf)
    with pytest.raises(ValueError, match="'spatial_rank'"):
        anchors.make_alexhex7(config_to_dict(cfg_of()) | {"channels": 4})
    # what `refattn validate --torch` passes is enough
    conf = config_to_dict(non_local_spec.resolve(cfg_of(), {"x": (2, 6, 2, 5, 7)})) | {
        "in_channels": 6, "input_shapes": {"x": [2, 6, 2, 5, 7]}}
    module = anchors.make_alexhex7(conf)
    assert module.dimension == 3 and module.in_channels == 6


# ---------------------------------------------------------------------------
# known-buggy variants disagree with refattn


def buggy_errors(torch, factory, cfg, shape) -> dict[str, float]:
    """parity_errors against a buggy factory (alexhex7 names), without asserting."""
    return parity_errors(torch, factory, "alexhex7", cfg, shape)


def test_bug_softmax_over_queries(torch) -> None:
    from anchors import non_local as anchors

    for mode in SOFTMAX_MODES:
        errors = buggy_errors(torch, anchors.make_alexhex7_softmax_over_queries,
                              cfg_of(mode), (2, 6, 5, 7))
        for key in ("aux.attention", "out", "grad.input.x", "grad.param.g.weight"):
            assert errors[key] > 1e-2, (mode, key, errors[key])


def test_bug_no_transpose(torch) -> None:
    from anchors import non_local as anchors

    errors = buggy_errors(torch, anchors.make_alexhex7_no_transpose, cfg_of(),
                          (2, 6, 5, 7))
    assert errors["aux.attention"] <= PARITY_RTOL  # the attention is right
    for key in ("out", "grad.input.x", "grad.param.theta.weight",
                "grad.param.W.weight"):
        assert errors[key] > 1e-2, (key, errors[key])


def test_bug_divide_by_query_count(torch) -> None:
    from anchors import non_local as anchors

    shape = (2, 6, 5, 7)  # N_q = 35 queries, N_k = 2 x 3 = 6 keys
    for mode in ("dot_product", "concatenation"):
        errors = buggy_errors(torch, anchors.make_alexhex7_divide_by_query_count,
                              cfg_of(mode, bn="eval"), shape)
        # the buggy map is the right one times N_k / N_q
        assert errors["aux.attention"] == pytest.approx(35 / 6 - 1, rel=1e-9)
        for key in ("out", "grad.input.x", "grad.param.theta.weight",
                    "grad.param.W.weight"):
            assert errors[key] > 1e-2, (mode, key, errors[key])
        # a train-mode BN cancels the constant factor except through bn_eps: the
        # output still differs, by an amount set by var(W y) against eps
        train = buggy_errors(torch, anchors.make_alexhex7_divide_by_query_count,
                             cfg_of(mode), shape)
        assert train["out"] > 1e-9 and train["grad.input.x"] > 1e-9


def test_bug_view_with_c(torch) -> None:
    from anchors import non_local as anchors

    # Ci·L divisible by C = 2 Ci (even L and L_k): it runs, and differs
    errors = buggy_errors(torch, anchors.make_alexhex7_view_with_c,
                          cfg_of("embedded_gaussian", "none"), (2, 6, 4, 6))
    for key in ("out", "grad.input.x", "grad.param.theta.weight",
                "grad.param.g.weight"):
        assert errors[key] > 1e-2, (key, errors[key])
    # odd sizes: the view itself fails
    cfg = cfg_of("dot_product")
    conf = config_to_dict(non_local_spec.resolve(cfg, {"x": (2, 6, 5, 7)})) | {
        "channels": 6, "spatial_rank": 2}
    module = anchors.make_alexhex7_view_with_c(conf)
    with pytest.raises(RuntimeError):
        module(torch.zeros((2, 6, 5, 7), dtype=torch.float64))
