"""CBAM: the Convolutional Block Attention Module, and its two gates alone.

Reference:
    S. Woo, J. Park, J.-Y. Lee, I. S. Kweon, "CBAM: Convolutional Block
    Attention Module", ECCV 2018 (arXiv:1807.06521).  Anchors: Jongchan/
    attention-module ``MODELS/cbam.py`` (preset ``jongchan``), luuuyi/
    CBAM.PyTorch ``model/resnet_cbam.py`` (``luuuyi``) and the project's seed
    notes (``seed``); reference/blocks.md section 4.

Equations (paper notation, F the input feature map, ⊗ broadcast product):

    M_c(F)  = σ( Σ_t MLP(Pool_t(F)) ),   t ∈ pool_types (paper: avg, max)
    MLP(d)  = W_1 relu(W_0 d + b_0) + b_1            (one MLP, shared by every t)
    F'      = M_c(F) ⊗ F
    M_s(F') = σ( act(BN(f^{k×k}([Pool_1(F'); Pool_2(F')]))) )   channel pools
    F''     = M_s(F') ⊗ F'

The two channel pools of M_s are (max, mean) for ``channel_pool_order =
'max_mean'`` (Jongchan) and (mean, max) for ``'mean_max'`` (paper figure,
luuuyi, seed).  BN (``spatial_bn``) and act = ReLU (``spatial_relu``) are
optional; the paper has neither.  The MLP is applied to each descriptor
separately, so the ReLU acts per descriptor and b_1 enters the logits once
per pool type.

Paper symbol -> code:

    ========================  ======================================  ==========
    paper                     parameter key / variable                shape
    ========================  ======================================  ==========
    F                         input ``x``                             (N, C, H, W)
    r                         config ``reduction`` (Cr = C // r)
    Pool_t(F)                 ``d`` (descriptors stacked over t)      (T, N, C)
    W_0, b_0                  ``mlp.fc1.weight``, ``mlp.fc1.bias``    (Cr, C), (Cr,)
    W_1, b_1                  ``mlp.fc2.weight``, ``mlp.fc2.bias``    (C, Cr), (C,)
    M_c(F)                    ``a``, output ``aux.channel_gate``      (N, C)
    F'                        ``x1``                                  (N, C, H, W)
    [Pool_1; Pool_2](F')      ``m``, ``aux.spatial_descriptor``       (N, 2, H, W)
    f^{k×k}                   ``spatial.conv.weight`` (+ ``.bias``)   (1, 2, k, k)
    BN                        ``spatial.bn.weight``, ``.bias``,       (1,)
                              ``.running_mean``, ``.running_var``
    M_s(F')                   ``aux.spatial_gate``                    (N, 1, H, W)
    F''                       output ``out``                          (N, C, H, W)
    ========================  ======================================  ==========

Three registry entries share ``CBAMConfig`` and the presets:

* ``cbam``          out = F'' (or F' with ``spatial=False``);
* ``cbam_channel``  out = M_c(x) ⊗ x alone; parameters ``mlp.*``; the keys
  ``spatial``, ``spatial_kernel``, ``channel_pool_order``, ``spatial_bias``,
  ``spatial_bn``, ``bn_eps``, ``bn_momentum`` and ``spatial_relu`` are inert;
* ``cbam_spatial``  out = M_s(x) ⊗ x alone; parameters ``spatial.*``; the keys
  ``reduction``, ``pool_types``, ``mlp_bias`` and ``spatial`` are inert.

Inert keys are still validated and still written into golden manifests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, Params, Shape
from refattn.backend import (
    check_array,
    check_finite,
    check_same_dtype,
    host_rng,
    namespace,
    zeros_like_shape,
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
from refattn.ops.conv import Conv2dCache, _conv2d, _conv2d_backward
from refattn.ops.elementwise import (
    GateMulCache,
    ReluCache,
    _gate_mul,
    _gate_mul_backward,
    _relu,
    _relu_backward,
)
from refattn.ops.linear import LinearCache, _linear, _linear_backward
from refattn.ops.norm import BatchNormCache, _batch_norm, _batch_norm_backward
from refattn.ops.pool import (
    ChannelPoolCache,
    GlobalPoolCache,
    _channel_pool,
    _channel_pool_backward,
    _global_pool,
    _global_pool_backward,
)
from refattn.params import is_buffer, sub_params, with_prefix

__all__ = [
    "PRESETS",
    "SPECS",
    "CBAMCache",
    "CBAMConfig",
    "ChannelGateCache",
    "SpatialGateCache",
    "cbam_backward",
    "cbam_forward",
    "channel_gate_backward",
    "channel_gate_forward",
    "spatial_gate_backward",
    "spatial_gate_forward",
]

PoolType = Literal["avg", "max", "lp", "lse"]
Part = Literal["cbam", "channel", "spatial"]
POOL_TYPES: tuple[str, ...] = ("avg", "max", "lp", "lse")
CHANNEL_POOL_ORDERS = ("max_mean", "mean_max")
BN_MODES = (None, "train", "eval")
BLOCK_NAMES: dict[str, str] = {
    "cbam": "cbam",
    "channel": "cbam_channel",
    "spatial": "cbam_spatial",
}


# ---------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, kw_only=True, slots=True)
class CBAMConfig:
    """Every semantic switch of CBAM (reference/blocks.md sections 4.3, 9.2).

    The defaults are the ``jongchan`` preset.  ``pool_types`` may be given as
    a list; it is stored as a tuple.  Rules that need the input (Cr = C // r
    must be at least 1) are checked by ``param_shapes`` and the forward.
    """

    reduction: int = 16
    pool_types: tuple[PoolType, ...] = ("avg", "max")
    mlp_bias: bool = True
    spatial: bool = True
    spatial_kernel: int = 7
    channel_pool_order: Literal["max_mean", "mean_max"] = "max_mean"
    spatial_bias: bool = False
    spatial_bn: Literal["train", "eval"] | None = "train"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.01
    spatial_relu: bool = False

    def __post_init__(self) -> None:
        _check_int("reduction", self.reduction, minimum=1)
        pools = self.pool_types
        if isinstance(pools, str) or not isinstance(pools, (tuple, list)):
            raise ValueError(
                "pool_types: expected an ordered sequence of 'avg', 'max', 'lp', "
                f"'lse', got {pools!r}"
            )
        pools = tuple(pools)
        if not pools:
            raise ValueError(
                "pool_types: expected at least one of 'avg', 'max', 'lp', 'lse', "
                "got an empty sequence"
            )
        unknown = [p for p in pools if not isinstance(p, str) or p not in POOL_TYPES]
        if unknown:
            raise ValueError(
                f"pool_types: unknown pool type(s) {', '.join(map(repr, unknown))} "
                f"(allowed: 'avg', 'max', 'lp', 'lse'), got {pools!r}"
            )
        if len(set(pools)) != len(pools):
            raise ValueError(
                f"pool_types: each pool type may appear once, got {pools!r}"
            )
        object.__setattr__(self, "pool_types", pools)
        for name in ("mlp_bias", "spatial", "spatial_bias", "spatial_relu"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
        _check_int("spatial_kernel", self.spatial_kernel, minimum=1)
        if self.spatial_kernel % 2 == 0:
            raise ValueError(
                f"spatial_kernel ({self.spatial_kernel}) must be odd, so that the "
                "padding (k - 1) // 2 keeps the H x W size (the anchors use 3 or 7)"
            )
        if self.channel_pool_order not in CHANNEL_POOL_ORDERS:
            raise ValueError(
                "channel_pool_order: expected 'max_mean' (Jongchan) or 'mean_max' "
                f"(luuuyi, seed), got {self.channel_pool_order!r}"
            )
        if self.spatial_bn not in BN_MODES:
            raise ValueError(
                "spatial_bn: expected None, 'train' or 'eval', "
                f"got {self.spatial_bn!r}"
            )
        eps = _check_real("bn_eps", self.bn_eps)
        if not eps > 0:
            raise ValueError(f"bn_eps: expected a positive number, got {eps!r}")
        momentum = _check_real("bn_momentum", self.bn_momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"bn_momentum: expected a number in [0, 1], got {momentum!r}"
            )

    def resolved(self, input_shapes: Mapping[str, Shape]) -> CBAMConfig:
        """CBAM has no input-derived keys: the config itself.  (Whether
        C // reduction >= 1 depends on the registry entry, since the spatial
        gate alone has no MLP: ``param_shapes`` checks it.)"""
        _x_shape(input_shapes)
        return self


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


PRESETS: dict[str, CBAMConfig] = {
    # Jongchan/attention-module: Linear MLP with bias, ChannelPool max-then-mean,
    # BasicConv(2, 1, 7, relu=False): conv without bias + BatchNorm2d(1, eps=1e-5,
    # momentum=0.01); a fresh module trains, so BN uses batch statistics.
    "jongchan": CBAMConfig(
        reduction=16,
        pool_types=("avg", "max"),
        mlp_bias=True,
        spatial=True,
        spatial_kernel=7,
        channel_pool_order="max_mean",
        spatial_bias=False,
        spatial_bn="train",
        bn_eps=1e-5,
        bn_momentum=0.01,
        spatial_relu=False,
    ),
    # luuuyi/CBAM.PyTorch: 1x1-conv MLP without bias (Cr = C // 16 hard-coded),
    # cat([mean, max]), k x k conv without bias, no BN.
    "luuuyi": CBAMConfig(
        reduction=16,
        pool_types=("avg", "max"),
        mlp_bias=False,
        spatial=True,
        spatial_kernel=7,
        channel_pool_order="mean_max",
        spatial_bias=False,
        spatial_bn=None,
        bn_eps=1e-5,
        bn_momentum=0.01,
        spatial_relu=False,
    ),
    # the seed notes: Linear MLP with bias, cat([mean, max]), Conv2d(2, 1, 7,
    # padding=3) with bias, no BN.
    "seed": CBAMConfig(
        reduction=16,
        pool_types=("avg", "max"),
        mlp_bias=True,
        spatial=True,
        spatial_kernel=7,
        channel_pool_order="mean_max",
        spatial_bias=True,
        spatial_bn=None,
        bn_eps=1e-5,
        bn_momentum=0.01,
        spatial_relu=False,
    ),
}


# ---------------------------------------------------------------------------
# parameters


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    if set(input_shapes) != {"x"}:
        raise ValueError(
            f"inputs: CBAM takes one input 'x', got {sorted(input_shapes)}"
        )
    shape = tuple(int(s) for s in input_shapes["x"])
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(
            f"x: expected a non-empty 4-D shape (N, C, H, W), got {shape}"
        )
    return shape


def _hidden_width(cfg: CBAMConfig, x_shape: Shape) -> int:
    """Cr = C // r, which must be at least 1 (the anchors do not check)."""
    C = x_shape[1]
    if C // cfg.reduction < 1:
        raise ValueError(
            f"reduction ({cfg.reduction}) must not exceed the channels C ({C}): "
            f"the MLP's hidden width C // reduction would be {C // cfg.reduction}"
        )
    return C // cfg.reduction


