"""The block contract: what every block module provides, and the helpers
they share (parameter draws, margins from kinks and ties, config plumbing).

A block module ``refattn/blocks/<name>.py`` defines a frozen config dataclass
with named ``PRESETS`` and these functions, collected in its ``SPEC``:

``param_shapes(cfg, input_shapes) -> {name: shape}``
    Every parameter AND buffer key (``*.running_mean`` / ``*.running_var``)
    with its shape: the single statement of which keys exist for a config.
``init_params(cfg, input_shapes, *, seed, anchor_init=False) -> (params, state)``
    Host float64 NumPy dicts: trainable parameters, and buffers (BN running
    statistics).  Random and non-degenerate by default (never the anchors'
    zero inits, which hide gradients); ``anchor_init=True`` gives the anchor's
    own initialisation.
``forward(inputs, params, state, cfg) -> (outputs, cache)``
    ``outputs`` is a flat dict: ``"out"`` (the differentiable result), updated
    running statistics under ``"state.<buffer key>"`` (BN train mode only)
    and intermediates worth comparing under ``"aux.<name>"`` (attention maps,
    gates).  Nothing is mutated.
``backward(douts, cache) -> (dinputs, dparams)``
    ``douts = {"out": dout}``; ``dinputs`` keyed like ``inputs``; ``dparams``
    keyed exactly like ``params`` (buffers get no gradient).
``kink_margin(cache) -> float``
    The smallest distance, relative to the typical magnitude, of any ReLU
    input from 0 and of any max from its runner-up, in this forward; fixture
    draws below ``MIN_MARGIN`` are redrawn (DESIGN section 5).
``accumulation(cfg, input_shapes) -> {key prefix: length}``
    The longest sum behind each tensor family ("out", "aux", "grad.input",
    "grad.param", "state"), from which fixture tolerances are derived.
``anchor_names(preset, cfg, input_shapes) -> {canonical: anchor state_dict name}``
    For presets with an anchor implementation; ``{}`` otherwise.
``with_bn_mode(cfg, mode) -> cfg | None``
    The same config with its batch norm in ``"train"`` or ``"eval"`` mode;
    None when the config has no batch norm.
``fixture_shapes(cfg) -> {input name: shape}``
    The small default input shapes of golden fixtures and gradchecks.
Optional, for the tools around the math (each None or empty by default):

``flops(cfg, input_shapes) -> int``
    Matmul and convolution FLOPs of one forward (2 per multiply-add; the
    backward costs twice as much); the benchmarks report GFLOP/s from it.
``bench``
    The block's standard benchmark case (``BenchCase``: preset, overrides,
    input shapes, a one-line description; DESIGN section 13).
``figure``
    ``(painter, (width, height))``: the function of ``refattn.plot`` that
    draws a case's attention maps and gates, and the figure size in inches.
``anchors``
    ``{preset: "module:factory"}`` of the PyTorch module in the anchor's
    structure under ``tests/anchors`` (None for the default config).
``draw_scales(cfg, input_shapes) -> {module: factor}`` (optional)
    Factors the fixture generator applies to the weights and biases of
    ``init_params``' draws, by module name, so that every fixture tensor is
    well conditioned (a tolerance that can reject a wrong result); recorded
    in the manifest.  None (the default): no block needs it but CGNL.

``BlockSpec`` adds the checks every block shares around these functions:
``input_shapes`` must map names to sequences of ints >= 0 (a dim of 2.5 or
"3" is refused, not truncated); ``douts`` must be finite; and the forward's
outputs and the backward's gradients must be finite.  A result that is not
finite although every argument is (float64 overflow, e.g. inputs of
magnitude 1e300) raises ``ValueError`` naming the block, the non-finite
tensor and the argument of largest magnitude, instead of returning Inf/NaN
or an error that names an internal intermediate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from refattn import backend
from refattn._typing import Array, Params, Shape
from refattn.params import is_buffer

__all__ = [
    "BenchCase",
    "BlockSpec",
    "CONTRACT",
    "MIN_MARGIN",
    "check_arguments",
    "check_bool",
    "check_douts",
    "check_input_shapes",
    "check_inputs",
    "check_int",
    "check_pair",
    "check_params",
    "config_from_dict",
    "config_to_dict",
    "draw_bias",
    "draw_bn_state",
    "draw_norm_affine",
    "draw_weight",
    "is_real",
    "json_ready",
    "max_gap",
    "pair",
    "relu_margin",
    "to_namespace",
    "torch_default_init",
]

MIN_MARGIN = 1e-5
"""Fixture draws keep every ReLU input and max gap this far (relative) from a kink."""


CONTRACT = ("fixture_shapes", "param_shapes", "init_params", "forward", "backward",
            "kink_margin", "accumulation", "anchor_names", "with_bn_mode")
"""The functions every block module defines under these names (module
docstring); ``BlockSpec.of_module`` collects them."""


@dataclass(frozen=True)
class BenchCase:
    """A block's standard benchmark case (DESIGN section 13)."""

    preset: str | None
    overrides: Mapping[str, Any]
    shapes: Mapping[str, Shape]
    note: str  # what is measured, in one line: "x(8,512,14,14) -> (8,512)"


