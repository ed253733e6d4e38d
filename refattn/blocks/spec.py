"""The block contract: what every spec module provides, and the helpers
the spec modules share (parameter draws, margins from kinks and ties,
config plumbing).

A block is two modules.  ``refattn/blocks/<name>.py`` is its math: the
config dataclass (fields only), the cache NamedTuples and the unchecked
``forward``/``backward``.  ``refattn/blocks/specs/<name>.py`` is everything
around it, collected in its ``SPECS`` (name -> ``BlockSpec``); it defines
these functions under these names (``CONTRACT``):

``check_config(cfg) -> cfg``
    The config checked field by field (``refattn.checks.check_config``).
``param_shapes(cfg, input_shapes) -> {name: shape}``
    Every parameter AND buffer key (``*.running_mean`` / ``*.running_var``)
    with its shape: the single statement of which keys exist for a config.
``init_params(cfg, input_shapes, *, seed, anchor_init=False) -> (params, state)``
    Host float64 NumPy dicts: trainable parameters, and buffers (BN running
    statistics).  Random and non-degenerate by default (never the anchors'
    zero inits, which hide gradients); ``anchor_init=True`` gives the anchor's
    own initialisation.
``forward(inputs, params, state, cfg) -> (outputs, cache)``
    The checked entry point: every argument checked (``refattn.checks``),
    then the math module's forward.  ``outputs`` is a flat dict: ``"out"``
    (the differentiable result), updated running statistics under
    ``"state.<buffer key>"`` (BN train mode only) and intermediates worth
    comparing under ``"aux.<name>"`` (attention maps, gates).  Nothing is
    mutated.  Outputs must be finite: an overflow is named
    (``checks.forward_entry``).
``backward(douts, cache) -> (dinputs, dparams)``
    The checked entry point: ``douts = {"out": dout}`` checked against the
    cache, then the math module's backward.  ``dinputs`` keyed like
    ``inputs``; ``dparams`` keyed exactly like ``params`` (buffers get no
    gradient).
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

``resolve(cfg, input_shapes) -> cfg``
    The config with the keys that default from the input filled in
    (``planes=None`` -> C // 2, ...); the config itself by default.
``flops(cfg, input_shapes) -> int``
    Matmul and convolution FLOPs of one forward (2 per multiply-add; the
    backward costs twice as much); the benchmarks report GFLOP/s from it.
``inert_keys(cfg) -> frozenset of config keys``
    The keys whose value changes nothing in this config (the spatial keys of
    ``cbam_channel``, ``reduction`` with one MLP layer...): still validated
    and written into manifests, but ``refattn list`` leaves them out of what
    the block's keys and presets are said to change.  None: every key counts.
``bench``
    The block's standard benchmark case (``BenchCase``: preset, overrides,
    input shapes, a one-line description; DESIGN section 13).
``figure``
    ``(painter, (width, height))``: the function of ``refattn.plot`` that
    draws a case's attention maps and gates, and the figure size in inches.
``diagram``
    The data-flow diagram of the docs (``docs/_gen/diagrams.py``): the name
    of its drawing function there.
``anchors``
    ``{preset: "module:factory"}`` of the PyTorch module in the anchor's
    structure under ``tests/anchors`` (None for the default config).
``draw_scales(cfg, input_shapes) -> {module: factor}``
    Factors the fixture generator applies to the weights and biases of
    ``init_params``' draws, by module name, so that every fixture tensor is
    well conditioned (a tolerance that can reject a wrong result); recorded
    in the manifest.  None (the default): no block needs it but CGNL.

The spec module decorates its functions with the checks of
``refattn.checks`` where it defines them; ``BlockSpec`` stores them as
given, so ``BLOCKS[name].forward is refattn.blocks.specs.<name>.forward``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn import backend
from refattn._typing import Array, Params, Shape

__all__ = [
    "BenchCase",
    "BlockSpec",
    "CONTRACT",
    "MIN_MARGIN",
    "config_from_dict",
    "config_to_dict",
    "draw_bias",
    "draw_bn_state",
    "draw_norm_affine",
    "draw_weight",
    "json_ready",
    "max_gap",
    "relu_margin",
    "to_namespace",
    "torch_default_init",
]

MIN_MARGIN = 1e-5
"""Fixture draws keep every ReLU input and max gap this far (relative) from a kink."""


CONTRACT = ("check_config", "fixture_shapes", "param_shapes", "init_params", "forward",
            "backward", "kink_margin", "accumulation", "anchor_names", "with_bn_mode")
"""The functions every spec module defines under these names (module
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
    check_config: Callable[[Any], Any]
    resolve: Callable[[Any, Mapping[str, Shape]], Any] = lambda cfg, input_shapes: cfg
    diagram: str | None = None
    draw_scales: Callable[[Any, Mapping[str, Shape]], dict[str, float]] | None = None
    flops: Callable[[Any, Mapping[str, Shape]], int] | None = None
    bench: BenchCase | None = None
    figure: tuple[str, tuple[float, float]] | None = None
    anchors: Mapping[str | None, str] = dataclasses.field(default_factory=dict)
    inert_keys: Callable[[Any], frozenset[str]] | None = None

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
        return self.check_config(dataclasses.replace(base, **overrides))


# ---------------------------------------------------------------------------
# config plumbing


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


def to_namespace(d: Mapping[str, np.ndarray], xp: Any, device: Any = None,
                 dtype: str = "float64") -> Params:
    """Move a host dict into `xp` (on `device`) in `dtype`."""
    return {
        k: backend.from_host(np.ascontiguousarray(v, dtype=dtype), xp, device=device)
        for k, v in d.items()
    }
