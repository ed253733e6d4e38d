"""pytest-friendly checks against golden cases, for other projects' suites.

    from refattn.testing import assert_matches_golden, golden_cases

    @pytest.mark.parametrize("case", golden_cases("golden/cbam"), ids=str)
    def test_my_cbam(case):
        assert_matches_golden(case, my_factory, names="anchor")

``assert_matches_golden`` raises an ``AssertionError`` whose message is the
full validation report (which tensor, where, expected vs actual).  The
subject is a dict of results or a factory: a PyTorch module factory by
default, a JAX one with ``framework="jax"`` (returning ``(apply, params)``
or a Flax NNX module), a Keras 3 layer factory with ``framework="keras"``:

    assert_matches_golden(case, make_flax_cbam, framework="jax",
                          data_format="channels_last")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from refattn.validate import ValidationReport, validate_results, validate_run

__all__ = ["FRAMEWORKS", "assert_matches_golden", "golden_cases", "validate_case"]

FRAMEWORKS = ("torch", "jax", "keras")
"""What a factory given to ``validate_case`` can build (``framework=``)."""


def golden_cases(root: str | Path, *, block: str | None = None,
                 dtype: str | None = None) -> list[Path]:
    """Every case directory under `root` (optionally one block / dtype), sorted:
    feed it to ``pytest.mark.parametrize``.

    Directory links are followed.  A tree entry that cannot be searched (a
    link loop, a dangling link, a link to a file, an unreadable directory)
    raises ``FixtureError`` naming it, at collection, rather than leaving its
    cases out of the run unnoticed; so does a case whose manifest cannot be
    read (truncated, not JSON, a FIFO: never waited on), naming the file.
    """
    from refattn.golden.format import find_cases
    from refattn.golden.manifest import manifest_json

    out = []
    for path in find_cases(Path(root)):
        manifest = manifest_json(path)
        if not isinstance(manifest, dict):  # of no block: kept, so that the
            out.append(path)  # test using it fails naming the problem
            continue
        if block is not None and manifest.get("block") != block:
            continue
        if dtype is not None and manifest.get("dtype") != dtype:
            continue
        out.append(path)
    return out


def validate_case(case_dir: str | Path,
                  subject: Mapping[str, Any] | Callable[[dict[str, Any]], Any], *,
                  names: str | Mapping[str, str] = "canonical",
                  device: str = "cpu", require: str = "provided",
                  framework: str = "torch", data_format: str | None = None
                  ) -> ValidationReport:
    """Validate results (a fixture-keyed dict) or a factory.

    ``framework``: what the factory builds, "torch" (a ``torch.nn.Module``;
    ``device`` applies), "jax" (``(apply, params)`` or a Flax NNX module) or
    "keras" (a Keras 3 layer); ``data_format`` ("channels_first" or
    "channels_last") is the layout JAX or Keras code takes its inputs in
    (default: channels_first for JAX, Keras's ``image_data_format()``).
    ``require``: "provided" (what is given must pass; a partial check has the
    verdict PARTIAL) or "all" (every tensor of the case must be checked and
    pass)."""
    from refattn.golden.format import read_case

    if framework not in FRAMEWORKS:
        raise ValueError(f"framework: expected one of {', '.join(FRAMEWORKS)}, "
                         f"got {framework!r}")
    if data_format is not None and framework == "torch":
        raise ValueError(f"data_format: applies to the jax and keras frameworks, got "
                         f"{data_format!r} with framework='torch'")
    case = read_case(Path(case_dir))
    if not callable(subject):
        return validate_results(case, subject, subject="results", require=require)
    label = getattr(subject, "__qualname__", repr(subject))
    if framework == "jax":
        from refattn.adapters.jax import run_jax_case

        results = run_jax_case(case, subject, names=names,
                               data_format=data_format or "channels_first")
        what = "JAX model"
    elif framework == "keras":
        from refattn.adapters.keras import run_keras_case

        results = run_keras_case(case, subject, names=names, data_format=data_format)
        what = "Keras layer"
    else:
        from refattn.adapters.torch import run_torch_case

        return validate_run(
            case, lambda: run_torch_case(case, subject, names=names, device=device),
            subject=f"torch module from {label}", require=require)
    return validate_results(case, results, subject=f"{what} from {label}", require=require)


def assert_matches_golden(case_dir: str | Path,
                          subject: Mapping[str, Any] | Callable[[dict[str, Any]], Any],
                          **kwargs: Any) -> ValidationReport:
    """Validate and raise AssertionError(report) unless the report is ok.

    By default every tensor given must pass (``require="provided"``); pass
    ``require="all"`` to also fail when any tensor of the case is not checked
    (not provided, or not checkable in the case's dtype): the setting for a
    CI job that claims full agreement.  Results must be real floating-point
    arrays; anything else raises ``ValidationInputError``."""
    report = validate_case(case_dir, subject, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + report.to_text())
    return report
