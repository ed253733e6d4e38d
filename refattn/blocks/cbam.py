"""CBAM: the Convolutional Block Attention Module, and its two gates alone.

Reference:
    S. Woo, J. Park, J.-Y. Lee, I. S. Kweon, "CBAM: Convolutional Block
    Attention Module", ECCV 2018 (arXiv:1807.06521).  Anchors: Jongchan/
    attention-module ``MODELS/cbam.py`` (preset ``jongchan``), luuuyi/
    CBAM.PyTorch ``model/resnet_cbam.py`` (``luuuyi``), the project's seed
    notes (``seed``), ultralytics ``nn/modules/conv.py`` ``CBAM``
    (``ultralytics``), timm ``layers/cbam.py`` ``CbamModule`` (``timm``) and
    ``LightCbamModule`` (``timm_light``); reference/blocks.md section 4.

Equations (paper notation, F the input feature map, ⊗ broadcast product):

    M_c(F)  = σ( Σ_t MLP(Pool_t(F)) ),   t ∈ pool_types (paper: avg, max)
    MLP(d)  = W_1 relu(W_0 d + b_0) + b_1            (one MLP, shared by every t)
    F'      = M_c(F) ⊗ F
    M_s(F') = σ( act(BN(f^{k×k}([Pool_1(F'); Pool_2(F')]))) )   channel pools
    F''     = M_s(F') ⊗ F'

The two channel pools of M_s are (max, mean) for ``channel_pool_order =
'max_mean'`` (Jongchan) and (mean, max) for ``'mean_max'`` (paper figure,
luuuyi, seed, ultralytics, timm); ``'avgmax'`` (timm's LightSpatialAttn)
replaces them by ONE map, ½(mean + max).  BN (``spatial_bn``) and act =
ReLU (``spatial_relu``) are optional; the paper has neither.  The MLP is
applied to each descriptor separately, so the ReLU acts per descriptor and
b_1 enters the logits once per pool type.

Variants of the channel gate: the pool type ``'avgmax'`` is the single
descriptor ½(avg + max) (timm's LightChannelAttn, SEModule(add_maxpool));
``mlp_layers = 1`` replaces the MLP by one C -> C layer, MLP(d) = W_0 d + b_0
(ultralytics' ChannelAttention); the hidden width Cr is ``hidden_channels``
when given, else timm's make_divisible(C / r, d) with ``hidden_divisor = d``,
else the anchors' C // r.

Paper symbol -> code:

    ========================  ======================================  ==========
    paper                     parameter key / variable                shape
    ========================  ======================================  ==========
    F                         input ``x``                             (N, C, H, W)
    r                         config ``reduction`` (Cr = C // r, or
                              ``hidden_channels``, or ``hidden_divisor``)
    Pool_t(F)                 ``d`` (descriptors stacked over t)      (T, N, C)
    W_0, b_0                  ``mlp.fc1.weight``, ``mlp.fc1.bias``    (Cr, C), (Cr,)
                              (with ``mlp_layers = 1``:               (C, C), (C,))
    W_1, b_1                  ``mlp.fc2.weight``, ``mlp.fc2.bias``    (C, Cr), (C,)
    M_c(F)                    ``a``, output ``aux.channel_gate``      (N, C)
    F'                        ``x1``                                  (N, C, H, W)
    [Pool_1; Pool_2](F')      ``m``, ``aux.spatial_descriptor``       (N, D, H, W)
    f^{k×k}                   ``spatial.conv.weight`` (+ ``.bias``)   (1, D, k, k)
    BN                        ``spatial.bn.weight``, ``.bias``,       (1,)
                              ``.running_mean``, ``.running_var``
    M_s(F')                   ``aux.spatial_gate``                    (N, 1, H, W)
    F''                       output ``out``                          (N, C, H, W)
    ========================  ======================================  ==========

D = 2 descriptor maps, or 1 with ``channel_pool_order = 'avgmax'``.

Three registry entries share ``CBAMConfig`` and the presets:

* ``cbam``          out = F'' (or F' with ``spatial=False``);
* ``cbam_channel``  out = M_c(x) ⊗ x alone; parameters ``mlp.*``; the keys
  ``spatial``, ``spatial_kernel``, ``channel_pool_order``, ``spatial_bias``,
  ``spatial_bn``, ``bn_eps``, ``bn_momentum`` and ``spatial_relu`` are inert;
* ``cbam_spatial``  out = M_s(x) ⊗ x alone; parameters ``spatial.*``; the keys
  ``reduction``, ``hidden_channels``, ``hidden_divisor``, ``mlp_layers``,
  ``pool_types``, ``mlp_bias`` and ``spatial`` are inert.

With ``mlp_layers = 1`` the keys ``reduction``, ``hidden_channels`` and
``hidden_divisor`` are inert too; ``hidden_channels`` makes ``reduction``
and ``hidden_divisor`` inert.

Inert keys are still validated and still written into golden manifests.
Checked entry points, shapes and draws: ``refattn/blocks/specs/cbam.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from refattn._typing import Array, Params
from refattn.backend import namespace
from refattn.ops.conv import Conv2dCache, _conv2d, _conv2d_backward
from refattn.ops.elementwise import (GateMulCache, ReluCache, _gate_mul,
                                     _gate_mul_backward, _relu, _relu_backward)
from refattn.ops.linear import LinearCache, _linear, _linear_backward
from refattn.ops.norm import (BatchNormCache, _batch_norm_named,
                              _batch_norm_named_backward)
from refattn.ops.pool import (ChannelPoolCache, GlobalPoolCache, _channel_pool,
                              _channel_pool_backward, _global_pool,
                              _global_pool_backward)
from refattn.params import sub_params, with_prefix

__all__ = ["PRESETS", "CBAMCache", "CBAMConfig", "ChannelGateCache", "SpatialGateCache",
           "backward", "cbam_backward", "cbam_forward", "channel_gate_backward",
           "channel_gate_forward", "forward", "spatial_gate_backward",
           "spatial_gate_forward"]

PoolType = Literal["avg", "max", "lp", "lse", "avgmax"]
Part = Literal["cbam", "channel", "spatial"]
POOL_TYPES: tuple[str, ...] = ("avg", "max", "lp", "lse", "avgmax")
CHANNEL_POOL_ORDERS = ("max_mean", "mean_max", "avgmax")
MLP_LAYERS = (1, 2)
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

    The defaults are the ``jongchan`` preset.  The rules each key obeys
    (``refattn/blocks/specs/cbam.py``) are checked where a config enters a
    public entry point; ``pool_types`` may be given as a list there.
    """

    reduction: int = 16  # r: the MLP's hidden width is Cr = C // r
    hidden_channels: int | None = None  # Cr itself; wins over r and d
    hidden_divisor: int | None = None  # d: Cr = make_divisible(C / r, d) (timm)
    mlp_layers: Literal[1, 2] = 2  # 1: one C -> C layer W_0, b_0, no ReLU
    pool_types: tuple[PoolType, ...] = ("avg", "max")  # the descriptors t
    mlp_bias: bool = True  # b_0, b_1
    spatial: bool = True  # False: the channel gate alone, out = F'
    spatial_kernel: int = 7  # k (odd)
    channel_pool_order: Literal["max_mean", "mean_max", "avgmax"] = "max_mean"
    spatial_bias: bool = False  # a bias on f^{k×k}
    spatial_bn: Literal["train", "eval"] | None = "train"  # BN of the logit map
    bn_eps: float = 1e-5
    bn_momentum: float = 0.01
    spatial_relu: bool = False  # act = ReLU (no anchor has it)


