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

On FAIL the report also diagnoses: it names the first failing tensor in
data-flow order (the intermediates and the output before the gradients),
points to the gate-level cases of a block made of gates, and names the
simple signature a failing tensor has, when it has one (``SIGNATURES``:
all zeros, a sign flip, a constant factor, transposed axes, a missing or an
extra sigmoid, a softmax over the wrong axis).  When the implementation's
backward raised, its forward is still compared (``validate_run``) and the
error is reported after the table, with the verdict FAIL.

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
    "GATE_CASES",
    "REQUIRE",
    "SIGNATURES",
    "BackwardError",
    "TensorComparison",
    "ValidationInputError",
    "ValidationReport",
    "check_real_float",
    "compare_tensor",
    "load_results",
    "signature",
    "validate_results",
    "validate_run",
]

FIRST_MISMATCHES = 5
REQUIRE = ("provided", "all")
"""What a report needs to be ok: every provided tensor passes ("provided",
the default; a partial check is labelled PARTIAL), or every checkable tensor
of the case is provided and passes and none is unchecked ("all")."""


class ValidationInputError(ValueError):
    """Their tensors cannot be compared (unknown keys, shapes, nothing given)."""


class BackwardError(ValidationInputError):
    """Their forward ran and their backward raised.  ``results`` holds what
    the forward gave, under fixture keys (output, running statistics,
    intermediates), for ``validate_run`` to compare before it reports the
    error."""

    def __init__(self, message: str, results: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.results = dict(results)


GATE_CASES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "cbam": (
        ("cbam_channel", ("aux.channel_gate", "grad.param.mlp.")),
        ("cbam_spatial", ("aux.spatial_descriptor", "aux.spatial_gate",
                          "grad.param.spatial.")),
    ),
}
"""A block made of gates -> (gate-level block, the fixture keys that belong
to that gate (prefixes)): a diagnosis points a failure to the gate's own
cases, which check the gate alone."""

SIGNATURES = ("all zeros", "sign flip", "constant factor", "transposed",
              "missing sigmoid", "extra sigmoid", "softmax over the wrong axis")
"""The signatures ``signature`` detects, in the order it tries them."""


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
    signature: str | None = None  # a failure's simple signature, if it has one

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
    errors: list[str] = field(default_factory=list)
    """What stopped their code before every tensor was computed (the
    backward raised): the verdict is FAIL."""
    order: list[str] = field(default_factory=list)
    """The fixture's tensor keys in the fixture's order (for the diagnosis)."""

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
        if self.failed or self.errors or not self.checked:
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
            "errors": list(self.errors),
            "diagnosis": self.diagnosis(),
            "rows": rows,
        }

    def first_failure(self) -> str | None:
        """The first failing tensor in data-flow order: the intermediates
        (``aux.*``, in the order the forward computes them), the output and
        the running statistics, then the parameter gradients and the input
        gradients."""
        failed = set(self.failed)
        if not failed:
            return None
        position = {k: i for i, k in enumerate(self.order)}
        return min(failed, key=lambda k: (_flow(k), position.get(k, 0), k))

    def diagnosis(self) -> list[str]:
        """The diagnosis lines of a FAIL (none otherwise)."""
        first = self.first_failure()
        lines = []
        if first is not None:
            forward = _flow(first) < _flow("grad.param.")
            lines.append(f"first failing tensor in data-flow order: {first}"
                         + ("" if forward else " (the forward agrees: every output "
                            "and intermediate compared passed)"))
        position = {k: i for i, k in enumerate(self.order)}
        for r in sorted(self.rows, key=lambda r: (_flow(r.name),
                                                  position.get(r.name, 0))):
            if r.status == "FAIL" and r.signature:
                lines.append(f"{r.name}: {r.signature}")
        gates = GATE_CASES.get(self.block)
        if gates and (first is not None or self.errors):
            preset = f" --preset {self.preset}" if self.preset else ""
            status = {r.name: r.status for r in self.rows}
            culprits = [g for g, keys in gates
                        if first is not None and first.startswith(keys)]
            # a gate whose intermediates were compared and all passed
            passing = [g for g, keys in gates
                       if [status.get(k) for k in keys if k.startswith("aux.")
                           and status.get(k) in ("PASS", "FAIL")]
                       and all(status.get(k) != "FAIL" for k in keys)]
            if culprits:
                lines.append(
                    f"{first} belongs to {culprits[0]}: check that gate alone with "
                    f"its own cases (refattn golden --block {culprits[0]}{preset})")
            else:
                names = " and ".join(g for g, _ in gates)
                lines.append(f"the gate-level cases {names} check each gate alone "
                             f"(refattn golden --block <gate>{preset}); exposing "
                             "intermediates (aux.*) shows which gate differs")
            for g in passing:
                lines.append(f"{g}: its intermediates passed")
        return lines

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
            shown_e, shown_a = distinct(e, a, at_least=10)
            lines.append(
                f"  {r.name}: worst at index {r.worst_index}: expected {shown_e}, "
                f"actual {shown_a} (|diff| {abs(a - e):.3e}, allowed {allowed:.3e})"
            )
            firsts = ", ".join(
                f"{tuple(m['index'])}: " + " vs ".join(distinct(m["expected"],
                                                                m["actual"]))
                for m in r.first_mismatches
            )
            lines.append(f"    first mismatches (expected vs actual): {firsts}")
        if self.not_checked:
            lines.append(f"  not checked ({len(self.not_checked)}): "
                         + ", ".join(self.not_checked))
        for error in self.errors:
            lines.append(f"  error: {error}")
        diagnosis = self.diagnosis()
        if diagnosis:
            lines.append("  diagnosis:")
            lines += [f"    {d}" for d in diagnosis]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def distinct(expected: float, actual: float, *, at_least: int = 6) -> tuple[str, str]:
    """Both numbers with as many significant digits as it takes for their
    printed forms to differ (from `at_least` up to 17, which shows any two
    different float64 values apart)."""
    for digits in range(at_least, 18):
        e, a = f"{expected:.{digits}g}", f"{actual:.{digits}g}"
        if e != a:
            return e, a
    return e, a


