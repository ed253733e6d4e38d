"""The ``mlpconv`` and ``nin_head`` blocks' specs: checked entry points and
the tools' fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


from refattn import backend, checks
from refattn._typing import Array, ArrayDict, Params, Shape
from refattn.blocks import mlpconv
from refattn.blocks.mlpconv import (
    MLPCONV_PRESETS,
    NIN_HEAD_PRESETS,
    MlpconvCache,
    MlpconvConfig,
    NinHeadCache,
    NinHeadConfig,
)
from refattn.blocks.spec import BenchCase, BlockSpec, draw_param, relu_margin
from refattn.blocks.specs.conv1x1 import out_hw, x_shape
from refattn.ops.conv import _conv2d, _pointwise_conv, conv2d_out_shape, pair

RULES: dict[str, checks.Rule] = {
    "channels": checks.Choices(item=checks.Int(1), unique=False,
                               what="a non-empty tuple of ints (one per conv)"),
    "kernel_size": checks.Pair(1),
    "stride": checks.Pair(1),
    "padding": checks.Pair(0),
    "dilation": checks.Pair(1),
    "groups": checks.Int(1),
    "relu_last": checks.Bool(),
    "bias": checks.Bool(),
}


def _groups_divide_first(cfg: MlpconvConfig) -> str | None:
    if cfg.channels[0] % cfg.groups:
        return (f"channels[0] ({cfg.channels[0]}) must be divisible by groups "
                f"({cfg.groups}): groups apply to the first conv")
    return None


def check_mlpconv_config(cfg: Any) -> MlpconvConfig:
    if isinstance(cfg, NinHeadConfig):  # a subclass, but another block's config
        raise TypeError("cfg: expected a MlpconvConfig (the mlpconv config), got a "
                        "NinHeadConfig (the nin_head config)")
    return checks.check_config("mlpconv", cfg, MlpconvConfig, RULES,
                               [_groups_divide_first])


def check_nin_head_config(cfg: Any) -> NinHeadConfig:
    return checks.check_config("nin_head", cfg, NinHeadConfig, RULES,
                               [_groups_divide_first])


def _check_either(cfg: Any) -> MlpconvConfig:
    return check_nin_head_config(cfg) if isinstance(cfg, NinHeadConfig) \
        else check_mlpconv_config(cfg)


config_entry = checks.config_entry(_check_either, shapes=True)


def _block(cfg: MlpconvConfig) -> str:
    return "nin_head" if isinstance(cfg, NinHeadConfig) else "mlpconv"


def _geometry(cfg: MlpconvConfig) -> tuple[tuple[int, int], ...]:
    return tuple(pair(getattr(cfg, name))
                 for name in ("kernel_size", "stride", "padding", "dilation"))


_FIXTURE_INPUTS: dict[tuple[int, ...], tuple[int, int, int]] = {
    (192, 160, 96): (3, 8, 8),  # nin_cifar_1: an RGB image (32x32 cut to 8x8)
    (192, 192, 10): (192, 8, 8),  # NIN_CIFAR_HEAD: the 8x8 maps of the 3rd stage
    (16, 16, 10): (8, 6, 6),  # the default nin_head
}


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


@config_entry
def param_shapes(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """``convs.{i}.weight`` and (with ``bias``) ``convs.{i}.bias`` per conv."""
    _, c, h, w = x_shape(_block(cfg), input_shapes)
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
    return checks.limit_sizes(_block(cfg), shapes)


@config_entry
def init_params(cfg: MlpconvConfig, input_shapes: Mapping[str, Shape], *, seed: int,
                anchor_init: bool = False) -> tuple[Params, Params]:
    """Random N(0, 1/fan_in) weights and N(0, 0.1²) biases; ``anchor_init``:
    nn.Conv2d's default uniform init (the PyTorch port of NIN).  No buffers."""
    shapes = param_shapes(cfg, input_shapes)
    rng = backend.host_rng(seed)
    scheme = "torch" if anchor_init else "random"
    return {key: draw_param(rng, key, shapes, scheme) for key in shapes}, {}


def _check_arguments(block: str, cfg: MlpconvConfig, inputs: Any, params: Any,
                     state: Any) -> tuple[ArrayDict, ArrayDict]:
    inputs = checks.check_inputs(block, inputs, {"x": 4})
    shapes = param_shapes(cfg, {"x": tuple(inputs["x"].shape)})
    params, _ = checks.check_params(
        block, params, state, shapes, inputs,
        f"{len(cfg.channels)} convs, bias={cfg.bias}")
    return inputs, params


