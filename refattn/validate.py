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

Verdicts: PASS when every checkable tensor of the case was provided and
passed; PARTIAL when everything provided passed but some tensor was not
checked (not provided, not checkable in the case's dtype, or carrying a
tolerance that cannot reject a wrong result); FAIL on any mismatch.  With
``require="all"`` a PARTIAL verdict fails too: use it in CI, where a
silently narrowed check must not stay green.

Their tensors must be real floating-point arrays (float16, float32 or
float64): complex, integer, boolean, string, structured and object arrays are
refused by name, never cast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refattn.golden.files import printable, shown
from refattn.golden.strength import CHECKED_PREFIXES, tolerance_weaknesses

__all__ = [
    "CHECKED_PREFIXES",
    "REQUIRE",
    "TensorComparison",
    "ValidationInputError",
    "ValidationReport",
    "check_real_float",
    "compare_tensor",
    "load_results",
    "validate_results",
]

FIRST_MISMATCHES = 5
REQUIRE = ("provided", "all")
"""What a report needs to be ok: every provided tensor passes ("provided",
the default; a partial check is labelled PARTIAL), or every checkable tensor
of the case is provided and passes and none is unchecked ("all")."""


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
    check: str = "full"  # the manifest's check kind: "full", "zero" or "none"
    reason: str | None = None  # why a row is NOT CHECKED
    abs_only: bool = False  # max|expected| <= atol: the absolute band decides
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

    @property
    def strength(self) -> str:
        """How the row is compared: "rel+abs", or "abs only" where the
        expected tensor is analytically zero or below its absolute tolerance
        everywhere (a max relative error of 1 is then no alarm)."""
        if self.check == "zero":
            return "abs only (exact 0)"
        if self.check == "none":
            return "none"
        return "abs only (tiny)" if self.abs_only else "rel+abs"


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
    require: str = "provided"

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
    def complete(self) -> bool:
        """Every tensor of the case was checked (none NOT CHECKED)."""
        return not self.not_checked

    @property
    def verdict(self) -> str:
        """The verdict: "PASS" (everything checked and passed), "PARTIAL"
        (what was checked passed, something was not checked) or "FAIL"."""
        if self.failed or not self.checked:
            return "FAIL"
        return "PASS" if self.complete else "PARTIAL"

    @property
    def ok(self) -> bool:
        """The exit status: a PASS, or a PARTIAL when ``require`` is
        "provided"."""
        return self.verdict == "PASS" or (self.verdict == "PARTIAL"
                                          and self.require == "provided")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a non-finite number (NaN or Inf in their tensors) becomes
        the string "nan", "inf" or "-inf", so the JSON stays strict."""
        rows = []
        for r in self.rows:
            d = _finite_json(asdict(r))
            d["mismatch_pct"] = r.mismatch_pct
            d["strength"] = r.strength
            rows.append(d)
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "complete": self.complete,
            "require": self.require,
            "checked": len(self.checked),
            "total": len(self.rows),
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
        verdict = self.verdict
        if self.verdict == "PARTIAL":
            verdict += (f": only {len(self.checked)} of {len(self.rows)} tensors checked "
                        f"(all passed), {len(self.not_checked)} NOT CHECKED"
                        + (" -- a failure under --require all" if self.require == "all"
                           else "; --require all makes this a failure"))
        elif self.not_checked:
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
            f"{'rel L2':>10} {'rtol':>8} {'atol':>9} {'mismatch':>16}  compared",
        ]
        for r in self.rows:
            if r.status == "NOT CHECKED":
                lines.append(f"  {r.name:<{width}} {r.status:<11} ({r.reason})")
                continue
            mm = f"{r.mismatches}/{r.size} ({r.mismatch_pct:.1f}%)"
            nan = f"  NaN {r.nan_actual}" if r.nan_actual else ""
            inf = f"  Inf {r.inf_actual}" if r.inf_actual else ""
            lines.append(
                f"  {r.name:<{width}} {r.status:<11} {r.max_abs_err:>10.3e} "
                f"{r.max_rel_err:>10.3e} {r.rel_l2_err:>10.3e} {r.rtol:>8.1e} "
                f"{r.atol:>9.2e} {mm:>16}  {r.strength}{nan}{inf}"
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
    row.abs_only = bool(e.size) and float(np.max(np.abs(e))) <= atol
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


RESULTS_HEADER_LIMIT = 16 * 2**20
"""The longest safetensors header a results file may have: room for far more
tensors than any case holds, while its parse stays small in memory."""


def load_results(path: str | Path) -> dict[str, np.ndarray]:
    """A results file: safetensors or npz (never unpickled), fixture key names.
    Only a regular file is read (a FIFO or a device is refused unread), and
    a safetensors header longer than ``RESULTS_HEADER_LIMIT`` is refused
    before it is parsed."""
    from refattn.golden.files import display_path, open_regular

    p = Path(path)
    where = display_path(p)
    if p.suffix not in (".npz", ".safetensors"):
        raise ValidationInputError(
            f"--results: expected a .safetensors or .npz file, got {where}")
    try:
        file = open_regular(p, what="--results")
    except FileNotFoundError:
        raise ValidationInputError(f"--results: no such file: {where}") from None
    except OSError as err:
        raise ValidationInputError(f"--results: {where}: cannot be read "
                                   f"({err.strerror or err})") from None
    except ValueError as err:
        raise ValidationInputError(str(err)) from None
    with file:
        if p.suffix == ".npz":
            try:
                with np.load(file, allow_pickle=False) as z:
                    return {k: np.asarray(z[k]) for k in z.files}
            except ValueError as err:
                raise ValidationInputError(
                    f"{where}: cannot read npz safely: {shown(str(err))}") from err
            except Exception as err:
                raise ValidationInputError(
                    f"{where}: not a readable npz file ({shown(str(err))})") from err
        return _load_safetensors_results(file, where)


def _load_safetensors_results(file: Any, where: str) -> dict[str, np.ndarray]:
    import struct

    from safetensors.numpy import load

    head = file.read(8)
    if len(head) == 8 and struct.unpack("<Q", head)[0] > RESULTS_HEADER_LIMIT:
        raise ValidationInputError(
            f"{where}: safetensors header claims {struct.unpack('<Q', head)[0]} "
            f"bytes, more than the {RESULTS_HEADER_LIMIT}-byte limit for a results "
            "file; refusing it")
    try:
        return dict(load(head + file.read()))
    except Exception as err:
        raise ValidationInputError(
            f"{where}: not a readable safetensors file "
            f"({shown(' '.join(str(err).split()))})") from err


def check_real_float(name: str, value: Any, subject: str) -> np.ndarray:
    """`value` as an ndarray, if it is a real floating-point array.

    Raises:
        ValidationInputError: naming `subject` and the tensor, for complex,
            integer, boolean, string, bytes, structured or object data (no
            silent cast: a complex result would lose its imaginary part, a
            string array would be parsed as numbers).
    """
    try:
        a = np.asarray(value)
    except Exception as err:  # an object NumPy cannot take
        raise ValidationInputError(
            f"{subject}: {name}: expected a real floating-point array, got "
            f"{type(value).__name__} ({err})") from None
    if a.dtype.kind != "f":
        kinds = {"c": "complex", "i": "integer", "u": "unsigned integer",
                 "b": "boolean", "U": "string", "S": "bytes", "V": "structured",
                 "O": "object", "M": "datetime", "m": "timedelta"}
        raise ValidationInputError(
            f"{subject}: {name} has dtype {a.dtype} ({kinds.get(a.dtype.kind, 'other')}); "
            "expected a real floating-point array (float16, float32 or float64), "
            "nothing is cast")
    return a


def validate_results(case: Any, results: Mapping[str, Any], *, subject: str = "results",
                     require: str = "provided") -> ValidationReport:
    """Compare `results` (fixture key names) with a case read by read_case.

    Args:
        case: a ``GoldenCase``.
        results: their tensors, keyed like the fixture; each must be a real
            floating-point array of the fixture's shape.
        subject: who "actual" is, for the report and the errors.
        require: "provided" (default) or "all": whether a PARTIAL verdict
            (some tensor not checked) still counts as ok (see REQUIRE).

    Raises:
        ValidationInputError: unknown keys, a wrong shape, a tensor that is
            not real floating point, or nothing checkable given.
    """
    if require not in REQUIRE:
        raise ValueError(f"require: expected one of {', '.join(REQUIRE)}, got {require!r}")
    manifest = case.manifest
    expected = {k: v for k, v in case.tensors.items() if k.startswith(CHECKED_PREFIXES)}
    unknown = sorted(set(results) - set(case.tensors))
    if unknown:
        raise ValidationInputError(
            f"{subject}: keys not in the fixture: {printable(', '.join(unknown), 400)} "
            f"(checkable keys: {', '.join(sorted(expected))})"
        )
    ignored = sorted(k for k in results if k in case.tensors and k not in expected)
    rows = []
    for name in sorted(expected, key=_order):
        e = expected[name]
        spec = manifest["tensors"][name]
        rtol, atol = float(spec["rtol"]), float(spec["atol"])
        check = spec.get("check", "full")
        unchecked = TensorComparison(name, "NOT CHECKED", tuple(e.shape), rtol, atol,
                                     check=check, size=int(e.size))
        if check == "none":
            unchecked.reason = f"not checkable: {spec['check_reason']}"
            rows.append(unchecked)
            continue
        weak = tolerance_weaknesses(name, e, rtol, atol, str(manifest["dtype"]), check)
        if weak:
            unchecked.reason = ("the fixture's tolerance cannot reject a wrong result: "
                                + "; ".join(w.detail for w in weak))
            rows.append(unchecked)
            continue
        if name not in results:
            unchecked.reason = "not provided"
            rows.append(unchecked)
            continue
        a = check_real_float(name, results[name], subject)
        if tuple(a.shape) != tuple(e.shape):
            raise ValidationInputError(
                f"{subject}: {name} has shape {tuple(a.shape)}, the fixture's is "
                f"{tuple(e.shape)}"
            )
        row = compare_tensor(name, e, a, rtol, atol)
        row.check = check
        rows.append(row)
    for name in sorted(set(results) & set(expected)):  # refused even if unchecked
        check_real_float(name, results[name], subject)
    report = ValidationReport(
        case=str(case.path), block=manifest["block"], preset=manifest.get("preset"),
        dtype=manifest["dtype"], mode=manifest.get("mode"), subject=subject, rows=rows,
        require=require,
    )
    if not report.checked:
        provided = printable(", ".join(sorted(results)), 400) or "nothing"
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
