"""CGNL (``cgnl``): configs and presets, gradient checks of both kernels over
orders, gammas, groups, norms and switches, the strict backend and float32,
properties, identities (GroupNorm cancelling the dot-kernel attention, the
identity at zero GN affine, convergence of the exact-envelope Taylor series,
float32 resolution at gamma 1e-4), PyTorch parity with the anchor classes and
a direct reference, the seed notes' kernel, and the known buggy variants."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks import cgnl
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import MIN_MARGIN, config_to_dict, to_namespace
from refattn.blocks.specs import cgnl as cgnl_spec
from refattn.golden.tolerance import tolerance_for
from refattn.params import is_buffer

SPEC = cgnl_spec.SPECS["cgnl"]
PARITY_RTOL = 1e-11
TINY = {"x": (2, 16, 3, 4)}


def rel_err(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """max |actual − expected| relative to the scale of `expected` (or `floor`)."""
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e), initial=0.0)), floor, 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale


def cfg_of(preset: str = "yue", shapes=None, **overrides: Any) -> cgnl.CGNLConfig:
    cfg = SPEC.config(preset, **overrides)
    return cfg if shapes is None else cgnl_spec.resolve(cfg, shapes)


def refattn_tensors(cfg, inputs, params, state, dout) -> dict[str, np.ndarray]:
    """Every comparable tensor of one forward + backward, keyed like a fixture."""
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    res = dict(outputs)
    res["grad.input.x"] = dinputs["x"]
    res |= {f"grad.param.{k}": v for k, v in dparams.items()}
    return res


def saturation(cache) -> float:
    """MIN_MARGIN · min var(z) / (100 eps) over the GN groups when GroupNorm
    cancels the attention (infinity otherwise): >= MIN_MARGIN when every
    group keeps s²·var(u) >= 100·eps, i.e. sits ten smoothing widths from
    the sign switch of s, where finite differences of unit-scale draws
    resolve the output (a step in W_φ moves s by ~1e-4, the width
    sqrt(eps / var u) is ~3e-3)."""
    if cache.gn is None or not cgnl.gn_cancels_attention(cache.cfg):
        return math.inf
    var = 1.0 / cache.gn.inv_std**2 - cache.cfg.eps
    return MIN_MARGIN * max(float(var.min()), 0.0) / (100 * cache.cfg.eps)


def draw_clear(cfg, shapes=None, seed=0, margin=MIN_MARGIN):
    """draw_case, redrawn until ``saturation`` >= `margin` (only the
    GroupNorm that cancels the attention has a near-kink: the sign switch of
    s)."""
    for s in range(seed, seed + 40):
        inputs, params, state = draw_case(SPEC, cfg, shapes, seed=s)
        _, cache = SPEC.forward(inputs, params, state, cfg)
        if saturation(cache) >= margin:
            return inputs, params, state
    raise AssertionError("no draw kept the margin")  # pragma: no cover


def fixture_tol(cfg, shapes, key: str, dtype: str) -> tuple[float, float]:
    """(rtol, atol_rel) a fixture of this case gives tensor `key` (the
    generator's rule: the longest accumulation prefix, tolerance_for)."""
    acc = SPEC.accumulation(cfg, shapes)
    best = max((p for p in acc if key == p or key.startswith(p + ".")), key=len)
    return tolerance_for(dtype, acc[best])


def within(actual, expected, rtol: float, atol_rel: float) -> float:
    """max of |a − e| / (atol_rel·max|e| + rtol·|e|): <= 1 passes."""
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    bound = atol_rel * float(np.max(np.abs(e))) + rtol * np.abs(e)
    return float(np.max(np.abs(a - e) / np.maximum(bound, 1e-300)))


def case(preset="yue", shapes=TINY, seed=0, **overrides):
    cfg = cfg_of(preset, shapes, **overrides)
    inputs, params, state = draw_clear(cfg, shapes, seed=seed)
    dout = np.random.default_rng(seed + 100).standard_normal(shapes["x"])
    return cfg, inputs, params, state, dout


# ---------------------------------------------------------------------------
# configs and presets


def test_registry_entry() -> None:
    from refattn.blocks.registry import BLOCKS

    assert BLOCKS["cgnl"] is SPEC
    assert SPEC.presets is cgnl.PRESETS and SPEC.default_preset == "yue"


BLOCKS_MD_PRESETS = {  # reference/blocks.md section 9.3
    "yue": dict(planes=None, groups=8, use_scale=False, kernel="dot", order=2,
                gamma=1e-4, beta="const", norm="gn", gn_groups=None, eps=1e-5,
                bn_momentum=0.1, bias=False, residual=True),
    "yue_gaussian": dict(planes=None, groups=8, use_scale=False, kernel="gaussian",
                         order=3, gamma=1e-4, beta="const", norm="gn", gn_groups=None,
                         eps=1e-5, bn_momentum=0.1, bias=False, residual=True),
}


def test_presets_are_complete_and_match_blocks_md() -> None:
    assert set(cgnl.PRESETS) == set(BLOCKS_MD_PRESETS)
    fields = {f.name for f in dataclasses.fields(cgnl.CGNLConfig)}
    for name, want in BLOCKS_MD_PRESETS.items():
        assert set(want) == fields
        assert dataclasses.asdict(cgnl.PRESETS[name]) == want, name
    assert cgnl.CGNLConfig() == cgnl.PRESETS["yue"]


def test_resolved_fills_planes_and_gn_groups() -> None:
    r = cgnl_spec.resolve(cgnl.PRESETS["yue"], {"x": (2, 32, 4, 4)})
    assert (r.planes, r.gn_groups) == (16, 8)
    r = cgnl_spec.resolve(cfg_of(planes=24, gn_groups=4), {"x": (2, 32, 4, 4)})
    assert (r.planes, r.gn_groups) == (24, 4)
    assert cgnl_spec.resolve(r, {"x": (2, 32, 4, 4)}) == r
    d = config_to_dict(cgnl_spec.resolve(cgnl.PRESETS["yue_gaussian"], {"x": (1, 16, 2, 2)}))
    assert d["planes"] == 8 and d["gn_groups"] == 8 and d["kernel"] == "gaussian"


def test_param_shapes() -> None:
    shapes = {"x": (2, 32, 5, 4)}
    assert cgnl_spec.param_shapes(cfg_of(), shapes) == {
        "t.weight": (16, 32, 1, 1), "p.weight": (16, 32, 1, 1),
        "g.weight": (16, 32, 1, 1), "z.weight": (32, 2, 1, 1),
        "gn.weight": (32,), "gn.bias": (32,),
    }
    got = cgnl_spec.param_shapes(cfg_of(planes=12, groups=4, bias=True, norm="bn_eval"),
                            {"x": (2, 8, 5)})
    assert got == {
        "t.weight": (12, 8, 1), "t.bias": (12,), "p.weight": (12, 8, 1),
        "p.bias": (12,), "g.weight": (12, 8, 1), "g.bias": (12,),
        "z.weight": (8, 3, 1), "bn.weight": (8,), "bn.bias": (8,),
        "bn.running_mean": (8,), "bn.running_var": (8,),
    }
    got = cgnl_spec.param_shapes(cfg_of(norm=None, groups=2), {"x": (1, 4, 2, 2, 2)})
    assert set(got) == {"t.weight", "p.weight", "g.weight", "z.weight"}
    params, state = cgnl_spec.init_params(cfg_of(norm="bn_train", bias=True), shapes, seed=0)
    assert set(params) | set(state) == set(cgnl_spec.param_shapes(
        cfg_of(norm="bn_train", bias=True), shapes))
    assert all(is_buffer(k) for k in state) and not any(is_buffer(k) for k in params)


BAD_CONFIGS = [
    (dict(planes=12, groups=8), ["planes (12) must be divisible by groups (8)"]),
    (dict(planes=0), ["planes", "0"]),
    (dict(planes=8.0), ["planes", "8.0"]),
    (dict(groups=0), ["groups", "0"]),
    (dict(groups=True), ["groups", "True"]),
    (dict(order=-1), ["order", ">= 0", "-1"]),
    (dict(order=1.5), ["order", "1.5"]),
    (dict(order=True), ["order", "True"]),
    (dict(kernel="gaussian", gamma=0.0), ["gamma (0.0) must be > 0", "gaussian"]),
    (dict(kernel="gaussian", gamma=-0.1), ["gamma (-0.1) must be > 0"]),
    (dict(gamma=float("nan")), ["gamma", "nan"]),
    (dict(gamma="1e-4"), ["gamma", "'1e-4'"]),
    (dict(kernel="rbf"), ["kernel", "'rbf'"]),
    (dict(norm="ln"), ["norm", "'ln'"]),
    (dict(norm="bn"), ["norm", "'bn'"]),
    (dict(beta="exact"), ["beta", "'exact'"]),
    (dict(gn_groups=0), ["gn_groups", "0"]),
    (dict(eps=0.0), ["eps", "0.0"]),
    (dict(bn_momentum=1.5), ["bn_momentum", "1.5"]),
    (dict(use_scale="yes"), ["use_scale", "'yes'"]),
    (dict(bias=1), ["bias", "1"]),
    (dict(residual=None), ["residual", "None"]),
]


@pytest.mark.parametrize("overrides, words", BAD_CONFIGS)
def test_bad_configs_name_the_rule_and_value(overrides, words) -> None:
    with pytest.raises(ValueError) as err:
        cgnl_spec.check_config(cgnl.CGNLConfig(**overrides))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_gamma_is_inert_with_the_dot_kernel() -> None:
    cfg = cgnl.CGNLConfig(kernel="dot", gamma=0.0)
    assert cfg.gamma == 0.0


INPUT_RULES = [  # (overrides, x shape, words)
    ({}, (2, 24, 3, 3), ["planes (12 = C // 2 for C = 24)", "groups (8)"]),
    ({"planes": 8}, (2, 12, 3, 3), ["channels C (12)", "groups (8)", "grouped"]),
    ({"gn_groups": 3}, (2, 16, 3, 3), ["channels C (16)", "gn_groups (3)"]),
    ({"groups": 1}, (2, 1, 3, 3), ["planes", "C // 2", "0 for C = 1"]),
]


@pytest.mark.parametrize("overrides, shape, words", INPUT_RULES)
def test_input_dependent_rules(overrides, shape, words) -> None:
    cfg = cfg_of(**overrides)
    for call in (lambda: cgnl_spec.param_shapes(cfg, {"x": shape}),
                 lambda: cgnl_spec.resolve(cfg, {"x": shape}),
                 lambda: SPEC.forward({"x": np.zeros(shape)}, {}, {}, cfg)):
        with pytest.raises(ValueError) as err:
            call()
        for w in words:
            assert w in str(err.value), str(err.value)


def test_gn_groups_need_not_divide_c_without_groupnorm() -> None:
    shapes = cgnl_spec.param_shapes(cfg_of(gn_groups=3, norm=None), {"x": (1, 16, 2, 2)})
    assert "gn.weight" not in shapes


FLAG_MISMATCHES = [
    (dict(), lambda p, s: p.update({"t.bias": np.zeros(8)}),
     ["params", "unexpected", "'t.bias'", "bias=False"]),
    (dict(bias=True), lambda p, s: p.pop("g.bias"),
     ["missing", "'g.bias'", "bias=True"]),
    (dict(), lambda p, s: p.pop("gn.weight"), ["missing", "'gn.weight'", "norm='gn'"]),
    (dict(norm=None), lambda p, s: p.update({"gn.weight": np.ones(16)}),
     ["unexpected", "'gn.weight'", "norm=None"]),
    (dict(norm="bn_train"), lambda p, s: s.clear(),
     ["state", "missing", "'bn.running_mean'", "norm='bn_train'"]),
    (dict(norm="bn_eval"), lambda p, s: (p.update(s), s.clear()), None),  # accepted
]


@pytest.mark.parametrize("overrides, edit, words", FLAG_MISMATCHES)
def test_keys_must_agree_with_the_config(overrides, edit, words) -> None:
    cfg, inputs, params, state, _ = case(**overrides)
    params, state = dict(params), dict(state)
    edit(params, state)
    if words is None:
        out, _ = SPEC.forward(inputs, params, state, cfg)
        assert out["out"].shape == TINY["x"]
        return
    with pytest.raises(ValueError) as err:
        SPEC.forward(inputs, params, state, cfg)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bad_inputs() -> None:
    cfg, inputs, params, state, dout = case()
    x = inputs["x"]
    with pytest.raises(ValueError, match=r"x: expected a 3 or 4 or 5-D array, got shape \(3, 4\)"):
        SPEC.forward({"x": x[0, 0]}, params, state, cfg)
    with pytest.raises(ValueError, match=r"inputs: cgnl takes \['x'\]"):
        SPEC.forward({"x": x, "y": x}, params, state, cfg)
    bad = dict(params, **{"z.weight": np.zeros((16, 2, 1, 1))})
    with pytest.raises(ValueError, match=r"z.weight: expected shape \(16, 1, 1, 1\)"):
        SPEC.forward(inputs, bad, state, cfg)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x: expected finite"):
        SPEC.forward({"x": nan}, params, state, cfg)
    mixed = dict(params, **{"p.weight": params["p.weight"].astype(np.float32)})
    with pytest.raises(TypeError, match="dtype"):
        SPEC.forward(inputs, mixed, state, cfg)
    with pytest.raises(TypeError, match="dtype"):
        SPEC.forward({"x": x.astype(np.int64)}, params, state, cfg)
    with pytest.raises(TypeError, match="CGNLConfig"):
        SPEC.forward(inputs, params, state, config_to_dict(cfg))
    _, cache = SPEC.forward(inputs, params, state, cfg)
    with pytest.raises(ValueError, match=r"douts\['out'\]: expected shape"):
        SPEC.backward({"out": dout[:, :3]}, cache)
    with pytest.raises(ValueError, match="cgnl differentiates only 'out'"):
        SPEC.backward({"out": dout, "aux.s": dout}, cache)
    with pytest.raises(TypeError, match="dtype"):
        SPEC.backward({"out": dout.astype(np.float32)}, cache)


def test_bn_train_needs_two_values_per_channel() -> None:
    cfg = cfg_of(norm="bn_train")
    inputs, params, state = draw_case(SPEC, cfg, {"x": (1, 16, 1, 1)})
    with pytest.raises(ValueError, match="N·|S| >= 2"):
        SPEC.forward(inputs, params, state, cfg)
    evals = dataclasses.replace(cfg, norm="bn_eval")
    out, _ = SPEC.forward(inputs, params, state, evals)
    assert out["out"].shape == (1, 16, 1, 1)


def test_with_bn_mode_anchor_names_fixture_shapes() -> None:
    assert SPEC.with_bn_mode(cgnl.PRESETS["yue"], "train") is None
    bn = cfg_of(norm="bn_train")
    assert SPEC.with_bn_mode(bn, "eval").norm == "bn_eval"
    assert SPEC.with_bn_mode(SPEC.with_bn_mode(bn, "eval"), "train") == bn
    with pytest.raises(ValueError, match="mode"):
        SPEC.with_bn_mode(bn, "training")
    shapes = {"x": (2, 16, 5, 7)}
    for preset in cgnl.PRESETS:
        cfg = cgnl.PRESETS[preset]
        names = SPEC.anchor_names(preset, cfg, shapes)
        assert names == {k: k for k in ("t.weight", "p.weight", "g.weight", "z.weight",
                                        "gn.weight", "gn.bias")}
        assert SPEC.fixture_shapes(cfg) == shapes
    for overrides in (dict(bias=True), dict(norm=None), dict(gn_groups=4),
                      dict(residual=False), dict(kernel="gaussian")):
        assert SPEC.anchor_names("yue", cfg_of(**overrides), shapes) == {}
    assert SPEC.anchor_names("yue_gaussian", cfg_of("yue_gaussian", beta="per_element"),
                             shapes) == {}
    assert SPEC.anchor_names("yue", cfg_of(), {"x": (2, 16, 35)}) == {}
    assert SPEC.anchor_names(None, cfg_of(), shapes) == {}
    for overrides in (dict(groups=1), dict(groups=4, gn_groups=8),
                      dict(planes=12, groups=3, gn_groups=6, norm="gn")):
        cfg = cfg_of(**overrides)
        x = SPEC.fixture_shapes(cfg)["x"]
        SPEC.param_shapes(cfg, {"x": x})  # fits the config
        assert x[1] >= 16


def test_accumulation_families_and_widening() -> None:
    shapes = {"x": (2, 16, 5, 7)}
    for preset, cfg in cgnl.PRESETS.items():
        acc = SPEC.accumulation(cfg, shapes)
        assert {"out", "aux", "state", "grad.input", "grad.param"} <= set(acc)
        assert all(isinstance(v, int) and v >= 1 for v in acc.values())
        assert acc["grad.param"] >= acc["grad.input"] >= acc["out"]
    # the presets' fixture draws are conditioned (draw_scales): no widening
    for preset in cgnl.PRESETS:
        acc = SPEC.accumulation(cgnl.PRESETS[preset], shapes)
        assert not any(k.startswith("grad.param.") for k in acc), (preset, acc)
    # one channel per z group under a per-channel norm that does not also
    # cancel the attention: z is an eps-remainder, widened past every cap
    plain = SPEC.accumulation(cfg_of(norm=None), shapes)
    bn = SPEC.accumulation(cfg_of(norm="bn_train"), shapes)  # P/G = 1 here
    assert bn["grad.param.z"] > 1e12 * bn["grad.param"] and "grad.param.p" not in bn
    gauss16 = cfg_of("yue_gaussian", gn_groups=16)
    assert SPEC.accumulation(gauss16, shapes)["grad.param.z"] > 1e12 * plain["grad.param"]
    for cfg in (cfg_of(norm=None), cfg_of(norm="bn_eval"),
                cfg_of(norm="bn_train", planes=16), cfg_of(gn_groups=16)):
        assert "grad.param.z" not in SPEC.accumulation(cfg, shapes), cfg


def test_draw_scales_condition_the_cancelled_gradients() -> None:
    """draw_scales puts the aligned GN where s matters (s²·var u ~ eps) and
    the Gaussian where 2γθφ ~ 1: in the fixture draws the p/g gradients of
    yue and every weight gradient of yue_gaussian are as large as the rest
    (at unit draws they are ~1e-6 and ~2γ of it), and a float32 computation
    of them is as accurate as of any other tensor."""
    shapes = {"x": (2, 16, 5, 7)}
    for preset, keys in (("yue", ("p.weight", "g.weight")),
                         ("yue_gaussian", ("t.weight", "p.weight"))):
        cfg = cfg_of(preset)
        scales = cgnl_spec.draw_scales(cfg, shapes)
        assert scales, preset
        inputs, params, state = draw_case(SPEC, cfg, shapes)
        dout = np.random.default_rng(1).standard_normal(shapes["x"])
        unit = refattn_tensors(cfg, inputs, params, state, dout)
        scaled = {k: v * scales.get(k.rsplit(".", 1)[0], 1.0) for k, v in params.items()}
        cond = refattn_tensors(cfg, inputs, scaled, state, dout)
        low = dict(refattn_tensors(cfg, {k: v.astype(np.float32) for k, v in inputs.items()},
                                   {k: v.astype(np.float32) for k, v in scaled.items()},
                                   state, dout.astype(np.float32)))

        def size(res, k):  # relative to its own weights: scale-free
            return float(np.abs(res[f"grad.param.{k}"] * scaled[k]).max())

        top = max(size(cond, k) for k in ("t.weight", "z.weight", "gn.weight"))
        for k in keys:
            assert size(cond, k) > 1e-3 * top, (preset, k)
            assert float(np.abs(unit[f"grad.param.{k}"] * params[k]).max()) < 1e-3 * max(
                float(np.abs(unit[f"grad.param.{w}"] * params[w]).max())
                for w in ("z.weight", "gn.weight")), (preset, k)
            assert rel_err(low[f"grad.param.{k}"], cond[f"grad.param.{k}"]) < 1e-5, k
    assert cgnl_spec.draw_scales(cfg_of(norm=None), shapes) == {}
    assert cgnl_spec.draw_scales(cfg_of(gn_groups=4), shapes) == {}


# ---------------------------------------------------------------------------
# gradient checks


def preset_cases():
    for preset in cgnl.PRESETS:
        yield pytest.param(cgnl.PRESETS[preset], id=preset)


@pytest.mark.parametrize("cfg", list(preset_cases()))
def test_gradcheck_presets_full_tiny(cfg) -> None:
    inputs, params, state = draw_clear(cfg, TINY)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()


@pytest.mark.parametrize("cfg", list(preset_cases()))
def test_gradcheck_presets_fast_fixture_shapes(cfg) -> None:
    inputs, params, state = draw_clear(cfg)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


G_SMALL = dict(kernel="gaussian", gamma=0.2)
SMALL = {"x": (2, 8, 2, 3)}
OPTIONS = [  # overrides of yue with groups=4 (x (2, 8, 2, 3): P = 4, cg = 1)
    dict(norm=None),
    dict(norm=None, use_scale=True, planes=8),
    dict(use_scale=True),
    dict(groups=1),
    dict(groups=2, norm=None),
    dict(gn_groups=2),  # GN groups span two attention groups
    dict(groups=2, gn_groups=4, planes=8),  # GN groups inside the attention groups
    dict(gn_groups=1, bias=True),
    dict(norm="bn_train"),
    dict(norm="bn_eval", bias=True),
    dict(norm="bn_train", bias=True, bn_momentum=0.3, eps=1e-3),
    dict(bias=True, planes=8),
    dict(residual=False),
    dict(residual=False, norm=None),
    dict(kernel="gaussian", order=0, gamma=0.3),
    dict(kernel="gaussian", order=1, gamma=1e-4),
    dict(kernel="gaussian", order=2, gamma=1e-4, norm=None),
    dict(kernel="gaussian", order=3, gamma=0.1),
    dict(G_SMALL, order=3, norm=None, planes=8),
    dict(G_SMALL, order=2, groups=1, use_scale=True),
    dict(G_SMALL, order=3, groups=2, gn_groups=4),
    dict(G_SMALL, order=3, gn_groups=2, bias=True),
    dict(G_SMALL, order=2, norm="bn_train"),
    dict(G_SMALL, order=1, norm="bn_eval", residual=False),
    dict(G_SMALL, order=0, beta="per_element", norm=None),
    dict(G_SMALL, order=1, beta="per_element"),
    dict(G_SMALL, order=3, beta="per_element", norm=None, bias=True),
    dict(G_SMALL, order=2, beta="per_element", use_scale=True, groups=2, planes=8),
    dict(kernel="gaussian", order=3, gamma=0.3, beta="per_element", norm="bn_train"),
    dict(kernel="gaussian", order=3, gamma=1e-4, beta="per_element"),
]


def _ids(overrides: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in overrides.items()) or "yue"


@pytest.mark.parametrize("overrides", OPTIONS, ids=[_ids(o) for o in OPTIONS])
def test_gradcheck_options_full(overrides: dict) -> None:
    cfg = cfg_of("yue", **({"groups": 4} | overrides))
    inputs, params, state = draw_clear(cfg, SMALL, seed=3)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    assert not any(t.skipped_probes for t in report.tensors), report.to_text()


@pytest.mark.parametrize("shape", [(2, 8, 7), (1, 8, 2, 3, 3)], ids=["1d", "3d"])
def test_gradcheck_other_spatial_ranks(shape) -> None:
    for overrides in (dict(groups=2), dict(G_SMALL, order=2, beta="per_element",
                                           groups=4, norm="bn_train")):
        cfg = cfg_of(**overrides)
        inputs, params, state = draw_clear(cfg, {"x": shape})
        report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
        assert report.ok, report.to_text()


def test_gradcheck_catches_a_planted_kernel_bug(monkeypatch) -> None:
    """A Taylor backward that forgets the q factor of d(p^q)/dp must fail on
    the p weights only."""
    cfg = cfg_of(**G_SMALL, order=3, norm=None, groups=4)
    inputs, params, state = draw_case(SPEC, cfg, SMALL)
    real = cgnl._taylor_kernel_backward

    def half_dp(dy, c, out):
        real(dy, c, out)
        half = real(dy, c._replace(alpha=c.alpha * 0.5), out * 0)  # dp is linear in α
        out[:, 1] = half[:, 1]
        return out

    monkeypatch.setattr(cgnl, "_taylor_kernel_backward", half_dp)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    # dp reaches the p weights and, through W_pᵀ, the input
    assert sorted(report.failed) == ["input.x", "param.p.weight"], report.to_text()


def _cli_case(preset: str) -> tuple[Any, dict, dict, dict]:
    """The case ``refattn gradcheck --block cgnl --preset P`` checks: the
    fixture draw, with the t/p/g scales of ``draw_scales``."""
    from refattn.blocks.spec import config_from_dict
    from refattn.golden.generate import expand_requests, generate_case, split_case

    req, cfg = expand_requests("cgnl", preset, {}, seed=0)[0]
    case = generate_case(req, cfg)
    inputs, params, state = split_case(case.tensors)
    return config_from_dict(SPEC.config_cls, case.manifest["config"]), inputs, params, state


def test_full_gradcheck_of_the_default_fixture_case_checks_every_probe() -> None:
    """The yue fixture draws W_g about 1e-4 in size (``draw_scales``), so the
    loss bends within a default step of 6e-6 along those weights: the
    central differences there err by up to 1e-3 and converge to the
    analytic gradient like h² (2.6e-3, 1.6e-4, 1.0e-5, ... at h, h/4,
    h/16).  The refined steps check every probe, none is skipped."""
    cfg, inputs, params, state = _cli_case("yue")
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    assert not any(t.skipped_probes for t in report.tensors), report.to_text()


@pytest.mark.parametrize("factor", [1.0 + 1e-4, 1.0 - 1e-3, -1.0])
def test_full_gradcheck_of_the_default_fixture_case_rejects_a_wrong_g_gradient(
        monkeypatch, factor) -> None:
    """The refined steps forgive truncation error only: the same case with
    the W_g gradient 1e-4 off fails on that tensor alone."""
    cfg, inputs, params, state = _cli_case("yue")
    real = SPEC.backward

    def wrong(douts, cache):
        dinputs, dparams = real(douts, cache)
        return dinputs, dparams | {"g.weight": dparams["g.weight"] * factor}

    spec = dataclasses.replace(SPEC, backward=wrong)
    report = gradcheck_block(spec, cfg, inputs, params, state, mode="full")
    assert report.failed == ["param.g.weight"], report.to_text()


def test_gradcheck_strict_backend(xb) -> None:
    cfg = cfg_of(**G_SMALL, order=2, beta="per_element", norm="bn_train", bias=True,
                 groups=4)
    inputs, params, state = draw_case(SPEC, cfg, SMALL)
    ins, ps, st_ = (to_namespace(d, xb.xp, xb.device) for d in (inputs, params, state))
    report = gradcheck_block(SPEC, cfg, ins, ps, st_, mode="fast")
    assert report.ok, report.to_text()


# ---------------------------------------------------------------------------
# backends, dtypes

BACKEND_CONFIGS = [
    ("yue", {}),
    ("yue_gaussian", {}),
    ("yue", dict(kernel="gaussian", gamma=0.1, beta="per_element", norm="bn_train",
                 bias=True, use_scale=True)),
    ("yue", dict(norm="bn_eval", groups=2, residual=False)),
]


@pytest.mark.parametrize("preset, overrides", BACKEND_CONFIGS,
                         ids=[f"{p}-{_ids(o)}" for p, o in BACKEND_CONFIGS])
def test_backend_and_float32(xb, preset: str, overrides: dict) -> None:
    """Outputs stay on the strict device in the input dtype; float64 agrees
    with NumPy to round-off and float32 meets the float32 fixture tolerances
    (inputs rounded to float32 first and parameters scaled by draw_scales, as
    a float32 fixture does)."""
    cfg = cfg_of(preset, **overrides)
    shapes = SPEC.fixture_shapes(cfg)
    inputs, params, state = draw_clear(cfg)
    scales = cgnl_spec.draw_scales(cfg, shapes)
    params = {k: v * scales.get(k.rsplit(".", 1)[0], 1.0) for k, v in params.items()}
    dout = np.random.default_rng(5).standard_normal(shapes["x"])
    for dtype in ("float64", "float32"):
        rounded = [{k: v.astype(dtype).astype(np.float64) for k, v in d.items()}
                   for d in (inputs, params, state, {"d": dout})]
        ref = refattn_tensors(cfg, *rounded[:3], rounded[3]["d"])
        ins, ps, st_, d = (to_namespace(r, xb.xp, xb.device, dtype) for r in rounded)
        got = refattn_tensors(cfg, ins, ps, st_, d["d"])
        assert set(got) == set(ref)
        for k, v in got.items():
            assert backend.device(v) == xb.device, k
            assert backend.dtype_name(v) == dtype, k
            if dtype == "float64":
                rtol, atol_rel = 1e-12, 1e-12
            else:
                rtol, atol_rel = fixture_tol(cfg, shapes, k, dtype)
            assert within(xb.to_host(v), ref[k], rtol, atol_rel) <= 1, k


# ---------------------------------------------------------------------------
# properties


@st.composite
def block_cases(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    cg = draw(st.integers(1, 2))
    C = groups * draw(st.integers(1, 3))
    norm = draw(st.sampled_from(cgnl.NORMS))
    N, H, W = (draw(st.integers(1, 3)) for _ in range(3))
    if norm == "bn_train" and N * H * W < 2:
        norm = "bn_eval"
    gn_groups = draw(st.sampled_from([d for d in (1, 2, 4, 8) if C % d == 0]))
    cfg = cgnl.CGNLConfig(
        planes=groups * cg, groups=groups, use_scale=draw(st.booleans()),
        kernel=draw(st.sampled_from(cgnl.KERNELS)), order=draw(st.integers(0, 4)),
        gamma=draw(st.sampled_from([1e-4, 0.05, 0.3])),
        beta=draw(st.sampled_from(cgnl.BETAS)), norm=norm, gn_groups=gn_groups,
        bn_momentum=draw(st.floats(0.0, 1.0)), bias=draw(st.booleans()),
        residual=draw(st.booleans()),
    )
    return cfg, (N, C, H, W), draw(st.integers(0, 2**16))


@given(block_cases())
def test_backward_is_linear_keys_match_nothing_mutated(case_) -> None:
    cfg, shape, seed = case_
    inputs, params, state = draw_case(SPEC, cfg, {"x": shape}, seed=seed)
    rng = np.random.default_rng(seed)
    d1, d2 = rng.standard_normal(shape), rng.standard_normal(shape)
    saved = copy.deepcopy((inputs, params, state, d1, d2))
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    assert outputs["out"].shape == shape
    g1 = SPEC.backward({"out": d1}, cache)
    g2 = SPEC.backward({"out": d2}, cache)
    g12 = SPEC.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    for a, b, ab in zip(g1, g2, g12):
        assert set(a) == set(b) == set(ab)
        for k in a:
            scale = max(1.0, float(np.max(np.abs(a[k]))), float(np.max(np.abs(b[k]))))
            assert np.allclose(ab[k], 2.0 * a[k] - 3.0 * b[k], rtol=1e-9,
                               atol=1e-9 * scale), k
    dinputs, dparams = g1
    assert {k: v.shape for k, v in dinputs.items()} == {"x": shape}
    assert {k: v.shape for k, v in dparams.items()} == {
        k: v.shape for k, v in params.items()}
    for now, before in zip((inputs, params, state, d1, d2), saved):
        if isinstance(now, dict):
            assert all(np.array_equal(now[k], before[k]) for k in now)
        else:
            assert np.array_equal(now, before)
    if cfg.norm == "bn_train":
        assert {k for k in outputs if k.startswith("state.")} == {
            f"state.{k}" for k in state}
    else:
        assert not any(k.startswith("state.") for k in outputs)
    G, P = cfg.groups, cfg.planes
    s_shape = (shape[0], G) if cfg.kernel == "dot" else (shape[0], G, cfg.order + 1)
    assert outputs["aux.s"].shape == s_shape
    assert outputs["aux.y"].shape == (shape[0], P) + shape[2:]


# ---------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("preset", sorted(cgnl.PRESETS))
def test_zero_gn_affine_is_the_identity(preset: str) -> None:
    """GN gamma = beta = 0 (the anchor's init) with the residual: out = x,
    dx = dout, and no gradient reaches t, p, g or z (blocks.md 6.1)."""
    cfg, inputs, params, state, dout = case(preset, shapes={"x": (2, 16, 5, 7)})
    zero = dict(params, **{"gn.weight": np.zeros(16), "gn.bias": np.zeros(16)})
    res = refattn_tensors(cfg, inputs, zero, state, dout)
    assert np.array_equal(res["out"], inputs["x"])
    assert np.array_equal(res["grad.input.x"], dout)
    for k in ("t.weight", "p.weight", "g.weight", "z.weight"):
        assert not np.any(res[f"grad.param.{k}"]), k
    assert np.any(res["grad.param.gn.weight"])
    assert np.allclose(res["grad.param.gn.bias"], dout.sum(axis=(0, 2, 3)), rtol=1e-14)
    anchor_params, _ = cgnl_spec.init_params(cfg, {"x": (2, 16, 5, 7)}, seed=0,
                                        anchor_init=True)
    out, _ = SPEC.forward(inputs, anchor_params, {}, cfg)
    assert np.array_equal(out["out"], inputs["x"])
    assert all(np.std(anchor_params[k]) < 0.02 for k in ("t.weight", "z.weight"))


def test_groupnorm_cancels_the_dot_attention() -> None:
    """blocks.md 6.3: with gn_groups a multiple of groups, GN(s u) =
    sign(s) GN_{eps/s²}(u): W_p and W_g act only through sign(s) and eps."""
    shapes = {"x": (2, 16, 5, 7)}
    cfg = cfg_of(shapes=shapes)
    # a draw whose every group keeps s²·var(u) >= 4e4·eps
    inputs, params, state = draw_clear(cfg, shapes, margin=400 * MIN_MARGIN)
    dout = np.random.default_rng(3).standard_normal(shapes["x"])
    base, cache = SPEC.forward(inputs, params, state, cfg)
    ratio = MIN_MARGIN / (100 * saturation(cache))  # max eps/(s² var)
    base = refattn_tensors(cfg, inputs, params, state, dout)

    factor = np.array([2.0, 0.8, 1.5, 1.25, 0.9, 3.0, 1.1, 0.7])  # one per group

    def scaled(p: dict) -> dict:
        rows = factor.reshape(8, 1, 1, 1)  # P = 8, G = 8: one row of W_p per group
        return dict(p, **{"p.weight": rows * p["p.weight"],
                          "g.weight": 0.5 * p["g.weight"]})

    # positive per-group factors on p and g scale each s_k, and move the
    # output by O(eps/(s² var)) only ...
    moved = refattn_tensors(cfg, inputs, scaled(params), state, dout)
    assert rel_err(moved["aux.s"], 0.5 * factor * base["aux.s"]) < 1e-14
    smallest = float(np.min(0.5 * factor))
    assert 0 < rel_err(moved["out"], base["out"]) < ratio / smallest**2
    # ... while without a norm, with GN groups spanning two attention groups
    # (their ratio s_1/s_2 changes) or with eval-mode batch norm it is O(1)
    affine = {k: v for k, v in params.items() if k.startswith("gn.")}
    convs = {k: v for k, v in params.items() if not k.startswith("gn.")}
    bn = {"bn.weight": affine["gn.weight"], "bn.bias": affine["gn.bias"]}
    bn_state = {"bn.running_mean": np.zeros(16), "bn.running_var": np.ones(16)}
    for other, ps, st_ in ((dict(norm=None), convs, {}),
                           (dict(gn_groups=4), params, {}),
                           (dict(norm="bn_eval"), convs | bn, bn_state)):
        c2 = dataclasses.replace(cfg, **other)
        a = SPEC.forward(inputs, ps, st_, c2)[0]["out"]
        b = SPEC.forward(inputs, scaled(ps), st_, c2)[0]["out"]
        assert rel_err(b, a) > 1e-2, other
    # the sign of s does matter: flipping W_p flips every s
    flipped = dict(params, **{"p.weight": -params["p.weight"]})
    out = SPEC.forward(inputs, flipped, state, cfg)[0]["out"]
    assert rel_err(out, base["out"]) > 1e-2
    # the p/g gradients are eps-small next to the t gradient, unlike with a
    # misaligned GN or train-mode batch norm (which also cancels a per-group
    # rescaling of W_p, but sees how s varies over the batch)
    t_grad = np.abs(base["grad.param.t.weight"]).max()
    smaller = refattn_tensors(dataclasses.replace(cfg, eps=cfg.eps / 10), inputs,
                              params, state, dout)
    for k in ("p.weight", "g.weight"):
        assert np.abs(base[f"grad.param.{k}"]).max() < 100 * ratio * t_grad, k
        # they vanish with eps: a tenth of eps, about a tenth of the gradient
        shrink = np.abs(smaller[f"grad.param.{k}"]).max() / np.abs(
            base[f"grad.param.{k}"]).max()
        assert 0.08 < shrink < 0.12, (k, shrink)
    assert rel_err(smaller["grad.param.t.weight"], base["grad.param.t.weight"]) < 1e-4
    for other, ps, st_ in ((dict(gn_groups=4), params, {}),
                           (dict(norm="bn_train"), convs | bn, bn_state)):
        res = refattn_tensors(dataclasses.replace(cfg, **other), inputs, ps, st_, dout)
        assert np.abs(res["grad.param.p.weight"]).max() > 1e-2 * np.abs(
            res["grad.param.t.weight"]).max(), other
    # use_scale is a positive per-group factor 1/sqrt(M): cancelled up to eps
    # as well (eps/(s² var) grows M-fold)
    with_scale = refattn_tensors(dataclasses.replace(cfg, use_scale=True), inputs,
                                 params, state, dout)
    M = 5 * 7
    assert 0 < rel_err(with_scale["out"], base["out"]) < M * ratio
    assert cgnl.gn_cancels_attention(cfg)
    assert cgnl.gn_cancels_attention(cfg_of(groups=2, gn_groups=4))
    assert cgnl.gn_cancels_attention(cfg_of("yue_gaussian", order=0))
    assert not cgnl.gn_cancels_attention(cfg_of("yue_gaussian"))
    assert not cgnl.gn_cancels_attention(cfg_of(groups=4, gn_groups=2))
    assert not cgnl.gn_cancels_attention(cfg_of(norm="bn_train"))


def test_kink_margin_is_the_distance_from_the_sign_switch() -> None:
    """kink_margin = min max(|s|, w) / Σ|φ g| over the GN groups (w the
    smoothing width sqrt(eps / var u)); a group whose s is a cancelled sum
    of its terms is flagged; the fixture draws keep a wide margin; every
    configuration without the cancellation is smooth."""
    shapes = {"x": (2, 16, 5, 7)}
    cfg = cfg_of(shapes=shapes)
    inputs, params, state = draw_case(SPEC, cfg, shapes)
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    plain = dataclasses.replace(cfg, norm=None, residual=False)
    convs = {k: v for k, v in params.items() if not k.startswith("gn.")}
    z = SPEC.forward(inputs, convs, {}, plain)[0]["out"].reshape(2, 8, -1)
    s = outputs["aux.s"]  # (N, G)
    proj = {k: np.einsum("pc,ncl->npl", params[f"{k}.weight"].reshape(8, 16),
                         inputs["x"].reshape(2, 16, -1)) for k in "pg"}
    terms = np.abs(proj["p"] * proj["g"]).sum(axis=-1)  # (N, G): cg = 1
    std_z = np.sqrt(z.var(axis=-1))
    want = (np.maximum(std_z, math.sqrt(cfg.eps)) * np.abs(s) / (std_z * terms)).min()
    assert SPEC.kink_margin(cache) == pytest.approx(want, rel=1e-6)
    # group 0's g row made orthogonal to x p in sample 0: s_0 = w·(x p) is a
    # cancelled sum, and the margin falls to the smoothing width w / Σ|φ g|,
    # which is below MIN_MARGIN once eps is small enough
    w = params["g.weight"].copy()
    v = inputs["x"][0].reshape(16, -1) @ proj["p"][0, 0]  # (C,)
    w[0, :, 0, 0] -= (w[0, :, 0, 0] @ v) / (v @ v) * v
    cancelled = dict(params, **{"g.weight": w})
    _, near = SPEC.forward(inputs, cancelled, state, cfg)
    assert SPEC.kink_margin(near) < 0.1 * SPEC.kink_margin(cache)
    tiny = dataclasses.replace(cfg, eps=1e-16)
    assert SPEC.kink_margin(SPEC.forward(inputs, cancelled, state, tiny)[1]) < MIN_MARGIN
    assert SPEC.kink_margin(SPEC.forward(inputs, params, state, tiny)[1]) > MIN_MARGIN
    # the conditioned fixture draw: s small because W_g is, not by cancellation
    scales = cgnl_spec.draw_scales(cfg, shapes)
    scaled = {k: v * scales.get(k.rsplit(".", 1)[0], 1.0) for k, v in params.items()}
    assert SPEC.kink_margin(SPEC.forward(inputs, scaled, state, cfg)[1]) > 1e3 * MIN_MARGIN
    for other in (dict(norm=None), dict(gn_groups=4), dict(kernel="gaussian")):
        c2 = dataclasses.replace(cfg, **other)
        ps = convs if other.get("norm", "gn") is None else params
        assert SPEC.kink_margin(SPEC.forward(inputs, ps, {}, c2)[1]) == math.inf


def _exact_rbf(cfg, inputs, params) -> np.ndarray:
    """Σ_j exp(−γ(t_i − p_j)²) g_j · c per (n, group), straight from the
    definition with an (M, M) kernel matrix: (N, G, M)."""
    x = inputs["x"]
    N, C = x.shape[:2]
    G = cfg.groups
    proj = {k: np.einsum("pc,ncl->npl", params[f"{k}.weight"].reshape(-1, C),
                         x.reshape(N, C, -1)).reshape(N, G, -1) for k in "tpg"}
    t, p, g = proj["t"], proj["p"], proj["g"]
    c = 1 / math.sqrt(t.shape[-1]) if cfg.use_scale else 1.0
    k = np.exp(-cfg.gamma * (t[..., :, None] - p[..., None, :]) ** 2)  # (N, G, M, M)
    return c * np.einsum("ngij,ngj->ngi", k, g)


def test_per_element_taylor_converges_to_the_exact_rbf_sum() -> None:
    shapes = {"x": (2, 8, 3, 4)}
    base = cfg_of(kernel="gaussian", gamma=0.3, beta="per_element", norm=None,
                  groups=2, use_scale=True, shapes=shapes)
    inputs, params, state = draw_case(SPEC, base, shapes, seed=1)
    exact = _exact_rbf(base, inputs, params)
    errors = []
    for order in (0, 1, 2, 4, 8, 16, 30):
        cfg = dataclasses.replace(base, order=order)
        out, _ = SPEC.forward(inputs, params, state, cfg)
        y = out["aux.y"].reshape(exact.shape)
        errors.append(rel_err(y, exact))
    assert errors[0] > 1e-2
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-13, errors
    # the constant envelope converges to exp(−2γ) Σ_j exp(2γ t_i p_j) g_j instead
    const = dataclasses.replace(base, beta="const", order=30)
    y = SPEC.forward(inputs, params, state, const)[0]["aux.y"].reshape(exact.shape)
    x = inputs["x"].reshape(2, 8, -1)
    t, p, g = (np.einsum("pc,ncl->npl", params[f"{k}.weight"].reshape(-1, 8), x)
               .reshape(2, 2, -1) for k in "tpg")
    want = math.exp(-0.6) / math.sqrt(t.shape[-1]) * np.einsum(
        "ngij,ngj->ngi", np.exp(0.6 * t[..., :, None] * p[..., None, :]), g)
    assert rel_err(y, want) < 1e-13
    assert rel_err(y, exact) > 1e-2  # a different function, not an approximation


def test_gamma_1e4_high_orders_are_below_float32_resolution() -> None:
    """blocks.md 6.3: at γ = 1e-4 the q >= 2 terms are about (2γ)²/2 = 2e-8
    of y per unit t², below float32's unit round-off 2^-24 for typical
    elements (they grow like t^q, so the largest |t| reach a few ulps), while
    the q = 1 term is plainly visible.  At unit-scale draws float32
    tolerances cannot tell order 1 from order 3 at this γ; at γ = 0.1 they
    can, and so can the fixture draws at γ = 1e-4 (draw_scales: 2γθφ ~ 1)."""
    shapes = {"x": (2, 16, 5, 7)}
    cfg, inputs, params, state, _ = case("yue_gaussian", shapes=shapes)

    def y_of(c):
        return SPEC.forward(inputs, params, state, c)[0]

    y = {q: y_of(dataclasses.replace(cfg, order=q)) for q in (0, 1, 3)}
    high = np.abs(y[3]["aux.y"] - y[1]["aux.y"]) / np.abs(y[3]["aux.y"])
    assert np.median(high) < 2.0**-24
    assert rel_err(y[1]["aux.y"], y[0]["aux.y"]) > 1e-4
    for k in ("out", "aux.y"):
        rtol, atol_rel = fixture_tol(cfg, shapes, k, "float32")
        assert within(y[1][k], y[3][k], rtol, atol_rel) <= 1, k
    big = dataclasses.replace(cfg, gamma=0.1)
    rtol, atol_rel = fixture_tol(big, shapes, "out", "float32")
    assert within(y_of(dataclasses.replace(big, order=1))["out"], y_of(big)["out"],
                  rtol, atol_rel) > 1
    scales = cgnl_spec.draw_scales(cfg, shapes)
    params = {k: v * scales.get(k.rsplit(".", 1)[0], 1.0) for k, v in params.items()}
    rtol, atol_rel = fixture_tol(cfg, shapes, "out", "float32")
    assert within(y_of(dataclasses.replace(cfg, order=1))["out"], y_of(cfg)["out"],
                  rtol, atol_rel) > 1e3


def test_order_0_const_ignores_t() -> None:
    """y = α_0 s_0 is constant per group: the t gradient is exactly zero, and
    p is unused too (const beta: s_0 = c Σ g)."""
    cfg, inputs, params, state, dout = case(kernel="gaussian", order=0, gamma=0.2,
                                            norm=None)
    res = refattn_tensors(cfg, inputs, params, state, dout)
    assert not np.any(res["grad.param.t.weight"])
    assert not np.any(res["grad.param.p.weight"])
    y = res["aux.y"].reshape(2, 8, -1)
    assert np.allclose(y, y[..., :1], rtol=0, atol=1e-15)
    assert cgnl.taylor_alpha(cfg) == (math.exp(-0.4),)


def test_taylor_alpha() -> None:
    a = cgnl.taylor_alpha(cfg_of(kernel="gaussian", gamma=0.1, order=3))
    want = [math.exp(-0.2) * 0.2**q / math.factorial(q) for q in range(4)]
    assert np.allclose(a, want, rtol=1e-15)
    b = cgnl.taylor_alpha(cfg_of(kernel="gaussian", gamma=0.1, order=3,
                                 beta="per_element"))
    assert np.allclose(b, [0.2**q / math.factorial(q) for q in range(4)], rtol=1e-15)


# ---------------------------------------------------------------------------
# PyTorch parity


@pytest.fixture
def anchors(torch):
    torch.set_default_dtype(torch.float64)
    return importlib.import_module("anchors.cgnl")


def torch_tensors(torch, module, inputs, params, state, dout):
    """Load refattn's tensors by their (identical) names, run forward + backward."""
    own = module.state_dict()
    values = params | state
    sd = {k: torch.tensor(v).reshape(own[k].shape) for k, v in values.items()}
    result = module.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result
    x = torch.tensor(inputs["x"], requires_grad=True)
    out = module(x)
    out.backward(torch.tensor(dout))
    res = {"out": out.detach().numpy(), "grad.input.x": x.grad.numpy(),
           "aux.s": module.last_s.numpy(), "aux.y": module.last_y.numpy()}
    named = dict(module.named_parameters())
    after = module.state_dict()
    for k in values:
        if is_buffer(k):
            if module.training:
                res[f"state.{k}"] = after[k].numpy()
        else:
            res[f"grad.param.{k}"] = named[k].grad.numpy().reshape(values[k].shape)
    return res


def compare(got: dict, ref: dict, cfg, shapes) -> dict[str, float]:
    """Relative error per tensor.  Gradients a norm cancels up to eps (the
    p/g gradients behind the aligned GroupNorm at unit-scale draws, blocks.md
    10; z under a per-channel norm: the keys ``accumulation`` widens) and analytically
    zero ones are measured on the scale of the largest gradient."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    fam = max(float(np.max(np.abs(v))) for k, v in ref.items() if k.startswith("grad."))
    acc = SPEC.accumulation(cfg, shapes)
    widened = tuple(k + "." for k, n in acc.items()
                    if k.startswith("grad.param.") and n > acc["grad.param"])
    if cgnl.gn_cancels_attention(cfg):  # at unit draws (no draw_scales here)
        widened += ("grad.param.p.", "grad.param.g.")
    errors = {}
    for k, v in ref.items():
        cancelled = bool(widened) and k.startswith(widened)
        zero = k.startswith("grad.") and float(np.max(np.abs(v))) < 1e-9 * fam
        errors[k] = rel_err(got[k], v, floor=fam if cancelled or zero else 0.0)
    return errors


ANCHOR_CASES = [  # (preset, overrides, factory, x shape)
    ("yue", {}, "make_yue", (3, 32, 7, 6)),
    ("yue", {"use_scale": True}, "make_yue", (3, 32, 7, 6)),
    ("yue", {"groups": 1}, "make_yue", (2, 16, 5, 4)),
    ("yue", {"groups": 4, "planes": 12, "eps": 1e-3}, "make_yue", (2, 16, 5, 4)),
    ("yue_gaussian", {}, "make_yue_gaussian", (3, 32, 7, 6)),
    ("yue_gaussian", {"gamma": 0.1}, "make_yue_gaussian", (3, 32, 7, 6)),
    ("yue_gaussian", {"order": 2, "use_scale": True, "gamma": 0.25},
     "make_yue_gaussian", (2, 16, 5, 4)),
    ("yue_gaussian", {"order": 0, "gamma": 0.3}, "make_yue_gaussian", (2, 16, 5, 4)),
    ("yue_gaussian", {"order": 5, "groups": 2, "gamma": 0.2}, "make_yue_gaussian",
     (2, 16, 5, 4)),
    ("yue_gaussian", {"groups": 1}, "make_yue_gaussian", (2, 16, 5, 4)),
]
REFERENCE_CASES = [  # (overrides of yue, x shape): options the anchor cannot express
    (dict(norm=None), (2, 16, 5, 4)),
    (dict(norm="bn_train", bias=True, bn_momentum=0.3), (2, 16, 5, 4)),
    (dict(norm="bn_eval", groups=2), (2, 16, 5, 4)),
    (dict(groups=4, gn_groups=2), (2, 16, 5, 4)),
    (dict(residual=False, bias=True), (2, 16, 5, 4)),
    (dict(kernel="gaussian", gamma=0.2, order=3, beta="per_element", norm=None),
     (2, 16, 5, 4)),
    (dict(kernel="gaussian", gamma=0.1, order=2, beta="per_element", use_scale=True,
          norm="bn_train"), (2, 16, 5, 4)),
    (dict(kernel="gaussian", gamma=0.1, order=4, bias=True, gn_groups=16),
     (2, 16, 5, 4)),
    (dict(groups=2, norm="bn_train"), (2, 8, 9)),
    (dict(kernel="gaussian", gamma=0.2, beta="per_element", groups=2, norm=None),
     (1, 8, 2, 3, 4)),
]


def _run_parity(torch, anchors, cfg, factory, shape, seed=4):
    shapes = {"x": shape}
    cfg = cgnl_spec.resolve(cfg, shapes)
    inputs, params, state = draw_clear(cfg, shapes, seed=seed)
    dout = np.random.default_rng(7).standard_normal(shape)
    ref = refattn_tensors(cfg, inputs, params, state, dout)
    config = config_to_dict(cfg) | {"channels": shape[1],
                                    "spatial_rank": len(shape) - 2}
    module = getattr(anchors, factory)(config)
    got = torch_tensors(torch, module, inputs, params, state, dout)
    return compare(got, ref, cfg, shapes), ref, got


@pytest.mark.parametrize("preset, overrides, factory, shape", ANCHOR_CASES,
                         ids=[f"{p}-{_ids(o)}" for p, o, _, _ in ANCHOR_CASES])
def test_parity_with_anchor(torch, anchors, preset, overrides, factory, shape) -> None:
    cfg = cfg_of(preset, **overrides)
    assert SPEC.anchor_names(preset, cfg, {"x": shape})
    errors, _, _ = _run_parity(torch, anchors, cfg, factory, shape)
    worst = max(errors, key=errors.get)
    assert errors[worst] < PARITY_RTOL, (worst, errors)


@pytest.mark.parametrize("overrides, shape", REFERENCE_CASES,
                         ids=[f"{_ids(o)}-{len(s) - 2}d" for o, s in REFERENCE_CASES])
def test_parity_with_reference(torch, anchors, overrides, shape) -> None:
    errors, _, _ = _run_parity(torch, anchors, cfg_of(**overrides), "make_reference",
                               shape)
    worst = max(errors, key=errors.get)
    assert errors[worst] < PARITY_RTOL, (worst, errors)


@pytest.mark.parametrize("use_scale", [False, True])
def test_seed_notes_kernel_is_the_dot_kernel_for_one_group(torch, anchors,
                                                           use_scale) -> None:
    """The seed notes' ``kernel(t, p, g, b, c, h, w)`` is refattn's dot kernel
    with groups = 1: y = (Σ p g [/ sqrt(c h w)]) t over all P·H·W elements."""
    cfg, inputs, params, state, _ = case(groups=1, use_scale=use_scale, norm=None,
                                         shapes={"x": (3, 12, 5, 4)})
    out, _ = SPEC.forward(inputs, params, state, cfg)
    x = torch.tensor(inputs["x"])
    t, p, g = (torch.nn.functional.conv2d(x, torch.tensor(params[f"{k}.weight"]))
               for k in "tpg")
    b, c, h, w = t.shape
    y = anchors.SeedNotesKernel(use_scale).kernel(t, p, g, b, c, h, w)
    assert rel_err(y.numpy(), out["aux.y"]) < 1e-14
    assert rel_err(torch.bmm(p.reshape(b, 1, -1), g.reshape(b, -1, 1)).numpy()
                   .reshape(b, 1) / (math.sqrt(c * h * w) if use_scale else 1.0),
                   out["aux.s"]) < 1e-14


def test_anchor_factories_refuse_what_they_cannot_express(anchors) -> None:
    d = config_to_dict(cgnl_spec.resolve(cgnl.PRESETS["yue"], {"x": (2, 16, 4, 4)}))
    with pytest.raises(ValueError, match="channels"):
        anchors.make_yue(d)
    d |= {"channels": 16}
    for key, value in (("bias", True), ("norm", None), ("residual", False),
                       ("kernel", "gaussian"), ("gn_groups", 4)):
        with pytest.raises(ValueError, match=key):
            anchors.make_yue(d | {key: value})
    with pytest.raises(ValueError, match="beta"):
        anchors.make_yue_gaussian(d | {"kernel": "gaussian", "beta": "per_element"})
    with pytest.raises(ValueError, match="2-D"):
        anchors.make_yue(d | {"spatial_rank": 1})
    with pytest.raises(ValueError, match="use_scale"):
        anchors.make_yue_scale_all_planes(d)
    module = anchors.make_yue(d)
    assert tuple(module.t.weight.shape) == (8, 16, 1, 1)
    via_shapes = anchors.make_yue({k: v for k, v in d.items() if k != "channels"}
                                  | {"input_shapes": {"x": [2, 16, 4, 4]}})
    assert tuple(via_shapes.z.weight.shape) == (16, 1, 1, 1)


# ---------------------------------------------------------------------------
# known buggy variants


def test_alpha_float32_disagrees_at_gamma_0_1(torch, anchors) -> None:
    """α rounded to float32 in a float64 model: with γ = 0.1 and order 3 the
    output, the attended features and every gradient but GN's beta are off by
    ~1e-8 relative; the moments aux.s (no α in them) agree."""
    cfg = cfg_of("yue_gaussian", gamma=0.1)
    errors, _, _ = _run_parity(torch, anchors, cfg, "make_yue_gaussian_alpha_float32",
                               (3, 32, 7, 6))
    differ = {k for k, e in errors.items() if e > 1e-9}
    assert differ == set(errors) - {"aux.s", "grad.param.gn.bias"}, errors
    assert errors["aux.s"] < PARITY_RTOL and errors["grad.param.gn.bias"] < PARITY_RTOL
    assert errors["out"] < 1e-6  # a float32-level error, not an O(1) one


def test_alpha_float32_at_the_anchor_gamma(torch, anchors) -> None:
    """At γ = 1e-4 the float32 α_0 rescales the dominant q = 0 offset of y by
    ~3e-8: at unit-scale draws aux.y shows it plainly, the output (after GN)
    only at ~1e-10 and the gradients at ~1e-10.  (The fixture draws, where
    2γθφ ~ 1, fail it on the output: test_fixture_tolerances_reject_...)"""
    cfg = cfg_of("yue_gaussian")
    errors, _, _ = _run_parity(torch, anchors, cfg, "make_yue_gaussian_alpha_float32",
                               (3, 32, 7, 6))
    assert 1e-9 < errors["aux.y"] < 1e-6, errors
    assert 1e-12 < errors["out"] < 1e-8, errors
    shapes = {"x": (3, 32, 7, 6)}
    acc = SPEC.accumulation(cfg, shapes)
    assert errors["aux.y"] > tolerance_for("float64", acc["aux"])[0]
    assert errors["out"] > tolerance_for("float64", acc["out"])[0]
    assert errors["grad.param.z.weight"] < 1e-8, errors


def test_scale_over_all_planes_disagrees(torch, anchors) -> None:
    """use_scale by sqrt(P·H·W) instead of sqrt(cg·H·W): aux.s is sqrt(G) too
    small; the aligned GN cancels the factor up to eps, so the output moves at
    the eps level, while the p/g gradients (eps/s² sized) differ plainly."""
    cfg = cfg_of("yue", use_scale=True)
    errors, ref, got = _run_parity(torch, anchors, cfg, "make_yue_scale_all_planes",
                                   (3, 32, 7, 6))
    assert rel_err(got["aux.s"] * math.sqrt(8), ref["aux.s"]) < 1e-14
    assert errors["aux.s"] > 0.5
    assert 1e-9 < errors["out"] < 1e-2, errors
    for k in ("grad.param.p.weight", "grad.param.g.weight"):
        assert rel_err(got[k], ref[k]) > 0.1, k
    assert errors["grad.param.gn.bias"] < PARITY_RTOL
    gauss = cfg_of("yue_gaussian", use_scale=True, gamma=0.1)
    errors, ref, got = _run_parity(torch, anchors, gauss, "make_yue_scale_all_planes",
                                   (3, 32, 7, 6))
    assert rel_err(got["aux.s"] * math.sqrt(8), ref["aux.s"]) < 1e-14
    assert errors["out"] > 1e-9 and errors["grad.param.p.weight"] > 1e-3, errors


# ---------------------------------------------------------------------------
# fixture tolerances hold for a correct independent implementation


FIXTURE_CASES = [  # (preset, overrides, factory, seeds)
    ("yue", {}, "make_yue", 3),
    ("yue_gaussian", {}, "make_yue_gaussian", 3),
    ("yue", {"norm": "bn_train"}, "make_reference", 2),  # P/G = 1: z cancelled
    ("yue", {"gn_groups": 16}, "make_reference", 2),
    ("yue_gaussian", {"order": 0, "gamma": 0.3}, "make_reference", 2),
    ("yue", {"kernel": "gaussian", "gamma": 0.1, "norm": "bn_train"},
     "make_reference", 1),
]


def _excess(gen, got: dict) -> dict[str, float]:
    """max |a − e| / (atol + rtol·|e|) per tensor, with the case's tolerances."""
    out = {}
    for key, actual in got.items():
        expected = gen.tensors[key]
        rtol, atol = gen.tolerances[key]
        bound = atol + rtol * np.abs(expected)
        out[key] = float(np.max(np.abs(actual - expected) / np.maximum(bound, 1e-300)))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset, overrides, factory, seeds", FIXTURE_CASES,
                         ids=[f"{p}-{_ids(o)}" for p, o, _, _ in FIXTURE_CASES])
def test_fixture_tolerances_accept_a_correct_torch_module(
        torch, anchors, preset, overrides, factory, seeds, dtype) -> None:
    """Cases generated by refattn.golden (accumulation-derived tolerances,
    DESIGN 7) accept the faithful anchor port / the reference module in the
    case's dtype, eps-cancelled gradients included."""
    from refattn.adapters.torch import run_torch_case
    from refattn.golden.generate import CaseRequest, generate_case

    for seed in range(seeds):
        req = CaseRequest("cgnl", preset, dict(overrides), seed=seed, dtype=dtype)
        gen = generate_case(req, SPEC.config(preset, **overrides))
        excess = _excess(gen, run_torch_case(gen, getattr(anchors, factory)))
        assert max(excess.values()) <= 1, (seed, excess)


@pytest.mark.parametrize("preset, factory, overrides, differ", [
    ("yue", "make_yue_scale_all_planes", {"use_scale": True},
     {"output.out", "grad.param.p.weight", "grad.param.g.weight"}),
    ("yue_gaussian", "make_yue_gaussian_alpha_float32", {}, {"output.out"}),
    ("yue_gaussian", "make_yue_gaussian_alpha_float32", {"gamma": 0.1},
     {"output.out", "grad.input.x", "grad.param.g.weight"}),
])
def test_fixture_tolerances_reject_the_buggy_variants(torch, anchors, preset, factory,
                                                      overrides, differ) -> None:
    from refattn.adapters.torch import run_torch_case
    from refattn.golden.generate import CaseRequest, generate_case

    req = CaseRequest("cgnl", preset, dict(overrides))
    gen = generate_case(req, SPEC.config(preset, **overrides))
    excess = _excess(gen, run_torch_case(gen, getattr(anchors, factory)))
    failed = {k for k, e in excess.items() if e > 1}
    assert differ <= failed, excess
