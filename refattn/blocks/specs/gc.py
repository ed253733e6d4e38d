"""The ``gc`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from refattn import checks
from refattn._typing import Array, Shape
from refattn.backend import host_rng, zeros_like_shape
from refattn.blocks import gc
from refattn.blocks.gc import (
    FUSION_TYPES,
    POOLING_TYPES,
    PRESETS,
    GCCache,
    GCConfig,
    branches,
    planes_of,
)
from refattn.blocks.spec import (
    BenchCase,
    draw_bias,
    draw_weight,
    module_specs,
    relu_margin,
)

RULES: dict[str, checks.Rule] = {
    "ratio": checks.Real(positive=True),
    "planes": checks.Int(1, optional=True),
    "pooling_type": checks.OneOf(POOLING_TYPES),
    "fusion_types": checks.Choices(
        FUSION_TYPES, what="a non-empty sequence of 'channel_add', 'channel_mul'"),
    "ln_eps": checks.Real(positive=True),
}


def check_config(cfg: Any) -> GCConfig:
    return checks.check_config("gc", cfg, GCConfig, RULES)


config_entry = checks.config_entry(check_config, shapes=True)
config_only = checks.config_entry(check_config)


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    """The shape of input ``x``, validated for rank and emptiness."""
    if not isinstance(input_shapes, Mapping) or set(input_shapes) != {"x"}:
        got = sorted(input_shapes) if isinstance(input_shapes, Mapping) else (
            input_shapes
        )
        raise ValueError(f"inputs: gc takes exactly one input 'x', got {got!r}")
    shape = tuple(input_shapes["x"])
    if len(shape) != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) array, got shape {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"x: expected every dim >= 1, got shape {shape}")
    return shape


@config_entry
def resolve(cfg: GCConfig, input_shapes: Mapping[str, Shape]) -> GCConfig:
    """The config with ``planes`` filled in: None -> int(C · ratio) (mmcv's
    rule), which must be at least 1."""
    C = _x_shape(input_shapes)[1]
    if cfg.planes is not None:
        return cfg
    planes = planes_of(cfg, C)
    if planes < 1:
        raise ValueError(
            f"ratio: the bottleneck has int(C * ratio) = int({C} * {cfg.ratio!r}) = "
            f"{planes} channels; expected >= 1 (raise ratio, or set planes)"
        )
    return dataclasses.replace(cfg, planes=planes)


@config_entry
def param_shapes(cfg: GCConfig, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Every parameter key of `cfg` for these inputs, with its shape.

    Shapes:
        conv_mask.weight (1, C, 1, 1), conv_mask.bias (1,)       'att' only
        <b>.conv1.weight (P, C, 1, 1), <b>.conv1.bias (P,)        per branch
        <b>.ln.weight (P, 1, 1), <b>.ln.bias (P, 1, 1)
        <b>.conv2.weight (C, P, 1, 1), <b>.conv2.bias (C,)
    """
    C = _x_shape(input_shapes)[1]
    P = int(resolve(cfg, input_shapes).planes)  # type: ignore[arg-type]
    shapes: dict[str, Shape] = {}
    if cfg.pooling_type == "att":
        shapes["conv_mask.weight"] = (1, C, 1, 1)
        shapes["conv_mask.bias"] = (1,)
    for b in branches(cfg):
        shapes[f"{b}.conv1.weight"] = (P, C, 1, 1)
        shapes[f"{b}.conv1.bias"] = (P,)
        shapes[f"{b}.ln.weight"] = (P, 1, 1)
        shapes[f"{b}.ln.bias"] = (P, 1, 1)
        shapes[f"{b}.conv2.weight"] = (C, P, 1, 1)
        shapes[f"{b}.conv2.bias"] = (C,)
    return checks.limit_sizes("gc", shapes)


@config_entry
def init_params(
    cfg: GCConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Host float64 NumPy (params, {}) for `cfg` (the block has no buffers).

    Default: random and non-degenerate: conv weights N(0, 1/fan_in), conv
    biases N(0, 0.1²), LayerNorm γ in [0.5, 1.5] and β ~ N(0, 0.1²), so that
    every gradient is alive.

    ``anchor_init=True``: mmcv's ``reset_parameters``.  conv_mask: Kaiming
    normal, fan_in mode, gain sqrt(2) (weight N(0, 2/C)), bias 0; the last
    conv of each transform zero (weight and bias), so the block starts as
    the identity; the first conv keeps PyTorch's default U(±1/sqrt(C)) for
    weight and bias, the LayerNorm γ = 1, β = 0.
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    ref = rng.standard_normal(1)  # a host float64 array: zeros_like_shape's template
    params: dict[str, Array] = {}
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        kind = module.rsplit(".", 1)[-1]  # conv_mask, conv1, ln, conv2
        if not anchor_init:
            if kind == "ln":
                value = (rng.uniform(0.5, 1.5, shape) if leaf == "weight"
                         else 0.1 * rng.standard_normal(shape))
            elif leaf == "weight":
                value = draw_weight(rng, shape)
            else:
                value = draw_bias(rng, shape)
        elif kind == "conv_mask":
            fan_in = math.prod(shapes[f"{module}.weight"][1:])
            value = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
                     if leaf == "weight" else zeros_like_shape(ref, shape))
        elif kind == "conv1":
            bound = 1.0 / math.sqrt(math.prod(shapes[f"{module}.weight"][1:]))
            value = rng.uniform(-bound, bound, shape)
        elif kind == "ln":
            value = zeros_like_shape(ref, shape) + (1.0 if leaf == "weight" else 0.0)
        else:  # conv2: last_zero_init
            value = zeros_like_shape(ref, shape)
        params[key] = value
    return params, {}


