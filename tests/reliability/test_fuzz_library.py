"""Hostile inputs to the block contract (``BLOCKS[name]``), fuzzed.

Every call of ``spec.config``, ``spec.param_shapes`` (via ``resolved``),
``spec.forward`` and ``spec.backward`` with a drawn block, preset, config
override, input shape, dtype, value, memory layout or container either

* returns finite results, equal (to 1e-12 relative) to those of the same
  data in plain C-contiguous float64 arrays when only the layout differed, or
* raises ``ValueError`` / ``TypeError`` whose message names the argument
  that was broken (the config key, the input, the parameter, ``dout``);

no other exception type escapes (the example is printed and the test fails),
and no argument is modified.  Huge magnitudes must give a finite result or a
ValueError (never Inf/NaN); for the positively homogeneous blocks (no bias)
a power-of-two scaling must scale the result exactly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import FIGURES
from refattn.blocks.registry import BLOCKS, draw_case

NAMES = list(BLOCKS)

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, 1, 2, 3, -1, 7, 1.5, 0.5, float("nan"), float("inf"),
    -float("inf"), 1e300, 1e-300, 2**70, -(2**70), 1 + 1j, "", "bogus", "avg",
    "max", "train", "eval", "gaussian", "dot", "gn", (), (1,), (2, 2), (0, 0),
    (1, 2, 3), ("avg",), ("avg", "max"), ("foo",), [1, 2], {"a": 1}, b"x",
    np.int64(2), np.float64(0.1), np.bool_(True), object(),
]


def _field_values(name: str) -> dict[str, list[Any]]:
    """Per config key: the values the block's presets and defaults use."""
    spec = BLOCKS[name]
    out: dict[str, list[Any]] = {}
    configs = [spec.config(), *spec.presets.values()]
    for f in dataclasses.fields(spec.config_cls):
        vals = []
        for c in configs:
            v = getattr(c, f.name)
            if not any(v is w or (type(v) is type(w) and v == w) for w in vals):
                vals.append(v)
        out[f.name] = vals
    return out


FIELD_VALUES = {name: _field_values(name) for name in NAMES}


# ---------------------------------------------------------------------------
# strategies


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(NAMES))
    spec = BLOCKS[name]
    preset = draw(st.sampled_from([None, *spec.presets]))
    if draw(st.sampled_from([False] * 19 + [True])):  # 1 in 20: no such preset
        preset = draw(st.sampled_from(["nope", "", 3, ["jongchan"]]))
    fields = FIELD_VALUES[name]
    n_keys = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    keys = draw(st.lists(st.sampled_from(sorted(fields) + ["no_such_key"]),
                         min_size=n_keys, max_size=n_keys, unique=True))
    overrides = {}
    for k in keys:
        plausible = fields.get(k, [1])
        hostile = draw(st.sampled_from([False, False, True]))
        overrides[k] = draw(st.sampled_from(HOSTILE_VALUES if hostile else plausible))
    return {"block": name, "preset": preset, "overrides": overrides}


SHAPE_EDITS = ("keep", "keep", "keep", "dim", "rank", "nonint")
ARRAY_EDITS = (
    "none", "none", "float32", "layout", "layout", "dtype", "mixdtype", "nan",
    "inf", "scale", "scale", "type", "shape", "missing", "extra",
)
LAYOUTS = ("strided", "negstride", "fortran", "readonly", "bigendian", "transposed")
BAD_DTYPES = ("int64", "int32", "uint8", "bool", "complex128", "float16")
SCALES = (1e300, 1e200, 1e154, 1e-300, 1e-200, 2.0**1000, 2.0**-1000)


# ---------------------------------------------------------------------------
# helpers


def _copy_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _copy_tree(v) for k, v in d.items()}
    if isinstance(d, np.ndarray):
        return d.copy()
    return d


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        if not isinstance(b, np.ndarray) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    return a is b or a == b


