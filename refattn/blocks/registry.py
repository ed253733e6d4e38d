"""BLOCKS: the single source of truth that the CLI, the fixture generator,
gradcheck, the docs and the parametrized tests read.

Adding a block = one module exposing ``SPECS`` (name -> BlockSpec) and one
line in ``_MODULES`` below (CONTRIBUTING.md, "Adding a block").  Everything
else that is per block (benchmark case, FLOP count, plot painter, test
anchors) is a field of its BlockSpec.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import Any

import numpy as np

from refattn import backend
from refattn.blocks.spec import BlockSpec
from refattn.gradcheck import GradcheckReport, gradcheck
from refattn.params import is_buffer

__all__ = ["BLOCKS", "BlockSpec", "draw_case", "gradcheck_block", "run_block"]

_MODULES = (
    "refattn.blocks.specs.conv1x1",
    "refattn.blocks.specs.gap",
    "refattn.blocks.specs.mlpconv",
    "refattn.blocks.specs.cbam",
    "refattn.blocks.specs.non_local",
    "refattn.blocks.specs.cgnl",
    "refattn.blocks.specs.cross_layer",
    "refattn.blocks.specs.gc",
)


class _Registry(Mapping[str, BlockSpec]):
    """A read-only mapping that imports the block modules on first use."""

    def __init__(self) -> None:
        self._specs: dict[str, BlockSpec] | None = None

    def _load(self) -> dict[str, BlockSpec]:
        if self._specs is None:
            specs: dict[str, BlockSpec] = {}
            for mod in _MODULES:
                specs.update(import_module(mod).SPECS)
            self._specs = specs
        return self._specs

    def __getitem__(self, name: str) -> BlockSpec:
        if not isinstance(name, str):
            raise TypeError(f"block: expected a block name (str), got {name!r}")
        specs = self._load()
        if name not in specs:
            raise ValueError(
                f"block: unknown block {name!r} (blocks: {', '.join(specs)})"
            )
        return specs[name]

    def __contains__(self, name: object) -> bool:
        # Mapping's default calls __getitem__, whose unknown-name error is a
        # ValueError (one line in the CLI), not the KeyError it expects
        return isinstance(name, str) and name in self._load()

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


BLOCKS: Mapping[str, BlockSpec] = _Registry()


def draw_case(spec: BlockSpec, cfg: Any, shapes: Mapping[str, tuple[int, ...]] | None = None,
              *, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                         dict[str, np.ndarray]]:
    """Host float64 inputs ~ N(0, 1), parameters and state for one case."""
    shapes = dict(spec.fixture_shapes(cfg) if shapes is None else shapes)
    rng = backend.host_rng(seed)
    inputs = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params, state = spec.init_params(cfg, shapes, seed=seed + 1)
    return inputs, params, state


def run_block(spec: BlockSpec, cfg: Any, inputs: Mapping[str, Any],
              params: Mapping[str, Any], state: Mapping[str, Any],
              dout: Any | None = None) -> tuple[dict[str, Any], dict[str, Any],
                                                dict[str, Any]]:
    """Forward, and backward when `dout` is given: (outputs, dinputs, dparams)."""
    outputs, cache = spec.forward(dict(inputs), dict(params), dict(state), cfg)
    if dout is None:
        return outputs, {}, {}
    dinputs, dparams = spec.backward({"out": dout}, cache)
    return outputs, dinputs, dparams


def gradcheck_block(spec: BlockSpec, cfg: Any, inputs: Mapping[str, Any],
                    params: Mapping[str, Any], state: Mapping[str, Any],
                    **kwargs: Any) -> GradcheckReport:
    """gradcheck of a block over every input and every trainable parameter.

    Tensors are named ``input.<name>`` and ``param.<name>`` in the report;
    buffers are held fixed.
    """
    trainable = {k: v for k, v in params.items() if not is_buffer(k)}
    args = {f"input.{k}": v for k, v in inputs.items()}
    args |= {f"param.{k}": v for k, v in trainable.items()}

    def fn(a: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        ins = {k[len("input."):]: v for k, v in a.items() if k.startswith("input.")}
        ps = {k[len("param."):]: v for k, v in a.items() if k.startswith("param.")}
        xp = backend.namespace(**ins)
        st = {k: xp.astype(v, xp.float64) for k, v in state.items()}
        outputs, cache = spec.forward(ins, ps, st, cfg)

        def vjp(douts: dict[str, Any]) -> dict[str, Any]:
            dinputs, dparams = spec.backward(douts, cache)
            return {f"input.{k}": v for k, v in dinputs.items()} | {
                f"param.{k}": v for k, v in dparams.items()
            }

        return {"out": outputs["out"]}, vjp

    return gradcheck(fn, args, **kwargs)
