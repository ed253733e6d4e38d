"""The numerical gradient checker: is a hand-written backward the true VJP?

Everything is computed in float64.  A function under test is given as

    fn(args) -> (outputs, vjp)        vjp(douts) -> grads

with ``args``, ``outputs``, ``douts`` and ``grads`` flat dicts of arrays.  The
checker fixes random cotangents ``c`` for the outputs, which turns the
function into the scalar ``L(x) = sum_o <c_o, f_o(x)>`` whose gradient the
backward claims to be ``vjp(c)``, and then probes ``L`` by central differences:

    numeric  = (L(x + h d) - L(x - h d)) / 2h          ~ <grad L, d>
    analytic = <vjp(c), d>

Step: ``h = cbrt(eps)`` and ``d = max(1, |x|) * t``, so each element moves by
about ``6e-6 * max(1, |x_i|)`` (central differences balance the O(h^2)
truncation error against the O(eps/h) round-off there).  A probe that fails
is repeated at ``h / 8`` and ``h / 64``; it passes there only if its error
shrank with the step as truncation error does (64-fold per level), which a
wrong gradient's discrepancy never does.

Modes:

``fast`` (default)
    ``n_directions`` random directions across all checked tensors together,
    and, per tensor, one random direction restricted to it plus a sample of
    ``n_coords`` coordinates.  A tensor that fails is re-checked element by
    element (``full``, capped at ``max_full`` elements) to find the worst index.
``full``
    every element of every checked tensor (small shapes only).
``taylor``
    an eps-free verdict: along a random direction the remainder
    ``|L(x + h d) - L(x) - h <vjp(c), d>|`` must fall like ``h^2`` (slope 2 on
    a log-log plot) as ``h`` halves; a wrong gradient leaves an ``O(h)``
    remainder (slope 1).

A probe passes when ``|numeric - analytic| <= atol + rtol * bound + noise``,
where ``bound = sum_i |g_i d_i|`` (the size of the terms the inner product
adds, which survives cancellation) and ``noise`` is the round-off of the two
evaluations of ``L`` divided by ``2h``.

Kinks and ties: if a failing probe's one-sided slopes
``(L(x+hd) - L(x))/h`` and ``(L(x) - L(x-hd))/h`` disagree by more than a
smooth function's curvature allows, the step crossed a non-differentiable
point (a ReLU at 0, a tie in a max); the probe is reported as *skipped*, not
failed.  "Disagree" means: by more than 100x the round-off, and either by
``KINK_RATIO`` of the slopes' size or by at least the probe's discrepancy
``|numeric - analytic|``.  The second test is exact for one kink at distance
``d < h``: only the slope on its side bends, so ``|s+ - s-|`` is twice the
error it puts into the central difference.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from refattn import backend
from refattn._typing import Array

__all__ = ["GradcheckReport", "ProbeFailure", "TensorCheck", "gradcheck", "gradcheck_op"]

Mode = Literal["fast", "full", "taylor"]
VJP = Callable[[dict[str, Array]], Mapping[str, Any]]
Fn = Callable[[dict[str, Array]], tuple[Mapping[str, Array], VJP]]

EPS = float(np.finfo(np.float64).eps)
STEP = EPS ** (1.0 / 3.0)  # ~6.06e-6
REFINE = 8  # a failing probe is repeated at STEP / 8, then STEP / 64 (_settled)
REFINE_LEVELS = 2
KINK_RATIO = 1e-2  # one-sided slopes differing by this fraction of their size


@dataclass
class TensorCheck:
    """The verdict on one checked tensor."""

    name: str
    status: Literal["pass", "fail", "skipped"]
    method: str  # "fast", "full", "fast+full", "taylor"
    probes: int  # directions or elements probed
    size: int
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    worst_index: tuple[int, ...] | None = None
    analytic: float | None = None
    numeric: float | None = None
    skipped_probes: int = 0
    slope: float | None = None
    skipped_at: list[tuple[int, ...]] = field(default_factory=list)
    note: str = ""


@dataclass
class ProbeFailure:
    """A joint-direction probe that failed while every tensor alone passed."""

    direction: int
    analytic: float
    numeric: float
    abs_err: float


@dataclass
class GradcheckReport:
    """Per-tensor results of one gradient check, with text and JSON forms."""

    mode: str
    tensors: list[TensorCheck]
    joint_failures: list[ProbeFailure] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    rtol: float = 0.0
    atol: float = 0.0
    step: float = STEP

    @property
    def ok(self) -> bool:
        """True when nothing failed (skipped probes do not fail a check)."""
        return not self.joint_failures and all(t.status != "fail" for t in self.tensors)

    @property
    def failed(self) -> list[str]:
        return [t.name for t in self.tensors if t.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def to_text(self) -> str:
        head = (
            f"gradcheck ({self.mode}, float64, rtol={self.rtol:g}, atol={self.atol:g}, "
            f"step={self.step:.2g}*max(1,|x|)): {'PASS' if self.ok else 'FAIL'} "
            f"[{self.evaluations} evaluations, {self.seconds:.3f} s]"
        )
        rows = [
            f"  {'tensor':<28} {'status':<8} {'probes':>9} {'max abs err':>12} "
            f"{'max rel err':>12}  worst index / note"
        ]
        for t in self.tensors:
            where = "" if t.worst_index is None else str(t.worst_index)
            if t.status == "fail" and t.numeric is not None:
                where += f" analytic={t.analytic:.10g} numeric={t.numeric:.10g}"
            if t.slope is not None:
                where += f" slope={t.slope:.2f}"
            if t.skipped_probes:
                at = f" at {t.skipped_at[:4]}" if t.skipped_at else ""
                where += f" ({t.skipped_probes} probe(s) skipped{at}: kink/tie crossed)"
            if t.note:
                where += f" {t.note}"
            rows.append(
                f"  {t.name:<28} {t.status.upper():<8} {t.probes:>4}/{t.size:<4} "
                f"{t.max_abs_err:>12.3e} {t.max_rel_err:>12.3e}  {where.strip()}"
            )
        for f in self.joint_failures:
            rows.append(
                f"  joint direction {f.direction}: analytic={f.analytic:.10g} "
                f"numeric={f.numeric:.10g} (|err| {f.abs_err:.3e})"
            )
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        return self.to_text()


# ---------------------------------------------------------------------------
# the scalarised problem


class _Problem:
    """L(x) = sum_o <c_o, f_o(x)> with host float64 copies of everything."""

    def __init__(self, fn: Fn, args: Mapping[str, Array], wrt: Sequence[str] | None,
                 seed: int) -> None:
        self.fn = fn
        self.names = list(args)
        self.fixed = {k for k, v in args.items() if v is None}  # e.g. an absent bias
        present = {k: v for k, v in args.items() if v is not None}
        self.host = {k: backend.to_host(v).astype(np.float64) for k, v in present.items()}
        self.xp = {k: backend.namespace(**{k: v}) for k, v in present.items()}
        self.dev = {k: backend.device(v) for k, v in present.items()}
        self.rng = backend.host_rng(seed)
        self.evaluations = 0
        outputs, vjp = fn(self._materialise({}))
        self.evaluations += 1
        self.cot = {
            k: self.rng.standard_normal(tuple(o.shape)) for k, o in outputs.items()
        }
        self.L0, self.mag0 = self._scalar(outputs)
        out_xp = {k: backend.namespace(**{k: o}) for k, o in outputs.items()}
        out_dev = {k: backend.device(o) for k, o in outputs.items()}
        douts = {
            k: backend.from_host(
                c.astype(backend.to_host(outputs[k]).dtype), out_xp[k], device=out_dev[k]
            )
            for k, c in self.cot.items()
        }
        raw = vjp(douts)
        grads = {k: backend.to_host(g).astype(np.float64) for k, g in raw.items()
                 if g is not None}
        if wrt is None:
            wrt = [k for k in self.host if k in grads]
        missing = [k for k in wrt if k not in self.host]
        if missing:
            raise ValueError(f"wrt: {missing} are not arguments (have {self.names})")
        for k in wrt:
            if k not in grads:
                raise ValueError(f"the backward returned no gradient for {k!r}")
            if grads[k].shape != self.host[k].shape:
                raise ValueError(
                    f"gradient of {k!r} has shape {grads[k].shape}, expected "
                    f"{self.host[k].shape}"
                )
        self.wrt = list(wrt)
        self.grads = grads
        self.scale = {k: np.maximum(1.0, np.abs(self.host[k])) for k in self.wrt}

    def _materialise(self, delta: Mapping[str, np.ndarray]) -> dict[str, Array]:
        out: dict[str, Array] = {k: None for k in self.fixed}
        for k in self.host:
            a = self.host[k] + delta[k] if k in delta else self.host[k].copy()
            out[k] = backend.from_host(a, self.xp[k], device=self.dev[k])
        return out

    def _scalar(self, outputs: Mapping[str, Array]) -> tuple[float, float]:
        total, mag = 0.0, 0.0
        for k, c in self.cot.items():
            o = backend.to_host(outputs[k]).astype(np.float64)
            total += float(np.sum(c * o))
            mag += float(np.sum(np.abs(c * o)))
        return total, mag

    def loss(self, delta: Mapping[str, np.ndarray]) -> tuple[float, float]:
        outputs, _ = self.fn(self._materialise(delta))
        self.evaluations += 1
        return self._scalar(outputs)

    def probe(self, d: Mapping[str, np.ndarray], h: float = STEP) -> dict[str, float]:
        """Central difference of L along d (step h*d), and the analytic value."""
        (lp, mp), (lm, mm) = self.loss({k: h * v for k, v in d.items()}), self.loss(
            {k: -h * v for k, v in d.items()}
        )
        numeric = (lp - lm) / (2 * h)
        terms = [self.grads[k] * v for k, v in d.items()]
        analytic = float(sum(np.sum(t) for t in terms))
        bound = float(sum(np.sum(np.abs(t)) for t in terms))
        noise = 64 * EPS * (mp + mm + self.mag0) / (2 * h)
        kink = abs((lp - self.L0) - (self.L0 - lm)) / h
        slopes = abs(lp - self.L0) / h + abs(self.L0 - lm) / h
        return {
            "numeric": numeric,
            "analytic": analytic,
            "bound": bound,
            "noise": noise,
            "asymmetry": kink,
            # A kink crossed at distance d < h on one side bends that one-sided
            # slope only: |s+ - s-| = 2 |numeric - true slope|.  So an asymmetry
            # as large as the discrepancy explains it; a wrong gradient on a
            # smooth function leaves the asymmetry at h |L''|, far smaller.
            "kink": kink > 100 * noise
            and (kink > KINK_RATIO * slopes or kink >= abs(numeric - analytic)),
        }


def _verdict(p: dict[str, float], rtol: float, atol: float) -> tuple[bool, float, float]:
    err = abs(p["numeric"] - p["analytic"])
    tol = atol + rtol * p["bound"] + p["noise"]
    rel = err / max(abs(p["analytic"]), abs(p["numeric"]), 1e-300)
    return err <= tol, err, rel


def _settled(prob: _Problem, d: Mapping[str, np.ndarray], rtol: float, atol: float
             ) -> tuple[dict[str, float], bool, float, float]:
    """A probe along d and its verdict, refined while truncation error can
    explain a failure.

    The central difference errs by about h² |L⁽³⁾| / 6, so a correct
    gradient of a function that bends within a few steps (a normalisation
    whose variance is near its eps, a tensor drawn at a scale far below the
    step's floor of 1) can miss the tolerance at the default step.  A
    failing probe is repeated at ``REFINE`` and then ``REFINE²`` times
    smaller steps, where that error is ``REFINE²`` and ``REFINE⁴`` times
    smaller.  A refined probe passes only if it meets the tolerance AND its
    error fell at least ``REFINE``-fold from the step before: truncation
    error does, while a wrong gradient's discrepancy does not depend on h,
    so it keeps failing (down to the tolerance itself, which is what the
    check accepts anyway).

    The smaller step also tells a kink from a bend.  A smooth function's
    one-sided slopes differ by h |L''|, which falls ``REFINE``-fold with the
    step; a kink still inside the smaller step bends one slope by the same
    jump at both.  So a refined probe counts as a kink only if its
    asymmetry fell by less than sqrt(REFINE): a bend steep enough to pass
    for a kink at the default step (and hide a wrong gradient behind it)
    is checked instead.  A kink beyond the smaller step is not crossed
    there, and the gradient is checked at that point too.
    """
    p = prob.probe(d)
    ok, err, rel = _verdict(p, rtol, atol)
    h = STEP
    for _ in range(REFINE_LEVELS):
        if ok:
            break
        h /= REFINE
        q = prob.probe(d, h)
        q["kink"] = q["kink"] and q["asymmetry"] * math.sqrt(REFINE) > p["asymmetry"]
        ok_q, err_q, rel_q = _verdict(q, rtol, atol)
        fell = err_q * REFINE <= err
        p, ok, err, rel = q, ok_q and fell, err_q, rel_q
        if p["kink"] or not fell:
            break  # a kink, or an error that does not shrink with the step
    return p, ok, err, rel


# ---------------------------------------------------------------------------
# modes


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    t = rng.standard_normal(shape)
    n = float(np.linalg.norm(t))
    return t / n if n > 0 else t


def _check_elements(prob: _Problem, name: str, rtol: float, atol: float,
                    max_elements: int | None, rng: np.random.Generator,
                    method: str) -> TensorCheck:
    """Probe single coordinates of one tensor (all of them, or a sample)."""
    size = prob.host[name].size
    shape = prob.host[name].shape
    if max_elements is None or size <= max_elements:
        flat = np.arange(size)
    else:
        flat = np.sort(rng.choice(size, max_elements, replace=False))
    worst = None
    check = TensorCheck(name, "pass", method, len(flat), size)
    for i in flat:
        d = np.zeros(shape)
        idx = np.unravel_index(i, shape)
        s = float(prob.scale[name][idx])
        d[idx] = s
        p, ok, err, rel = _settled(prob, {name: d}, rtol, atol)
        if not ok and p["kink"]:
            check.skipped_probes += 1
            check.skipped_at.append(tuple(int(j) for j in idx))
            continue
        if not ok:
            check.status = "fail"
        score = err / (atol + rtol * p["bound"] + p["noise"])
        if worst is None or score > worst[0]:
            worst = (score, idx, p["analytic"] / s, p["numeric"] / s)
        check.max_abs_err = max(check.max_abs_err, err / s)
        check.max_rel_err = max(check.max_rel_err, rel)
    if worst is not None:
        check.worst_index = tuple(int(j) for j in worst[1])
        check.analytic, check.numeric = float(worst[2]), float(worst[3])
    if check.status == "pass" and check.skipped_probes:
        check.status = "skipped"
    return check


def _check_fast(prob: _Problem, rtol: float, atol: float, n_directions: int,
                n_coords: int, max_full: int, rng: np.random.Generator
                ) -> tuple[list[TensorCheck], list[ProbeFailure]]:
    checks = []
    for name in prob.wrt:
        shape = prob.host[name].shape
        size = prob.host[name].size
        d = prob.scale[name] * _unit(rng, shape)
        p, ok, err, rel = _settled(prob, {name: d}, rtol, atol)
        check = _check_elements(prob, name, rtol, atol, n_coords, rng, "fast")
        check.probes += 1
        check.max_abs_err = max(check.max_abs_err, err)
        check.max_rel_err = max(check.max_rel_err, rel)
        if not ok and p["kink"]:
            check.skipped_probes += 1
            if check.status == "pass":
                check.status = "skipped"
        elif not ok or check.status == "fail":
            # explain the failure: element by element, to find the worst index
            full = _check_elements(prob, name, rtol, atol, max_full, rng, "fast+full")
            full.status = "fail"
            if check.analytic is not None and full.analytic is None:
                full.worst_index = check.worst_index
                full.analytic, full.numeric = check.analytic, check.numeric
            full.max_abs_err = max(full.max_abs_err, err)
            full.max_rel_err = max(full.max_rel_err, rel)
            full.note = f"(directional error {err:.3e}; re-checked element by element)"
            check = full
        check.size = size
        checks.append(check)
    joint = []
    if all(c.status != "fail" for c in checks):
        for j in range(n_directions):
            d = {k: prob.scale[k] * _unit(rng, prob.host[k].shape) for k in prob.wrt}
            p, ok, err, _ = _settled(prob, d, rtol, atol)
            if not ok and not p["kink"]:
                joint.append(ProbeFailure(j, p["analytic"], p["numeric"], err))
    return checks, joint


def _loglog_slope(hs: Sequence[float], values: Sequence[float],
                  floor: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(h), above the round-off."""
    pts = [(math.log(h), math.log(v)) for h, v, f in zip(hs, values, floor) if v > 10 * f]
    if len(pts) < 3:
        return None
    xs, ys = np.array(pts).T
    return float(np.polyfit(xs, ys, 1)[0])


def _check_taylor(prob: _Problem, rtol: float, rng: np.random.Generator,
                  levels: int = 10) -> list[TensorCheck]:
    """Slope-2 test of the first-order Taylor remainder, per tensor."""
    checks = []
    for name in prob.wrt:
        d = {name: prob.scale[name] * _unit(rng, prob.host[name].shape)}
        slope_g = float(np.sum(prob.grads[name] * d[name]))
        hs = [1e-2 * 0.5**k for k in range(levels)]
        rem, curv, floor = [], [], []
        for h in hs:
            (lp, mp), (lm, mm) = prob.loss({name: h * d[name]}), prob.loss(
                {name: -h * d[name]}
            )
            rem.append(abs(lp - prob.L0 - h * slope_g))
            curv.append(abs(lp - 2 * prob.L0 + lm))  # gradient-free: h^2 if smooth
            floor.append(64 * EPS * (mp + mm + prob.mag0))
        check = TensorCheck(name, "pass", "taylor", levels, prob.host[name].size)
        slope = _loglog_slope(hs, rem, floor)
        if slope is None:
            check.note = "remainder below round-off at every step (locally linear)"
        else:
            check.slope = slope
            if slope < 1.75:
                smooth = _loglog_slope(hs, curv, floor)
                if smooth is not None and smooth < 1.75:
                    # the second difference is O(h) too: a kink, not the gradient
                    check.status = "skipped"
                    check.skipped_probes = 1
                    check.note = "the direction crosses a kink or tie"
                else:
                    check.status = "fail"
                    check.note = "remainder falls like h^%.2f, expected h^2" % slope
        check.max_abs_err = float(min(rem) / hs[int(np.argmin(rem))])
        check.analytic = slope_g
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------
# public entry points


def gradcheck(
    fn: Fn,
    args: Mapping[str, Array],
    *,
    wrt: Sequence[str] | None = None,
    mode: Mode = "fast",
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-10,
    n_directions: int = 2,
    n_coords: int = 2,
    max_full: int = 4096,
) -> GradcheckReport:
    """Check that ``fn``'s vjp is the gradient of its forward, in float64.

    Args:
        fn: ``fn(args) -> (outputs, vjp)`` with ``vjp(douts) -> grads`` (dicts).
        args: the point to check at; cast to float64, never mutated.
        wrt: the argument names to check (default: every gradient vjp returns).
        mode: ``"fast"``, ``"full"`` or ``"taylor"`` (see the module docstring).
        seed: seeds the cotangents, directions and coordinate samples.
        rtol, atol: tolerance of a probe relative to its term bound, and absolute.

    Returns:
        A GradcheckReport; ``report.ok`` is the verdict, ``report.to_text()``
        the readable form.
    """
    if mode not in ("fast", "full", "taylor"):
        raise ValueError(f"mode: expected 'fast', 'full' or 'taylor', got {mode!r}")
    if not args:
        raise ValueError("args: expected at least one array to differentiate")
    start = time.perf_counter()
    cast = {k: None if v is None else _as_f64(k, v) for k, v in args.items()}
    prob = _Problem(fn, cast, wrt, seed)
    rng = np.random.default_rng([seed, 1])
    joint: list[ProbeFailure] = []
    if mode == "full":
        checks = [_check_elements(prob, k, rtol, atol, None, rng, "full") for k in prob.wrt]
    elif mode == "taylor":
        checks = _check_taylor(prob, rtol, rng)
    else:
        checks, joint = _check_fast(prob, rtol, atol, n_directions, n_coords, max_full, rng)
    return GradcheckReport(
        mode, checks, joint, prob.evaluations, time.perf_counter() - start, rtol, atol
    )


def _as_f64(name: str, a: Array) -> Array:
    backend.check_array(name, a)
    xp = backend.namespace(**{name: a})
    return a if backend.dtype_name(a) == "float64" else xp.astype(a, xp.float64)


def gradcheck_op(
    forward: Callable[..., tuple[Any, Any]],
    backward: Callable[[Array, Any], Any],
    inputs: Mapping[str, Array],
    *,
    options: Mapping[str, Any] | None = None,
    output: Callable[[Any], Array] | None = None,
    **kwargs: Any,
) -> GradcheckReport:
    """gradcheck for an op pair ``out, cache = forward(*inputs, **options)``,
    ``backward(dout, cache) -> d<input>`` (or a tuple in input order; None
    entries are not differentiable).

    ``output`` picks the differentiable output when the op returns several
    (default: the output itself if it is an array, else its first element).
    Remaining keyword arguments go to :func:`gradcheck`.
    """
    names = list(inputs)
    opts = dict(options or {})

    def pick(out: Any) -> Array:
        if output is not None:
            return output(out)
        return out[0] if isinstance(out, tuple) else out

    def fn(args: dict[str, Array]) -> tuple[dict[str, Array], VJP]:
        out, cache = forward(*(args[k] for k in names), **opts)

        def vjp(douts: dict[str, Array]) -> dict[str, Array]:
            grads = backward(douts["out"], cache)
            if not isinstance(grads, tuple):
                grads = (grads,)
            return {k: g for k, g in zip(names, grads) if g is not None}

        return {"out": pick(out)}, vjp

    return gradcheck(fn, inputs, **kwargs)
