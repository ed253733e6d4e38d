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
from typing import TYPE_CHECKING, Any, NamedTuple

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
    relu_margin,
    torch_default_init,
)
from refattn.ops.conv import (
    Conv2dCache,
    PointwiseConvCache,
    _conv2d,
    _conv2d_backward,
    _pointwise_conv,
    _pointwise_conv_backward,
    conv2d_backward,
    pointwise_conv_backward,
)
from refattn.ops.elementwise import ReluCache, _relu, _relu_backward, relu_backward
from refattn.ops.pool import GlobalPoolCache, _global_pool, global_pool_backward

if TYPE_CHECKING:  # host-side draws only; blocks compute through xp
    import numpy as np

__all__ = [
    "MLPCONV_PRESETS",
    "NIN_CIFAR_HEAD",
    "NIN_HEAD_PRESETS",
    "SPECS",
    "MlpconvCache",
    "MlpconvConfig",
    "NinHeadCache",
    "NinHeadConfig",
]


# ---------------------------------------------------------------------------
# config


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

    def __post_init__(self) -> None:
        channels = self.channels
        if isinstance(channels, list):
            channels = tuple(channels)
            object.__setattr__(self, "channels", channels)
        if not isinstance(channels, tuple) or not channels:
            raise ValueError(
                f"channels: expected a non-empty tuple of ints (one per conv), "
                f"got {self.channels!r}"
            )
        for i, c in enumerate(channels):
            check_int(f"channels[{i}]", c, 1)
        check_pair(self, "kernel_size", 1)
        check_pair(self, "stride", 1)
        check_pair(self, "padding", 0)
        check_pair(self, "dilation", 1)
        check_int("groups", self.groups, 1)
        check_bool("relu_last", self.relu_last)
        check_bool("bias", self.bias)
        if channels[0] % self.groups:
            raise ValueError(
                f"channels[0] ({channels[0]}) must be divisible by groups "
                f"({self.groups}): groups apply to the first conv"
            )

    def resolved(self, input_shapes: Mapping[str, Shape]) -> MlpconvConfig:
        """Nothing defaults from the input: the config itself."""
        return self


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
        channels=(192, 160, 96),
        kernel_size=5,
        stride=1,
        padding=2,
        dilation=1,
        groups=1,
        relu_last=True,
        bias=True,
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
    channels=(192, 192, 10),
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    groups=1,
    relu_last=True,
    bias=True,
)

NIN_HEAD_PRESETS: dict[str, NinHeadConfig] = {}


# ---------------------------------------------------------------------------
# shapes and parameters

_FIXTURE_INPUTS: dict[tuple[int, ...], tuple[int, int, int]] = {
    (192, 160, 96): (3, 8, 8),  # nin_cifar_1: an RGB image (32x32 cut to 8x8)
    (192, 192, 10): (192, 8, 8),  # NIN_CIFAR_HEAD: the 8x8 maps of the 3rd stage
    (16, 16, 10): (8, 6, 6),  # the default nin_head
}


def _geometry(cfg: MlpconvConfig) -> tuple[tuple[int, int], ...]:
    return tuple(
        backend.as_tuple(name, getattr(cfg, name), 2)
        for name in ("kernel_size", "stride", "padding", "dilation")
    )


