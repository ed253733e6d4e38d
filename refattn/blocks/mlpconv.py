"""MLPConv (Network in Network) and the NIN head: a k x k convolution followed
by 1x1 convolutions, each with a ReLU; the head pools the last one globally.

Lin, Chen and Yan, "Network In Network", ICLR 2014 (arXiv:1312.4400),
equation (2) and section 3.2.  An mlpconv layer with L convolutions computes,
at every position (i, j),

    f^1_{i,j,k1} = max(w^1_{k1}ᵀ x_{i,j} + b_{k1}, 0)         x_{i,j}: the k x k patch
    f^n_{i,j,kn} = max(w^n_{kn}ᵀ f^{n-1}_{i,j} + b_{kn}, 0)   n = 2 .. L

(a multilayer perceptron slid over the image; the layers n >= 2 are the 1x1
"cccp" convolutions of the Caffe / cuda-convnet model definitions).  The NIN
head is an mlpconv whose last layer has one channel per class, followed by
global average pooling: logit_k = mean_{i,j} f^L_{i,j,k}.  In the original
Caffe model the class layer is still followed by a ReLU (``relu_last``), so
the pooled logits are >= 0.

| paper | code |
|---|---|
| w^n, b^n | ``convs.{n-1}.weight``, ``convs.{n-1}.bias`` |
| k x k patch of layer 1 | ``kernel_size``, ``stride``, ``padding``, ``dilation``, |
| | ``groups`` (first conv only) |
| number of feature maps of layer n | ``channels[n-1]`` |
| f^L (class maps, NIN head) | ``outputs["aux.class_maps"]`` |
| ReLU after layer L | ``relu_last`` |

Parameters: ``convs.0.weight (C0, Cin/G, KH, KW)``, ``convs.{i}.weight
(Ci, C(i-1), 1, 1)`` for i >= 1, ``convs.{i}.bias (Ci,)`` with ``bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from refattn._typing import Array, ArrayDict, Arrays
from refattn.ops.conv import (Conv2dCache, PointwiseConvCache, _conv2d,
                              _conv2d_backward, _pointwise_conv,
                              _pointwise_conv_backward, pair)
from refattn.ops.elementwise import ReluCache, _relu, _relu_backward
from refattn.ops.pool import GlobalPoolCache, _global_pool, _global_pool_backward

__all__ = ["MLPCONV_PRESETS", "NIN_CIFAR_HEAD", "NIN_HEAD_PRESETS", "MlpconvCache",
           "MlpconvConfig", "NinHeadCache", "NinHeadConfig", "mlpconv_backward",
           "mlpconv_forward", "nin_head_backward", "nin_head_forward"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MlpconvConfig:
    """Canonical keys of ``mlpconv`` (blocks.md 9.2); ``nin_head`` has the same.

    ``channels`` lists the output channels of every conv (L = its length);
    kernel_size, stride, padding, dilation and groups apply to the first conv
    only, the others are 1x1 with stride 1.
    """

    channels: tuple[int, ...]
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    relu_last: bool = True
    bias: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class NinHeadConfig(MlpconvConfig):
    """Canonical keys of ``nin_head``: those of mlpconv; the number of classes
    is ``channels[-1]``.  The defaults are a small head (3x3 conv to 16, 1x1
    to 16, 1x1 to 10 classes); ``NIN_CIFAR_HEAD`` is the CIFAR-10 NIN's."""

    channels: tuple[int, ...] = (16, 16, 10)
    kernel_size: int | tuple[int, int] = 3
    padding: int | tuple[int, int] = 1


MLPCONV_PRESETS: dict[str, MlpconvConfig] = {
    # The first mlpconv of the CIFAR-10 NIN (input 3 x 32 x 32), blocks.md 9.3.
    "nin_cifar_1": MlpconvConfig(
        channels=(192, 160, 96), kernel_size=5, stride=1, padding=2, dilation=1,
        groups=1, relu_last=True, bias=True,
    ),
}

