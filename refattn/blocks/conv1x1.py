"""The 1x1 convolution: a linear layer applied at every position.

Lin, Chen and Yan, "Network In Network", ICLR 2014 (arXiv:1312.4400), where
the cross-channel parametric pooling ("cccp") layer is a 1x1 convolution;
used for dimensionality reduction by Szegedy et al., "Going Deeper with
Convolutions", CVPR 2015.

Math (blocks.md section 1), groups G, stride s, zero padding p:

    y[n, o, p] = b[o] + sum_{c in group(o)} W[o, c', 0, 0] · x_pad[n, c, s·p]

Output channel block k (O/G channels) reads input block k (C/G channels), c'
is c's index inside its block; Ho = floor((H + 2p - 1) / s) + 1.  With s = 1,
p = 0, G = 1 this is ``y[n, :, p] = W x[n, :, p] + b``: one (O, C) matrix
applied to every position.  Positions the stride skips get no gradient;
padded border positions output the bias alone.

| paper / blocks.md | code |
|---|---|
| W (O, C/G, 1, 1) | ``weight`` |
| b (O,) | ``bias`` (present iff ``cfg.bias``) |
| x, y | ``inputs["x"]``, ``outputs["out"]`` |
| s, p, G | ``cfg.stride``, ``cfg.padding``, ``cfg.groups`` |

This module also holds the array validation every block of this family
(conv1x1, gap, mlpconv, nin_head) runs on its inputs and parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from refattn import backend
from refattn._typing import Array, Shape
from refattn.blocks.spec import (
    BenchCase,
    BlockSpec,
    check_bool,
    check_douts,
    check_inputs,
    check_int,
    check_pair,
    check_params,
    draw_bias,
    draw_weight,
    pair,
    torch_default_init,
)
from refattn.ops.conv import Conv2dCache, _conv2d, conv2d_backward

if TYPE_CHECKING:  # host-side draws only; blocks compute through xp
    import numpy as np

__all__ = [
    "PRESETS",
    "SPECS",
    "Conv1x1Cache",
    "Conv1x1Config",
    "accumulation",
    "anchor_names",
    "backward",
    "fixture_shapes",
    "forward",
    "init_params",
    "kink_margin",
    "param_shapes",
    "with_bn_mode",
]


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class Conv1x1Config:
    """Canonical keys of ``conv1x1`` (blocks.md 9.2).

    No anchor presets: the defaults are a small generic case (6 output
    channels, stride 1, no padding, one group, with bias).
    """

    out_channels: int = 6
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    groups: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        check_int("out_channels", self.out_channels, 1)
        check_pair(self, "stride", 1)
        check_pair(self, "padding", 0)
        check_int("groups", self.groups, 1)
        check_bool("bias", self.bias)
        if self.out_channels % self.groups:
            raise ValueError(
                f"out_channels ({self.out_channels}) must be divisible by "
                f"groups ({self.groups})"
            )

    def resolved(self, input_shapes: Mapping[str, Shape]) -> Conv1x1Config:
        """Nothing defaults from the input: the config itself."""
        return self


PRESETS: dict[str, Conv1x1Config] = {}


# ---------------------------------------------------------------------------
# shapes and parameters


def fixture_shapes(cfg: Conv1x1Config) -> dict[str, Shape]:
    """x (2, C, 5, 7): C = the smallest multiple of groups >= 4; odd H and W,
    so a stride of 2 keeps both border rows and columns (5 -> 3, 7 -> 4) and
    skips every odd position."""
    c = cfg.groups * max(1, -(-4 // cfg.groups))
    return {"x": (2, c, 5, 7)}


def _x_shape(block: str, input_shapes: Mapping[str, Shape]) -> Shape:
    if "x" not in input_shapes:
        raise ValueError(f"input_shapes: {block} needs 'x', got {sorted(input_shapes)}")
    shape = tuple(int(s) for s in input_shapes["x"])
    if len(shape) != 4:
        raise ValueError(f"x: expected shape (N, C, H, W) for {block}, got {shape}")
    return shape


def param_shapes(
    cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """``weight (O, C/G, 1, 1)`` and, with ``bias``, ``bias (O,)``."""
    _, c, _, _ = _x_shape("conv1x1", input_shapes)
    if c % cfg.groups:
        raise ValueError(
            f"input channels C = x.shape[1] ({c}) must be divisible by "
            f"groups ({cfg.groups})"
        )
    o = cfg.out_channels
    shapes: dict[str, Shape] = {"weight": (o, c // cfg.groups, 1, 1)}
    if cfg.bias:
        shapes["bias"] = (o,)
    return shapes


def init_params(
    cfg: Conv1x1Config,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random N(0, 1/fan_in) weight and N(0, 0.1²) bias; ``anchor_init``:
    nn.Conv2d's default uniform init.  No buffers."""
    shapes = param_shapes(cfg, input_shapes)
    rng = backend.host_rng(seed)
    if anchor_init:
        w, b = torch_default_init(rng, shapes["weight"], cfg.bias)
    else:
        w = draw_weight(rng, shapes["weight"])
        b = draw_bias(rng, shapes["bias"]) if cfg.bias else None
    params = {"weight": w}
    if b is not None:
        params["bias"] = b
    return params, {}


