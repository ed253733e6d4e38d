"""The one boundary where a block's arguments are checked.

The math modules (``refattn/blocks/<block>.py``, ``refattn/ops``) check
nothing beyond cheap shape and dtype asserts: they trust their arguments.
Everything a caller can get wrong is checked here, once, where a public
entry point is called — the functions each spec module
(``refattn/blocks/specs/<block>.py``) hands to ``BlockSpec``.  One checker
per concern:

==========================  ===============================================
concern                     checker
==========================  ===============================================
one config field            ``Int``, ``Real``, ``Bool``, ``OneOf``, ``Pair``,
                            ``Choices`` (rules, called by ``check_config``)
the config object           ``check_config``: type, every field rule, then
                            the cross-field relations
input shapes (no arrays)    ``check_input_shapes``; ``limit_sizes`` for the
                            parameter shapes they imply
input arrays                ``check_inputs``
parameters and buffers      ``check_params``: keys, shapes, one dtype, finite
the cotangent               ``check_douts``
the cache                   ``check_cache``: produced by this block's forward
results                     ``forward_entry`` / ``backward_entry``: finite
                            outputs and gradients, overflow named
==========================  ===============================================

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from refattn import backend
from refattn._typing import Array, Shape
from refattn.params import is_buffer

__all__ = [
    "Bool",
    "Choices",
    "ConfigError",
    "Int",
    "OneOf",
    "Pair",
    "Real",
    "check_cache",
    "check_config",
    "check_douts",
    "check_input_shapes",
    "check_inputs",
    "check_params",
    "backward_entry",
    "config_entry",
    "forward_entry",
    "is_real",
    "limit_sizes",
]


# ---------------------------------------------------------------------------
# one config field


class ConfigError(ValueError, TypeError):
    """A config field that breaks its rule.  A ValueError and, since a wrong
    type (``reduction="3"``) is one of the ways to break it, a TypeError:
    callers catching either see it."""


def is_real(v: Any) -> bool:
    """A real number (int, float, NumPy scalar), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int:
    """An int >= `minimum` (and <= `maximum`), or None with `optional`."""

    minimum: int
    maximum: int | None = None
    optional: bool = False
    why_maximum: str = ""

    def __call__(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        want = f"an int >= {self.minimum}" + (" or None" if self.optional else "")
        if not _is_int(value):
            raise ConfigError(f"{name}: expected {want}, got {value!r}")
        if value < self.minimum:
            raise ConfigError(f"{name}: expected {want}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(
                f"{name}: expected an int <= {self.maximum}{self.why_maximum}, "
                f"got {value}"
            )
        return int(value)


@dataclass(frozen=True)
class Real:
    """A finite real number in [low, high] (> low with `positive`)."""

    low: float = -math.inf
    high: float = math.inf
    positive: bool = False

    def __call__(self, name: str, value: Any) -> float:
        if not is_real(value):
            raise ConfigError(f"{name}: expected a real number, got {value!r}")
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if self.positive and not v > 0:
            raise ConfigError(f"{name}: expected a finite float > 0, got {value!r}")
        if not self.low <= v <= self.high:
            raise ConfigError(
                f"{name}: expected a float in [{self.low:g}, {self.high:g}], "
                f"got {value!r}"
            )
        return v


@dataclass(frozen=True)
class Bool:
    """True or False (not 0, 1 or "yes"); None too when `optional`."""

    optional: bool = False

    def __call__(self, name: str, value: Any) -> bool | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, bool):
            allowed = "True, False or None" if self.optional else "True or False"
            raise ConfigError(f"{name}: expected {allowed}, got {value!r}")
        return value


@dataclass(frozen=True)
class OneOf:
    """One of `choices` (None among them where None is allowed)."""

    choices: tuple[Any, ...]
    meaning: str = ""  # e.g. "(Jongchan) or ... (luuuyi)"

    def __call__(self, name: str, value: Any) -> Any:
        if not any(value is c or (isinstance(value, str) and value == c)
                   for c in self.choices):
            listing = ", ".join(map(repr, self.choices))
            raise ConfigError(
                f"{name}: expected one of {listing}{self.meaning}, got {value!r}"
            )
        return value


