"""Cross-layer non-local (``cross_layer``): configs and input names, gradient
checks over every preset and option (1 and 3 key/value layers, both layouts),
the strict backend, properties, identities (zero BN, the non-local block,
the sum over layers), PyTorch parity with the official CNL module and the
corrected seed snippet, the seed snippet's bugs one by one, and the known
buggy variants the validation tests use."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.blocks import cross_layer as cl
from refattn.blocks import non_local as nl
from refattn.blocks.registry import draw_case, gradcheck_block, run_block
from refattn.blocks.spec import MIN_MARGIN, config_to_dict, to_namespace
from refattn.blocks.specs import cross_layer as cl_spec
from refattn.blocks.specs import non_local as nl_spec
from refattn.params import is_buffer

SPEC = cl_spec.SPECS["cross_layer"]
PARITY_RTOL = 1e-11

ONE = {"x_q": (2, 4, 2, 3), "x_kv": (2, 3, 3, 3)}
THREE = {"x_q": (2, 4, 2, 3), "x_kv.0": (2, 3, 3, 2), "x_kv.1": (2, 5, 2, 2),
         "x_kv.2": (2, 2, 2, 3)}


def rel_err(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """max |actual − expected| relative to the scale of `expected` (or `floor`)."""
    a = np.asarray(backend.to_host(actual), dtype=np.float64)
    e = np.asarray(backend.to_host(expected), dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e), initial=0.0)), floor, 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale


def cfg_of(preset: str, mode: str | None = None,
           **overrides: Any) -> cl.CrossLayerConfig:
    cfg = SPEC.config(preset, **overrides)
    return cfg if mode is None else SPEC.with_bn_mode(cfg, mode)


def draw(cfg, shapes=None, seed=0):
    """draw_case; the block has no kinks, so every draw keeps the margin."""
    inputs, params, state = draw_case(SPEC, cfg, shapes, seed=seed)
    _, cache = SPEC.forward(inputs, params, state, cfg)
    assert SPEC.kink_margin(cache) >= MIN_MARGIN
    return inputs, params, state


def refattn_tensors(cfg, inputs, params, state, dout) -> dict[str, np.ndarray]:
    """Every comparable tensor of one forward + backward, keyed like a fixture."""
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, params, state, dout)
    res = dict(outputs)
    res |= {f"grad.input.{k}": v for k, v in dinputs.items()}
    res |= {f"grad.param.{k}": v for k, v in dparams.items()}
    if cfg.bn == "eval":
        res |= {f"state.{k}": v for k, v in state.items()}  # unchanged in eval
    return res


def cotangent(shapes, seed=7) -> np.ndarray:
    """A cotangent for `out` (the query's shape), from input shapes or arrays."""
    q = shapes["x_q"]
    return np.random.default_rng(seed).standard_normal(getattr(q, "shape", q))


# ---------------------------------------------------------------------------
# configs, presets, input names


def test_registry_has_the_entry() -> None:
    from refattn.blocks.registry import BLOCKS

    assert BLOCKS["cross_layer"] is SPEC
    assert SPEC.presets is cl.PRESETS and SPEC.default_preset == "cnl"


BLOCKS_MD_PRESETS = {  # reference/blocks.md section 9.3
    "cnl": dict(planes=256, use_scale=True, bias=False, bn="train", bn_eps=1e-5,
                bn_momentum=0.1, layout="transpose", out_proj=True, residual=True),
    "cnl_official_noperm": dict(planes=256, use_scale=True, bias=False, bn="train",
                                bn_eps=1e-5, bn_momentum=0.1, layout="official_noperm",
                                out_proj=True, residual=True),
    "seed_fixed": dict(planes=None, use_scale=False, bias=True, bn=None, bn_eps=1e-5,
                       bn_momentum=0.1, layout="transpose", out_proj=False,
                       residual=False),
}


def test_presets_are_complete_and_match_blocks_md() -> None:
    assert set(cl.PRESETS) == set(BLOCKS_MD_PRESETS)
    fields = {f.name for f in dataclasses.fields(cl.CrossLayerConfig)}
    for name, want in BLOCKS_MD_PRESETS.items():
        assert set(want) == fields
        assert dataclasses.asdict(cl.PRESETS[name]) == want, name
    assert cl.CrossLayerConfig() == cl.PRESETS["cnl"]


def test_resolved_fills_planes_with_the_query_channels() -> None:
    cfg = cl_spec.resolve(cl.PRESETS["seed_fixed"], ONE)
    assert cfg.planes == 4
    assert cl_spec.resolve(cl.PRESETS["cnl"], ONE) is cl.PRESETS["cnl"]
    assert cl_spec.resolve(cl.CrossLayerConfig(planes=None), THREE).planes == 4
    assert SPEC.fixture_shapes(dataclasses.replace(cl.PRESETS["seed_fixed"], planes=7))[
        "x_q"][1] == 7


def test_param_shapes_three_layers() -> None:
    cfg = cfg_of("cnl", planes=3, bias=True)
    assert cl_spec.param_shapes(cfg, THREE) == {
        "theta.weight": (3, 4, 1, 1), "theta.bias": (3,),
        "W.weight": (4, 3, 1, 1), "W.bias": (4,),
        **{k: v for m, ck in enumerate((3, 5, 2)) for k, v in {
            f"kv{m}.phi.weight": (3, ck, 1, 1), f"kv{m}.phi.bias": (3,),
            f"kv{m}.g.weight": (3, ck, 1, 1), f"kv{m}.g.bias": (3,),
            f"kv{m}.bn.weight": (4,), f"kv{m}.bn.bias": (4,),
            f"kv{m}.bn.running_mean": (4,), f"kv{m}.bn.running_var": (4,)}.items()},
    }


PRESET_KEYS = {
    "cnl": {"theta.weight", "W.weight", "kv0.phi.weight", "kv0.g.weight",
            "kv0.bn.weight", "kv0.bn.bias", "kv0.bn.running_mean",
            "kv0.bn.running_var"},
    "seed_fixed": {"theta.weight", "theta.bias", "kv0.phi.weight", "kv0.phi.bias",
                   "kv0.g.weight", "kv0.g.bias"},
}
PRESET_KEYS["cnl_official_noperm"] = PRESET_KEYS["cnl"]


@pytest.mark.parametrize("preset", sorted(PRESET_KEYS))
@pytest.mark.parametrize("form", ["x_kv", "x_kv.0"])
def test_preset_parameter_keys(preset: str, form: str) -> None:
    """One key/value layer is kv0 whether the input is named x_kv or x_kv.0."""
    shapes = {"x_q": (2, 6, 3, 3), form: (2, 5, 4, 4)}
    cfg = cl.PRESETS[preset]
    keys = set(cl_spec.param_shapes(cfg, shapes))
    assert keys == PRESET_KEYS[preset]
    params, state = cl_spec.init_params(cfg, shapes, seed=0)
    assert set(params) | set(state) == keys
    assert all(is_buffer(k) for k in state) and not any(is_buffer(k) for k in params)


BAD_CONFIGS = [
    (dict(planes=0), ["planes", "0"]),
    (dict(planes=True), ["planes", "True"]),
    (dict(planes=2.5), ["planes", "2.5"]),
    (dict(use_scale=1), ["use_scale", "1"]),
    (dict(bias="no"), ["bias", "'no'"]),
    (dict(bn="training"), ["bn", "'training'"]),
    (dict(bn_eps=0.0), ["bn_eps", "0.0"]),
    (dict(bn_momentum=1.5), ["bn_momentum", "1.5"]),
    (dict(layout="noperm"), ["layout", "'noperm'"]),
    (dict(out_proj=None), ["out_proj", "None"]),
    (dict(residual=0), ["residual", "0"]),
    (dict(out_proj=False, bn="train"), ["out_proj=False requires bn=None", "'train'"]),
    (dict(out_proj=False, bn="eval"), ["out_proj=False requires bn=None", "'eval'"]),
]


@pytest.mark.parametrize("overrides, words", BAD_CONFIGS)
def test_bad_configs_name_the_rule_and_value(overrides, words) -> None:
    with pytest.raises(ValueError) as err:
        cl_spec.check_config(cl.CrossLayerConfig(**overrides))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_out_proj_off_needs_planes_equal_to_query_channels() -> None:
    cfg = cl.CrossLayerConfig(planes=5, out_proj=False, bn=None)
    msg = r"planes \(5\) must equal the query channels Cq \(4\) when out_proj=False"
    with pytest.raises(ValueError, match=msg):
        cl_spec.param_shapes(cfg, ONE)
    with pytest.raises(ValueError, match=msg):
        cl_spec.resolve(cfg, ONE)
    inputs, params, state = draw(cfg_of("seed_fixed"), ONE)
    with pytest.raises(ValueError, match=msg):
        SPEC.forward(inputs, params, state, cfg)


BAD_NAMES = [  # (input shapes, words in the message)
    ({"x_q": (2, 4, 2, 3), "x_kv": (2, 3, 3, 3), "x_kv.0": (2, 3, 3, 3)},
     ["either 'x_kv'", "not both", "'x_kv.0'"]),
    ({"x_q": (2, 4, 2, 3), "x_kv.0": (2, 3, 3, 3), "x_kv.2": (2, 3, 3, 3)},
     ["without gaps", "x_kv.1 missing"]),
    ({"x_q": (2, 4, 2, 3), "x_kv.1": (2, 3, 3, 3)}, ["x_kv.0 missing"]),
    ({"x_q": (2, 4, 2, 3)}, ["at least one key/value input"]),
    ({"x_kv": (2, 3, 3, 3)}, ["query input 'x_q'"]),
    ({"x_q": (2, 4, 2, 3), "x_kv.01": (2, 3, 3, 3)}, ["unexpected", "'x_kv.01'"]),
    ({"x_q": (2, 4, 2, 3), "x": (2, 3, 3, 3)}, ["unexpected", "'x'"]),
    ({"x_q": (2, 4, 2, 3), "x_kv": (3, 3, 3, 3)},
     ["x_kv: batch size (3) must equal x_q's (2)"]),
    ({"x_q": (2, 4, 2, 3), "x_kv.0": (2, 3, 3, 3), "x_kv.1": (1, 3, 3, 3)},
     ["x_kv.1: batch size (1) must equal x_q's (2)"]),
    ({"x_q": (2, 4, 6), "x_kv": (2, 3, 3, 3)}, ["x_q: expected a 4-D array"]),
    ({"x_q": (2, 4, 2, 3), "x_kv": (2, 3, 9)}, ["x_kv: expected a 4-D array"]),
]


@pytest.mark.parametrize("shapes, words", BAD_NAMES)
def test_bad_input_names_and_shapes(shapes, words) -> None:
    cfg = cfg_of("cnl", planes=3)
    with pytest.raises(ValueError) as err:
        cl_spec.param_shapes(cfg, shapes)
    for w in words:
        assert w in str(err.value), str(err.value)
    # the same rule from forward, on arrays
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(s) for k, s in shapes.items()}
    good, params, state = draw(cfg, THREE)
    with pytest.raises(ValueError) as err:
        SPEC.forward(inputs, params, state, cfg)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_kv_input_names_orders_the_layers() -> None:
    assert cl_spec.kv_input_names(["x_kv.2", "x_q", "x_kv.0", "x_kv.1"]) == [
        "x_kv.0", "x_kv.1", "x_kv.2"]
    assert cl_spec.kv_input_names({"x_kv": 0, "x_q": 0}) == ["x_kv"]


