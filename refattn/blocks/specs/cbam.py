"""The ``cbam``, ``cbam_channel`` and ``cbam_spatial`` blocks' specs: checked
entry points and the tools' fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

from refattn import checks
from refattn._typing import Array, Params, Shape
from refattn.backend import host_rng, namespace, zeros_like_shape
from refattn.blocks import cbam
from refattn.blocks.cbam import (
    BLOCK_NAMES,
    BN_MODES,
    CHANNEL_POOL_ORDERS,
    MLP_LAYERS,
    POOL_TYPES,
    PRESETS,
    CBAMCache,
    CBAMConfig,
    Part,
    _GateCache,
)
from refattn.blocks.spec import (
    BenchCase,
    BlockSpec,
    draw_bias,
    draw_bn_state,
    draw_norm_affine,
    draw_weight,
    max_gap,
    relu_margin,
)
from refattn.params import is_buffer

RULES: dict[str, checks.Rule] = {
    "reduction": checks.Int(1),
    "hidden_channels": checks.Int(1, optional=True),
    "hidden_divisor": checks.Int(1, optional=True),
    "mlp_layers": checks.OneOf(MLP_LAYERS, " (2: fc-ReLU-fc; 1: one C -> C layer, "
                               "ultralytics)"),
    "pool_types": checks.Choices(POOL_TYPES, what="an ordered sequence of 'avg', "
                                 "'max', 'lp', 'lse', 'avgmax'"),
    "mlp_bias": checks.Bool(),
    "spatial": checks.Bool(),
    "spatial_kernel": checks.Int(1),
    "channel_pool_order": checks.OneOf(
        CHANNEL_POOL_ORDERS, " ('max_mean': Jongchan; 'mean_max': luuuyi, seed, "
        "ultralytics, timm; 'avgmax': one map ½(mean + max), timm's LightCbam)"),
    "spatial_bias": checks.Bool(),
    "spatial_bn": checks.OneOf(BN_MODES),
    "bn_eps": checks.Real(positive=True),
    "bn_momentum": checks.Real(0.0, 1.0),
    "spatial_relu": checks.Bool(),
}


def _odd_kernel(cfg: CBAMConfig) -> str | None:
    if cfg.spatial_kernel % 2 == 0:
        return (f"spatial_kernel ({cfg.spatial_kernel}) must be odd, so that the "
                "padding (k - 1) // 2 keeps the H x W size (the anchors use 3 or 7)")
    return None


def check_config(cfg: Any) -> CBAMConfig:
    return checks.check_config("cbam", cfg, CBAMConfig, RULES, [_odd_kernel])


config_entry = checks.config_entry(check_config, shapes=True)
config_only = checks.config_entry(check_config)


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    if set(input_shapes) != {"x"}:
        raise ValueError(
            f"inputs: CBAM takes one input 'x', got {sorted(input_shapes)}"
        )
    shape = tuple(input_shapes["x"])
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(
            f"x: expected a non-empty 4-D shape (N, C, H, W), got {shape}"
        )
    return shape


def _hidden_width(cfg: CBAMConfig, x_shape: Shape) -> int:
    """The MLP's hidden width Cr: ``hidden_channels`` when given; with
    ``hidden_divisor = d``, timm's make_divisible(C / r, d, round_limit=0) =
    max(d, ⌊C/r + d/2⌋ rounded down to a multiple of d), computed in integers
    as ⌊(2C + d·r) / (2r)⌋; otherwise C // r, which must be at least 1 (the
    anchors do not check).  With ``mlp_layers = 1`` the one layer is C -> C."""
    C = x_shape[1]
    if cfg.mlp_layers == 1:
        return C
    if cfg.hidden_channels is not None:
        return cfg.hidden_channels
    if cfg.hidden_divisor is not None:
        d, r = cfg.hidden_divisor, cfg.reduction
        return max(d, (2 * C + d * r) // (2 * r) // d * d)
    if C // cfg.reduction < 1:
        raise ValueError(
            f"reduction ({cfg.reduction}) must not exceed the channels C ({C}): "
            f"the MLP's hidden width C // reduction would be {C // cfg.reduction} "
            "(or set hidden_channels or hidden_divisor)"
        )
    return C // cfg.reduction


def _descriptor_maps(cfg: CBAMConfig) -> int:
    """D, the spatial descriptor's maps: 1 for 'avgmax', else 2."""
    return 1 if cfg.channel_pool_order == "avgmax" else 2


