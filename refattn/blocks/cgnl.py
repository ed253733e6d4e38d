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

Checked entry points, shapes and draws: ``refattn/blocks/specs/cgnl.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, ArrayDict, Arrays, Shape
from refattn.backend import device, namespace, prod
from refattn.ops.conv import (PointwiseConvCache, _pointwise_conv,
                              _pointwise_conv_backward)
from refattn.ops.norm import (BatchNormCache, GroupNormCache, _batch_norm_named,
                              _batch_norm_named_backward, _group_norm,
                              _group_norm_backward)
from refattn.ops.overrides import overridable, routed_by_cache
from refattn.params import with_prefix

__all__ = ["BETAS", "KERNELS", "MAX_ORDER", "NORMS", "PRESETS", "CGNLCache",
           "CGNLConfig", "backward", "forward", "gn_cancels_attention", "taylor_alpha"]

Kernel = Literal["dot", "gaussian"]
Beta = Literal["const", "per_element"]
Norm = Literal["gn", "bn_train", "bn_eval"]

KERNELS: tuple[str, ...] = ("dot", "gaussian")
BETAS: tuple[str, ...] = ("const", "per_element")
NORMS: tuple[str | None, ...] = (None, "gn", "bn_train", "bn_eval")
MAX_ORDER = 170
"""The largest Taylor ``order``: q! of the weights (2γ)^q / q! overflows float64
from q = 171 on."""


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class CGNLConfig:
    """Configuration of the CGNL block (keys of blocks.md section 9.2).

    ``planes`` None means C // 2 (resolved by the spec); ``gn_groups`` None means
    ``groups``.  ``order``, ``gamma`` and ``beta`` are inert with the dot
    kernel, ``gn_groups`` without GroupNorm, ``bn_momentum`` without a
    train-mode batch norm; inert keys are still validated.
    """

    planes: int | None = None  # P: the channels of t, p, g
    groups: int = 8  # G: channel groups, each with its own attention scalar
    use_scale: bool = False  # c = 1/sqrt(M), M = (P/G)·L
    kernel: Kernel = "dot"  # f(t, p): t·p, or exp(−γ(t − p)²) by Taylor series
    order: int = 2  # Q: the Taylor order of the Gaussian kernel
    gamma: float = 1e-4  # γ of the Gaussian kernel
    beta: Beta = "const"  # the envelope exp(−γ(t² + p²)): constant or per element
    norm: Norm | None = "gn"  # the norm after z
    gn_groups: int | None = None  # GroupNorm's groups; None: groups
    eps: float = 1e-5  # of GN or BN
    bn_momentum: float = 0.1
    bias: bool = False  # biases of t, p, g
    residual: bool = True  # out = norm(z) + x


# SpatialCGNL(inplanes, inplanes // 2, use_scale=False, groups=8)
_YUE = CGNLConfig(
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
)

