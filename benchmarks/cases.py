"""The benchmark cases: standard shapes (DESIGN.md section 13), the refattn
preset each block runs, the size sweep of the attention blocks, and a FLOP
count per block.

FLOP counts cover the matmul and convolution terms only (2 FLOPs per
multiply-add); element-wise work (softmax, norms, gates, ReLU, pooling) is not
counted, so GFLOP/s is a lower bound that is meaningful for the matmul-bound
blocks (conv1x1, mlpconv, non_local, cgnl, cross_layer) and near zero for the
memory-bound ones (gap, cbam).  Every matmul ``Y = A B`` of the forward costs
two matmuls of the same size in the backward (``dA = dY B^T``, ``dB = A^T dY``):
every benchmark differentiates the inputs and all parameters, so no term is
skipped and backward = 2 x forward exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, ...]

__all__ = [
    "BLOCK_ORDER",
    "STANDARD",
    "SWEEP_BLOCKS",
    "Case",
    "build_config",
    "flops",
    "sweep_shapes",
]


@dataclass(frozen=True)
class Case:
    """One benchmark case: a refattn block, its preset plus overrides, shapes."""

    block: str
    preset: str | None
    overrides: Mapping[str, Any]
    shapes: Mapping[str, Shape]
    note: str = ""
    torch_note: str = field(default="")


# The standard shapes of DESIGN.md section 13, each on the refattn preset whose
# anchor the PyTorch module of benchmarks/torch_blocks.py mirrors.
STANDARD: dict[str, Case] = {
    "conv1x1": Case(
        "conv1x1",
        None,
        {"out_channels": 128},
        {"x": (8, 256, 28, 28)},
        "x(8,256,28,28) -> 128, bias",
    ),
    "mlpconv": Case(
        "mlpconv",
        "nin_cifar_1",
        {"channels": (96, 96, 96), "kernel_size": 3, "padding": 1},
        {"x": (8, 64, 32, 32)},
        "x(8,64,32,32) 3x3->96, 1x1->96, 1x1->96, bias, ReLU after each",
    ),
    "gap": Case("gap", None, {}, {"x": (8, 512, 14, 14)}, "x(8,512,14,14) -> (8,512)"),
    "cbam": Case(
        "cbam",
        "jongchan",
        {},
        {"x": (8, 256, 28, 28)},
        "x(8,256,28,28) r=16, avg+max, 7x7 conv + BN(train)",
    ),
    "non_local": Case(
        "non_local",
        "alexhex7",
        {"inter_channels": 128},
        {"x": (4, 256, 28, 28)},
        "x(4,256,28,28) embedded gaussian, inter 128, sub_sample, BN(train)",
    ),
    "cgnl": Case(
        "cgnl",
        "yue",
        {"planes": 128},
        {"x": (8, 256, 28, 28)},
        "x(8,256,28,28) dot kernel, planes 128, groups 8, GN",
    ),
    "cross_layer": Case(
        "cross_layer",
        "cnl",
        {"planes": 128},
        {"x_q": (8, 512, 14, 14), "x_kv": (8, 256, 28, 28)},
        "x_q(8,512,14,14) x_kv(8,256,28,28) planes 128, scale, BN(train)",
    ),
}

BLOCK_ORDER: tuple[str, ...] = tuple(STANDARD)

SWEEP_BLOCKS: tuple[str, ...] = ("non_local", "cgnl", "cross_layer")


def sweep_shapes(block: str, side: int) -> dict[str, Shape]:
    """Standard shapes with the spatial size replaced by side x side (for
    cross_layer: the key/value map is side x side, the query side/2)."""
    case = STANDARD[block]
    if block == "cross_layer":
        nq, cq = case.shapes["x_q"][:2]
        nk, ck = case.shapes["x_kv"][:2]
        half = max(side // 2, 1)
        return {"x_q": (nq, cq, half, half), "x_kv": (nk, ck, side, side)}
    n, c = case.shapes["x"][:2]
    return {"x": (n, c, side, side)}


def build_config(
    block: str,
    preset: str | None,
    overrides: Mapping[str, Any],
    shapes: Mapping[str, Shape],
) -> Any:
    """The refattn config of a case, resolved against its input shapes."""
    from refattn.blocks.registry import BLOCKS

    spec = BLOCKS[block]
    cfg = spec.config(preset, **dict(overrides))
    return cfg.resolved(shapes) if hasattr(cfg, "resolved") else cfg


# ---------------------------------------------------------------------------
# FLOP counts (matmul / convolution terms; forward, backward = 2 x forward)


def _prod(values: Any) -> int:
    return math.prod(int(v) for v in values)


def _conv1x1(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, c, h, w = s["x"]
    sh, sw = (cfg.stride, cfg.stride) if isinstance(cfg.stride, int) else cfg.stride
    ph, pw = (cfg.padding, cfg.padding) if isinstance(cfg.padding, int) else cfg.padding
    ho, wo = (h + 2 * ph - 1) // sh + 1, (w + 2 * pw - 1) // sw + 1
    return 2 * n * ho * wo * cfg.out_channels * (c // cfg.groups)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _mlpconv(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, c, h, w = s["x"]
    kh, kw = _pair(cfg.kernel_size)
    sh, sw = _pair(cfg.stride)
    ph, pw = _pair(cfg.padding)
    dh, dw = _pair(cfg.dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    chans = list(cfg.channels)
    total = 2 * n * ho * wo * chans[0] * (c // cfg.groups) * kh * kw
    for prev, cur in itertools.pairwise(chans):
        total += 2 * n * ho * wo * cur * prev
    return total


def _gap(cfg: Any, s: Mapping[str, Shape]) -> int:
    return 0  # no matmul: a memory-bound reduction


def _cbam(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, c, h, w = s["x"]
    ch = c // cfg.reduction
    mlp = len(cfg.pool_types) * 2 * n * (c * ch + ch * c)
    k = cfg.spatial_kernel
    conv = 2 * n * h * w * 2 * k * k if cfg.spatial else 0
    return mlp + conv


def _non_local(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, c = s["x"][:2]
    spatial = s["x"][2:]
    lq = _prod(spatial)
    lk = lq
    if cfg.sub_sample:  # kernel = stride = 2 on the last one or two spatial dims
        pooled = spatial[-2:] if len(spatial) >= 2 else spatial
        lk = _prod(spatial[: len(spatial) - len(pooled)]) * _prod(
            d // 2 for d in pooled
        )
    ci = cfg.inter_channels
    proj_len = lk if cfg.pool_position == "before_proj" else lq
    theta = 2 * n * lq * c * ci
    phi_g = 2 * (2 * n * proj_len * c * ci)
    attn = 2 * (2 * n * lq * lk * ci)  # theta^T phi and A g
    out = 2 * n * lq * ci * c
    return theta + phi_g + attn + out


def _cgnl(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, c = s["x"][:2]
    length = _prod(s["x"][2:])
    p, g = cfg.planes, cfg.groups
    proj = 3 * 2 * n * length * c * p
    kernel = 2 * n * p * length + n * p * length  # s = sum p*g; y = s*t
    z = 2 * n * length * (p // g) * c
    return proj + kernel + z


def _cross_layer(cfg: Any, s: Mapping[str, Shape]) -> int:
    n, cq = s["x_q"][:2]
    lq = _prod(s["x_q"][2:])
    p = cfg.planes
    total = 2 * n * lq * cq * p  # theta (shared by the kv layers)
    kv_names = [k for k in s if k.startswith("x_kv")]
    for name in kv_names:
        ck = s[name][1]
        lk = _prod(s[name][2:])
        total += 2 * (2 * n * lk * ck * p)  # phi, g
        total += 2 * (2 * n * lq * lk * p)  # Q K and A V
        if cfg.out_proj:
            total += 2 * n * lq * p * cq  # W applied to each kv layer's result
    return total


_FLOPS: dict[str, Callable[[Any, Mapping[str, Shape]], int]] = {
    "conv1x1": _conv1x1,
    "mlpconv": _mlpconv,
    "gap": _gap,
    "cbam": _cbam,
    "non_local": _non_local,
    "cgnl": _cgnl,
    "cross_layer": _cross_layer,
}


def flops(block: str, cfg: Any, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Matmul/conv FLOPs of one forward, one backward and both."""
    fwd = _FLOPS[block](cfg, shapes)
    return {"forward": fwd, "backward": 2 * fwd, "total": 3 * fwd}