# Jongchan/attention-module: Linear MLP with bias, ChannelPool max-then-mean,
# BasicConv(2, 1, 7, relu=False): conv without bias + BatchNorm2d(1, eps=1e-5,
# momentum=0.01); a fresh module trains, so BN uses batch statistics.
_JONGCHAN = CBAMConfig(
    reduction=16, pool_types=("avg", "max"), mlp_bias=True,  # channel gate
    spatial=True, spatial_kernel=7, channel_pool_order="max_mean",  # spatial gate
    spatial_bias=False, spatial_bn="train", bn_eps=1e-5, bn_momentum=0.01,
    spatial_relu=False,
)

PRESETS: dict[str, CBAMConfig] = {
    "jongchan": _JONGCHAN,  # the full config above
    # luuuyi/CBAM.PyTorch: 1x1-conv MLP without bias (Cr = C // 16 hard-coded),
    # cat([mean, max]), k x k conv without bias, no BN.
    "luuuyi": replace(_JONGCHAN, mlp_bias=False, channel_pool_order="mean_max",
                      spatial_bn=None),
    # the seed notes: Linear MLP with bias, cat([mean, max]), Conv2d(2, 1, 7,
    # padding=3) with bias, no BN.
    "seed": replace(_JONGCHAN, channel_pool_order="mean_max", spatial_bn=None,
                    spatial_bias=True),
    # ultralytics CBAM: ChannelAttention = avg pool, ONE Conv2d(C, C, 1) with
    # bias, sigmoid; SpatialAttention = cat([mean, max]), Conv2d(2, 1, k,
    # padding k // 2, bias=False), sigmoid, no BN.  (reduction is inert.)
    "ultralytics": replace(_JONGCHAN, mlp_layers=1, pool_types=("avg",),
                           channel_pool_order="mean_max", spatial_bn=None),
    # timm CbamModule: 1x1-conv MLP without bias, Cr = make_divisible(C/16, 1,
    # round_limit=0) (C / 16 rounded half up, at least 1), avg + max; spatial
    # ConvNormAct(2, 1, k): cat([mean, max]), conv without bias, BatchNorm2d
    # (eps 1e-5, momentum 0.1), no act.
    "timm": replace(_JONGCHAN, mlp_bias=False, hidden_divisor=1,
                    channel_pool_order="mean_max", bn_momentum=0.1),
    # timm LightCbamModule: the MLP on ½(avg + max), the conv on ½(mean + max).
    "timm_light": replace(_JONGCHAN, mlp_bias=False, hidden_divisor=1,
                          pool_types=("avgmax",), channel_pool_order="avgmax",
                          bn_momentum=0.1),
}