# ---------------------------------------------------------------------------
# validation shared by conv1x1, gap, mlpconv and nin_head


# ---------------------------------------------------------------------------
# forward and backward


class Conv1x1Cache(NamedTuple):
    conv: Conv2dCache  # x as (N, C, Ho*Wo) after padding and striding, and W
    has_bias: bool


def forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: Conv1x1Config,
) -> tuple[dict[str, Array], Conv1x1Cache]:
    """1x1 convolution with stride, zero padding and groups.

    Math:
        y[n, o, i, j] = b[o] + Σ_{c ∈ group(o)} W[o, c'] · xpad[n, c, s_h i, s_w j]
        (W[o, c'] = weight[o, c', 0, 0]; c' = c's index in its block of C/G)
    Shapes:
        x       (N, C, H, W)
        weight  (O, C/G, 1, 1)
        bias    (O,)
        out     (N, O, Ho, Wo)    Ho = floor((H + 2p_h − 1)/s_h) + 1, likewise Wo
    """
    check_inputs("conv1x1", inputs, {"x": 4})
    x = inputs["x"]
    shapes = param_shapes(cfg, {"x": tuple(x.shape)})
    check_params("conv1x1", params, state, shapes, x, f" with bias={cfg.bias}")
    # 1. pad, subsample by the stride, mix channels: one (grouped) matmul
    out, conv = _conv2d(
        x,
        params["weight"],
        params.get("bias"),
        pair(cfg.stride),
        pair(cfg.padding),
        (1, 1),  # dilation
        cfg.groups,
    )  # (N, O, Ho, Wo)
    return {"out": out}, Conv1x1Cache(conv, cfg.bias)


def backward(
    douts: Mapping[str, Array], cache: Conv1x1Cache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """VJP of the 1x1 convolution.

    Math:
        db[o]        = Σ_{n,i,j} dy[n, o, i, j]
        dW[o, c']    = Σ_{n,i,j} dy[n, o, i, j] · xpad[n, c, s_h·i, s_w·j]
        dxpad[n, c, s_h·i, s_w·j] = Σ_{o ∈ block(c)} W[o, c'] · dy[n, o, i, j],
        0 at the positions the stride skips; dx = dxpad without its border
    Shapes:
        dout (N, O, Ho, Wo); dx (N, C, H, W); dweight (O, C/G, 1, 1); dbias (O,)
    """
    dout = check_douts("conv1x1", douts)
    # 1. channel mixing, striding and padding, reversed
    dx, dweight, dbias = conv2d_backward(dout, cache.conv)  # (N, C, H, W); checks dout
    dparams = {"weight": dweight}
    if cache.has_bias:
        dparams["bias"] = dbias
    return {"x": dx}, dparams


# ---------------------------------------------------------------------------
# the rest of the block contract


def kink_margin(cache: Conv1x1Cache) -> float:
    """A linear map: no kinks, no ties."""
    return float("inf")


def _out_hw(cfg: Conv1x1Config, h: int, w: int) -> tuple[int, int]:
    sh, sw = backend.as_tuple("stride", cfg.stride, 2, minimum=1)
    ph, pw = backend.as_tuple("padding", cfg.padding, 2)
    return (h + 2 * ph - 1) // sh + 1, (w + 2 * pw - 1) // sw + 1


def accumulation(
    cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """out: C/G products (+ the bias); dx: O/G products; dW, db: N·Ho·Wo."""
    n, c, h, w = _x_shape("conv1x1", input_shapes)
    ho, wo = _out_hw(cfg, h, w)
    return {
        "out": c // cfg.groups + int(cfg.bias),
        "grad.input": cfg.out_channels // cfg.groups,
        "grad.param": n * ho * wo,
    }


def anchor_names(
    preset: str | None, cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """``nn.Conv2d(C, O, 1, ...)`` uses the same names: weight, bias."""
    return {k: k for k in param_shapes(cfg, input_shapes)}


def with_bn_mode(cfg: Conv1x1Config, mode: str) -> None:
    """No batch norm: None."""


def flops(cfg: Conv1x1Config, input_shapes: Mapping[str, Shape]) -> int:
    """2·N·Ho·Wo·O·(C/G): one multiply-add per output element and input channel."""
    N, C, H, W = input_shapes["x"]
    (sh, sw), (ph, pw) = pair(cfg.stride), pair(cfg.padding)
    Ho, Wo = (H + 2 * ph - 1) // sh + 1, (W + 2 * pw - 1) // sw + 1
    return 2 * N * Ho * Wo * cfg.out_channels * (C // cfg.groups)


SPECS: dict[str, BlockSpec] = {
    "conv1x1": BlockSpec.of_module(
        __name__,
        name="conv1x1",
        summary="1x1 convolution (per-position linear layer) with stride, "
        "padding and groups",
        config_cls=Conv1x1Config,
        presets=PRESETS,
        default_preset=None,
        flops=flops,
        bench=BenchCase(None, {"out_channels": 128}, {"x": (8, 256, 28, 28)},
                        "x(8,256,28,28) -> 128, bias"),
        anchors={None: "simple:make_conv1x1"},
    ),
}
