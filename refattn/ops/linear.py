"""Dense products: linear (PyTorch's nn.Linear layout) and batched matmul with
broadcast batch dimensions.

Both backward passes are transposed products.  The parameter-side gradient of
a product whose other operand is batched (the weight of linear; a 2-D operand
of matmul) is a sum over the batch, computed as ONE matmul over the flattened
batch rather than per-sample products summed afterwards.
"""

from __future__ import annotations

from typing import NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    check_array,
    check_finite,
    check_same_dtype,
    matmul,
    namespace,
    prod,
    sum_to_shape,
)
from refattn.ops.elementwise import broadcast_shapes
from refattn.ops.overrides import overridable

__all__ = [
    "LinearCache",
    "MatmulCache",
    "linear_backward",
    "linear_forward",
    "matmul_backward",
    "matmul_forward",
]


class LinearCache(NamedTuple):
    x2: Array  # (M, in) the input with its leading axes flattened, M = prod(...)
    weight: Array  # (out, in)
    x_shape: Shape  # (..., in)
    has_bias: bool


def linear_forward(
    x: Array, weight: Array, bias: Array | None = None
) -> tuple[Array, LinearCache]:
    """Affine map of the last axis: out = x Wᵀ + b (PyTorch's F.linear).

    Math:
        out[..., j] = b[j] + Σ_i x[..., i] · W[j, i]
    Shapes:
        x       (..., in)       any number of leading axes, including none
        weight  (out, in)
        bias    (out,) or None
        out     (..., out)
    """
    namespace(x=x, weight=weight, bias=bias)  # arrays of one library and device
    check_array("x", x)
    check_array("weight", weight, ndim=2)
    if x.ndim < 1:
        raise ValueError(
            "x: expected an array (..., in) with at least 1 axis, got shape ()"
        )
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"x: expected last axis of size in = weight.shape[1] = {n_in}, "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_array("bias", bias)
        if tuple(bias.shape) != (n_out,):
            raise ValueError(
                f"bias: expected shape (out,) = ({n_out},) for weight of shape "
                f"{tuple(weight.shape)}, got shape {tuple(bias.shape)}"
            )
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_finite("x", x)
    check_finite("weight", weight)
    if bias is not None:
        check_finite("bias", bias)
    return _linear(x, weight, bias)


def _linear(x: Array, weight: Array, bias: Array | None) -> tuple[Array, LinearCache]:
    """The math of linear_forward, arguments already checked."""
    xp = namespace(x=x)
    n_out, n_in = weight.shape
    lead = tuple(x.shape[:-1])
    x2 = xp.reshape(x, (prod(lead), n_in))  # (M, in)
    out = xp.matmul(x2, weight.mT)  # (M, out)
    if bias is not None:
        out += bias  # (M, out), in place on the fresh product
    out = xp.reshape(out, lead + (n_out,))  # (..., out)
    return out, LinearCache(x2, weight, tuple(x.shape), bias is not None)


def linear_backward(
    dout: Array, cache: LinearCache
) -> tuple[Array, Array, Array | None]:
    """VJP of linear.

    Math:
        dx  = dout · W                    (..., out) x (out, in)
        dW  = Σ_... doutᵀ x               one (out, M) x (M, in) product
        db  = Σ_... dout                  (None when there was no bias)
    Shapes:
        dout     (..., out)
        dx       (..., in)
        dweight  (out, in)
        dbias    (out,) or None
    """
    namespace(dout=dout)  # an array of a supported library
    weight, x_shape = cache.weight, cache.x_shape
    n_out = weight.shape[0]
    want = tuple(x_shape[:-1]) + (n_out,)
    _check_dout(dout, want, weight=weight)
    return _linear_backward(dout, cache)