FLAG_MISMATCHES = [
    # (preset, overrides, edit, words in the message)
    ("cnl", {}, lambda p, s: p.update({"theta.bias": np.zeros(3)}),
     ["unexpected", "'theta.bias'", "bias=False"]),
    ("seed_fixed", {}, lambda p, s: p.pop("kv0.g.bias"),
     ["missing", "'kv0.g.bias'", "bias=True"]),
    ("seed_fixed", {}, lambda p, s: p.update({"W.weight": np.zeros((4, 4, 1, 1))}),
     ["unexpected", "'W.weight'", "out_proj=False"]),
    ("cnl", {}, lambda p, s: s.pop("kv2.bn.running_var"),
     ["state", "missing", "'kv2.bn.running_var'", "bn='train'"]),
    ("cnl", {"bn": None}, lambda p, s: p.update({"kv0.bn.weight": np.ones(4)}),
     ["unexpected", "'kv0.bn.weight'", "bn=None"]),
    ("cnl", {}, lambda p, s: p.update({"kv3.phi.weight": np.zeros((3, 2, 1, 1))}),
     ["unexpected", "'kv3.phi.weight'", "3 key/value layer(s)"]),
    ("cnl", {}, lambda p, s: p.update({"kv0.bn.running_mean":
                                       s["kv0.bn.running_mean"]}),
     ["state", "both params and state"]),
]