@dataclass(frozen=True)
class BlockSpec:
    """Everything the CLI, the fixture generator, gradcheck and tests need."""

    name: str
    summary: str
    config_cls: type
    presets: Mapping[str, Any]
    default_preset: str | None
    fixture_shapes: Callable[[Any], dict[str, Shape]]
    param_shapes: Callable[[Any, Mapping[str, Shape]], dict[str, Shape]]
    init_params: Callable[..., tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    forward: Callable[..., tuple[dict[str, Array], Any]]
    backward: Callable[..., tuple[dict[str, Array], dict[str, Array]]]
    kink_margin: Callable[[Any], float]
    accumulation: Callable[[Any, Mapping[str, Shape]], dict[str, int]]
    anchor_names: Callable[[str | None, Any, Mapping[str, Shape]], dict[str, str]]
    with_bn_mode: Callable[[Any, str], Any]
    draw_scales: Callable[[Any, Mapping[str, Shape]], dict[str, float]] | None = None
    flops: Callable[[Any, Mapping[str, Shape]], int] | None = None
    bench: BenchCase | None = None
    figure: tuple[str, tuple[float, float]] | None = None
    anchors: Mapping[str | None, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # the shared checks (module docstring); idempotent under dataclasses.replace
        wrap = object.__setattr__
        for field, at in (("param_shapes", 1), ("init_params", 1),
                          ("accumulation", 1), ("anchor_names", 2)):
            wrap(self, field, _shapes_checked(self.name, getattr(self, field), at))
        wrap(self, "param_shapes", _sizes_checked(self.name, self.param_shapes))
        wrap(self, "init_params", _sizes_first(self.init_params, self.param_shapes))
        wrap(self, "forward", _forward_checked(self.name, self.forward))
        wrap(self, "backward", _backward_checked(self.name, self.backward))

    @classmethod
    def of_module(cls, module: str, **fields: Any) -> BlockSpec:
        """A spec whose contract functions (``CONTRACT``) are the functions of
        those names in the block module `module` (``__name__``), unless given
        in `fields`; the other fields come from `fields`."""
        namespace = vars(sys.modules[module])
        return cls(**{name: namespace[name] for name in CONTRACT if name not in fields},
                   **fields)

    def config(self, preset: str | None = None, **overrides: Any) -> Any:
        """Build a validated config from a preset (default: the block's) and
        overrides; unknown keys and presets raise ValueError naming them."""
        if preset is not None and not isinstance(preset, str):
            raise TypeError(f"preset: expected a preset name (str), got {preset!r}")
        name = self.default_preset if preset is None else preset
        if name is None:
            base = self.config_cls()
        elif name not in self.presets:
            raise ValueError(
                f"preset: {self.name} has no preset {name!r} "
                f"(presets: {', '.join(self.presets) or 'none'})"
            )
        else:
            base = self.presets[name]
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"config: {self.name} has no key(s) {', '.join(unknown)} "
                f"(keys: {', '.join(sorted(fields))})"
            )
        return dataclasses.replace(base, **overrides) if overrides else base


# ---------------------------------------------------------------------------
# the checks BlockSpec wraps around every block's functions


def _checked(f: Callable[..., Any]) -> bool:
    return getattr(f, "_refattn_checked", False)


def _shapes_checked(block: str, f: Callable[..., Any], at: int) -> Callable[..., Any]:
    """`f` with its positional argument `at` (input_shapes) validated and
    normalized to ``{name: tuple of int}``."""
    if _checked(f):
        return f

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > at:
            args = (*args[:at], check_input_shapes(args[at]), *args[at + 1 :])
        elif "input_shapes" in kwargs:
            kwargs["input_shapes"] = check_input_shapes(kwargs["input_shapes"])
        return f(*args, **kwargs)

    checked._refattn_checked = True  # type: ignore[attr-defined]
    return checked


_MAX_ELEMENTS = 2**62
"""More elements than any array can hold (NumPy's limit is 2**63 - 1 bytes)."""


def _sizes_checked(block: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """param_shapes refusing shapes no array can have (planes = 2**70, ...)."""
    if getattr(f, "_refattn_sizes", False):
        return f

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        shapes = f(*args, **kwargs)
        for key, shape in shapes.items():
            if math.prod(shape) > _MAX_ELEMENTS:
                raise ValueError(
                    f"param_shapes: {block} parameter {key!r} would have shape "
                    f"{tuple(shape)}, more elements than an array can hold (check "
                    f"the config and the input shapes)"
                )
        return shapes

    checked._refattn_checked = True  # type: ignore[attr-defined]
    checked._refattn_sizes = True  # type: ignore[attr-defined]
    return checked


def _sizes_first(init: Callable[..., Any], shapes_of: Callable[..., Any]
                 ) -> Callable[..., Any]:
    """init_params after param_shapes has vetted the sizes it would draw."""
    if getattr(init, "_refattn_sizes", False):
        return init

    @functools.wraps(init)
    def checked(cfg: Any, input_shapes: Any, **kwargs: Any) -> Any:
        shapes_of(cfg, input_shapes)
        return init(cfg, input_shapes, **kwargs)

    checked._refattn_checked = True  # type: ignore[attr-defined]
    checked._refattn_sizes = True  # type: ignore[attr-defined]
    return checked


# ---------------------------------------------------------------------------
# config fields, inputs and cotangents


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_pair(obj: Any, name: str, minimum: int) -> None:
    """Validate an int-or-pair field; a list is stored as a tuple (hashable)."""
    value = getattr(obj, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, name, value)
    backend.as_tuple(name, value, 2, minimum=minimum)


def check_inputs(
    block: str, inputs: Mapping[str, Any], ndims: Mapping[str, Any]
) -> None:
    """Exactly the input names of `ndims`, each a finite float array of an
    allowed rank."""
    if set(inputs) != set(ndims):
        raise ValueError(f"inputs: {block} takes {sorted(ndims)}, got {sorted(inputs)}")
    for name, ndim in ndims.items():
        backend.check_array(name, inputs[name], ndim=ndim)
        backend.check_finite(name, inputs[name])


def check_params(
    block: str,
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    shapes: Mapping[str, Shape],
    x: Array,
    rule: str = "",
) -> None:
    """`params` has exactly the keys of `shapes` with those shapes, x's dtype
    and finite values; `state` is empty (these blocks have no buffers).

    `rule` says which config flag decides the keys, for the error message.
    """
    listing = ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()) or "none"
    missing = [k for k in shapes if k not in params]
    unexpected = sorted(set(params) - set(shapes))
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {', '.join(missing)}")
        if unexpected:
            what.append(f"unexpected {', '.join(unexpected)}")
        raise ValueError(
            f"params: {'; '.join(what)} for {block}{rule} (expected keys: {listing})"
        )
    if state:
        raise ValueError(
            f"state: {block} has no buffers, got {', '.join(sorted(state))}"
        )
    for k, s in shapes.items():
        backend.check_array(f"params[{k!r}]", params[k], shape=tuple(s))
    backend.check_same_dtype(x=x, **{f"params[{k!r}]": v for k, v in params.items()})
    for k in shapes:
        backend.check_finite(f"params[{k!r}]", params[k])


def check_douts(block: str, douts: Any, *, shape: Shape | None = None,
                like: Array | None = None) -> Array:
    """The cotangent of ``out``, the only differentiable output of every block.

    `douts` must be a dict holding exactly it; with `shape`, of that shape,
    and with `like` (an array of the forward), of its dtype.
    """
    if not isinstance(douts, Mapping) or "out" not in douts:
        got = sorted(douts) if isinstance(douts, Mapping) else type(douts).__name__
        raise ValueError(
            f"douts: {block} backward needs a dict with the cotangent 'out', got {got}"
        )
    extra = sorted(k for k in douts if k != "out")
    if extra:
        raise ValueError(
            f"douts: {block} differentiates only 'out', got cotangents for "
            f"{', '.join(extra)}"
        )
    dout = douts["out"]
    if shape is not None:
        backend.check_array("douts['out']", dout, shape=tuple(shape))
    if like is not None:
        backend.check_same_dtype(dout=dout, forward=like)
    return dout


def is_real(v: Any) -> bool:
    """A real number (int, float, NumPy scalar), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_input_shapes(input_shapes: Any) -> dict[str, Shape]:
    """``{input name: shape}`` with every dim an int >= 0 (NumPy ints too;
    not bool, float or str), as a new dict of tuples."""
    if not isinstance(input_shapes, Mapping):
        raise TypeError(
            "input_shapes: expected a dict of input name -> shape, got "
            f"{type(input_shapes).__name__}"
        )
    out: dict[str, Shape] = {}
    for name, shape in input_shapes.items():
        if not isinstance(name, str):
            raise TypeError(f"input_shapes: expected str input names, got {name!r}")
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
        if dims is None or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims
        ):
            raise TypeError(
                f"input_shapes[{name!r}]: expected a tuple of ints, got {shape!r}"
            )
        if any(d < 0 for d in dims):
            raise ValueError(
                f"input_shapes[{name!r}]: expected dims >= 0, got {tuple(dims)}"
            )
        out[name] = tuple(int(d) for d in dims)
    return out


def check_arguments(
    arrays: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    shapes: Mapping[str, Shape],
    switches: str,
) -> tuple[dict[str, Array], dict[str, Array], Any]:
    """Check a block's arguments against its parameter shapes; return
    ``(params, state, xp)``.

    Buffers (running statistics) may come in `state`, as the contract says, or
    among the params; they are moved to the state.  Then: the keys match
    `shapes` (`switches` names the config switches that decide them, for the
    message), every array has its shape, all share one dtype with the inputs
    `arrays` (already checked to be float arrays), and every value is finite.
    Inside the block the ops' math steps check nothing, so this is the one
    place an argument's NaN/Inf is found and named.
    """
    params, state = dict(params), dict(state)
    for key in [k for k in params if is_buffer(k)]:
        if key in state:
            raise ValueError(f"state: buffer {key!r} was given in both params and state")
        state[key] = params.pop(key)
    want_p = [k for k in shapes if not is_buffer(k)]
    want_s = [k for k in shapes if is_buffer(k)]
    for kind, got, want in (("params", params, want_p), ("state", state, want_s)):
        missing = [k for k in want if k not in got]
        extra = sorted(k for k in got if k not in want)
        if missing or extra:
            raise ValueError(
                f"{kind}: keys do not match the config ({switches}): "
                f"missing {missing}, unexpected {extra}"
            )
    xp = backend.namespace(**arrays, **params, **state)
    for key, a in (params | state).items():
        backend.check_array(key, a, shape=tuple(shapes[key]))
    backend.check_same_dtype(**arrays, **params, **state)
    for key, a in (params | state | dict(arrays)).items():
        backend.check_finite(key, a)
    return params, state, xp


def _float_arrays(**groups: Any) -> list[tuple[str, Array]]:
    """(name, array) of every float array in the given dicts (anything else is
    skipped: the block itself reports it)."""
    out = []
    for where, d in groups.items():
        if not isinstance(d, Mapping):
            continue
        for k, a in d.items():
            if (
                array_api_compat.is_array_api_obj(a)
                and not isinstance(a, (bool, int, float))
                and backend.dtype_name(a) in backend.FLOAT_DTYPES
            ):
                out.append((f"{where}[{k!r}]", a))
    return out


def _all_finite(arrays: list[tuple[str, Array]]) -> bool:
    for _, a in arrays:
        xp = backend.namespace(a)
        if not bool(xp.all(xp.isfinite(a))):
            return False
    return True


def _largest(arrays: list[tuple[str, Array]]) -> str:
    """``"<name> (max |v| = ...)"`` for the argument of largest magnitude."""
    best, value = "", -1.0
    for name, a in arrays:
        if math.prod(int(n) for n in a.shape):
            xp = backend.namespace(a)
            m = float(xp.max(xp.abs(a)))
            if m > value:
                best, value = name, m
    return f"{best} (max |v| = {value:.3g})" if best else "none"


def _overflow(block: str, step: str, what: str, arrays: list[tuple[str, Array]],
              detail: str) -> backend.NonFiniteError:
    if step == "forward":
        given = "every argument is"
        largest = f"largest argument: {_largest(arrays)}"
    else:  # the cache's arrays have no names here
        given = "douts and the forward's arguments are"
        largest = f"largest cotangent: {_largest(arrays)}"
    return backend.NonFiniteError(
        f"{block} {step}: {what} is not finite although {given}: the "
        f"computation overflowed ({largest}; the check that saw it: {detail})"
    )


def _check_results(block: str, step: str, results: list[tuple[str, Any]],
                   arguments: Callable[[], list[tuple[str, Array]]]) -> None:
    for name, a in results:
        if a is None:
            continue
        try:
            backend.check_finite(name, a)
        except backend.NonFiniteError as err:
            raise _overflow(block, step, name, arguments(), str(err)) from None


def _forward_checked(block: str, f: Callable[..., Any]) -> Callable[..., Any]:
    if _checked(f):
        return f

    @functools.wraps(f)
    def forward(inputs: Any, params: Any, state: Any, cfg: Any) -> Any:
        def arguments() -> list[tuple[str, Array]]:
            return _float_arrays(inputs=inputs, params=params, state=state)

        # the block checks its own arguments and calls its ops' math steps,
        # which check nothing: an intermediate NaN/Inf reaches the outputs,
        # checked below
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                outputs, cache = f(inputs, params, state, cfg)
            except backend.NonFiniteError as err:
                if not _all_finite(arguments()):
                    raise  # a non-finite argument: the block named it
                raise _overflow(block, "forward", "an intermediate result",
                                arguments(), str(err)) from None
        _check_results(block, "forward",
                       [(f"outputs[{k!r}]", a) for k, a in outputs.items()], arguments)
        return outputs, cache

    forward._refattn_checked = True  # type: ignore[attr-defined]
    return forward


def _backward_checked(block: str, f: Callable[..., Any]) -> Callable[..., Any]:
    if _checked(f):
        return f

    @functools.wraps(f)
    def backward(douts: Any, cache: Any) -> Any:
        def arguments() -> list[tuple[str, Array]]:
            return _float_arrays(douts=douts)

        for name, a in arguments():
            backend.check_finite(name, a)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                dinputs, dparams = f(douts, cache)
            except backend.NonFiniteError as err:
                raise _overflow(block, "backward", "an intermediate result",
                                arguments(), str(err)) from None
        results = [(f"dinputs[{k!r}]", a) for k, a in dinputs.items()]
        results += [(f"dparams[{k!r}]", a) for k, a in dparams.items()]
        _check_results(block, "backward", results, arguments)
        return dinputs, dparams

    backward._refattn_checked = True  # type: ignore[attr-defined]
    return backward


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of config_to_dict: lists become tuples, as the dataclasses use."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ---------------------------------------------------------------------------
# parameter draws (host, float64)


def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """A conv size option (an int, or one int per spatial dim) as two ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def torch_default_init(
    rng: np.random.Generator, weight_shape: Shape, bias: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """PyTorch's ``nn.Conv2d.reset_parameters``: weight and bias both
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C/G·KH·KW (the Kaiming-uniform
    rule with a = sqrt(5) works out to exactly this bound)."""
    fan_in = math.prod(weight_shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, weight_shape)
    b = rng.uniform(-bound, bound, weight_shape[:1]) if bias else None
    return w, b


def draw_weight(rng: np.random.Generator, shape: Shape, fan_in: int | None = None) -> np.ndarray:
    """N(0, 1/fan_in): non-degenerate, keeps activations O(1) through a block."""
    if fan_in is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))