def _uses_channel(part: Part) -> bool:
    return part in ("cbam", "channel")


def _uses_spatial(cfg: CBAMConfig, part: Part) -> bool:
    return part == "spatial" or (part == "cbam" and cfg.spatial)


@config_entry
def param_shapes(
    cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *, part: Part = "cbam"
) -> dict[str, Shape]:
    """Every parameter and buffer key of the block with its shape.

    Shapes:
        mlp.fc1.weight (Cr, C), mlp.fc1.bias (Cr,)      with mlp_bias
        mlp.fc2.weight (C, Cr), mlp.fc2.bias (C,)       with mlp_bias
        (mlp_layers = 1: mlp.fc1.weight (C, C), mlp.fc1.bias (C,) only)
        spatial.conv.weight (1, D, k, k), spatial.conv.bias (1,) with spatial_bias
        (D = 2, or 1 with channel_pool_order = 'avgmax')
        spatial.bn.{weight, bias, running_mean, running_var} (1,) with spatial_bn
    """
    x_shape = _x_shape(input_shapes)
    C = x_shape[1]
    shapes: dict[str, Shape] = {}
    if _uses_channel(part):
        Cr = _hidden_width(cfg, x_shape)
        shapes["mlp.fc1.weight"] = (Cr, C)
        if cfg.mlp_bias:
            shapes["mlp.fc1.bias"] = (Cr,)
        if cfg.mlp_layers == 2:
            shapes["mlp.fc2.weight"] = (C, Cr)
            if cfg.mlp_bias:
                shapes["mlp.fc2.bias"] = (C,)
    if _uses_spatial(cfg, part):
        k = cfg.spatial_kernel
        shapes["spatial.conv.weight"] = (1, _descriptor_maps(cfg), k, k)
        if cfg.spatial_bias:
            shapes["spatial.conv.bias"] = (1,)
        if cfg.spatial_bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"spatial.bn.{name}"] = (1,)
    return checks.limit_sizes(BLOCK_NAMES[part], shapes)


def _anchor_of(cfg: CBAMConfig) -> str:
    """The anchor whose initialisation the config's structure identifies (for
    anchor_init): Jongchan, luuuyi, or PyTorch's defaults ("pytorch": seed,
    ultralytics, timm)."""
    if cfg.channel_pool_order == "max_mean":
        return "jongchan"
    luuuyi = (not cfg.mlp_bias and cfg.mlp_layers == 2 and cfg.spatial_bn is None
              and cfg.hidden_divisor is None and cfg.channel_pool_order == "mean_max")
    return "luuuyi" if luuuyi else "pytorch"


@config_entry
def init_params(
    cfg: CBAMConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
    part: Part = "cbam",
) -> tuple[Params, Params]:
    """Host float64 (params, state).

    Default: random and non-degenerate (weights N(0, 1/fan_in), biases
    N(0, 0.1²), BN gamma in [0.5, 1.5], running statistics away from (0, 1)).

    ``anchor_init=True``: the distributions of the anchor the config's
    structure identifies (``max_mean`` -> Jongchan; ``mean_max`` without MLP
    bias, BN or hidden_divisor -> luuuyi; otherwise PyTorch's defaults, as
    seed, ultralytics and timm build them), drawn with refattn's RNG:
    Jongchan: Linear weights U(±1/sqrt(fan_in)) (PyTorch default), every bias
    0, the spatial conv Kaiming-normal fan_out, spatial BN gamma 0 and beta 0,
    running statistics (0, 1).  luuuyi: every conv (the 1x1 MLP convs too)
    N(0, 2/(k·k·out_channels)).  PyTorch defaults: weights and biases
    U(±1/sqrt(fan_in)), BN gamma 1 and beta 0, running statistics (0, 1).
    """
    shapes = param_shapes(cfg, input_shapes, part=part)
    rng = host_rng(seed)
    values: Params = {}
    anchor = _anchor_of(cfg)
    for key, shape in shapes.items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            continue
        if key == "spatial.bn.weight":
            mean, var = draw_bn_state(rng, 1)
            gamma, beta = draw_norm_affine(rng, 1)
            if anchor_init:
                zero = zeros_like_shape(gamma, (1,))
                g0 = 0.0 if anchor == "jongchan" else 1.0  # Jongchan zeroes gamma
                gamma, beta, mean, var = zero + g0, zero + 0.0, zero + 0.0, zero + 1.0
            values["spatial.bn.weight"], values["spatial.bn.bias"] = gamma, beta
            values["spatial.bn.running_mean"] = mean
            values["spatial.bn.running_var"] = var
        elif key == "spatial.bn.bias":
            continue
        elif not anchor_init:
            draw = draw_weight if key.endswith("weight") else draw_bias
            values[key] = draw(rng, shape)
        else:
            values[key] = _anchor_draw(rng, anchor, key, shape, shapes)
    params = {k: values[k] for k in shapes if not is_buffer(k)}
    state = {k: values[k] for k in shapes if is_buffer(k)}
    return params, state