@dataclass(frozen=True)
class Pair:
    """An int >= `minimum`, or a pair of them (one per spatial dim); a list is
    stored as a tuple (configs are hashable)."""

    minimum: int

    def __call__(self, name: str, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        try:
            backend.as_tuple(name, value, 2, minimum=self.minimum)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        return value


@dataclass(frozen=True)
class Choices:
    """A non-empty ordered sequence of distinct items of `allowed` (or,
    without `allowed`, of ints checked by `item`), stored as a tuple."""

    allowed: tuple[Any, ...] = ()
    item: Int | None = None
    unique: bool = True
    what: str = "an ordered sequence"

    def __call__(self, name: str, value: Any) -> tuple[Any, ...]:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise ConfigError(f"{name}: expected {self.what}, got {value!r}")
        items = tuple(value)
        if not items:
            raise ConfigError(f"{name}: expected {self.what}, got an empty sequence")
        if self.item is not None:
            items = tuple(self.item(f"{name}[{i}]", v) for i, v in enumerate(items))
        else:
            unknown = [v for v in items
                       if not isinstance(v, str) or v not in self.allowed]
            if unknown:
                raise ConfigError(
                    f"{name}: unknown item(s) {', '.join(map(repr, unknown))} "
                    f"(allowed: {', '.join(map(repr, self.allowed))}), got {items!r}"
                )
        if self.unique and len(set(items)) != len(items):
            raise ConfigError(f"{name}: each item may appear once, got {items!r}")
        return items


Rule = Callable[[str, Any], Any]
Relation = Callable[[Any], "str | None"]
"""A rule between fields: the error message, or None when the config obeys it."""


# ---------------------------------------------------------------------------
# the config object


def check_config(block: str, cfg: Any, cls: type, rules: Mapping[str, Rule],
                 relations: Iterable[Relation] = ()) -> Any:
    """`cfg` as a checked config of `cls`: every field passes its rule (lists
    become tuples), then every relation holds.  Returns `cfg` itself when
    nothing was normalised."""
    if not isinstance(cfg, cls):
        raise TypeError(
            f"cfg: expected a {cls.__name__} (the {block} config), got "
            f"{type(cfg).__module__}.{type(cfg).__qualname__}"
        )
    changed = {}
    for name, rule in rules.items():
        value = getattr(cfg, name)
        checked = rule(name, value)
        if type(checked) is not type(value):
            changed[name] = checked
    if changed:
        cfg = dataclasses.replace(cfg, **changed)
    for relation in relations:
        message = relation(cfg)
        if message:
            raise ConfigError(message)
    return cfg


def config_entry(check: Callable[[Any], Any], *, shapes: bool = False
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a contract function whose first argument is a config, so that
    it runs on ``check(cfg)``; with `shapes`, its second argument (the input
    shapes) is checked by ``check_input_shapes``."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def entry(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if shapes and args:
                args = (check_input_shapes(args[0]), *args[1:])
            elif shapes and "input_shapes" in kwargs:
                kwargs["input_shapes"] = check_input_shapes(kwargs["input_shapes"])
            return f(check(cfg), *args, **kwargs)

        return entry

    return decorate


# ---------------------------------------------------------------------------
# input shapes


_MAX_ELEMENTS = 2**62
"""More elements than any array can hold (NumPy's limit is 2**63 - 1 bytes)."""


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
        if dims is None or not all(_is_int(d) for d in dims):
            raise TypeError(
                f"input_shapes[{name!r}]: expected a tuple of ints, got {shape!r}"
            )
        if any(d < 0 for d in dims):
            raise ValueError(
                f"input_shapes[{name!r}]: expected dims >= 0, got {tuple(dims)}"
            )
        out[name] = tuple(int(d) for d in dims)
    return out


def limit_sizes(block: str, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """`shapes` (parameter shapes), refusing any no array can have."""
    for key, shape in shapes.items():
        if math.prod(shape) > _MAX_ELEMENTS:
            raise ValueError(
                f"param_shapes: {block} parameter {key!r} would have shape "
                f"{tuple(shape)}, more elements than an array can hold (check "
                f"the config and the input shapes)"
            )
    return dict(shapes)


# ---------------------------------------------------------------------------
# input arrays, parameters, cotangents, caches


def check_inputs(block: str, inputs: Any, ndims: Mapping[str, Any]) -> dict[str, Array]:
    """Exactly the input names of `ndims`, each a finite, non-empty float
    array of an allowed rank."""
    if not isinstance(inputs, Mapping) or set(inputs) != set(ndims):
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise ValueError(f"inputs: {block} takes {sorted(ndims)}, got {got}")
    for name, ndim in ndims.items():
        a = inputs[name]
        backend.check_array(name, a, ndim=ndim)
        if any(int(s) == 0 for s in a.shape):
            raise ValueError(
                f"{name}: expected a non-empty array, got shape {tuple(a.shape)}")
        backend.check_finite(name, a)
    return dict(inputs)


def check_params(block: str, params: Any, state: Any, shapes: Mapping[str, Shape],
                 inputs: Mapping[str, Array], switches: str = "",
                 why: Callable[[str], str] | None = None
                 ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Check a block's parameters and buffers against its parameter shapes;
    return ``(params, state)``.

    Buffers (running statistics) may come in `state`, as the contract says,
    or among the params; they are moved to the state.  Then: the keys match
    `shapes` (`switches` names the config switches that decide them, and
    `why(key)` the switch behind one key, for the message), every array has
    its shape, all share one dtype with `inputs` (already checked), and every
    value is finite.  Inside the block the ops' math steps check nothing, so
    this is the one place an argument's NaN/Inf is found and named.
    """
    for what, d in (("params", params), ("state", state)):
        if not isinstance(d, Mapping):
            raise TypeError(f"{what}: expected a dict of name -> array, got "
                            f"{type(d).__name__}")
    params, state = dict(params), dict(state)
    for key in [k for k in params if is_buffer(k)]:
        if key in state:
            raise ValueError(
                f"state: buffer {key!r} was given in both params and state")
        state[key] = params.pop(key)
    for what, got, want in (
        ("params", params, [k for k in shapes if not is_buffer(k)]),
        ("state", state, [k for k in shapes if is_buffer(k)]),
    ):
        missing = [k for k in want if k not in got]
        extra = sorted(k for k in got if k not in want)
        if missing or extra:
            mismatch = _key_mismatch(block, missing, extra, want, switches, why)
            raise ValueError(f"{what}: {mismatch}")
    if params or state:  # one array library for all (the inputs' is checked)
        backend.namespace(**inputs, **params, **state)
    for key, a in (params | state).items():
        backend.check_array(key, a, shape=tuple(shapes[key]))
    backend.check_same_dtype(**inputs, **params, **state)
    for key, a in (params | state).items():
        backend.check_finite(key, a)
    return params, state


def _key_mismatch(block: str, missing: list[str], extra: list[str], want: list[str],
                  switches: str, why: Callable[[str], str] | None) -> str:
    parts = []
    for label, keys, verb in (("missing", missing, "required with"),
                              ("unexpected", extra, "absent with")):
        if keys:
            reasons = sorted({why(k) for k in keys} - {""}) if why else []
            parts.append(f"{label} key(s) {', '.join(map(repr, keys))}"
                         + (f" ({verb} {', '.join(reasons)})" if reasons else ""))
    config = f" ({switches})" if switches else ""
    return (f"{'; '.join(parts)}: the keys must match the {block} config{config} "
            f"(expected {sorted(want)})")


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
    backend.check_array("douts['out']", dout,
                        shape=None if shape is None else tuple(shape))
    if like is not None:
        backend.check_same_dtype(**{"douts['out']": dout, "the forward's x": like})
    return dout


def check_cache(block: str, cache: Any, types: tuple[type, ...]) -> None:
    """`cache` was returned by this block's forward (not another block's)."""
    if not isinstance(cache, types):
        names = " or ".join(t.__name__ for t in types)
        raise TypeError(
            f"cache: {block} backward needs the cache its forward returned ({names}), "
            f"got {type(cache).__module__}.{type(cache).__qualname__}"
        )


# ---------------------------------------------------------------------------
# results: finite, or the overflow named


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


def _run(block: str, step: str, f: Callable[[], Any],
         arguments: Callable[[], list[tuple[str, Array]]],
         results: Callable[[Any], list[tuple[str, Any]]]) -> Any:
    """f() with NumPy's overflow warnings off; a non-finite result raises
    NonFiniteError naming the block, the result and the largest argument."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:
            value = f()
        except backend.NonFiniteError as err:
            if not all(backend.all_finite(a) for _, a in arguments()):
                raise  # a non-finite argument: the check that saw it named it
            raise _overflow(block, step, "an intermediate result", arguments(),
                            str(err)) from None
    for name, a in results(value):
        if a is None:
            continue
        try:
            backend.check_finite(name, a)
        except backend.NonFiniteError as err:
            raise _overflow(block, step, name, arguments(), str(err)) from None
    return value


def forward_entry(block: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a block's checked forward ``(inputs, params, state, cfg) ->
    (outputs, cache)``: every output must be finite.  A result that is not
    finite although every argument is (float64 overflow, e.g. inputs of
    magnitude 1e300) raises ``NonFiniteError`` naming the block, the
    non-finite tensor and the argument of largest magnitude."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def forward(inputs: Any, params: Any, state: Any, cfg: Any) -> Any:
            return _run(
                block, "forward", lambda: f(inputs, params, state, cfg),
                lambda: _float_arrays(inputs=inputs, params=params, state=state),
                lambda r: [(f"outputs[{k!r}]", a) for k, a in r[0].items()],
            )

        return forward

    return decorate


def backward_entry(block: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a block's checked backward ``(douts, cache) -> (dinputs,
    dparams)``: the cotangents must be finite, and so must every gradient."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def backward(douts: Any, cache: Any) -> Any:
            def arguments() -> list[tuple[str, Array]]:
                return _float_arrays(douts=douts)

            for name, a in arguments():
                backend.check_finite(name, a)
            return _run(
                block, "backward", lambda: f(douts, cache), arguments,
                lambda r: [(f"dinputs[{k!r}]", a) for k, a in r[0].items()]
                + [(f"dparams[{k!r}]", a) for k, a in r[1].items()],
            )

        return backward

    return decorate
