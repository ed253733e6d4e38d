"""The ``cross_layer`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from refattn import checks
from refattn._typing import Array, ArrayDict, Params, Shape
from refattn.backend import host_rng, prod
from refattn.blocks import cross_layer
from refattn.blocks.cross_layer import (BN_MODES, LAYOUTS, PRESETS, CrossLayerCache,
                                        CrossLayerConfig)
from refattn.blocks.spec import (BenchCase, check_batch_statistics, draw_param,
                                 init_norm, module_specs, norm_shapes, with_bn_field)
from refattn.params import is_buffer

RULES: dict[str, checks.Rule] = {
    "planes": checks.Int(1, optional=True),
    "use_scale": checks.Bool(),
    "bias": checks.Bool(),
    "bn": checks.OneOf(BN_MODES),
    "bn_eps": checks.Real(positive=True),
    "bn_momentum": checks.Real(0.0, 1.0),
    "layout": checks.OneOf(LAYOUTS),
    "out_proj": checks.Bool(),
    "residual": checks.Bool(),
}


def _bn_needs_out_proj(cfg: CrossLayerConfig) -> str | None:
    if not cfg.out_proj and cfg.bn is not None:
        return (f"out_proj=False requires bn=None (BN_m normalises the output of "
                f"the shared conv W, which out_proj=False removes), got bn={cfg.bn!r}")
    return None


def check_config(cfg: Any) -> CrossLayerConfig:
    return checks.check_config("cross_layer", cfg, CrossLayerConfig, RULES,
                               [_bn_needs_out_proj])


config_entry = checks.config_entry(check_config, shapes=True)
config_only = checks.config_entry(check_config)

_KV_NUMBERED = re.compile(r"x_kv\.(0|[1-9][0-9]*)")


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
        shape = tuple(input_shapes[name])
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


@config_entry
def resolve(cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]
            ) -> CrossLayerConfig:
    """The config with ``planes`` filled in (None -> Cq), checked against
    the inputs (out_proj=False needs planes == Cq)."""
    q_shape, _, _ = _parse_input_shapes(input_shapes)
    cq = q_shape[1]
    if cfg.planes is None:
        cfg = dataclasses.replace(cfg, planes=cq)
    if not cfg.out_proj and cfg.planes != cq:
        raise ValueError(
            f"planes ({cfg.planes}) must equal the query channels Cq ({cq}) "
            f"when out_proj=False: without the output conv W, Y_m (P channels) "
            f"is the output"
        )
    return cfg


@config_entry
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
    cfg = resolve(cfg, input_shapes)
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
            shapes |= norm_shapes(f"kv{m}.bn", cq)
    return checks.limit_sizes("cross_layer", shapes)


@config_entry
def init_params(cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape], *, seed: int,
                anchor_init: bool = False) -> tuple[Params, Params]:
    """Host float64 NumPy (params, state) for `cfg`.

    Default: the contract's random draws (``refattn.blocks.spec``).

    ``anchor_init=True``: with BN, the official CNLNet init (every CNL conv
    N(0, 0.01²), biases 0, every BN gamma = beta = 0, running statistics
    (0, 1)): the block is the identity (residual) or zero and no gradient
    reaches theta, phi, g or W.  Without BN (``seed_fixed``), PyTorch's
    default Conv2d init: weights and biases U(±1/sqrt(fan_in)).
    """
    shapes = param_shapes(cfg, input_shapes)
    rng = host_rng(seed)
    rng.standard_normal(1)  # a draw the fixtures' random stream begins with
    scheme = "random" if not anchor_init else "small" if cfg.bn is not None else "torch"
    params = {k: draw_param(rng, k, shapes, scheme) for k in shapes if ".bn." not in k}
    state: dict[str, Array] = {}
    for key in (k for k in shapes if k.endswith(".bn.weight")):
        norm, norm_state = init_norm(rng, key.removesuffix(".weight"), shapes[key][0],
                                     identity=anchor_init)
        params |= norm
        state |= norm_state
    return params, state


@checks.forward_entry("cross_layer")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[ArrayDict, CrossLayerCache]:
    """``cross_layer.forward`` after checking every argument; the key/value
    inputs are passed on in layer order."""
    cfg = check_config(cfg)
    if not isinstance(inputs, Mapping):
        raise ValueError(
            f"inputs: expected a dict of arrays, got {type(inputs).__name__}")
    names = kv_input_names(inputs)
    inputs = checks.check_inputs("cross_layer", {k: inputs[k] for k in ["x_q", *names]},
                                 dict.fromkeys(["x_q", *names], 4))
    input_shapes = {k: tuple(a.shape) for k, a in inputs.items()}
    cfg = resolve(cfg, input_shapes)  # checks the shapes too
    shapes = param_shapes(cfg, input_shapes)
    params, state = checks.check_params(
        "cross_layer", params, state, shapes, inputs,
        f"bias={cfg.bias}, bn={cfg.bn!r}, out_proj={cfg.out_proj}, "
        f"{len(names)} key/value layer(s)")
    if cfg.bn == "train":
        check_batch_statistics(input_shapes["x_q"], "bn='train'", "each Z_m",
                               name="x_q", count="N·Hq·Wq")
    return cross_layer.forward(inputs, params, state, cfg)


@checks.backward_entry("cross_layer")
def backward(douts: Any, cache: Any) -> tuple[ArrayDict, ArrayDict]:
    """``cross_layer.backward`` after checking the cotangent; dparams in the
    order of ``param_shapes``."""
    checks.check_cache("cross_layer", cache, (CrossLayerCache,))
    checks.check_douts("cross_layer", douts, shape=cache.q_shape, like=cache.theta.x3)
    dinputs, dparams = cross_layer.backward(douts, cache)
    shapes = {"x_q": cache.q_shape}
    shapes |= {n: layer.x_shape for n, layer in zip(cache.names, cache.layers)}
    order = [k for k in param_shapes(cache.cfg, shapes) if not is_buffer(k)]
    return dinputs, {k: dparams[k] for k in order}


def kink_margin(cache: CrossLayerCache) -> float:
    """No ReLU and no max: the block is smooth everywhere (infinite margin)."""
    return math.inf


@config_entry
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
    cfg = resolve(cfg, input_shapes)
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
    return {key: _anchor_key(preset, cfg, key) for key in shapes}


def _anchor_key(preset: str, cfg: CrossLayerConfig, key: str) -> str:
    """The anchor's state_dict name of the parameter or buffer `key`."""
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
    return f"{target}.{leaf}"


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


