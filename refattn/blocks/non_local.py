"""Non-local block: Wang, Girshick, Gupta, He, "Non-local Neural Networks",
CVPR 2018 (arXiv:1711.07971), with the variants of its public implementations
(AlexHex7/Non-local_pytorch, facebookresearch/video-nonlocal-net, and the
PyTorch port ``SpatialNL`` in KaiyuYue/cgnl-network.pytorch).

Paper (Eq. 1 and 6, instantiations of section 3.2), over all positions j:

    y_i = (1 / C(x)) Σ_j f(x_i, x_j) g(x_j),        z_i = W_z y_i + x_i

    mode               f(x_i, x_j)                    f / C(x)
    embedded_gaussian  exp(θ(x_i)ᵀ φ(x_j))            softmax_j(s θ_iᵀ φ_j)
    gaussian           exp(x_iᵀ x_j)                  softmax_j(s x_iᵀ φ_j), φ = P(x)
    dot_product        θ(x_i)ᵀ φ(x_j)                 f / N_k
    concatenation      ReLU(w_fᵀ [θ(x_i); φ(x_j)])    f / N_k

θ, φ, g are 1x1 convolutions C -> Ci and W_z a 1x1 convolution Ci -> C,
optionally followed by batch norm.  The key/value branch (φ and g) may be
sub-sampled by a max-pool P (kernel = stride = (2,), (2, 2) or (1, 2, 2)):
after the projection, ``P(W x)`` (paper, AlexHex7) or before it, ``W P(x)``
with one pool shared by φ and g (facebook).  Only keys and values are
sub-sampled, so the output keeps the input's (query) size.  The optional
scale is ``s = 1/sqrt(Ci)`` (``1/sqrt(C)`` in gaussian mode), softmax modes
only; N_k is the number of key positions after sub-sampling.

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
| y                | ``y`` (N, Ci, Lq)                   |                            |
| W_z              | ``W``                               | ``W.weight``, ``W.bias``   |
| BN after W_z     | ``batch_norm_forward``              | ``W_bn.*``                 |
| z                | ``out`` (N, C, *S)                  | ``out``                    |

Parameters (``Ci = inter_channels``, ``k = (1,) * len(S)``):
``theta.weight (Ci, C, *k)``, ``phi.weight (Ci, C, *k)`` (not in gaussian
mode), ``g.weight (Ci, C, *k)``, ``W.weight (C, Ci, *k)``, each with a
``.bias`` when ``bias``; ``concat_project.weight (1, 2Ci, 1, 1)``
(concatenation only); ``W_bn.weight``, ``W_bn.bias`` and the buffers
``W_bn.running_mean``, ``W_bn.running_var`` ``(C,)`` when ``bn`` is set.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
    host_rng,
    namespace,
    prod,
    window,
    zeros_like_shape,
)
from refattn.blocks.spec import (
    BenchCase,
    BlockSpec,
    check_arguments,
    check_douts,
    draw_bias,
    draw_bn_state,
    draw_norm_affine,
    draw_weight,
    is_real,
    max_gap,
    relu_margin,
)
from refattn.ops.conv import (
    PointwiseConvCache,
    _pointwise_conv,
    _pointwise_conv_backward,
)
from refattn.ops.elementwise import (
    AddCache,
    ReluCache,
    _add,
    _add_backward,
    _relu,
    _relu_backward,
)
from refattn.ops.linear import MatmulCache, _matmul, _matmul_backward
from refattn.ops.norm import BatchNormCache, _batch_norm, _batch_norm_backward
from refattn.ops.pool import MaxPoolCache, _geometry, _max_pool, _max_pool_backward
from refattn.ops.softmax import SoftmaxCache, _softmax, _softmax_backward
from refattn.params import is_buffer

__all__ = [
    "MODES",
    "POOL_KERNELS",
    "PRESETS",
    "SOFTMAX_MODES",
    "SPECS",
    "NonLocalCache",
    "NonLocalConfig",
    "accumulation",
    "anchor_names",
    "backward",
    "fixture_shapes",
    "forward",
    "init_params",
    "kink_margin",
    "param_shapes",
    "with_bn_mode",
]

Mode = Literal["embedded_gaussian", "gaussian", "dot_product", "concatenation"]
PoolPosition = Literal["after_proj", "before_proj"]
BnMode = Literal["train", "eval"]

MODES: tuple[str, ...] = (
    "embedded_gaussian", "gaussian", "dot_product", "concatenation"
)
SOFTMAX_MODES: tuple[str, ...] = ("embedded_gaussian", "gaussian")
POOL_POSITIONS: tuple[str, ...] = ("after_proj", "before_proj")
BN_MODES: tuple[str | None, ...] = (None, "train", "eval")

POOL_KERNELS: dict[int, tuple[int, ...]] = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
"""Sub-sampling max-pool kernel (= stride) per spatial rank: time is never pooled."""

_RANK_NAMES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, T, H, W)"}


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

    mode: Mode = "embedded_gaussian"
    inter_channels: int | None = None
    sub_sample: bool = True
    pool_position: PoolPosition = "after_proj"
    use_scale: bool = False
    bias: bool = True
    bn: BnMode | None = "train"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    residual: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"mode: expected one of {', '.join(map(repr, MODES))}, "
                f"got {self.mode!r}"
            )
        ic = self.inter_channels
        if ic is not None:
            if isinstance(ic, bool) or not isinstance(ic, numbers.Integral):
                raise ValueError(
                    f"inter_channels: expected an int >= 1 or None, got {ic!r}"
                )
            if ic < 1:
                raise ValueError(
                    f"inter_channels: expected an int >= 1 or None, got {ic}"
                )
        for key in ("sub_sample", "use_scale", "bias", "residual"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key}: expected a bool, got {value!r}")
        if self.pool_position not in POOL_POSITIONS:
            raise ValueError(
                f"pool_position: expected 'after_proj' or 'before_proj', "
                f"got {self.pool_position!r}"
            )
        if self.bn not in BN_MODES:
            raise ValueError(f"bn: expected None, 'train' or 'eval', got {self.bn!r}")
        eps = self.bn_eps
        if not is_real(eps) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"bn_eps: expected a finite float > 0, got {eps!r}")
        m = self.bn_momentum
        if not is_real(m) or not 0.0 <= m <= 1.0:
            raise ValueError(f"bn_momentum: expected a float in [0, 1], got {m!r}")
        if self.use_scale and self.mode not in SOFTMAX_MODES:
            raise ValueError(
                f"use_scale (True) applies to the softmax modes "
                f"'embedded_gaussian' and 'gaussian' only; mode {self.mode!r} "
                f"normalises by the key count N_k (set use_scale=False)"
            )

    def resolved(self, input_shapes: Mapping[str, Shape]) -> NonLocalConfig:
        """The config with ``inter_channels`` filled in: None -> max(C // 2, 1)."""
        x_shape = _x_shape(input_shapes)
        if self.inter_channels is not None:
            return self
        return dataclasses.replace(self, inter_channels=max(x_shape[1] // 2, 1))


PRESETS: dict[str, NonLocalConfig] = {
    # AlexHex7/Non-local_pytorch, non_local_embedded_gaussian.py (the other three
    # files are the same preset with `mode` changed); bn=None is bn_layer=False
    "alexhex7": NonLocalConfig(
        mode="embedded_gaussian",
        inter_channels=None,
        sub_sample=True,
        pool_position="after_proj",
        use_scale=False,
        bias=True,
        bn="train",
        bn_eps=1e-5,
        bn_momentum=0.1,
        residual=True,
    ),
    # facebookresearch/video-nonlocal-net (Caffe2 momentum 0.9 = PyTorch 0.1)
    "facebook": NonLocalConfig(
        mode="embedded_gaussian",
        inter_channels=None,
        sub_sample=True,
        pool_position="before_proj",
        use_scale=True,
        bias=True,
        bn="train",
        bn_eps=1e-5,
        bn_momentum=0.1,
        residual=True,
    ),
    # KaiyuYue/cgnl-network.pytorch, SpatialNL(inplanes, inplanes // 2, use_scale=True)
    "cgnl_repo": NonLocalConfig(
        mode="embedded_gaussian",
        inter_channels=None,
        sub_sample=False,
        pool_position="after_proj",
        use_scale=True,
        bias=False,
        bn="train",
        bn_eps=1e-5,
        bn_momentum=0.1,
        residual=True,
    ),
}


# ---------------------------------------------------------------------------
# shapes and parameters


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    """The shape of input ``x``, validated for rank and emptiness."""
    if not isinstance(input_shapes, Mapping) or set(input_shapes) != {"x"}:
        got = sorted(input_shapes) if isinstance(input_shapes, Mapping) else (
            input_shapes
        )
        raise ValueError(f"inputs: non_local takes exactly one input 'x', got {got!r}")
    shape = tuple(int(s) for s in input_shapes["x"])
    if len(shape) not in _RANK_NAMES:
        raise ValueError(
            "x: expected a 3-D (N, C, L), 4-D (N, C, H, W) or 5-D (N, C, T, H, W) "
            f"array, got shape {shape}"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"x: expected every dim >= 1, got shape {shape}")
    return shape


def _check_input_shape(cfg: NonLocalConfig, x_shape: Shape) -> None:
    """Input-dependent rules: the sub-sampling pool needs >= 2 along pooled dims."""
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


def param_shapes(
    cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """Every parameter and buffer key of `cfg` for these inputs, with its shape.

    Shapes:
        theta/phi/g.weight (Ci, C, *k), .bias (Ci,); W.weight (C, Ci, *k),
        W.bias (C,); concat_project.weight (1, 2Ci, 1, 1); W_bn.* (C,)
        with k = (1,) * spatial rank.
    """
    x_shape = _x_shape(input_shapes)
    cfg = cfg.resolved(input_shapes)
    _check_input_shape(cfg, x_shape)
    C, ci = x_shape[1], int(cfg.inter_channels)  # type: ignore[arg-type]
    ones = (1,) * (len(x_shape) - 2)
    shapes: dict[str, Shape] = {}
    for name in (("theta",) if _embedded(cfg) else ()) + _kv_names(cfg):
        shapes[f"{name}.weight"] = (ci, C) + ones
        if cfg.bias:
            shapes[f"{name}.bias"] = (ci,)
    if cfg.mode == "concatenation":
        shapes["concat_project.weight"] = (1, 2 * ci, 1, 1)
    shapes["W.weight"] = (C, ci) + ones
    if cfg.bias:
        shapes["W.bias"] = (C,)
    if cfg.bn is not None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"W_bn.{key}"] = (C,)
    return shapes


def init_params(
    cfg: NonLocalConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: random and non-degenerate (weights N(0, 1/fan_in), biases
    N(0, 0.1²), BN gamma in [0.5, 1.5], beta N(0, 0.1²), running mean
    N(0, 0.1²) and variance in [0.5, 2]), so that every gradient is alive.

    ``anchor_init=True``: the anchors' identity-at-init scheme.  Without scale
    (AlexHex7): PyTorch's default conv init U(±1/sqrt(fan_in)) for weights and
    biases; with scale (facebook, the CGNL repo): weights N(0, 0.01²) and
    biases 0.  Then BN gamma = beta = 0 (or, without BN, a zero W weight and
    bias) and running statistics (0, 1): the block is the identity and no
    gradient reaches theta, phi or g.
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    ref = rng.standard_normal(1)  # a host float64 array: zeros_like_shape's template
    params: dict[str, Array] = {}
    state: dict[str, Array] = {}
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if module == "W_bn":
            continue
        fan_in = prod(shapes[f"{module}.weight"][1:])
        if not anchor_init:
            draw = draw_weight if leaf == "weight" else draw_bias
            value = draw(rng, shape)
        elif module == "W" and cfg.bn is None:
            value = zeros_like_shape(ref, shape)  # AlexHex7's bn_layer=False init
        elif cfg.use_scale:
            scaled = 0.01 * rng.standard_normal(shape)
            value = scaled if leaf == "weight" else zeros_like_shape(ref, shape)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        params[key] = value
    if cfg.bn is not None:
        C = shapes["W_bn.weight"][0]
        if anchor_init:
            zeros = zeros_like_shape(ref, (C,))
            params["W_bn.weight"], params["W_bn.bias"] = zeros, zeros + 0.0
            state["W_bn.running_mean"] = zeros + 0.0
            state["W_bn.running_var"] = zeros + 1.0
        else:
            params["W_bn.weight"], params["W_bn.bias"] = draw_norm_affine(rng, C)
            mean, var = draw_bn_state(rng, C)
            state["W_bn.running_mean"], state["W_bn.running_var"] = mean, var
    return params, state


# ---------------------------------------------------------------------------
# forward and backward


class StackedConvCache(NamedTuple):
    conv: PointwiseConvCache
    names: tuple[str, ...]  # the stacked projections, in row order
    shapes: tuple[Shape, ...]  # each one's weight shape (Ci, C, *k)


class ConcatCache(NamedTuple):
    theta_side: MatmulCache  # u = a Θ
    phi_side: MatmulCache  # v = b Φ
    pair: AddCache  # u_i + v_j
    relu: ReluCache
    u: Array  # (N, Lq, 1) (kink_margin only)
    v: Array  # (N, 1, Lk) (kink_margin only)


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
    w: PointwiseConvCache  # 7. W
    bn: BatchNormCache | None  # 8. W_bn


def forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: NonLocalConfig,
) -> tuple[dict[str, Array], NonLocalCache]:
    """Non-local block forward.

    Math:
        Θ = W_θ x + b_θ                     (gaussian: Θ = x)
        Φ = P(W_φ x + b_φ)  or  W_φ P(x) + b_φ   (after_proj / before_proj;
        G = P(W_g x + b_g)  or  W_g P(x) + b_g    gaussian: Φ = P(x); no P
                                                   without sub_sample)
        F = Θᵀ Φ;  A = softmax_keys(s F) | F / N_k | ReLU(aᵀΘ_i + bᵀΦ_j) / N_k
        Y = (A Gᵀ)ᵀ;  out = BN(W Y + b_W) + x     (BN and + x optional)
    Shapes:
        inputs["x"]            (N, C, *S), S = (L,), (H, W) or (T, H, W)
        outputs["out"]         (N, C, *S)
        outputs["aux.attention"]  (N, Lq, Lk), Lq = |S|, Lk = |P(S)|
        outputs["state.W_bn.running_mean" / "...running_var"]  (C,), bn='train'
    Params and state: the keys of ``param_shapes`` (buffers in ``state``;
    buffers given in ``params`` are accepted too).
    """
    x, params, state, cfg, xp = _check_forward_args(inputs, params, state, cfg)
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
        f, concat_cache = _concat_forward(theta, phi, params["concat_project.weight"])
    else:
        f, affinity_cache = _matmul(theta.mT, phi)  # (N, Lq, Lk)
        if cfg.use_scale:
            scale = 1.0 / math.sqrt(theta.shape[1])  # Ci, or C in gaussian mode
            f = f * scale  # (N, Lq, Lk)

    # 5. normalise over the keys (last axis)
    softmax_cache = None
    if cfg.mode in SOFTMAX_MODES:
        attention, softmax_cache = _softmax(f, f.ndim - 1)  # (N, Lq, Lk)
    else:
        attention = f * (1.0 / lk)  # (N, Lq, Lk)

    # 6. Y = A Gᵀ, transposed back to channel-first: (N, Ci, Lq)
    y_t, attend_cache = _matmul(attention, g.mT)  # (N, Lq, Ci)
    y = y_t.mT  # (N, Ci, Lq)

    # 7. W: Ci -> C
    w2 = xp.reshape(params["W.weight"], (C, ci))  # (C, Ci)
    z, w_cache = _pointwise_conv(y, w2, params.get("W.bias"), 1)  # (N, C, Lq)

    # 8. batch norm after W
    outputs: dict[str, Array] = {}
    bn_cache = None
    if cfg.bn is not None:
        (z, new_mean, new_var), bn_cache = _batch_norm(
            z,
            params["W_bn.weight"],
            params["W_bn.bias"],
            state["W_bn.running_mean"],
            state["W_bn.running_var"],
            cfg.bn == "train", float(cfg.bn_momentum), float(cfg.bn_eps),
        )  # training, momentum, eps; y (N, C, Lq)
        if cfg.bn == "train":
            outputs["state.W_bn.running_mean"] = new_mean
            outputs["state.W_bn.running_var"] = new_var

    # 9. residual
    out = z + x3 if cfg.residual else z  # (N, C, Lq)
    outputs = {
        "out": xp.reshape(out, tuple(x.shape)),  # (N, C, *S)
        "aux.attention": attention,
    } | outputs
    cache = NonLocalCache(
        cfg, tuple(x.shape), lk, scale, proj_cache, pool_cache, pooled, kv_cache,
        affinity_cache, concat_cache, softmax_cache, attend_cache, w_cache, bn_cache,
    )
    return outputs, cache


def backward(
    douts: Mapping[str, Array], cache: NonLocalCache
) -> tuple[dict[str, Array], dict[str, Array]]:
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
    dout = check_douts("non_local", douts, shape=c.x_shape, like=c.w.x3)
    xp = namespace(dout=dout)
    N, C = c.x_shape[0], c.x_shape[1]
    spatial = tuple(c.x_shape[2:])
    lq, lk = prod(spatial), c.lk
    ci = int(cfg.inter_channels)  # type: ignore[arg-type]
    embedded = _embedded(cfg)
    pool_first = cfg.sub_sample and cfg.pool_position == "before_proj"
    dparams: dict[str, Array] = {}
    dout3 = xp.reshape(dout, (N, C, lq))  # (N, C, Lq)

    # 9. residual: out = z + x, so z receives dout (x's share is added at step 1)
    # Each step below `del`s the gradients it has consumed, so that the
    # backward holds a few of them at a time rather than the whole chain.
    dz = dout3  # (N, C, Lq)

    # 8. batch norm
    if c.bn is not None:
        dz, dgamma, dbeta = _batch_norm_backward(dz, c.bn)  # (N, C, Lq), (C,), (C,)
        dparams["W_bn.weight"], dparams["W_bn.bias"] = dgamma, dbeta

    # 7. W
    dy, dw2, db_w = _pointwise_conv_backward(dz, c.w)  # (N, Ci, Lq), (C, Ci), (C,)
    del dz
    dparams["W.weight"] = xp.reshape(dw2, (C, ci) + (1,) * len(spatial))
    if db_w is not None:
        dparams["W.bias"] = db_w

    # 6. Y = (A Gᵀ)ᵀ
    dattention, dg_t = _matmul_backward(dy.mT, c.attend)  # (N, Lq, Lk), (N, Lk, Ci)
    dg = dg_t.mT  # (N, Ci, Lk)
    del dy

    # 5. normalisation over the keys
    if cfg.mode in SOFTMAX_MODES:
        df = _softmax_backward(dattention, c.softmax)  # (N, Lq, Lk)
    else:
        df = dattention * (1.0 / lk)  # (N, Lq, Lk)
    del dattention

    # 4. pairwise function (and its scale)
    if cfg.mode == "concatenation":
        dtheta, dphi, dparams["concat_project.weight"] = _concat_backward(df, c.concat)
    else:
        if c.scale != 1.0:
            df = df * c.scale  # (N, Lq, Lk)
        dtheta_t, dphi = _matmul_backward(df, c.affinity)  # (N, Lq, Ci), (N, Ci, Lk)
        dtheta = dtheta_t.mT  # (N, Ci, Lq)
    del df

    # 3. 1x1 convs on the pooled x (before_proj)
    if pool_first:
        if embedded:
            dkv_proj = xp.concat([dphi, dg], axis=1)  # (N, 2Ci, Lk)
            dkv, dp = _stacked_conv_backward(dkv_proj, c.kv_proj)  # (N, C, Lk)
        else:
            dkv_g, dp = _stacked_conv_backward(dg, c.kv_proj)  # (N, C, Lk)
            dkv = dphi + dkv_g  # gaussian: the pooled x is phi and feeds g's conv
        dparams |= dp
    else:
        dkv = xp.concat([dphi, dg], axis=1)  # (N, K, Lk)
    del dphi, dg

    # 2. sub-sampling max-pool
    if cfg.sub_sample:
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
    elif embedded:
        dproj = xp.concat([dtheta, dkv_full], axis=1)  # (N, 3Ci, Lq)
        del dkv_full
    else:
        dx_kv, dproj = dkv_full[:, :C, :], dkv_full[:, C:, :]  # x|g rows
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
    return {"x": dx}, {k: dparams[k] for k in _trainable_order(c)}


def _trainable_order(c: NonLocalCache) -> list[str]:
    shapes = param_shapes(c.cfg, {"x": c.x_shape})
    return [k for k in shapes if not is_buffer(k)]


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
    x3: Array, params: Mapping[str, Array], names: tuple[str, ...]
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
    theta: Array, phi: Array, weight: Array
) -> tuple[Array, ConcatCache]:
    """f_ij = ReLU(aᵀ Θ_i + bᵀ Φ_j) with w_f = [a; b], without (Lq, Lk, 2Ci).

    The 1x1 conv of the anchor on cat([Θ_i; Φ_j]) is linear, so it splits into
    a per-query term u_i = aᵀ Θ_i and a per-key term v_j = bᵀ Φ_j.
    """
    xp = namespace(theta=theta)
    N, ci, lq = theta.shape
    w_cat = xp.reshape(weight, (1, 2 * ci))  # (1, 2Ci)
    u_row, theta_side = _matmul(w_cat[:, :ci], theta)  # (N, 1, Lq)
    v, phi_side = _matmul(w_cat[:, ci:], phi)  # (N, 1, Lk)
    u = xp.reshape(u_row, (N, lq, 1))  # (N, Lq, 1)
    pre, pair = _add(u, v)  # (N, Lq, Lk)
    f, relu = _relu(pre)  # (N, Lq, Lk)
    return f, ConcatCache(theta_side, phi_side, pair, relu, u, v)


def _concat_backward(
    df: Array, cache: ConcatCache
) -> tuple[Array, Array, Array]:
    """VJP of _concat_forward: (dΘ, dΦ, d concat_project.weight)."""
    xp = namespace(df=df)
    N, lq = df.shape[0], df.shape[1]
    dpre = _relu_backward(df, cache.relu)  # (N, Lq, Lk)
    du, dv = _add_backward(dpre, cache.pair)  # (N, Lq, 1), (N, 1, Lk)
    da, dtheta = _matmul_backward(xp.reshape(du, (N, 1, lq)), cache.theta_side)
    db, dphi = _matmul_backward(dv, cache.phi_side)  # (1, Ci), (N, Ci, Lk)
    ci = da.shape[1]
    dweight = xp.reshape(xp.concat([da, db], axis=1), (1, 2 * ci, 1, 1))
    return dtheta, dphi, dweight


# ---------------------------------------------------------------------------
# validation


def _check_forward_args(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: NonLocalConfig,
) -> tuple[Array, dict[str, Array], dict[str, Array], NonLocalConfig, Any]:
    if not isinstance(cfg, NonLocalConfig):
        raise TypeError(f"cfg: expected a NonLocalConfig, got {type(cfg).__name__}")
    if not isinstance(inputs, Mapping) or set(inputs) != {"x"}:
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise ValueError(f"inputs: non_local takes exactly one input 'x', got {got!r}")
    x = inputs["x"]
    check_array("x", x)
    x_shape = _x_shape({"x": tuple(x.shape)})
    cfg = cfg.resolved({"x": x_shape})
    shapes = param_shapes(cfg, {"x": x_shape})
    params, state, xp = check_arguments(
        {"x": x}, params, state, shapes,
        f"mode={cfg.mode!r}, bias={cfg.bias}, bn={cfg.bn!r}",
    )
    if cfg.bn == "train" and x_shape[0] * prod(x_shape[2:]) < 2:
        raise ValueError(
            f"x: bn='train' normalises W's output with batch statistics over "
            f"N·|S| values per channel, which needs N·|S| >= 2, got shape {x_shape}"
        )
    return x, params, state, cfg, xp


# ---------------------------------------------------------------------------
# the rest of the block contract


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
    cfg = cfg.resolved(input_shapes)
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
    Empty when the preset has no anchor or the anchor cannot express `cfg`.
    """
    if preset not in PRESETS or not _anchor_supports(preset, cfg, input_shapes):
        return {}
    shapes = param_shapes(cfg, input_shapes)
    names: dict[str, str] = {}
    for key in shapes:
        module, leaf = key.rsplit(".", 1)
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
        else:
            cgnl = {"theta": "t", "phi": "p", "W": "z", "W_bn": "bn"}
            target = cgnl.get(module, module)
        names[key] = f"{target}.{leaf}"
    return names


def _anchor_supports(
    preset: str, cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]
) -> bool:
    """Whether the anchor implementation of `preset` can express `cfg`."""
    rank = len(_x_shape(input_shapes)) - 2
    if not cfg.residual:
        return False
    if preset == "alexhex7":
        return (
            not cfg.use_scale
            and cfg.bias
            and (not cfg.sub_sample or cfg.pool_position == "after_proj")
        )
    if preset == "facebook":
        return cfg.mode in ("embedded_gaussian", "dot_product") and (
            not cfg.sub_sample or cfg.pool_position == "before_proj"
        )
    return (
        rank == 2
        and cfg.mode == "embedded_gaussian"
        and not cfg.sub_sample
        and not cfg.bias
        and cfg.bn is not None
    )


def with_bn_mode(cfg: NonLocalConfig, mode: str) -> NonLocalConfig | None:
    """`cfg` with its W_bn in `mode` ('train' or 'eval'); None without BN."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if cfg.bn is None:
        return None
    return dataclasses.replace(cfg, bn=mode)  # type: ignore[arg-type]


def fixture_shapes(cfg: NonLocalConfig) -> dict[str, Shape]:
    """Small default inputs with odd spatial sizes (floor-mode pooling: 5x7 keys
    become 2x3).  ``before_proj`` is the video block's arrangement (facebook),
    so it gets a clip (T, H, W); every other config an image (H, W)."""
    if cfg.pool_position == "before_proj":
        return {"x": (2, 8, 2, 5, 7)}
    return {"x": (2, 8, 5, 7)}



def flops(cfg: NonLocalConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The θ projection at Lq positions, φ and g at the positions they are
    computed on (Lk with pooling before the projection), the two attention
    matmuls θᵀφ and A g (2·N·Lq·Lk·Ci each), and W."""
    cfg = cfg.resolved(input_shapes)
    N, C, *S = input_shapes["x"]
    Lq = Lk = prod(S)
    if cfg.sub_sample:  # kernel = stride = 2 on the last one or two spatial dims
        pooled = S[-2:]
        Lk = prod(S[: len(S) - len(pooled)]) * prod(d // 2 for d in pooled)
    Ci = int(cfg.inter_channels)  # type: ignore[arg-type]
    projected = Lk if cfg.pool_position == "before_proj" else Lq
    return 2 * N * Ci * (Lq * C + 2 * projected * C + 2 * Lq * Lk + Lq * C)


SPECS: dict[str, BlockSpec] = {
    "non_local": BlockSpec.of_module(
        __name__,
        name="non_local",
        summary="non-local block (Wang et al. 2018): embedded Gaussian, Gaussian, "
        "dot product and concatenation; 1-, 2- and 3-D",
        config_cls=NonLocalConfig,
        presets=PRESETS,
        default_preset="alexhex7",
        flops=flops,
        bench=BenchCase("alexhex7", {"inter_channels": 128}, {"x": (4, 256, 28, 28)},
                        "x(4,256,28,28) embedded gaussian, inter 128, sub_sample, "
                        "BN(train)"),
        figure=("draw_non_local", (13.0, 3.2)),
        anchors={p: f"non_local:make_{p}" for p in ("alexhex7", "facebook", "cgnl_repo")},
    )
}