def _layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values as `a` in another memory layout."""
    if a.ndim == 0:
        kind = "readonly"
    if kind == "strided":
        big = np.zeros(a.shape + (2,), dtype=a.dtype)
        big[..., 1] = a
        return big[..., 1]
    if kind == "negstride":
        return np.flip(np.flip(a).copy())
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "bigendian":
        return a.astype(a.dtype.newbyteorder(">"))
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    out = a.copy()
    out.flags.writeable = False
    return out


def _retyped(a: np.ndarray, kind: str) -> Any:
    if kind == "matrix":  # an ndarray subclass with its own indexing rules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return np.asmatrix(a.reshape(a.shape[0], -1) if a.ndim else a)
    return {"list": a.tolist(), "float": 1.5, "none": None, "str": "x",
            "zero_d": np.asarray(1.0, dtype=a.dtype)}[kind]


def _reshaped(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "lead":
        return a[None]
    if kind == "drop" and a.ndim >= 1:
        return a[0] if a.shape[0] else a.reshape(a.shape[1:])
    if a.ndim == 0:
        return a[None]
    return np.concatenate([a, a[..., :1]], axis=-1)


def _finite_tree(d: dict[str, Any]) -> bool:
    return all(bool(np.isfinite(np.asarray(v, dtype=np.float64)).all())
               for v in d.values() if v is not None)


def _close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal to 1e-12 of the family's scale (the largest value over the dict:
    a gradient that is analytically zero holds only round-off, which another
    memory layout may change)."""
    if a.keys() != b.keys():
        return False
    ys = {k: np.asarray(b[k], dtype=np.float64) for k in b}
    scale = max([float(np.max(np.abs(y))) for y in ys.values() if y.size] + [1e-300])
    for k in a:
        x = np.asarray(a[k], dtype=np.float64)
        if x.shape != ys[k].shape:
            return False
        if x.size and float(np.max(np.abs(x - ys[k]))) > 1e-12 * scale:
            return False
    return True


def _names_one_of(err: BaseException, names: list[str]) -> bool:
    text = str(err)
    return any(n in text for n in names)


class Escaped(AssertionError):
    """An exception other than ValueError/TypeError left the library."""


# ---------------------------------------------------------------------------
# the fuzz loop