@pytest.mark.parametrize("preset, overrides, edit, words", FLAG_MISMATCHES)
def test_presence_flags_must_agree_with_keys(preset, overrides, edit, words) -> None:
    shapes = THREE if preset == "cnl" else ONE
    cfg = cfg_of(preset, **({"planes": 3} if preset == "cnl" else {}), **overrides)
    inputs, params, state = draw(cfg, shapes)
    params, state = dict(params), dict(state)
    edit(params, state)
    with pytest.raises(ValueError) as err:
        SPEC.forward(inputs, params, state, cfg)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_buffers_may_come_with_the_params() -> None:
    cfg = cfg_of("cnl", "eval", planes=3)
    inputs, params, state = draw(cfg, THREE)
    a, _ = SPEC.forward(inputs, params, state, cfg)
    b, _ = SPEC.forward(inputs, params | state, {}, cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_arrays() -> None:
    cfg = cfg_of("cnl", planes=3)
    inputs, params, state = draw(cfg, THREE)
    bad = dict(params, **{"kv1.g.weight": params["kv1.g.weight"][:, :4]})
    with pytest.raises(ValueError,
                       match=r"kv1.g.weight: expected shape \(3, 5, 1, 1\)"):
        SPEC.forward(inputs, bad, state, cfg)
    nan = inputs["x_kv.2"].copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x_kv.2: expected finite values"):
        SPEC.forward(dict(inputs, **{"x_kv.2": nan}), params, state, cfg)
    mixed = dict(inputs, **{"x_kv.1": inputs["x_kv.1"].astype(np.float32)})
    with pytest.raises(TypeError, match="x_kv.1=float32"):
        SPEC.forward(mixed, params, state, cfg)
    with pytest.raises(TypeError, match="x_q: expected dtype float32 or float64"):
        SPEC.forward(dict(inputs, x_q=inputs["x_q"].astype(np.int64)), params, state,
                     cfg)
    with pytest.raises(TypeError, match="CrossLayerConfig"):
        SPEC.forward(inputs, params, state, nl.PRESETS["alexhex7"])
    _, cache = SPEC.forward(inputs, params, state, cfg)
    with pytest.raises(ValueError, match=r"douts\['out'\]: expected shape"):
        SPEC.backward({"out": inputs["x_q"][:, :3]}, cache)
    with pytest.raises(ValueError, match="cross_layer differentiates only 'out'"):
        SPEC.backward({"out": inputs["x_q"], "aux.attention.0": np.zeros(1)}, cache)


def test_train_bn_needs_more_than_one_value() -> None:
    cfg = cfg_of("cnl", planes=3)
    shapes = {"x_q": (1, 4, 1, 1), "x_kv": (1, 3, 2, 2)}
    inputs, params, state = draw_case(SPEC, cfg, shapes)
    with pytest.raises(ValueError, match=r"x_q: bn='train' .* N·Hq·Wq >= 2"):
        SPEC.forward(inputs, params, state, cfg)
    out, _ = SPEC.forward(inputs, params, state, SPEC.with_bn_mode(cfg, "eval"))
    assert out["out"].shape == (1, 4, 1, 1)


def test_with_bn_mode() -> None:
    cnl = cl.PRESETS["cnl"]
    assert SPEC.with_bn_mode(cnl, "eval").bn == "eval"
    assert SPEC.with_bn_mode(cnl, "train") == cnl
    assert SPEC.with_bn_mode(cl.PRESETS["seed_fixed"], "train") is None
    with pytest.raises(ValueError, match="mode"):
        SPEC.with_bn_mode(cnl, "inference")


def test_anchor_names() -> None:
    shapes = {"x_q": (2, 6, 3, 3), "x_kv.0": (2, 5, 4, 4), "x_kv.1": (2, 3, 5, 5)}
    cnl = cl.PRESETS["cnl"]
    names = SPEC.anchor_names("cnl", cnl, shapes)
    assert names == {
        "theta.weight": "CNL_5.t.weight", "W.weight": "CNL_5.z.weight",
        **{f"kv{m}.{a}.weight": f"CNL_5.{b}{m}.weight" for m in (0, 1)
           for a, b in (("phi", "p"), ("g", "g"))},
        **{f"kv{m}.bn.{leaf}": f"CNL_5.bn{m}.{leaf}" for m in (0, 1)
           for leaf in ("weight", "bias", "running_mean", "running_var")},
    }
    alone = SPEC.anchor_names("cnl_official_noperm", dataclasses.replace(
        cl.PRESETS["cnl_official_noperm"], residual=False), shapes)
    assert alone["theta.weight"] == "t.weight" and alone["kv1.bn.bias"] == "bn1.bias"
    seed = SPEC.anchor_names("seed_fixed", cl.PRESETS["seed_fixed"],
                             {"x_q": (2, 6, 3, 3), "x_kv": (2, 5, 4, 4)})
    assert seed == {
        "theta.weight": "query_conv.weight", "theta.bias": "query_conv.bias",
        "kv0.phi.weight": "key_conv.weight", "kv0.phi.bias": "key_conv.bias",
        "kv0.g.weight": "value_conv.weight", "kv0.g.bias": "value_conv.bias",
    }
    # what no anchor expresses: biases in CNL_5, several layers in the snippet
    assert SPEC.anchor_names("cnl", dataclasses.replace(cnl, bias=True), shapes) == {}
    assert SPEC.anchor_names("seed_fixed", cl.PRESETS["seed_fixed"], shapes) == {}
    assert SPEC.anchor_names(None, cnl, shapes) == {}


def test_accumulation_families() -> None:
    for cfg in cl.PRESETS.values():
        for shapes in (SPEC.fixture_shapes(cfg), THREE if cfg.out_proj else ONE):
            acc = SPEC.accumulation(cfg, shapes)
            assert set(acc) == {"out", "aux", "state", "grad.input", "grad.param"}
            assert all(isinstance(v, int) and v >= 1 for v in acc.values())
            assert acc["grad.param"] >= acc["grad.input"] >= acc["out"] >= acc["aux"]


def test_fixture_shapes_fit_their_presets() -> None:
    for name, cfg in cl.PRESETS.items():
        shapes = SPEC.fixture_shapes(cfg)
        cl_spec.param_shapes(cfg, shapes)  # validates
        kv = cl_spec.kv_input_names(shapes)
        assert len(kv) == (2 if cfg.out_proj else 1), name
        # keys/values with their own channels and spatial sizes
        assert len({shapes[k][1:] for k in ["x_q", *kv]}) == len(kv) + 1


# ---------------------------------------------------------------------------
# gradient checks


def preset_configs():
    for name, cfg in cl.PRESETS.items():
        modes = ["train", "eval"] if cfg.bn is not None else [None]
        for mode in modes:
            yield pytest.param(name, mode, id=f"{name}-{mode}" if mode else name)


@pytest.mark.parametrize("preset, mode", list(preset_configs()))
def test_gradcheck_presets_full_tiny(preset: str, mode) -> None:
    """Every element at tiny shapes; P = 256 of the cnl presets is cut to 3
    here (the preset's P is checked in fast mode at the fixture shapes)."""
    small = {"planes": 3} if cl.PRESETS[preset].planes else {}
    cfg = cfg_of(preset, mode, **small)
    shapes = THREE if cfg.out_proj else ONE
    inputs, params, state = draw(cfg, shapes)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    assert {t.name for t in report.tensors} == {f"input.{k}" for k in inputs} | {
        f"param.{k}" for k in params}


@pytest.mark.parametrize("preset, mode", list(preset_configs()))
def test_gradcheck_presets_fast_fixture_shapes(preset: str, mode) -> None:
    cfg = cfg_of(preset, mode)
    inputs, params, state = draw(cfg)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert report.ok, report.to_text()


OPTIONS = [  # (overrides of the cnl preset with planes 3, input shapes)
    (dict(), ONE),
    (dict(bn="eval"), THREE),
    (dict(layout="official_noperm"), THREE),
    (dict(layout="official_noperm", bn="eval"), ONE),
    (dict(use_scale=False), THREE),
    (dict(bias=True), THREE),
    (dict(bias=True, bn="eval", layout="official_noperm"), THREE),
    (dict(bn=None), THREE),
    (dict(bn=None, bias=True, use_scale=False), ONE),
    (dict(out_proj=False, bn=None, planes=4), THREE),
    (dict(out_proj=False, bn=None, planes=4, layout="official_noperm", bias=True),
     THREE),
    (dict(residual=False), THREE),
    (dict(residual=False, bn="eval", layout="official_noperm"), THREE),
    (dict(out_proj=False, bn=None, planes=4, residual=True), ONE),
    (dict(bn_momentum=0.5, bn_eps=1e-2), {"x_q": (3, 4, 2, 2), "x_kv.0": (3, 2, 3, 4)}),
    (dict(planes=5), {"x_q": (2, 3, 1, 1), "x_kv.0": (2, 2, 1, 1),  # Lq = Lk = 1
                      "x_kv.1": (2, 4, 3, 1)}),
]


@pytest.mark.parametrize(
    "overrides, shapes", OPTIONS,
    ids=[f"{len(s) - 1}kv-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "cnl")
         for o, s in OPTIONS])
def test_gradcheck_options_full(overrides: dict, shapes: dict) -> None:
    cfg = cfg_of("cnl", **({"planes": 3} | overrides))
    inputs, params, state = draw(cfg, shapes, seed=10)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="full")
    assert report.ok, report.to_text()
    assert not any(t.skipped_probes for t in report.tensors), report.to_text()