def _anchor_draw(
    rng: Any, anchor: str, key: str, shape: Shape,
    shapes: Mapping[str, Shape],
) -> Array:
    """One host tensor drawn like the anchor's own initialisation (`rng` a
    numpy Generator)."""
    weight_shape = shapes[key.rsplit(".", 1)[0] + ".weight"]
    fan_in = math.prod(weight_shape[1:])
    fan_out = weight_shape[0] * math.prod(weight_shape[2:])
    bound = 1.0 / math.sqrt(fan_in)
    if key.endswith("bias"):
        if anchor == "jongchan":
            host = rng.standard_normal(0)  # an empty host float64 array as template
            return zeros_like_shape(host, shape)  # Jongchan zeroes every bias
        return rng.uniform(-bound, bound, shape)
    if key == "spatial.conv.weight" and anchor != "pytorch":
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
    if anchor == "luuuyi":  # the MLP's 1x1 convs: N(0, 2 / out_channels)
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
    return rng.uniform(-bound, bound, shape)


def _entry(part: Part) -> Any:
    @checks.forward_entry(BLOCK_NAMES[part])
    def forward(inputs: Any, params: Any, state: Any, cfg: Any
                ) -> tuple[dict[str, Array], CBAMCache | _GateCache]:
        """``cbam.forward`` after checking every argument."""
        cfg = check_config(cfg)
        block = BLOCK_NAMES[part]
        inputs = checks.check_inputs(block, inputs, {"x": 4})
        shapes = param_shapes(cfg, {"x": tuple(inputs["x"].shape)}, part=part)
        why = partial(_flag_of, cfg=cfg, part=part)
        params, state = checks.check_params(block, params, state, shapes, inputs,
                                               why=why)
        return cbam.forward(inputs, params, state, cfg, part=part)

    return forward


_FORWARDS = {part: _entry(part) for part in BLOCK_NAMES}
forward = _FORWARDS["cbam"]


@checks.backward_entry("cbam")
def backward(douts: Any, cache: Any) -> tuple[dict[str, Array], dict[str, Array]]:
    """``cbam.backward`` after checking the cotangent against the forward."""
    checks.check_cache("cbam", cache, (CBAMCache, _GateCache))
    x = cache.channel.gate.x if isinstance(cache, CBAMCache) else cache.gate.gate.x
    checks.check_douts("cbam", douts, shape=tuple(x.shape), like=x)
    return cbam.backward(douts, cache)


def _flag_of(key: str, *, cfg: CBAMConfig, part: Part) -> str:
    """The config key that decides whether parameter `key` exists."""
    if key.startswith("spatial.") and part == "cbam" and not cfg.spatial:
        return "spatial=False"
    if key.startswith("mlp.fc2.") and part != "spatial" and cfg.mlp_layers == 1:
        return "mlp_layers=1"
    if key.startswith("mlp.") and key.endswith(".bias"):
        return f"mlp_bias={cfg.mlp_bias}"
    if key == "spatial.conv.bias":
        return f"spatial_bias={cfg.spatial_bias}"
    if key.startswith("spatial.bn."):
        return f"spatial_bn={cfg.spatial_bn!r}"
    if key.startswith("spatial.") and part == "channel":
        return "cbam_channel has no spatial gate"
    if key.startswith("mlp.") and part == "spatial":
        return "cbam_spatial has no channel gate"
    return ""