def _one_example(data: st.DataObject, counter: str) -> None:
    req = data.draw(requests(), label="request")
    spec = BLOCKS[req["block"]]
    overrides = req["overrides"]
    config_names = ["preset", "config", *overrides]
    try:
        cfg = spec.config(req["preset"], **overrides)
    except (ValueError, TypeError) as err:
        assert _names_one_of(err, config_names), (req, str(err))
        FIGURES[counter] += 1
        FIGURES[f"{counter} refused (config)"] += 1
        return
    except Exception as err:  # pragma: no cover - the bug this test hunts
        raise Escaped(f"config{req}: {type(err).__name__}: {err}") from err

    # --- shapes
    try:
        shapes = dict(spec.fixture_shapes(cfg))
    except (ValueError, TypeError) as err:
        assert _names_one_of(err, config_names + ["shape"]), (req, str(err))
        FIGURES[counter] += 1
        FIGURES[f"{counter} refused (config)"] += 1
        return
    edit = data.draw(st.sampled_from(SHAPE_EDITS), label="shape edit")
    target_in = data.draw(st.sampled_from(sorted(shapes)), label="shape input")
    dims = list(shapes[target_in])
    if edit == "dim":
        ax = data.draw(st.integers(0, len(dims) - 1))
        dims[ax] = data.draw(st.sampled_from(
            [0, 1, max(dims[ax] - 1, 0), dims[ax] + 1, min(2 * dims[ax], 64)]))
    elif edit == "rank":
        dims = dims[:-1] if data.draw(st.booleans()) else dims + [2]
    elif edit == "nonint":
        ax = data.draw(st.integers(0, len(dims) - 1))
        dims[ax] = data.draw(st.sampled_from([2.5, 3.0, "3", True, None, -1]))
    shapes[target_in] = tuple(dims)
    note(f"shapes={shapes}")
    shape_names = [target_in, "input_shapes", *config_names, "channels", "C",
                   "spatial", "kernel", "groups", "H", "W", "param_shapes"]
    try:
        spec.param_shapes(cfg, shapes)  # validates the shapes
        resolved = spec.resolve(cfg, shapes)
        spec.param_shapes(resolved, shapes)
        inputs, params, state = draw_case(spec, resolved, shapes,
                                          seed=data.draw(st.integers(0, 3)))
    except (ValueError, TypeError) as err:
        assert _names_one_of(err, shape_names), (req, shapes, str(err))
        FIGURES[counter] += 1
        FIGURES[f"{counter} refused (shape)"] += 1
        return
    except Exception as err:  # pragma: no cover
        raise Escaped(f"shapes {req} {shapes}: {type(err).__name__}: {err}") from err

    # --- a baseline run on plain float64 arrays
    try:
        outputs, cache = spec.forward(inputs, params, state, resolved)
    except (ValueError, TypeError) as err:  # shapes param_shapes allows (empty dims)
        assert _names_one_of(err, shape_names), (req, shapes, str(err))
        FIGURES[counter] += 1
        FIGURES[f"{counter} refused (shape)"] += 1
        return
    except Exception as err:  # pragma: no cover
        raise Escaped(f"forward {req} {shapes}: {type(err).__name__}: {err}") from err
    rng = np.random.default_rng(0)
    dout = rng.standard_normal(np.shape(outputs["out"]))
    base_out = outputs
    base_din, base_dp = spec.backward({"out": dout}, cache)
    assert _finite_tree(base_out) and _finite_tree(base_din) and _finite_tree(base_dp)

    # --- one hostile edit of the arrays
    groups = {"inputs": inputs, "params": params, "state": state,
              "douts": {"out": dout}}
    targets = [(g, k) for g, d in groups.items() for k in d]
    group, key = data.draw(st.sampled_from(targets), label="target")
    kind = data.draw(st.sampled_from(ARRAY_EDITS), label="edit")
    args = {g: dict(d) for g, d in groups.items()}
    a = groups[group][key]
    valid = False
    detail: Any = None
    if kind == "none":
        valid = True
    elif kind == "float32":
        args = {g: {k: v.astype(np.float32) for k, v in d.items()}
                for g, d in args.items()}
        valid = True
    elif kind == "layout":
        detail = data.draw(st.sampled_from(LAYOUTS))
        args[group][key] = _layout(a, detail)
        valid = True
    elif kind == "dtype":
        detail = data.draw(st.sampled_from(BAD_DTYPES))
        args[group][key] = a.astype(detail) if detail != "bool" else a > 0
    elif kind == "mixdtype":
        args[group][key] = a.astype(np.float32)
    elif kind in ("nan", "inf"):
        b = a.copy()
        if b.size:
            b.flat[data.draw(st.integers(0, b.size - 1))] = (
                np.nan if kind == "nan" else data.draw(st.sampled_from([np.inf,
                                                                         -np.inf])))
        args[group][key] = b
    elif kind == "scale":
        detail = data.draw(st.sampled_from(SCALES))
        with np.errstate(over="ignore", under="ignore"):
            args[group][key] = a * detail
    elif kind == "type":
        detail = data.draw(st.sampled_from(["list", "float", "none", "str", "zero_d",
                                            "matrix"]))
        args[group][key] = _retyped(a, detail)
    elif kind == "shape":
        detail = data.draw(st.sampled_from(["lead", "drop", "grow"]))
        args[group][key] = _reshaped(a, detail)
    elif kind == "missing":
        del args[group][key]
    elif kind == "extra":
        args[group]["zz_extra" if group == "inputs" else "zz.extra"] = a
        key = "zz"
    note(f"edit {kind} {detail} of {group}[{key!r}]")
    before = _copy_tree(args)

    names = [key, group, "dout", "douts", "inputs", "params", "state"]
    try:
        outputs, cache = spec.forward(args["inputs"], args["params"], args["state"],
                                      resolved)
        dinputs, dparams = spec.backward(args["douts"], cache)
    except (ValueError, TypeError) as err:
        assert not valid, f"a valid edit ({kind} {detail}) was refused: {err}"
        assert _names_one_of(err, names), (kind, detail, group, key, str(err))
        FIGURES[counter] += 1
        FIGURES[f"{counter} refused (arrays)"] += 1
        assert _same(before, args), "an argument was modified"
        return
    except Exception as err:
        raise Escaped(f"{req} {kind} {detail} {group}[{key!r}]: "
                      f"{type(err).__name__}: {err}") from err
    assert _same(before, args), "an argument was modified"
    results = (outputs, dinputs, dparams)
    for r in results:
        assert _finite_tree(r), f"non-finite result after {kind} {detail}"
    if kind in ("none", "layout"):
        for got, want in zip(results, (base_out, base_din, base_dp), strict=True):
            assert _close(got, want), f"{kind} {detail} changed the result"
    FIGURES[counter] += 1
    FIGURES[f"{counter} finite results"] += 1


_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
}


@settings(max_examples=max(600, settings.default.max_examples), **_SETTINGS)
@given(data=st.data())
def test_block_contract_under_hostile_inputs(data: st.DataObject) -> None:
    _one_example(data, "library fuzz examples")


@pytest.mark.slow
@settings(max_examples=max(4000, settings.default.max_examples), derandomize=False,
          **_SETTINGS)
@given(data=st.data())
def test_block_contract_under_hostile_inputs_long(data: st.DataObject) -> None:
    _one_example(data, "library fuzz examples (slow, random)")


# ---------------------------------------------------------------------------
# huge magnitudes: exact, or refused; never Inf/NaN


HOMOGENEOUS = [
    ("conv1x1", {"bias": False}),
    ("gap", {}),
    ("mlpconv", {"bias": False, "channels": (8, 6, 4), "kernel_size": 3,
                 "padding": 1}),
    ("nin_head", {"bias": False}),
]


