"""``--plot`` of ``refattn gradcheck`` and ``refattn show``, and the numbers
behind the step-size picture (refattn.plot).

matplotlib is the optional ``plot`` extra: tests that draw skip without it;
the missing-matplotlib error path and the step-size numbers run everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refattn.blocks.registry import BLOCKS, draw_case
from refattn.cli import main
from refattn.plot import _grid, _scaled_xy, step_error_curve

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="needs matplotlib (the plot extra)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path}: only {len(data)} bytes"
    # IHDR: width and height of a real figure, not a 1x1 placeholder
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 200, (width, height)


def golden(tmp_path: Path, block: str, *args: str) -> Path:
    out = tmp_path / "g"
    result = run("golden", "--block", block, "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    cases = sorted((out / block).iterdir())
    return cases[0]


# ---------------------------------------------------------------------------
# the numbers (no matplotlib needed)


def _curve(block: str, preset: str | None, dtype: str, wrong: bool = False, **over):
    spec = BLOCKS[block]
    cfg = spec.config(preset, **over)
    inputs, params, state = draw_case(spec, cfg, seed=0)
    if wrong:  # a planted wrong backward: every parameter gradient doubled
        real = spec.backward

        def backward(douts, cache):
            dinputs, dparams = real(douts, cache)
            return dinputs, {k: 2 * v for k, v in dparams.items()}

        spec = dataclasses.replace(spec, backward=backward)
    return step_error_curve(spec, cfg, inputs, params, state, dtype=dtype)


def _slope(curve, lo: float, hi: float) -> float:
    keep = (curve.steps >= lo) & (curve.steps <= hi)
    fit = np.polyfit(np.log(curve.steps[keep]), np.log(curve.central[keep]), 1)
    return float(fit[0])


def test_step_curve_truncation_slope_2_roundoff_slope_minus_1():
    # cross_layer seed_fixed is smooth (softmax, no ReLU or max): no kinks
    c64 = _curve("cross_layer", "seed_fixed", "float64")
    assert np.all(np.diff(c64.steps) < 0) and c64.steps[0] == pytest.approx(1e-1)
    assert c64.steps[-1] == pytest.approx(1e-14)
    assert _slope(c64, 1e-4, 1e-2) == pytest.approx(2.0, abs=0.2)  # truncation
    assert _slope(c64, 1e-14, 1e-8) == pytest.approx(-1.0, abs=0.4)  # round-off
    # the step gradcheck uses is within a decade of the best one found
    assert c64.chosen == pytest.approx(np.finfo(np.float64).eps ** (1 / 3))
    at_chosen = c64.central[np.argmin(np.abs(np.log(c64.steps / c64.chosen)))]
    assert at_chosen < 1e-9 and at_chosen < 10 * c64.best[1]
    # one-sided differences: truncation O(h), slope 1
    keep = (c64.steps >= 1e-4) & (c64.steps <= 1e-2)
    one = np.polyfit(np.log(c64.steps[keep]), np.log(c64.one_sided[keep]), 1)[0]
    assert one == pytest.approx(1.0, abs=0.2)


def test_step_curve_float32_roundoff_dominates_earlier():
    c64 = _curve("cross_layer", "seed_fixed", "float64")
    c32 = _curve("cross_layer", "seed_fixed", "float32")
    assert c32.best[1] > 100 * c64.best[1]
    assert c32.best[0] > 10 * c64.best[0]  # the best float32 step is much larger
    # below float32 resolution x + h d rounds back to x: numeric 0, error 1
    assert np.allclose(c32.central[c32.steps < 1e-10], 1.0)
    assert c32.analytic == pytest.approx(c64.analytic, rel=1e-5)


def test_step_curve_exposes_a_wrong_backward():
    bad = _curve("cross_layer", "seed_fixed", "float64", wrong=True)
    assert bad.best[1] > 1e-3  # no step makes a wrong gradient agree


def test_grid_and_scaled_positions():
    v = np.arange(2 * 3 * 4, dtype=float)
    img = _grid(v, (2, 3, 4))
    assert img.shape == (3, 9) and np.isnan(img[:, 4]).all()
    assert img[1, 5 + 2] == v.reshape(2, 3, 4)[1, 1, 2]
    assert _scaled_xy(0, (4, 4), (2, 2), stride=(2, 2)) == (-0.25, -0.25)
    assert _scaled_xy(5, (4, 4), (8, 8)) == (2.5, 2.5)  # same field of view


# ---------------------------------------------------------------------------
# the CLI flags


def test_missing_matplotlib_is_one_line_exit_2(monkeypatch, tmp_path: Path):
    loaded = [m for m in sys.modules if m.split(".")[0] == "matplotlib"]
    for name in loaded:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    target = tmp_path / "f.png"
    for args in (("gradcheck", "--block", "gap", "--plot", str(target)),
                 ("show", str(tmp_path), "--plot", str(target))):
        result = run(*args)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output
        assert lines[0].startswith("Error: ")
        assert "pip install 'refattn[plot]'" in lines[0]
        assert result.stdout == ""  # checked before any work
    assert not target.exists()


@needs_mpl
@pytest.mark.parametrize("block, preset", [("cbam", "luuuyi"), ("gap", None)])
def test_gradcheck_plot_writes_a_png(tmp_path: Path, block: str, preset: str | None):
    target = tmp_path / "steps.png"
    args = ["gradcheck", "--block", block, "--plot", str(target)]
    if preset:
        args += ["--preset", preset]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and f"wrote {target}" in result.output
    assert_png(target)


@needs_mpl
@pytest.mark.parametrize("block, args", [
    ("cbam", ("--preset", "seed")),
    ("non_local", ("--preset", "cgnl_repo", "--set", "bn=eval")),
    ("non_local", ("--preset", "alexhex7", "--set", "bn=eval",
                   "--shape", "x=2,4,2,5,6")),  # 3-D, sub-sampled keys
    ("cross_layer", ("--preset", "cnl", "--set", "bn=eval")),
    ("cgnl", ("--preset", "yue_gaussian",)),
    ("nin_head", ()),
])
def test_show_plot_writes_a_png(tmp_path: Path, block: str, args: tuple[str, ...]):
    case = golden(tmp_path, block, *args)
    target = tmp_path / "maps.png"
    result = run("show", str(case), "--plot", str(target))
    assert result.exit_code == 0, result.output
    assert "case " in result.output and f"wrote {target}" in result.output
    assert_png(target)


@needs_mpl
def test_show_plot_json_keeps_stdout_json(tmp_path: Path):
    import json

    case = golden(tmp_path, "cgnl")
    target = tmp_path / "s.png"
    result = run("show", str(case), "--json", "--plot", str(target))
    assert result.exit_code == 0
    assert json.loads(result.stdout)["block"] == "cgnl"
    assert f"wrote {target}" in result.stderr
    assert_png(target)


@needs_mpl
def test_show_plot_without_maps_and_bad_names_exit_2(tmp_path: Path):
    case = golden(tmp_path, "gap")
    for target, needle in ((tmp_path / "a.png", "no attention maps or gates"),
                           (tmp_path / "a.jpg", "expected a .png"),
                           (tmp_path / "no" / "a.png", "no such directory")):
        result = run("show", str(case), "--plot", str(target))
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
        assert not target.exists()


# ---------------------------------------------------------------------------
# what the figures say (titles, legends, subtitles)


def _legend_gaps(fig) -> list[str]:
    """Labelled lines of any panel that no legend of the figure lists."""
    labels = {t for ax in fig.axes for t in ax.get_legend_handles_labels()[1]}
    listed = {t.get_text() for ax in fig.axes if ax.get_legend() is not None
              for t in ax.get_legend().get_texts()}
    return sorted(labels - listed)


@needs_mpl
def test_step_error_figure_panels_are_titled_apart_and_every_line_is_in_the_legend():
    from refattn.plot import step_error_figure

    row = ("cross_layer/seed_fixed",
           _curve("cross_layer", "seed_fixed", "float64"),
           _curve("cross_layer", "seed_fixed", "float32"))
    fig = step_error_figure([row])
    titles = [ax.get_title().splitlines()[0] for ax in fig.axes]
    assert len(set(titles)) == len(titles) == 2, titles
    assert titles[0].startswith("float64") and titles[1].startswith("float32")
    assert any("round-off" in t for ax in fig.axes
               for t in ax.get_legend_handles_labels()[1])  # the guide is drawn
    assert _legend_gaps(fig) == []
    # the check sees a legend drawn from one panel only
    fig.axes[1].legend(*fig.axes[1].get_legend_handles_labels())
    only_own = set(fig.axes[1].get_legend_handles_labels()[1])
    missing = {t for t in fig.axes[0].get_legend_handles_labels()[1]} - only_own
    assert _legend_gaps(fig) == sorted(missing) and missing


@needs_mpl
@pytest.mark.parametrize("kernel, moments", [("dot", 0), ("gaussian", 3)])
def test_cgnl_subtitle_names_the_kernels_formula(kernel: str, moments: int):
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from refattn.plot import draw_cgnl

    shape = (2, 4) if kernel == "dot" else (2, 4, moments)
    s = np.arange(np.prod(shape), dtype=float).reshape(shape)
    case = SimpleNamespace(tensors={"aux.s": s}, manifest={
        "config": {"kernel": kernel, "groups": 4, "use_scale": False}})
    fig = Figure()
    draw_cgnl(fig, case)
    title = fig.get_suptitle()
    if kernel == "dot":
        assert "y = s * t" in title and "moments" not in title
    else:
        assert "y = s * t" not in title
        assert f"{moments} moments s_q" in title and "alpha_q s_q t^q" in title