# ---------------------------------------------------------------------------
# margins, accumulation lengths, anchors, BN mode, fixture shapes


def kink_margin(cache: CBAMCache | _GateCache) -> float:
    """The smallest relative distance of this forward from a kink or a tie:
    MLP hidden ReLU inputs from 0, the max (and avgmax) descriptor's top two
    positions per channel, the channel max's top two channels per position
    (every channel_pool_order has that max), and the spatial ReLU input
    (spatial_relu) from 0.

    A pool type whose MLP branch has every hidden ReLU off (for every sample)
    also counts as 0: such a draw is degenerate (that branch reaches the
    logits through b2 alone, so its weight gradients are zero and a fixture
    could not tell a shared MLP from per-branch MLPs), and is redrawn like a
    tie.  Max descriptors are nearly constant vectors, so with a small Cr this
    happens to a sizeable fraction of random draws.
    """
    if isinstance(cache, CBAMCache):
        channel, spatial = cache.channel, cache.spatial
    else:
        channel = cache.gate if cache.part == "channel" else None
        spatial = cache.gate if cache.part == "spatial" else None
    margins = [math.inf]
    if channel is not None:
        hidden = channel.hidden  # (T, N, Cr); None with mlp_layers = 1
        if hidden is not None:
            xp = namespace(hidden=hidden)
            live = xp.any(hidden > 0, axis=(1, 2))  # (T,)
            if not bool(xp.all(live)):
                return 0.0
            margins.append(relu_margin(hidden))
        if any(p.kind == "max" for pools in channel.pools for p in pools):
            x = channel.gate.x
            xp = namespace(x=x)
            flat = xp.reshape(x, (x.shape[0], x.shape[1], -1))  # (N, C, L)
            margins.append(max_gap(flat, axis=2))
    if spatial is not None:
        margins.append(max_gap(spatial.gate.x, axis=1))
        if spatial.pre_relu is not None:
            margins.append(relu_margin(spatial.pre_relu))
    return float(min(margins))


@config_entry
def accumulation(
    cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *, part: Part = "cbam"
) -> dict[str, int]:
    """Longest chain of summed terms behind each tensor family.

    Forward: pooling over L = H·W, fc1 over C, fc2 over Cr (with two
    layers), the T logits;
    then the channel mean over C, the conv over 2·k·k and train-mode BN over
    N·L.  The backward adds the transposed sums (over C for the spatial gate,
    N·L for BN, k·k for the conv, L for the channel gate, C and Cr for the
    MLP); parameter gradients add their sum over the batch (N·L for the conv
    and BN, T·N for the MLP).
    """
    N, C, H, W = _x_shape(input_shapes)
    L = H * W
    k2 = cfg.spatial_kernel ** 2
    D = _descriptor_maps(cfg)
    T = len(cfg.pool_types)
    bn_sum = N * L if cfg.spatial_bn == "train" else 1
    fwd = bwd = param = 0
    if _uses_channel(part):
        Cr = _hidden_width(cfg, (N, C, H, W)) if cfg.mlp_layers == 2 else 0
        fwd += L + C + Cr + T
        bwd += L + C + Cr + T
        param = max(param, T * N)
    if _uses_spatial(cfg, part):
        fwd += C + D * k2 + bn_sum
        bwd += C + k2 + bn_sum
        param = max(param, N * L)
    return {
        "out": fwd,
        "aux": fwd,
        "state": fwd,
        "grad.input": fwd + bwd,
        "grad.param": fwd + bwd + param,
    }