def test_gradcheck_catches_an_unsummed_shared_weight(monkeypatch) -> None:
    """A backward that keeps only the first layer's share of W must fail."""
    cfg = cfg_of("cnl", "eval", planes=3)
    inputs, params, state = draw(cfg, THREE)
    monkeypatch.setattr(cl, "add_params", lambda a, b: a)
    report = gradcheck_block(SPEC, cfg, inputs, params, state, mode="fast")
    assert not report.ok
    assert report.failed == ["param.W.weight"], report.to_text()


def test_gradcheck_catches_a_wrong_layout_adjoint(monkeypatch) -> None:
    """official_noperm's backward must undo the reshape, not transpose."""
    cfg = cfg_of("cnl_official_noperm", "eval", planes=3)
    inputs, params, state = draw(cfg, ONE)
    _, cache = SPEC.forward(inputs, params, state, cfg)
    wrong = cache._replace(cfg=dataclasses.replace(cache.cfg, layout="transpose"))
    dout = cotangent(ONE)
    right, _ = SPEC.backward({"out": dout}, cache)
    bad, _ = SPEC.backward({"out": dout}, wrong)
    assert rel_err(bad["x_kv"], right["x_kv"]) > 1e-2


# ---------------------------------------------------------------------------
# backends, dtypes


@pytest.mark.parametrize("preset, mode", list(preset_configs()))
def test_backend_and_float32(xb, preset: str, mode) -> None:
    cfg = cfg_of(preset, mode)
    inputs, params, state = draw(cfg)
    dout = cotangent(inputs)
    ref = refattn_tensors(cfg, inputs, params, state, dout)
    for dtype, tol in (("float64", 1e-13), ("float32", 5e-5)):
        ins, ps, st_ = (to_namespace(d, xb.xp, xb.device, dtype)
                        for d in (inputs, params, state))
        d = to_namespace({"d": dout}, xb.xp, xb.device, dtype)["d"]
        got = refattn_tensors(cfg, ins, ps, st_, d)
        assert set(got) == set(ref)
        fam = max(float(np.max(np.abs(v))) for k, v in ref.items()
                  if k.startswith("grad."))
        for k, v in got.items():
            assert backend.device(v) == xb.device, k
            assert backend.dtype_name(v) == dtype, k
            # the phi bias gradient is analytically zero: compare on the family scale
            floor = fam if k.endswith("phi.bias") else 0.0
            assert rel_err(xb.to_host(v), ref[k], floor) < tol, k


def test_gradcheck_strict_backend(xb) -> None:
    cfg = cfg_of("cnl", planes=3, bias=True)
    inputs, params, state = draw(cfg, THREE)
    ins, ps, st_ = (to_namespace(d, xb.xp, xb.device) for d in (inputs, params, state))
    report = gradcheck_block(SPEC, cfg, ins, ps, st_, mode="fast")
    assert report.ok, report.to_text()


# ---------------------------------------------------------------------------
# properties


@st.composite
def block_cases(draw_):
    M = draw_(st.integers(1, 3))
    N = draw_(st.integers(1, 3))
    cq = draw_(st.integers(1, 5))
    hq, wq = draw_(st.integers(1, 4)), draw_(st.integers(1, 4))
    shapes: dict[str, tuple[int, ...]] = {"x_q": (N, cq, hq, wq)}
    single = M == 1 and draw_(st.booleans())
    names = ["x_kv"] if single else [f"x_kv.{m}" for m in range(M)]
    for name in names:
        shapes[name] = (N, draw_(st.integers(1, 5)), draw_(st.integers(1, 4)),
                        draw_(st.integers(1, 4)))
    out_proj = draw_(st.booleans())
    bn = draw_(st.sampled_from([None, "train", "eval"])) if out_proj else None
    if bn == "train" and N * hq * wq < 2:
        bn = "eval"
    cfg = cl.CrossLayerConfig(
        planes=draw_(st.integers(1, 4)) if out_proj and draw_(st.booleans()) else None,
        use_scale=draw_(st.booleans()), bias=draw_(st.booleans()), bn=bn,
        bn_momentum=draw_(st.floats(0.0, 1.0)),
        layout=draw_(st.sampled_from(cl.LAYOUTS)), out_proj=out_proj,
        residual=draw_(st.booleans()),
    )
    return cfg, shapes, draw_(st.integers(0, 2**16))