def _uses_channel(part: Part) -> bool:
    return part in ("cbam", "channel")


def _uses_spatial(cfg: CBAMConfig, part: Part) -> bool:
    return part == "spatial" or (part == "cbam" and cfg.spatial)


def param_shapes(
    cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *, part: Part = "cbam"
) -> dict[str, Shape]:
    """Every parameter and buffer key of the block with its shape.

    Shapes:
        mlp.fc1.weight (Cr, C), mlp.fc1.bias (Cr,)      with mlp_bias
        mlp.fc2.weight (C, Cr), mlp.fc2.bias (C,)       with mlp_bias
        spatial.conv.weight (1, 2, k, k), spatial.conv.bias (1,) with spatial_bias
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
        shapes["mlp.fc2.weight"] = (C, Cr)
        if cfg.mlp_bias:
            shapes["mlp.fc2.bias"] = (C,)
    if _uses_spatial(cfg, part):
        k = cfg.spatial_kernel
        shapes["spatial.conv.weight"] = (1, 2, k, k)
        if cfg.spatial_bias:
            shapes["spatial.conv.bias"] = (1,)
        if cfg.spatial_bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"spatial.bn.{name}"] = (1,)
    return shapes


def _anchor_of(cfg: CBAMConfig) -> str:
    """The anchor whose structure the config has (for anchor_init)."""
    if cfg.channel_pool_order == "max_mean":
        return "jongchan"
    return "seed" if cfg.mlp_bias else "luuuyi"


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
    structure identifies (``max_mean`` -> Jongchan, ``mean_max`` with MLP bias
    -> seed, without -> luuuyi), drawn with refattn's RNG:
    Jongchan: Linear weights U(±1/sqrt(fan_in)) (PyTorch default), every bias
    0, the spatial conv Kaiming-normal fan_out, spatial BN gamma 0 and beta 0,
    running statistics (0, 1).  luuuyi: every conv (the 1x1 MLP convs too)
    N(0, 2/(k·k·out_channels)).  seed: PyTorch defaults, weights and biases
    U(±1/sqrt(fan_in)).
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
                gamma, beta, mean, var = zero, zero + 0.0, zero + 0.0, zero + 1.0
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
    if key == "spatial.conv.weight" and anchor != "seed":
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
    if anchor == "luuuyi":  # the MLP's 1x1 convs: N(0, 2 / out_channels)
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_out)
    return rng.uniform(-bound, bound, shape)


# ---------------------------------------------------------------------------
# channel gate


class ChannelGateCache(NamedTuple):
    pools: tuple[GlobalPoolCache, ...]  # one per pool type, in order
    fc1: LinearCache  # on the stacked descriptors (T, N, C)
    hidden: Array  # (T, N, Cr) ReLU inputs (kept for kink_margin)
    act: ReluCache
    fc2: LinearCache
    gate: GateMulCache  # x and s = σ(z), z (N, C, 1, 1)


def channel_gate_forward(
    x: Array, params: Params, cfg: CBAMConfig
) -> tuple[Array, Array, ChannelGateCache]:
    """The channel gate: x1 = x ⊗ σ(Σ_t MLP(pool_t(x))).

    Math:
        d_t = pool_t(x)                            t ∈ pool_types
        o_t = W2 relu(W1 d_t + b1) + b2            the same MLP for every t
        a   = σ(Σ_t o_t)
        x1  = x ⊙ a[:, :, None, None]
        (W1, b1 = mlp.fc1.*, W2, b2 = mlp.fc2.*: the paper's W_0, W_1)
    Shapes:
        x, x1  (N, C, H, W);  a (N, C)
        params mlp.fc1.weight (Cr, C), mlp.fc1.bias (Cr,),
               mlp.fc2.weight (C, Cr), mlp.fc2.bias (C,)  (biases with mlp_bias)
    Returns:
        (x1, a, cache)
    """
    xp = namespace(x=x)
    N, C = x.shape[0], x.shape[1]
    mlp = sub_params(params, "mlp")
    # 1. squeeze: one descriptor per pool type, stacked so that the shared MLP
    #    runs on all of them as the rows of one product
    # (x was checked once by `forward`: the ops' math steps check nothing)
    pooled = [_global_pool(x, t, False) for t in cfg.pool_types]
    d = xp.stack([p[0] for p in pooled], axis=0)  # (T, N, C)
    # 2. shared MLP, applied to every descriptor separately
    w1, b1 = mlp["fc1.weight"], mlp.get("fc1.bias")
    hidden, fc1 = _linear(d, w1, b1)  # (T, N, Cr)
    r, act = _relu(hidden)  # (T, N, Cr)
    o, fc2 = _linear(r, mlp["fc2.weight"], mlp.get("fc2.bias"))  # (T, N, C)
    # 3. excite: gate x by σ of the summed logits
    z = xp.reshape(xp.sum(o, axis=0), (N, C, 1, 1))  # (N, C, 1, 1)
    x1, gate = _gate_mul(x, z)  # (N, C, H, W)
    a = xp.reshape(gate.s, (N, C))  # (N, C)
    cache = ChannelGateCache(tuple(p[1] for p in pooled), fc1, hidden, act, fc2, gate)
    return x1, a, cache


def channel_gate_backward(dx1: Array, cache: ChannelGateCache) -> tuple[Array, Params]:
    """VJP of the channel gate.

    Math:
        dz  = Σ_{H,W} (dx1 ⊙ x) ⊙ a(1 − a)                     gate_mul
        do_t = dz for every t                                  z = Σ_t o_t
        dr_t = do_t W2,  dh_t = dr_t ⊙ 1[h_t > 0],  dd_t = dh_t W1
        dW2 = Σ_t do_tᵀ r_t,  db2 = Σ_t Σ_n do_t,  dW1 = Σ_t dh_tᵀ d_t,
        db1 = Σ_t Σ_n dh_t                                     shared MLP
        dx  = dx1 ⊙ a + Σ_t pool_t'(dd_t)
    Shapes:
        dx1, dx (N, C, H, W); dparams keyed like the mlp.* params
    Convention:
        relu'(0) = 0; the max descriptor sends its gradient to the first
        arg-max position, as torch.max does.
    """
    xp = namespace(dx1=dx1)
    c = cache
    T = len(c.pools)
    N, C = dx1.shape[0], dx1.shape[1]
    # 3. excite; z = Σ_t o_t, so every o_t receives the same dz
    dx_gate, dz = _gate_mul_backward(dx1, c.gate)  # (N, C, H, W), (N, C, 1, 1)
    do = xp.broadcast_to(xp.reshape(dz, (1, N, C)), (T, N, C))  # (T, N, C)
    # 2. shared MLP: the T applications are rows of one product, so each linear
    #    backward's sum over rows adds the T branches' gradients (shared weights)
    dr, dw2, db2 = _linear_backward(do, c.fc2)  # (T, N, Cr), (C, Cr), (C,)
    dhidden = _relu_backward(dr, c.act)  # (T, N, Cr)
    dd, dw1, db1 = _linear_backward(dhidden, c.fc1)  # (T, N, C), (Cr, C), (Cr,)
    dmlp = {"fc1.weight": dw1, "fc2.weight": dw2}
    if db1 is not None:
        dmlp |= {"fc1.bias": db1, "fc2.bias": db2}
    # 1. squeeze: x fed the gate and every pool, so sum the T + 1 paths, each
    #    pool's into the gate's dx (a fresh array, which a max touches at N·C
    #    entries)
    dx = dx_gate  # (N, C, H, W)
    for t in range(T):
        dx = _global_pool_backward(dd[t, ...], c.pools[t], into=dx)  # (N, C, H, W)
    return dx, with_prefix("mlp", dmlp)


# ---------------------------------------------------------------------------
# spatial gate


class SpatialGateCache(NamedTuple):
    pools: tuple[ChannelPoolCache, ChannelPoolCache]  # in channel_pool_order
    conv: Conv2dCache
    bn: BatchNormCache | None
    pre_relu: Array | None  # (N, 1, H, W) ReLU input with spatial_relu (kink_margin)
    act: ReluCache | None
    gate: GateMulCache  # x1 and s = σ(logit), logit (N, 1, H, W)


def spatial_gate_forward(
    x1: Array, params: Params, state: Params, cfg: CBAMConfig
) -> tuple[Array, Array, Array, Params, SpatialGateCache]:
    """The spatial gate: out = x1 ⊗ σ(act(BN(conv_k([pool_1 x1; pool_2 x1])))).

    Math:
        m     = cat(max_c x1, mean_c x1)  (max_mean) | cat(mean_c x1, max_c x1)
        s     = Ws ⋆ m + bs                k x k, zero padding (k − 1) // 2
        s     = BN(s)                      with spatial_bn (train: batch stats)
        s     = relu(s)                    with spatial_relu
        out   = x1 ⊙ σ(s)                  σ(s) broadcast over the channels
    Shapes:
        x1, out (N, C, H, W);  m (N, 2, H, W);  σ(s) (N, 1, H, W)
        params spatial.conv.weight (1, 2, k, k), spatial.conv.bias (1,),
               spatial.bn.weight (1,), spatial.bn.bias (1,)
        state  spatial.bn.running_mean (1,), spatial.bn.running_var (1,)
    Returns:
        (out, gate σ(s), m, new_state, cache); new_state holds the updated
        running statistics in BN train mode and is empty otherwise.
    """
    xp = namespace(x1=x1)
    k = cfg.spatial_kernel
    # 1. compress: two channel pools per position, in channel_pool_order
    kinds = ("max", "mean") if cfg.channel_pool_order == "max_mean" else ("mean", "max")
    pooled = [_channel_pool(x1, t) for t in kinds]
    m = xp.concat([p[0] for p in pooled], axis=1)  # (N, 2, H, W)
    # 2. k x k conv to one logit map, size kept by the padding
    p = (k - 1) // 2
    s, conv = _conv2d(
        m, params["spatial.conv.weight"], params.get("spatial.conv.bias"),
        (1, 1), (p, p), (1, 1), 1,  # stride, padding, dilation, groups
    )  # (N, 1, H, W)
    # 3. batch norm of the logit map (optional)
    bn = None
    new_state: Params = {}
    if cfg.spatial_bn is not None:
        (s, new_mean, new_var), bn = _batch_norm(
            s, params["spatial.bn.weight"], params["spatial.bn.bias"],
            state["spatial.bn.running_mean"], state["spatial.bn.running_var"],
            cfg.spatial_bn == "train", float(cfg.bn_momentum), float(cfg.bn_eps),
        )  # training, momentum, eps; y (N, 1, H, W)
        if cfg.spatial_bn == "train":
            new_state = {
                "spatial.bn.running_mean": new_mean,
                "spatial.bn.running_var": new_var,
            }
    # 4. ReLU (optional; off in every anchor)
    pre_relu = act = None
    if cfg.spatial_relu:
        pre_relu = s
        s, act = _relu(s)  # (N, 1, H, W)
    # 5. gate x1 by σ(s), broadcast over the channels
    out, gate = _gate_mul(x1, s)  # (N, C, H, W)
    cache = SpatialGateCache(tuple(p[1] for p in pooled), conv, bn, pre_relu, act, gate)
    return out, gate.s, m, new_state, cache


def spatial_gate_backward(dout: Array, cache: SpatialGateCache) -> tuple[Array, Params]:
    """VJP of the spatial gate.

    Math:
        ds   = Σ_c (dout ⊙ x1) ⊙ σ(s)(1 − σ(s))          gate_mul
        ds   ← ds ⊙ 1[s > 0]                              with spatial_relu
        ds   ← BN'(ds)                                    with spatial_bn
        dm   = conv_kᵀ(ds),  dWs = Σ_n ds ⋆ m,  dbs = Σ ds
        dx1  = dout ⊙ σ(s) + max_c'(dm_max) + dm_mean / C
    Shapes:
        dout, dx1 (N, C, H, W); dparams keyed like the spatial.* params
        (no buffers)
    Convention:
        relu'(0) = 0; the channel max sends its gradient to the first arg-max
        channel at each position, as torch.max(x, 1) does.
    """
    c = cache
    dparams: Params = {}
    # 5. gate
    dx1_gate, ds = _gate_mul_backward(dout, c.gate)  # (N, C, H, W), (N, 1, H, W)
    # 4. ReLU
    if c.act is not None:
        ds = _relu_backward(ds, c.act)  # (N, 1, H, W)
    # 3. batch norm
    if c.bn is not None:
        ds, dgamma, dbeta = _batch_norm_backward(ds, c.bn)  # (N, 1, H, W), (1,), (1,)
        dparams |= {"spatial.bn.weight": dgamma, "spatial.bn.bias": dbeta}
    # 2. conv
    dm, dw, db = _conv2d_backward(ds, c.conv)  # (N, 2, H, W), (1, 2, k, k), (1,)|None
    dparams["spatial.conv.weight"] = dw
    if db is not None:
        dparams["spatial.conv.bias"] = db
    # 1. compress: x1 fed the gate and both channel pools, so sum the three
    #    paths, each pool's into the gate's dx1 (a fresh array)
    dx1 = dx1_gate  # (N, C, H, W)
    for t, pool in enumerate(c.pools):
        dm_t = dm[:, t:t + 1, ...]  # (N, 1, H, W)
        dx1 = _channel_pool_backward(dm_t, pool, into=dx1)  # (N, C, H, W)
    return dx1, dparams


# ---------------------------------------------------------------------------
# the whole module


class CBAMCache(NamedTuple):
    channel: ChannelGateCache
    spatial: SpatialGateCache | None  # None with spatial=False


def cbam_forward(
    x: Array, params: Params, state: Params, cfg: CBAMConfig
) -> tuple[dict[str, Array], CBAMCache]:
    """CBAM: the channel gate, then (unless ``spatial=False``) the spatial gate.

    Math:
        x1  = x ⊙ M_c(x)                 channel_gate_forward
        out = x1 ⊙ M_s(x1)               spatial_gate_forward
    Shapes:
        x, out (N, C, H, W); aux.channel_gate (N, C); aux.spatial_gate
        (N, 1, H, W); aux.spatial_descriptor (N, 2, H, W)
    Returns:
        ({"out", "aux.*", "state.*" (BN train)}, cache); inputs are not
        validated here (``forward`` does that).
    """
    # 1. channel gate
    x1, a, channel = channel_gate_forward(x, params, cfg)  # (N, C, H, W), (N, C)
    outputs = {"out": x1, "aux.channel_gate": a}
    if not cfg.spatial:
        return outputs, CBAMCache(channel, None)
    # 2. spatial gate
    out, gate, m, new_state, spatial = spatial_gate_forward(x1, params, state, cfg)
    outputs |= {"out": out, "aux.spatial_gate": gate, "aux.spatial_descriptor": m}
    outputs |= {f"state.{k}": v for k, v in new_state.items()}
    return outputs, CBAMCache(channel, spatial)


def cbam_backward(dout: Array, cache: CBAMCache) -> tuple[Array, Params]:
    """VJP of CBAM: the spatial gate's backward, then the channel gate's.

    Math:
        dx1 = spatial_gate'(dout)        (dx1 = dout with spatial=False)
        dx  = channel_gate'(dx1)
    Shapes:
        dout, dx (N, C, H, W); dparams keyed like the trainable params
    """
    dparams: Params = {}
    # 2. spatial gate
    dx1 = dout
    if cache.spatial is not None:
        dx1, dparams = spatial_gate_backward(dout, cache.spatial)  # (N, C, H, W)
    # 1. channel gate
    dx, dmlp = channel_gate_backward(dx1, cache.channel)  # (N, C, H, W)
    return dx, dmlp | dparams


# ---------------------------------------------------------------------------
# the generic block contract (refattn/blocks/spec.py), for the three entries


class _GateCache(NamedTuple):
    part: str  # "channel" or "spatial"
    gate: ChannelGateCache | SpatialGateCache


def forward(
    inputs: Mapping[str, Array], params: Mapping[str, Array],
    state: Mapping[str, Array], cfg: CBAMConfig, *, part: Part = "cbam",
) -> tuple[dict[str, Array], CBAMCache | _GateCache]:
    """Validate, then run ``cbam_forward`` (part "cbam"), the channel gate
    alone ("channel") or the spatial gate alone ("spatial").

    Outputs: "out"; "aux.channel_gate" (N, C); "aux.spatial_gate"
    (N, 1, H, W); "aux.spatial_descriptor" (N, 2, H, W); in BN train mode
    "state.spatial.bn.running_mean" and "state.spatial.bn.running_var".
    """
    if not isinstance(cfg, CBAMConfig):
        raise TypeError(f"cfg: expected a CBAMConfig, got {type(cfg).__name__}")
    x = _check_inputs(inputs)
    _check_params(x, dict(params), dict(state), cfg, part)
    params, state = dict(params), dict(state)
    if part == "cbam":
        return cbam_forward(x, params, state, cfg)
    if part == "channel":
        out, a, channel = channel_gate_forward(x, params, cfg)  # (N, C, H, W)
        return {"out": out, "aux.channel_gate": a}, _GateCache(part, channel)
    out, gate, m, new_state, spatial = spatial_gate_forward(x, params, state, cfg)
    outputs = {"out": out, "aux.spatial_gate": gate, "aux.spatial_descriptor": m}
    outputs |= {f"state.{k}": v for k, v in new_state.items()}
    return outputs, _GateCache(part, spatial)


def backward(
    douts: Mapping[str, Array], cache: CBAMCache | _GateCache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """({"x": dx}, dparams) from {"out": dout}; dparams has the trainable keys."""
    if set(douts) != {"out"}:
        raise ValueError(
            f"douts: expected exactly the key 'out', got {sorted(douts)}"
        )
    dout = douts["out"]
    x = cache.channel.gate.x if isinstance(cache, CBAMCache) else cache.gate.gate.x
    check_array("douts['out']", dout, shape=tuple(x.shape))
    check_same_dtype(dout=dout, x=x)  # finite: checked by the block contract
    if isinstance(cache, CBAMCache):
        dx, dparams = cbam_backward(dout, cache)
    elif cache.part == "channel":
        dx, dparams = channel_gate_backward(dout, cache.gate)
    else:
        dx, dparams = spatial_gate_backward(dout, cache.gate)
    return {"x": dx}, dparams


def _check_inputs(inputs: Mapping[str, Array]) -> Array:
    if set(inputs) != {"x"}:
        raise ValueError(f"inputs: expected exactly the key 'x', got {sorted(inputs)}")
    x = inputs["x"]
    check_array("inputs['x']", x, ndim=4)
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(
            f"inputs['x']: expected a non-empty (N, C, H, W) array, got shape "
            f"{tuple(x.shape)}"
        )
    check_finite("inputs['x']", x)
    return x


def _flag_of(key: str, cfg: CBAMConfig, part: Part) -> str:
    """The config key that decides whether parameter `key` exists."""
    if key.startswith("spatial.") and part == "cbam" and not cfg.spatial:
        return "spatial=False"
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


def _check_keys(what: str, given: Mapping[str, Array], want: Mapping[str, Shape],
                cfg: CBAMConfig, part: Part) -> None:
    missing = [k for k in want if k not in given]
    extra = [k for k in given if k not in want]
    if not missing and not extra:
        return
    lines = []
    if missing:
        why = sorted({_flag_of(k, cfg, part) for k in missing} - {""})
        lines.append(
            f"missing key(s) {', '.join(map(repr, missing))}"
            + (f" (required with {', '.join(why)})" if why else "")
        )
    if extra:
        why = sorted({_flag_of(k, cfg, part) for k in extra} - {""})
        lines.append(
            f"unexpected key(s) {', '.join(map(repr, extra))}"
            + (f" (absent with {', '.join(why)})" if why else "")
        )
    raise ValueError(
        f"{what}: {'; '.join(lines)}: the presence flags of the {BLOCK_NAMES[part]} "
        f"config must agree with the keys given (expected {sorted(want)})"
    )


def _check_params(x: Array, params: Params, state: Params, cfg: CBAMConfig,
                  part: Part) -> None:
    shapes = param_shapes(cfg, {"x": tuple(x.shape)}, part=part)
    trainable = {k: s for k, s in shapes.items() if not is_buffer(k)}
    buffers = {k: s for k, s in shapes.items() if is_buffer(k)}
    _check_keys("params", params, trainable, cfg, part)
    _check_keys("state", state, buffers, cfg, part)
    for where, d in (("params", params), ("state", state)):
        for k, v in d.items():
            check_array(f"{where}[{k!r}]", v, shape=shapes[k])
            check_finite(f"{where}[{k!r}]", v)
    check_same_dtype(x=x, **params, **state)
    namespace(x=x, **params, **state)


# ---------------------------------------------------------------------------
# margins, accumulation lengths, anchors, BN mode, fixture shapes


def kink_margin(cache: CBAMCache | _GateCache) -> float:
    """The smallest relative distance of this forward from a kink or a tie:
    MLP hidden ReLU inputs from 0, the max descriptor's top two positions per
    channel, the channel max's top two channels per position, and the
    spatial ReLU input (spatial_relu) from 0.

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
        hidden = channel.hidden  # (T, N, Cr)
        xp = namespace(hidden=hidden)
        live = xp.any(hidden > 0, axis=(1, 2))  # (T,)
        if not bool(xp.all(live)):
            return 0.0
        margins.append(relu_margin(hidden))
        if any(p.kind == "max" for p in channel.pools):
            x = channel.gate.x
            flat = xp.reshape(x, (x.shape[0], x.shape[1], -1))  # (N, C, L)
            margins.append(max_gap(flat, axis=2))
    if spatial is not None:
        margins.append(max_gap(spatial.gate.x, axis=1))
        if spatial.pre_relu is not None:
            margins.append(relu_margin(spatial.pre_relu))
    return float(min(margins))


def accumulation(
    cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *, part: Part = "cbam"
) -> dict[str, int]:
    """Longest chain of summed terms behind each tensor family.

    Forward: pooling over L = H·W, fc1 over C, fc2 over Cr, the T logits;
    then the channel mean over C, the conv over 2·k·k and train-mode BN over
    N·L.  The backward adds the transposed sums (over C for the spatial gate,
    N·L for BN, k·k for the conv, L for the channel gate, C and Cr for the
    MLP); parameter gradients add their sum over the batch (N·L for the conv
    and BN, T·N for the MLP).
    """
    N, C, H, W = _x_shape(input_shapes)
    L = H * W
    k2 = cfg.spatial_kernel ** 2
    T = len(cfg.pool_types)
    bn_sum = N * L if cfg.spatial_bn == "train" else 1
    fwd = bwd = param = 0
    if _uses_channel(part):
        Cr = _hidden_width(cfg, (N, C, H, W))
        fwd += L + C + Cr + T
        bwd += L + C + Cr + T
        param = max(param, T * N)
    if _uses_spatial(cfg, part):
        fwd += C + 2 * k2 + bn_sum
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


def with_bn_mode(
    cfg: CBAMConfig, mode: str, *, part: Part = "cbam"
) -> CBAMConfig | None:
    """The config with ``spatial_bn = mode``; None when no BN is live."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if not _uses_spatial(cfg, part) or cfg.spatial_bn is None:
        return None
    return dataclasses.replace(cfg, spatial_bn=mode)


def fixture_shapes(cfg: CBAMConfig, *, part: Part = "cbam") -> dict[str, Shape]:
    """x (2, C, 7, 6) with C = 2·reduction (Cr = 2); C = 4 for the spatial
    gate alone.  H != W catches transposed spatial axes, and 7 >= every
    anchor kernel."""
    C = 4 if part == "spatial" else 2 * cfg.reduction
    return {"x": (2, C, 7, 6)}


def flops(cfg: CBAMConfig, input_shapes: Mapping[str, Shape], *,
          part: Part = "cbam") -> int:
    """The shared MLP on each of the T pooled vectors, 2·N·T·(C·Cr + Cr·C),
    and the spatial gate's conv, 2·N·H·W·2·k²."""
    N, C, H, W = _x_shape(input_shapes)
    total = 0
    if _uses_channel(part):
        Cr = _hidden_width(cfg, (N, C, H, W))
        total += len(cfg.pool_types) * 2 * N * (C * Cr + Cr * C)
    if _uses_spatial(cfg, part):
        total += 2 * N * H * W * 2 * cfg.spatial_kernel ** 2
    return total


_FIGURES = {"cbam": (12.0, 6.0), "channel": (12.0, 2.6), "spatial": (12.0, 3.4)}
_ANCHOR_SUFFIX = {"cbam": "", "channel": "_channel", "spatial": "_spatial"}


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
        forward=partial(forward, part=part),
        backward=backward,
        kink_margin=kink_margin,
        accumulation=partial(accumulation, part=part),
        anchor_names=partial(anchor_names, part=part),
        with_bn_mode=partial(with_bn_mode, part=part),
        flops=partial(flops, part=part),
        bench=(BenchCase("jongchan", {}, {"x": (8, 256, 28, 28)},
                         "x(8,256,28,28) r=16, avg+max, 7x7 conv + BN(train)")
               if part == "cbam" else None),
        figure=("draw_cbam", _FIGURES[part]),
        anchors={p: f"cbam:make_{p}{_ANCHOR_SUFFIX[part]}"
                 for p in ("jongchan", "luuuyi", "seed")},
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
