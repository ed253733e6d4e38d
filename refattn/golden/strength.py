"""How strong a tolerance is: can it reject a wrong result at all?

A fixture's verdict is only worth something if the tolerance it stores for a
tensor fails on results that are plainly wrong.  For an expected tensor ``e``
and its ``(rtol, atol)`` the comparison rule of ``refattn-golden/1`` is

    |a - e| <= atol + rtol * |e|        element-wise,

and this module asks it the four questions every stored tolerance must answer
with "reject":

    zeroed     a = 0
    negated    a = -e
    scaled     a = (1 + 10 rtol) e
    one off    a = e, except at the worst-conditioned element (the largest
               |e|, where the band atol + rtol |e| is widest), whose sign is
               flipped

and it caps the relative tolerance itself (``MAX_RTOL``): a band wider than
1 % in float32 or 1e-8 in float64 would let through an implementation that is
wrong in every element by less than that.  A tensor that fails one of these is
*vacuous*: a PASS on it says nothing.

Two kinds of tensors cannot answer "reject" and are not vacuous by mistake;
the manifest says which (field ``check``, docs/format.md section 6):

* ``"zero"``: the exact result is 0 (the float64 reference holds only
  round-off, e.g. the bias gradient in front of a normalisation); zeroing or
  negating it is not a wrong result.  Its tolerance is absolute,
  atol = rtol * S on the scale S of the tensor's family, and only "one off"
  applies, as one element set to 1 % of S (= atol / rtol).
* ``"none"``: the tensor cannot be checked in this dtype at all (its
  conditioning leaves nothing but round-off), with the reason in
  ``check_reason``; it is reported NOT CHECKED and never counts as passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CHECKED_PREFIXES",
    "CHECK_KINDS",
    "MAX_RTOL",
    "MUTANTS",
    "Weakness",
    "case_weaknesses",
    "mutants",
    "tolerance_weaknesses",
]

CHECKED_PREFIXES = ("output.", "grad.input.", "grad.param.", "aux.")
"""Fixture keys a third party is checked on (output.state.* included)."""

MAX_RTOL: dict[str, float] = {"float32": 1e-2, "float64": 1e-8}
"""The widest relative tolerance a fixture may claim per dtype."""

CHECK_KINDS = ("full", "zero", "none")
"""The manifest's ``check`` field: compared relative and absolute (the
default when absent), compared against zero on an absolute scale only, or not
checkable in this dtype."""

MUTANTS = ("zeroed", "negated", "scaled", "one off")


@dataclass(frozen=True)
class Weakness:
    """One wrong result a tolerance fails to reject (or a cap it exceeds)."""

    tensor: str
    what: str  # a mutant name, or "rtol"
    detail: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.detail}"


def _passes(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> bool:
    """The comparison rule of validate.compare_tensor, all elements."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))


def mutants(expected: Any, rtol: float, atol: float, kind: str = "full"
            ) -> dict[str, np.ndarray]:
    """The wrong results a tolerance of ``kind`` must reject, by name.

    A ``"zero"`` tensor gets only "one off" (its value is round-off, so
    zeroing, negating or scaling it is not wrong); a ``"none"`` tensor gets
    none.  Empty tensors have none either.
    """
    e = np.asarray(expected, dtype=np.float64)
    if kind == "none" or e.size == 0:
        return {}
    worst = np.unravel_index(int(np.argmax(np.abs(e))), e.shape)
    one_off = e.copy()
    if kind == "zero":  # 1 % of the family scale the absolute band was taken on
        one_off[worst] = 1e-2 * atol / rtol if rtol > 0 else np.inf
        return {"one off": one_off}
    one_off[worst] = -e[worst]
    return {
        "zeroed": np.zeros_like(e),
        "negated": -e,
        "scaled": e * (1.0 + 10.0 * rtol),
        "one off": one_off,
    }


def tolerance_weaknesses(name: str, expected: Any, rtol: float, atol: float,
                         dtype: str, kind: str = "full") -> list[Weakness]:
    """Every way the tolerance of one tensor fails to reject a wrong result.

    Args:
        name: the tensor's fixture key (for the messages).
        expected: the stored expected tensor.
        rtol, atol: its tolerance.
        dtype: the case dtype ("float32"/"float64"; other dtypes are exact and
            always strong).
        kind: the manifest's ``check`` ("full", "zero" or "none").
    """
    if kind not in CHECK_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CHECK_KINDS)}, got {kind!r}")
    if kind == "none" or dtype not in MAX_RTOL:
        return []
    out = []
    cap = MAX_RTOL[dtype]
    if rtol >= cap:
        out.append(Weakness(name, "rtol", f"rtol {rtol:.3g} is not below the "
                                          f"{dtype} cap {cap:g}"))
    e = np.asarray(expected, dtype=np.float64)
    for what, wrong in mutants(e, rtol, atol, kind).items():
        if _passes(e, wrong, rtol, atol):
            out.append(Weakness(name, what, f"the {what} tensor passes its tolerance "
                                            f"(rtol {rtol:.3g}, atol {atol:.3g}, "
                                            f"max|expected| {float(np.abs(e).max()):.3g})"))
    return out


def case_weaknesses(manifest: Mapping[str, Any], tensors: Mapping[str, Any],
                    keys: Any = None) -> list[Weakness]:
    """Every weakness of the checked tensors of one case.

    Args:
        manifest: the case manifest (its ``tensors`` entries give rtol, atol
            and ``check``).
        tensors: the case tensors by fixture key.
        keys: which keys to examine (default: every checked key,
            ``CHECKED_PREFIXES``).
    """
    entries = manifest["tensors"]
    if keys is None:
        keys = [k for k in entries if k.startswith(CHECKED_PREFIXES)]
    out: list[Weakness] = []
    for key in keys:
        e = entries[key]
        out += tolerance_weaknesses(key, tensors[key], float(e["rtol"]), float(e["atol"]),
                                    str(manifest["dtype"]), e.get("check", "full"))
    return out
