"""The tolerance rule of ``refattn-golden/1``: what a correct implementation
computing in a given dtype must meet against the float64 reference.

A tensor ``actual`` matches the stored ``expected`` when, element by element,

    |actual - expected| <= atol + rtol * |expected|,
    atol = atol_rel * max|expected|   (over that tensor)

``tolerance_for(dtype, K)`` returns ``(rtol, atol_rel)``; the manifest stores
``rtol`` and the multiplied-out absolute ``atol`` per tensor, with the
accumulation length ``K`` they came from.

Derivation (docs/format.md, "Tolerances", has the long form).  Rounding a sum
of ``K`` terms in a precision with unit round-off ``u`` leaves an error whose
typical size, for independent round-offs, grows like ``u * sqrt(K)`` times the
scale of the terms (the probabilistic bound; the worst case ``K * u`` is never
met in practice and would be far too loose for float32).  A tolerance has to
sit between two error levels that differ only in ``u``:

* what a correct implementation in ``dtype`` produces: ``u(dtype) * sqrt(K)``,
  times a modest factor for operation chains, conditioning and the tail of the
  maximum over many elements;
* what an implementation that silently computes one precision lower produces
  (float32 math in a "float64" model, float16 math in a "float32" one):
  ``u(lower) * sqrt(K)``.

The rule takes the geometric midpoint, which leaves the same multiplicative
margin on both sides:

    rtol = atol_rel = sqrt(u(dtype) * u(lower)) * sqrt(K)

float64 (u = 2^-53, lower float32 u = 2^-24):  2^-38.5 * sqrt(K) = 2.57e-12 sqrt(K),
margin 2^14.5 ~ 23000 on each side.
float32 (u = 2^-24, lower float16 u = 2^-11):  2^-17.5 * sqrt(K) = 5.39e-6 sqrt(K),
margin 2^6.5 ~ 90 on each side.

Integer and boolean tensors must match exactly: (0, 0).
"""

from __future__ import annotations

import math

__all__ = ["EXACT_DTYPES", "FLOAT_TOLERANCE_DTYPES", "UNIT_ROUNDOFF", "tolerance_for"]

UNIT_ROUNDOFF: dict[str, float] = {
    "float16": 2.0**-11,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}
"""Unit round-off u = eps / 2 of each IEEE binary format (round to nearest)."""

_LOWER = {"float32": "float16", "float64": "float32"}
"""The precision one step below: what a silent downcast would compute in."""

FLOAT_TOLERANCE_DTYPES = tuple(_LOWER)
EXACT_DTYPES = ("bool", "int32", "int64")


def tolerance_for(dtype: str, accumulation_length: int) -> tuple[float, float]:
    """Return ``(rtol, atol_rel)`` for a tensor computed in ``dtype``.

    Math:
        rtol = atol_rel = sqrt(u(dtype) * u(lower(dtype))) * sqrt(K)
        with K = ``accumulation_length``; the comparison is
        |a - e| <= atol_rel * max|e| + rtol * |e|.

    Args:
        dtype: "float32" or "float64" (the dtype the implementation computes
            in); "bool", "int32" and "int64" give exact matching (0.0, 0.0).
        accumulation_length: the effective number of terms rounded into one
            element (a conv output over C*KH*KW products: C*KH*KW; a reduction
            over N*H*W positions: N*H*W; a chain of such steps: the sum of
            their lengths).  At least 1.

    Raises:
        ValueError: unknown dtype, or accumulation_length not an int >= 1.
    """
    if isinstance(accumulation_length, bool) or not isinstance(
        accumulation_length, int
    ):
        raise ValueError(
            "accumulation_length: expected an int >= 1, got "
            f"{accumulation_length!r} ({type(accumulation_length).__name__})"
        )
    if accumulation_length < 1:
        raise ValueError(
            f"accumulation_length: expected an int >= 1, got {accumulation_length}"
        )
    if dtype in EXACT_DTYPES:
        return 0.0, 0.0
    if dtype not in _LOWER:
        raise ValueError(
            "dtype: expected one of "
            f"{', '.join(FLOAT_TOLERANCE_DTYPES + EXACT_DTYPES)}, got {dtype!r}"
        )
    unit = math.sqrt(UNIT_ROUNDOFF[dtype] * UNIT_ROUNDOFF[_LOWER[dtype]])
    rtol = unit * math.sqrt(accumulation_length)
    return rtol, rtol