@pytest.mark.parametrize("name,overrides", HOMOGENEOUS, ids=[n for n, _ in HOMOGENEOUS])
@pytest.mark.parametrize("k", [-1000, -100, 100, 500, 1000, "max"])
def test_power_of_two_scaling_is_exact_or_refused(name: str, overrides: dict[str, Any],
                                                  k: int | str) -> None:
    """f(2^k x) = 2^k f(x) exactly for these positively homogeneous blocks
    (linear maps, average pools and ReLUs, no bias): a result at any finite
    magnitude is either exactly right or a ValueError, never Inf or a silently
    wrong number.  (At 2^-1000 the result is subnormal: checked to be finite
    and within the subnormal spacing instead.)"""
    spec = BLOCKS[name]
    cfg = spec.config(None, **overrides)
    inputs, params, state = draw_case(spec, cfg, seed=1)
    ref, cache = spec.forward(inputs, params, state, cfg)
    dout = np.random.default_rng(2).standard_normal(ref["out"].shape)
    dref, pref = spec.backward({"out": dout}, cache)
    if k == "max":  # the largest scaling that keeps every input finite
        k = 1023 - math.frexp(float(np.max(np.abs(inputs["x"]))))[1]
    s = math.ldexp(1.0, int(k))
    scaled = {n: v * s for n, v in inputs.items()}
    assert all(np.isfinite(v).all() for v in scaled.values())
    FIGURES["scaling checks"] += 1
    try:
        got, cache2 = spec.forward(scaled, params, state, cfg)
        dgot, pgot = spec.backward({"out": dout}, cache2)
    except ValueError as err:
        text = str(err)
        assert k > 0 and "overflowed" in text, text
        assert "inputs['x']" in text or f"{name} backward" in text, text
        FIGURES["scaling checks refused (overflow)"] += 1
        return
    assert _finite_tree(got) and _finite_tree(dgot) and _finite_tree(pgot)
    if k >= -100:
        np.testing.assert_array_equal(got["out"], ref["out"] * s)
        np.testing.assert_array_equal(dgot["x"], dref["x"])  # degree 0 in x
        for p in pgot:
            np.testing.assert_array_equal(pgot[p], pref[p] * s)
    else:
        tiny = np.finfo(np.float64).smallest_subnormal
        assert np.max(np.abs(got["out"] - ref["out"] * s)) <= 64 * tiny * 2**10


def test_overflow_message_names_the_argument_of_largest_magnitude() -> None:
    spec = BLOCKS["non_local"]
    cfg = spec.config()
    inputs, params, state = draw_case(spec, cfg)
    with pytest.raises(ValueError, match=r"non_local forward: .*overflowed.*"
                                         r"inputs\['x'\]"):
        spec.forward({"x": inputs["x"] * 1e200}, params, state, cfg)
    big = dict(params, **{"g.weight": params["g.weight"] * 1e200})
    with pytest.raises(ValueError, match=r"params\['g.weight'\]"):
        spec.forward(inputs, big, state, cfg)
    # a sharper softmax is no overflow: huge theta weights give a finite result
    sharp = dict(params, **{"theta.weight": params["theta.weight"] * 1e200})
    out, _ = spec.forward(inputs, sharp, state, cfg)
    assert np.isfinite(out["out"]).all()
    outputs, cache = spec.forward(inputs, params, state, cfg)
    with pytest.raises(ValueError, match=r"douts\['out'\]"):
        spec.backward({"out": np.full(outputs["out"].shape, np.nan)}, cache)


def test_registry_lookups_never_raise_for_membership() -> None:
    assert "cbam" in BLOCKS and "nope" not in BLOCKS and ["cbam"] not in BLOCKS
    assert BLOCKS.get("nope") is None and BLOCKS.get("gap") is BLOCKS["gap"]
    with pytest.raises(ValueError, match="block: unknown block 'nope'"):
        BLOCKS["nope"]
    with pytest.raises(TypeError, match="block: expected a block name"):
        BLOCKS[["cbam"]]  # type: ignore[index]
    with pytest.raises(TypeError, match="preset: expected a preset name"):
        BLOCKS["cbam"].config(["jongchan"])  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [2.5, "3", True, None, -1, (2,)])
def test_input_shapes_are_not_coerced(dim: Any) -> None:
    spec = BLOCKS["conv1x1"]
    cfg = spec.config()
    for f in (lambda s: spec.param_shapes(cfg, s), lambda s: spec.accumulation(cfg, s),
              lambda s: spec.init_params(cfg, s, seed=0),
              lambda s: spec.anchor_names(None, cfg, s)):
        with pytest.raises((TypeError, ValueError), match=r"input_shapes\['x'\]"):
            f({"x": (2, dim, 5, 7)})


@pytest.mark.parametrize("over", [{"order": 171}, {"order": 2**70},
                                  {"gamma": 1e300, "kernel": "gaussian"},
                                  {"gamma": 1e160, "kernel": "gaussian", "order": 2}])
def test_cgnl_taylor_weights_that_overflow_are_refused(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="order|gamma"):
        BLOCKS["cgnl"].config(**over)
