"""The registry is the single source of truth: every per-block fact the tools
read (benchmark case, FLOP count, plot painter, test anchors) is a field of
the block's BlockSpec, and each field is what its reader needs."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from refattn.blocks.registry import BLOCKS

TESTS = Path(__file__).resolve().parents[1]


def _flop_count_by_hand(name: str, cfg, shapes) -> int:
    """The matmul FLOPs of a forward, counted from the matmuls the block
    really runs: 2 x the product of each contraction's three sizes."""
    if name == "conv1x1":
        n, c, h, w = shapes["x"]
        return 2 * n * h * w * cfg.out_channels * c
    if name == "cgnl":
        n, c, h, w = shapes["x"]
        p, g, length = cfg.planes, cfg.groups, h * w
        return 2 * 3 * n * length * c * p + 3 * n * p * length + 2 * n * length * (p // g) * c
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["conv1x1", "cgnl"])
def test_flops_match_a_count_by_hand(name: str) -> None:
    spec = BLOCKS[name]
    cfg = spec.config()
    shapes = {"x": (2, 16, 5, 7)}
    cfg = spec.resolve(cfg, shapes)
    assert spec.flops(cfg, shapes) == _flop_count_by_hand(name, cfg, shapes)
    # and it grows with the batch linearly, as every term does
    twice = {"x": (4, 16, 5, 7)}
    assert spec.flops(cfg, twice) == 2 * spec.flops(cfg, shapes)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_spec_field_is_usable(name: str) -> None:
    spec = BLOCKS[name]
    if spec.bench is not None:  # a benchmark case needs a FLOP count and a config
        assert spec.flops is not None
        cfg = spec.config(spec.bench.preset, **dict(spec.bench.overrides))
        cfg = spec.resolve(cfg, spec.bench.shapes)
        spec.param_shapes(cfg, spec.bench.shapes)  # valid at the standard shapes
        assert spec.flops(cfg, spec.bench.shapes) >= 0 and spec.bench.note
    if spec.figure is not None:
        import refattn.plot as plot

        painter, (width, height) = spec.figure
        assert callable(getattr(plot, painter)) and painter in plot.__all__
        assert 0 < width < 30 and 0 < height < 30
    for preset in spec.anchors:
        assert preset is None or preset in spec.presets, preset
    if spec.diagram is not None:
        source = (TESTS.parent / "docs" / "_gen" / "diagrams.py").read_text()
        assert f"\ndef {spec.diagram}() -> Diagram:" in source, spec.diagram


def test_the_registry_names_every_data_flow_diagram() -> None:
    """docs/_gen/diagrams.py draws what the specs name: each of its drawing
    functions belongs to a block (none is drawn by a hand-kept list)."""
    source = (TESTS.parent / "docs" / "_gen" / "diagrams.py").read_text()
    drawn = set(re.findall(r"\ndef (\w+)\(\) -> Diagram:", source))
    named = {spec.diagram for spec in BLOCKS.values()} - {None}
    assert drawn == named and len(named) >= 7


def test_a_spec_is_stored_as_given() -> None:
    """BlockSpec wraps nothing: the registry holds the spec modules' own
    checked functions."""
    from refattn.blocks.specs import cbam, non_local

    assert BLOCKS["non_local"].forward is non_local.forward
    assert BLOCKS["non_local"].backward is non_local.backward
    assert BLOCKS["cbam"].forward is cbam.forward
    assert BLOCKS["non_local"].param_shapes is non_local.param_shapes


@pytest.mark.parametrize("name", [n for n in BLOCKS if BLOCKS[n].anchors])
def test_anchor_factories_exist(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every preset names its anchor (or the block its default's), and the
    factory is a function of tests/anchors (tests/golden/test_torch_consumers
    runs each against the cases)."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(TESTS / "anchors"))
    spec = BLOCKS[name]
    presets = list(spec.presets) or [None]
    assert set(presets) <= set(spec.anchors), sorted(map(str, presets))
    for factory in spec.anchors.values():
        module, _, attr = factory.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), factory


def test_the_benchmark_cases_come_from_the_registry() -> None:
    sys.path.insert(0, str(TESTS.parent))
    try:
        from benchmarks.cases import BLOCK_ORDER, STANDARD
    finally:
        sys.path.remove(str(TESTS.parent))
    assert list(STANDARD) == [n for n in BLOCKS if BLOCKS[n].bench is not None]
    assert BLOCK_ORDER == tuple(STANDARD)
    assert {"conv1x1", "mlpconv", "gap", "cbam", "non_local", "cgnl",
            "cross_layer"} <= set(STANDARD)


def test_plot_painters_come_from_the_registry() -> None:
    pytest.importorskip("matplotlib")
    from refattn import plot

    painters = plot._painters()
    assert set(painters) == {n for n in BLOCKS if BLOCKS[n].figure}
    assert painters["cbam"] == (plot.draw_cbam, BLOCKS["cbam"].figure[1])
