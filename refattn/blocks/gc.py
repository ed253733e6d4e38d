"""Global context (GC) block: Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks
Meet Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019
(arXiv:1904.11492), as implemented by mmcv's ``ContextBlock``
(``mmcv/cnn/bricks/context_block.py``) and the official xvjiarui/GCNet.

Paper (Eq. 3 and Fig. 4(d)), over the N_p = H·W positions j of one sample:

    z_i = F(x_i, δ(Σ_j α_j x_j)),   α_j = exp(W_k x_j) / Σ_m exp(W_k x_m)
    δ(·) = W_v2 ReLU(LN(W_v1 ·))

three parts: context modelling (one attention map shared by every query
position, so the context is ONE vector per sample), a bottleneck transform
δ of ratio r (P = int(C·r) channels in the middle, LayerNorm before the
ReLU) and fusion F, broadcast over all positions:

    channel_add   z = x + δ_add(c)
    channel_mul   z = x ⊙ σ(δ_mul(c))
    both          z = x ⊙ σ(δ_mul(c)) + δ_add(c)        (mul first, then add)

With ``pooling_type='avg'`` the context is the plain spatial mean (the SE
block's squeeze) instead of the attention pool.

| paper             | code                              | parameter key / output         |
|-------------------|-----------------------------------|--------------------------------|
| x                 | ``x`` (N, C, H, W), ``x3`` (N, C, L)| input ``x``                  |
| W_k               | 1x1 conv C -> 1                   | ``conv_mask.weight``, ``.bias``|
| W_k x_j           | ``logits`` (N, 1, L)              |                                |
| α                 | ``attention`` (N, 1, L)           | ``aux.attention`` (N, 1, H, W) |
| Σ_j α_j x_j       | ``context`` (N, C, 1)             |                                |
| W_v1 (per branch) | 1x1 conv C -> P                   | ``<b>.conv1.weight``, ``.bias``|
| LN (per branch)   | ``group_norm`` with G = 1         | ``<b>.ln.weight``, ``.bias``   |
| W_v2 (per branch) | 1x1 conv P -> C                   | ``<b>.conv2.weight``, ``.bias``|
| δ_mul(c)          | ``mul_term`` (N, C, 1, 1)         |                                |
| σ(δ_mul(c))       | the gate                          | ``aux.channel_mul`` (N, C, 1, 1)|
| δ_add(c)          | ``add_term`` (N, C, 1, 1)         |                                |
| z                 | ``out`` (N, C, H, W)              | ``out``                        |

``<b>`` is ``channel_add`` or ``channel_mul``.  Parameters (P = int(C·ratio)):
``conv_mask.weight (1, C, 1, 1)``, ``conv_mask.bias (1,)`` (``'att'`` only);
per fusion branch ``<b>.conv1.weight (P, C, 1, 1)``, ``<b>.conv1.bias (P,)``,
``<b>.ln.weight (P, 1, 1)``, ``<b>.ln.bias (P, 1, 1)`` (LayerNorm over
(P, 1, 1): affine per element of that shape), ``<b>.conv2.weight
(C, P, 1, 1)``, ``<b>.conv2.bias (C,)``.  mmcv's state_dict keys are
``channel_add_conv.0/1/3.*`` (``anchor_names``).

Checked entry points, shapes and draws: ``refattn/blocks/specs/gc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from refattn._typing import Array, ArrayDict, Arrays, Shape
from refattn.backend import namespace
from refattn.ops.conv import (PointwiseConvCache, _pointwise_conv,
                              _pointwise_conv_backward)
from refattn.ops.elementwise import (AddCache, GateMulCache, ReluCache, _add,
                                     _add_backward, _gate_mul, _gate_mul_backward,
                                     _relu, _relu_backward)
from refattn.ops.linear import (
    MatmulCache,
    _add_outer_products,
    _matmul,
    _matmul_backward,
)
from refattn.ops.norm import GroupNormCache, _group_norm, _group_norm_backward
from refattn.ops.pool import GlobalPoolCache, _global_pool, _global_pool_backward
from refattn.ops.softmax import SoftmaxCache, _softmax, _softmax_backward

__all__ = ["FUSION_TYPES", "POOLING_TYPES", "PRESETS", "GCCache", "GCConfig",
           "TransformCache", "backward", "forward"]

PoolingType = Literal["att", "avg"]

POOLING_TYPES: tuple[str, ...] = ("att", "avg")
FUSION_TYPES: tuple[str, ...] = ("channel_add", "channel_mul")
"""The fusion branches, in the canonical (parameter key) order; the forward
always applies channel_mul before channel_add, whatever the config's order."""


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class GCConfig:
    """Configuration of the GC block (mmcv ``ContextBlock``'s arguments)."""

    ratio: float = 1.0 / 4.0  # r: P = int(C · r) bottleneck channels
    planes: int | None = None  # P; None: int(C · ratio), as mmcv
    pooling_type: PoolingType = "att"  # context: attention pool α, or the mean
    fusion_types: tuple[str, ...] = ("channel_add",)  # F: x + δ_add, x ⊙ σ(δ_mul)
    ln_eps: float = 1e-5  # ε of the LayerNorm in δ (nn.LayerNorm's default)


