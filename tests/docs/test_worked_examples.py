"""The worked-example generator (docs/_gen/worked.py) and the strict TeX
renderer (docs/_gen/mathml.py), without mkdocs.

The generator traces the block functions while the case's code runs and
files every float array a function assigns under the numbered step comment
whose lines assigned it; these tests compare what it files with what the
block returns, computed independently.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

def _steps(records, function: str) -> dict[int, dict[str, np.ndarray]]:
    return {r.number: r.values for r in records if r.function.endswith(function)}


def test_cbam_trace_holds_the_blocks_own_results(worked: ModuleType) -> None:
    ns, records = worked.run_case(worked.CASES["cbam"])
    fwd = _steps(records, "channel_gate_forward")
    np.testing.assert_array_equal(fwd[3]["a"], ns["outputs"]["aux.channel_gate"])
    spatial = _steps(records, "spatial_gate_forward")
    np.testing.assert_array_equal(spatial[1]["m"], ns["outputs"]["aux.spatial_descriptor"])
    np.testing.assert_array_equal(spatial[5]["out"], ns["outputs"]["out"])
    # the input gradient is accumulated in place over the pools at step 1:
    # the trace shows its final value there, not the gate's share
    back = _steps(records, "channel_gate_backward")
    np.testing.assert_array_equal(back[1]["dx"], ns["dinputs"]["x"])
    assert not np.array_equal(back[3]["dx_gate"], ns["dinputs"]["x"])
    # a mutation in a later step does not rewrite an earlier step's value
    sb = _steps(records, "spatial_gate_backward")
    assert not np.array_equal(sb[5]["dx1_gate"], sb[1]["dx1"])
    # the steps come in the code's order, forward then backward
    numbers = [r.number for r in records if r.function.endswith("spatial_gate_backward")]
    assert numbers == sorted(numbers, reverse=True)


def test_every_case_renders_and_cites_each_step(worked: ModuleType) -> None:
    for name, case in worked.CASES.items():
        md = worked.worked_example(name)
        for dotted in case.functions:
            fn = worked.resolve(dotted)
            cited = md.count(f'data-code="{dotted}"')
            numbers = {n for n, _, _ in worked.code_steps(fn)}
            assert cited >= 1 and cited <= len(numbers), (name, dotted, cited)
        assert "```python" in md and "run_block" in md


def test_step_lookup_and_resolve_refuse_what_they_cannot_find(worked: ModuleType) -> None:
    fn = worked.resolve("refattn.blocks.cbam.spatial_gate_backward")
    assert worked.step_number(fn, "gate") == 5
    assert worked.step_number(fn, "Batch norm") == 3  # case-insensitive prefix
    with pytest.raises(ValueError, match="no step comment"):
        worked.step_number(fn, "softmax")
    with pytest.raises(ValueError, match="cannot import"):
        worked.resolve("refattn.blocks.cbam.no_such_function")
    with pytest.raises(ValueError, match="module.function"):
        worked.resolve("cbam")
    with pytest.raises(ValueError, match="unknown case"):
        worked.expand_markers("<!-- worked-example: no_such_block -->\n")


def test_a_case_near_a_kink_is_refused(worked: ModuleType, monkeypatch) -> None:
    monkeypatch.setattr(worked, "MIN_KINK_MARGIN", 10.0)  # every case is "too close"
    with pytest.raises(ValueError, match="kink or tie"):
        worked.run_case(worked.CASES["cbam"])


def test_render_page_math_reports_tex_errors(mathml: ModuleType) -> None:
    good = '<p><span class="arithmatex">\\(a \\odot b\\)</span></p>'
    out, errors = mathml.render_page_math(good)
    assert errors == [] and "<math" in out and "arithmatex" not in out
    bad = '<div class="arithmatex">\\[W_\theta\\]</div>'  # a tab: "\t" of "\theta"
    out, errors = mathml.render_page_math(bad)
    assert len(errors) == 1 and "control character" in errors[0]
    assert out == bad  # left as TeX, for the rendered-page test to see