def draw_bias(rng: np.random.Generator, shape: Shape) -> np.ndarray:
    return 0.1 * rng.standard_normal(shape)


def draw_norm_affine(rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    """A norm's gamma in [0.5, 1.5] and beta ~ N(0, 0.1^2): never the zero init."""
    return rng.uniform(0.5, 1.5, c), 0.1 * rng.standard_normal(c)


def draw_bn_state(rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Running mean ~ N(0, 0.1^2) and running var in [0.5, 2]: not the (0, 1) init."""
    return 0.1 * rng.standard_normal(c), rng.uniform(0.5, 2.0, c)


# ---------------------------------------------------------------------------
# margins from kinks and ties (namespace-generic)


def relu_margin(pre: Array) -> float:
    """min |pre| / rms(pre): how close any ReLU input comes to its kink."""
    xp = backend.namespace(pre=pre)
    if pre.size == 0:
        return float("inf")
    rms = float(xp.sqrt(xp.mean(pre * pre)))
    if rms == 0.0:
        return 0.0
    return float(xp.min(xp.abs(pre))) / rms


def max_gap(values: Array, axis: int) -> float:
    """min over slices of (max - runner-up) along `axis`, relative to the rms.

    A max reduction is differentiable only away from ties; the gap says how
    far.  Axes of length 1 have no runner-up and count as infinitely far.
    """
    xp = backend.namespace(values=values)
    if values.shape[axis] < 2 or values.size == 0:
        return float("inf")
    rms = float(xp.sqrt(xp.mean(values * values)))
    if rms == 0.0:
        return 0.0
    top = xp.max(values, axis=axis, keepdims=True)
    is_top = values == top
    # a tie makes the second largest equal to the top: count the top once
    n_top = xp.sum(xp.astype(is_top, values.dtype), axis=axis)
    lowest = xp.min(values, axis=axis, keepdims=True)
    second = xp.max(xp.where(is_top, lowest, values), axis=axis)
    gap = xp.where(n_top > 1, xp.zeros_like(second), xp.squeeze(top, axis=axis) - second)
    return float(xp.min(gap)) / rms


def to_namespace(d: Mapping[str, np.ndarray], xp: Any, *, device: Any = None,
                 dtype: str = "float64") -> Params:
    """Move a host dict into `xp` (on `device`) in `dtype`."""
    return {
        k: backend.from_host(np.ascontiguousarray(v, dtype=dtype), xp, device=device)
        for k, v in d.items()
    }