# mmcv ContextBlock(C, ratio=1/4) with its defaults (pooling 'att', fusion
# ('channel_add',)): mmdetection's GCNet configs "r4_gcb_c3-c5"
_MMCV = GCConfig(
    ratio=1.0 / 4.0,
    planes=None,
    pooling_type="att",
    fusion_types=("channel_add",),
    ln_eps=1e-5,
)

PRESETS: dict[str, GCConfig] = {
    "mmcv": _MMCV,  # the full config above
    # the paper's GC-ResNet-50 setting (r = 16, att pooling, add fusion);
    # mmdetection's "r16_gcb_c3-c5" configs, xvjiarui/GCNet
    "gcnet_r16": replace(_MMCV, ratio=1.0 / 16.0),
}


def branches(cfg: GCConfig) -> tuple[str, ...]:
    """The fusion branches present, in the canonical order of FUSION_TYPES."""
    return tuple(b for b in FUSION_TYPES if b in cfg.fusion_types)


# ---------------------------------------------------------------------------
# forward and backward


class TransformCache(NamedTuple):
    conv1: PointwiseConvCache  # W_v1: C -> P
    ln: GroupNormCache  # LayerNorm over (P, 1, 1) = group norm with G = 1
    relu: ReluCache
    conv2: PointwiseConvCache  # W_v2: P -> C
    ln_out: Array  # (N, P, 1) the ReLU input (kink_margin only)


class GCCache(NamedTuple):
    cfg: GCConfig  # resolved
    x_shape: Shape  # (N, C, H, W)
    x3: Array  # (N, C, L) (dtype reference of the checks)
    mask: PointwiseConvCache | None  # 1. conv_mask ('att')
    softmax: SoftmaxCache | None  # 2. softmax over the positions ('att')
    pool: MatmulCache | GlobalPoolCache  # 3. attention pool | global mean
    mul: TransformCache | None  # 4. δ_mul
    gate: GateMulCache | None  # 5. x ⊙ σ(δ_mul)
    add: TransformCache | None  # 6. δ_add
    fuse: AddCache | None  # 7. + δ_add


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: GCConfig
            ) -> tuple[ArrayDict, GCCache]:
    """GC block forward.

    Math (per sample, L = H·W positions, x3 = x viewed as (C, L)):
        att:  α = softmax_L(w_k x3 + b_k)          (1, L)
              c = x3 αᵀ                            (C, 1)
        avg:  c = (1/L) Σ_j x3[:, j]               (C, 1)
        δ_b(c) = W_2 ReLU(LN(W_1 c + b_1)) + b_2   per branch b, (C, 1)
              LN(u) = γ ⊙ (u − mean u)/sqrt(var u + ε) + β over the P values
        out = x ⊙ σ(δ_mul(c)) + δ_add(c)           (either term optional)
    Shapes:
        inputs["x"]               (N, C, H, W)
        outputs["out"]            (N, C, H, W)
        outputs["aux.attention"]  (N, 1, H, W)  ('att' only)
        outputs["aux.channel_mul"]  (N, C, 1, 1)  σ(δ_mul(c)) (channel_mul only)
    Params: the keys of ``param_shapes``; ``cfg`` resolved (``planes`` set).
    """
    x = inputs["x"]
    xp = namespace(x=x)
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    x3 = xp.reshape(x, (N, C, L))  # (N, C, L)
    out = x  # (N, C, H, W): the fusions of steps 5 and 7 act on it
    outputs: dict[str, Array] = {}

    mask_cache = softmax_cache = None
    if cfg.pooling_type == "att":
        # 1. attention logits: the 1x1 conv W_k, C -> 1
        w_k = xp.reshape(params["conv_mask.weight"], (1, C))  # (1, C)
        logits, mask_cache = _pointwise_conv(x3, w_k, params["conv_mask.bias"], 1)
        # logits (N, 1, L)

        # 2. softmax over all L positions
        attention, softmax_cache = _softmax(logits, 2)  # (N, 1, L)
        outputs["aux.attention"] = xp.reshape(attention, (N, 1, H, W))

        # 3. context: the attention-weighted sum of x over the positions
        context, pool_cache = _matmul(x3, attention.mT)  # (N, C, 1)
    else:
        # 3. context: the mean of x over the positions
        pooled, pool_cache = _global_pool(x, "avg", False)  # (N, C)
        context = xp.reshape(pooled, (N, C, 1))  # (N, C, 1)

    mul_cache = gate_cache = add_cache = fuse_cache = None
    if "channel_mul" in cfg.fusion_types:
        # 4. transform δ_mul: conv1, LayerNorm, ReLU, conv2
        mul_term, mul_cache = _transform(context, params, "channel_mul", cfg.ln_eps)
        mul_term = xp.reshape(mul_term, (N, C, 1, 1))  # (N, C, 1, 1)

        # 5. multiplicative fusion: out = x ⊙ σ(δ_mul), broadcast over H, W
        out, gate_cache = _gate_mul(out, mul_term)  # (N, C, H, W)
        outputs["aux.channel_mul"] = gate_cache.s  # (N, C, 1, 1)

    if "channel_add" in cfg.fusion_types:
        # 6. transform δ_add: conv1, LayerNorm, ReLU, conv2
        add_term, add_cache = _transform(context, params, "channel_add", cfg.ln_eps)
        add_term = xp.reshape(add_term, (N, C, 1, 1))  # (N, C, 1, 1)

        # 7. additive fusion: out = out + δ_add, broadcast over H, W
        out, fuse_cache = _add(out, add_term)  # (N, C, H, W)

    cache = GCCache(cfg, (N, C, H, W), x3, mask_cache, softmax_cache, pool_cache,
                    mul_cache, gate_cache, add_cache, fuse_cache)
    return {"out": out} | outputs, cache


