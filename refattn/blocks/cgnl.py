"""CGNL: the Compact Generalized Non-local block.

Reference:
    K. Yue, M. Sun, Y. Yuan, F. Zhou, E. Ding, F. Xu, "Compact Generalized
    Non-local Network", NeurIPS 2018 (arXiv:1810.13125).  Anchor:
    KaiyuYue/cgnl-network.pytorch ``model/resnet.py``, ``SpatialCGNL`` (dot
    kernel, preset ``yue``) and ``SpatialCGNLx`` (Gaussian kernel by Taylor
    expansion, preset ``yue_gaussian``); reference/blocks.md section 6.

Equations (paper notation; vec(·) flattens channels AND positions, so the
"positions" i, j of CGNL range over the cg·|S| elements of a channel group):

    θ = W_θ X,  φ = W_φ X,  g = W_g X                     1x1 convs C -> P
    split the P channels into G contiguous groups of cg = P / G;
    per sample n and group k, with M = cg·|S| and c = 1/sqrt(M) (use_scale)
    or 1:
    Y_k = f(θ_k, φ_k) g_k = Σ_j f(θ_i, φ_j) g_j
        dot:       f(θ_i, φ_j) = c θ_i φ_j
                   => y = s θ,       s = c Σ_j φ_j g_j
        Gaussian:  f = exp(−γ(θ_i − φ_j)²) ≈ β Σ_q α_q θ_i^q φ_j^q   (Taylor)
                   => y = Σ_{q=0..Q} α_q θ^q s_q,   s_q = c Σ_j φ_j^q g_j
    Z = W_z Y                               grouped 1x1 conv, G groups, P -> C
    out = GN(Z) + X                         GroupNorm with G groups (anchor)

Taylor weights: ``beta='const'`` (the anchor) replaces the per-element
envelope by the constant exp(−2γ), α_q = exp(−2γ) (2γ)^q / q!;
``beta='per_element'`` keeps the paper's exact envelope: α_q = (2γ)^q / q!,
exp(−γ θ_i²) multiplies the θ side and exp(−γ φ_j²) weights g_j inside each
sum, so y converges to Σ_j exp(−γ(θ_i − φ_j)²) g_j as the order Q grows.

Paper symbol -> code:

    ===================  ========================================  ==============
    paper                parameter key / variable                  shape
    ===================  ========================================  ==============
    X                    input ``x``                               (N, C, *S)
    W_θ, W_φ, W_g        ``t.weight``, ``p.weight``, ``g.weight``  (P, C, *k)
    (biases, optional)   ``t.bias``, ``p.bias``, ``g.bias``        (P,)
    θ, φ, g (a group)    ``t``, ``p``, ``g``                       (N, G, M)
    G                    config ``groups``                         M = cg·|S|
    s_k (dot)            ``s``, output ``aux.s``                   (N, G)
    s_{k,q} (Gaussian)   ``s``, output ``aux.s``                   (N, G, Q+1)
    α_q                  ``alpha``                                 (Q+1,)
    Y                    ``y``, output ``aux.y``                   (N, P, *S)
    W_z                  ``z.weight``                              (C, P/G, *k)
    GN (or BN)           ``gn.weight``, ``gn.bias`` or ``bn.*``    (C,)
    out                  output ``out``                            (N, C, *S)
    ===================  ========================================  ==============

``k = (1,) * len(S)``; S is (L,), (H, W) or (T, H, W) (the anchor is 2-D).

Refattn adds, beyond the anchor: ``beta='per_element'``, a free
``gn_groups``, ``norm`` = None or batch norm instead of GroupNorm, biases on
the t/p/g convs, ``residual=False``, and any Taylor ``order`` and ``gamma``.

GroupNorm cancels the dot-kernel attention (blocks.md 6.3): when every GN
group lies inside one z group (``gn_groups`` a multiple of ``groups``), GN
sees s_k·(W_z θ)_k and GN(s u) = sign(s) GN_{eps/s²}(u), so the output
depends on W_φ, W_g only through sign(s_k) and eps; at unit-scale draws
their gradients are eps-small.  Fixtures draw W_g small enough that GN does
not saturate (``draw_scales``), so every gradient stays checkable
(docs/blocks/cgnl.md, "Tolerances and conditioning").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
    device,
    host_rng,
    namespace,
    prod,
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
)
from refattn.ops.conv import (
    PointwiseConvCache,
    _pointwise_conv,
    _pointwise_conv_backward,
)
from refattn.ops.norm import (
    BatchNormCache,
    GroupNormCache,
    _batch_norm,
    _batch_norm_backward,
    _group_norm,
    _group_norm_backward,
)
from refattn.ops.overrides import overridable, routed_by_cache
from refattn.params import is_buffer

__all__ = [
    "BETAS",
    "KERNELS",
    "MAX_ORDER",
    "NORMS",
    "PRESETS",
    "SPECS",
    "CGNLCache",
    "CGNLConfig",
    "accumulation",
    "anchor_names",
    "backward",
    "draw_scales",
    "fixture_shapes",
    "forward",
    "gn_cancels_attention",
    "init_params",
    "kink_margin",
    "param_shapes",
    "taylor_alpha",
    "with_bn_mode",
]

Kernel = Literal["dot", "gaussian"]
Beta = Literal["const", "per_element"]
Norm = Literal["gn", "bn_train", "bn_eval"]

KERNELS: tuple[str, ...] = ("dot", "gaussian")
BETAS: tuple[str, ...] = ("const", "per_element")
NORMS: tuple[str | None, ...] = (None, "gn", "bn_train", "bn_eval")
MAX_ORDER = 170
"""The largest Taylor ``order``: q! of the weights (2γ)^q / q! overflows float64
from q = 171 on."""

_RANK_NAMES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, T, H, W)"}


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class CGNLConfig:
    """Configuration of the CGNL block (keys of blocks.md section 9.2).

    ``planes`` None means C // 2 (``resolved``); ``gn_groups`` None means
    ``groups``.  ``order``, ``gamma`` and ``beta`` are inert with the dot
    kernel, ``gn_groups`` without GroupNorm, ``bn_momentum`` without a
    train-mode batch norm; inert keys are still validated.
    """

    planes: int | None = None
    groups: int = 8
    use_scale: bool = False
    kernel: Kernel = "dot"
    order: int = 2
    gamma: float = 1e-4
    beta: Beta = "const"
    norm: Norm | None = "gn"
    gn_groups: int | None = None
    eps: float = 1e-5
    bn_momentum: float = 0.1
    bias: bool = False
    residual: bool = True

    def __post_init__(self) -> None:
        if self.planes is not None:
            _check_int("planes", self.planes, minimum=1, none_ok=True)
        _check_int("groups", self.groups, minimum=1)
        if self.planes is not None and self.planes % self.groups:
            raise ValueError(
                f"planes ({self.planes}) must be divisible by groups ({self.groups})"
            )
        for key in ("use_scale", "bias", "residual"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key}: expected a bool, got {value!r}")
        if self.kernel not in KERNELS:
            raise ValueError(
                f"kernel: expected 'dot' or 'gaussian', got {self.kernel!r}"
            )
        _check_int("order", self.order, minimum=0)
        if self.order > MAX_ORDER:
            raise ValueError(
                f"order: expected an int <= {MAX_ORDER} (the Taylor weight "
                f"(2γ)^q / q! needs q! finite in float64), got {self.order}"
            )
        gamma = self.gamma
        if not is_real(gamma) or not math.isfinite(gamma):
            raise ValueError(f"gamma: expected a finite float, got {gamma!r}")
        if self.kernel == "gaussian" and gamma <= 0:
            raise ValueError(
                f"gamma ({gamma!r}) must be > 0 with the gaussian kernel "
                f"exp(-gamma (t - p)^2)"
            )
        if self.beta not in BETAS:
            raise ValueError(
                f"beta: expected 'const' or 'per_element', got {self.beta!r}"
            )
        if self.kernel == "gaussian":
            try:
                (2.0 * gamma) ** self.order  # the largest power in the weights
            except OverflowError:
                raise ValueError(
                    f"gamma ({gamma!r}) with order {self.order}: the Taylor "
                    f"weights (2γ)^q / q! overflow float64"
                ) from None
        if self.norm not in NORMS:
            raise ValueError(
                f"norm: expected None, 'gn', 'bn_train' or 'bn_eval', got {self.norm!r}"
            )
        if self.gn_groups is not None:
            _check_int("gn_groups", self.gn_groups, minimum=1, none_ok=True)
        eps = self.eps
        if not is_real(eps) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
        m = self.bn_momentum
        if not is_real(m) or not 0.0 <= m <= 1.0:
            raise ValueError(f"bn_momentum: expected a float in [0, 1], got {m!r}")

    def resolved(self, input_shapes: Mapping[str, Shape]) -> CGNLConfig:
        """The config with ``planes`` (None -> C // 2) and ``gn_groups``
        (None -> groups) filled in, checked against the input channels."""
        C = _x_shape(input_shapes)[1]
        planes = self.planes
        if planes is None:
            planes = C // 2
            if planes < 1:
                raise ValueError(
                    f"planes: None means C // 2, which is 0 for C = {C}; "
                    f"set planes explicitly"
                )
            if planes % self.groups:
                raise ValueError(
                    f"planes ({planes} = C // 2 for C = {C}) must be divisible by "
                    f"groups ({self.groups})"
                )
        gn_groups = self.groups if self.gn_groups is None else self.gn_groups
        cfg = dataclasses.replace(self, planes=planes, gn_groups=gn_groups)
        _check_channels(cfg, C)
        return cfg


def _check_int(name: str, value: Any, *, minimum: int, none_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        alt = " or None" if none_ok else ""
        raise ValueError(f"{name}: expected an int >= {minimum}{alt}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_channels(cfg: CGNLConfig, C: int) -> None:
    """Input-dependent rules: the grouped z conv (P -> C, G groups) needs G | C,
    and GroupNorm needs gn_groups | C."""
    if C % cfg.groups:
        raise ValueError(
            f"channels C ({C}) must be divisible by groups ({cfg.groups}): "
            f"z is a grouped 1x1 conv P -> C with {cfg.groups} groups"
        )
    gn_groups = cfg.groups if cfg.gn_groups is None else cfg.gn_groups
    if cfg.norm == "gn" and C % gn_groups:
        raise ValueError(
            f"channels C ({C}) must be divisible by gn_groups ({gn_groups}) "
            f"for GroupNorm"
        )


PRESETS: dict[str, CGNLConfig] = {
    # SpatialCGNL(inplanes, inplanes // 2, use_scale=False, groups=8)
    "yue": CGNLConfig(
        planes=None,
        groups=8,
        use_scale=False,
        kernel="dot",
        order=2,
        gamma=1e-4,
        beta="const",
        norm="gn",
        gn_groups=None,
        eps=1e-5,
        bn_momentum=0.1,
        bias=False,
        residual=True,
    ),
    # SpatialCGNLx(inplanes, inplanes // 2, use_scale=False, groups=8, order=3)
    "yue_gaussian": CGNLConfig(
        planes=None,
        groups=8,
        use_scale=False,
        kernel="gaussian",
        order=3,
        gamma=1e-4,
        beta="const",
        norm="gn",
        gn_groups=None,
        eps=1e-5,
        bn_momentum=0.1,
        bias=False,
        residual=True,
    ),
}


def taylor_alpha(cfg: CGNLConfig) -> tuple[float, ...]:
    """The Taylor weights α_0..α_Q in float64.

    Math:
        const:        α_q = exp(−2γ) (2γ)^q / q!
        per_element:  α_q = (2γ)^q / q!     (the envelopes are per element)
    """
    base = math.exp(-2.0 * cfg.gamma) if cfg.beta == "const" else 1.0
    two_gamma = 2.0 * cfg.gamma
    return tuple(
        base * two_gamma**q / math.factorial(q) for q in range(cfg.order + 1)
    )


def gn_cancels_attention(cfg: CGNLConfig) -> bool:
    """True when GroupNorm removes the attention scalars up to sign and eps.

    Each GN group must lie inside one z group (gn_groups a multiple of
    groups), and each group's y must be one scalar times a p/g-free tensor:
    the dot kernel (y = s θ), or the const-beta Gaussian of order 0
    (y = α_0 s_0, a constant).
    """
    gn_groups = cfg.groups if cfg.gn_groups is None else cfg.gn_groups
    one_scalar = cfg.kernel == "dot" or (cfg.order == 0 and cfg.beta == "const")
    return cfg.norm == "gn" and gn_groups % cfg.groups == 0 and one_scalar


# ---------------------------------------------------------------------------
# shapes and parameters


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    """The shape of input ``x``, validated for rank and emptiness."""
    if not isinstance(input_shapes, Mapping) or set(input_shapes) != {"x"}:
        got = (sorted(input_shapes) if isinstance(input_shapes, Mapping)
               else input_shapes)
        raise ValueError(f"inputs: cgnl takes exactly one input 'x', got {got!r}")
    shape = tuple(int(s) for s in input_shapes["x"])
    if len(shape) not in _RANK_NAMES:
        raise ValueError(
            "x: expected a 3-D (N, C, L), 4-D (N, C, H, W) or 5-D (N, C, T, H, W) "
            f"array, got shape {shape}"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"x: expected every dim >= 1, got shape {shape}")
    return shape


def param_shapes(
    cfg: CGNLConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """Every parameter and buffer key of `cfg` for these inputs, with its shape.

    Shapes:
        t/p/g.weight (P, C, *k), t/p/g.bias (P,) with ``bias``;
        z.weight (C, P/G, *k); gn.weight, gn.bias (C,) with norm='gn';
        bn.weight, bn.bias, bn.running_mean, bn.running_var (C,) with 'bn_*';
        k = (1,) * spatial rank.
    """
    x_shape = _x_shape(input_shapes)
    cfg = cfg.resolved(input_shapes)
    C, P, G = x_shape[1], int(cfg.planes), cfg.groups  # type: ignore[arg-type]
    ones = (1,) * (len(x_shape) - 2)
    shapes: dict[str, Shape] = {}
    for name in ("t", "p", "g"):
        shapes[f"{name}.weight"] = (P, C) + ones
        if cfg.bias:
            shapes[f"{name}.bias"] = (P,)
    shapes["z.weight"] = (C, P // G) + ones
    if cfg.norm == "gn":
        shapes["gn.weight"] = (C,)
        shapes["gn.bias"] = (C,)
    elif cfg.norm is not None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"bn.{key}"] = (C,)
    return shapes


def init_params(
    cfg: CGNLConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: random and non-degenerate (weights N(0, 1/fan_in), biases
    N(0, 0.1²), norm gamma in [0.5, 1.5], beta N(0, 0.1²), running mean
    N(0, 0.1²) and variance in [0.5, 2]).  Fixtures multiply the t/p/g
    convs by ``draw_scales`` so that every gradient is well conditioned.

    ``anchor_init=True``: the anchor ResNet's scheme for the block: every
    conv weight N(0, 0.01²), biases 0, norm gamma = beta = 0 (the block is
    the identity with the residual, and no gradient reaches t, p, g or z),
    running statistics (0, 1).
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    ref = rng.standard_normal(1)  # a host float64 array: zeros_like_shape's template
    params: dict[str, Array] = {}
    state: dict[str, Array] = {}
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if module in ("gn", "bn"):
            continue
        if anchor_init:
            value = (0.01 * rng.standard_normal(shape) if leaf == "weight"
                     else zeros_like_shape(ref, shape))
        elif leaf == "weight":
            value = draw_weight(rng, shape)
        else:
            value = draw_bias(rng, shape)
        params[key] = value
    if cfg.norm is not None:
        module = "gn" if cfg.norm == "gn" else "bn"
        C = shapes[f"{module}.weight"][0]
        if anchor_init:
            params[f"{module}.weight"] = zeros_like_shape(ref, (C,))
            params[f"{module}.bias"] = zeros_like_shape(ref, (C,))
        else:
            gamma, beta = draw_norm_affine(rng, C)
            params[f"{module}.weight"], params[f"{module}.bias"] = gamma, beta
        if module == "bn":
            if anchor_init:
                state["bn.running_mean"] = zeros_like_shape(ref, (C,))
                state["bn.running_var"] = zeros_like_shape(ref, (C,)) + 1.0
            else:
                mean, var = draw_bn_state(rng, C)
                state["bn.running_mean"], state["bn.running_var"] = mean, var
    return params, state


def draw_scales(cfg: CGNLConfig, input_shapes: Mapping[str, Shape]) -> dict[str, float]:
    """Factors on the drawn t/p/g conv weights (and biases) that keep every
    fixture tensor of the block well conditioned; {} when none is needed.
    The fixture generator applies them to ``init_params``' draws and records
    them in the manifest.

    Two configurations make gradients pure round-off at unit-scale draws,
    and a scale on a draw fixes each without changing what is computed:

    * GroupNorm cancelling the attention (``gn_cancels_attention``): GN sees
      s·u with u free of W_φ and W_g, and GN(s u) = s u / sqrt(s² var u +
      eps) depends on s only through eps / (s² var u).  At unit draws
      s² var u ~ c² M (M = cg·|S| terms of unit size) is 1e6 times eps, and
      the W_φ, W_g gradients are eps-sized remainders.  W_g is drawn
      sqrt(eps) / (c sqrt(M)) times smaller, so s² var u ~ eps: GN then
      divides by a term that s and eps share, and those gradients are as
      large as the rest.  (W_g, not W_φ: it scales s of the dot kernel and
      s_0 of the Gaussian of order 0 alike.)
    * the Gaussian kernel: y = Σ_q α_q θ^q s_q with α_q ∝ (2γ)^q / q!, so at
      unit draws the terms q >= 1, which carry all of W_θ's and W_φ's
      influence, are 2γ (2e-4 for the anchor's γ = 1e-4) of the q = 0 term.
      W_θ and W_φ are drawn 1/sqrt(2γ) times larger (when that is > 1), so
      2γ θ φ ~ 1 and every term of the series counts.
    """
    M = (int(cfg.resolved(input_shapes).planes) // cfg.groups) * prod(
        _x_shape(input_shapes)[2:])  # type: ignore[arg-type]
    scales = {}
    if cfg.kernel == "gaussian" and 2.0 * float(cfg.gamma) < 1.0:
        scales["t"] = scales["p"] = 1.0 / math.sqrt(2.0 * float(cfg.gamma))
    if gn_cancels_attention(cfg):
        c = 1.0 / math.sqrt(M) if cfg.use_scale else 1.0
        scales["g"] = math.sqrt(float(cfg.eps)) / (c * math.sqrt(M))
    return scales


# ---------------------------------------------------------------------------
# the two attention kernels (per sample and group, on (N, G, M) views)


class DotKernelCache(NamedTuple):
    t: Array  # (N, G, M)
    p: Array  # (N, G, M)
    g: Array  # (N, G, M)
    s: Array  # (N, G) the scaled attention scalars
    scale: float  # c = 1/sqrt(M) or 1


def _dot_kernel_forward(
    t: Array, p: Array, g: Array, *, scale: float
) -> tuple[Array, Array, DotKernelCache]:
    """The dot kernel of one group: y = (c Σ_M p g) t.

    Math:
        s = c Σ_j p_j g_j        (one scalar per (n, group))
        y = s t
    Shapes:
        t, p, g, y (N, G, M);  s (N, G)
    """
    xp = namespace(t=t)
    s = xp.vecdot(p, g, axis=-1)  # (N, G)
    if scale != 1.0:
        s = s * scale  # (N, G)
    y = xp.reshape(s, s.shape + (1,)) * t  # (N, G, M)
    return y, s, DotKernelCache(t, p, g, s, scale)


def _dot_kernel_backward(
    dy: Array, cache: DotKernelCache
) -> tuple[Array, Array, Array]:
    """VJP of the dot kernel: (dt, dp, dg).

    Math:
        dt = s dy,   ds = Σ_M dy t,   dp = c ds g,   dg = c ds p
    """
    xp = namespace(dy=dy)
    t, p, g, s, scale = cache
    dt = xp.reshape(s, s.shape + (1,)) * dy  # (N, G, M)
    ds = xp.vecdot(dy, t, axis=-1)  # (N, G)
    if scale != 1.0:
        ds = ds * scale  # (N, G)
    ds3 = xp.reshape(ds, ds.shape + (1,))  # (N, G, 1)
    return dt, ds3 * g, ds3 * p


class MomentsCache(NamedTuple):
    p_pow: Array  # (N, G, Q+1, M) φ^0 .. φ^Q
    w: Array  # (N, G, M) the weights


class TaylorKernelCache(NamedTuple):
    t: Array  # (N, G, M) θ
    p: Array  # (N, G, M) φ
    t_pow: Array  # (N, G, Q+1, M) θ^0 .. θ^Q
    moments: MomentsCache  # s_q = Σ_M φ^q w (CuPy: the raw kernel's cache)
    w: Array  # (N, G, M) g, or exp(−γ φ²) g (per_element)
    env_t: Array | None  # (N, G, M) exp(−γ θ²) (per_element), else None
    y: Array | None  # (N, G, M) the output (per_element), else None
    a: Array  # (N, G, Q+1) α_q s_q
    alpha: Array  # (Q+1,)
    scale: float  # c
    gamma: float


def _powers(xp: Any, v: Array, order: int) -> Array:
    """v^0 .. v^order stacked on a new axis -2: (N, G, M) -> (N, G, Q+1, M).

    Filled in place into one fresh buffer (no list of temporaries to stack).
    """
    N, G, M = v.shape
    pows = xp.empty((N, G, order + 1, M), dtype=v.dtype, device=device(v))
    pows[:, :, 0, :] = 1.0
    for q in range(1, order + 1):
        pows[:, :, q, :] = pows[:, :, q - 1, :] * v
    return pows  # (N, G, Q+1, M)


@overridable("cgnl_moments")
def _moments(p: Array, w: Array, order: int) -> tuple[Array, MomentsCache]:
    """The raw moments of φ weighted by w: s_q = Σ_M φ^q w, q = 0..Q.

    Shapes:
        p, w (N, G, M) -> s (N, G, Q+1)
    """
    xp = namespace(p=p)
    p_pow = _powers(xp, p, order)  # (N, G, Q+1, M)
    s = xp.matmul(p_pow, xp.reshape(w, w.shape + (1,)))[..., 0]  # (N, G, Q+1)
    return s, MomentsCache(p_pow, w)


@routed_by_cache("cgnl_moments")
def _moments_backward(ds: Array, cache: MomentsCache) -> tuple[Array, Array]:
    """VJP of the moments: (dp, dw).

    Math (q' = q − 1 runs over q >= 1):
        dw = Σ_q ds_q φ^q,   dφ = w ⊙ Σ_q ds_q q φ^q'
    """
    xp = namespace(ds=ds)
    p_pow, w = cache
    N, G, Q1 = p_pow.shape[:3]  # Q1 = Q + 1
    dw = xp.matmul(xp.reshape(ds, (N, G, 1, Q1)), p_pow)[..., 0, :]  # (N, G, M)
    if Q1 == 1:
        return xp.zeros_like(w), dw  # s_0 = Σ w does not depend on φ
    q = xp.asarray([float(i) for i in range(1, Q1)], dtype=ds.dtype,
                   device=device(ds))  # (Q,) = 1..Q
    qm = xp.reshape(ds[..., 1:] * q, (N, G, 1, Q1 - 1))  # (N, G, 1, Q)
    dp = w * xp.matmul(qm, p_pow[..., :-1, :])[..., 0, :]  # (N, G, M)
    return dp, dw


def _taylor_kernel_forward(
    t: Array, p: Array, g: Array, *, alpha: Array, scale: float, gamma: float,
    per_element: bool,
) -> tuple[Array, Array, TaylorKernelCache]:
    """The Gaussian kernel of one group by its order-Q Taylor expansion.

    Math:
        w   = g                        (const)  | exp(−γ φ²) ⊙ g  (per_element)
        s_q = c Σ_j φ_j^q w_j,  q = 0..Q            (the moments)
        u   = Σ_q α_q s_q θ^q
        y   = u                        (const)  | exp(−γ θ²) ⊙ u  (per_element)
    Shapes:
        t, p, g, y (N, G, M);  alpha (Q+1,);  s (N, G, Q+1)
    """
    xp = namespace(t=t)
    order = alpha.shape[0] - 1
    env_t = None
    w = g
    if per_element:
        w = xp.exp(-gamma * (p * p)) * g  # (N, G, M)
        env_t = xp.exp(-gamma * (t * t))  # (N, G, M)
    s, moments = _moments(p, w, order)  # (N, G, Q+1)
    if scale != 1.0:
        s = s * scale  # (N, G, Q+1)
    a = s * alpha  # (N, G, Q+1)
    t_pow = _powers(xp, t, order)  # (N, G, Q+1, M)
    u = xp.matmul(xp.reshape(a, a.shape[:2] + (1, order + 1)), t_pow)[..., 0, :]
    y = u if env_t is None else env_t * u  # (N, G, M)
    cache = TaylorKernelCache(
        t, p, t_pow, moments, w, env_t, y if per_element else None, a, alpha, scale,
        gamma,
    )
    return y, s, cache


def _taylor_kernel_backward(
    dy: Array, cache: TaylorKernelCache
) -> tuple[Array, Array, Array]:
    """VJP of the Taylor kernel: (dt, dp, dg).

    Math (q' = q − 1 runs over q >= 1):
        du   = dy                      (const)  | exp(−γ θ²) ⊙ dy  (per_element)
        dθ   = du ⊙ Σ_q α_q s_q q θ^q'  [− 2γ θ ⊙ y ⊙ dy  (per_element)]
        ds_q = α_q Σ_M du θ^q
        dw   = c Σ_q ds_q φ^q
        dφ   = c w ⊙ Σ_q ds_q q φ^q'    [− 2γ φ ⊙ w ⊙ dw  (per_element)]
        dg   = dw                      (const)  | exp(−γ φ²) ⊙ dw  (per_element)
    """
    xp = namespace(dy=dy)
    c = cache
    order = c.alpha.shape[0] - 1
    N, G, M = dy.shape
    du = dy if c.env_t is None else c.env_t * dy  # (N, G, M)
    q = xp.asarray(
        [float(i) for i in range(order + 1)], dtype=dy.dtype, device=device(dy)
    )  # (Q+1,)
    # θ side: u = Σ_q a_q θ^q
    da = xp.matmul(c.t_pow, xp.reshape(du, (N, G, M, 1)))[..., 0]  # (N, G, Q+1)
    if order > 0:
        qa = xp.reshape((c.a * q)[..., 1:], (N, G, 1, order))  # (N, G, 1, Q)
        dt = du * xp.matmul(qa, c.t_pow[..., :order, :])[..., 0, :]  # (N, G, M)
    else:
        dt = xp.zeros_like(du)  # (N, G, M): y does not depend on θ^0
    if c.env_t is not None:
        dt = dt - (2.0 * c.gamma) * (c.t * c.y * dy)  # envelope exp(−γ θ²)
    # moments: s_q = c Σ_M φ^q w, a_q = α_q s_q
    dmom = da * c.alpha  # (N, G, Q+1) d(raw moment) before the scale
    if c.scale != 1.0:
        dmom = dmom * c.scale  # (N, G, Q+1)
    dp, dw = _moments_backward(dmom, c.moments)  # (N, G, M) each
    if c.env_t is not None:
        dp = dp - (2.0 * c.gamma) * (c.p * c.w * dw)  # envelope exp(−γ φ²)
        dg = xp.exp(-c.gamma * (c.p * c.p)) * dw  # (N, G, M)
    else:
        dg = dw  # (N, G, M)
    return dt, dp, dg


# ---------------------------------------------------------------------------
# forward and backward


class StackedConvCache(NamedTuple):
    conv: PointwiseConvCache  # the t|p|g convs as one matmul
    weight_shape: Shape  # (P, C, *k), each of the three


class CGNLCache(NamedTuple):
    cfg: CGNLConfig  # resolved
    x_shape: Shape  # (N, C, *S)
    proj: StackedConvCache  # 1. t, p, g
    dot: DotKernelCache | None  # 3. dot kernel
    taylor: TaylorKernelCache | None  # 3. Gaussian kernel
    z: PointwiseConvCache  # 4. grouped z conv
    gn: GroupNormCache | None  # 5. GroupNorm
    bn: BatchNormCache | None  # 5. batch norm


def forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: CGNLConfig,
) -> tuple[dict[str, Array], CGNLCache]:
    """CGNL block forward.

    Math (per sample n and group k; c = 1/sqrt(M) with use_scale, else 1):
        t, p, g = W_t x + b_t, W_p x + b_p, W_g x + b_g     (1x1 convs C -> P)
        dot:       s = c Σ_M p g;                y = s t
        gaussian:  s_q = c Σ_M p^q w;            y = e_t Σ_q α_q s_q t^q
                   (w = g, e_t = 1 for const beta; w = exp(−γp²) g,
                   e_t = exp(−γt²) for per_element)
        z = W_z y (grouped, G groups);  out = norm(z) + x   (both optional)
    Shapes:
        inputs["x"]        (N, C, *S), S = (L,), (H, W) or (T, H, W)
        outputs["out"]     (N, C, *S)
        outputs["aux.s"]   (N, G) dot | (N, G, Q+1) gaussian (without α_q)
        outputs["aux.y"]   (N, P, *S) the attended features, before z
        outputs["state.bn.running_mean" / "...running_var"]  (C,), 'bn_train'
    Params and state: the keys of ``param_shapes`` (buffers in ``state``;
    buffers given in ``params`` are accepted too).
    """
    x, params, state, cfg, xp = _check_forward_args(inputs, params, state, cfg)
    N, C = int(x.shape[0]), int(x.shape[1])
    spatial = tuple(int(s) for s in x.shape[2:])
    L = prod(spatial)
    P, G = int(cfg.planes), cfg.groups  # type: ignore[arg-type]
    M = (P // G) * L  # the "positions" of one group: its channels and positions
    scale = 1.0 / math.sqrt(M) if cfg.use_scale else 1.0
    x3 = xp.reshape(x, (N, C, L))  # (N, C, L)

    # 1. t, p, g: the three 1x1 convs stacked into one matmul
    proj, proj_cache = _stacked_conv_forward(x3, params)  # (N, 3P, L)

    # 2. split P into G contiguous groups; each group's (cg, L) block is one
    #    row of M "positions"
    t = xp.reshape(proj[:, :P, :], (N, G, M))  # (N, G, M)
    p = xp.reshape(proj[:, P : 2 * P, :], (N, G, M))  # (N, G, M)
    g = xp.reshape(proj[:, 2 * P :, :], (N, G, M))  # (N, G, M)

    # 3. the kernel: one scalar (dot) or Q+1 moments (gaussian) per (n, group)
    dot_cache = taylor_cache = None
    if cfg.kernel == "dot":
        y, s, dot_cache = _dot_kernel_forward(t, p, g, scale=scale)  # (N, G, M)
    else:
        alpha = xp.asarray(taylor_alpha(cfg), dtype=x.dtype, device=device(x))
        y, s, taylor_cache = _taylor_kernel_forward(
            t, p, g, alpha=alpha, scale=scale, gamma=float(cfg.gamma),
            per_element=cfg.beta == "per_element",
        )  # (N, G, M)
    y3 = xp.reshape(y, (N, P, L))  # (N, P, L)

    # 4. z: grouped 1x1 conv P -> C, G groups, no bias
    w_z = xp.reshape(params["z.weight"], (C, P // G))  # (C, P/G)
    z, z_cache = _pointwise_conv(y3, w_z, None, G)  # (N, C, L)

    # 5. normalisation
    outputs: dict[str, Array] = {}
    gn_cache = bn_cache = None
    if cfg.norm == "gn":
        z, gn_cache = _group_norm(
            z, params["gn.weight"], params["gn.bias"],
            int(cfg.gn_groups), float(cfg.eps),  # type: ignore[arg-type]
        )  # (N, C, L)
    elif cfg.norm is not None:
        (z, new_mean, new_var), bn_cache = _batch_norm(
            z,
            params["bn.weight"],
            params["bn.bias"],
            state["bn.running_mean"],
            state["bn.running_var"],
            cfg.norm == "bn_train", float(cfg.bn_momentum), float(cfg.eps),
        )  # training, momentum, eps; y (N, C, L)
        if cfg.norm == "bn_train":
            outputs["state.bn.running_mean"] = new_mean
            outputs["state.bn.running_var"] = new_var

    # 6. residual
    out = z + x3 if cfg.residual else z  # (N, C, L)
    outputs = {
        "out": xp.reshape(out, tuple(x.shape)),  # (N, C, *S)
        "aux.s": s,
        "aux.y": xp.reshape(y3, (N, P) + spatial),  # (N, P, *S)
    } | outputs
    cache = CGNLCache(
        cfg, tuple(x.shape), proj_cache, dot_cache, taylor_cache, z_cache,
        gn_cache, bn_cache,
    )
    return outputs, cache


def backward(
    douts: Mapping[str, Array], cache: CGNLCache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """VJP of the CGNL block (the forward's steps in reverse).

    Math (per sample and group, D = d out):
        dz = D through the norm (GroupNorm / BN VJP)
        dy = W_zᵀ dz (per group);  dW_z = Σ_n dz yᵀ
        dot:       dt = s dy,  ds = Σ_M dy t,  dp = c ds g,  dg = c ds p
        gaussian:  dt = Σ_q α_q q t^(q−1) s_q dy,  ds_q = α_q Σ_M dy t^q,
                   dp = c Σ_q ds_q q p^(q−1) g,   dg = c Σ_q ds_q p^q
                   (per_element adds the envelope terms, see the kernel)
        dx = D (residual) + W_tᵀ dt + W_pᵀ dp + W_gᵀ dg
    Shapes:
        douts["out"]  (N, C, *S) -> dinputs["x"] (N, C, *S)
        dparams: one entry per trainable key of params, with its shape
    """
    c = cache
    cfg = c.cfg
    dout = check_douts("cgnl", douts, shape=c.x_shape, like=c.proj.conv.x3)
    xp = namespace(dout=dout)
    N, C = c.x_shape[0], c.x_shape[1]
    spatial = tuple(c.x_shape[2:])
    L = prod(spatial)
    P, G = int(cfg.planes), cfg.groups  # type: ignore[arg-type]
    M = (P // G) * L
    ones = (1,) * len(spatial)
    dparams: dict[str, Array] = {}
    dout3 = xp.reshape(dout, (N, C, L))  # (N, C, L)

    # 6. residual: out = z + x, so z receives dout (x's share is added at step 1)
    # Each step below `del`s the gradients it has consumed, so that the
    # backward holds a few of them at a time rather than the whole chain.
    dz = dout3  # (N, C, L)

    # 5. normalisation
    if c.gn is not None:
        dz, dparams["gn.weight"], dparams["gn.bias"] = _group_norm_backward(dz, c.gn)
    elif c.bn is not None:
        dz, dparams["bn.weight"], dparams["bn.bias"] = _batch_norm_backward(dz, c.bn)

    # 4. z
    dy3, dw_z, _ = _pointwise_conv_backward(dz, c.z)  # (N, P, L), (C, P/G)
    dparams["z.weight"] = xp.reshape(dw_z, (C, P // G) + ones)  # (C, P/G, *k)
    dy = xp.reshape(dy3, (N, G, M))  # (N, G, M)
    del dz, dy3

    # 3. the kernel
    if c.dot is not None:
        dt, dp, dg = _dot_kernel_backward(dy, c.dot)  # (N, G, M) each
    else:
        dt, dp, dg = _taylor_kernel_backward(dy, c.taylor)  # (N, G, M) each
    del dy

    # 2. the groups were views of the t|p|g rows: put them back side by side
    dproj = xp.concat(
        [xp.reshape(d, (N, P, L)) for d in (dt, dp, dg)], axis=1
    )  # (N, 3P, L)
    del dt, dp, dg

    # 1. t, p, g
    dx_proj, dp_proj = _stacked_conv_backward(dproj, c.proj)  # (N, C, L)
    dparams |= dp_proj
    del dproj
    # x fans out to the three convs and the residual: sum the two paths
    dx3 = dx_proj + dout3 if cfg.residual else dx_proj  # (N, C, L)
    dx = xp.reshape(dx3, c.x_shape)  # (N, C, *S)
    order = [k for k in param_shapes(cfg, {"x": c.x_shape}) if not is_buffer(k)]
    return {"x": dx}, {k: dparams[k] for k in order}


def _stacked_conv_forward(
    x3: Array, params: Mapping[str, Array]
) -> tuple[Array, StackedConvCache]:
    """t, p, g as ONE 1x1 conv with their weights stacked row-wise:
    (N, C, L) -> (N, 3P, L)."""
    xp = namespace(x3=x3)
    shape = tuple(params["t.weight"].shape)
    w = xp.concat(
        [xp.reshape(params[f"{n}.weight"], shape[:2]) for n in ("t", "p", "g")],
        axis=0,
    )  # (3P, C)
    b = None
    if "t.bias" in params:
        b = xp.concat([params[f"{n}.bias"] for n in ("t", "p", "g")], axis=0)  # (3P,)
    out, conv = _pointwise_conv(x3, w, b, 1)  # (N, 3P, L)
    return out, StackedConvCache(conv, shape)


def _stacked_conv_backward(
    dout: Array, cache: StackedConvCache
) -> tuple[Array, dict[str, Array]]:
    """VJP of _stacked_conv_forward: dx, and each projection's weight/bias rows."""
    xp = namespace(dout=dout)
    dx, dw, db = _pointwise_conv_backward(dout, cache.conv)  # (N, C, L), (3P, C)
    P = cache.weight_shape[0]
    grads: dict[str, Array] = {}
    for i, name in enumerate(("t", "p", "g")):
        rows = slice(i * P, (i + 1) * P)
        grads[f"{name}.weight"] = xp.reshape(dw[rows, :], cache.weight_shape)
        if db is not None:
            grads[f"{name}.bias"] = db[rows]  # (P,)
    return dx, grads


# ---------------------------------------------------------------------------
# validation


def _check_forward_args(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: CGNLConfig,
) -> tuple[Array, dict[str, Array], dict[str, Array], CGNLConfig, Any]:
    if not isinstance(cfg, CGNLConfig):
        raise TypeError(f"cfg: expected a CGNLConfig, got {type(cfg).__name__}")
    if not isinstance(inputs, Mapping) or set(inputs) != {"x"}:
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise ValueError(f"inputs: cgnl takes exactly one input 'x', got {got!r}")
    x = inputs["x"]
    check_array("x", x)
    x_shape = _x_shape({"x": tuple(x.shape)})
    cfg = cfg.resolved({"x": x_shape})
    shapes = param_shapes(cfg, {"x": x_shape})
    params, state, xp = check_arguments(
        {"x": x}, params, state, shapes, f"bias={cfg.bias}, norm={cfg.norm!r}"
    )
    if cfg.norm == "bn_train" and x_shape[0] * prod(x_shape[2:]) < 2:
        raise ValueError(
            f"x: norm='bn_train' normalises z with batch statistics over N·|S| "
            f"values per channel, which needs N·|S| >= 2, got shape {x_shape}"
        )
    return x, params, state, cfg, xp


# ---------------------------------------------------------------------------
# the rest of the block contract


def kink_margin(cache: CGNLCache) -> float:
    """Relative distance from the one near-kink of CGNL.

    CGNL has no ReLU and no max.  But when GroupNorm cancels the attention
    (``gn_cancels_attention``), each GN group sees z = s·u and outputs

        s (u − mean u) / sqrt(s² var u + eps),

    a sign function of the attention scalar s, smoothed over a width
    w = sqrt(eps / var u).  A perturbation of the sums behind s (round-off,
    or a finite-difference step) moves s by that fraction of Σ|terms|
    (c Σ_j |φ_j g_j| for the dot kernel, c Σ_j |g_j| for the order-0
    Gaussian).  It flips the sign, or leaves the linear part of the smoothed
    step, once it exceeds max(|s|, w); the margin is the smallest

        max(|s|, w) / Σ|terms|  =  max(sqrt(var z), sqrt(eps)) |s| / (sqrt(var z) Σ|terms|)

    over the GN groups (var z = s² var u, read off the GN statistics).
    Every other configuration is smooth: infinity.
    """
    if cache.gn is None or not gn_cancels_attention(cache.cfg):
        return math.inf
    xp = namespace(inv_std=cache.gn.inv_std)
    eps = float(cache.cfg.eps)
    if cache.dot is not None:
        s, scale = cache.dot.s, cache.dot.scale  # (N, G)
        terms = scale * xp.sum(xp.abs(cache.dot.p * cache.dot.g), axis=-1)
    else:  # the const-beta Gaussian of order 0: s_0 = c Σ_j g_j
        taylor = cache.taylor
        s = taylor.a[..., 0] / float(taylor.alpha[0])
        terms = taylor.scale * xp.sum(xp.abs(taylor.w), axis=-1)
    N, G = s.shape
    per = cache.gn.inv_std.shape[1] // G  # GN groups per attention group
    s = xp.reshape(xp.broadcast_to(s[:, :, None], (N, G, per)), (N, G * per))
    terms = xp.reshape(xp.broadcast_to(terms[:, :, None], (N, G, per)), (N, G * per))
    var_z = 1.0 / (cache.gn.inv_std * cache.gn.inv_std) - eps  # (N, gn_groups)
    std_z = xp.sqrt(xp.clip(var_z, 0.0, None))
    if float(xp.min(std_z)) == 0.0 or float(xp.min(terms)) == 0.0:
        return 0.0
    margin = xp.maximum(std_z, math.sqrt(eps)) * xp.abs(s) / (std_z * terms)
    return float(xp.min(margin))


def accumulation(cfg: CGNLConfig, input_shapes: Mapping[str, Shape]) -> dict[str, int]:
    """The longest chain of sums behind each tensor family, widened where the
    block is ill-conditioned at the fixture draws (docs/blocks/cgnl.md,
    "Tolerances").

    Forward: projection (C), group moment (M = cg·|S|), Taylor sum (Q+1), z
    (P/G), norm statistics ((C/gn_groups)·|S| for GN, N·|S| for BN train).
    The backward adds the transposed products (norm, P/G, M twice, Q+1, 3P)
    and, for parameter gradients, the sum over the batch and positions.

    ``draw_scales`` conditions the GN-cancelled attention and the Gaussian
    kernel at the source, so the presets need no widening.  One case is
    left that a draw cannot fix: one channel per z group (P/G = 1) under a
    per-channel normalisation (train-mode BN, or GN with gn_groups = C)
    that does not also cancel the attention.  Each z channel is then w_c·y_k,
    the norm removes w_c up to eps, and ``grad.param.z`` is an eps-sized
    remainder of O(1) terms: its length is widened by κ² with κ = M/eps
    (1/eps with use_scale's 1/M), which puts its tolerance above the
    dtype's cap, and the fixture records it as not checkable.
    """
    x_shape = _x_shape(input_shapes)
    cfg = cfg.resolved(input_shapes)
    N, C = x_shape[0], x_shape[1]
    L = prod(x_shape[2:])
    P, G = int(cfg.planes), cfg.groups  # type: ignore[arg-type]
    cg = P // G
    M = cg * L
    terms = cfg.order + 1 if cfg.kernel == "gaussian" else 1
    if cfg.norm == "gn":
        norm = (C // int(cfg.gn_groups)) * L  # type: ignore[arg-type]
    elif cfg.norm == "bn_train":
        norm = N * L
    else:
        norm = 0
    aux = C + M + terms
    forward_chain = aux + cg + norm
    backward_chain = forward_chain + norm + cg + 2 * M + terms + 3 * P
    out = {
        "out": forward_chain,
        "aux": aux,
        "state": forward_chain,
        "grad.input": backward_chain,
        "grad.param": backward_chain + N * L,
    }
    per_channel = cfg.norm == "bn_train" or (cfg.norm == "gn" and cfg.gn_groups == C)
    if cg == 1 and per_channel and not gn_cancels_attention(cfg):
        kappa = (1 if cfg.use_scale else M) / float(cfg.eps)
        out["grad.param.z"] = _widen(backward_chain + N * L, kappa)
    return out


def _widen(length: int, kappa: float) -> int:
    return int(math.ceil(length * kappa * kappa))


def anchor_names(
    preset: str | None, cfg: CGNLConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """Canonical key -> the anchor module's state_dict key (tests/anchors/cgnl.py).

    The names are identical (``t``, ``p``, ``g``, ``z``, ``gn`` in both), so
    the map is the identity on the config's keys.  Empty when the preset has
    no anchor or the anchor (``SpatialCGNL`` for ``yue``, ``SpatialCGNLx``
    for ``yue_gaussian``) cannot express `cfg`: it has no biases, GroupNorm
    with ``groups`` groups, the residual, beta 'const', and a 2-D input.
    """
    if preset not in PRESETS or not _anchor_supports(preset, cfg, input_shapes):
        return {}
    return {k: k for k in param_shapes(cfg, input_shapes)}


def _anchor_supports(
    preset: str, cfg: CGNLConfig, input_shapes: Mapping[str, Shape]
) -> bool:
    cfg = cfg.resolved(input_shapes)
    return (
        len(_x_shape(input_shapes)) == 4
        and cfg.kernel == PRESETS[preset].kernel
        and not cfg.bias
        and cfg.norm == "gn"
        and cfg.gn_groups == cfg.groups
        and cfg.residual
        and (cfg.kernel == "dot" or cfg.beta == "const")
    )


def with_bn_mode(cfg: CGNLConfig, mode: str) -> CGNLConfig | None:
    """`cfg` with its batch norm in `mode` ('train' or 'eval'); None unless
    norm is 'bn_train' or 'bn_eval' (GroupNorm has no modes)."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if cfg.norm not in ("bn_train", "bn_eval"):
        return None
    return dataclasses.replace(cfg, norm=f"bn_{mode}")  # type: ignore[arg-type]


def fixture_shapes(cfg: CGNLConfig) -> dict[str, Shape]:
    """Small default input: (2, C, 5, 7) with the smallest C >= 16 that the
    config's groups, gn_groups and planes (or C // 2) divide into."""
    gn = cfg.groups if cfg.gn_groups is None else cfg.gn_groups
    base = math.lcm(cfg.groups, gn if cfg.norm == "gn" else 1)
    if cfg.planes is None:
        base = math.lcm(base, 2 * cfg.groups)
    C = base * max(1, -(-16 // base))
    return {"x": (2, C, 5, 7)}


def flops(cfg: CGNLConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The t, p, g projections (3·2·N·L·C·P), the dot kernel's s = Σ φ g and
    y = s θ (3·N·P·L), and the grouped z conv (2·N·L·(P/G)·C)."""
    N, C, *S = input_shapes["x"]
    L = prod(S)
    P, G = int(cfg.resolved(input_shapes).planes), cfg.groups  # type: ignore[arg-type]
    return 3 * 2 * N * L * C * P + 3 * N * P * L + 2 * N * L * (P // G) * C


SPECS: dict[str, BlockSpec] = {
    "cgnl": BlockSpec.of_module(
        __name__,
        name="cgnl",
        summary="compact generalized non-local block (Yue et al. 2018): dot and "
        "Taylor-expanded Gaussian kernels per channel group, GroupNorm",
        config_cls=CGNLConfig,
        presets=PRESETS,
        default_preset="yue",
        draw_scales=draw_scales,
        flops=flops,
        bench=BenchCase("yue", {"planes": 128}, {"x": (8, 256, 28, 28)},
                        "x(8,256,28,28) dot kernel, planes 128, groups 8, GN"),
        figure=("draw_cgnl", (11.0, 3.8)),
        anchors={p: f"cgnl:make_{p}" for p in ("yue", "yue_gaussian")},
    )
}
