"""Elementwise ops: ReLU, sigmoid, the sigmoid gate, broadcasting mul and add.

Every binary op here broadcasts in the NumPy/Array API manner, and every
backward undoes that broadcast with ``backend.sum_to_shape`` so that each
gradient has exactly its input's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
    check_finite,
    check_same_dtype,
    namespace,
    sum_product_to_shape,
    sum_to_shape,
)
from refattn.ops.overrides import overridable, routed_by_cache

__all__ = [
    "AddCache",
    "GateMulCache",
    "MulCache",
    "ReluCache",
    "SigmoidCache",
    "add_backward",
    "add_forward",
    "gate_mul_backward",
    "gate_mul_forward",
    "mul_backward",
    "mul_forward",
    "relu_backward",
    "relu_forward",
    "sigmoid",
    "sigmoid_backward",
    "sigmoid_forward",
]


def sigmoid(z: Array) -> Array:
    """The logistic function, stable for any finite `z` in float32 and float64.

    Math:
        e = exp(−|z|)                         (never overflows: e ∈ (0, 1])
        σ(z) = 1/(1 + e)   where z ≥ 0
        σ(z) = e/(1 + e)   where z < 0
    Both branches are evaluated at once as exp(min(z, 0)) / (1 + e): the
    numerator is exactly 1 where z ≥ 0 and exactly e where z < 0, so the result
    is the same bits as the select, written as arithmetic on whole arrays.
    Shapes:
        z, σ(z)  any shape; the dtype of `z` is kept
    """
    xp = namespace(z=z)
    e = xp.exp(-xp.abs(z))  # like z
    s = xp.exp(xp.minimum(z, 0.0))  # like z: 1 where z >= 0, e where z < 0
    s /= 1.0 + e  # in place on the fresh numerator
    return s


# ---------------------------------------------------------------------------
# ReLU


class ReluCache(NamedTuple):
    out: Array  # like x: max(x, 0); out > 0 exactly where x > 0


def relu_forward(x: Array) -> tuple[Array, ReluCache]:
    """Rectified linear unit.

    Math:
        out = max(x, 0)
    Shapes:
        x, out  any shape
    """
    _check_input("x", x)
    return _relu(x)


@overridable("relu")
def _relu(x: Array) -> tuple[Array, ReluCache]:
    """The math of relu_forward, arguments already checked."""
    xp = namespace(x=x)
    out = xp.maximum(x, 0.0)  # like x
    return out, ReluCache(out)


@routed_by_cache("relu")
def relu_backward(dout: Array, cache: ReluCache) -> Array:
    """VJP of ReLU.

    Math:
        dx = dout ⊙ 1[x > 0]
    Shapes:
        dout, dx  like x
    Convention:
        relu'(0) = 0: an input exactly at 0 passes no gradient.
    """
    _check_dout(dout, cache.out)
    return _relu_backward(dout, cache)


@routed_by_cache("relu")
def _relu_backward(dout: Array, cache: ReluCache) -> Array:
    """The math of relu_backward, arguments already checked."""
    out = cache.out
    xp = namespace(dout=dout)
    return dout * xp.astype(out > 0, dout.dtype)  # 1[x > 0] as 0.0 / 1.0


# ---------------------------------------------------------------------------
# sigmoid


class SigmoidCache(NamedTuple):
    s: Array  # like z: σ(z)


def sigmoid_forward(z: Array) -> tuple[Array, SigmoidCache]:
    """Stable logistic sigmoid (see `sigmoid`).

    Math:
        s = σ(z) = 1/(1 + exp(−z)), evaluated from e = exp(−|z|)
    Shapes:
        z, s  any shape
    """
    _check_input("z", z)
    return _sigmoid(z)


def _sigmoid(z: Array) -> tuple[Array, SigmoidCache]:
    """The math of sigmoid_forward, arguments already checked."""
    s = sigmoid(z)  # like z
    return s, SigmoidCache(s)


def sigmoid_backward(dout: Array, cache: SigmoidCache) -> Array:
    """VJP of sigmoid, from the saved output.

    Math:
        dz = dout ⊙ s ⊙ (1 − s)          since σ′(z) = σ(z)(1 − σ(z))
    Shapes:
        dout, dz  like z
    """
    _check_dout(dout, cache.s)
    return _sigmoid_backward(dout, cache)


def _sigmoid_backward(dout: Array, cache: SigmoidCache) -> Array:
    """The math of sigmoid_backward, arguments already checked."""
    s = cache.s
    return dout * s * (1 - s)


# ---------------------------------------------------------------------------
# sigmoid gate


class GateMulCache(NamedTuple):
    x: Array  # (N, C, H, W)  the features being gated
    s: Array  # like z: σ(z), broadcastable to x


def gate_mul_forward(x: Array, z: Array) -> tuple[Array, GateMulCache]:
    """Gate features by a sigmoid of logits that broadcast against them.

    Math:
        s   = σ(z)
        out = x ⊙ s                       (s broadcasts against x)
    Shapes:
        x    (N, C, H, W)  (any shape)
        z    (N, C, 1, 1) channel gate | (N, 1, H, W) spatial gate | any shape
             that broadcasts to x's shape without enlarging it
        out  like x
    """
    _check_input("x", x)
    _check_input("z", z)
    check_same_dtype(x=x, z=z)
    if _broadcast("x", x.shape, "z", z.shape) != tuple(x.shape):
        raise ValueError(
            f"z: expected a shape that broadcasts to x's shape {tuple(x.shape)}, "
            f"got {tuple(z.shape)}"
        )
    return _gate_mul(x, z)


@overridable("gate_mul")
def _gate_mul(x: Array, z: Array) -> tuple[Array, GateMulCache]:
    """The math of gate_mul_forward, arguments already checked."""
    s = sigmoid(z)  # like z
    out = x * s  # like x
    return out, GateMulCache(x, s)


@routed_by_cache("gate_mul")
def gate_mul_backward(dout: Array, cache: GateMulCache) -> tuple[Array, Array]:
    """VJP of gate_mul.

    Math:
        dx = dout ⊙ s
        dz = sum_to_shape(dout ⊙ x, z.shape) ⊙ s ⊙ (1 − s)
    Shapes:
        dout, dx  like x; dx is always a fresh array (callers may add into it)
        dz        like z
    """
    _check_dout(dout, cache.x)
    return _gate_mul_backward(dout, cache)


@routed_by_cache("gate_mul")
def _gate_mul_backward(dout: Array, cache: GateMulCache) -> tuple[Array, Array]:
    """The math of gate_mul_backward, arguments already checked."""
    x, s = cache
    dx = dout * s  # like x
    ds = sum_product_to_shape(dout, x, tuple(s.shape))  # undo the broadcast: like z
    dz = ds * s * (1 - s)  # like z; σ′ = s(1 − s)
    return dx, dz


# ---------------------------------------------------------------------------
# broadcasting product


class MulCache(NamedTuple):
    a: Array  # first factor
    b: Array  # second factor, broadcast-compatible with a


def mul_forward(a: Array, b: Array) -> tuple[Array, MulCache]:
    """Broadcasting elementwise product.

    Math:
        out = a ⊙ b
    Shapes:
        a, b  broadcast-compatible
        out   broadcast(a.shape, b.shape)
    """
    _check_operands(a, b)
    return _mul(a, b)


def _mul(a: Array, b: Array) -> tuple[Array, MulCache]:
    """The math of mul_forward, arguments already checked."""
    out = a * b  # broadcast(a, b)
    return out, MulCache(a, b)


def mul_backward(dout: Array, cache: MulCache) -> tuple[Array, Array]:
    """VJP of mul: each factor receives dout times the other, summed back to
    its own shape where the forward broadcast it.

    Math:
        da = sum_to_shape(dout ⊙ b, a.shape)
        db = sum_to_shape(dout ⊙ a, b.shape)
    Shapes:
        dout  broadcast(a.shape, b.shape);  da like a;  db like b
    """
    a, b = cache
    _check_dout_shape(dout, _broadcast("a", a.shape, "b", b.shape), a)
    return _mul_backward(dout, cache)


def _mul_backward(dout: Array, cache: MulCache) -> tuple[Array, Array]:
    """The math of mul_backward, arguments already checked."""
    a, b = cache
    da = sum_to_shape(dout * b, tuple(a.shape))  # like a
    db = sum_to_shape(dout * a, tuple(b.shape))  # like b
    return da, db


# ---------------------------------------------------------------------------
# broadcasting sum


class AddCache(NamedTuple):
    a_shape: Shape
    b_shape: Shape


def add_forward(a: Array, b: Array) -> tuple[Array, AddCache]:
    """Broadcasting elementwise sum.

    Math:
        out = a + b
    Shapes:
        a, b  broadcast-compatible
        out   broadcast(a.shape, b.shape)
    The cache keeps only the two shapes: the backward needs no values.
    """
    _check_operands(a, b)
    return _add(a, b)


@overridable("add")
def _add(a: Array, b: Array) -> tuple[Array, AddCache]:
    """The math of add_forward, arguments already checked."""
    out = a + b  # broadcast(a, b)
    return out, AddCache(tuple(a.shape), tuple(b.shape))


def add_backward(dout: Array, cache: AddCache) -> tuple[Array, Array]:
    """VJP of add: dout flows to both operands, summed where they broadcast.

    Math:
        da = sum_to_shape(dout, a.shape)
        db = sum_to_shape(dout, b.shape)
    Shapes:
        dout  broadcast(a.shape, b.shape);  da like a;  db like b

    Where an operand was not broadcast its gradient is `dout` itself (not a
    copy); callers never write into gradients in place.
    """
    a_shape, b_shape = cache
    check_array("dout", dout, shape=_broadcast("a", a_shape, "b", b_shape))
    return _add_backward(dout, cache)


def _add_backward(dout: Array, cache: AddCache) -> tuple[Array, Array]:
    """The math of add_backward, arguments already checked."""
    a_shape, b_shape = cache
    da = sum_to_shape(dout, a_shape)  # like a
    db = sum_to_shape(dout, b_shape)  # like b
    return da, db


# ---------------------------------------------------------------------------
# validation helpers


def _check_input(name: str, a: Array) -> None:
    check_array(name, a)
    check_finite(name, a)


def _check_dout(dout: Array, ref: Array) -> None:
    """dout must have the forward output's shape and dtype."""
    _check_dout_shape(dout, tuple(ref.shape), ref)