@given(block_cases())
def test_backward_is_linear_keys_match_nothing_mutated(case) -> None:
    cfg, shapes, seed = case
    inputs, params, state = draw_case(SPEC, cfg, shapes, seed=seed)
    rng = np.random.default_rng(seed)
    out_shape = shapes["x_q"]
    d1, d2 = rng.standard_normal(out_shape), rng.standard_normal(out_shape)
    saved = copy.deepcopy((inputs, params, state, d1, d2))
    outputs, cache = SPEC.forward(inputs, params, state, cfg)
    assert outputs["out"].shape == out_shape
    g1 = SPEC.backward({"out": d1}, cache)
    g2 = SPEC.backward({"out": d2}, cache)
    g12 = SPEC.backward({"out": 2.0 * d1 - 3.0 * d2}, cache)
    for a, b, ab in zip(g1, g2, g12):
        assert set(a) == set(b) == set(ab)
        for k in a:
            want = 2.0 * a[k] - 3.0 * b[k]
            assert np.allclose(ab[k], want, rtol=1e-10, atol=1e-10), k
    dinputs, dparams = g1
    assert set(dinputs) == set(inputs)
    assert {k: v.shape for k, v in dinputs.items()} == dict(shapes)
    assert {k: v.shape for k, v in dparams.items()} == {
        k: v.shape for k, v in params.items()}
    for now, before in zip((inputs, params, state, d1, d2), saved):
        if isinstance(now, dict):
            assert all(np.array_equal(now[k], before[k]) for k in now)
        else:
            assert np.array_equal(now, before)
    kv = cl_spec.kv_input_names(shapes)
    lq = out_shape[2] * out_shape[3]
    for m, name in enumerate(kv):
        a = outputs[f"aux.attention.{m}"]
        assert a.shape == (out_shape[0], lq, shapes[name][2] * shapes[name][3])
        assert np.allclose(a.sum(axis=-1), 1.0) and np.all(a >= 0)
    if cfg.bn == "train":
        assert {k for k in outputs if k.startswith("state.")} == {
            f"state.{k}" for k in state}
    else:
        assert not any(k.startswith("state.") for k in outputs)


# ---------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shapes", [ONE, THREE], ids=["1kv", "3kv"])
@pytest.mark.parametrize("preset", ["cnl", "cnl_official_noperm"])
def test_zero_bn_affine_is_the_identity(preset: str, mode: str, shapes) -> None:
    """BN gamma = beta = 0 (the official init) with the residual: out = x_q
    exactly, and only the BN affine parameters receive a gradient."""
    cfg = cfg_of(preset, mode, planes=3, bias=True)
    inputs, params, state = draw(cfg, shapes)
    zero = {k: (np.zeros_like(v) if ".bn." in k else v) for k, v in params.items()}
    dout = cotangent(shapes)
    outputs, dinputs, dparams = run_block(SPEC, cfg, inputs, zero, state, dout)
    assert np.array_equal(outputs["out"], inputs["x_q"])
    assert np.array_equal(dinputs["x_q"], dout)
    for k, v in dinputs.items():
        if k != "x_q":
            assert not np.any(v), k
    for k, v in dparams.items():
        assert np.any(v) == (".bn." in k), k


@pytest.mark.parametrize("preset", ["cnl", "cnl_official_noperm"])
def test_anchor_init_is_the_identity(preset: str) -> None:
    cfg = cl.PRESETS[preset]
    shapes = SPEC.fixture_shapes(cfg)
    params, state = cl_spec.init_params(cfg, shapes, seed=2, anchor_init=True)
    assert all(np.all(v == 0) for k, v in params.items() if ".bn." in k)
    w = params["theta.weight"]
    assert 0.005 < float(np.std(w)) < 0.02  # N(0, 0.01²)
    inputs = {k: np.random.default_rng(0).standard_normal(s) for k, s in shapes.items()}
    outputs, _ = SPEC.forward(inputs, params, state, cfg)
    assert np.array_equal(outputs["out"], inputs["x_q"])
    params, _ = cl_spec.init_params(cl.PRESETS["seed_fixed"], ONE, seed=2, anchor_init=True)
    bound = 1 / np.sqrt(4)
    assert np.all(np.abs(params["theta.weight"]) <= bound)
    assert np.any(params["theta.bias"])


NL_NAMES = {"theta": "theta", "kv0.phi": "phi", "kv0.g": "g", "W": "W",
            "kv0.bn": "W_bn"}


def to_non_local(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        module, leaf = k.rsplit(".", 1)
        out[f"{NL_NAMES[module]}.{leaf}"] = v
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bn", ["train", "eval", None])
def test_self_attention_is_the_scaled_embedded_gaussian_non_local(bn, bias) -> None:
    """x_kv = x_q with one layer: cnl is the non-local block (embedded
    Gaussian, scale 1/sqrt(P), no sub-sampling, BN after W, residual) with
    inter_channels = P; dx = dx_q + dx_kv."""
    cfg = cfg_of("cnl", planes=5, bias=bias, bn=bn)
    ncfg = nl.NonLocalConfig(mode="embedded_gaussian", inter_channels=5,
                             sub_sample=False, use_scale=True, bias=bias, bn=bn,
                             residual=True)
    x = np.random.default_rng(0).standard_normal((3, 8, 4, 5))
    _, params, state = draw(cfg, {"x_q": x.shape, "x_kv": x.shape}, seed=2)
    dout = cotangent({"x_q": x.shape})
    o1, d1, p1 = run_block(SPEC, cfg, {"x_q": x, "x_kv": x}, params, state, dout)
    o2, d2, p2 = run_block(nl_spec.SPECS["non_local"], ncfg, {"x": x}, to_non_local(params),
                           to_non_local(state), dout)
    assert rel_err(o1["out"], o2["out"]) < 1e-13
    assert rel_err(o1["aux.attention.0"], o2["aux.attention"]) < 1e-13
    assert rel_err(d1["x_q"] + d1["x_kv"], d2["x"]) < 1e-13
    fam = max(float(np.max(np.abs(v))) for v in p2.values())
    assert set(to_non_local(p1)) == set(p2)
    for k, v in to_non_local(p1).items():
        # analytically zero: the phi bias (softmax), the W bias (train-mode BN)
        zero = float(np.max(np.abs(p2[k]))) < 1e-9 * fam
        assert rel_err(v, p2[k], floor=fam if zero else 0.0) < 1e-12, k
    for k in (k for k in o2 if k.startswith("state.")):
        assert rel_err(o1["state.kv0.bn." + k.rsplit(".", 1)[1]], o2[k]) < 1e-14


def test_single_layer_name_forms_agree() -> None:
    cfg = cfg_of("cnl", "train", planes=3)
    inputs, params, state = draw(cfg, ONE)
    dout = cotangent(ONE)
    a = refattn_tensors(cfg, inputs, params, state, dout)
    numbered = {"x_q": inputs["x_q"], "x_kv.0": inputs["x_kv"]}
    b = refattn_tensors(cfg, numbered, params, state, dout)
    b["grad.input.x_kv"] = b.pop("grad.input.x_kv.0")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["train", "eval", None])
