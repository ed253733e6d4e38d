"""The benchmark cases: standard shapes (DESIGN.md section 13), the refattn
preset each block runs, the size sweep of the attention blocks, and a FLOP
count per block, all read from the block registry (``BlockSpec.bench`` and
``BlockSpec.flops``).

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

from collections.abc import Mapping
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


def _standard() -> dict[str, Case]:
    """Every block with a benchmark case in the registry (``BlockSpec.bench``:
    the standard shapes of DESIGN.md section 13, each on the refattn preset
    whose anchor the PyTorch module of benchmarks/torch_blocks.py mirrors),
    in the registry's order."""
    from refattn.blocks.registry import BLOCKS

    return {name: Case(name, spec.bench.preset, spec.bench.overrides,
                       spec.bench.shapes, spec.bench.note)
            for name, spec in BLOCKS.items() if spec.bench is not None}


STANDARD: dict[str, Case] = _standard()

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
    return spec.resolve(cfg, shapes)


def flops(block: str, cfg: Any, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Matmul/conv FLOPs of one forward (the block's ``BlockSpec.flops``),
    one backward and both."""
    from refattn.blocks.registry import BLOCKS

    fwd = BLOCKS[block].flops(cfg, shapes)
    return {"forward": fwd, "backward": 2 * fwd, "total": 3 * fwd}
