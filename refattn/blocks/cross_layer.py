"""Cross-layer non-local (CNL) attention: queries from one layer, keys and
values from one or several other layers.

Reference:
    Z. Ye, F. Hu, Y. Liu, Z. Xia, F. Lyu, P. Liu, "Associating Multi-Scale
    Receptive Fields for Fine-grained Recognition", ICIP 2020
    (arXiv:2005.09153).  Anchor: FouriYe/CNL-ICIP2020 ``cnlnet_5CNL.py``,
    class ``CNL_5`` (presets ``cnl`` and ``cnl_official_noperm``); the seed
    notes' snippet, corrected (preset ``seed_fixed``); reference/blocks.md
    section 7.

Equations.  The query ("perspective") layer x_q and M key/value ("response")
layers x_m, m = 0 .. M-1, each with its own channels and spatial size; a
non-local operation per response layer with the query's θ and W_z shared:

    Q     = θ(x_q)ᵀ                           (Lq, P)   θ: 1x1 conv Cq -> P
    K_m   = φ_m(x_m),  V_m = g_m(x_m)ᵀ        (P, Lk_m), (Lk_m, P)   Ck_m -> P
    A_m   = softmax_keys(Q K_m / sqrt(P))     (Lq, Lk_m)   rows sum to 1
    Y_m   = (A_m V_m)ᵀ -> (P, Hq, Wq)         transpose BEFORE the reshape
    Z_m   = BN_m(W_z Y_m)                     (Cq, Hq, Wq)  W_z: 1x1 conv P -> Cq
    out   = x_q + Σ_m Z_m

The scale ``1/sqrt(P)`` is ``use_scale``; BN_m is ``bn`` (None, 'train',
'eval'); ``residual=False`` returns Σ_m Z_m (the official ``CNL_5`` module
alone; its network adds x_q).  ``layout='official_noperm'`` reproduces the
official code, which reinterprets the (Lq, P) buffer of A_m V_m as
(P, Hq, Wq) without the transpose (``o.view(N, P, Hq, Wq)``): a different
function, kept for checkpoint parity.  ``out_proj=False`` drops W_z (then
P = Cq and there is no BN): Z_m = Y_m, the seed notes' corrected snippet.

Paper symbol -> code:

    ======================  ==================================  ===============
    paper / official code   parameter key / variable            shape
    ======================  ==================================  ===============
    x_q (perspective)       input ``x_q``                       (N, Cq, Hq, Wq)
    x_m (responses[m])      input ``x_kv`` (M = 1) or           (N, Ck_m, Hk_m,
                            ``x_kv.{m}``                         Wk_m)
    θ (``t``)               ``theta.weight`` (+ ``.bias``)      (P, Cq, 1, 1)
    φ_m (``p{m}``)          ``kv{m}.phi.weight`` (+ ``.bias``)  (P, Ck_m, 1, 1)
    g_m (``g{m}``)          ``kv{m}.g.weight`` (+ ``.bias``)    (P, Ck_m, 1, 1)
    W_z (``z``)             ``W.weight`` (+ ``.bias``)          (Cq, P, 1, 1)
    BN_m (``bn{m}``)        ``kv{m}.bn.weight``, ``.bias``,     (Cq,)
                            ``.running_mean``, ``.running_var``
    Q                       ``q`` (scale folded in)             (N, Lq, P)
    K_m, V_mᵀ               ``phi``, ``g``                      (N, P, Lk_m)
    A_m                     output ``aux.attention.{m}``        (N, Lq, Lk_m)
    Y_m                     ``y``                               (N, P, Lq)
    Z_m                     ``z``                               (N, Cq, Lq)
    out                     output ``out``                      (N, Cq, Hq, Wq)
    ======================  ==================================  ===============

Lq = Hq·Wq and Lk_m = Hk_m·Wk_m.  The single-layer input ``x_kv`` has the
same parameters as ``x_kv.0`` (``kv0.*``, ``aux.attention.0``); only the
input's name differs.  The official module indexes its responses from 0
too (``p0 .. p4``), so ``kv{m}`` is the official ``p{m}``/``g{m}``/``bn{m}``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
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
from refattn.ops.linear import MatmulCache, _matmul, _matmul_backward
from refattn.ops.norm import BatchNormCache, _batch_norm, _batch_norm_backward
from refattn.ops.softmax import SoftmaxCache, _softmax, _softmax_backward
from refattn.params import add_params, is_buffer

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "SPECS",
    "CrossLayerCache",
    "CrossLayerConfig",
    "KVCache",
    "accumulation",
    "anchor_names",
    "backward",
    "fixture_shapes",
    "forward",
    "init_params",
    "kink_margin",
    "kv_input_names",
    "param_shapes",
    "with_bn_mode",
]

Layout = Literal["transpose", "official_noperm"]
BnMode = Literal["train", "eval"]

LAYOUTS: tuple[str, ...] = ("transpose", "official_noperm")
BN_MODES: tuple[str | None, ...] = (None, "train", "eval")
_KV_NUMBERED = re.compile(r"x_kv\.(0|[1-9][0-9]*)")


# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class CrossLayerConfig:
    """Configuration of the cross-layer non-local block (blocks.md section 9.2).

    The number of key/value layers is not a key: it is the number of
    ``x_kv*`` inputs.  ``planes=None`` means P = Cq (the query's channels),
    filled in by ``resolved``.
    """

    planes: int | None = 256
    use_scale: bool = True
    bias: bool = False
    bn: BnMode | None = "train"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    layout: Layout = "transpose"
    out_proj: bool = True
    residual: bool = True

    def __post_init__(self) -> None:
        p = self.planes
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                raise ValueError(f"planes: expected an int >= 1 or None, got {p!r}")
            if p < 1:
                raise ValueError(f"planes: expected an int >= 1 or None, got {p}")
        for key in ("use_scale", "bias", "out_proj", "residual"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key}: expected a bool, got {value!r}")
        if self.bn not in BN_MODES:
            raise ValueError(f"bn: expected None, 'train' or 'eval', got {self.bn!r}")
        eps = self.bn_eps
        if not is_real(eps) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"bn_eps: expected a finite float > 0, got {eps!r}")
        m = self.bn_momentum
        if not is_real(m) or not 0.0 <= m <= 1.0:
            raise ValueError(f"bn_momentum: expected a float in [0, 1], got {m!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(
                "layout: expected 'transpose' or 'official_noperm', "
                f"got {self.layout!r}"
            )
        if not self.out_proj and self.bn is not None:
            raise ValueError(
                f"out_proj=False requires bn=None (BN_m normalises the output of "
                f"the shared conv W, which out_proj=False removes), got bn={self.bn!r}"
            )

    def resolved(self, input_shapes: Mapping[str, Shape]) -> CrossLayerConfig:
        """The config with ``planes`` filled in (None -> Cq), checked against
        the inputs (out_proj=False needs planes == Cq)."""
        q_shape, _, _ = _parse_input_shapes(input_shapes)
        cq = q_shape[1]
        cfg = self if self.planes is not None else dataclasses.replace(self, planes=cq)
        if not cfg.out_proj and cfg.planes != cq:
            raise ValueError(
                f"planes ({cfg.planes}) must equal the query channels Cq ({cq}) "
                f"when out_proj=False: without the output conv W, Y_m (P channels) "
                f"is the output"
            )
        return cfg


PRESETS: dict[str, CrossLayerConfig] = {
    # FouriYe/CNL-ICIP2020 CNL_5 with the transpose the official code omits
    # (P = 256 for the official 2048-channel query); residual as in CNLNet
    "cnl": CrossLayerConfig(
        planes=256,
        use_scale=True,
        bias=False,
        bn="train",
        bn_eps=1e-5,
        bn_momentum=0.1,
        layout="transpose",
        out_proj=True,
        residual=True,
    ),
    # the official code as written: o.view(N, P, Hq, Wq) without the transpose
    "cnl_official_noperm": CrossLayerConfig(
        planes=256,
        use_scale=True,
        bias=False,
        bn="train",
        bn_eps=1e-5,
        bn_momentum=0.1,
        layout="official_noperm",
        out_proj=True,
        residual=True,
    ),
    # the seed notes' snippet corrected: q/k/v convs (with bias) to Cq
    # channels, softmax over keys, bmm(att, V), transpose before the reshape
    "seed_fixed": CrossLayerConfig(
        planes=None,
        use_scale=False,
        bias=True,
        bn=None,
        bn_eps=1e-5,
        bn_momentum=0.1,
        layout="transpose",
        out_proj=False,
        residual=False,
    ),
}


# ---------------------------------------------------------------------------
# inputs, shapes and parameters


def kv_input_names(names: Any) -> list[str]:
    """The key/value input names in layer order, validated.

    Either ``x_kv`` alone (one layer) or ``x_kv.0, x_kv.1, ..., x_kv.{M-1}``
    (any order given, no gaps); ``x_q`` must be there too, nothing else.
    """
    names = list(names)
    if "x_q" not in names:
        raise ValueError(
            f"inputs: cross_layer needs the query input 'x_q', got {sorted(names)}"
        )
    kv = [k for k in names if k != "x_q"]
    numbered = [k for k in kv if _KV_NUMBERED.fullmatch(k)]
    unknown = sorted(k for k in kv if k != "x_kv" and k not in numbered)
    if unknown:
        raise ValueError(
            f"inputs: unexpected name(s) {unknown}; cross_layer takes 'x_q' and "
            f"either 'x_kv' or 'x_kv.0', 'x_kv.1', ..."
        )
    if "x_kv" in kv and numbered:
        raise ValueError(
            f"inputs: use either 'x_kv' (one key/value layer) or 'x_kv.0', "
            f"'x_kv.1', ... (several), not both; got {sorted(kv)}"
        )
    if "x_kv" in kv:
        return ["x_kv"]
    if not numbered:
        raise ValueError(
            "inputs: cross_layer needs at least one key/value input, 'x_kv' or "
            f"'x_kv.0', 'x_kv.1', ...; got {sorted(names)}"
        )
    index = sorted(int(k.split(".")[1]) for k in numbered)
    missing = [f"x_kv.{i}" for i in range(index[-1] + 1) if i not in index]
    if missing:
        raise ValueError(
            f"inputs: key/value inputs must be numbered x_kv.0 .. x_kv.{{M-1}} "
            f"without gaps; {', '.join(missing)} missing from {sorted(numbered)}"
        )
    return [f"x_kv.{i}" for i in index]


def _parse_input_shapes(
    input_shapes: Mapping[str, Shape],
) -> tuple[Shape, list[str], list[Shape]]:
    """(x_q shape, kv input names in layer order, their shapes), validated."""
    if not isinstance(input_shapes, Mapping):
        raise ValueError(
            "inputs: expected a dict of input shapes, got "
            f"{type(input_shapes).__name__}"
        )
    names = kv_input_names(input_shapes)
    shapes = {}
    for name in ["x_q", *names]:
        shape = tuple(int(s) for s in input_shapes[name])
        if len(shape) != 4:
            raise ValueError(
                f"{name}: expected a 4-D array (N, C, H, W), got shape {shape}"
            )
        if any(s < 1 for s in shape):
            raise ValueError(f"{name}: expected every dim >= 1, got shape {shape}")
        shapes[name] = shape
    q = shapes["x_q"]
    for name in names:
        if shapes[name][0] != q[0]:
            raise ValueError(
                f"{name}: batch size ({shapes[name][0]}) must equal x_q's ({q[0]}): "
                f"the key/value layers come from the same images as the query "
                f"({name} shape {shapes[name]}, x_q shape {q})"
            )
    return q, names, [shapes[n] for n in names]


def param_shapes(
    cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, Shape]:
    """Every parameter and buffer key of `cfg` for these inputs, with its shape.

    Shapes:
        theta.weight (P, Cq, 1, 1), theta.bias (P,);
        W.weight (Cq, P, 1, 1), W.bias (Cq,)              (out_proj only);
        kv{m}.phi.weight, kv{m}.g.weight (P, Ck_m, 1, 1), .bias (P,);
        kv{m}.bn.weight, .bias, .running_mean, .running_var (Cq,)   (bn only)
        (biases only with ``bias``).
    """
    q_shape, _, kv_shapes = _parse_input_shapes(input_shapes)
    cfg = cfg.resolved(input_shapes)
    cq, P = q_shape[1], int(cfg.planes)  # type: ignore[arg-type]
    shapes: dict[str, Shape] = {"theta.weight": (P, cq, 1, 1)}
    if cfg.bias:
        shapes["theta.bias"] = (P,)
    if cfg.out_proj:
        shapes["W.weight"] = (cq, P, 1, 1)
        if cfg.bias:
            shapes["W.bias"] = (cq,)
    for m, kv_shape in enumerate(kv_shapes):
        for name in ("phi", "g"):
            shapes[f"kv{m}.{name}.weight"] = (P, kv_shape[1], 1, 1)
            if cfg.bias:
                shapes[f"kv{m}.{name}.bias"] = (P,)
        if cfg.bn is not None:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"kv{m}.bn.{leaf}"] = (cq,)
    return shapes


def init_params(
    cfg: CrossLayerConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: random and non-degenerate (weights N(0, 1/fan_in), biases
    N(0, 0.1²), BN gamma in [0.5, 1.5], beta N(0, 0.1²), running mean
    N(0, 0.1²) and variance in [0.5, 2]).

    ``anchor_init=True``: with BN, the official CNLNet init (every CNL conv
    N(0, 0.01²), biases 0, every BN gamma = beta = 0, running statistics
    (0, 1)): the block is the identity (residual) or zero and no gradient
    reaches theta, phi, g or W.  Without BN (``seed_fixed``), PyTorch's
    default Conv2d init: weights and biases U(±1/sqrt(fan_in)).
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    ref = rng.standard_normal(1)  # a host float64 array: zeros_like_shape's template
    params: dict[str, Array] = {}
    state: dict[str, Array] = {}
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if module.endswith(".bn"):
            continue
        fan_in = prod(shapes[f"{module}.weight"][1:])
        if not anchor_init:
            draw = draw_weight if leaf == "weight" else draw_bias
            value = draw(rng, shape)
        elif cfg.bn is not None:
            scaled = 0.01 * rng.standard_normal(shape)
            value = scaled if leaf == "weight" else zeros_like_shape(ref, shape)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        params[key] = value
    for key in (k for k in shapes if k.endswith(".bn.weight")):
        module = key.rsplit(".", 1)[0]
        C = shapes[key][0]
        if anchor_init:
            zeros = zeros_like_shape(ref, (C,))
            params[f"{module}.weight"], params[f"{module}.bias"] = zeros, zeros + 0.0
            state[f"{module}.running_mean"] = zeros + 0.0
            state[f"{module}.running_var"] = zeros + 1.0
        else:
            gamma, beta = draw_norm_affine(rng, C)
            params[f"{module}.weight"], params[f"{module}.bias"] = gamma, beta
            mean, var = draw_bn_state(rng, C)
            state[f"{module}.running_mean"], state[f"{module}.running_var"] = mean, var
    return params, state


# ---------------------------------------------------------------------------
# forward and backward


class KVCache(NamedTuple):
    """What the backward needs of one key/value layer m."""

    x_shape: Shape  # (N, Ck_m, Hk_m, Wk_m)
    kv: PointwiseConvCache  # 2. phi|g stacked 1x1 conv on x_m
    affinity: MatmulCache  # 3. Q K_m
    softmax: SoftmaxCache  # 4. A_m
    attend: MatmulCache  # 5. A_m V_m
    w: PointwiseConvCache | None  # 7. W (out_proj)
    bn: BatchNormCache | None  # 8. BN_m


class CrossLayerCache(NamedTuple):
    cfg: CrossLayerConfig  # resolved
    names: tuple[str, ...]  # key/value input names, in layer order
    q_shape: Shape  # (N, Cq, Hq, Wq)
    scale: float  # affinity scale s (1.0 unless use_scale)
    theta: PointwiseConvCache  # 1. θ on x_q
    layers: tuple[KVCache, ...]  # steps 2-8 per key/value layer


def forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: CrossLayerConfig,
) -> tuple[dict[str, Array], CrossLayerCache]:
    """Cross-layer non-local forward.

    Math (per sample; s = 1/sqrt(P) with use_scale, else 1):
        Q   = s (W_θ x_q + b_θ)ᵀ                                  (Lq, P)
        per layer m:  [K_m; V_mᵀ] = [W_φm; W_gm] x_m + [b_φm; b_gm]
        A_m = softmax_keys(Q K_m);  Y_m = (A_m V_m)ᵀ  (transpose layout)
                                    or  reshape(A_m V_m, (P, Lq))  (official_noperm)
        Z_m = BN_m(W Y_m + b_W)     (W and BN optional)
        out = x_q + Σ_m Z_m         (+ x_q only with residual)
    Shapes:
        inputs["x_q"]                  (N, Cq, Hq, Wq)
        inputs["x_kv"] or ["x_kv.m"]   (N, Ck_m, Hk_m, Wk_m)
        outputs["out"]                 (N, Cq, Hq, Wq)
        outputs["aux.attention.m"]     (N, Lq, Lk_m)
        outputs["state.kv{m}.bn.running_mean" / "...running_var"]  (Cq,), bn='train'
    Params and state: the keys of ``param_shapes`` (buffers in ``state``;
    buffers given in ``params`` are accepted too).
    """
    x_q, kvs, names, params, state, cfg, xp = _check_forward_args(
        inputs, params, state, cfg
    )
    N, cq, hq, wq = (int(s) for s in x_q.shape)
    lq, P = hq * wq, int(cfg.planes)  # type: ignore[arg-type]
    xq3 = xp.reshape(x_q, (N, cq, lq))  # (N, Cq, Lq)
    w_out = xp.reshape(params["W.weight"], (cq, P)) if cfg.out_proj else None  # (Cq, P)
    b_out = params.get("W.bias")

    # 1. θ on the query layer, computed once and shared by every layer m;
    #    the scale is folded into Q (Lq·P values, not Lq·Lk_m per layer)
    w_theta = xp.reshape(params["theta.weight"], (P, cq))  # (P, Cq)
    theta, theta_cache = _pointwise_conv(xq3, w_theta, params.get("theta.bias"), 1)
    scale = 1.0 / math.sqrt(P) if cfg.use_scale else 1.0
    q = theta.mT * scale if cfg.use_scale else theta.mT  # (N, Lq, P)

    aux: dict[str, Array] = {}
    new_state: dict[str, Array] = {}
    layers: list[KVCache] = []
    total = None
    for m, x_m in enumerate(kvs):
        ck, hk, wk = (int(s) for s in x_m.shape[1:])
        lk = hk * wk
        xk3 = xp.reshape(x_m, (N, ck, lk))  # (N, Ck, Lk)

        # 2. φ_m and g_m: one 1x1 conv with the two weights stacked row-wise
        w_kv = xp.concat(
            [xp.reshape(params[f"kv{m}.{n}.weight"], (P, ck)) for n in ("phi", "g")],
            axis=0,
        )  # (2P, Ck)
        b_kv = None
        if cfg.bias:
            b_kv = xp.concat([params[f"kv{m}.phi.bias"], params[f"kv{m}.g.bias"]])
        kv, kv_cache = _pointwise_conv(xk3, w_kv, b_kv, 1)  # (N, 2P, Lk)
        phi, g = kv[:, :P, :], kv[:, P:, :]  # (N, P, Lk) each

        # 3. affinity of every query position with every key position of layer m
        f, affinity_cache = _matmul(q, phi)  # (N, Lq, Lk)

        # 4. softmax over the keys (the last axis)
        attention, softmax_cache = _softmax(f, f.ndim - 1)  # (N, Lq, Lk)
        aux[f"aux.attention.{m}"] = attention

        # 5. A_m V_m: each query position's weighted mean of the values
        y_t, attend_cache = _matmul(attention, g.mT)  # (N, Lq, P)

        # 6. back to channel-first (N, P, Lq): transpose, or the official code's
        #    reinterpretation of the (Lq, P) buffer as (P, Lq)
        if cfg.layout == "transpose":
            y = y_t.mT  # (N, P, Lq)
        else:
            y = xp.reshape(y_t, (N, P, lq))  # (N, P, Lq)

        # 7. the shared output conv W: P -> Cq
        w_cache = None
        z = y  # (N, P = Cq, Lq) without W
        if cfg.out_proj:
            z, w_cache = _pointwise_conv(y, w_out, b_out, 1)  # (N, Cq, Lq)

        # 8. BN_m
        bn_cache = None
        if cfg.bn is not None:
            (z, new_mean, new_var), bn_cache = _batch_norm(
                z,
                params[f"kv{m}.bn.weight"],
                params[f"kv{m}.bn.bias"],
                state[f"kv{m}.bn.running_mean"],
                state[f"kv{m}.bn.running_var"],
                cfg.bn == "train", float(cfg.bn_momentum), float(cfg.bn_eps),
            )  # training, momentum, eps; y (N, Cq, Lq)
            if cfg.bn == "train":
                new_state[f"state.kv{m}.bn.running_mean"] = new_mean
                new_state[f"state.kv{m}.bn.running_var"] = new_var

        total = z if total is None else total + z  # (N, Cq, Lq)
        layers.append(
            KVCache(tuple(x_m.shape), kv_cache, affinity_cache, softmax_cache,
                    attend_cache, w_cache, bn_cache)
        )

    # 9. sum over the layers, plus the query itself (residual)
    out = total + xq3 if cfg.residual else total  # (N, Cq, Lq)
    outputs = {"out": xp.reshape(out, (N, cq, hq, wq))} | aux | new_state
    cache = CrossLayerCache(
        cfg, tuple(names), tuple(x_q.shape), scale, theta_cache, tuple(layers)
    )
    return outputs, cache


def backward(
    douts: Mapping[str, Array], cache: CrossLayerCache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """VJP of the cross-layer non-local block (the forward's steps in reverse).

    Math (per sample, D = d out; every layer m receives D):
        dZ_m through BN_m;  dY_m = Wᵀ dZ_m;  dW = Σ_m dZ_m Y_mᵀ;  db_W = Σ_m Σ dZ_m
        dY_mᵀ = (dY_m)ᵀ  or  reshape(dY_m, (Lq, P))   (the layout's adjoint)
        dA_m = dY_mᵀ V_mᵀ;  dV_m = A_mᵀ dY_mᵀ
        dF_m = A_m ⊙ (dA_m − rowsum(A_m ⊙ dA_m))
        dQ_m = dF_m K_mᵀ;  dK_m = Qᵀ dF_m;  through [W_φm; W_gm] to dx_m
        dQ = Σ_m dQ_m;  dΘ = s dQᵀ;  through W_θ;  dx_q = D (residual) + W_θᵀ dΘ
    Shapes:
        douts["out"]  (N, Cq, Hq, Wq) -> dinputs keyed like the inputs, each
        with its input's shape; dparams: one entry per trainable key of params
    """
    c = cache
    cfg = c.cfg
    dout = check_douts("cross_layer", douts, shape=c.q_shape, like=c.theta.x3)
    xp = namespace(dout=dout)
    N, cq, hq, wq = c.q_shape
    lq, P = hq * wq, int(cfg.planes)  # type: ignore[arg-type]
    dout3 = xp.reshape(dout, (N, cq, lq))  # (N, Cq, Lq)
    dparams: dict[str, Array] = {}
    dinputs: dict[str, Array] = {}
    dqs: list[Array] = []
    dws: list[dict[str, Array]] = []

    # 9. out = x_q + Σ_m Z_m: every layer's Z_m receives dout (x_q's share at 1.)
    # Each step below `del`s the gradients it has consumed, so that the
    # backward holds a few of them at a time rather than the whole chain.
    for m, (name, layer) in enumerate(zip(c.names, c.layers)):
        dz = dout3  # (N, Cq, Lq)

        # 8. BN_m
        if layer.bn is not None:
            dz, dgamma, dbeta = _batch_norm_backward(dz, layer.bn)  # (N, Cq, Lq)
            dparams[f"kv{m}.bn.weight"], dparams[f"kv{m}.bn.bias"] = dgamma, dbeta

        # 7. W
        dy = dz  # (N, P, Lq) without W
        if layer.w is not None:
            dy, dw2, db_w = _pointwise_conv_backward(dz, layer.w)  # (N, P, Lq)
            dw = {"W.weight": xp.reshape(dw2, (cq, P, 1, 1))}
            if db_w is not None:
                dw["W.bias"] = db_w
            dws.append(dw)
        del dz

        # 6. the layout's adjoint: transpose back, or the inverse reshape
        if cfg.layout == "transpose":
            dy_t = dy.mT  # (N, Lq, P)
        else:
            dy_t = xp.reshape(dy, (N, lq, P))  # (N, Lq, P)

        # 5. A_m V_m
        dattention, dg_t = _matmul_backward(dy_t, layer.attend)  # (N,Lq,Lk), (N,Lk,P)
        del dy, dy_t

        # 4. softmax over the keys
        df = _softmax_backward(dattention, layer.softmax)  # (N, Lq, Lk)
        del dattention

        # 3. Q K_m
        dq, dphi = _matmul_backward(df, layer.affinity)  # (N, Lq, P), (N, P, Lk)
        dqs.append(dq)
        del df, dq

        # 2. φ_m and g_m (stacked rows, as in the forward)
        dkv = xp.concat([dphi, dg_t.mT], axis=1)  # (N, 2P, Lk)
        del dphi, dg_t
        dxk3, dw_kv, db_kv = _pointwise_conv_backward(dkv, layer.kv)  # (N, Ck, Lk)
        del dkv
        ck = layer.x_shape[1]
        for row, n in enumerate(("phi", "g")):
            rows = slice(row * P, (row + 1) * P)
            dparams[f"kv{m}.{n}.weight"] = xp.reshape(dw_kv[rows, :], (P, ck, 1, 1))
            if db_kv is not None:
                dparams[f"kv{m}.{n}.bias"] = db_kv[rows]  # (P,)
        dinputs[name] = xp.reshape(dxk3, layer.x_shape)  # (N, Ck, Hk, Wk)

    # W is shared by every layer: its gradient is the sum of the layers' grads
    if dws:
        dparams |= reduce(add_params, dws)
    # Q feeds every layer's affinity: sum its gradient over m
    dq = reduce(operator.add, dqs)  # (N, Lq, P)
    del dqs

    # 1. θ (Q = s θᵀ)
    dtheta = dq.mT * c.scale if cfg.use_scale else dq.mT  # (N, P, Lq)
    dxq3, dw_theta, db_theta = _pointwise_conv_backward(dtheta, c.theta)  # (N, Cq, Lq)
    del dq, dtheta
    dparams["theta.weight"] = xp.reshape(dw_theta, (P, cq, 1, 1))
    if db_theta is not None:
        dparams["theta.bias"] = db_theta
    # x_q feeds θ and, with the residual, the output directly
    dxq3 = dxq3 + dout3 if cfg.residual else dxq3  # (N, Cq, Lq)
    dinputs = {"x_q": xp.reshape(dxq3, c.q_shape)} | dinputs  # (N, Cq, Hq, Wq)
    return dinputs, {k: dparams[k] for k in _trainable_keys(c)}


def _trainable_keys(c: CrossLayerCache) -> list[str]:
    shapes = {"x_q": c.q_shape}
    shapes |= {n: layer.x_shape for n, layer in zip(c.names, c.layers)}
    return [k for k in param_shapes(c.cfg, shapes) if not is_buffer(k)]


# ---------------------------------------------------------------------------
# validation


def _check_forward_args(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: CrossLayerConfig,
) -> tuple[Array, list[Array], list[str], dict[str, Array], dict[str, Array],
           CrossLayerConfig, Any]:
    if not isinstance(cfg, CrossLayerConfig):
        raise TypeError(f"cfg: expected a CrossLayerConfig, got {type(cfg).__name__}")
    if not isinstance(inputs, Mapping):
        raise ValueError(
            f"inputs: expected a dict of arrays, got {type(inputs).__name__}"
        )
    names = kv_input_names(inputs)
    for name in ["x_q", *names]:
        check_array(name, inputs[name])
    input_shapes = {k: tuple(inputs[k].shape) for k in ["x_q", *names]}
    cfg = cfg.resolved(input_shapes)  # validates the shapes too
    shapes = param_shapes(cfg, input_shapes)
    arrays = {k: inputs[k] for k in ["x_q", *names]}
    params, state, xp = check_arguments(
        arrays, params, state, shapes,
        f"bias={cfg.bias}, bn={cfg.bn!r}, out_proj={cfg.out_proj}, "
        f"{len(names)} key/value layer(s)",
    )
    N, _, hq, wq = input_shapes["x_q"]
    if cfg.bn == "train" and N * hq * wq < 2:
        raise ValueError(
            f"x_q: bn='train' normalises each Z_m with batch statistics over "
            f"N·Hq·Wq values per channel, which needs N·Hq·Wq >= 2, got shape "
            f"{input_shapes['x_q']}"
        )
    return arrays["x_q"], [arrays[n] for n in names], names, params, state, cfg, xp


# ---------------------------------------------------------------------------
# the rest of the block contract


def kink_margin(cache: CrossLayerCache) -> float:
    """No ReLU and no max: the block is smooth everywhere (infinite margin)."""
    return math.inf


def accumulation(
    cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, int]:
    """The longest chain of sums behind each tensor family.

    Forward, per layer: projections (max(Cq, Ck)), affinity (P), softmax
    normaliser and A V (Lk each), W (P), BN statistics (N·Lq, train); then
    the sum over the M layers.  The backward adds the transposed products
    (Cq, P, Lk, Lq, 2P) and the sum over the layers; parameter gradients add
    the sum over the batch and positions (N·max(Lq, Lk)).
    """
    q_shape, _, kv_shapes = _parse_input_shapes(input_shapes)
    cfg = cfg.resolved(input_shapes)
    N, cq, lq = q_shape[0], q_shape[1], q_shape[2] * q_shape[3]
    P, M = int(cfg.planes), len(kv_shapes)  # type: ignore[arg-type]
    ck = max(s[1] for s in kv_shapes)
    lk = max(s[2] * s[3] for s in kv_shapes)
    bn = N * lq if cfg.bn == "train" else 0
    aux = max(cq, ck) + P + lk
    forward_chain = aux + lk + (P if cfg.out_proj else 0) + bn + M
    backward_chain = forward_chain + cq + P + lk + lq + 2 * P + M + bn
    return {
        "out": forward_chain,
        "aux": aux,
        "state": forward_chain,
        "grad.input": backward_chain,
        "grad.param": backward_chain + N * max(lq, lk),
    }


def anchor_names(
    preset: str | None, cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """Canonical key -> the anchor module's state_dict key.

    The anchor modules are in tests/anchors/cross_layer.py.

    ``cnl`` / ``cnl_official_noperm``: the official ``CNL_5`` names ``t``,
    ``z``, ``p{m}``, ``g{m}``, ``bn{m}`` (m from 0, as the official
    ``responses[m]``); with ``residual`` the anchor is the network-level sum
    ``x_q + CNL_5(...)`` of ``CNLNet`` and the keys carry its attribute
    prefix ``CNL_5.`` (as in an official CNLNet checkpoint).  ``seed_fixed``:
    the corrected snippet's ``query_conv``, ``key_conv``, ``value_conv``.
    Empty when the preset has no anchor or the anchor cannot express `cfg`.
    """
    if preset not in PRESETS or not _anchor_supports(preset, cfg, input_shapes):
        return {}
    shapes = param_shapes(cfg, input_shapes)
    names: dict[str, str] = {}
    for key in shapes:
        module, leaf = key.rsplit(".", 1)
        if preset == "seed_fixed":
            target = {"theta": "query_conv", "kv0.phi": "key_conv",
                      "kv0.g": "value_conv"}[module]
        else:
            if module in ("theta", "W"):
                target = {"theta": "t", "W": "z"}[module]
            else:
                layer, part = module.split(".")
                target = {"phi": "p", "g": "g", "bn": "bn"}[part] + layer[len("kv"):]
            if cfg.residual:
                target = f"CNL_5.{target}"
        names[key] = f"{target}.{leaf}"
    return names


def _anchor_supports(
    preset: str, cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]
) -> bool:
    """Whether the anchor implementation of `preset` can express `cfg`."""
    _, names, _ = _parse_input_shapes(input_shapes)
    if preset == "seed_fixed":
        return (
            len(names) == 1
            and not cfg.out_proj
            and not cfg.use_scale
            and cfg.layout == "transpose"
            and not cfg.residual
        )
    return not cfg.bias and cfg.out_proj and cfg.bn is not None


def with_bn_mode(cfg: CrossLayerConfig, mode: str) -> CrossLayerConfig | None:
    """`cfg` with its per-layer BNs in `mode` ('train' or 'eval'); None without BN."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
    if cfg.bn is None:
        return None
    return dataclasses.replace(cfg, bn=mode)  # type: ignore[arg-type]


def fixture_shapes(cfg: CrossLayerConfig) -> dict[str, Shape]:
    """Small default inputs: key/value layers with their own channels and
    larger spatial sizes than the query (as in the official network).

    With the output conv (``cnl`` presets): two key/value layers
    ``x_kv.0``, ``x_kv.1``; without it (``seed_fixed``): one ``x_kv``, and
    the query has P channels when ``planes`` is set (P = Cq is required).
    """
    if cfg.out_proj:
        return {"x_q": (2, 4, 3, 4), "x_kv.0": (2, 3, 5, 4), "x_kv.1": (2, 5, 4, 6)}
    cq = 6 if cfg.planes is None else int(cfg.planes)
    return {"x_q": (2, cq, 3, 4), "x_kv": (2, 5, 5, 4)}



def flops(cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]) -> int:
    """θ on the query (2·N·Lq·Cq·P), and per key/value layer φ and g
    (2·2·N·Lk·Ck·P), the two attention matmuls (2·2·N·Lq·Lk·P) and, with the
    output projection, W (2·N·Lq·P·Cq)."""
    cfg = cfg.resolved(input_shapes)
    N, Cq, *Sq = input_shapes["x_q"]
    Lq, P = prod(Sq), int(cfg.planes)  # type: ignore[arg-type]
    total = 2 * N * Lq * Cq * P
    for name, (_, Ck, *Sk) in input_shapes.items():
        if name.startswith("x_kv"):
            Lk = prod(Sk)
            total += 4 * N * Lk * Ck * P + 4 * N * Lq * Lk * P
            total += 2 * N * Lq * P * Cq if cfg.out_proj else 0
    return total


SPECS: dict[str, BlockSpec] = {
    "cross_layer": BlockSpec.of_module(
        __name__,
        name="cross_layer",
        summary="cross-layer non-local (Ye et al. 2020, CNL): queries from x_q, "
        "keys/values from one or several other layers x_kv.m",
        config_cls=CrossLayerConfig,
        presets=PRESETS,
        default_preset="cnl",
        flops=flops,
        bench=BenchCase("cnl", {"planes": 128},
                        {"x_q": (8, 512, 14, 14), "x_kv": (8, 256, 28, 28)},
                        "x_q(8,512,14,14) x_kv(8,256,28,28) planes 128, scale, BN(train)"),
        figure=("draw_cross_layer", (13.0, 3.6)),
        anchors={"cnl": "cross_layer:make_cnl",
                 "cnl_official_noperm": "cross_layer:make_cnl",
                 "seed_fixed": "cross_layer:make_seed_fixed"},
    )
}