def _flow(name: str) -> int:
    """The data-flow rank of a fixture key (see ``first_failure``)."""
    for i, prefix in enumerate(("aux.", "output.out", "output.", "grad.param.",
                                "grad.input.")):
        if name.startswith(prefix):
            return i
    return 9


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
    """Every element of `a` within atol + rtol·|b| of `b` (all finite)."""
    with np.errstate(all="ignore"):
        return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _softmax_axes(x: np.ndarray, rtol: float) -> list[int]:
    """The axes (of size > 1) over which non-negative `x` sums to 1."""
    if x.ndim < 2 or np.any(x < 0):
        return []
    slack = max(rtol, 1e-12) * 10
    return [ax for ax in range(x.ndim) if x.shape[ax] > 1
            and np.all(np.abs(np.sum(x, axis=ax) - 1.0) <= slack * x.shape[ax])]


def signature(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float
              ) -> str | None:
    """The simple signature of a wrong `actual`, or None.

    Tried in order (``SIGNATURES``), each with the row's own tolerance rule
    |x - y| <= atol + rtol·|y| on the transformed tensors:

    * all zeros: every actual value is 0 while the expected tensor is not;
    * sign flip: actual ≈ -expected;
    * constant factor: actual ≈ k·expected (k the least-squares factor;
      not for a tensor with fewer than two non-zero values, which any
      factor fits);
    * transposed: actual ≈ expected with two or more equal-sized axes
      permuted;
    * missing sigmoid: sigmoid(actual) ≈ expected, i.e. actual ≈
      logit(expected) (expected strictly inside (0, 1));
    * extra sigmoid: actual ≈ sigmoid(expected);
    * softmax over the wrong axis: both sum to 1, expected over one axis and
      actual over another (and not over expected's).
    """
    import itertools

    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or not e.size or not (np.isfinite(a).all()
                                                and np.isfinite(e).all()):
        return None
    if not np.any(a) and np.max(np.abs(e)) > atol:
        return "all zeros: the actual tensor is 0 everywhere"
    ee = float(np.sum(e * e))
    if ee > 0:
        k = float(np.sum(a * e) / ee)
        if k != 0 and _close(a, k * e, rtol, atol * max(abs(k), 1.0)):
            if abs(k + 1) <= max(rtol, 1e-12) * 10:
                return "sign flip: actual ≈ -expected"
            if np.count_nonzero(e) >= 2:  # any one number is a multiple of another
                return f"constant factor: actual ≈ {k:.6g} × expected"
    if 2 <= e.ndim <= 6:
        for perm in itertools.permutations(range(e.ndim)):
            if perm == tuple(range(e.ndim)) or any(
                    e.shape[p] != e.shape[i] for i, p in enumerate(perm)):
                continue
            if _close(a, np.transpose(e, perm), rtol, atol):
                return (f"transposed: actual ≈ expected with its axes permuted to "
                        f"{perm}")
    with np.errstate(all="ignore"):
        if np.all((e > 0) & (e < 1)) and _close(1.0 / (1.0 + np.exp(-a)), e, rtol, atol):
            return "missing sigmoid: actual ≈ logit(expected)"
        if _close(a, 1.0 / (1.0 + np.exp(-e)), rtol, atol):
            return "extra sigmoid: actual ≈ sigmoid(expected)"
    theirs, ours = _softmax_axes(a, rtol), _softmax_axes(e, rtol)
    if ours and theirs and not set(ours) & set(theirs):
        return (f"softmax over the wrong axis: actual sums to 1 over axis {theirs[0]}, "
                f"expected over axis {ours[0]}")
    return None


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
        row.signature = signature(e, a, rtol, atol)
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