def _linear_backward(
    dout: Array, cache: LinearCache
) -> tuple[Array, Array, Array | None]:
    """The math of linear_backward, arguments already checked."""
    xp = namespace(dout=dout)
    x2, weight, x_shape, has_bias = cache
    n_out = weight.shape[0]
    dout2 = xp.reshape(dout, (x2.shape[0], n_out))  # (M, out)
    dx = xp.reshape(xp.matmul(dout2, weight), x_shape)  # (..., in)
    dweight = xp.matmul(dout2.mT, x2)  # (out, in)
    dbias = xp.sum(dout2, axis=0) if has_bias else None  # (out,)
    return dx, dweight, dbias


class MatmulCache(NamedTuple):
    a: Array  # (*Ba, n, k)
    b: Array  # (*Bb, k, m)


def matmul_forward(a: Array, b: Array) -> tuple[Array, MatmulCache]:
    """Batched matrix product with broadcast batch axes.

    Math:
        out[..., i, j] = Σ_k a[..., i, k] · b[..., k, j]
        the batch axes (all but the last two) broadcast against each other.
    Shapes:
        a    (*Ba, n, k)     at least 2-D
        b    (*Bb, k, m)     at least 2-D
        out  (*B, n, m)      B = broadcast(Ba, Bb)
    """
    namespace(a=a, b=b)  # arrays of one library and device
    check_array("a", a)
    check_array("b", b)
    for name, arr in (("a", a), ("b", b)):
        if arr.ndim < 2:
            raise ValueError(
                f"{name}: expected an array with at least 2 axes (..., rows, cols), "
                f"got shape {tuple(arr.shape)}"
            )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"b: expected b.shape[-2] = a.shape[-1] = {a.shape[-1]}, got shapes "
            f"a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    _batch_shape(a, b)
    check_same_dtype(a=a, b=b)
    check_finite("a", a)
    check_finite("b", b)
    return _matmul(a, b)


def _matmul(a: Array, b: Array) -> tuple[Array, MatmulCache]:
    """The math of matmul_forward, arguments already checked."""
    xp = namespace(a=a)
    out = matmul(xp, a, b)  # (*B, n, m)
    return out, MatmulCache(a, b)


def matmul_backward(dout: Array, cache: MatmulCache) -> tuple[Array, Array]:
    """VJP of matmul; broadcast batch axes are summed back down.

    Math:
        da = sum_to_shape(dout · bᵀ, a.shape)
        db = sum_to_shape(aᵀ · dout, b.shape)
    When b is 2-D and a carries the whole batch, db is one product over the
    flattened batch, db = A2ᵀ · D2 with A2 = a as (B·n, k) and D2 = dout as
    (B·n, m), instead of B products and a sum.
    Shapes:
        dout  (*B, n, m)
        da    like a, a fresh array (callers may add into it)
        db    like b, a fresh array
    """
    namespace(dout=dout)  # an array of a supported library
    a, b = cache
    batch = _batch_shape(a, b)
    want = batch + (a.shape[-2], b.shape[-1])
    _check_dout(dout, want, a=a)
    return _matmul_backward(dout, cache)


def _matmul_backward(
    dout: Array, cache: MatmulCache, *, need_da: bool = True
) -> tuple[Array | None, Array]:
    """The math of matmul_backward, arguments already checked.

    ``need_da=False`` skips da (returned as None) for a caller that adds
    dout · bᵀ into another gradient itself (``_add_outer_products``).
    """
    xp = namespace(dout=dout)
    a, b = cache
    batch = tuple(dout.shape[:-2])
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    da = sum_to_shape(matmul(xp, dout, b.mT), tuple(a.shape)) if need_da else None
    if b.ndim == 2 and tuple(a.shape[:-2]) == batch:
        # b was shared by the whole batch: one (k, B·n) x (B·n, m) product
        a2 = xp.reshape(a, (prod(batch) * n, k))  # (B·n, k)
        dout2 = xp.reshape(dout, (prod(batch) * n, m))  # (B·n, m)
        db = matmul(xp, a2.mT, dout2)  # (k, m)
    else:
        db = sum_to_shape(matmul(xp, a.mT, dout), tuple(b.shape))  # like b
    return da, db


