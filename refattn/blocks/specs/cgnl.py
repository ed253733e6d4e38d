"""The ``cgnl`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from refattn import checks
from refattn._typing import Array, ArrayDict, Params, Shape
from refattn.backend import host_rng, namespace, prod
from refattn.blocks import cgnl
from refattn.blocks.cgnl import (BETAS, KERNELS, MAX_ORDER, NORMS, PRESETS, CGNLCache,
                                 CGNLConfig, gn_cancels_attention)
from refattn.blocks.spec import (BenchCase, check_batch_statistics, draw_param,
                                 init_norm, module_specs, norm_shapes, single_x_shape)
from refattn.params import is_buffer

RULES: dict[str, checks.Rule] = {
    "planes": checks.Int(1, optional=True),
    "groups": checks.Int(1),
    "use_scale": checks.Bool(),
    "kernel": checks.OneOf(KERNELS),
    "order": checks.Int(0, MAX_ORDER, why_maximum=" (the Taylor weight (2γ)^q / q! "
                        "needs q! finite in float64)"),
    "gamma": checks.Real(),
    "beta": checks.OneOf(BETAS),
    "norm": checks.OneOf(NORMS),
    "gn_groups": checks.Int(1, optional=True),
    "eps": checks.Real(positive=True),
    "bn_momentum": checks.Real(0.0, 1.0),
    "bias": checks.Bool(),
    "residual": checks.Bool(),
}


def _groups_divide_planes(cfg: CGNLConfig) -> str | None:
    if cfg.planes is not None and cfg.planes % cfg.groups:
        return f"planes ({cfg.planes}) must be divisible by groups ({cfg.groups})"
    return None


def _gaussian_gamma(cfg: CGNLConfig) -> str | None:
    if cfg.kernel != "gaussian":
        return None
    if cfg.gamma <= 0:
        return (f"gamma ({cfg.gamma!r}) must be > 0 with the gaussian kernel "
                f"exp(-gamma (t - p)^2)")
    try:
        (2.0 * cfg.gamma) ** cfg.order  # the largest power in the weights
    except OverflowError:
        return (f"gamma ({cfg.gamma!r}) with order {cfg.order}: the Taylor "
                f"weights (2γ)^q / q! overflow float64")
    return None


def check_config(cfg: Any) -> CGNLConfig:
    return checks.check_config("cgnl", cfg, CGNLConfig, RULES,
                               [_groups_divide_planes, _gaussian_gamma])


config_entry = checks.config_entry(check_config, shapes=True)
config_only = checks.config_entry(check_config)

def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    return single_x_shape("cgnl", input_shapes)


@config_entry
def resolve(cfg: CGNLConfig, input_shapes: Mapping[str, Shape]) -> CGNLConfig:
    """The config with ``planes`` (None -> C // 2) and ``gn_groups``
    (None -> groups) filled in, checked against the input channels."""
    C = _x_shape(input_shapes)[1]
    planes = cfg.planes
    if planes is None:
        planes = C // 2
        if planes < 1:
            raise ValueError(
                f"planes: None means C // 2, which is 0 for C = {C}; "
                f"set planes explicitly"
            )
        if planes % cfg.groups:
            raise ValueError(
                f"planes ({planes} = C // 2 for C = {C}) must be divisible by "
                f"groups ({cfg.groups})"
            )
    gn_groups = cfg.groups if cfg.gn_groups is None else cfg.gn_groups
    cfg = dataclasses.replace(cfg, planes=planes, gn_groups=gn_groups)
    _check_channels(cfg, C)
    return cfg


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


@config_entry
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
    cfg = resolve(cfg, input_shapes)
    C, P, G = x_shape[1], int(cfg.planes), cfg.groups  # type: ignore[arg-type]
    ones = (1,) * (len(x_shape) - 2)
    shapes: dict[str, Shape] = {}
    for name in ("t", "p", "g"):
        shapes[f"{name}.weight"] = (P, C) + ones
        if cfg.bias:
            shapes[f"{name}.bias"] = (P,)
    shapes["z.weight"] = (C, P // G) + ones
    if cfg.norm == "gn":
        shapes |= norm_shapes("gn", C, running=False)
    elif cfg.norm is not None:
        shapes |= norm_shapes("bn", C)
    return checks.limit_sizes("cgnl", shapes)


@config_entry
def init_params(cfg: CGNLConfig, input_shapes: Mapping[str, Shape], *, seed: int,
                anchor_init: bool = False) -> tuple[Params, Params]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: the contract's random draws (``refattn.blocks.spec``).
    Fixtures multiply the t/p/g convs by ``draw_scales`` so that every
    gradient is well conditioned.

    ``anchor_init=True``: the anchor ResNet's scheme for the block: every
    conv weight N(0, 0.01²), biases 0, norm gamma = beta = 0 (the block is
    the identity with the residual, and no gradient reaches t, p, g or z),
    running statistics (0, 1).
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    rng.standard_normal(1)  # a draw the fixtures' random stream begins with
    scheme = "small" if anchor_init else "random"
    params = {k: draw_param(rng, k, shapes, scheme)
              for k in shapes if not k.startswith(("gn.", "bn."))}
    state: dict[str, Array] = {}
    if cfg.norm is not None:
        module = "gn" if cfg.norm == "gn" else "bn"
        norm, state = init_norm(rng, module, shapes[f"{module}.weight"][0],
                                identity=anchor_init, running=module == "bn")
        params |= norm
    return params, state


@config_entry
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
    M = (int(resolve(cfg, input_shapes).planes) // cfg.groups) * prod(
        _x_shape(input_shapes)[2:])  # type: ignore[arg-type]
    scales = {}
    if cfg.kernel == "gaussian" and 2.0 * float(cfg.gamma) < 1.0:
        scales["t"] = scales["p"] = 1.0 / math.sqrt(2.0 * float(cfg.gamma))
    if gn_cancels_attention(cfg):
        c = 1.0 / math.sqrt(M) if cfg.use_scale else 1.0
        scales["g"] = math.sqrt(float(cfg.eps)) / (c * math.sqrt(M))
    return scales


@checks.forward_entry("cgnl")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[ArrayDict, CGNLCache]:
    """``cgnl.forward`` after checking every argument."""
    cfg = check_config(cfg)
    inputs = checks.check_inputs("cgnl", inputs, {"x": (3, 4, 5)})
    x_shape = tuple(inputs["x"].shape)
    cfg = resolve(cfg, {"x": x_shape})
    shapes = param_shapes(cfg, {"x": x_shape})
    params, state = checks.check_params(
        "cgnl", params, state, shapes, inputs, f"bias={cfg.bias}, norm={cfg.norm!r}")
    if cfg.norm == "bn_train":
        check_batch_statistics(x_shape, "norm='bn_train'", "z")
    return cgnl.forward(inputs, params, state, cfg)


@checks.backward_entry("cgnl")
def backward(douts: Any, cache: Any) -> tuple[ArrayDict, ArrayDict]:
    """``cgnl.backward`` after checking the cotangent; dparams in the order
    of ``param_shapes``."""
    checks.check_cache("cgnl", cache, (CGNLCache,))
    checks.check_douts("cgnl", douts, shape=cache.x_shape, like=cache.proj.conv.x3)
    dinputs, dparams = cgnl.backward(douts, cache)
    shapes = param_shapes(cache.cfg, {"x": cache.x_shape})
    order = [k for k in shapes if not is_buffer(k)]
    return dinputs, {k: dparams[k] for k in order}


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


@config_entry
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
    cfg = resolve(cfg, input_shapes)
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
    cfg = resolve(cfg, input_shapes)
    return (
        len(_x_shape(input_shapes)) == 4
        and cfg.kernel == PRESETS[preset].kernel
        and not cfg.bias
        and cfg.norm == "gn"
        and cfg.gn_groups == cfg.groups
        and cfg.residual
        and (cfg.kernel == "dot" or cfg.beta == "const")
    )


@config_only
def with_bn_mode(cfg: CGNLConfig, mode: str) -> CGNLConfig | None:
    """`cfg` with its batch norm in `mode` ('train' or 'eval'); None unless
    norm is 'bn_train' or 'bn_eval' (GroupNorm has no modes)."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if cfg.norm not in ("bn_train", "bn_eval"):
        return None
    return dataclasses.replace(cfg, norm=f"bn_{mode}")  # type: ignore[arg-type]


@config_only
def fixture_shapes(cfg: CGNLConfig) -> dict[str, Shape]:
    """Small default input: (2, C, 5, 7) with the smallest C >= 16 that the
    config's groups, gn_groups and planes (or C // 2) divide into."""
    gn = cfg.groups if cfg.gn_groups is None else cfg.gn_groups
    base = math.lcm(cfg.groups, gn if cfg.norm == "gn" else 1)
    if cfg.planes is None:
        base = math.lcm(base, 2 * cfg.groups)
    C = base * max(1, -(-16 // base))
    return {"x": (2, C, 5, 7)}


@config_entry
def flops(cfg: CGNLConfig, input_shapes: Mapping[str, Shape]) -> int:
    """The t, p, g projections (3·2·N·L·C·P), the dot kernel's s = Σ φ g and
    y = s θ (3·N·P·L), and the grouped z conv (2·N·L·(P/G)·C)."""
    N, C, *S = _x_shape(input_shapes)
    L = prod(S)
    P, G = int(resolve(cfg, input_shapes).planes), cfg.groups  # type: ignore[arg-type]
    return 3 * 2 * N * L * C * P + 3 * N * P * L + 2 * N * L * (P // G) * C


SPECS = module_specs(
    __name__,
    summary="compact generalized non-local block (Yue et al. 2018): dot and "
    "Taylor-expanded Gaussian kernels per channel group, GroupNorm",
    config_cls=CGNLConfig,
    default_preset="yue",
    bench=BenchCase("yue", {"planes": 128}, {"x": (8, 256, 28, 28)},
                    "x(8,256,28,28) dot kernel, planes 128, groups 8, GN"),
    figure=("draw_cgnl", (11.0, 3.8)),
    anchors={p: f"cgnl:make_{p}" for p in ("yue", "yue_gaussian")},
)