def backward(douts: Arrays, cache: GCCache) -> tuple[ArrayDict, ArrayDict]:
    """VJP of the GC block (the forward's steps in reverse).

    Math (per sample, D = d out, summed over the L positions where a term
    was broadcast):
        add:   dδ_add = Σ_L D;              D reaches the mul branch unchanged
        mul:   with s = σ(δ_mul):  dx += D ⊙ s,
               dδ_mul = (Σ_L D ⊙ x) ⊙ s ⊙ (1 − s)
        δ (per branch, u = W_1 c + b_1, û = (u − mean u)/sqrt(var u + ε)):
               dW_2 = dδ hᵀ, db_2 = dδ, dh = W_2ᵀ dδ;  dv = dh ⊙ 1[v > 0]
               dγ = dv ⊙ û, dβ = dv, dû = γ ⊙ dv
               du = (dû − mean dû − û ⊙ mean(dû ⊙ û)) / sqrt(var u + ε)
               dW_1 = du cᵀ, db_1 = du, dc += W_1ᵀ du
        att:   dx3 += dc α,  dα = dcᵀ x3;
               dlogits = α ⊙ (dα − Σ_L α ⊙ dα);
               dW_k = Σ dlogits x3ᵀ, db_k = Σ dlogits, dx3 += W_kᵀ dlogits
        avg:   dx3 += dc / L
    Shapes:
        douts["out"]  (N, C, H, W) -> dinputs["x"] (N, C, H, W)
        dparams: one entry per key of params, with its shape
    Convention:
        relu'(0) = 0.
    """
    c = cache
    cfg = c.cfg
    dout = douts["out"]
    xp = namespace(dout=dout)
    N, C, H, W = c.x_shape
    L = H * W
    dparams: dict[str, Array] = {}
    dcontext = None  # (N, C, 1): the sum over the branches

    # 7. additive fusion: out = out_5 + δ_add
    if c.fuse is not None:
        dout, dadd_term = _add_backward(dout, c.fuse)  # (N, C, H, W), (N, C, 1, 1)

        # 6. transform δ_add
        dcontext, grads = _transform_backward(
            xp.reshape(dadd_term, (N, C, 1)), c.add, "channel_add")  # (N, C, 1)
        dparams |= grads

    # 5. multiplicative fusion: out_5 = x ⊙ σ(δ_mul)
    if c.gate is not None:
        dx, dmul_term = _gate_mul_backward(dout, c.gate)  # (N, C, H, W), (N, C, 1, 1)

        # 4. transform δ_mul
        dcontext_mul, grads = _transform_backward(
            xp.reshape(dmul_term, (N, C, 1)), c.mul, "channel_mul")  # (N, C, 1)
        dparams |= grads
        dcontext = dcontext_mul if dcontext is None else dcontext + dcontext_mul
    else:
        dx = dout  # (N, C, H, W): x reaches the output unchanged

    if cfg.pooling_type == "att":
        # 3. context = x3 αᵀ: dα = x3ᵀ dc; x's share dc α joins the sum below
        _, dattention_t = _matmul_backward(dcontext, c.pool, need_da=False)  # (N, L, 1)

        # 2. softmax over the positions
        dlogits = _softmax_backward(dattention_t.mT, c.softmax)  # (N, 1, L)

        # 1. attention logits: the 1x1 conv W_k; x's share W_kᵀ dlogits joins
        #    the sum below
        _, dw_k, db_k = _pointwise_conv_backward(dlogits, c.mask, need_dx=False)
        # dw_k (1, C), db_k (1,)
        dparams["conv_mask.weight"] = xp.reshape(dw_k, (1, C, 1, 1))
        dparams["conv_mask.bias"] = db_k

        # x's three paths, summed in one pass: dx + (dc α + W_kᵀ dlogits),
        # the order of the committed fixtures' sums
        attention = c.pool.b.mT  # (N, 1, L)
        w_k_t = xp.reshape(c.mask.weight, (C, 1))  # (C, 1)
        dx3 = _add_outer_products(xp.reshape(dx, (N, C, L)), dcontext, attention,
                                  w_k_t, dlogits)  # (N, C, L)
        dx = xp.reshape(dx3, (N, C, H, W))  # (N, C, H, W)
    else:
        # 3. context = the mean over the positions, added into a fresh dx
        into = dx if c.gate is not None else dout + 0.0  # (N, C, H, W)
        dx = _global_pool_backward(xp.reshape(dcontext, (N, C)), c.pool, into=into)
    return {"x": dx}, dparams