PRESETS: dict[str, CGNLConfig] = {
    "yue": _YUE,  # the full config above
    # SpatialCGNLx(inplanes, inplanes // 2, use_scale=False, groups=8, order=3)
    "yue_gaussian": replace(_YUE, kernel="gaussian", order=3),
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
    dy: Array, cache: DotKernelCache, out: Array
) -> Array:
    """VJP of the dot kernel: dt, dp, dg written into out[:, 0], [:, 1], [:, 2].

    Math:
        dt = s dy,   ds = Σ_M dy t,   dp = c ds g,   dg = c ds p
    Shapes:
        dy (N, G, M) -> out (N, 3, G, M), returned
    Each gradient is written as soon as it is formed, so that at most one of
    them exists besides `out` (no three arrays to stack afterwards).
    """
    xp = namespace(dy=dy)
    t, p, g, s, scale = cache
    ds = xp.vecdot(dy, t, axis=-1)  # (N, G)
    if scale != 1.0:
        ds = ds * scale  # (N, G)
    ds3 = xp.reshape(ds, ds.shape + (1,))  # (N, G, 1)
    out[:, 0, ...] = xp.reshape(s, s.shape + (1,)) * dy  # dt (N, G, M)
    out[:, 1, ...] = ds3 * g  # dp (N, G, M)
    out[:, 2, ...] = ds3 * p  # dg (N, G, M)
    return out


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
    dy: Array, cache: TaylorKernelCache, out: Array
) -> Array:
    """VJP of the Taylor kernel: dt, dp, dg written into out[:, 0], [:, 1], [:, 2].

    Math (q' = q − 1 runs over q >= 1):
        du   = dy                      (const)  | exp(−γ θ²) ⊙ dy  (per_element)
        dθ   = du ⊙ Σ_q α_q s_q q θ^q'  [− 2γ θ ⊙ y ⊙ dy  (per_element)]
        ds_q = α_q Σ_M du θ^q
        dw   = c Σ_q ds_q φ^q
        dφ   = c w ⊙ Σ_q ds_q q φ^q'    [− 2γ φ ⊙ w ⊙ dw  (per_element)]
        dg   = dw                      (const)  | exp(−γ φ²) ⊙ dw  (per_element)
    Shapes:
        dy (N, G, M) -> out (N, 3, G, M), returned
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
    out[:, 0, ...] = dt  # (N, G, M)
    del du, dt
    # moments: s_q = c Σ_M φ^q w, a_q = α_q s_q
    dmom = da * c.alpha  # (N, G, Q+1) d(raw moment) before the scale
    if c.scale != 1.0:
        dmom = dmom * c.scale  # (N, G, Q+1)
    dp, dw = _moments_backward(dmom, c.moments)  # (N, G, M) each
    if c.env_t is not None:
        dp = dp - (2.0 * c.gamma) * (c.p * c.w * dw)  # envelope exp(−γ φ²)
        out[:, 2, ...] = xp.exp(-c.gamma * (c.p * c.p)) * dw  # dg (N, G, M)
    else:
        out[:, 2, ...] = dw  # dg (N, G, M)
    out[:, 1, ...] = dp  # (N, G, M)
    return out


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


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: CGNLConfig
            ) -> tuple[ArrayDict, CGNLCache]:
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
    Params and state: the keys of ``param_shapes`` (buffers in ``state``);
    ``cfg`` resolved (``planes`` and ``gn_groups`` set).
    """
    x = inputs["x"]
    xp = namespace(x=x)
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
        z, new_state, bn_cache = _batch_norm_named(
            z, params, state, "bn", training=cfg.norm == "bn_train",
            momentum=float(cfg.bn_momentum), eps=float(cfg.eps))  # y (N, C, L)
        outputs |= with_prefix("state", new_state)

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


def backward(douts: Arrays, cache: CGNLCache) -> tuple[ArrayDict, ArrayDict]:
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
    c, cfg = cache, cache.cfg
    dout = douts["out"]
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
        dz, dbn = _batch_norm_named_backward(dz, c.bn, "bn")  # (N, C, L)
        dparams |= dbn

    # 4. z
    dy3, dw_z, _ = _pointwise_conv_backward(dz, c.z)  # (N, P, L), (C, P/G)
    dparams["z.weight"] = xp.reshape(dw_z, (C, P // G) + ones)  # (C, P/G, *k)
    dy = xp.reshape(dy3, (N, G, M))  # (N, G, M)
    del dz, dy3

    # 3. the kernel, its three gradients written side by side into one array
    dtpg = xp.empty((N, 3, G, M), dtype=dy.dtype, device=device(dy))
    if c.dot is not None:
        _dot_kernel_backward(dy, c.dot, dtpg)  # (N, 3, G, M)
    else:
        _taylor_kernel_backward(dy, c.taylor, dtpg)  # (N, 3, G, M)
    del dy

    # 2. the groups were views of the t|p|g rows, so dt|dp|dg in that order
    #    are the rows of the stacked projection's gradient
    dproj = xp.reshape(dtpg, (N, 3 * P, L))  # (N, 3P, L)
    del dtpg

    # 1. t, p, g
    dx_proj, dp_proj = _stacked_conv_backward(dproj, c.proj)  # (N, C, L)
    dparams |= dp_proj
    del dproj
    # x fans out to the three convs and the residual: sum the two paths, in
    # place on the fresh product (one full-size array fewer at the peak)
    dx3 = dx_proj  # (N, C, L)
    if cfg.residual:
        dx3 += dout3  # (N, C, L)
    dx = xp.reshape(dx3, c.x_shape)  # (N, C, *S)
    return {"x": dx}, dparams


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
