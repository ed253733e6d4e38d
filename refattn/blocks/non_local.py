"""Non-local block: Wang, Girshick, Gupta, He, "Non-local Neural Networks",
CVPR 2018 (arXiv:1711.07971), with the variants of its public implementations
(AlexHex7/Non-local_pytorch, facebookresearch/video-nonlocal-net, and the
PyTorch port ``SpatialNL`` in KaiyuYue/cgnl-network.pytorch, mmcv's
``NonLocal2d``, timm's ``NonLocalAttn``, and SAGAN's self-attention, which is
DANet's position attention).

Paper (Eq. 1 and 6, instantiations of section 3.2), over all positions j:

    y_i = (1 / C(x)) Σ_j f(x_i, x_j) g(x_j),        z_i = W_z y_i + x_i

    mode               f(x_i, x_j)                    f / C(x)
    embedded_gaussian  exp(θ(x_i)ᵀ φ(x_j))            softmax_j(s θ_iᵀ φ_j)
    gaussian           exp(x_iᵀ x_j)                  softmax_j(s x_iᵀ φ_j), φ = P(x)
    dot_product        θ(x_i)ᵀ φ(x_j)                 f / N_k
    concatenation      ReLU(w_fᵀ [θ(x_i); φ(x_j)])    f / N_k

θ, φ are 1x1 convolutions C -> Ci, g one C -> Cv (Cv = Ci unless set) and
W_z a 1x1 convolution Cv -> C, optionally followed by batch norm, or absent
(SAGAN: y itself, Cv = C, scaled by a learned scalar γ before the residual).
The key/value branch (φ and g) may be sub-sampled by a max-pool P (kernel =
stride = (2,), (2, 2) or (1, 2, 2)): after the projection, ``P(W x)`` (paper,
AlexHex7) or before it, ``W P(x)`` with one pool shared by φ and g
(facebook).  Only keys and values are sub-sampled, so the output keeps the
input's (query) size.  The optional scale is ``s = 1/sqrt(Ci)``
(``1/sqrt(C)`` in gaussian mode or with ``scale_channels='in'``, timm's),
softmax modes only; N_k is the number of key positions after sub-sampling.

Computation (per sample; Θ (Ci, Lq), Φ (Ci, Lk), G (Ci, Lk) channel-first):

    F = Θᵀ Φ          (Lq, Lk)   one batched matmul
    A = normalise(F)  over keys (the last axis)
    Y = (A Gᵀ)ᵀ       (Ci, Lq)   the transpose back to channel-first before
                                 the reshape to (Ci, *S)

Concatenation never builds the (Lq, Lk, 2Ci) tensor: the 1x1 conv w_f is
linear before its ReLU, so ``w_fᵀ [θ_i; φ_j] = u_i + v_j`` with
``u = aᵀ Θ`` and ``v = bᵀ Φ`` (a, b the first and last Ci entries of w_f).

| paper            | code                                | parameter key / output     |
|------------------|-------------------------------------|----------------------------|
| x                | ``x`` (N, C, *S), ``x3`` (N, C, Lq) | input ``x``                |
| θ, W_θ           | ``theta`` (N, Ci, Lq)               | ``theta.weight``, ``.bias``|
| φ, W_φ           | ``phi`` (N, Ci, Lk)                 | ``phi.weight``, ``.bias``  |
| g, W_g           | ``g`` (N, Ci, Lk)                   | ``g.weight``, ``.bias``    |
| P (sub-sampling) | ``max_pool_forward``                | config ``sub_sample``      |
| f(x_i, x_j)      | ``f`` (N, Lq, Lk)                   |                            |
| f / C(x)         | ``attention`` A (N, Lq, Lk)         | ``aux.attention``          |
| w_f = [a; b]     | ``w_cat`` (1, 2Ci)                  | ``concat_project.weight``  |
| b_f              | ``bias`` of ``_concat_forward``     | ``concat_project.bias``    |
| y                | ``y`` (N, Cv, Lq)                   |                            |
| W_z              | ``W``                               | ``W.weight``, ``W.bias``   |
| BN after W_z     | ``batch_norm_forward``              | ``W_bn.*``                 |
| γ (SAGAN)        | ``params["gamma"]``                 | ``gamma``                  |
| z                | ``out`` (N, C, *S)                  | ``out``                    |

Parameters (``Ci = inter_channels``, ``Cv = value_channels``,
``k = (1,) * len(S)``): ``theta.weight (Ci, C, *k)``, ``phi.weight (Ci, C,
*k)`` (not in gaussian mode), ``g.weight (Cv, C, *k)``, each with a ``.bias``
when ``bias``; ``W.weight (C, Cv, *k)`` with ``out_proj``, and ``W.bias``
with ``out_bias``; ``concat_project.weight (1, 2Ci, 1, 1)`` (concatenation
only) and its ``.bias (1,)`` with ``concat_bias``; ``gamma (1,)`` with
``gamma``; ``W_bn.weight``, ``W_bn.bias`` and the buffers
``W_bn.running_mean``, ``W_bn.running_var`` ``(C,)`` when ``bn`` is set.

Checked entry points, shapes and draws: ``refattn/blocks/specs/non_local.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from refattn._typing import Array, ArrayDict, Arrays, Shape
from refattn.backend import device, matmul, namespace, prod
from refattn.ops.conv import (PointwiseConvCache, _pointwise_conv,
                              _pointwise_conv_backward)
from refattn.ops.elementwise import (AddCache, ReluCache, _add, _add_backward, _relu,
                                     _relu_backward)
from refattn.ops.linear import MatmulCache, _matmul, _matmul_backward, _product_into
from refattn.ops.norm import (BatchNormCache, _batch_norm_named,
                              _batch_norm_named_backward)
from refattn.ops.pool import MaxPoolCache, _geometry, _max_pool, _max_pool_backward
from refattn.ops.softmax import SoftmaxCache, _softmax, _softmax_backward
from refattn.params import with_prefix

__all__ = ["MODES", "POOL_KERNELS", "PRESETS", "SOFTMAX_MODES", "NonLocalCache",
           "NonLocalConfig", "backward", "forward"]

Mode = Literal["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
PoolPosition = Literal["after_proj", "before_proj"]
BnMode = Literal["train", "eval"]
ScaleChannels = Literal["inter", "in"]

MODES: tuple[str, ...] = (
    "embedded_gaussian", "gaussian", "dot_product", "concatenation"
)
SOFTMAX_MODES: tuple[str, ...] = ("embedded_gaussian", "gaussian")
POOL_POSITIONS: tuple[str, ...] = ("after_proj", "before_proj")
BN_MODES: tuple[str | None, ...] = (None, "train", "eval")
SCALE_CHANNELS: tuple[str, ...] = ("inter", "in")

POOL_KERNELS: dict[int, tuple[int, ...]] = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
"""Sub-sampling max-pool kernel (= stride) per spatial rank: time is never pooled."""


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class NonLocalConfig:
    """Configuration of the non-local block (keys of blocks.md section 9.2).

    ``use_scale`` is a softmax-mode option: the no-softmax modes normalise by
    the key count N_k, and a scale there would only rescale ``W``, so
    ``use_scale=True`` with ``dot_product`` or ``concatenation`` is rejected
    (facebook's ``USE_SOFTMAX = False`` branch ignores ``USE_SCALE``; its
    faithful config is ``mode='dot_product', use_scale=False``).
    """

    mode: Mode = "embedded_gaussian"  # the pairwise function f and its C(x)
    inter_channels: int | None = None  # Ci; None: from reduction and divisor
    sub_sample: bool = True  # the max-pool P on keys and values
    pool_position: PoolPosition = "after_proj"  # P(W x) or W P(x)
    use_scale: bool = False  # s = 1/sqrt(Ci) (1/sqrt(C) in gaussian mode)
    bias: bool = True  # biases of θ, φ, g and W_z
    bn: BnMode | None = "train"  # BN after W_z
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    residual: bool = True  # z = W_z y + x
    reduction: int = 2  # Ci = max(C // reduction, 1) when inter_channels is None
    divisor: int | None = None  # else Ci = C / reduction rounded to a multiple of it
    value_channels: int | None = None  # Cv, g's width; None: Ci (C without W_z)
    out_proj: bool = True  # W_z (without it, y itself, Cv = C, is added to x)
    out_bias: bool | None = None  # W_z's bias; None: as ``bias``
    gamma: bool = False  # a learned scalar γ: z = γ W_z y + x
    scale_channels: ScaleChannels = "inter"  # s = 1/sqrt(Ci) or 1/sqrt(C)
    concat_bias: bool = False  # a bias in w_f: ReLU(w_fᵀ[θ_i; φ_j] + b_f)


# AlexHex7/Non-local_pytorch, non_local_embedded_gaussian.py (the other three
# files are the same preset with `mode` changed); bn=None is bn_layer=False
_ALEXHEX7 = NonLocalConfig(
    mode="embedded_gaussian", inter_channels=None, use_scale=False, bias=True,
    sub_sample=True, pool_position="after_proj",  # max-pool of φ x and g x
    bn="train", bn_eps=1e-5, bn_momentum=0.1, residual=True,  # W_z: conv + BN
)

PRESETS: dict[str, NonLocalConfig] = {
    "alexhex7": _ALEXHEX7,  # the full config above
    # facebookresearch/video-nonlocal-net (Caffe2 momentum 0.9 = PyTorch 0.1)
    "facebook": replace(_ALEXHEX7, pool_position="before_proj", use_scale=True),
    # KaiyuYue/cgnl-network.pytorch, SpatialNL(inplanes, inplanes // 2, use_scale=True)
    "cgnl_repo": replace(_ALEXHEX7, sub_sample=False, use_scale=True, bias=False),
    # mmcv NonLocal2d defaults (norm_cfg=None): W_z keeps its bias, no norm
    "mmcv": replace(_ALEXHEX7, sub_sample=False, use_scale=True, bn=None),
    # mmcv NonLocal2d with norm_cfg=BN (mmseg's NLHead, mmdet, mmaction): a
    # ConvModule with a norm drops its conv bias, so W_z has none
    "mmcv_bn": replace(_ALEXHEX7, sub_sample=False, use_scale=True, out_bias=False),
    # timm NonLocalAttn: Ci = make_divisible(C / 8, 8), scale 1/sqrt(C)
    "timm": replace(_ALEXHEX7, sub_sample=False, use_scale=True, scale_channels="in",
                    reduction=8, divisor=8),
    # SAGAN self-attention (Zhang et al. 2019) = DANet's position attention:
    # query/key at C // 8, value at C, no W_z and no BN, out = γ y + x
    "sagan": replace(_ALEXHEX7, sub_sample=False, reduction=8, out_proj=False,
                     bn=None, gamma=True),
}


# ---------------------------------------------------------------------------
# shapes


def _pooled(spatial: Shape) -> Shape:
    kernel = POOL_KERNELS[len(spatial)]
    return tuple(s // k for s, k in zip(spatial, kernel))


def _key_count(cfg: NonLocalConfig, x_shape: Shape) -> int:
    spatial = tuple(x_shape[2:])
    return prod(_pooled(spatial) if cfg.sub_sample else spatial)


def _embedded(cfg: NonLocalConfig) -> bool:
    """True when theta and phi are 1x1 convs (every mode but gaussian)."""
    return cfg.mode != "gaussian"


def _kv_names(cfg: NonLocalConfig) -> tuple[str, ...]:
    return ("phi", "g") if _embedded(cfg) else ("g",)


# ---------------------------------------------------------------------------
# forward and backward


class StackedConvCache(NamedTuple):
    conv: PointwiseConvCache
    names: tuple[str, ...]  # the stacked projections, in row order
    shapes: tuple[Shape, ...]  # each one's weight shape (Ci, C, *k)


class ConcatCache(NamedTuple):
    theta_side: MatmulCache  # u = aᵀ Θ (+ b_f)
    phi_side: MatmulCache  # v = b Φ
    pair: AddCache  # u_i + v_j
    relu: ReluCache
    u: Array  # (N, Lq, 1) (kink_margin only)
    v: Array  # (N, 1, Lk) (kink_margin only)
    has_bias: bool  # b_f added to u


class NonLocalCache(NamedTuple):
    cfg: NonLocalConfig  # resolved
    x_shape: Shape  # (N, C, *S)
    lk: int  # key positions N_k
    scale: float  # affinity scale s (1.0 unless use_scale)
    proj: StackedConvCache | None  # 1. the 1x1 convs on x
    pool: MaxPoolCache | None  # 2. the sub-sampling max-pool
    pooled: Array | None  # 2. what was pooled (N, K, *S) (kink_margin only)
    kv_proj: StackedConvCache | None  # 3. the 1x1 convs on the pooled x
    affinity: MatmulCache | None  # 4. Θᵀ Φ (all modes but concatenation)
    concat: ConcatCache | None  # 4. concatenation
    softmax: SoftmaxCache | None  # 5. softmax modes
    attend: MatmulCache  # 6. A Gᵀ
    w: PointwiseConvCache | None  # 7. W
    bn: BatchNormCache | None  # 8. W_bn
    z: Array | None  # 9. what γ scales (N, C, Lq), with a learned scalar
    gamma: Array | None  # 9. γ (1,)


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: NonLocalConfig
            ) -> tuple[ArrayDict, NonLocalCache]:
    """Non-local block forward.

    Math:
        Θ = W_θ x + b_θ                     (gaussian: Θ = x)
        Φ = P(W_φ x + b_φ)  or  W_φ P(x) + b_φ   (after_proj / before_proj;
        G = P(W_g x + b_g)  or  W_g P(x) + b_g    gaussian: Φ = P(x); no P
                                                   without sub_sample)
        F = Θᵀ Φ;  A = softmax_keys(s F) | F / N_k | ReLU(aᵀΘ_i + bᵀΦ_j) / N_k
        Y = (A Gᵀ)ᵀ;  out = γ BN(W Y + b_W) + x   (W, BN, γ and + x optional)
    Shapes:
        inputs["x"]            (N, C, *S), S = (L,), (H, W) or (T, H, W)
        outputs["out"]         (N, C, *S)
        outputs["aux.attention"]  (N, Lq, Lk), Lq = |S|, Lk = |P(S)|
        outputs["state.W_bn.running_mean" / "...running_var"]  (C,), bn='train'
    Params and state: the keys of ``param_shapes`` (buffers in ``state``);
    ``cfg`` resolved (``inter_channels`` set).
    """
    x = inputs["x"]
    xp = namespace(x=x)
    N, C = int(x.shape[0]), int(x.shape[1])
    spatial = tuple(int(s) for s in x.shape[2:])
    lq, lk = prod(spatial), _key_count(cfg, tuple(x.shape))
    ci = int(cfg.inter_channels)  # type: ignore[arg-type]
    embedded = _embedded(cfg)
    pool_first = cfg.sub_sample and cfg.pool_position == "before_proj"
    x3 = xp.reshape(x, (N, C, lq))  # (N, C, Lq)

    # 1. 1x1 convs on x, stacked into one matmul: theta, then phi and g unless
    #    the pool comes first
    x_names = (("theta",) if embedded else ()) + (() if pool_first else _kv_names(cfg))
    proj, proj_cache = _stacked_conv_forward(x3, params, x_names)  # (N, k·Ci, Lq)
    theta = proj[:, :ci, :] if embedded else x3  # (N, Ci, Lq) | (N, C, Lq)

    # 2. key/value source, sub-sampled by the max-pool: x itself (before_proj),
    #    the phi|g rows of step 1, or x|g (gaussian)
    if pool_first:
        kv_full = x3  # (N, C, Lq)
    elif embedded:
        kv_full = proj[:, ci:, :]  # (N, 2Ci, Lq)
    else:
        kv_full = xp.concat([x3, proj], axis=1)  # (N, C + Ci, Lq)
    K = int(kv_full.shape[1])
    pool_cache, pooled = None, None
    if cfg.sub_sample:
        pooled = xp.reshape(kv_full, (N, K) + spatial)  # (N, K, *S)
        kernel = POOL_KERNELS[len(spatial)]
        geometry = _geometry(pooled.shape, kernel, None)  # kernel, stride, out size
        kv, pool_cache = _max_pool(pooled, *geometry)  # (N, K, *P(S))
        kv = xp.reshape(kv, (N, K, lk))  # (N, K, Lk)
    else:
        kv = kv_full  # (N, K, Lk = Lq)

    # 3. 1x1 convs on the pooled x (before_proj): phi and g stacked
    kv_cache = None
    if pool_first:
        kv_proj, kv_cache = _stacked_conv_forward(kv, params, _kv_names(cfg))
        phi = kv_proj[:, :ci, :] if embedded else kv  # (N, Ci, Lk) | (N, C, Lk)
        g = kv_proj[:, ci:, :] if embedded else kv_proj  # (N, Ci, Lk)
    else:
        c_phi = ci if embedded else C
        phi, g = kv[:, :c_phi, :], kv[:, c_phi:, :]  # (N, Ci|C, Lk), (N, Ci, Lk)

    # 4. pairwise function f over (query i, key j)
    affinity_cache, concat_cache = None, None
    scale = 1.0
    if cfg.mode == "concatenation":
        w_f, b_f = params["concat_project.weight"], params.get("concat_project.bias")
        f, concat_cache = _concat_forward(theta, phi, w_f, b_f)  # (N, Lq, Lk)
    else:
        f, affinity_cache = _matmul(theta.mT, phi)  # (N, Lq, Lk)
        if cfg.use_scale:
            width = C if cfg.scale_channels == "in" else theta.shape[1]  # Ci | C
            scale = 1.0 / math.sqrt(width)
            f *= scale  # (N, Lq, Lk), in place on the fresh product

    # 5. normalise over the keys (last axis)
    softmax_cache = None
    if cfg.mode in SOFTMAX_MODES:
        attention, softmax_cache = _softmax(f, f.ndim - 1)  # (N, Lq, Lk)
    else:
        attention = f * (1.0 / lk)  # (N, Lq, Lk)

    # 6. Y = A Gᵀ, transposed back to channel-first: (N, Cv, Lq)
    y_t, attend_cache = _matmul(attention, g.mT)  # (N, Lq, Cv)
    y = y_t.mT  # (N, Cv, Lq)

    # 7. W: Cv -> C (without it, y itself: Cv = C)
    z, w_cache = y, None  # (N, C, Lq)
    if cfg.out_proj:
        w2 = xp.reshape(params["W.weight"], (C, int(y.shape[1])))  # (C, Cv)
        z, w_cache = _pointwise_conv(y, w2, params.get("W.bias"), 1)  # (N, C, Lq)

    # 8. batch norm after W
    outputs: dict[str, Array] = {}
    bn_cache = None
    if cfg.bn is not None:
        z, new_state, bn_cache = _batch_norm_named(
            z, params, state, "W_bn", training=cfg.bn == "train",
            momentum=float(cfg.bn_momentum), eps=float(cfg.bn_eps))  # y (N, C, Lq)
        outputs |= with_prefix("state", new_state)

    # 9. the learned scalar, then the residual
    z_unscaled = None
    if cfg.gamma:
        z_unscaled, z = z, params["gamma"] * z  # (N, C, Lq)
    out = z + x3 if cfg.residual else z  # (N, C, Lq)
    outputs = {
        "out": xp.reshape(out, tuple(x.shape)),  # (N, C, *S)
        "aux.attention": attention,
    } | outputs
    cache = NonLocalCache(
        cfg, tuple(x.shape), lk, scale, proj_cache, pool_cache, pooled, kv_cache,
        affinity_cache, concat_cache, softmax_cache, attend_cache, w_cache, bn_cache,
        z_unscaled, params.get("gamma"),
    )
    return outputs, cache


def backward(douts: Arrays, cache: NonLocalCache) -> tuple[ArrayDict, ArrayDict]:
    """VJP of the non-local block (the forward's steps in reverse).

    Math (per sample, D = d out):
        dZ = D (through BN);  dY = Wᵀ dZ;  dW = Σ dZ Yᵀ
        dA = dYᵀ G;  dG = (Aᵀ dYᵀ)ᵀ
        softmax: dF = s · A ⊙ (dA − rowsum(A ⊙ dA));  no-softmax: dF = dA / N_k
        concatenation: R = 1[u_i + v_j > 0] ⊙ dA / N_k, du = rowsum R,
                       dv = colsum R, da = Θ du, db = Φ dv
        dΘ = (dF Φᵀ)ᵀ, dΦ = Θ dF;  through the pool (to each window's arg-max)
        and the 1x1 convs;  dx = D (residual) + the projection paths
    Shapes:
        douts["out"]  (N, C, *S) -> dinputs["x"] (N, C, *S)
        dparams: one entry per trainable key of params, with its shape
    Convention:
        The sub-sampling max-pool sends each window's whole gradient to its
        FIRST arg-max (row-major), as PyTorch; relu'(0) = 0 in concatenation.
    """
    c = cache
    cfg = c.cfg
    dout = douts["out"]
    xp = namespace(dout=dout)
    N, C = c.x_shape[0], c.x_shape[1]
    spatial = tuple(c.x_shape[2:])
    lq, lk = prod(spatial), c.lk
    embedded = _embedded(cfg)
    pool_first = cfg.sub_sample and cfg.pool_position == "before_proj"
    dparams: dict[str, Array] = {}
    dout3 = xp.reshape(dout, (N, C, lq))  # (N, C, Lq)

    # 9. residual: out = γ z + x, so z receives γ dout (x's share is added at
    #    step 1) and γ the sum of dout ⊙ z
    # Each step below `del`s the gradients it has consumed, so that the
    # backward holds a few of them at a time rather than the whole chain.
    dz = dout3  # (N, C, Lq)
    if c.z is not None:
        dparams["gamma"] = xp.reshape(xp.sum(dout3 * c.z), (1,))  # (1,)
        dz = c.gamma * dout3  # (N, C, Lq)

    # 8. batch norm
    if c.bn is not None:
        dz, dbn = _batch_norm_named_backward(dz, c.bn, "W_bn")  # (N, C, Lq)
        dparams |= dbn

    # 7. W
    dy = dz  # (N, Cv = C, Lq) without W
    if c.w is not None:
        dy, dw2, db_w = _pointwise_conv_backward(dz, c.w)  # (N, Cv, Lq), (C, Cv)
        dparams["W.weight"] = xp.reshape(dw2, tuple(dw2.shape) + (1,) * len(spatial))
        if db_w is not None:
            dparams["W.bias"] = db_w  # (C,)
    del dz

    # The gradients that step 3 or 1 reads stacked are written into one
    # array each, rather than concatenated: [dΦ | dG] (N, Cφ + Cv, Lk) for
    # the stacked phi|g convs or the pool (all but gaussian before_proj),
    # and [dΘ | dΦ | dG] (N, Ci + Ci + Cv, Lq) for step 1's stacked convs
    # (embedded, the pool after the convs or none).  Steps 6, 4 and 2 write
    # their rows.
    theta, phi = ((c.affinity.a.mT, c.affinity.b) if c.concat is None
                  else (c.concat.theta_side.b, c.concat.phi_side.b))  # (N, Ci|C, Lq|Lk)
    c_theta, c_phi = int(theta.shape[1]), int(phi.shape[1])  # Ci, or C in gaussian
    c_g = int(c.attend.b.shape[-1])  # Cv
    dproj = (xp.empty((N, c_theta + c_phi + c_g, lq), dtype=dout.dtype,
                      device=device(dout))
             if embedded and not pool_first else None)  # (N, Ci + Ci + Cv, Lq)
    if dproj is not None and not cfg.sub_sample:
        dkv, kv0 = dproj, c_theta  # no pool: [dΦ | dG] are dproj's rows Ci:
    elif embedded or not pool_first:
        dkv, kv0 = xp.empty((N, c_phi + c_g, lk), dtype=dout.dtype,
                            device=device(dout)), 0  # (N, Cφ + Cv, Lk)
    else:
        dkv, kv0 = None, 0

    # 6. Y = (A Gᵀ)ᵀ: dA = dYᵀ G, dG = dY A
    attention, g = c.attend.a, c.attend.b.mT  # (N, Lq, Lk), (N, Cv, Lk)
    dattention = matmul(xp, dy.mT, g)  # (N, Lq, Lk)
    if dkv is not None:
        dkv = _product_into(dkv, kv0 + c_phi, dy, attention)  # rows of dG
    else:
        dg = matmul(xp, dy, attention)  # (N, Cv, Lk)
    del dy

    # 5. normalisation over the keys
    if cfg.mode in SOFTMAX_MODES:
        df = _softmax_backward(dattention, c.softmax)  # (N, Lq, Lk)
    else:
        df = dattention * (1.0 / lk)  # (N, Lq, Lk)
    del dattention

    # 4. pairwise function (and its scale)
    if cfg.mode == "concatenation":
        dtheta, dphi, dw_f, db_f = _concat_backward(df, c.concat)
        dparams["concat_project.weight"] = dw_f
        if db_f is not None:
            dparams["concat_project.bias"] = db_f
        dkv[:, kv0 : kv0 + c_phi, :] = dphi  # (N, Ci, Lk); embedded, so dkv is there
        del dphi
        if dproj is not None:  # else before_proj: dΘ goes to x's conv alone
            dproj[:, :c_theta, :] = dtheta  # (N, Ci, Lq)
    else:
        if c.scale != 1.0:
            df *= c.scale  # (N, Lq, Lk), in place on the fresh gradient
        # F = Θᵀ Φ: dΘ = Φ dFᵀ and dΦ = Θ dF, both channel-major
        if dproj is not None:
            dproj = _product_into(dproj, 0, phi, df.mT)  # rows of dΘ
        else:
            dtheta = matmul(xp, phi, df.mT)  # (N, Ci|C, Lq)
        if dkv is not None:
            dkv = _product_into(dkv, kv0, theta, df)  # rows of dΦ
        else:
            dphi = matmul(xp, theta, df)  # (N, C, Lk)
    del df

    # 3. 1x1 convs on the pooled x (before_proj)
    if pool_first:
        if embedded:  # [dΦ | dG] through the stacked phi|g convs
            dkv, dp = _stacked_conv_backward(dkv, c.kv_proj)  # (N, C, Lk)
        else:
            dkv_g, dp = _stacked_conv_backward(dg, c.kv_proj)  # (N, C, Lk)
            dkv = dphi + dkv_g  # gaussian: the pooled x is phi and feeds g's conv
            del dphi, dg
        dparams |= dp

    # 2. sub-sampling max-pool
    if dproj is not None and cfg.sub_sample:
        # the pool's gradient goes straight into rows Ci: of [dΘ | dΦ | dG]
        K = int(dkv.shape[1])
        dkv = xp.reshape(dkv, (N, K) + _pooled(spatial))  # (N, 2Ci, *P(S))
        dproj = xp.reshape(dproj, (N, c_theta + K) + spatial)  # (N, 3Ci, *S)
        dproj = xp.reshape(_max_pool_backward(dkv, c.pool, out=(dproj, c_theta)),
                           (N, c_theta + K, lq))  # (N, 3Ci, Lq)
        del dkv
    elif cfg.sub_sample:
        K = int(dkv.shape[1])
        dkv = xp.reshape(dkv, (N, K) + _pooled(spatial))  # (N, K, *P(S))
        dkv_full = xp.reshape(_max_pool_backward(dkv, c.pool), (N, K, lq))  # (N, K, Lq)
        del dkv
    else:
        dkv_full = dkv  # (N, K, Lq)

    # 1. 1x1 convs on x
    dx_kv = None  # the key/value branch's share that reaches x directly
    if pool_first:
        dx_kv, dproj = dkv_full, dtheta if embedded else None
    elif not embedded:
        dx_kv, dproj = dkv_full[:, :C, :], dkv_full[:, C:, :]  # x|g rows
    # else: dproj = [dΘ | dΦ | dG], written above
    dx_proj = None
    if c.proj is not None:
        dx_proj, dp = _stacked_conv_backward(dproj, c.proj)  # (N, C, Lq)
        dparams |= dp
    del dproj
    # x fans out to the residual, the convs of step 1, the key/value branch
    # (before_proj or gaussian) and, in gaussian mode, theta = x itself
    dx3 = _sum_paths(
        dout3 if cfg.residual else None, dx_proj, dx_kv, None if embedded else dtheta
    )
    dx = xp.reshape(dx3, c.x_shape)  # (N, C, *S)
    return {"x": dx}, dparams


def _sum_paths(*terms: Array | None) -> Array:
    """The sum of the gradient paths that are present (None = absent)."""
    present = [t for t in terms if t is not None]
    if len(present) == 1:
        return present[0]
    total = present[0] + present[1]  # a fresh array: the rest accumulates in it
    for t in present[2:]:
        total += t
    return total


def _stacked_conv_forward(
    x3: Array, params: Arrays, names: tuple[str, ...]
) -> tuple[Array | None, StackedConvCache | None]:
    """The 1x1 convs `names` applied to one input as ONE matmul with their
    weights stacked row-wise: (N, C, L) -> (N, len(names)·Ci, L)."""
    if not names:
        return None, None
    xp = namespace(x3=x3)
    shapes = tuple(tuple(params[f"{n}.weight"].shape) for n in names)
    w = xp.concat(
        [xp.reshape(params[f"{n}.weight"], s[:2]) for n, s in zip(names, shapes)],
        axis=0,
    )  # (k·Ci, C)
    b = None
    if f"{names[0]}.bias" in params:
        b = xp.concat([params[f"{n}.bias"] for n in names], axis=0)  # (k·Ci,)
    out, conv = _pointwise_conv(x3, w, b, 1)  # (N, k·Ci, L)
    return out, StackedConvCache(conv, names, shapes)


def _stacked_conv_backward(
    dout: Array, cache: StackedConvCache
) -> tuple[Array, dict[str, Array]]:
    """VJP of _stacked_conv_forward: dx, and each projection's weight/bias rows."""
    xp = namespace(dout=dout)
    dx, dw, db = _pointwise_conv_backward(dout, cache.conv)  # (N, C, L), (k·Ci, C)
    grads: dict[str, Array] = {}
    row = 0
    for name, shape in zip(cache.names, cache.shapes):
        rows = slice(row, row + shape[0])
        grads[f"{name}.weight"] = xp.reshape(dw[rows, :], shape)  # (Ci, C, *k)
        if db is not None:
            grads[f"{name}.bias"] = db[rows]  # (Ci,)
        row += shape[0]
    return dx, grads


def _concat_forward(
    theta: Array, phi: Array, weight: Array, bias: Array | None
) -> tuple[Array, ConcatCache]:
    """f_ij = ReLU(aᵀ Θ_i + bᵀ Φ_j + b_f) with w_f = [a; b], without
    (Lq, Lk, 2Ci).

    The 1x1 conv of the anchor on cat([Θ_i; Φ_j]) is linear, so it splits into
    a per-query term u_i = aᵀ Θ_i (+ b_f, when the conv has a bias) and a
    per-key term v_j = bᵀ Φ_j.
    """
    xp = namespace(theta=theta)
    N, ci, lq = theta.shape
    w_cat = xp.reshape(weight, (1, 2 * ci))  # (1, 2Ci)
    u_row, theta_side = _matmul(w_cat[:, :ci], theta)  # (N, 1, Lq)
    v, phi_side = _matmul(w_cat[:, ci:], phi)  # (N, 1, Lk)
    u = xp.reshape(u_row, (N, lq, 1))  # (N, Lq, 1)
    if bias is not None:
        u = u + bias  # (N, Lq, 1)
    pre, pair = _add(u, v)  # (N, Lq, Lk)
    f, relu = _relu(pre)  # (N, Lq, Lk)
    return f, ConcatCache(theta_side, phi_side, pair, relu, u, v, bias is not None)


def _concat_backward(
    df: Array, cache: ConcatCache
) -> tuple[Array, Array, Array, Array | None]:
    """VJP of _concat_forward: (dΘ, dΦ, d concat_project.weight, d .bias)."""
    xp = namespace(df=df)
    N, lq = df.shape[0], df.shape[1]
    dpre = _relu_backward(df, cache.relu)  # (N, Lq, Lk)
    du, dv = _add_backward(dpre, cache.pair)  # (N, Lq, 1), (N, 1, Lk)
    dbias = xp.reshape(xp.sum(du), (1,)) if cache.has_bias else None  # (1,)
    da, dtheta = _matmul_backward(xp.reshape(du, (N, 1, lq)), cache.theta_side)
    db, dphi = _matmul_backward(dv, cache.phi_side)  # (1, Ci), (N, Ci, Lk)
    ci = da.shape[1]
    dweight = xp.reshape(xp.concat([da, db], axis=1), (1, 2 * ci, 1, 1))
    return dtheta, dphi, dweight, dbias