def _transform(
    context: Array, params: Arrays, branch: str, eps: float
) -> tuple[Array, TransformCache]:
    """δ(c) = W_2 ReLU(LN(W_1 c + b_1)) + b_2 on the context (N, C, 1).

    LayerNorm over (P, 1, 1) normalises the P values of each sample together:
    on (N, P, 1) it is group norm with one group, and its (P, 1, 1) affine is
    one γ, β per channel.
    """
    xp = namespace(context=context)
    C = int(context.shape[1])
    w1 = params[f"{branch}.conv1.weight"]
    P = int(w1.shape[0])
    u, conv1 = _pointwise_conv(context, xp.reshape(w1, (P, C)),
                               params[f"{branch}.conv1.bias"], 1)  # (N, P, 1)
    v, ln = _group_norm(u, xp.reshape(params[f"{branch}.ln.weight"], (P,)),
                        xp.reshape(params[f"{branch}.ln.bias"], (P,)), 1, eps)
    h, relu = _relu(v)  # (N, P, 1)
    w2 = xp.reshape(params[f"{branch}.conv2.weight"], (C, P))  # (C, P)
    t, conv2 = _pointwise_conv(h, w2, params[f"{branch}.conv2.bias"], 1)  # (N, C, 1)
    return t, TransformCache(conv1, ln, relu, conv2, v)


def _transform_backward(
    dt: Array, cache: TransformCache, branch: str
) -> tuple[Array, dict[str, Array]]:
    """VJP of _transform: (d context (N, C, 1), the branch's parameter grads)."""
    xp = namespace(dt=dt)
    dh, dw2, db2 = _pointwise_conv_backward(dt, cache.conv2)  # (N, P, 1), (C, P), (C,)
    dv = _relu_backward(dh, cache.relu)  # (N, P, 1)
    du, dgamma, dbeta = _group_norm_backward(dv, cache.ln)  # (N, P, 1), (P,), (P,)
    dcontext, dw1, db1 = _pointwise_conv_backward(du, cache.conv1)  # (N, C, 1)
    P, C = int(dw1.shape[0]), int(dw1.shape[1])
    grads = {
        f"{branch}.conv1.weight": xp.reshape(dw1, (P, C, 1, 1)),
        f"{branch}.conv1.bias": db1,
        f"{branch}.ln.weight": xp.reshape(dgamma, (P, 1, 1)),
        f"{branch}.ln.bias": xp.reshape(dbeta, (P, 1, 1)),
        f"{branch}.conv2.weight": xp.reshape(dw2, (C, P, 1, 1)),
        f"{branch}.conv2.bias": db2,
    }
    return dcontext, grads


def planes_of(cfg: GCConfig, channels: int) -> int:
    """P: ``planes``, or mmcv's ``int(C * ratio)``."""
    return int(cfg.planes) if cfg.planes is not None else int(channels * cfg.ratio)
