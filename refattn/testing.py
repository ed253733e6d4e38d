"""pytest-friendly checks against golden cases, for other projects' suites.

    from refattn.testing import assert_matches_golden, golden_cases

    @pytest.mark.parametrize("case", golden_cases("golden/cbam"), ids=str)
    def test_my_cbam(case):
        assert_matches_golden(case, my_factory, names="anchor")

``assert_matches_golden`` raises an ``AssertionError`` whose message is the
full validation report (which tensor, where, expected vs actual).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refattn.validate import ValidationReport, validate_results

__all__ = ["assert_matches_golden", "golden_cases", "validate_case"]


def golden_cases(root: str | Path, *, block: str | None = None,
                 dtype: str | None = None) -> list[Path]:
    """Every case directory under `root` (optionally one block / dtype), sorted:
    feed it to ``pytest.mark.parametrize``."""
    import json

    from refattn.golden.format import find_cases

    out = []
    for path in find_cases(Path(root)):
        manifest = json.loads((path / "manifest.json").read_text())
        if block is not None and manifest.get("block") != block:
            continue
        if dtype is not None and manifest.get("dtype") != dtype:
            continue
        out.append(path)
    return out


def validate_case(case_dir: str | Path,
                  subject: Mapping[str, Any] | Callable[[dict[str, Any]], Any], *,
                  names: str | Mapping[str, str] = "canonical",
                  device: str = "cpu") -> ValidationReport:
    """Validate results (a fixture-keyed dict) or a torch module factory."""
    from refattn.golden.format import read_case

    case = read_case(Path(case_dir))
    if callable(subject):
        from refattn.adapters.torch import run_torch_case

        label = getattr(subject, "__qualname__", repr(subject))
        results = run_torch_case(case, subject, names=names, device=device)
        return validate_results(case, results, subject=f"torch module from {label}")
    return validate_results(case, subject, subject="results")


def assert_matches_golden(case_dir: str | Path,
                          subject: Mapping[str, Any] | Callable[[dict[str, Any]], Any],
                          **kwargs: Any) -> ValidationReport:
    """Validate and raise AssertionError(report) unless every checked tensor passes."""
    report = validate_case(case_dir, subject, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + report.to_text())
    return report
