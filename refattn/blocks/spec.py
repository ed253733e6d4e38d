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
    zero inits, which hide gradients): the contract's draws are weights
    N(0, 1/fan_in), biases N(0, 0.1²) (``draw_param``), norm gamma in
    [0.5, 1.5], beta N(0, 0.1²), running mean N(0, 0.1²) and variance in
    [0.5, 2] (``init_norm``).  ``anchor_init=True`` gives the anchor's own
    initialisation.
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
    "CONTRACT",
    "HOOKS",
    "MIN_MARGIN",
    "RANK_NAMES",
    "BenchCase",
    "BlockSpec",
    "check_batch_statistics",
    "config_from_dict",
    "config_to_dict",
    "draw_bias",
    "draw_bn_state",
    "draw_norm_affine",
    "draw_param",
    "draw_weight",
    "init_norm",
    "json_ready",
    "max_gap",
    "module_specs",
    "norm_shapes",
    "relu_margin",
    "single_x_shape",
    "to_namespace",
    "with_bn_field",
]

MIN_MARGIN = 1e-5
"""Fixture draws keep every ReLU input and max gap this far (relative) from a kink."""


CONTRACT = ("check_config", "fixture_shapes", "param_shapes", "init_params", "forward",
            "backward", "kink_margin", "accumulation", "anchor_names", "with_bn_mode")
"""The functions every spec module defines under these names (module
docstring); ``BlockSpec.of_module`` collects them."""

HOOKS = ("resolve", "flops", "draw_scales", "inert_keys")
"""The optional functions a spec module may define under these names (module
docstring); ``BlockSpec.of_module`` collects those it finds."""


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
        those names in the spec module `module` (``__name__``), and so are the
        optional hooks (``HOOKS``) it defines, unless given in `fields`.
        ``name`` defaults to the module's last dotted component, ``diagram``
        to the name and ``presets`` to the ``PRESETS`` of the math module
        that defines ``config_cls``; the other fields come from `fields`."""
        namespace = vars(sys.modules[module])
        found = {name: namespace[name] for name in CONTRACT}
        found |= {name: namespace[name] for name in HOOKS if name in namespace}
        found["presets"] = sys.modules[fields["config_cls"].__module__].PRESETS
        found["name"] = fields.get("name", module.rpartition(".")[2])
        found["diagram"] = found["name"]
        return cls(**(found | fields))

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


def module_specs(module: str, **fields: Any) -> dict[str, BlockSpec]:
    """The ``SPECS`` of a spec module that declares one block:
    ``{name: BlockSpec.of_module(module, **fields)}``."""
    spec = BlockSpec.of_module(module, **fields)
    return {spec.name: spec}


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


def with_bn_field(cfg: Any, field: str, mode: str) -> Any:
    """`cfg` with its batch-norm mode field `field` set to `mode` ('train' or
    'eval'); None when the field is None (the config has no BN)."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if getattr(cfg, field) is None:
        return None
    return dataclasses.replace(cfg, **{field: mode})


# ---------------------------------------------------------------------------
# input shapes

RANK_NAMES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, T, H, W)"}
"""The layouts of an input x with 1, 2 or 3 spatial dims, by rank."""


def single_x_shape(block: str, input_shapes: Mapping[str, Shape]) -> Shape:
    """The shape of `block`'s only input ``x`` with 1, 2 or 3 spatial dims
    (``RANK_NAMES``), validated for names, rank and emptiness."""
    if not isinstance(input_shapes, Mapping) or set(input_shapes) != {"x"}:
        got = sorted(input_shapes) if isinstance(input_shapes, Mapping) else input_shapes
        raise ValueError(f"inputs: {block} takes exactly one input 'x', got {got!r}")
    shape = tuple(input_shapes["x"])
    if len(shape) not in RANK_NAMES:
        raise ValueError(
            "x: expected a 3-D (N, C, L), 4-D (N, C, H, W) or 5-D (N, C, T, H, W) "
            f"array, got shape {shape}"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"x: expected every dim >= 1, got shape {shape}")
    return shape


def check_batch_statistics(shape: Shape, setting: str, what: str, *, name: str = "x",
                           count: str = "N·|S|") -> None:
    """A BN in train mode normalises each channel with the mean and variance of
    its N·|S| values in the batch: at least two are needed."""
    if shape[0] * math.prod(shape[2:]) < 2:
        raise ValueError(
            f"{name}: {setting} normalises {what} with batch statistics over "
            f"{count} values per channel, which needs {count} >= 2, got shape {shape}"
        )


# ---------------------------------------------------------------------------
# parameter draws (host, float64)


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


def draw_param(rng: np.random.Generator, key: str, shapes: Mapping[str, Shape],
               scheme: str = "random") -> np.ndarray:
    """Host float64 conv or linear parameter `key` (a weight or a bias; fan_in
    comes from its layer's weight in `shapes`), drawn by `scheme`:

    ``random``  weight N(0, 1/fan_in), bias N(0, 0.1²) (draw_weight, draw_bias);
    ``torch``   PyTorch's ``nn.Conv2d.reset_parameters``: both U(±1/sqrt(fan_in))
                (its Kaiming-uniform rule with a = sqrt(5) works out to this);
    ``small``   weight N(0, 0.01²), bias 0;
    ``zeros``   zeros (draws nothing).
    """
    shape = shapes[key]
    leaf = key.rsplit(".", 1)[-1]
    if scheme == "random":
        return draw_weight(rng, shape) if leaf == "weight" else draw_bias(rng, shape)
    if scheme == "torch":
        fan_in = math.prod(shapes[key.removesuffix(leaf) + "weight"][1:])
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)
    if scheme == "small" and leaf == "weight":
        return 0.01 * rng.standard_normal(shape)
    if scheme in ("small", "zeros"):
        return np.zeros(shape)
    raise ValueError(f"scheme: expected 'random', 'torch', 'small' or 'zeros', "
                     f"got {scheme!r}")


def norm_shapes(module: str, c: int, *, running: bool = True) -> dict[str, Shape]:
    """The keys and shapes of a norm layer `module` over `c` channels: ``weight``,
    ``bias`` and, with `running`, ``running_mean`` and ``running_var``."""
    leaves = ("weight", "bias") + (("running_mean", "running_var") if running else ())
    return {f"{module}.{leaf}": (c,) for leaf in leaves}


def init_norm(rng: np.random.Generator, module: str, c: int, *, identity: bool,
              running: bool = True) -> tuple[Params, Params]:
    """Host float64 (params, state) of a norm layer `module` over `c` channels:
    ``weight`` and ``bias``, and with `running` the buffers ``running_mean``
    and ``running_var``.

    Drawn by draw_norm_affine, then draw_bn_state; with `identity`, gamma =
    beta = 0 and running statistics (0, 1), drawing nothing (the zero init
    that makes a residual block the identity).
    """
    if identity:
        gamma, beta, mean, var = np.zeros(c), np.zeros(c), np.zeros(c), np.ones(c)
    else:
        gamma, beta = draw_norm_affine(rng, c)
        mean, var = draw_bn_state(rng, c) if running else (None, None)
    params = {f"{module}.weight": gamma, f"{module}.bias": beta}
    if not running:
        return params, {}
    return params, {f"{module}.running_mean": mean, f"{module}.running_var": var}


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
