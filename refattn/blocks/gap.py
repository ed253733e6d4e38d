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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from refattn._typing import Array, Shape
from refattn.blocks.spec import (
    BenchCase,
    BlockSpec,
    check_bool,
    check_douts,
    check_inputs,
    check_params,
)
from refattn.ops.pool import GlobalPoolCache, _global_pool, global_pool_backward

__all__ = [
    "PRESETS",
    "SPECS",
    "GapCache",
    "GapConfig",
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


@dataclass(frozen=True, kw_only=True, slots=True)
class GapConfig:
    """Canonical keys of ``gap`` (blocks.md 9.2); no anchor presets."""

    keepdim: bool = False

    def __post_init__(self) -> None:
        check_bool("keepdim", self.keepdim)

    def resolved(self, input_shapes: Mapping[str, Shape]) -> GapConfig:
        """Nothing defaults from the input: the config itself."""
        return self


PRESETS: dict[str, GapConfig] = {}


def fixture_shapes(cfg: GapConfig) -> dict[str, Shape]:
    """x (2, 3, 5, 7): odd and unequal H, W (a transposed or windowed pool fails)."""
    return {"x": (2, 3, 5, 7)}


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    if "x" not in input_shapes:
        raise ValueError(f"input_shapes: gap needs 'x', got {sorted(input_shapes)}")
    shape = tuple(int(s) for s in input_shapes["x"])
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            f"x: expected shape (N, C, *S) with 1 to 3 spatial axes for gap, "
            f"got {shape}"
        )
    return shape


def param_shapes(cfg: GapConfig, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """No parameters."""
    _x_shape(input_shapes)
    return {}


def init_params(
    cfg: GapConfig,
    input_shapes: Mapping[str, Shape],
    *,
    seed: int,
    anchor_init: bool = False,
) -> tuple[dict, dict]:
    """No parameters, no buffers."""
    _x_shape(input_shapes)
    return {}, {}


class GapCache(NamedTuple):
    pool: GlobalPoolCache  # x's shape (avg needs nothing else)


def forward(
    inputs: Mapping[str, Array],
    params: Mapping[str, Array],
    state: Mapping[str, Array],
    cfg: GapConfig,
) -> tuple[dict[str, Array], GapCache]:
    """Mean over all spatial positions.

    Math:
        y[n, c] = (1/L) Σ_p x[n, c, p],   L = ∏ S
    Shapes:
        x    (N, C, *S)      S = (L,), (H, W) or (T, H, W)
        out  (N, C), or (N, C, 1, ..., 1) with keepdim
    """
    check_inputs("gap", inputs, {"x": (3, 4, 5)})
    x = inputs["x"]
    check_params("gap", params, state, {}, x)
    # 1. average every map
    out, pool = _global_pool(x, "avg", cfg.keepdim)  # (N, C)
    return {"out": out}, GapCache(pool)


def backward(
    douts: Mapping[str, Array], cache: GapCache
) -> tuple[dict[str, Array], dict[str, Array]]:
    """VJP of GAP: every position receives an equal share.

    Math:
        dx[n, c, p] = dy[n, c] / L
    Shapes:
        dout (N, C) or (N, C, 1, ..., 1); dx (N, C, *S) (a read-only broadcast view)
    """
    dout = check_douts("gap", douts)
    # 1. spread dy / L over the positions
    dx = global_pool_backward(dout, cache.pool)  # (N, C, *S); checks dout
    return {"x": dx}, {}


def kink_margin(cache: GapCache) -> float:
    """A linear map: no kinks, no ties."""
    return float("inf")


def accumulation(cfg: GapConfig, input_shapes: Mapping[str, Shape]) -> dict[str, int]:
    """out: a sum of L positions; dx: one division."""
    shape = _x_shape(input_shapes)
    length = 1
    for s in shape[2:]:
        length *= s
    return {"out": length, "grad.input": 1}


def anchor_names(
    preset: str | None, cfg: GapConfig, input_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """No parameters to map."""
    return {}


def with_bn_mode(cfg: GapConfig, mode: str) -> None:
    """No batch norm: None."""


SPECS: dict[str, BlockSpec] = {
    "gap": BlockSpec.of_module(
        __name__,
        name="gap",
        summary="global average pooling over all spatial positions",
        config_cls=GapConfig,
        presets=PRESETS,
        default_preset=None,
        flops=lambda cfg, input_shapes: 0,  # no matmul: a memory-bound reduction
        bench=BenchCase(None, {}, {"x": (8, 512, 14, 14)}, "x(8,512,14,14) -> (8,512)"),
        anchors={None: "simple:make_gap"},
    ),
}