@checks.forward_entry("gc")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[dict[str, Array], GCCache]:
    """``gc.forward`` after checking every argument."""
    cfg = check_config(cfg)
    inputs = checks.check_inputs("gc", inputs, {"x": (4,)})
    x_shape = tuple(inputs["x"].shape)
    cfg = resolve(cfg, {"x": x_shape})
    shapes = param_shapes(cfg, {"x": x_shape})
    params, state = checks.check_params(
        "gc", params, state, shapes, inputs,
        f"pooling_type={cfg.pooling_type!r}, fusion_types={cfg.fusion_types!r}")
    return gc.forward(inputs, params, state, cfg)


@checks.backward_entry("gc")
def backward(douts: Any, cache: Any) -> tuple[dict[str, Array], dict[str, Array]]:
    """``gc.backward`` after checking the cotangent; dparams in the order of
    ``param_shapes``."""
    checks.check_cache("gc", cache, (GCCache,))
    checks.check_douts("gc", douts, shape=cache.x_shape, like=cache.x3)
    dinputs, dparams = gc.backward(douts, cache)
    order = param_shapes(cache.cfg, {"x": cache.x_shape})
    return dinputs, {k: dparams[k] for k in order}


def kink_margin(cache: GCCache) -> float:
    """Smallest relative distance of a ReLU input (the LayerNorm output of
    each transform) from 0; the block has no max and no other kink."""
    margin = math.inf
    for t in (cache.mul, cache.add):
        if t is not None:
            margin = min(margin, relu_margin(t.ln_out))
    return margin


@config_entry
def accumulation(cfg: GCConfig, input_shapes: Mapping[str, Shape]) -> dict[str, int]:
    """The longest chain of sums behind each tensor family.

    Forward: conv_mask (C), the softmax normaliser and the pool (L each;
    'avg': L), conv1 (C), the LayerNorm statistics (P), conv2 (P).  The
    backward adds conv2ᵀ (C), the LayerNorm's means (P), conv1ᵀ (P), the
    gate's Σ_L D ⊙ x (L), the softmax's Σ_L (L) and conv_maskᵀ; parameter
    gradients add the sum over the batch and, for conv_mask, the positions.
    """
    N, C, H, W = _x_shape(input_shapes)
    L = H * W
    P = int(resolve(cfg, input_shapes).planes)  # type: ignore[arg-type]
    att = cfg.pooling_type == "att"
    aux = (C + L) if att else 0
    context = aux + L
    forward_chain = context + C + 2 * P
    backward_chain = forward_chain + C + 2 * P + L + (L + C if att else 0)
    out = {
        "out": forward_chain,
        "grad.input": backward_chain,
        "grad.param": backward_chain + N * L,
    }
    if "channel_mul" in cfg.fusion_types:
        out["aux"] = forward_chain  # the gate σ(δ_mul(c))
    elif att:
        out["aux"] = aux  # the attention map
    return out


def anchor_names(
    preset: str | None, cfg: GCConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """Canonical key -> mmcv ``ContextBlock``'s state_dict key
    (tests/anchors/context_block.py): ``conv_mask.*`` as is; each branch's
    transform is
    ``channel_<b>_conv = Sequential(conv1, LayerNorm, ReLU, conv2)``, so
    ``<b>.conv1 -> <b>_conv.0``, ``<b>.ln -> <b>_conv.1``, ``<b>.conv2 ->
    <b>_conv.3``.  Every config is expressible (mmcv has every switch)."""
    if preset not in PRESETS:
        return {}
    index = {"conv1": "0", "ln": "1", "conv2": "3"}
    names: dict[str, str] = {}
    for key in param_shapes(cfg, input_shapes):
        module, leaf = key.rsplit(".", 1)
        if module == "conv_mask":
            names[key] = key
        else:
            branch, part = module.split(".")
            names[key] = f"{branch}_conv.{index[part]}.{leaf}"
    return names


@config_only
def with_bn_mode(cfg: GCConfig, mode: str) -> None:
    """No batch norm (the LayerNorm has no running statistics): None."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")


@config_only
def fixture_shapes(cfg: GCConfig) -> dict[str, Shape]:
    """x (2, C, 5, 7): odd, unequal H and W, and C the smallest of 16, 32, ...,
    256 that gives the bottleneck at least 4 channels (16 for ratio 1/4, 64
    for 1/16): with P = 1 the LayerNorm output is β alone and no gradient
    reaches conv1 or the context."""
    C = 16
    while C < 256 and planes_of(cfg, C) < 4:
        C *= 2
    return {"x": (2, C, 5, 7)}


@config_entry
def flops(cfg: GCConfig, input_shapes: Mapping[str, Shape]) -> int:
    """conv_mask and the attention pool (2·N·C·L each, 'att'), and per fusion
    branch the two bottleneck convs on the context (2·N·C·P each)."""
    N, C, H, W = _x_shape(input_shapes)
    P = int(resolve(cfg, input_shapes).planes)  # type: ignore[arg-type]
    att = 2 * 2 * N * C * H * W if cfg.pooling_type == "att" else 0
    return att + len(branches(cfg)) * 2 * 2 * N * C * P


SPECS = module_specs(
    __name__,
    summary="global context block (Cao et al. 2019, GCNet; mmcv ContextBlock): "
    "attention or average pooling, channel add and/or mul fusion",
    config_cls=GCConfig,
    default_preset="mmcv",
    bench=BenchCase("mmcv", {}, {"x": (8, 256, 28, 28)},
                    "x(8,256,28,28) att pooling, channel_add, ratio 1/4"),
    figure=("draw_gc", (10.0, 4.2)),
    anchors={p: f"context_block:make_{p}" for p in PRESETS},
)