def test_several_layers_are_the_sum_of_single_layer_blocks(mode) -> None:
    """Without the residual the block is Σ_m of one-layer blocks that share θ
    and W: outputs add, and so do the θ and W gradients; each layer's own
    parameters, inputs, attention and running statistics are its block's."""
    cfg = cfg_of("cnl", planes=3, bias=True, residual=False, bn=mode)
    inputs, params, state = draw(cfg, THREE)
    dout = cotangent(THREE)
    full = refattn_tensors(cfg, inputs, params, state, dout)
    total, shared = 0.0, {}
    for m in range(3):
        own = {k: v for k, v in params.items() if not k.startswith("kv")}
        own |= {k.replace(f"kv{m}.", "kv0."): v for k, v in params.items()
                if k.startswith(f"kv{m}.")}
        st_ = {k.replace(f"kv{m}.", "kv0."): v for k, v in state.items()
               if k.startswith(f"kv{m}.")}
        one = refattn_tensors(cfg, {"x_q": inputs["x_q"], "x_kv": inputs[f"x_kv.{m}"]},
                              own, st_, dout)
        total = total + one["out"]
        for k, v in one.items():
            if k.startswith("grad.param.kv0.") or k.startswith(("state.", "aux.")):
                mk = k.replace("kv0.", f"kv{m}.").replace("attention.0",
                                                          f"attention.{m}")
                assert rel_err(v, full[mk]) < 1e-13, mk
            elif k in ("grad.input.x_q", "grad.param.theta.weight",
                       "grad.param.theta.bias", "grad.param.W.weight",
                       "grad.param.W.bias"):
                shared[k] = shared.get(k, 0.0) + v
        assert rel_err(one["grad.input.x_kv"], full[f"grad.input.x_kv.{m}"]) < 1e-13
    assert rel_err(total, full["out"]) < 1e-13
    for k, v in shared.items():
        assert rel_err(v, full[k]) < 1e-12, k


def test_layer_order_does_not_matter() -> None:
    cfg = cfg_of("cnl", "train", planes=3)
    inputs, params, state = draw(cfg, THREE)
    dout = cotangent(THREE)
    ref = refattn_tensors(cfg, inputs, params, state, dout)
    perm = [2, 0, 1]  # new layer i is old layer perm[i]

    def move(d: dict) -> dict:
        out = {k: v for k, v in d.items() if not k.startswith("kv")}
        for new, old in enumerate(perm):
            out |= {k.replace(f"kv{old}.", f"kv{new}."): v for k, v in d.items()
                    if k.startswith(f"kv{old}.")}
        return out

    moved = {"x_q": inputs["x_q"]} | {f"x_kv.{new}": inputs[f"x_kv.{old}"]
                                      for new, old in enumerate(perm)}
    got = refattn_tensors(cfg, moved, move(params), move(state), dout)
    assert rel_err(got["out"], ref["out"]) < 1e-13
    assert rel_err(got["grad.input.x_q"], ref["grad.input.x_q"]) < 1e-13
    for new, old in enumerate(perm):
        assert np.array_equal(got[f"aux.attention.{new}"], ref[f"aux.attention.{old}"])
        assert rel_err(got[f"grad.input.x_kv.{new}"],
                       ref[f"grad.input.x_kv.{old}"]) < 1e-13
        assert rel_err(got[f"grad.param.kv{new}.g.weight"],
                       ref[f"grad.param.kv{old}.g.weight"]) < 1e-13


def test_the_two_layouts_are_different_functions() -> None:
    """blocks.md 7.2: not a rounding-level difference; the attention agrees."""
    cfg = cfg_of("cnl", "train", planes=3)
    inputs, params, state = draw(cfg, THREE)
    dout = cotangent(THREE)
    a = refattn_tensors(cfg, inputs, params, state, dout)
    b = refattn_tensors(dataclasses.replace(cfg, layout="official_noperm"), inputs,
                        params, state, dout)
    for k in a:
        if k.startswith("aux.") or k.endswith("bn.bias"):  # dβ = Σ dout either way
            assert rel_err(b[k], a[k]) < 1e-13, k
        else:
            assert rel_err(b[k], a[k]) > 1e-3, k


def test_layouts_coincide_for_a_single_query_position() -> None:
    """With Hq = Wq = 1, reinterpreting (1, P) as (P, 1) IS the transpose."""
    cfg = cfg_of("cnl", "eval", planes=3)
    shapes = {"x_q": (2, 4, 1, 1), "x_kv.0": (2, 3, 3, 3), "x_kv.1": (2, 2, 2, 5)}
    inputs, params, state = draw(cfg, shapes)
    dout = cotangent(shapes)
    a = refattn_tensors(cfg, inputs, params, state, dout)
    b = refattn_tensors(dataclasses.replace(cfg, layout="official_noperm"), inputs,
                        params, state, dout)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# PyTorch parity with the anchors


@pytest.fixture
def anchors(torch):
    torch.set_default_dtype(torch.float64)
    return importlib.import_module("anchors.cross_layer")


def torch_tensors(torch, module, names, inputs, params, state, dout):
    """Load refattn's tensors through `names`, run forward + backward."""
    own = module.state_dict()
    values = params | state
    sd = {a: torch.tensor(values[c]).reshape(own[a].shape) for c, a in names.items()}
    result = module.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result
    order = ["x_q", *cl_spec.kv_input_names(inputs)]
    xs = [torch.tensor(inputs[k], requires_grad=True) for k in order]
    out = module(*xs)
    out.backward(torch.tensor(dout))
    res = {"out": out.detach().numpy()}
    res |= {f"grad.input.{k}": x.grad.numpy() for k, x in zip(order, xs)}
    named = dict(module.named_parameters())
    after = module.state_dict()
    for c, a in names.items():
        if is_buffer(c):
            res[f"state.{c}"] = after[a].numpy()
        else:
            res[f"grad.param.{c}"] = named[a].grad.numpy().reshape(values[c].shape)
    res |= {f"aux.attention.{m}": a.numpy() for m, a in module.last_attention.items()}
    return res