def anchor_names(
    preset: str | None, cfg: CBAMConfig, input_shapes: Mapping[str, Shape],
    *, part: Part = "cbam",
) -> dict[str, str]:
    """Canonical key -> the anchor's state_dict key, for the keys this config has.

    jongchan: ``ChannelGate.mlp.{1,3}.*``, ``SpatialGate.spatial.{conv,bn}.*``.
    luuuyi: ``ca.fc.{0,2}.weight`` (1x1-conv shape (out, in, 1, 1): the same
    numbers as the canonical 2-D weight), ``sa.conv1.weight``.
    seed: ``channel_attention.shared_MLP.{0,2}.*``,
    ``spatial_attention.conv2d.*`` (the seed notes show the two modules; they
    are composed under these attribute names).
    ultralytics: ``channel_attention.fc.*`` (the one layer, 1x1-conv shape
    (C, C, 1, 1)), ``spatial_attention.cv1.weight``.
    timm, timm_light: ``channel.fc1.weight``, ``channel.fc2.weight`` (1x1-conv
    shapes), ``spatial.conv.conv.weight``, ``spatial.conv.bn.*`` (ConvNormAct).
    The gate-only blocks use the names the gate has inside the anchor's CBAM.
    Buffers are mapped too; PyTorch's ``num_batches_tracked`` has no
    counterpart.
    """
    tables = {
        "jongchan": {
            "mlp.fc1": "ChannelGate.mlp.1",
            "mlp.fc2": "ChannelGate.mlp.3",
            "spatial.conv": "SpatialGate.spatial.conv",
            "spatial.bn": "SpatialGate.spatial.bn",
        },
        "luuuyi": {
            "mlp.fc1": "ca.fc.0",
            "mlp.fc2": "ca.fc.2",
            "spatial.conv": "sa.conv1",
        },
        "seed": {
            "mlp.fc1": "channel_attention.shared_MLP.0",
            "mlp.fc2": "channel_attention.shared_MLP.2",
            "spatial.conv": "spatial_attention.conv2d",
        },
        "ultralytics": {
            "mlp.fc1": "channel_attention.fc",
            "spatial.conv": "spatial_attention.cv1",
        },
        "timm": _TIMM_NAMES,
        "timm_light": _TIMM_NAMES,
    }
    table = tables.get(preset or "")
    if table is None:
        return {}
    out = {}
    for key in param_shapes(cfg, input_shapes, part=part):
        module, leaf = key.rsplit(".", 1)
        if module in table:
            out[key] = f"{table[module]}.{leaf}"
    return out


_TIMM_NAMES = {
    "mlp.fc1": "channel.fc1",
    "mlp.fc2": "channel.fc2",
    "spatial.conv": "spatial.conv.conv",
    "spatial.bn": "spatial.conv.bn",
}


