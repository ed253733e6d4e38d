"""The ``non_local`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from itertools import product
from typing import Any

from refattn import checks
from refattn._typing import Array, Shape
from refattn.backend import host_rng, namespace, prod, window, zeros_like_shape
from refattn.blocks import non_local
from refattn.blocks.non_local import (
    BN_MODES,
    MODES,
    POOL_KERNELS,
    POOL_POSITIONS,
    PRESETS,
    SCALE_CHANNELS,
    SOFTMAX_MODES,
    NonLocalCache,
    NonLocalConfig,
    _embedded,
    _key_count,
    _kv_names,
    _pooled,
)
from refattn.blocks.spec import (BenchCase, check_batch_statistics, draw_param,
                                 init_norm, max_gap, module_specs, relu_margin,
                                 single_x_shape, with_bn_field)
from refattn.params import is_buffer

RULES: dict[str, checks.Rule] = {
    "mode": checks.OneOf(MODES),
    "inter_channels": checks.Int(1, optional=True),
    "sub_sample": checks.Bool(),
    "pool_position": checks.OneOf(POOL_POSITIONS),
    "use_scale": checks.Bool(),
    "bias": checks.Bool(),
    "bn": checks.OneOf(BN_MODES),
    "bn_eps": checks.Real(positive=True),
    "bn_momentum": checks.Real(0.0, 1.0),
    "residual": checks.Bool(),
    "reduction": checks.Int(1),
    "divisor": checks.Int(1, optional=True),
    "value_channels": checks.Int(1, optional=True),
    "out_proj": checks.Bool(),
    "out_bias": checks.Bool(optional=True),
    "gamma": checks.Bool(),
    "scale_channels": checks.OneOf(SCALE_CHANNELS),
    "concat_bias": checks.Bool(),
}


def _scale_needs_softmax(cfg: NonLocalConfig) -> str | None:
    """The no-softmax modes normalise by the key count N_k, and a scale there
    would only rescale W (facebook's ``USE_SOFTMAX = False`` branch ignores
    ``USE_SCALE``; its faithful config is ``mode='dot_product',
    use_scale=False``)."""
    if cfg.use_scale and cfg.mode not in SOFTMAX_MODES:
        return (f"use_scale (True) applies to the softmax modes 'embedded_gaussian' "
                f"and 'gaussian' only; mode {cfg.mode!r} normalises by the key count "
                f"N_k (set use_scale=False)")
    return None


def _scale_channels_need_scale(cfg: NonLocalConfig) -> str | None:
    if cfg.scale_channels != "inter" and not cfg.use_scale:
        return (f"scale_channels ({cfg.scale_channels!r}) picks the width of the "
                f"affinity scale, which needs use_scale=True (got use_scale=False)")
    return None


def _concat_bias_needs_concatenation(cfg: NonLocalConfig) -> str | None:
    if cfg.concat_bias and cfg.mode != "concatenation":
        return (f"concat_bias (True) is the bias of concatenation's w_f; mode "
                f"{cfg.mode!r} has no w_f (set concat_bias=False)")
    return None


def _no_out_proj_means_no_w_z(cfg: NonLocalConfig) -> str | None:
    """Without W_z there is nothing for BN to follow and no W_z bias."""
    if not cfg.out_proj and cfg.bn is not None:
        return (f"bn ({cfg.bn!r}) normalises W_z's output, and out_proj=False "
                f"removes W_z (set bn=None)")
    if not cfg.out_proj and cfg.out_bias:
        return "out_bias (True) is W_z's bias, and out_proj=False removes W_z"
    return None


def check_config(cfg: Any) -> NonLocalConfig:
    return checks.check_config("non_local", cfg, NonLocalConfig, RULES, [
        _scale_needs_softmax, _scale_channels_need_scale,
        _concat_bias_needs_concatenation, _no_out_proj_means_no_w_z])


config_entry = checks.config_entry(check_config, shapes=True)
config_only = checks.config_entry(check_config)

def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    return single_x_shape("non_local", input_shapes)


def _check_input_shape(cfg: NonLocalConfig, x_shape: Shape) -> None:
    """Input-dependent rules: the sub-sampling pool needs >= 2 along pooled
    dims; without W_z, y (Cv channels) is added to x (C channels)."""
    if not cfg.out_proj and cfg.value_channels not in (None, x_shape[1]):
        raise ValueError(
            f"value_channels: out_proj=False adds y to x, so Cv must equal x's "
            f"C = {x_shape[1]}, got value_channels={cfg.value_channels}"
        )
    if not cfg.sub_sample:
        return
    spatial = x_shape[2:]
    kernel = POOL_KERNELS[len(spatial)]
    if any(s < k for s, k in zip(spatial, kernel)):
        raise ValueError(
            f"x: sub_sample=True pools with kernel = stride = {kernel} (floor "
            f"mode), which needs every pooled spatial dim >= 2, got spatial shape "
            f"{tuple(spatial)} (x shape {tuple(x_shape)})"
        )


@config_entry
def resolve(cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]) -> NonLocalConfig:
    """The config with every width and switch that depends on C filled in.

    ``inter_channels`` None -> ``max(C // reduction, 1)``, or with a
    ``divisor`` d, C / reduction rounded to the nearest multiple of d (at
    least d, and bumped by d when rounding lost more than 10 %: timm's
    ``make_divisible``); ``value_channels`` None -> Ci (C without W_z);
    ``out_bias`` None -> ``bias`` (False without W_z).
    """
    C = _x_shape(input_shapes)[1]
    ci = cfg.inter_channels
    if ci is None:
        ci = (max(C // cfg.reduction, 1) if cfg.divisor is None
              else make_divisible(C / cfg.reduction, cfg.divisor))
    cv = cfg.value_channels
    if cv is None:
        cv = ci if cfg.out_proj else C
    out_bias = (cfg.bias and cfg.out_proj) if cfg.out_bias is None else cfg.out_bias
    if (ci, cv, out_bias) == (cfg.inter_channels, cfg.value_channels, cfg.out_bias):
        return cfg
    return dataclasses.replace(cfg, inter_channels=ci, value_channels=cv,
                               out_bias=out_bias)


def make_divisible(width: float, divisor: int) -> int:
    """`width` rounded to the nearest multiple of `divisor` (halves up), at
    least `divisor`, plus one more `divisor` when the rounding lost over 10 %."""
    rounded = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * width else rounded


@config_entry
def param_shapes(
    cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """Every parameter and buffer key of `cfg` for these inputs, with its shape.

    Shapes:
        theta/phi.weight (Ci, C, *k), .bias (Ci,); g.weight (Cv, C, *k),
        .bias (Cv,); W.weight (C, Cv, *k), W.bias (C,); concat_project.weight
        (1, 2Ci, 1, 1), .bias (1,); W_bn.* (C,); gamma (1,); with
        k = (1,) * spatial rank.
    """
    x_shape = _x_shape(input_shapes)
    cfg = resolve(cfg, input_shapes)
    _check_input_shape(cfg, x_shape)
    C, ci = x_shape[1], int(cfg.inter_channels)  # type: ignore[arg-type]
    cv = int(cfg.value_channels)  # type: ignore[arg-type]
    ones = (1,) * (len(x_shape) - 2)
    shapes: dict[str, Shape] = {}
    for name in (("theta",) if _embedded(cfg) else ()) + _kv_names(cfg):
        width = cv if name == "g" else ci
        shapes[f"{name}.weight"] = (width, C) + ones
        if cfg.bias:
            shapes[f"{name}.bias"] = (width,)
    if cfg.mode == "concatenation":
        shapes["concat_project.weight"] = (1, 2 * ci, 1, 1)
        if cfg.concat_bias:
            shapes["concat_project.bias"] = (1,)
    if cfg.out_proj:
        shapes["W.weight"] = (C, cv) + ones
        if cfg.out_bias:
            shapes["W.bias"] = (C,)
    if cfg.bn is not None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"W_bn.{key}"] = (C,)
    if cfg.gamma:
        shapes["gamma"] = (1,)
    return checks.limit_sizes("non_local", shapes)


@config_entry
def init_params(
    cfg: NonLocalConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: the contract's random draws (``refattn.blocks.spec``) and the
    scalar γ in [0.5, 1.5], so that every gradient is alive.

    ``anchor_init=True``: the anchors' identity-at-init scheme.  Without scale
    (AlexHex7): PyTorch's default conv init U(±1/sqrt(fan_in)) for weights and
    biases; with scale (facebook, the CGNL repo): weights N(0, 0.01²) and
    biases 0.  Then BN gamma = beta = 0 (or, without BN, a zero W weight and
    bias; with a learned scalar, γ = 0) and running statistics (0, 1): the
    block is the identity and no gradient reaches theta, phi or g.
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    ref = rng.standard_normal(1)  # the fixtures' random stream begins with it
    scheme = "random" if not anchor_init else "small" if cfg.use_scale else "torch"
    params: dict[str, Array] = {}
    for key in (k for k in shapes if "." in k and not k.startswith("W_bn.")):
        zero_w = anchor_init and key.startswith("W.") and cfg.bn is None  # AlexHex7
        params[key] = draw_param(rng, key, shapes, "zeros" if zero_w else scheme)
    state: dict[str, Array] = {}
    if cfg.bn is not None:
        norm, state = init_norm(rng, "W_bn", shapes["W_bn.weight"][0],
                                identity=anchor_init)
        params |= norm
    if cfg.gamma:  # SAGAN's zero at init; else a scale in [0.5, 1.5]
        params["gamma"] = (zeros_like_shape(ref, (1,)) if anchor_init
                           else rng.uniform(0.5, 1.5, (1,)))
    return params, state


@checks.forward_entry("non_local")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[dict[str, Array], NonLocalCache]:
    """``non_local.forward`` after checking every argument."""
    cfg = check_config(cfg)
    inputs = checks.check_inputs("non_local", inputs, {"x": (3, 4, 5)})
    x_shape = tuple(inputs["x"].shape)
    cfg = resolve(cfg, {"x": x_shape})
    shapes = param_shapes(cfg, {"x": x_shape})
    params, state = checks.check_params(
        "non_local", params, state, shapes, inputs,
        f"mode={cfg.mode!r}, bias={cfg.bias}, bn={cfg.bn!r}")
    if cfg.bn == "train":
        check_batch_statistics(x_shape, "bn='train'", "W's output")
    return non_local.forward(inputs, params, state, cfg)


@checks.backward_entry("non_local")
def backward(douts: Any, cache: Any) -> tuple[dict[str, Array], dict[str, Array]]:
    """``non_local.backward`` after checking the cotangent; dparams in the
    order of ``param_shapes``."""
    checks.check_cache("non_local", cache, (NonLocalCache,))
    checks.check_douts("non_local", douts, shape=cache.x_shape, like=cache.attend.a)
    dinputs, dparams = non_local.backward(douts, cache)
    shapes = param_shapes(cache.cfg, {"x": cache.x_shape})
    order = [k for k in shapes if not is_buffer(k)]
    return dinputs, {k: dparams[k] for k in order}


def kink_margin(cache: NonLocalCache) -> float:
    """Smallest relative distance from a non-differentiable point.

    The gap between the max and the runner-up of every sub-sampling window (of
    whatever is pooled: phi|g rows after the projection, x before it, x|g in
    gaussian mode) and, in concatenation mode, |u_i + v_j| of every ReLU input.
    """
    margin = math.inf
    if cache.pooled is not None:
        xp = namespace(pooled=cache.pooled)
        spatial = tuple(cache.pooled.shape[2:])
        kernel = POOL_KERNELS[len(spatial)]
        out = _pooled(spatial)
        slabs = [
            cache.pooled[(slice(None), slice(None)) + tuple(
                window(t, k, n) for t, k, n in zip(offset, kernel, out)
            )]
            for offset in product(*(range(k) for k in kernel))
        ]
        margin = min(margin, max_gap(xp.stack(slabs, axis=0), axis=0))
    if cache.concat is not None:
        margin = min(margin, relu_margin(cache.concat.u + cache.concat.v))
    return margin


@config_entry
def accumulation(
    cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """The longest chain of sums behind each tensor family.

    Forward: projection (C), affinity (Ci, or C in gaussian mode), softmax
    normaliser and A G (Lk each), W (Ci), BN batch statistics (N·Lq, train).
    The backward adds the transposed products (C, Ci, Lk, Lk, 3Ci) and, for
    parameter gradients, the sum over the batch and positions (N·Lq).
    """
    x_shape = _x_shape(input_shapes)
    cfg = resolve(cfg, input_shapes)
    N, C = x_shape[0], x_shape[1]
    lq, lk = prod(x_shape[2:]), _key_count(cfg, x_shape)
    ci = int(cfg.inter_channels)  # type: ignore[arg-type]
    depth = ci if _embedded(cfg) else C
    bn = N * lq if cfg.bn == "train" else 0
    aux = C + depth + lk
    forward_chain = aux + lk + ci + bn
    backward_chain = forward_chain + C + ci + 2 * lk + 3 * ci + bn
    return {
        "out": forward_chain,
        "aux": aux,
        "state": forward_chain,
        "grad.input": backward_chain,
        "grad.param": backward_chain + N * lq,
    }


def anchor_names(
    preset: str | None, cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """Canonical key -> the anchor module's state_dict key (tests/anchors/non_local.py).

    ``alexhex7``: ``phi``/``g`` are ``Sequential(conv, pool)`` when sub-sampling
    (``phi.0.*``, ``g.0.*``), ``W`` is ``Sequential(conv, BN)`` with BN
    (``W.0.*``, ``W.1.*``), ``concat_project.0.weight``.  ``facebook`` (the
    PyTorch port of the Caffe2 block): ``W -> out``, ``W_bn -> bn``.
    ``cgnl_repo`` (``SpatialNL``): ``theta, phi, g, W, W_bn -> t, p, g, z, bn``.
    ``mmcv``/``mmcv_bn`` (``ConvModule``s): ``<m>.conv`` (``<m>.0.conv`` when
    pooled), ``W -> conv_out.conv``, ``W_bn -> conv_out.bn``.  ``sagan``:
    ``theta, phi, g -> query_conv, key_conv, value_conv``.  ``timm``
    (``NonLocalAttn``): ``theta, phi, g, W, W_bn -> t, p, g, z, norm``.
    Empty when the preset has no anchor or the anchor cannot express `cfg`.
    """
    if preset not in PRESETS or not _anchor_supports(preset, cfg, input_shapes):
        return {}
    shapes = param_shapes(cfg, input_shapes)
    return {key: _anchor_key(preset, cfg, key) for key in shapes}


def _anchor_key(preset: str, cfg: NonLocalConfig, key: str) -> str:
    """The anchor's state_dict name of the parameter or buffer `key`."""
    module, _, leaf = key.rpartition(".") if "." in key else (key, "", "")
    if preset == "alexhex7":
        if module in ("phi", "g") and cfg.sub_sample:
            target = f"{module}.0"
        elif module == "W" and cfg.bn is not None:
            target = "W.0"
        elif module == "W_bn":
            target = "W.1"
        elif module == "concat_project":
            target = "concat_project.0"
        else:
            target = module
    elif preset == "facebook":
        target = {"W": "out", "W_bn": "bn"}.get(module, module)
    elif preset in ("mmcv", "mmcv_bn"):
        pooled = cfg.sub_sample and module in ("phi", "g")
        target = {"W": "conv_out.conv", "W_bn": "conv_out.bn"}.get(
            module, f"{module}.0.conv" if pooled else f"{module}.conv")
    elif preset == "sagan":
        target = {"theta": "query_conv", "phi": "key_conv", "g": "value_conv",
                  "gamma": "gamma"}[module]
    elif preset == "timm":
        target = {"theta": "t", "phi": "p", "W": "z", "W_bn": "norm"}.get(
            module, module)
    else:
        cgnl = {"theta": "t", "phi": "p", "W": "z", "W_bn": "bn"}
        target = cgnl.get(module, module)
    return target if module == key else f"{target}.{leaf}"


def _anchor_supports(
    preset: str, cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> bool:
    """Whether the anchor implementation of `preset` can express `cfg`."""
    rank = len(_x_shape(input_shapes)) - 2
    cfg = resolve(cfg, input_shapes)
    if not cfg.residual or cfg.concat_bias:
        return False
    standard = (cfg.out_proj and not cfg.gamma and cfg.out_bias == cfg.bias
                and cfg.value_channels == cfg.inter_channels
                and cfg.scale_channels == "inter")
    if preset == "alexhex7":
        return (
            standard
            and not cfg.use_scale
            and cfg.bias
            and (not cfg.sub_sample or cfg.pool_position == "after_proj")
        )
    if preset == "facebook":
        return standard and cfg.mode in ("embedded_gaussian", "dot_product") and (
            not cfg.sub_sample or cfg.pool_position == "before_proj"
        )
    if preset in ("mmcv", "mmcv_bn"):
        return (
            cfg.out_proj and not cfg.gamma and cfg.bias
            and cfg.out_bias == (cfg.bn is None)
            and cfg.value_channels == cfg.inter_channels
            and cfg.scale_channels == "inter"
            and cfg.mode != "concatenation"
            and (not cfg.use_scale or cfg.mode == "embedded_gaussian")
            and (not cfg.sub_sample or cfg.pool_position == "after_proj")
        )
    if preset == "sagan":
        return (
            rank == 2 and cfg.mode == "embedded_gaussian" and not cfg.sub_sample
            and not cfg.use_scale and cfg.bias and not cfg.out_proj
            and cfg.bn is None and cfg.gamma
        )
    if preset == "timm":
        return (
            rank == 2 and cfg.mode == "embedded_gaussian" and not cfg.sub_sample
            and cfg.bias and cfg.out_proj and cfg.out_bias and cfg.bn is not None
            and not cfg.gamma and cfg.value_channels == cfg.inter_channels
            and (not cfg.use_scale or cfg.scale_channels == "in")
        )
    return (
        standard
        and rank == 2
        and cfg.mode == "embedded_gaussian"
        and not cfg.sub_sample
        and not cfg.bias
        and cfg.bn is not None
    )


@config_only
def with_bn_mode(cfg: NonLocalConfig, mode: str) -> NonLocalConfig | None:
    """`cfg` with its W_bn in `mode` ('train' or 'eval'); None without BN."""
    return with_bn_field(cfg, "bn", mode)


@config_only
def fixture_shapes(cfg: NonLocalConfig) -> dict[str, Shape]:
    """Small default inputs with odd spatial sizes (floor-mode pooling: 5x7 keys
    become 2x3).  ``before_proj`` is the video block's arrangement (facebook),
    so it gets a clip (T, H, W); every other config an image (H, W)."""
    if cfg.pool_position == "before_proj":
        return {"x": (2, 8, 2, 5, 7)}
    return {"x": (2, 8, 5, 7)}


@config_entry
def flops(cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The θ projection at Lq positions, φ and g at the positions they are
    computed on (Lk with pooling before the projection), the two attention
    matmuls θᵀφ and A g (2·N·Lq·Lk·Ci each), and W."""
    cfg = resolve(cfg, input_shapes)
    N, C, *S = _x_shape(input_shapes)
    Lq = Lk = prod(S)
    if cfg.sub_sample:  # kernel = stride = 2 on the last one or two spatial dims
        pooled = S[-2:]
        Lk = prod(S[: len(S) - len(pooled)]) * prod(d // 2 for d in pooled)
    Ci = int(cfg.inter_channels)  # type: ignore[arg-type]
    projected = Lk if cfg.pool_position == "before_proj" else Lq
    return 2 * N * Ci * (Lq * C + 2 * projected * C + 2 * Lq * Lk + Lq * C)


SPECS = module_specs(
    __name__,
    summary="non-local block (Wang et al. 2018): embedded Gaussian, Gaussian, "
    "dot product and concatenation; 1-, 2- and 3-D",
    config_cls=NonLocalConfig,
    default_preset="alexhex7",
    bench=BenchCase("alexhex7", {"inter_channels": 128}, {"x": (4, 256, 28, 28)},
                    "x(4,256,28,28) embedded gaussian, inter 128, sub_sample, "
                    "BN(train)"),
    figure=("draw_non_local", (13.0, 3.2)),
    anchors={p: f"non_local:make_{p.removesuffix('_bn')}" for p in PRESETS},
)