# ---------------------------------------------------------------------------
# channel gate


def _descriptor(x: Array, t: str) -> tuple[Array, tuple[GlobalPoolCache, ...]]:
    """d_t = pool_t(x) (N, C); 'avgmax' is ½(avg + max), two pools' caches."""
    if t != "avgmax":
        d, pool = _global_pool(x, t, False)  # (N, C)
        return d, (pool,)
    avg, avg_pool = _global_pool(x, "avg", False)  # (N, C)
    mx, max_pool = _global_pool(x, "max", False)  # (N, C)
    return 0.5 * (avg + mx), (avg_pool, max_pool)  # (N, C)


def _descriptor_backward(dd: Array, pools: tuple[GlobalPoolCache, ...],
                         into: Array) -> Array:
    """dx += pool_t'(dd_t); each half of 'avgmax' gets ½ dd_t."""
    if len(pools) == 2:
        dd = 0.5 * dd  # (N, C)
    for pool in pools:
        into = _global_pool_backward(dd, pool, into=into)  # (N, C, H, W)
    return into


class ChannelGateCache(NamedTuple):
    pools: tuple[tuple[GlobalPoolCache, ...], ...]  # per pool type: its pools
    fc1: LinearCache  # on the stacked descriptors (T, N, C)
    hidden: Array | None  # (T, N, Cr) ReLU inputs (kink_margin); None: 1 layer
    act: ReluCache | None
    fc2: LinearCache | None
    gate: GateMulCache  # x and s = σ(z), z (N, C, 1, 1)


