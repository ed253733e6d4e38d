"""The block contract's finiteness checks, for every block and preset.

Inside a block the ops' math steps check nothing (the block checked its
arguments once and calls the unchecked steps, not the ops' public functions),
so each block must check every
argument itself: a single NaN in any one input, parameter, buffer or
cotangent is reported under that argument's name and counted as one, never
as a NaN of some intermediate that it spread into.
"""

from __future__ import annotations

import numpy as np
import pytest

from refattn import backend
from refattn.blocks.registry import BLOCKS, draw_case

CASES = [(b, p) for b, spec in BLOCKS.items() for p in (None, *spec.presets)]


def _case(block: str, preset: str | None):
    spec = BLOCKS[block]
    cfg = spec.config(preset)
    inputs, params, state = draw_case(spec, cfg, spec.fixture_shapes(cfg), seed=0)
    return spec, cfg, {"inputs": inputs, "params": params, "state": state}


@pytest.mark.parametrize(("block", "preset"), CASES)
def test_one_nan_is_named_and_counted(block: str, preset: str | None) -> None:
    spec, cfg, args = _case(block, preset)
    checked = 0
    for where, group in args.items():
        for key, a in group.items():
            bad = a.copy()
            bad.flat[bad.size // 2] = np.nan
            call = dict(args, **{where: {**group, key: bad}})
            with pytest.raises(backend.NonFiniteError) as err:
                spec.forward(call["inputs"], call["params"], call["state"], cfg)
            msg = str(err.value)
            assert key.split(".")[-1] in msg, (where, key, msg)
            assert f"got 1 NaN/Inf of {a.size} elements" in msg, (where, key, msg)
            checked += 1
    assert checked >= len(args["inputs"])


@pytest.mark.parametrize(("block", "preset"), CASES)
def test_one_inf_cotangent_is_named_and_counted(block: str, preset: str | None) -> None:
    spec, cfg, args = _case(block, preset)
    outputs, cache = spec.forward(args["inputs"], args["params"], args["state"], cfg)
    dout = np.ones_like(outputs["out"])
    dout.flat[0] = np.inf
    with pytest.raises(backend.NonFiniteError, match=r"douts.*got 1 NaN/Inf of"):
        spec.backward({"out": dout}, cache)


def test_the_check_fails_without_the_blocks_own_screen(monkeypatch) -> None:
    """The test above can fail: with the block's own check of x removed, the
    NaN is caught only after it spread (and is then miscounted)."""
    real = backend.check_finite
    monkeypatch.setattr(backend, "check_finite",
                        lambda name, a: None if name == "x" else real(name, a))
    spec, cfg, args = _case("non_local", None)
    bad = args["inputs"]["x"].copy()
    bad.flat[bad.size // 2] = np.nan
    with pytest.raises(backend.NonFiniteError) as err:
        spec.forward({"x": bad}, args["params"], args["state"], cfg)
    assert f"got 1 NaN/Inf of {bad.size} elements" not in str(err.value)