@checks.forward_entry("mlpconv")
def mlpconv_forward(inputs: Any, params: Any, state: Any, cfg: Any
                    ) -> tuple[ArrayDict, MlpconvCache]:
    """``mlpconv.mlpconv_forward`` after checking every argument."""
    cfg = check_mlpconv_config(cfg)
    inputs, params = _check_arguments("mlpconv", cfg, inputs, params, state)
    return mlpconv.mlpconv_forward(inputs, params, {}, cfg)


@checks.backward_entry("mlpconv")
def mlpconv_backward(douts: Any, cache: Any
                     ) -> tuple[ArrayDict, ArrayDict]:
    """``mlpconv.mlpconv_backward`` after checking the cotangent."""
    checks.check_cache("mlpconv", cache, (MlpconvCache,))
    last = cache.convs[-1]
    shape = conv2d_out_shape(last) if len(cache.convs) == 1 else \
        (last.x_shape[0], last.weight.shape[0], *last.x_shape[2:])
    checks.check_douts("mlpconv", douts, shape=shape, like=cache.x)
    return mlpconv.mlpconv_backward(douts, cache)


@checks.forward_entry("nin_head")
def nin_head_forward(inputs: Any, params: Any, state: Any, cfg: Any
                     ) -> tuple[ArrayDict, NinHeadCache]:
    """``mlpconv.nin_head_forward`` after checking every argument."""
    cfg = check_nin_head_config(cfg)
    inputs, params = _check_arguments("nin_head", cfg, inputs, params, state)
    return mlpconv.nin_head_forward(inputs, params, {}, cfg)


@checks.backward_entry("nin_head")
def nin_head_backward(douts: Any, cache: Any
                      ) -> tuple[ArrayDict, ArrayDict]:
    """``mlpconv.nin_head_backward`` after checking the cotangent."""
    checks.check_cache("nin_head", cache, (NinHeadCache,))
    checks.check_douts("nin_head", douts, shape=cache.pool.x_shape[:2],
                       like=cache.stack.x)
    return mlpconv.nin_head_backward(douts, cache)


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
    return min((relu_margin(z) for z in _pre_activations(stack)), default=math.inf)


def _chain_lengths(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> tuple[int, int, int, int]:
    """(forward, dx, dparam) accumulation lengths of the stack, and Ho·Wo."""
    n, c, h, w = x_shape(_block(cfg), input_shapes)
    ho, wo = _out_hw(cfg, h, w)
    (kh, kw), *_ = _geometry(cfg)
    b = int(cfg.bias)
    fwd = c // cfg.groups * kh * kw + b + sum(ci + b for ci in cfg.channels[:-1])
    back = sum(cfg.channels[1:])  # the transposed 1x1 products
    dx = back + cfg.channels[0] // cfg.groups * kh * kw  # + col2im overlaps
    dparam = back + n * ho * wo  # sums over (n, positions) after the chain
    return fwd, dx, dparam, ho * wo


@config_entry
def accumulation(
    cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """Lengths of the sums chained behind each tensor family."""
    fwd, dx, dparam, _ = _chain_lengths(cfg, input_shapes)
    return {"out": fwd, "grad.input": dx, "grad.param": dparam}


@config_entry
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


@config_entry
def flops(cfg: MlpconvConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The k x k conv, 2·N·Ho·Wo·C1·(C/G)·KH·KW, and each 1x1 conv after it,
    2·N·Ho·Wo·C_{i+1}·C_i."""
    N, C, H, W = x_shape(_block(cfg), input_shapes)
    (kh, kw) = pair(cfg.kernel_size)
    Ho, Wo = out_hw(cfg.stride, cfg.padding, H, W, cfg.kernel_size, cfg.dilation)
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
        diagram="mlpconv",
        summary="Network-in-Network mlpconv: k x k conv + ReLU, then 1x1 convs + ReLU",
        config_cls=MlpconvConfig,
        presets=MLPCONV_PRESETS,
        default_preset="nin_cifar_1",
        forward=mlpconv_forward,
        backward=mlpconv_backward,
        check_config=check_mlpconv_config,
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
        check_config=check_nin_head_config,
        accumulation=nin_head_accumulation,
        figure=("draw_class_maps", (11.0, 4.5)),
        anchors={None: "simple:make_nin_head"},
        **_common(),
    ),
}