def compare(got: dict, ref: dict) -> dict[str, float]:
    """Relative error per tensor; an analytically-zero gradient (the phi bias
    under the softmax, a bias feeding train-mode BN: pure round-off on both
    sides) is measured on the scale of the largest gradient instead
    (blocks.md section 10)."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    fam = max(float(np.max(np.abs(v))) for k, v in ref.items() if k.startswith("grad."))
    errors = {}
    for k, v in ref.items():
        zero = k.startswith("grad.") and float(np.max(np.abs(v))) < 1e-9 * fam
        errors[k] = rel_err(got[k], v, floor=fam if zero else 0.0)
    return errors


def shapes_for(n_kv: int, cq: int = 8, form: str = "numbered") -> dict:
    kv = [(6, 5, 4), (10, 4, 6), (5, 6, 6), (7, 3, 5), (4, 5, 5)][:n_kv]
    if form == "single":
        return {"x_q": (3, cq, 3, 4), "x_kv": (3, *kv[0])}
    return {"x_q": (3, cq, 3, 4)} | {f"x_kv.{m}": (3, *s) for m, s in enumerate(kv)}


ANCHOR_CASES = [  # (preset, bn mode, overrides, input shapes, factory)
    ("cnl", "train", {}, shapes_for(1, form="single"), "make_cnl"),
    ("cnl", "eval", {}, shapes_for(1, form="single"), "make_cnl"),
    ("cnl", "train", {}, shapes_for(3), "make_cnl"),
    ("cnl", "eval", {}, shapes_for(5), "make_cnl"),
    ("cnl_official_noperm", "train", {}, shapes_for(5), "make_cnl"),
    ("cnl_official_noperm", "eval", {}, shapes_for(3), "make_cnl"),
    ("cnl_official_noperm", "train", {"residual": False}, shapes_for(5), "make_cnl"),
    ("cnl", "eval", {"residual": False, "use_scale": False}, shapes_for(2), "make_cnl"),
    ("cnl", "train", {"planes": 4, "bn_momentum": 0.3, "bn_eps": 1e-3}, shapes_for(2),
     "make_cnl"),
    ("seed_fixed", None, {}, shapes_for(1, form="single"), "make_seed_fixed"),
    ("seed_fixed", None, {"bias": False}, shapes_for(1), "make_seed_fixed"),
    # every option through the canonical-name reference
    ("cnl", "train", {"bias": True}, shapes_for(3), "make_reference"),
    ("cnl", "eval", {"bias": True, "layout": "official_noperm", "use_scale": False},
     shapes_for(2), "make_reference"),
    ("cnl", None, {"bn": None, "planes": 5}, shapes_for(3), "make_reference"),
    ("cnl", None, {"bn": None, "out_proj": False, "planes": 8, "residual": True},
     shapes_for(3), "make_reference"),
    ("seed_fixed", None, {"layout": "official_noperm", "use_scale": True},
     shapes_for(2), "make_reference"),
]


def anchor_case(preset, mode, overrides, shapes):
    cfg = cl_spec.resolve(cfg_of(preset, mode, **overrides), shapes)
    inputs, params, state = draw(cfg, shapes, seed=4)
    dout = cotangent(shapes)
    ref = refattn_tensors(cfg, inputs, params, state, dout)
    return cfg, inputs, params, state, dout, ref


def _ids(cases):
    return [f"{p}-{m}-{f}-{len(s) - 1}kv"
            + ("-" + "-".join(f"{k}={v}" for k, v in o.items()) if o else "")
            for p, m, o, s, f in cases]


@pytest.mark.parametrize("preset, mode, overrides, shapes, factory", ANCHOR_CASES,
                         ids=_ids(ANCHOR_CASES))
def test_parity_with_anchor(torch, anchors, preset, mode, overrides, shapes, factory):
    cfg, inputs, params, state, dout, ref = anchor_case(preset, mode, overrides, shapes)
    module = getattr(anchors, factory)(config_to_dict(cfg) | {"input_shapes": shapes})
    assert module.training == (mode != "eval")
    if factory == "make_reference":
        names = {k: k for k in list(params) + list(state)}
    else:
        names = SPEC.anchor_names(preset, cfg, shapes)
    assert set(names) == set(params) | set(state)
    got = torch_tensors(torch, module, names, inputs, params, state, dout)
    errors = compare(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] < PARITY_RTOL, (worst, errors)


def test_anchor_factories_refuse_what_they_cannot_express(anchors) -> None:
    d = config_to_dict(cl.PRESETS["cnl"]) | {"input_shapes": shapes_for(2)}
    with pytest.raises(ValueError, match="bias"):
        anchors.make_cnl(d | {"bias": True})
    with pytest.raises(ValueError, match="bn"):
        anchors.make_cnl(d | {"bn": None})
    with pytest.raises(ValueError, match="input_shapes"):
        anchors.make_cnl(config_to_dict(cl.PRESETS["cnl"]))
    with pytest.raises(ValueError, match="layout"):
        anchors.make_cnl_missing_transpose(d | {"layout": "official_noperm"})
    s = config_to_dict(cl_spec.resolve(cl.PRESETS["seed_fixed"], shapes_for(1)))
    with pytest.raises(ValueError, match="one key/value layer"):
        anchors.make_seed_fixed(s | {"input_shapes": shapes_for(2)})
    with pytest.raises(ValueError, match="use_scale"):
        anchors.make_seed_fixed(s | {"input_shapes": shapes_for(1), "use_scale": True})
    with pytest.raises(ValueError, match="planes == Cq"):
        anchors.make_seed_fixed(s | {"input_shapes": shapes_for(1), "planes": 3})


def test_official_module_alone_and_in_the_network(torch, anchors) -> None:
    """CNLNet adds the query outside CNL_5: the residual wrapper's output is
    x_q + the module's, with identical parameters under the CNL_5 prefix."""
    shapes = shapes_for(5)
    cfg = cl_spec.resolve(cl.PRESETS["cnl_official_noperm"], shapes)
    net = anchors.make_cnl(config_to_dict(cfg) | {"input_shapes": shapes})
    alone = anchors.make_cnl(config_to_dict(dataclasses.replace(cfg, residual=False))
                             | {"input_shapes": shapes})
    assert set(net.state_dict()) == {f"CNL_5.{k}" for k in alone.state_dict()}
    alone.load_state_dict({k[len("CNL_5."):]: v for k, v in net.state_dict().items()})
    x = [torch.randn(s) for s in shapes.values()]
    assert torch.equal(net(*x), x[0] + alone(*x))


# ---------------------------------------------------------------------------
# the seed notes' snippet, bug by bug, against seed_fixed


SEED_CFG = cl.PRESETS["seed_fixed"]


