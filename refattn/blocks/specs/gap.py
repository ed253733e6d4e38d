"""The ``gap`` block's spec: checked entry points and the tools' fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from refattn import backend, checks
from refattn._typing import ArrayDict, Shape
from refattn.blocks import gap
from refattn.blocks.gap import GapCache, GapConfig
from refattn.blocks.spec import BenchCase, module_specs


def check_config(cfg: Any) -> GapConfig:
    return checks.check_config("gap", cfg, GapConfig, {"keepdim": checks.Bool()})


config_entry = checks.config_entry(check_config, shapes=True)


def _x_shape(input_shapes: Mapping[str, Shape]) -> Shape:
    if "x" not in input_shapes:
        raise ValueError(f"input_shapes: gap needs 'x', got {sorted(input_shapes)}")
    shape = tuple(input_shapes["x"])
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            f"x: expected shape (N, C, *S) with 1 to 3 spatial axes for gap, "
            f"got {shape}"
        )
    return shape


def fixture_shapes(cfg: GapConfig) -> dict[str, Shape]:
    """x (2, 3, 5, 7): odd and unequal H, W (a transposed or windowed pool fails)."""
    return {"x": (2, 3, 5, 7)}


@config_entry
def param_shapes(cfg: GapConfig, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """No parameters."""
    _x_shape(input_shapes)
    return {}


@config_entry
def init_params(cfg: GapConfig, input_shapes: Mapping[str, Shape], *, seed: int,
                anchor_init: bool = False) -> tuple[dict, dict]:
    """No parameters, no buffers."""
    _x_shape(input_shapes)
    return {}, {}


@checks.forward_entry("gap")
def forward(inputs: Any, params: Any, state: Any, cfg: Any
            ) -> tuple[ArrayDict, GapCache]:
    """``gap.forward`` after checking every argument."""
    cfg = check_config(cfg)
    inputs = checks.check_inputs("gap", inputs, {"x": (3, 4, 5)})
    checks.check_params("gap", params, state, {}, inputs)
    return gap.forward(inputs, {}, {}, cfg)


@checks.backward_entry("gap")
def backward(douts: Any, cache: Any) -> tuple[ArrayDict, ArrayDict]:
    """``gap.backward`` after checking the cotangent against the forward."""
    checks.check_cache("gap", cache, (GapCache,))
    pool = cache.pool
    shape = pool.x_shape[:2] + (1,) * (len(pool.x_shape) - 2) if pool.keepdim \
        else pool.x_shape[:2]
    dout = checks.check_douts("gap", douts, shape=shape)
    if backend.dtype_name(dout) != cache.dtype:
        raise TypeError(f"douts['out']: expected the forward's dtype {cache.dtype}, "
                        f"got {backend.dtype_name(dout)}")
    return gap.backward(douts, cache)


def kink_margin(cache: GapCache) -> float:
    """A linear map: no kinks, no ties."""
    return math.inf


@config_entry
def accumulation(cfg: GapConfig, input_shapes: Mapping[str, Shape]) -> dict[str, int]:
    """out: a sum of L positions; dx: one division."""
    return {"out": math.prod(_x_shape(input_shapes)[2:]), "grad.input": 1}


def anchor_names(preset: str | None, cfg: GapConfig,
                 input_shapes: Mapping[str, Shape]) -> dict[str, str]:
    """No parameters to map."""
    return {}


def with_bn_mode(cfg: GapConfig, mode: str) -> None:
    """No batch norm: None."""


SPECS = module_specs(
    __name__,
    summary="global average pooling over all spatial positions",
    config_cls=GapConfig,
    default_preset=None,
    flops=lambda cfg, input_shapes: 0,  # no matmul: a memory-bound reduction
    bench=BenchCase(None, {}, {"x": (8, 512, 14, 14)}, "x(8,512,14,14) -> (8,512)"),
    anchors={None: "simple:make_gap"},
)
