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

Checked entry points, shapes and draws: ``refattn/blocks/specs/cross_layer.py``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from functools import reduce
from typing import Literal, NamedTuple

from refattn._typing import Array, ArrayDict, Arrays, Shape
from refattn.backend import device, matmul, namespace
from refattn.ops.conv import (PointwiseConvCache, _pointwise_conv,
                              _pointwise_conv_backward)
from refattn.ops.linear import MatmulCache, _matmul, _product_into
from refattn.ops.norm import (BatchNormCache, _batch_norm_named,
                              _batch_norm_named_backward)
from refattn.ops.softmax import SoftmaxCache, _softmax, _softmax_backward
from refattn.params import add_params, with_prefix

__all__ = ["LAYOUTS", "PRESETS", "CrossLayerCache", "CrossLayerConfig", "KVCache",
           "backward", "forward"]

Layout = Literal["transpose", "official_noperm"]
BnMode = Literal["train", "eval"]

LAYOUTS: tuple[str, ...] = ("transpose", "official_noperm")
BN_MODES: tuple[str | None, ...] = (None, "train", "eval")

# ---------------------------------------------------------------------------
# config


@dataclass(frozen=True, kw_only=True, slots=True)
class CrossLayerConfig:
    """Configuration of the cross-layer non-local block (blocks.md section 9.2).

    The number of key/value layers is not a key: it is the number of
    ``x_kv*`` inputs.  ``planes=None`` means P = Cq (the query's channels),
    filled in by the spec's ``resolve``.
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


# FouriYe/CNL-ICIP2020 CNL_5 with the transpose the official code omits
# (P = 256 for the official 2048-channel query); residual as in CNLNet
_CNL = CrossLayerConfig(
    planes=256,
    use_scale=True,
    bias=False,
    bn="train",
    bn_eps=1e-5,
    bn_momentum=0.1,
    layout="transpose",
    out_proj=True,
    residual=True,
)

PRESETS: dict[str, CrossLayerConfig] = {
    "cnl": _CNL,  # the full config above
    # the official code as written: o.view(N, P, Hq, Wq) without the transpose
    "cnl_official_noperm": replace(_CNL, layout="official_noperm"),
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


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: CrossLayerConfig
            ) -> tuple[ArrayDict, CrossLayerCache]:
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
    Params and state: the keys of ``param_shapes`` (buffers in ``state``);
    ``cfg`` resolved (``planes`` set); the key/value inputs in layer order.
    """
    x_q = inputs["x_q"]
    names = [k for k in inputs if k != "x_q"]  # the spec orders them by layer
    kvs = [inputs[n] for n in names]
    xp = namespace(x_q=x_q)
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
    zs: list[Array] = []  # Z_m of every layer, summed at step 9
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
            z, bn_state, bn_cache = _batch_norm_named(
                z, params, state, f"kv{m}.bn", training=cfg.bn == "train",
                momentum=float(cfg.bn_momentum), eps=float(cfg.bn_eps))  # (N, Cq, Lq)
            new_state |= with_prefix("state", bn_state)

        zs.append(z)  # (N, Cq, Lq)
        layers.append(
            KVCache(tuple(x_m.shape), kv_cache, affinity_cache, softmax_cache,
                    attend_cache, w_cache, bn_cache)
        )

    # 9. sum over the layers, plus the query itself (residual)
    total = reduce(operator.add, zs)  # (N, Cq, Lq)
    out = total + xq3 if cfg.residual else total  # (N, Cq, Lq)
    outputs = {"out": xp.reshape(out, (N, cq, hq, wq))} | aux | new_state
    cache = CrossLayerCache(
        cfg, tuple(names), tuple(x_q.shape), scale, theta_cache, tuple(layers)
    )
    return outputs, cache


def backward(douts: Arrays, cache: CrossLayerCache) -> tuple[ArrayDict, ArrayDict]:
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
    dout = douts["out"]
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
            dz, dbn = _batch_norm_named_backward(dz, layer.bn, f"kv{m}.bn")  # (N,Cq,Lq)
            dparams |= dbn

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

        # The keys' and values' gradients are the rows of one array,
        # [dΦ_m | dG_m] (N, 2P, Lk), which step 2's stacked convs read:
        # steps 5 and 3 write their rows instead of concatenating them.
        attention, g = layer.attend.a, layer.attend.b.mT  # (N, Lq, Lk), (N, P, Lk)
        q, phi = layer.affinity.a, layer.affinity.b  # (N, Lq, P), (N, P, Lk)
        lk = int(attention.shape[-1])
        dkv = xp.empty((N, 2 * P, lk), dtype=dout.dtype, device=device(dout))

        # 5. A_m V_m: dA_m = dY_mᵀ V_mᵀ, dG_m = (A_mᵀ dY_mᵀ)ᵀ = dY_m A_m
        dattention = matmul(xp, dy_t, g)  # (N, Lq, Lk)
        dkv = _product_into(dkv, P, dy_t.mT, attention)  # rows of dG_m
        del dy, dy_t

        # 4. softmax over the keys
        df = _softmax_backward(dattention, layer.softmax)  # (N, Lq, Lk)
        del dattention

        # 3. Q K_m: dQ_m = dF_m K_mᵀ, dK_m = Qᵀ dF_m
        dqs.append(matmul(xp, df, phi.mT))  # (N, Lq, P)
        dkv = _product_into(dkv, 0, q.mT, df)  # rows of dΦ_m
        del df

        # 2. φ_m and g_m (stacked rows, as in the forward)
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
    if cfg.residual:
        dxq3 += dout3  # (N, Cq, Lq), in place on the fresh product
    dinputs = {"x_q": xp.reshape(dxq3, c.q_shape)} | dinputs  # (N, Cq, Hq, Wq)
    return dinputs, dparams
