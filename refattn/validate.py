"""Comparing a third party's tensors with a golden case.

The fixture is always the reference ("expected"); the third party's tensors
are "actual".  Every output, updated running statistic, input gradient and
parameter gradient they provide is compared with the tolerance the manifest
gives for it:

    |actual - expected| <= atol + rtol * |expected|      element-wise

and the report has one row per tensor with PASS/FAIL, the error metrics that
survive cancellation (max abs, max rel, relative L2), the mismatch count, the
NaN/Inf counts, and, for a failure, the worst element's multi-index in the
tensor's own shape with both values there and the first few mismatching
positions.  Fixture tensors they did not provide are listed as NOT CHECKED,
never silently passed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKED_PREFIXES",
    "TensorComparison",
    "ValidationInputError",
    "ValidationReport",
    "compare_tensor",
    "load_results",
    "validate_results",
]

CHECKED_PREFIXES = ("output.", "grad.input.", "grad.param.", "aux.")
"""Fixture keys a third party can be checked on (output.state.* included)."""

FIRST_MISMATCHES = 5


class ValidationInputError(ValueError):
    """Their tensors cannot be compared (unknown keys, shapes, nothing given)."""


@dataclass
class TensorComparison:
    """One row of the report."""

    name: str
    status: str  # "PASS", "FAIL" or "NOT CHECKED"
    shape: tuple[int, ...]
    rtol: float
    atol: float
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    rel_l2_err: float = 0.0
    mismatches: int = 0
    size: int = 0
    nan_actual: int = 0
    inf_actual: int = 0
    worst_index: tuple[int, ...] | None = None
    expected_at_worst: float | None = None
    actual_at_worst: float | None = None
    first_mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mismatch_pct(self) -> float:
        return 100.0 * self.mismatches / self.size if self.size else 0.0


@dataclass
class ValidationReport:
    """All rows, and which side is which."""

    case: str
    block: str
    preset: str | None
    dtype: str
    mode: str | None
    subject: str
    rows: list[TensorComparison]

    reference = "refattn golden fixture (expected, float64 reference math)"

    @property
    def checked(self) -> list[TensorComparison]:
        return [r for r in self.rows if r.status != "NOT CHECKED"]

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "FAIL"]

    @property
    def not_checked(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "NOT CHECKED"]

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.failed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a non-finite number (NaN or Inf in their tensors) becomes
        the string "nan", "inf" or "-inf", so the JSON stays strict."""
        rows = []
        for r in self.rows:
            d = _finite_json(asdict(r))
            d["mismatch_pct"] = r.mismatch_pct
            rows.append(d)
        return {
            "ok": self.ok,
            "case": self.case,
            "block": self.block,
            "preset": self.preset,
            "dtype": self.dtype,
            "mode": self.mode,
            "reference": self.reference,
            "subject": self.subject,
            "failed": self.failed,
            "not_checked": self.not_checked,
            "rows": rows,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_text(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        if self.not_checked:
            verdict += (f" ({len(self.checked)} tensors checked, "
                        f"{len(self.not_checked)} not checked)")
        width = max([34] + [len(r.name) for r in self.rows])
        lines = [
            f"validate {self.case} ({self.block}, preset {self.preset}, {self.dtype}"
            + (f", {self.mode} mode" if self.mode else "")
            + f"): {verdict}",
            f"  expected = {self.reference}",
            f"  actual   = {self.subject}",
            f"  {'tensor':<{width}} {'status':<11} {'max abs':>10} {'max rel':>10} "
            f"{'rel L2':>10} {'rtol':>8} {'atol':>9} {'mismatch':>16}",
        ]
        for r in self.rows:
            if r.status == "NOT CHECKED":
                lines.append(f"  {r.name:<{width}} {r.status:<11} (not provided)")
                continue
            mm = f"{r.mismatches}/{r.size} ({r.mismatch_pct:.1f}%)"
            nan = f"  NaN {r.nan_actual}" if r.nan_actual else ""
            inf = f"  Inf {r.inf_actual}" if r.inf_actual else ""
            lines.append(
                f"  {r.name:<{width}} {r.status:<11} {r.max_abs_err:>10.3e} "
                f"{r.max_rel_err:>10.3e} {r.rel_l2_err:>10.3e} {r.rtol:>8.1e} "
                f"{r.atol:>9.2e} {mm:>16}{nan}{inf}"
            )
        for r in self.rows:
            if r.status != "FAIL":
                continue
            e, a = r.expected_at_worst, r.actual_at_worst
            allowed = r.atol + r.rtol * abs(e)
            lines.append(
                f"  {r.name}: worst at index {r.worst_index}: expected {e:.10g}, "
                f"actual {a:.10g} (|diff| {abs(a - e):.3e}, allowed {allowed:.3e})"
            )
            firsts = ", ".join(
                f"{tuple(m['index'])}: {m['expected']:.6g} vs {m['actual']:.6g}"
                for m in r.first_mismatches
            )
            lines.append(f"    first mismatches (expected vs actual): {firsts}")
        if self.not_checked:
            lines.append(f"  not checked ({len(self.not_checked)}): "
                         + ", ".join(self.not_checked))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _finite_json(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return "nan" if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def compare_tensor(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float,
                   atol: float) -> TensorComparison:
    """Element-wise comparison of one tensor (NaN or Inf in `actual` mismatch)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    row = TensorComparison(name, "PASS", tuple(e.shape), rtol, atol, size=int(e.size))
    row.nan_actual = int(np.isnan(a).sum())
    row.inf_actual = int(np.isinf(a).sum())
    if e.size == 0:
        return row
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - e)
        err = np.where(np.isfinite(err), err, np.inf)
        tol = atol + rtol * np.abs(e)
        bad = ~(err <= tol)
        nz = e != 0
        rel = np.where(nz, err / np.where(nz, np.abs(e), 1.0), np.where(err > 0, np.inf, 0))
        row.max_abs_err = float(err.max())
        row.max_rel_err = float(rel.max())
        norm = float(np.linalg.norm(e))
        diff = float(np.sqrt(np.sum(np.square(np.where(np.isfinite(err), err, 0.0)))))
        row.rel_l2_err = float("inf") if not np.isfinite(err).all() else (
            diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
        excess = np.where(np.isfinite(err), err / np.maximum(tol, 1e-300), np.inf)
    row.mismatches = int(bad.sum())
    if row.mismatches:
        row.status = "FAIL"
        worst = np.unravel_index(int(np.argmax(excess)), e.shape)
        row.worst_index = tuple(int(i) for i in worst)
        row.expected_at_worst = float(e[worst])
        row.actual_at_worst = float(a[worst])
        for flat in np.flatnonzero(bad)[:FIRST_MISMATCHES]:
            idx = np.unravel_index(int(flat), e.shape)
            row.first_mismatches.append({
                "index": [int(i) for i in idx],
                "expected": float(e[idx]),
                "actual": float(a[idx]),
            })
    return row


def load_results(path: str | Path) -> dict[str, np.ndarray]:
    """A results file: safetensors or npz (never unpickled), fixture key names."""
    p = Path(path)
    if not p.is_file():
        raise ValidationInputError(f"--results: no such file: {p}")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except ValueError as err:
            raise ValidationInputError(f"{p}: cannot read npz safely: {err}") from err
        except Exception as err:
            raise ValidationInputError(f"{p}: not a readable npz file ({err})") from err
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as err:
            raise ValidationInputError(
                f"{p}: not a readable safetensors file ({' '.join(str(err).split())})"
            ) from err
    raise ValidationInputError(f"--results: expected a .safetensors or .npz file, got {p}")


def validate_results(case: Any, results: Mapping[str, Any], *, subject: str = "results"
                     ) -> ValidationReport:
    """Compare `results` (fixture key names) with a case read by read_case."""
    manifest = case.manifest
    expected = {k: v for k, v in case.tensors.items() if k.startswith(CHECKED_PREFIXES)}
    unknown = sorted(set(results) - set(case.tensors))
    if unknown:
        raise ValidationInputError(
            f"{subject}: keys not in the fixture: {', '.join(unknown)} "
            f"(checkable keys: {', '.join(sorted(expected))})"
        )
    ignored = sorted(k for k in results if k in case.tensors and k not in expected)
    rows = []
    for name in sorted(expected, key=_order):
        e = expected[name]
        spec = manifest["tensors"][name]
        rtol, atol = float(spec["rtol"]), float(spec["atol"])
        if name not in results:
            rows.append(TensorComparison(name, "NOT CHECKED", tuple(e.shape), rtol, atol,
                                         size=int(e.size)))
            continue
        a = np.asarray(results[name])
        if tuple(a.shape) != tuple(e.shape):
            raise ValidationInputError(
                f"{subject}: {name} has shape {tuple(a.shape)}, the fixture's is "
                f"{tuple(e.shape)}"
            )
        rows.append(compare_tensor(name, e, a, rtol, atol))
    report = ValidationReport(
        case=str(case.path), block=manifest["block"], preset=manifest.get("preset"),
        dtype=manifest["dtype"], mode=manifest.get("mode"), subject=subject, rows=rows,
    )
    if not report.checked:
        provided = ", ".join(sorted(results)) or "nothing"
        raise ValidationInputError(
            f"{subject}: provides none of the fixture's checkable tensors (gave {provided}"
            + (f"; inputs/params are not compared: {', '.join(ignored)}" if ignored else "")
            + ")"
        )
    return report


def _order(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(("output.out", "output.state.", "output.", "grad.input.",
                                "grad.param.", "aux.")):
        if name.startswith(prefix):
            return i, name
    return 99, name
