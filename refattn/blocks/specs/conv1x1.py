"""The ``conv1x1`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from refattn import backend, checks
from refattn._typing import ArrayDict, Params, Shape
from refattn.blocks import conv1x1
from refattn.blocks.conv1x1 import Conv1x1Cache, Conv1x1Config
from refattn.blocks.spec import BenchCase, draw_param, module_specs
from refattn.ops.conv import conv2d_out_shape, pair

RULES: dict[str, checks.Rule] = {
    "out_channels": checks.Int(1),
    "stride": checks.Pair(1),
    "padding": checks.Pair(0),
    "groups": checks.Int(1),
    "bias": checks.Bool(),
}


def _groups_divide_out(cfg: Conv1x1Config) -> str | None:
    if cfg.out_channels % cfg.groups:
        return (f"out_channels ({cfg.out_channels}) must be divisible by "
                f"groups ({cfg.groups})")
    return None


def check_config(cfg: Any) -> Conv1x1Config:
    return checks.check_config("conv1x1", cfg, Conv1x1Config, RULES,
                               [_groups_divide_out])


config_entry = checks.config_entry(check_config, shapes=True)


def fixture_shapes(cfg: Conv1x1Config) -> dict[str, Shape]:
    """x (2, C, 5, 7): C = the smallest multiple of groups >= 4; odd H and W,
    so a stride of 2 keeps both border rows and columns (5 -> 3, 7 -> 4) and
    skips every odd position."""
    c = cfg.groups * max(1, -(-4 // cfg.groups))
    return {"x": (2, c, 5, 7)}


def x_shape(block: str, input_shapes: Mapping[str, Shape]) -> Shape:
    """The 4-D shape of input x (conv1x1 and mlpconv)."""
    if "x" not in input_shapes:
        raise ValueError(f"input_shapes: {block} needs 'x', got {sorted(input_shapes)}")
    shape = tuple(input_shapes["x"])
    if len(shape) != 4:
        raise ValueError(f"x: expected shape (N, C, H, W) for {block}, got {shape}")
    return shape


@config_entry
def param_shapes(cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]
                 ) -> dict[str, Shape]:
    """``weight (O, C/G, 1, 1)`` and, with ``bias``, ``bias (O,)``."""
    _, c, _, _ = x_shape("conv1x1", input_shapes)
    if c % cfg.groups:
        raise ValueError(
            f"input channels C = x.shape[1] ({c}) must be divisible by "
            f"groups ({cfg.groups})"
        )
    o = cfg.out_channels
    shapes: dict[str, Shape] = {"weight": (o, c // cfg.groups, 1, 1)}
    if cfg.bias:
        shapes["bias"] = (o,)
    return checks.limit_sizes("conv1x1", shapes)


@config_entry
def init_params(cfg: Conv1x1Config, input_shapes: Mapping[str, Shape], *, seed: int,
                anchor_init: bool = False) -> tuple[Params, Params]:
    """Random N(0, 1/fan_in) weight and N(0, 0.1²) bias; ``anchor_init``:
    nn.Conv2d's default uniform init.  No buffers."""
    shapes = param_shapes(cfg, input_shapes)
    rng = backend.host_rng(seed)
    scheme = "torch" if anchor_init else "random"
    return {key: draw_param(rng, key, shapes, scheme) for key in shapes}, {}


@checks.forward_entry("conv1x1")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[ArrayDict, Conv1x1Cache]:
    """``conv1x1.forward`` after checking every argument."""
    cfg = check_config(cfg)
    inputs = checks.check_inputs("conv1x1", inputs, {"x": 4})
    shapes = param_shapes(cfg, {"x": tuple(inputs["x"].shape)})
    params, _ = checks.check_params("conv1x1", params, state, shapes, inputs,
                                       f"bias={cfg.bias}")
    return conv1x1.forward(inputs, params, {}, cfg)


@checks.backward_entry("conv1x1")
def backward(douts: Any, cache: Any) -> tuple[ArrayDict, ArrayDict]:
    """``conv1x1.backward`` after checking the cotangent against the forward."""
    checks.check_cache("conv1x1", cache, (Conv1x1Cache,))
    checks.check_douts("conv1x1", douts, shape=conv2d_out_shape(cache.conv),
                       like=cache.conv.weight)
    return conv1x1.backward(douts, cache)


def kink_margin(cache: Conv1x1Cache) -> float:
    """A linear map: no kinks, no ties."""
    return math.inf


def out_hw(stride: Any, padding: Any, h: int, w: int, k: Any = 1, dilation: Any = 1
           ) -> tuple[int, int]:
    """(Ho, Wo) of a k x k conv: floor((H + 2p − d(k − 1) − 1)/s) + 1."""
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    (kh, kw), (dh, dw) = pair(k), pair(dilation)
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


@config_entry
def accumulation(cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]
                 ) -> dict[str, int]:
    """out: C/G products (+ the bias); dx: O/G products; dW, db: N·Ho·Wo."""
    n, c, h, w = x_shape("conv1x1", input_shapes)
    ho, wo = out_hw(cfg.stride, cfg.padding, h, w)
    return {
        "out": c // cfg.groups + int(cfg.bias),
        "grad.input": cfg.out_channels // cfg.groups,
        "grad.param": n * ho * wo,
    }


def anchor_names(preset: str | None, cfg: Conv1x1Config,
                 input_shapes: Mapping[str, Shape]) -> dict[str, str]:
    """``nn.Conv2d(C, O, 1, ...)`` uses the same names: weight, bias."""
    return {k: k for k in param_shapes(cfg, input_shapes)}


def with_bn_mode(cfg: Conv1x1Config, mode: str) -> None:
    """No batch norm: None."""


@config_entry
def flops(cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]) -> int:
    """2·N·Ho·Wo·O·(C/G): one multiply-add per output element and input channel."""
    N, C, H, W = x_shape("conv1x1", input_shapes)
    Ho, Wo = out_hw(cfg.stride, cfg.padding, H, W)
    return 2 * N * Ho * Wo * cfg.out_channels * (C // cfg.groups)


SPECS = module_specs(
    __name__,
    summary="1x1 convolution (per-position linear layer) with stride, "
    "padding and groups",
    config_cls=Conv1x1Config,
    default_preset=None,
    bench=BenchCase(None, {"out_channels": 128}, {"x": (8, 256, 28, 28)},
                    "x(8,256,28,28) -> 128, bias"),
    anchors={None: "simple:make_conv1x1"},
)
