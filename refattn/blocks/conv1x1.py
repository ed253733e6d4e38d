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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from refattn._typing import ArrayDict, Arrays
from refattn.ops.conv import Conv2dCache, _conv2d, _conv2d_backward, pair

__all__ = ["PRESETS", "Conv1x1Cache", "Conv1x1Config", "backward", "forward"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Conv1x1Config:
    """Canonical keys of ``conv1x1`` (blocks.md 9.2).

    No anchor presets: the defaults are a small generic case (6 output
    channels, stride 1, no padding, one group, with bias).
    """

    out_channels: int = 6  # O
    stride: int | tuple[int, int] = 1  # s, or (s_h, s_w)
    padding: int | tuple[int, int] = 0  # p, or (p_h, p_w): zeros on each border
    groups: int = 1  # G: output block k reads input block k only
    bias: bool = True


PRESETS: dict[str, Conv1x1Config] = {}


class Conv1x1Cache(NamedTuple):
    conv: Conv2dCache  # x as (N, C, Ho*Wo) after padding and striding, and W
    has_bias: bool


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: Conv1x1Config
            ) -> tuple[ArrayDict, Conv1x1Cache]:
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
    x = inputs["x"]
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


def backward(douts: Arrays, cache: Conv1x1Cache) -> tuple[ArrayDict, ArrayDict]:
    """VJP of the 1x1 convolution.

    Math:
        db[o]        = Σ_{n,i,j} dy[n, o, i, j]
        dW[o, c']    = Σ_{n,i,j} dy[n, o, i, j] · xpad[n, c, s_h·i, s_w·j]
        dxpad[n, c, s_h·i, s_w·j] = Σ_{o ∈ block(c)} W[o, c'] · dy[n, o, i, j],
        0 at the positions the stride skips; dx = dxpad without its border
    Shapes:
        dout (N, O, Ho, Wo); dx (N, C, H, W); dweight (O, C/G, 1, 1); dbias (O,)
    """
    # 1. channel mixing, striding and padding, reversed
    dx, dweight, dbias = _conv2d_backward(douts["out"], cache.conv)  # (N, C, H, W)
    dparams = {"weight": dweight}
    if cache.has_bias:
        dparams["bias"] = dbias
    return {"x": dx}, dparams