def _check_dout_shape(dout: Array, shape: Shape, ref: Array) -> None:
    check_array("dout", dout, shape=shape)
    if dout.dtype != ref.dtype:
        check_same_dtype(dout=dout, forward=ref)


def _check_operands(a: Array, b: Array) -> None:
    """a and b: finite arrays of one dtype with broadcast-compatible shapes."""
    _check_input("a", a)
    _check_input("b", b)
    check_same_dtype(a=a, b=b)
    _broadcast("a", a.shape, "b", b.shape)


def broadcast_shapes(shape_a: Shape, shape_b: Shape, clash: Callable[[], str]) -> Shape:
    """The broadcast of two shapes (NumPy's rules); where they clash, a
    ValueError whose message is ``clash()`` (built only then)."""
    n = max(len(shape_a), len(shape_b))
    pa = (1,) * (n - len(shape_a)) + tuple(shape_a)
    pb = (1,) * (n - len(shape_b)) + tuple(shape_b)
    if any(da != db and da != 1 and db != 1 for da, db in zip(pa, pb)):
        raise ValueError(clash())
    return tuple(db if da == 1 else da for da, db in zip(pa, pb))


def _broadcast(name_a: str, shape_a: Shape, name_b: str, shape_b: Shape) -> Shape:
    """The broadcast of two shapes, or a ValueError naming both arguments."""
    return broadcast_shapes(shape_a, shape_b, lambda: (
        f"{name_a}, {name_b}: expected broadcast-compatible shapes, "
        f"got {tuple(shape_a)} and {tuple(shape_b)}"
    ))