@config_only
def with_bn_mode(
    cfg: CBAMConfig, mode: str, *, part: Part = "cbam"
) -> CBAMConfig | None:
    """The config with ``spatial_bn = mode``; None when no BN is live."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if not _uses_spatial(cfg, part) or cfg.spatial_bn is None:
        return None
    return dataclasses.replace(cfg, spatial_bn=mode)


_SPATIAL_KEYS = frozenset({"spatial_kernel", "channel_pool_order", "spatial_bias",
                           "spatial_bn", "bn_eps", "bn_momentum", "spatial_relu"})
_CHANNEL_KEYS = frozenset({"reduction", "hidden_channels", "hidden_divisor",
                           "mlp_layers", "pool_types", "mlp_bias"})


@config_only
def inert_keys(cfg: CBAMConfig, *, part: Part = "cbam") -> frozenset[str]:
    """The keys that change nothing in `cfg` (``refattn/blocks/cbam.py``):
    the other gate's keys and ``spatial`` in a gate block; the spatial keys
    with ``spatial=False``; ``bn_eps`` and ``bn_momentum`` without a batch
    norm, ``bn_momentum`` in eval mode (no running statistic moves);
    ``reduction``, ``hidden_channels`` and ``hidden_divisor`` with one MLP
    layer; ``reduction`` and ``hidden_divisor`` beside ``hidden_channels``."""
    inert: set[str] = set()
    if part != "cbam":
        inert.add("spatial")
        inert |= _SPATIAL_KEYS if part == "channel" else _CHANNEL_KEYS
    elif not cfg.spatial:
        inert |= _SPATIAL_KEYS
    if cfg.spatial_bn is None:
        inert |= {"bn_eps", "bn_momentum"}
    elif cfg.spatial_bn == "eval":
        inert.add("bn_momentum")
    if cfg.mlp_layers == 1:
        inert |= {"reduction", "hidden_channels", "hidden_divisor"}
    elif cfg.hidden_channels is not None:
        inert |= {"reduction", "hidden_divisor"}
    return frozenset(inert)


@config_only
def fixture_shapes(cfg: CBAMConfig, *, part: Part = "cbam") -> dict[str, Shape]:
    """x (2, C, 7, 6) with C = 2·reduction (Cr = 2) when Cr = C // r; C = 8
    when the width comes another way (mlp_layers = 1, hidden_channels,
    hidden_divisor: with r = 16 and d = 1, Cr = 1 where C // r is 0, so a
    floor-rounding implementation cannot even load the case); C = 4 for the
    spatial gate alone.  H != W catches transposed spatial axes, and 7 >=
    every anchor kernel."""
    floor_width = (cfg.mlp_layers == 2 and cfg.hidden_channels is None
                   and cfg.hidden_divisor is None)
    C = 4 if part == "spatial" else 2 * cfg.reduction if floor_width else 8
    return {"x": (2, C, 7, 6)}


@config_entry
def flops(cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *,
          part: Part = "cbam") -> int:
    """The shared MLP on each of the T pooled vectors, 2·N·T·(C·Cr + Cr·C)
    (2·N·T·C·C with one layer), and the spatial gate's conv, 2·N·H·W·D·k²."""
    N, C, H, W = _x_shape(input_shapes)
    total = 0
    if _uses_channel(part):
        Cr = _hidden_width(cfg, (N, C, H, W))
        per = C * Cr + (Cr * C if cfg.mlp_layers == 2 else 0)
        total += len(cfg.pool_types) * 2 * N * per
    if _uses_spatial(cfg, part):
        total += 2 * N * H * W * _descriptor_maps(cfg) * cfg.spatial_kernel ** 2
    return total


_FIGURES = {"cbam": (12.0, 6.0), "channel": (12.0, 2.6), "spatial": (12.0, 3.4)}
_ANCHOR_SUFFIX = {"cbam": "", "channel": "_channel", "spatial": "_spatial"}
_ANCHOR_MODULE = {"ultralytics": "cbam_variants", "timm": "cbam_variants",
                  "timm_light": "cbam_variants"}


def _spec(part: Part, summary: str) -> BlockSpec:
    return BlockSpec(
        name=BLOCK_NAMES[part],
        summary=summary,
        config_cls=CBAMConfig,
        presets=PRESETS,
        default_preset="jongchan",
        fixture_shapes=partial(fixture_shapes, part=part),
        param_shapes=partial(param_shapes, part=part),
        init_params=partial(init_params, part=part),
        forward=_FORWARDS[part],
        backward=backward,
        check_config=check_config,
        kink_margin=kink_margin,
        accumulation=partial(accumulation, part=part),
        anchor_names=partial(anchor_names, part=part),
        with_bn_mode=partial(with_bn_mode, part=part),
        inert_keys=partial(inert_keys, part=part),
        flops=partial(flops, part=part),
        bench=(BenchCase("jongchan", {}, {"x": (8, 256, 28, 28)},
                         "x(8,256,28,28) r=16, avg+max, 7x7 conv + BN(train)")
               if part == "cbam" else None),
        figure=("draw_cbam", _FIGURES[part]),
        diagram="cbam" if part == "cbam" else None,
        anchors={p: f"{_ANCHOR_MODULE.get(p, 'cbam')}:make_{p}{_ANCHOR_SUFFIX[part]}"
                 for p in PRESETS},
    )


SPECS: dict[str, BlockSpec] = {
    "cbam": _spec("cbam", "CBAM (Woo et al. 2018): channel gate, then spatial gate"),
    "cbam_channel": _spec(
        "channel", "CBAM's channel gate alone: x * sigmoid(sum_t MLP(pool_t x))"
    ),
    "cbam_spatial": _spec(
        "spatial", "CBAM's spatial gate alone: x * sigmoid(conv(channel pools of x))"
    ),
}