def seed_run(torch, anchors, shapes, fixes, seed=4):
    """(snippet module's output or the exception it raised, refattn seed_fixed)."""
    cfg = cl_spec.resolve(SEED_CFG, shapes)
    inputs, params, state = draw(cfg, shapes, seed=seed)
    ref = refattn_tensors(cfg, inputs, params, state, cotangent(shapes))
    module = anchors.make_seed_snippet(config_to_dict(cfg) | {"input_shapes": shapes},
                                       fixes)
    names = SPEC.anchor_names("seed_fixed", cfg, shapes)
    own = module.state_dict()
    module.load_state_dict({a: torch.tensor(params[c]).reshape(own[a].shape)
                            for c, a in names.items()})
    xs = [torch.tensor(inputs["x_q"]), torch.tensor(inputs["x_kv"])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = module(*xs).detach().numpy()
    return out, module, ref, [str(w.message) for w in caught]


def all_but(bug: str) -> tuple[str, ...]:
    fixes = ("softmax_name", "softmax_dim", "permute", "product", "view")
    return tuple(f for f in fixes if f != bug)


GENERIC = {"x_q": (2, 6, 3, 4), "x_kv": (2, 5, 5, 4)}  # HW1 = 12 != C = 6


def test_seed_snippet_as_given_raises(torch, anchors) -> None:
    """Bug 2a: torch.nn has no `softmax` (nn.Softmax is a class, F.softmax the
    function): the snippet cannot run at all."""
    with pytest.raises(AttributeError, match="has no attribute 'softmax'"):
        seed_run(torch, anchors, GENERIC, ())


def test_seed_snippet_with_softmax_renamed(torch, anchors) -> None:
    """nn.softmax -> F.softmax (implicit dim) only: the identity permute makes
    bmm contract (N, C, HW1) with (N, C, HW2), which fails unless HW1 == C;
    with HW1 == C (and C2 == C, HW2 == HW1 so the rest fits) it runs and
    silently computes something else."""
    with pytest.raises(RuntimeError):
        seed_run(torch, anchors, GENERIC, ("softmax_name",))
    fits = {"x_q": (2, 4, 2, 2), "x_kv": (2, 4, 1, 4)}
    out, _, ref, warned = seed_run(torch, anchors, fits, ("softmax_name",))
    assert any("Implicit dimension choice for softmax" in w for w in warned), warned
    assert out.shape == ref["out"].shape
    assert rel_err(out, ref["out"]) > 0.1


def test_seed_bug_softmax_over_the_batch(torch, anchors) -> None:
    """Bug 2b alone: softmax without dim normalises a 3-D tensor over dim 0,
    the BATCH; each attention entry sums to 1 across the samples."""
    out, module, ref, warned = seed_run(torch, anchors, GENERIC, all_but("softmax_dim"))
    assert any("Implicit dimension choice" in w for w in warned), warned
    att = module.last_attention[0].numpy()
    assert np.allclose(att.sum(axis=0), 1.0)
    assert not np.allclose(att.sum(axis=-1), 1.0)
    assert rel_err(att, ref["aux.attention.0"]) > 0.1
    assert rel_err(out, ref["out"]) > 0.1


def test_seed_bug_identity_permute(torch, anchors) -> None:
    """Bug 1 alone: bmm(q (N, C, HW1), k (N, C, HW2)) fails for HW1 != C; for
    HW1 == C it contracts query positions with key channels, silently."""
    with pytest.raises(RuntimeError):
        seed_run(torch, anchors, GENERIC, all_but("permute"))
    fits = {"x_q": (2, 6, 2, 3), "x_kv": (2, 5, 5, 4)}  # HW1 = 6 = C
    out, module, ref, _ = seed_run(torch, anchors, fits, all_but("permute"))
    assert module.last_attention[0].shape == ref["aux.attention.0"].shape
    assert rel_err(module.last_attention[0].numpy(), ref["aux.attention.0"]) > 0.1
    assert rel_err(out, ref["out"]) > 0.1


def test_seed_bug_elementwise_product(torch, anchors) -> None:
    """Bug 3 alone: `att * value` is element-wise, with the raw value: it fails
    to broadcast unless HW1 == C2, and then the reshape needs HW2 == C1; with
    both it runs and differs (the attention itself is right)."""
    with pytest.raises(RuntimeError):
        seed_run(torch, anchors, GENERIC, all_but("product"))
    fits = {"x_q": (2, 6, 2, 2), "x_kv": (2, 4, 2, 3)}  # HW1 = 4 = C2, HW2 = 6 = C1
    out, module, ref, _ = seed_run(torch, anchors, fits, all_but("product"))
    assert rel_err(module.last_attention[0].numpy(), ref["aux.attention.0"]) < 1e-13
    assert rel_err(out, ref["out"]) > 0.1


def test_seed_bug_view_without_transpose(torch, anchors) -> None:
    """Bug 4 alone: the final view reinterprets (N, HW1, C) as (N, C, H1, W1)
    -- the official code's mistake: it runs for any shapes, differs from
    seed_fixed, and equals seed_fixed with layout='official_noperm'."""
    out, module, ref, _ = seed_run(torch, anchors, GENERIC, all_but("view"))
    assert rel_err(module.last_attention[0].numpy(), ref["aux.attention.0"]) < 1e-13
    assert rel_err(out, ref["out"]) > 0.1
    cfg = cl_spec.resolve(dataclasses.replace(SEED_CFG, layout="official_noperm"), GENERIC)
    inputs, params, state = draw(cfg, GENERIC, seed=4)
    noperm = refattn_tensors(cfg, inputs, params, state, cotangent(GENERIC))
    assert rel_err(out, noperm["out"]) < 1e-13


def test_seed_snippet_with_every_fix_is_seed_fixed(torch, anchors) -> None:
    out, module, ref, warned = seed_run(torch, anchors, GENERIC, all_but(""))
    assert not warned
    assert rel_err(out, ref["out"]) < 1e-13
    assert rel_err(module.last_attention[0].numpy(), ref["aux.attention.0"]) < 1e-13


# ---------------------------------------------------------------------------
# known-buggy variants (for the validation tests)


def _differ_agree(errors: dict[str, float]) -> tuple[set[str], set[str]]:
    differ = {k for k, e in errors.items() if e > 1e-6}
    agree = {k for k, e in errors.items() if e < PARITY_RTOL}
    assert differ | agree == set(errors), errors
    return differ, agree


def test_missing_transpose_disagrees_with_cnl(torch, anchors) -> None:
    shapes = shapes_for(3)
    cfg, inputs, params, state, dout, ref = anchor_case("cnl", "train", {}, shapes)
    module = anchors.make_cnl_missing_transpose(config_to_dict(cfg) | {
        "input_shapes": shapes})
    names = SPEC.anchor_names("cnl", cfg, shapes)
    errors = compare(torch_tensors(torch, module, names, inputs, params, state, dout),
                     ref)
    differ, agree = _differ_agree(errors)
    # the attention is computed before the layout; dβ_m = Σ dout whatever Z_m is
    assert agree == {f"aux.attention.{m}" for m in range(3)} | {
        f"grad.param.kv{m}.bn.bias" for m in range(3)}, errors


def test_seed_snippet_with_crashes_fixed_disagrees_with_seed_fixed(torch, anchors):
    shapes = shapes_for(1, cq=6, form="single")
    cfg, inputs, params, state, dout, ref = anchor_case("seed_fixed", None, {}, shapes)
    module = anchors.make_seed_snippet_crashes_fixed(config_to_dict(cfg) | {
        "input_shapes": shapes})
    names = SPEC.anchor_names("seed_fixed", cfg, shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the implicit softmax dim
        errors = compare(torch_tensors(torch, module, names, inputs, params, state,
                                       dout), ref)
    differ, agree = _differ_agree(errors)
    assert agree == set(), errors


def test_softmax_over_queries_disagrees_with_cnl(torch, anchors) -> None:
    shapes = shapes_for(2)
    cfg, inputs, params, state, dout, ref = anchor_case("cnl", "eval", {}, shapes)
    module = anchors.make_cnl_softmax_over_queries(config_to_dict(cfg) | {
        "input_shapes": shapes})
    names = SPEC.anchor_names("cnl", cfg, shapes)
    got = torch_tensors(torch, module, names, inputs, params, state, dout)
    assert np.allclose(got["aux.attention.0"].sum(axis=1), 1.0)  # columns
    differ, agree = _differ_agree(compare(got, ref))
    assert agree == {f"grad.param.kv{m}.bn.bias" for m in range(2)} | {
        f"state.kv{m}.bn.{s}" for m in range(2) for s in ("running_mean",
                                                           "running_var")}
