"""Softmax along one axis, max-shifted for stability."""

from __future__ import annotations

from typing import NamedTuple

from refattn._typing import Array
from refattn.backend import (
    as_int,
    check_array,
    check_finite,
    check_same_dtype,
    namespace,
    sum_product_to_shape,
)
from refattn.ops.overrides import overridable, routed_by_cache

__all__ = ["SoftmaxCache", "softmax_backward", "softmax_forward"]


class SoftmaxCache(NamedTuple):
    y: Array  # like x: the softmax output
    axis: int  # the normalised axis, 0 <= axis < x.ndim


def softmax_forward(x: Array, *, axis: int = -1) -> tuple[Array, SoftmaxCache]:
    """Softmax of `x` along `axis`.

    Math:
        m = max_axis x                    (subtracted so exp never overflows)
        y = exp(x − m) / Σ_axis exp(x − m)
    Shapes:
        x, y  any shape with at least one axis; `axis` may be negative
    """
    check_array("x", x)
    axis = _normalise_axis(axis, x.ndim)
    check_finite("x", x)
    return _softmax(x, axis)


@overridable("softmax")
def _softmax(x: Array, axis: int) -> tuple[Array, SoftmaxCache]:
    """The math of softmax_forward, arguments already checked (0 <= axis < x.ndim)."""
    xp = namespace(x=x)
    y = xp.exp(x - xp.max(x, axis=axis, keepdims=True))  # like x
    y /= xp.sum(y, axis=axis, keepdims=True)  # in place on the fresh exp
    return y, SoftmaxCache(y, axis)


@routed_by_cache("softmax")
def softmax_backward(dout: Array, cache: SoftmaxCache) -> Array:
    """VJP of softmax, from the saved output.

    Math:
        dx = y ⊙ (dout − Σ_axis(dout ⊙ y))
    That is (diag(y) − y yᵀ) dout per slice along `axis`, without building the
    Jacobian: subtract the y-weighted mean of dout, then scale by y.
    Shapes:
        dout, dx  like x
    """
    y = cache.y
    check_array("dout", dout, shape=tuple(y.shape))
    check_same_dtype(dout=dout, forward=y)
    return _softmax_backward(dout, cache)


@routed_by_cache("softmax")
def _softmax_backward(dout: Array, cache: SoftmaxCache) -> Array:
    """The math of softmax_backward, arguments already checked."""
    y, axis = cache
    kept = tuple(1 if i == axis else n for i, n in enumerate(y.shape))
    dot = sum_product_to_shape(dout, y, kept)  # Σ_axis dout ⊙ y: x's shape, 1 at axis
    dx = dout - dot  # like x
    dx *= y  # in place on the fresh difference
    return dx


def _normalise_axis(axis: int, ndim: int) -> int:
    axis = as_int("axis", axis, "an int")
    if ndim == 0:
        raise ValueError("x: expected an array with at least one axis, got shape ()")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis: expected an int in [{-ndim}, {ndim - 1}] for a {ndim}-D x, "
            f"got {axis}"
        )
    return axis % ndim