def channel_gate_forward(
    x: Array, params: Params, cfg: CBAMConfig
) -> tuple[Array, Array, ChannelGateCache]:
    """The channel gate: x1 = x ⊗ σ(Σ_t MLP(pool_t(x))).

    Math:
        d_t = pool_t(x)                            t ∈ pool_types
                                                   (avgmax: ½(avg + max))
        o_t = W2 relu(W1 d_t + b1) + b2            the same MLP for every t
        o_t = W1 d_t + b1                          mlp_layers = 1
        a   = σ(Σ_t o_t)
        x1  = x ⊙ a[:, :, None, None]
        (W1, b1 = mlp.fc1.*, W2, b2 = mlp.fc2.*: the paper's W_0, W_1)
    Shapes:
        x, x1  (N, C, H, W);  a (N, C)
        params mlp.fc1.weight (Cr, C), mlp.fc1.bias (Cr,),
               mlp.fc2.weight (C, Cr), mlp.fc2.bias (C,)  (biases with mlp_bias)
               mlp_layers = 1: mlp.fc1.weight (C, C), mlp.fc1.bias (C,)
    Returns:
        (x1, a, cache)
    """
    xp = namespace(x=x)
    N, C = x.shape[0], x.shape[1]
    mlp = sub_params(params, "mlp")
    # 1. squeeze: one descriptor per pool type, stacked so that the shared MLP
    #    runs on all of them as the rows of one product
    pooled = [_descriptor(x, t) for t in cfg.pool_types]
    d = xp.stack([p[0] for p in pooled], axis=0)  # (T, N, C)
    # 2. shared MLP, applied to every descriptor separately
    w1, b1 = mlp["fc1.weight"], mlp.get("fc1.bias")
    hidden, fc1 = _linear(d, w1, b1)  # (T, N, Cr); (T, N, C) with one layer
    o, act, fc2 = hidden, None, None
    if cfg.mlp_layers == 2:
        r, act = _relu(hidden)  # (T, N, Cr)
        o, fc2 = _linear(r, mlp["fc2.weight"], mlp.get("fc2.bias"))  # (T, N, C)
    # 3. excite: gate x by σ of the summed logits
    z = xp.reshape(xp.sum(o, axis=0), (N, C, 1, 1))  # (N, C, 1, 1)
    x1, gate = _gate_mul(x, z)  # (N, C, H, W)
    a = xp.reshape(gate.s, (N, C))  # (N, C)
    cache = ChannelGateCache(tuple(p[1] for p in pooled), fc1,
                             hidden if act is not None else None, act, fc2, gate)
    return x1, a, cache


def channel_gate_backward(dx1: Array, cache: ChannelGateCache) -> tuple[Array, Params]:
    """VJP of the channel gate.

    Math:
        dz  = Σ_{H,W} (dx1 ⊙ x) ⊙ a(1 − a)                     gate_mul
        do_t = dz for every t                                  z = Σ_t o_t
        dr_t = do_t W2,  dh_t = dr_t ⊙ 1[h_t > 0],  dd_t = dh_t W1
        dW2 = Σ_t do_tᵀ r_t,  db2 = Σ_t Σ_n do_t,  dW1 = Σ_t dh_tᵀ d_t,
        db1 = Σ_t Σ_n dh_t                                     shared MLP
        (mlp_layers = 1: dh_t = do_t, no W2, b2)
        dx  = dx1 ⊙ a + Σ_t pool_t'(dd_t)       (avgmax: ½ dd_t to each pool)
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
    dhidden, dw2, db2 = do, None, None  # (T, N, C) with one layer
    if c.fc2 is not None:
        dr, dw2, db2 = _linear_backward(do, c.fc2)  # (T, N, Cr), (C, Cr), (C,)
        dhidden = _relu_backward(dr, c.act)  # (T, N, Cr)
    dd, dw1, db1 = _linear_backward(dhidden, c.fc1)  # (T, N, C), (Cr, C), (Cr,)
    grads = {"fc1.weight": dw1, "fc2.weight": dw2, "fc1.bias": db1, "fc2.bias": db2}
    dmlp = {k: g for k, g in grads.items() if g is not None}
    # 1. squeeze: x fed the gate and every pool, so sum the T + 1 paths, each
    #    pool's into the gate's dx (a fresh array, which a max touches at N·C
    #    entries)
    dx = dx_gate  # (N, C, H, W)
    for t in range(T):
        dx = _descriptor_backward(dd[t, ...], c.pools[t], dx)  # (N, C, H, W)
    return dx, with_prefix("mlp", dmlp)


# ---------------------------------------------------------------------------
# spatial gate


class SpatialGateCache(NamedTuple):
    pools: tuple[ChannelPoolCache, ChannelPoolCache]  # (max, mean) or (mean, max)
    halves: bool  # True: m is ONE map ½(mean + max) ('avgmax')
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
              | ½(mean_c x1 + max_c x1)   (avgmax: one map)
        s     = Ws ⋆ m + bs                k x k, zero padding (k − 1) // 2
        s     = BN(s)                      with spatial_bn (train: batch stats)
        s     = relu(s)                    with spatial_relu
        out   = x1 ⊙ σ(s)                  σ(s) broadcast over the channels
    Shapes:
        x1, out (N, C, H, W);  m (N, D, H, W);  σ(s) (N, 1, H, W)
        (D = 2, or 1 with avgmax)
        params spatial.conv.weight (1, D, k, k), spatial.conv.bias (1,),
               spatial.bn.weight (1,), spatial.bn.bias (1,)
        state  spatial.bn.running_mean (1,), spatial.bn.running_var (1,)
    Returns:
        (out, gate σ(s), m, new_state, cache); new_state holds the updated
        running statistics in BN train mode and is empty otherwise.
    """
    xp = namespace(x1=x1)
    k = cfg.spatial_kernel
    # 1. compress: two channel pools per position, in channel_pool_order
    #    (or, for avgmax, their average)
    kinds = ("max", "mean") if cfg.channel_pool_order == "max_mean" else ("mean", "max")
    pooled = [_channel_pool(x1, t) for t in kinds]
    halves = cfg.channel_pool_order == "avgmax"
    if halves:
        m = 0.5 * (pooled[0][0] + pooled[1][0])  # (N, 1, H, W)
    else:
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
        s, new_state, bn = _batch_norm_named(
            s, params, state, "spatial.bn", training=cfg.spatial_bn == "train",
            momentum=float(cfg.bn_momentum), eps=float(cfg.bn_eps))  # y (N, 1, H, W)
    # 4. ReLU (optional; off in every anchor)
    pre_relu = act = None
    if cfg.spatial_relu:
        pre_relu = s
        s, act = _relu(s)  # (N, 1, H, W)
    # 5. gate x1 by σ(s), broadcast over the channels
    out, gate = _gate_mul(x1, s)  # (N, C, H, W)
    cache = SpatialGateCache(tuple(p[1] for p in pooled), halves, conv, bn, pre_relu,
                             act, gate)
    return out, gate.s, m, new_state, cache