@config_only
def with_bn_mode(cfg: CrossLayerConfig, mode: str) -> CrossLayerConfig | None:
    """`cfg` with its per-layer BNs in `mode` ('train' or 'eval'); None without BN."""
    return with_bn_field(cfg, "bn", mode)


@config_only
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


@config_entry
def flops(cfg: CrossLayerConfig, input_shapes: Mapping[str, Shape]) -> int:
    """θ on the query (2·N·Lq·Cq·P), and per key/value layer φ and g
    (2·2·N·Lk·Ck·P), the two attention matmuls (2·2·N·Lq·Lk·P) and, with the
    output projection, W (2·N·Lq·P·Cq)."""
    cfg = resolve(cfg, input_shapes)
    N, Cq, *Sq = input_shapes["x_q"]
    Lq, P = prod(Sq), int(cfg.planes)  # type: ignore[arg-type]
    total = 2 * N * Lq * Cq * P
    for name, (_, Ck, *Sk) in input_shapes.items():
        if name.startswith("x_kv"):
            Lk = prod(Sk)
            total += 4 * N * Lk * Ck * P + 4 * N * Lq * Lk * P
            total += 2 * N * Lq * P * Cq if cfg.out_proj else 0
    return total


SPECS = module_specs(
    __name__,
    summary="cross-layer non-local (Ye et al. 2020, CNL): queries from x_q, "
    "keys/values from one or several other layers x_kv.m",
    config_cls=CrossLayerConfig,
    default_preset="cnl",
    bench=BenchCase("cnl", {"planes": 128},
                    {"x_q": (8, 512, 14, 14), "x_kv": (8, 256, 28, 28)},
                    "x_q(8,512,14,14) x_kv(8,256,28,28) planes 128, scale, BN(train)"),
    figure=("draw_cross_layer", (13.0, 3.6)),
    anchors={"cnl": "cross_layer:make_cnl",
             "cnl_official_noperm": "cross_layer:make_cnl",
             "seed_fixed": "cross_layer:make_seed_fixed"},
)
