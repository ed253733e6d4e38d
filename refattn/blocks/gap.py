"""Global average pooling: one number per (sample, channel) map.

Lin, Chen and Yan, "Network In Network", ICLR 2014 (arXiv:1312.4400),
section 3.2: the average of each class map replaces the fully connected
classifier; every later CNN head (ResNet, CBAM's channel gate) reuses it.

Math (blocks.md section 2), over the L = H·W positions p of x[n, c]:

    y[n, c] = (1/L) Σ_p x[n, c, p]        dx[n, c, p] = dy[n, c] / L

| paper / blocks.md | code |
|---|---|
| x, y | ``inputs["x"]``, ``outputs["out"]`` |
| L = \\|S\\| | ``H·W`` (``T·H·W`` for video, ``L`` for sequences) |
| keep (N, C, 1, 1) | ``cfg.keepdim`` |

Global means global: ``nn.AvgPool2d(7)`` in the older ResNet heads equals
this only on 7x7 maps; on any other size it averages 7x7 windows (a 9x9 map
gives one window over its top-left 7x7 corner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from refattn import backend
from refattn._typing import ArrayDict, Arrays
from refattn.ops.pool import GlobalPoolCache, _global_pool, _global_pool_backward

__all__ = ["PRESETS", "GapCache", "GapConfig", "backward", "forward"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GapConfig:
    """Canonical keys of ``gap`` (blocks.md 9.2); no anchor presets."""

    keepdim: bool = False  # keep the pooled axes as size 1: (N, C, 1, ..., 1)


PRESETS: dict[str, GapConfig] = {}


class GapCache(NamedTuple):
    pool: GlobalPoolCache  # x's shape (avg needs nothing else)
    dtype: str  # x's dtype name ('float32' or 'float64'), the cotangent's too


def forward(inputs: Arrays, params: Arrays, state: Arrays, cfg: GapConfig
            ) -> tuple[ArrayDict, GapCache]:
    """Mean over all spatial positions.

    Math:
        y[n, c] = (1/L) Σ_p x[n, c, p],   L = ∏ S
    Shapes:
        x    (N, C, *S)      S = (L,), (H, W) or (T, H, W)
        out  (N, C), or (N, C, 1, ..., 1) with keepdim
    """
    x = inputs["x"]
    # 1. average every map
    out, pool = _global_pool(x, "avg", cfg.keepdim)  # (N, C)
    return {"out": out}, GapCache(pool, backend.dtype_name(x))


def backward(douts: Arrays, cache: GapCache) -> tuple[ArrayDict, ArrayDict]:
    """VJP of GAP: every position receives an equal share.

    Math:
        dx[n, c, p] = dy[n, c] / L
    Shapes:
        dout (N, C) or (N, C, 1, ..., 1); dx (N, C, *S) (a read-only broadcast view)
    """
    # 1. spread dy / L over the positions
    dx = _global_pool_backward(douts["out"], cache.pool)  # (N, C, *S)
    return {"x": dx}, {}