# The third mlpconv of the CIFAR-10 NIN (input 192 x 8 x 8) with its global
# average pool: 3x3 conv to 192, 1x1 to 192, 1x1 to the 10 classes, every conv
# followed by ReLU as in the Caffe model (relu "cccp6" included).  Not a named
# preset: its 0.33M weights (and their gradients) would make one fixture case
# 13 MB, beyond the committed golden set's budget; generate it on demand with
#   refattn golden --block nin_head --set channels=[192,192,10] --set kernel_size=3
#                  --set padding=1 --shape x=2,192,8,8
NIN_CIFAR_HEAD = NinHeadConfig(
    channels=(192, 192, 10), kernel_size=3, stride=1, padding=1, dilation=1,
    groups=1, relu_last=True, bias=True,
)

NIN_HEAD_PRESETS: dict[str, NinHeadConfig] = {}


class MlpconvCache(NamedTuple):
    convs: tuple[Conv2dCache | PointwiseConvCache, ...]  # one per conv
    relus: tuple[ReluCache | None, ...]  # None: the last conv without relu_last
    has_bias: bool
    # kink_margin recomputes the pre-activations from these (references only)
    x: Array
    params: Mapping[str, Array]
    cfg: MlpconvConfig


def _relu_after(i: int, cfg: MlpconvConfig) -> bool:
    return i < len(cfg.channels) - 1 or cfg.relu_last


def _stack_forward(
    x: Array, params: Mapping[str, Array], cfg: MlpconvConfig
) -> tuple[Array, MlpconvCache]:
    """The mlpconv stack on validated arrays (steps 1 and 2)."""
    convs: list[Conv2dCache | PointwiseConvCache] = []
    relus: list[ReluCache | None] = []
    # 1. the spatial k x k conv (stride, padding, dilation, groups), then ReLU
    f, conv = _conv2d(
        x,
        params["convs.0.weight"],
        params.get("convs.0.bias"),
        pair(cfg.stride),
        pair(cfg.padding),
        pair(cfg.dilation),
        cfg.groups,
    )  # (N, C0, Ho, Wo)
    convs.append(conv)
    f, relu = _relu(f) if _relu_after(0, cfg) else (f, None)
    relus.append(relu)
    # 2. the 1x1 "cccp" convs, a per-position MLP: each one matmul over
    #    (N, C, Ho*Wo), then ReLU (after the last conv only with relu_last)
    for i in range(1, len(cfg.channels)):
        f, conv = _pointwise_conv(
            f, params[f"convs.{i}.weight"], params.get(f"convs.{i}.bias"), 1
        )  # (N, Ci, Ho, Wo)
        convs.append(conv)
        f, relu = _relu(f) if _relu_after(i, cfg) else (f, None)
        relus.append(relu)
    cache = MlpconvCache(tuple(convs), tuple(relus), cfg.bias, x, dict(params), cfg)
    return f, cache


def _stack_backward(df: Array, cache: MlpconvCache) -> tuple[Array, dict[str, Array]]:
    """Steps 2 and 1 reversed; dparams ordered like the parameters."""
    grads: dict[int, tuple[Array, Array | None]] = {}
    # 2. the 1x1 convs, last to first: ReLU mask, then the transposed matmul
    for i in range(len(cache.convs) - 1, 0, -1):
        if cache.relus[i] is not None:
            df = _relu_backward(df, cache.relus[i])  # (N, Ci, Ho, Wo)
        df, dw, db = _pointwise_conv_backward(df, cache.convs[i])  # (N, C(i-1), Ho, Wo)
        grads[i] = (dw, db)
    # 1. the spatial conv: ReLU mask, then col2im of the transposed product
    if cache.relus[0] is not None:
        df = _relu_backward(df, cache.relus[0])  # (N, C0, Ho, Wo)
    dx, dw, db = _conv2d_backward(df, cache.convs[0])  # (N, Cin, H, W)
    grads[0] = (dw, db)
    dparams: dict[str, Array] = {}
    for i in range(len(cache.convs)):
        dparams[f"convs.{i}.weight"] = grads[i][0]
        if cache.has_bias:
            dparams[f"convs.{i}.bias"] = grads[i][1]
    return dx, dparams