def spatial_gate_backward(dout: Array, cache: SpatialGateCache) -> tuple[Array, Params]:
    """VJP of the spatial gate.

    Math:
        ds   = Σ_c (dout ⊙ x1) ⊙ σ(s)(1 − σ(s))          gate_mul
        ds   ← ds ⊙ 1[s > 0]                              with spatial_relu
        ds   ← BN'(ds)                                    with spatial_bn
        dm   = conv_kᵀ(ds),  dWs = Σ_n ds ⋆ m,  dbs = Σ ds
        dx1  = dout ⊙ σ(s) + max_c'(dm_max) + dm_mean / C
               (avgmax: dm_max = dm_mean = ½ dm)
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
        ds, dbn = _batch_norm_named_backward(ds, c.bn, "spatial.bn")  # (N, 1, H, W)
        dparams |= dbn
    # 2. conv
    dm, dw, db = _conv2d_backward(ds, c.conv)  # (N, D, H, W), (1, D, k, k), (1,)|None
    dparams["spatial.conv.weight"] = dw
    if db is not None:
        dparams["spatial.conv.bias"] = db
    # 1. compress: x1 fed the gate and both channel pools, so sum the three
    #    paths, each pool's into the gate's dx1 (a fresh array)
    dx1 = dx1_gate  # (N, C, H, W)
    for t, pool in enumerate(c.pools):
        dm_t = 0.5 * dm if c.halves else dm[:, t:t + 1, ...]  # (N, 1, H, W)
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
        (N, 1, H, W); aux.spatial_descriptor (N, D, H, W), D = 2 (1: avgmax)
    Returns:
        ({"out", "aux.*", "state.*" (BN train)}, cache)
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
# the block contract's forward and backward, for the three entries


class _GateCache(NamedTuple):
    part: str  # "channel" or "spatial"
    gate: ChannelGateCache | SpatialGateCache


def forward(
    inputs: Mapping[str, Array], params: Mapping[str, Array],
    state: Mapping[str, Array], cfg: CBAMConfig, *, part: Part = "cbam",
) -> tuple[dict[str, Array], CBAMCache | _GateCache]:
    """``cbam_forward`` (part "cbam"), the channel gate alone ("channel") or
    the spatial gate alone ("spatial"), on checked arguments.

    Outputs: "out"; "aux.channel_gate" (N, C); "aux.spatial_gate"
    (N, 1, H, W); "aux.spatial_descriptor" (N, D, H, W); in BN train mode
    "state.spatial.bn.running_mean" and "state.spatial.bn.running_var".
    """
    x = inputs["x"]
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
    dout = douts["out"]
    if isinstance(cache, CBAMCache):
        dx, dparams = cbam_backward(dout, cache)
    elif cache.part == "channel":
        dx, dparams = channel_gate_backward(dout, cache.gate)
    else:
        dx, dparams = spatial_gate_backward(dout, cache.gate)
    return {"x": dx}, dparams