@overridable("add_outer_products")
def _add_outer_products(base: Array, u1: Array, v1: Array, u2: Array, v2: Array) -> Array:
    """A base plus two outer products, summed in the order written.

    Math:
        out[..., i, j] = base[..., i, j] + (u1[..., i, 0] v1[..., 0, j]
                                             + u2[..., i, 0] v2[..., 0, j])
    Shapes:
        base    (*B, n, m)
        u1, u2  (*B1, n, 1), (*B2, n, 1)   batch axes broadcast to B
        v1, v2  (*B1, 1, m), (*B2, 1, m)   u1 v1 has base's shape
        out     like base, a fresh array
    Each product has one term and no sum (``backend.matmul``'s broadcast
    multiply), so this is the same bits as the three passes written out.
    The GC block's x gradient is one: the direct path plus the attention
    pooling's two paths, dx + (dc α + W_kᵀ dlogits).  The CPU tier does it
    in one pass over the data instead of four.
    """
    xp = namespace(base=base)
    out = matmul(xp, u1, v1)  # (*B, n, m)
    out += matmul(xp, u2, v2)  # (*B, n, m)
    out += base  # (*B, n, m)
    return out


@overridable("product_into")
def _product_into(buf: Array, r0: int, a: Array, b: Array) -> Array:
    """a·b written into the rows r0 : r0 + M of a caller's buffer; returns buf.

    Math:
        buf[..., r0 + i, j] = Σ_k a[..., i, k] b[..., k, j]
    Shapes:
        a (*B, M, K), b (*B, K, N), buf (*B, M', N) with r0 + M ≤ M'
    The buffer is a stacked gradient the caller would otherwise concatenate
    from separate products: non_local and cross_layer write dΦ and dG into
    [dΦ | dG], which their stacked 1x1 convs' backward reads, and non_local
    writes dΘ above them.  Here the product is formed in fresh memory, then
    copied into the rows (indexing buf itself, so any array library keeps
    the write).  The CPU tier has NumPy's matmul write it there directly
    (``out=``): the same GEMM with the buffer's row stride as its leading
    dimension, and the same bits.
    """
    xp = namespace(buf=buf)
    m = int(a.shape[-2])
    buf[..., r0 : r0 + m, :] = matmul(xp, a, b)  # (*B, M, N)
    return buf


@overridable("add_product_into")
def _add_product_into(c: Array, a: Array, b: Array) -> Array:
    """c ← c + a·b in place; returns c.

    Math:
        c[i, j] += Σ_k a[i, k] b[k, j]
    Shapes:
        c (M, N), a (M, K), b (K, N); c may be a view into a larger array
    The product is formed, then added: one more pass over c than the
    product itself.  The CPU tier adds it as BLAS writes it (a GEMM with
    β = 1, ``refattn.cpu.blas``), within the tier's tolerance.  The
    shifted-view convolution sums its KH·KW tap products this way, forward
    and backward.
    """
    xp = namespace(c=c)
    c += matmul(xp, a, b)  # (M, N)
    return c


def _check_dout(dout: Array, want: Shape, **forward: Array) -> None:
    """dout must have the forward's output shape `want` and its dtype."""
    check_array("dout", dout)
    if tuple(dout.shape) != want:
        raise ValueError(
            f"dout: expected the forward's output shape {want}, got {tuple(dout.shape)}"
        )
    check_same_dtype(dout=dout, **forward)


def _batch_shape(a: Array, b: Array) -> Shape:
    """The broadcast of a's and b's batch axes, or a ValueError naming both."""
    sa, sb = tuple(a.shape[:-2]), tuple(b.shape[:-2])
    return broadcast_shapes(sa, sb, lambda: (
        f"b: expected batch axes broadcastable with a's, got shapes "
        f"a {tuple(a.shape)} and b {tuple(b.shape)} (batch {sa} vs {sb})"
    ))