def mlpconv_forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: MlpconvConfig
                    ) -> tuple[ArrayDict, MlpconvCache]:
    """An mlpconv layer: k x k conv + ReLU, then L-1 (1x1 conv + ReLU).

    Math:
        f0 = relu(conv_{k x k}(x; W0, b0))            stride, padding, dilation, groups
        fi = relu(Wi · f(i-1) + bi)   at every position, i = 1 .. L-1
        (the last ReLU only with relu_last)
    Shapes:
        x                (N, Cin, H, W)
        convs.0.weight   (C0, Cin/G, KH, KW);  convs.i.weight (Ci, C(i-1), 1, 1)
        convs.i.bias     (Ci,)
        out              (N, C(L-1), Ho, Wo)
    """
    out, cache = _stack_forward(inputs["x"], params, cfg)  # (N, C(L-1), Ho, Wo)
    return {"out": out}, cache


def mlpconv_backward(douts: Arrays, cache: MlpconvCache) -> tuple[ArrayDict, ArrayDict]:
    """VJP of mlpconv: the chain of ReLU and conv VJPs, last layer first.

    Math:
        dzi     = dfi ⊙ 1[zi > 0]            zi = conv i's output (no mask after
                                             the last conv without relu_last)
        df(i-1) = Wiᵀ dzi;  dWi = Σ_{n,p} dzi f(i-1)ᵀ;  dbi = Σ_{n,p} dzi
        dx      = col2im(W0ᵀ dz0)                  the adjoint of the first conv
    Shapes:
        dout (N, C(L-1), Ho, Wo); dx (N, Cin, H, W); dparams like params
    Convention:
        relu'(0) = 0.
    """
    dx, dparams = _stack_backward(douts["out"], cache)  # (N, Cin, H, W)
    return {"x": dx}, dparams


class NinHeadCache(NamedTuple):
    stack: MlpconvCache
    pool: GlobalPoolCache  # the class maps' shape


def nin_head_forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: MlpconvConfig
                     ) -> tuple[ArrayDict, NinHeadCache]:
    """The NIN classifier: an mlpconv whose last conv has one channel per
    class, then global average pooling.

    Math:
        M          = mlpconv(x)                    class maps (steps 1, 2)
        logit[n,k] = (1/(Ho·Wo)) Σ_{i,j} M[n, k, i, j]
    Shapes:
        x                  (N, Cin, H, W)
        aux.class_maps     (N, K, Ho, Wo)          K = channels[-1] classes
        out                (N, K)
    """
    maps, stack = _stack_forward(inputs["x"], params, cfg)  # (N, K, Ho, Wo)
    # 3. global average pooling of each class map: the logits
    logits, pool = _global_pool(maps, "avg", False)  # (N, K)
    return {"out": logits, "aux.class_maps": maps}, NinHeadCache(stack, pool)


def nin_head_backward(douts: Arrays, cache: NinHeadCache
                      ) -> tuple[ArrayDict, ArrayDict]:
    """VJP of the NIN head.

    Math:
        dM[n, k, i, j] = dlogit[n, k] / (Ho·Wo)    then the mlpconv VJP
    Shapes:
        dout (N, K); dx (N, Cin, H, W); dparams like params
    Convention:
        relu'(0) = 0.
    """
    # 3. the pool spreads each logit's gradient evenly over its class map
    dmaps = _global_pool_backward(douts["out"], cache.pool)  # (N, K, Ho, Wo)
    dx, dparams = _stack_backward(dmaps, cache.stack)  # (N, Cin, H, W)
    return {"x": dx}, dparams