def fixture_shapes(cfg: MlpconvConfig) -> dict[str, Shape]:
    """x (2, Cin, H, W): the presets' own input channels at 8x8 (matched by
    ``channels``); otherwise Cin = the smallest multiple of groups >= 3 and
    H x W = 6 x 5, enlarged when the first conv's kernel needs more."""
    (kh, kw), _, (ph, pw), (dh, dw) = _geometry(cfg)
    if cfg.channels in _FIXTURE_INPUTS:
        c, h, w = _FIXTURE_INPUTS[cfg.channels]
    else:
        c, h, w = cfg.groups * max(1, -(-3 // cfg.groups)), 6, 5
    h = max(h, dh * (kh - 1) + 1 - 2 * ph)
    w = max(w, dw * (kw - 1) + 1 - 2 * pw)
    return {"x": (2, c, h, w)}


def _x_shape(block: str, input_shapes: Mapping[str, Shape]) -> Shape:
    if "x" not in input_shapes:
        raise ValueError(f"input_shapes: {block} needs 'x', got {sorted(input_shapes)}")
    shape = tuple(int(s) for s in input_shapes["x"])
    if len(shape) != 4:
        raise ValueError(f"x: expected shape (N, C, H, W) for {block}, got {shape}")
    return shape


def _out_hw(cfg: MlpconvConfig, h: int, w: int) -> tuple[int, int]:
    """Output size of the first conv; ValueError when the kernel does not fit."""
    k, s, p, d = _geometry(cfg)
    out = []
    for axis, n, ki, si, pi, di in zip("HW", (h, w), k, s, p, d):
        span = di * (ki - 1) + 1
        if n + 2 * pi < span:
            raise ValueError(
                f"x: input {axis} + 2*padding ({n} + 2*{pi}) must be at least the "
                f"dilated kernel extent dilation*(kernel_size - 1) + 1 = {span}"
            )
        out.append((n + 2 * pi - span) // si + 1)
    return out[0], out[1]


def param_shapes(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """``convs.{i}.weight`` and (with ``bias``) ``convs.{i}.bias`` per conv."""
    _, c, h, w = _x_shape(_block(cfg), input_shapes)
    if c % cfg.groups:
        raise ValueError(
            f"input channels C = x.shape[1] ({c}) must be divisible by "
            f"groups ({cfg.groups})"
        )
    _out_hw(cfg, h, w)
    (kh, kw), *_ = _geometry(cfg)
    shapes: dict[str, Shape] = {}
    c_in = c // cfg.groups
    for i, c_out in enumerate(cfg.channels):
        shapes[f"convs.{i}.weight"] = (
            (c_out, c_in, kh, kw) if i == 0 else (c_out, c_in, 1, 1)
        )
        if cfg.bias:
            shapes[f"convs.{i}.bias"] = (c_out,)
        c_in = c_out
    return shapes


def init_params(
    cfg: MlpconvConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random N(0, 1/fan_in) weights and N(0, 0.1²) biases; ``anchor_init``:
    nn.Conv2d's default uniform init (the PyTorch port of NIN).  No buffers."""
    shapes = param_shapes(cfg, input_shapes)
    rng = backend.host_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i in range(len(cfg.channels)):
        wshape = shapes[f"convs.{i}.weight"]
        if anchor_init:
            w, b = torch_default_init(rng, wshape, cfg.bias)
        else:
            w = draw_weight(rng, wshape)
            b = draw_bias(rng, wshape[:1]) if cfg.bias else None
        params[f"convs.{i}.weight"] = w
        if b is not None:
            params[f"convs.{i}.bias"] = b
    return params, {}


def _block(cfg: MlpconvConfig) -> str:
    return "nin_head" if isinstance(cfg, NinHeadConfig) else "mlpconv"


def _check(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: MlpconvConfig,
) -> Array:
    block = _block(cfg)
    check_inputs(block, inputs, {"x": 4})
    x = inputs["x"]
    shapes = param_shapes(cfg, {"x": tuple(x.shape)})
    rule = f" with {len(cfg.channels)} convs and bias={cfg.bias}"
    check_params(block, params, state, shapes, x, rule)
    return x


# ---------------------------------------------------------------------------
# forward and backward


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
    """Steps 2 and 1 reversed; dparams ordered like the parameters.

    `df` enters the first op backward, the checked one, which checks its shape
    and dtype against the forward's output (the block's dout); the rest are
    the ops' math steps.
    """
    grads: dict[int, tuple[Array, Array | None]] = {}
    first = True  # df not yet checked
    # 2. the 1x1 convs, last to first: ReLU mask, then the transposed matmul
    for i in range(len(cache.convs) - 1, 0, -1):
        if cache.relus[i] is not None:
            relu_bw = relu_backward if first else _relu_backward
            df, first = relu_bw(df, cache.relus[i]), False  # (N, Ci, Ho, Wo)
        conv_bw = pointwise_conv_backward if first else _pointwise_conv_backward
        (df, dw, db), first = conv_bw(df, cache.convs[i]), False  # (N, C(i-1), Ho, Wo)
        grads[i] = (dw, db)
    # 1. the spatial conv: ReLU mask, then col2im of the transposed product
    if cache.relus[0] is not None:
        relu_bw = relu_backward if first else _relu_backward
        df, first = relu_bw(df, cache.relus[0]), False  # (N, C0, Ho, Wo)
    conv0_bw = conv2d_backward if first else _conv2d_backward
    dx, dw, db = conv0_bw(df, cache.convs[0])  # (N, Cin, H, W)
    grads[0] = (dw, db)
    dparams: dict[str, Array] = {}
    for i in range(len(cache.convs)):
        dparams[f"convs.{i}.weight"] = grads[i][0]
        if cache.has_bias:
            dparams[f"convs.{i}.bias"] = grads[i][1]
    return dx, dparams


def mlpconv_forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: MlpconvConfig,
) -> tuple[dict[str, Array], MlpconvCache]:
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
    x = _check(inputs, params, state, cfg)
    out, cache = _stack_forward(x, params, cfg)  # (N, C(L-1), Ho, Wo)
    return {"out": out}, cache


def mlpconv_backward(
    douts: Mapping[str, Array], cache: MlpconvCache
) -> tuple[dict[str, Array], dict[str, Array]]:
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
    dout = check_douts("mlpconv", douts)
    dx, dparams = _stack_backward(dout, cache)  # (N, Cin, H, W)
    return {"x": dx}, dparams


class NinHeadCache(NamedTuple):
    stack: MlpconvCache
    pool: GlobalPoolCache  # the class maps' shape


def nin_head_forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: MlpconvConfig,
) -> tuple[dict[str, Array], NinHeadCache]:
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
    x = _check(inputs, params, state, cfg)
    maps, stack = _stack_forward(x, params, cfg)  # (N, K, Ho, Wo)
    # 3. global average pooling of each class map: the logits
    logits, pool = _global_pool(maps, "avg", False)  # (N, K)
    return {"out": logits, "aux.class_maps": maps}, NinHeadCache(stack, pool)


def nin_head_backward(
    douts: Mapping[str, Array], cache: NinHeadCache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """VJP of the NIN head.

    Math:
        dM[n, k, i, j] = dlogit[n, k] / (Ho·Wo)    then the mlpconv VJP
    Shapes:
        dout (N, K); dx (N, Cin, H, W); dparams like params
    Convention:
        relu'(0) = 0.
    """
    dout = check_douts("nin_head", douts)
    # 3. the pool spreads each logit's gradient evenly over its class map
    dmaps = global_pool_backward(dout, cache.pool)  # (N, K, Ho, Wo); checks dout
    dx, dparams = _stack_backward(dmaps, cache.stack)  # (N, Cin, H, W)
    return {"x": dx}, dparams


# ---------------------------------------------------------------------------
# the rest of the block contract


def _pre_activations(cache: MlpconvCache) -> list[Array]:
    """Recompute every conv output that feeds a ReLU (for kink_margin); the
    conv inputs are x and the cached ReLU outputs."""
    c = cache.cfg
    pres = []
    f = cache.x
    for i, relu in enumerate(cache.relus):
        w, b = cache.params[f"convs.{i}.weight"], cache.params.get(f"convs.{i}.bias")
        if relu is None:
            break  # the last conv without relu_last: no kink
        if i == 0:
            z, _ = _conv2d(
                f, w, b, pair(c.stride), pair(c.padding), pair(c.dilation), c.groups
            )  # (N, C0, Ho, Wo)
        else:
            z, _ = _pointwise_conv(f, w, b, 1)  # (N, Ci, Ho, Wo)
        pres.append(z)
        f = relu.out
    return pres


def kink_margin(cache: MlpconvCache | NinHeadCache) -> float:
    """min over the ReLUs of relu_margin(pre-activation): min |z| / rms(z)."""
    stack = cache.stack if isinstance(cache, NinHeadCache) else cache
    return min((relu_margin(z) for z in _pre_activations(stack)), default=float("inf"))


def _chain_lengths(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> tuple[int, int, int, int]:
    """(forward, dx, dparam) accumulation lengths of the stack, and Ho·Wo."""
    n, c, h, w = _x_shape(_block(cfg), input_shapes)
    ho, wo = _out_hw(cfg, h, w)
    (kh, kw), *_ = _geometry(cfg)
    b = int(cfg.bias)
    fwd = c // cfg.groups * kh * kw + b + sum(ci + b for ci in cfg.channels[:-1])
    back = sum(cfg.channels[1:])  # the transposed 1x1 products
    dx = back + cfg.channels[0] // cfg.groups * kh * kw  # + col2im overlaps
    dparam = back + n * ho * wo  # sums over (n, positions) after the chain
    return fwd, dx, dparam, ho * wo


def accumulation(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """Lengths of the sums chained behind each tensor family."""
    fwd, dx, dparam, _ = _chain_lengths(cfg, input_shapes)
    return {"out": fwd, "grad.input": dx, "grad.param": dparam}


def nin_head_accumulation(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """The stack's lengths plus the pool's Ho·Wo positions (and 1 division back)."""
    fwd, dx, dparam, positions = _chain_lengths(cfg, input_shapes)
    return {
        "out": fwd + positions,
        "aux": fwd,
        "grad.input": dx + 1,
        "grad.param": dparam + 1,
    }


def anchor_names(
    preset: str | None, cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """The PyTorch port of NIN is one nn.Sequential (conv, ReLU, conv, ReLU,
    ...): conv i sits at index 2i, so ``convs.{i}.*`` -> ``{2i}.*``.  The NIN
    head appends its pooling and flattening to the same Sequential."""
    return {
        k: f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}"
        for k in param_shapes(cfg, input_shapes)
    }


def with_bn_mode(cfg: MlpconvConfig, mode: str) -> None:
    """No batch norm (the original NIN has none): None."""


def flops(cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The k x k conv, 2·N·Ho·Wo·C1·(C/G)·KH·KW, and each 1x1 conv after it,
    2·N·Ho·Wo·C_{i+1}·C_i."""
    N, C, H, W = input_shapes["x"]
    (kh, kw), (sh, sw) = pair(cfg.kernel_size), pair(cfg.stride)
    (ph, pw), (dh, dw) = pair(cfg.padding), pair(cfg.dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    chans = [C // cfg.groups * kh * kw, *cfg.channels]
    return sum(2 * N * Ho * Wo * a * b for a, b in zip(chans, chans[1:]))


def _common(**kwargs: Any) -> dict[str, Any]:
    return dict(
        fixture_shapes=fixture_shapes,
        param_shapes=param_shapes,
        init_params=init_params,
        kink_margin=kink_margin,
        anchor_names=anchor_names,
        with_bn_mode=with_bn_mode,
        **kwargs,
    )


SPECS: dict[str, BlockSpec] = {
    "mlpconv": BlockSpec(
        name="mlpconv",
        summary="Network-in-Network mlpconv: k x k conv + ReLU, then 1x1 convs + ReLU",
        config_cls=MlpconvConfig,
        presets=MLPCONV_PRESETS,
        default_preset="nin_cifar_1",
        forward=mlpconv_forward,
        backward=mlpconv_backward,
        accumulation=accumulation,
        flops=flops,
        bench=BenchCase("nin_cifar_1",
                        {"channels": (96, 96, 96), "kernel_size": 3, "padding": 1},
                        {"x": (8, 64, 32, 32)},
                        "x(8,64,32,32) 3x3->96, 1x1->96, 1x1->96, bias, ReLU after each"),
        anchors={"nin_cifar_1": "simple:make_mlpconv"},
        **_common(),
    ),
    "nin_head": BlockSpec(
        name="nin_head",
        summary="NIN classifier: mlpconv to one map per class, then global "
        "average pooling to logits",
        config_cls=NinHeadConfig,
        presets=NIN_HEAD_PRESETS,
        default_preset=None,
        forward=nin_head_forward,
        backward=nin_head_backward,
        accumulation=nin_head_accumulation,
        figure=("draw_class_maps", (11.0, 4.5)),
        anchors={None: "simple:make_nin_head"},
        **_common(),
    ),
}