def validate_run(case: Any, run: Any, *, subject: str, require: str = "provided"
                 ) -> ValidationReport:
    """``validate_results`` of ``run()`` (an adapter's run of their code).
    When ``run`` raises ``BackwardError``, the forward it carries is still
    compared and the error goes into the report: the verdict is FAIL."""
    try:
        results = run()
    except BackwardError as err:
        return validate_results(case, err.results, subject=subject, require=require,
                                errors=[str(err)])
    return validate_results(case, results, subject=subject, require=require)


def validate_results(case: Any, results: Mapping[str, Any], *, subject: str = "results",
                     require: str = "provided", errors: Any = ()) -> ValidationReport:
    """Compare `results` (fixture key names) with a case read by read_case.

    Args:
        case: a ``GoldenCase``.
        results: their tensors, keyed like the fixture; each must be a real
            floating-point array of the fixture's shape.
        subject: who "actual" is, for the report and the errors.
        require: "provided" (default) or "all": whether a PARTIAL verdict
            (some tensor not checked) still counts as ok (see REQUIRE).
        errors: what stopped their code early (``BackwardError``): the
            tensors it did not give are NOT CHECKED with that reason, and
            the verdict is FAIL.

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
            unchecked.reason = ("not computed: their backward raised (below)"
                                if errors and name.startswith("grad.") else "not provided")
            rows.append(unchecked)
            continue
        a = check_real_float(name, results[name], subject)
        if tuple(a.shape) != tuple(e.shape):
            raise ValidationInputError(
                f"{subject}: {name} has shape {tuple(a.shape)}, the fixture's is "
                f"{tuple(e.shape)}" + _transposed_hint(e, a, rtol, atol)
            )
        row = compare_tensor(name, e, a, rtol, atol)
        row.check = check
        rows.append(row)
    for name in sorted(set(results) & set(expected)):  # refused even if unchecked
        check_real_float(name, results[name], subject)
    report = ValidationReport(
        case=str(case.path), block=manifest["block"], preset=manifest.get("preset"),
        dtype=manifest["dtype"], mode=manifest.get("mode"), subject=subject, rows=rows,
        require=require, errors=[str(x) for x in errors], order=list(case.tensors),
    )
    if not report.checked:
        provided = printable(", ".join(sorted(results)), 400) or "nothing"
        raise ValidationInputError(
            f"{subject}: provides none of the fixture's checkable tensors (gave {provided}"
            + (f"; inputs/params are not compared: {', '.join(ignored)}" if ignored else "")
            + ")"
        )
    return report


def _transposed_hint(e: np.ndarray, a: np.ndarray, rtol: float, atol: float) -> str:
    """``" (...transposed...)"`` when `a` is `e` with its axes permuted."""
    import itertools

    if sorted(a.shape) != sorted(e.shape) or not 2 <= e.ndim <= 6:
        return ""
    af = np.asarray(a, dtype=np.float64)
    for perm in itertools.permutations(range(e.ndim)):
        moved = np.transpose(np.asarray(e, dtype=np.float64), perm)
        if moved.shape == af.shape and _close(af, moved, rtol, atol):
            return (f" (its values are the fixture's with the axes permuted to {perm}: "
                    "a transposed tensor)")
    return ""


def _order(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(("output.out", "output.state.", "output.", "grad.input.",
                                "grad.param.", "aux.")):
        if name.startswith(prefix):
            return i, name
    return 99, name
