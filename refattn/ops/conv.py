"""Convolutions: conv2d (K x K, stride, padding, dilation, groups, bias) and
pointwise_conv, a 1x1 convolution over any spatial rank.

Both reduce to one grouped channel-mixing product on ``(N, C', L)`` arrays,
``out[n] = W2 @ cols[n]`` per group, written once in ``_mix_forward`` /
``_mix_backward``:

* a 1x1 convolution (pointwise_conv, and conv2d's fast path) multiplies the
  input itself, flattened to ``(N, C, L)`` (for conv2d after zero padding and
  stride subsampling);
* a K x K conv2d multiplies the im2col matrix ``(N, C*KH*KW, L)``, gathered
  from ``KH*KW`` strided slices of the padded input.

A wide stride-1 K x K conv2d (``_shifted_applies``) takes a second route,
``_conv2d_shifted``, to the same numbers without the im2col matrix, which
is KH*KW times the input's size: on the padded input laid out channel-major
and flattened over (n, row, column), the kernel offset (u, v) is a shift by
u*Wp + v, so the convolution is KH*KW products of (O, C) weight slices with
shifted contiguous views, summed; dW is accumulated from the same views.

Each backward is the exact adjoint of its forward: the transposed products,
then col2im (scatter-adding the slices back into a zero buffer) and unpadding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from refattn._typing import Array, Shape
from refattn.backend import (
    accumulate,
    as_int,
    as_tuple,
    check_array,
    check_finite,
    check_same_dtype,
    device,
    matmul,
    namespace,
    pad_spatial,
    prod,
    unpad_spatial,
    window,
    zeros_like_shape,
)
from refattn.ops.linear import _add_product_into
from refattn.ops.overrides import overridable, routed_by_cache
from refattn.ops.pool import _add_broadcast_into

__all__ = [
    "SHIFTED_MIN_CHANNELS",
    "SMALL_CONV_MAX_CHANNELS",
    "Conv2dCache",
    "Conv2dShiftedCache",
    "PointwiseConvCache",
    "conv2d_backward",
    "conv2d_forward",
    "conv2d_out_shape",
    "is_small_conv",
    "pair",
    "pointwise_conv_backward",
    "pointwise_conv_forward",
]

Pair = tuple[int, int]

SHIFTED_MIN_CHANNELS = 16
"""Input and output channels from which a stride-1 K x K conv2d takes the
shifted-view products (each product then has a reduction of C terms; below,
the KH*KW thin products cost more than building the im2col matrix)."""

SMALL_CONV_MAX_CHANNELS = 4
"""Up to this many input and output channels the kernel tiers (CUDA, CPU)
run a k x k convolution directly (``is_small_conv``); wider ones take the
generic path."""


def pair(v: int | Pair) -> Pair:
    """A conv size option (an int, or one int per spatial dim) as two ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv2dCache(NamedTuple):
    cols: Array  # (N, C*KH*KW, L) im2col of the padded input; (N, C, L) for 1x1
    weight: Array  # (O, C/G, KH, KW)
    x_shape: Shape  # (N, C, H, W)
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    has_bias: bool


def conv2d_forward(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> tuple[Array, Conv2dCache]:
    """2-D cross-correlation (PyTorch's conv2d) with zero padding and groups.

    Math:
        out[n, o, i, j] = b[o] + Σ_{c ∈ group(o), u, v}
                          W[o, c', u, v] · xpad[n, c, s_h·i + d_h·u, s_w·j + d_w·v]
        xpad = x with `padding` zeros on each side of H and W; output channel
        block g (O/G channels) reads input block g (C/G channels), c' = c mod C/G.
        Ho = floor((H + 2p_h − d_h(KH − 1) − 1) / s_h) + 1, likewise Wo.
        Computed as im2col + one grouped matmul; a 1x1 kernel skips im2col
        (pad, subsample by the stride, multiply).
    Shapes:
        x       (N, C, H, W)
        weight  (O, C/G, KH, KW)
        bias    (O,) or None
        out     (N, O, Ho, Wo)
    stride, padding and dilation are an int or an (h, w) pair.
    """
    namespace(x=x, weight=weight, bias=bias)  # arrays of one library and device
    checked = _check_conv2d_args(x, weight, bias, stride, padding, dilation, groups)
    _check_finite_args(x, weight, bias)
    return _conv2d(x, weight, bias, *checked)  # stride, padding, dilation, groups


@overridable("conv2d")
def _conv2d(
    x: Array,
    weight: Array,
    bias: Array | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> tuple[Array, Conv2dCache]:
    """The math of conv2d_forward, arguments already checked (stride, padding
    and dilation as (h, w) pairs)."""
    xp = namespace(x=x)
    N, C, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    ho, wo = _conv2d_out_hw((H, W), (KH, KW), stride, padding, dilation)
    if _shifted_applies(x, weight, stride, dilation, groups):
        return _conv2d_shifted(xp, x, weight, bias, padding)
    xpad = pad_spatial(x, padding)  # (N, C, H + 2p_h, W + 2p_w)
    if (KH, KW) == (1, 1):
        xs = xpad[:, :, window(0, stride[0], ho), window(0, stride[1], wo)]
        cols = xp.reshape(xs, (N, C, ho * wo))  # (N, C, L)
    else:
        cols = _im2col(xp, xpad, (KH, KW), stride, dilation, (ho, wo))
    w2 = xp.reshape(weight, (Cout, cols.shape[1] // groups))  # (O, C/G*KH*KW)
    out = _mix_forward(xp, cols, w2, bias, groups)  # (N, O, L)
    out = xp.reshape(out, (N, Cout, ho, wo))  # (N, O, Ho, Wo)
    cache = Conv2dCache(
        cols=cols,
        weight=weight,
        x_shape=(N, C, H, W),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        has_bias=bias is not None,
    )
    return out, cache


@routed_by_cache("conv2d")
def conv2d_backward(
    dout: Array, cache: Conv2dCache
) -> tuple[Array, Array, Array | None]:
    """VJP of conv2d: the transposed correlation and the weight correlation.

    Math:
        W2     = W as (O, C/G·KH·KW)
        dcols  = W2ᵀ · dout                     per group
        dx     = unpad(col2im(dcols))           col2im scatter-adds each kernel
                                                offset's slice back (the adjoint
                                                of im2col); positions no window
                                                reads (stride gaps) get 0
        dW     = Σ_n dout[n] · cols[n]ᵀ         per group
        db[o]  = Σ_{n,i,j} dout[n, o, i, j]     (None when there was no bias)
    Shapes:
        dout     (N, O, Ho, Wo)
        dx       (N, C, H, W)
        dweight  (O, C/G, KH, KW)
        dbias    (O,) or None
    """
    namespace(dout=dout)  # an array of a supported library
    _check_dout(dout, cache.weight, conv2d_out_shape(cache))
    return _conv2d_backward(dout, cache)


def conv2d_out_shape(cache: Conv2dCache) -> Shape:
    """The shape (N, O, Ho, Wo) of the forward's output, the cotangent's shape."""
    N, _, H, W = cache.x_shape
    Cout, _, KH, KW = cache.weight.shape
    ho, wo = _conv2d_out_hw((H, W), (KH, KW), cache.stride, cache.padding, cache.dilation)
    return (N, Cout, ho, wo)


@routed_by_cache("conv2d")
def _conv2d_backward(
    dout: Array, cache: Conv2dCache
) -> tuple[Array, Array, Array | None]:
    """The math of conv2d_backward, arguments already checked."""
    xp = namespace(dout=dout)
    if type(cache) is Conv2dShiftedCache:
        return _conv2d_shifted_backward(xp, dout, cache)
    c = cache
    N, C, H, W = c.x_shape
    Cout, _, KH, KW = c.weight.shape
    ho, wo = _conv2d_out_hw((H, W), (KH, KW), c.stride, c.padding, c.dilation)
    dout3 = xp.reshape(dout, (N, Cout, ho * wo))  # (N, O, L)
    w2 = xp.reshape(c.weight, (Cout, c.cols.shape[1] // c.groups))  # (O, C/G*KH*KW)
    dcols, dw2, dbias = _mix_backward(xp, dout3, c.cols, w2, c.groups, c.has_bias)
    padded = (N, C, H + 2 * c.padding[0], W + 2 * c.padding[1])  # (N, C, Hp, Wp)
    if (KH, KW) == (1, 1):
        dxs = xp.reshape(dcols, (N, C, ho, wo))  # (N, C, Ho, Wo)
        if c.stride == (1, 1):
            dxpad = dxs  # the subsampling was the identity
        else:
            # adjoint of the strided slice: zeros where the stride skipped
            dxpad = zeros_like_shape(dout, padded)  # (N, C, Hp, Wp)
            index = (
                slice(None),
                slice(None),
                window(0, c.stride[0], ho),
                window(0, c.stride[1], wo),
            )
            accumulate(dxpad, index, dxs)
    else:
        dxpad = _col2im(
            xp, dcols, padded, (KH, KW), c.stride, c.dilation, (ho, wo)
        )  # (N, C, Hp, Wp)
    dx = unpad_spatial(dxpad, c.padding)  # (N, C, H, W)
    dweight = xp.reshape(dw2, tuple(c.weight.shape))  # (O, C/G, KH, KW)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# stride-1 K x K conv2d by shifted views (no im2col matrix)


class Conv2dShiftedCache(NamedTuple):
    xc: Array  # (C, N·Hp·Wp + tail) padded input, channel-major, zero tail
    weight: Array  # (O, C, KH, KW)
    x_shape: Shape  # (N, C, H, W)
    stride: Pair  # (1, 1)
    padding: Pair
    dilation: Pair  # (1, 1)
    groups: int  # 1
    has_bias: bool


def _shifted_applies(
    x: Array, weight: Array, stride: Pair, dilation: Pair, groups: int
) -> bool:
    """Whether conv2d takes _conv2d_shifted: stride 1, no dilation, one
    group, a kernel larger than 1x1, at least SHIFTED_MIN_CHANNELS channels
    in and out."""
    KH, KW = weight.shape[2], weight.shape[3]
    return (
        stride == (1, 1)
        and dilation == (1, 1)
        and groups == 1
        and KH * KW > 1
        and min(x.shape[1], weight.shape[0]) >= SHIFTED_MIN_CHANNELS
    )


def is_small_conv(
    weight_shape: Shape,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> bool:
    """Whether conv2d is the kernel tiers' direct case: few channels, odd
    square k >= 3, 'same' zero padding (k − 1)/2, stride 1, dilation 1, one
    group."""
    cout, cin, kh, kw = (int(v) for v in weight_shape)
    return (
        groups == 1
        and stride == (1, 1)
        and dilation == (1, 1)
        and kh == kw
        and kh % 2 == 1
        and kh >= 3
        and padding == ((kh - 1) // 2, (kh - 1) // 2)
        and cin <= SMALL_CONV_MAX_CHANNELS
        and cout <= SMALL_CONV_MAX_CHANNELS
    )


def _shift(u: int, v: int, Wp: int) -> int:
    """The offset of kernel tap (u, v) in the flattened padded grid."""
    return u * Wp + v


def _conv2d_shifted(
    xp: Any, x: Array, weight: Array, bias: Array | None, padding: Pair
) -> tuple[Array, Conv2dShiftedCache]:
    """conv2d (stride 1, groups 1) as KH·KW products with shifted views.

    Math:
        X  = xpad as (C, N·Hp·Wp): column q = n·Hp·Wp + i·Wp + j
        Y  = Σ_{u,v} W[:, :, u, v] · X[:, q + u·Wp + v]        (O, N·Hp·Wp)
        out[n, :, i, j] = Y[:, n·Hp·Wp + i·Wp + j] + b   for i < Ho, j < Wo
    Columns with i >= Ho or j >= Wo mix neighbouring rows or samples and are
    dropped; a valid column never reads past its own sample.  X gets a zero
    tail of the largest shift so every view has N·Hp·Wp columns.
    Shapes:
        x (N, C, H, W), weight (O, C, KH, KW) -> out (N, O, Ho, Wo)
    """
    N, C, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    ho, wo = Hp - KH + 1, Wp - KW + 1
    Q = N * Hp * Wp  # columns of the padded grid
    tail = _shift(KH - 1, KW - 1, Wp)
    xc = xp.zeros((C, Q + tail), dtype=x.dtype, device=device(x))  # (C, Q + tail)
    grid = xp.reshape(xc[:, :Q], (C, N, Hp, Wp))  # a view of xc
    grid[:, :, padding[0] : padding[0] + H, padding[1] : padding[1] + W] = (
        xp.permute_dims(x, (1, 0, 2, 3))
    )
    y = xp.matmul(weight[:, :, 0, 0], xc[:, :Q])  # (O, Q), tap (0, 0)
    for u in range(KH):
        for v in range(KW):
            if u or v:
                d = _shift(u, v, Wp)
                _add_product_into(y, weight[:, :, u, v], xc[:, d : d + Q])  # (O, Q)
    y4 = xp.reshape(y, (Cout, N, Hp, Wp))[:, :, :ho, :wo]  # (O, N, Ho, Wo) view
    out = xp.empty((N, Cout, ho, wo), dtype=x.dtype, device=device(x))
    out[...] = xp.permute_dims(y4, (1, 0, 2, 3))  # (N, O, Ho, Wo), row-major
    if bias is not None:
        out = _add_broadcast_into(out, xp.reshape(bias, (1, Cout, 1, 1)))  # in place
    cache = Conv2dShiftedCache(
        xc, weight, (N, C, H, W), (1, 1), padding, (1, 1), 1, bias is not None
    )
    return out, cache


def _conv2d_shifted_backward(
    xp: Any, dout: Array, cache: Conv2dShiftedCache
) -> tuple[Array, Array, Array | None]:
    """VJP of _conv2d_shifted: the same shifted views, transposed.

    Math (D = dout placed on the padded grid, zero in the dropped columns):
        dW[:, :, u, v] = D · X[:, q + u·Wp + v]ᵀ                 (O, C)
        dX[:, q + u·Wp + v] += W[:, :, u, v]ᵀ · D               (C, N·Hp·Wp)
        dx = dX's interior, as (N, C, H, W);   db = Σ D
    Shapes:
        dout (N, O, Ho, Wo) -> dx (N, C, H, W), dweight (O, C, KH, KW), db (O,)
    """
    xc, weight = cache.xc, cache.weight
    N, C, H, W = cache.x_shape
    Cout, _, KH, KW = weight.shape
    ph, pw = cache.padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    ho, wo = Hp - KH + 1, Wp - KW + 1
    Q = N * Hp * Wp
    tail = _shift(KH - 1, KW - 1, Wp)
    d = xp.zeros((Cout, N, Hp, Wp), dtype=dout.dtype, device=device(dout))
    d[:, :, :ho, :wo] = xp.permute_dims(dout, (1, 0, 2, 3))
    d = xp.reshape(d, (Cout, Q))  # (O, Q)
    dxc = xp.zeros((C, Q + tail), dtype=dout.dtype, device=device(dout))
    taps = []
    for u in range(KH):
        for v in range(KW):
            s = _shift(u, v, Wp)
            taps.append(xp.matmul(d, xc[:, s : s + Q].mT))  # (O, C)
            _add_product_into(dxc[:, s : s + Q], weight[:, :, u, v].mT, d)  # (C, Q)
    dweight = xp.reshape(xp.stack(taps, axis=2), (Cout, C, KH, KW))
    grid = xp.reshape(dxc[:, :Q], (C, N, Hp, Wp))[:, :, ph : ph + H, pw : pw + W]
    dx = xp.empty((N, C, H, W), dtype=dout.dtype, device=device(dout))
    dx[...] = xp.permute_dims(grid, (1, 0, 2, 3))  # (N, C, H, W), row-major
    dbias = xp.sum(d, axis=1) if cache.has_bias else None  # (O,)
    return dx, dweight, dbias


class PointwiseConvCache(NamedTuple):
    x3: Array  # (N, C, L) the input with its spatial axes flattened
    weight: Array  # (O, C/G) or (O, C/G, 1, ..., 1)
    x_shape: Shape  # (N, C, *S)
    groups: int
    has_bias: bool


def pointwise_conv_forward(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    groups: int = 1,
) -> tuple[Array, PointwiseConvCache]:
    """1x1 convolution (stride 1, no padding) over any spatial rank 0..3.

    Math:
        out[n, o, s] = b[o] + Σ_{c ∈ group(o)} W[o, c'] · x[n, c, s]
        for every position s of the spatial shape S; output channel block g
        (O/G channels) reads input block g (C/G channels), c' = c mod C/G.
        One (grouped) matmul per sample on x viewed as (N, C, L), L = |S|.
    Shapes:
        x       (N, C, *S)      S = (), (L,), (H, W) or (T, H, W)
        weight  (O, C/G) or (O, C/G, 1, ..., 1) with len(S) trailing ones
        bias    (O,) or None
        out     (N, O, *S)
    """
    namespace(x=x, weight=weight, bias=bias)  # arrays of one library and device
    groups = _check_pointwise_args(x, weight, bias, groups)
    _check_finite_args(x, weight, bias)
    return _pointwise_conv(x, weight, bias, groups)


def _pointwise_conv(
    x: Array, weight: Array, bias: Array | None, groups: int
) -> tuple[Array, PointwiseConvCache]:
    """The math of pointwise_conv_forward, arguments already checked."""
    xp = namespace(x=x)
    N, C = x.shape[0], x.shape[1]
    Cout = weight.shape[0]
    spatial = tuple(x.shape[2:])
    x3 = xp.reshape(x, (N, C, prod(spatial)))  # (N, C, L)
    w2 = xp.reshape(weight, (Cout, C // groups))  # (O, C/G)
    out = _mix_forward(xp, x3, w2, bias, groups)  # (N, O, L)
    out = xp.reshape(out, (N, Cout) + spatial)  # (N, O, *S)
    cache = PointwiseConvCache(x3, weight, tuple(x.shape), groups, bias is not None)
    return out, cache


def pointwise_conv_backward(
    dout: Array, cache: PointwiseConvCache
) -> tuple[Array, Array, Array | None]:
    """VJP of pointwise_conv.

    Math:
        dx[n]  = W2ᵀ · dout[n]                   per group, on (·, L) views
        dW     = Σ_n dout[n] · x[n]ᵀ             per group, reshaped like weight
        db[o]  = Σ_{n,s} dout[n, o, s]           (None when there was no bias)
    Shapes:
        dout     (N, O, *S)
        dx       (N, C, *S)
        dweight  like weight
        dbias    (O,) or None
    """
    namespace(dout=dout)  # an array of a supported library
    c = cache
    want = (c.x_shape[0], c.weight.shape[0]) + tuple(c.x_shape[2:])
    _check_dout(dout, c.weight, want)
    return _pointwise_conv_backward(dout, cache)


def _pointwise_conv_backward(
    dout: Array, cache: PointwiseConvCache, *, need_dx: bool = True
) -> tuple[Array | None, Array, Array | None]:
    """The math of pointwise_conv_backward, arguments already checked.

    ``need_dx=False`` skips dx (returned as None) for a caller that adds
    W2ᵀ · dout into another gradient itself.
    """
    xp = namespace(dout=dout)
    c = cache
    N, C = c.x_shape[0], c.x_shape[1]
    Cout = c.weight.shape[0]
    dout3 = xp.reshape(dout, (N, Cout, prod(tuple(c.x_shape[2:]))))  # (N, O, L)
    w2 = xp.reshape(c.weight, (Cout, C // c.groups))  # (O, C/G)
    dx3, dw2, dbias = _mix_backward(xp, dout3, c.x3, w2, c.groups, c.has_bias,
                                    need_dcols=need_dx)
    dx = xp.reshape(dx3, c.x_shape) if need_dx else None  # (N, C, *S)
    dweight = xp.reshape(dw2, tuple(c.weight.shape))  # like weight
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# the shared channel-mixing product


def _mix_forward(
    xp: Any, cols: Array, w2: Array, bias: Array | None, groups: int
) -> Array:
    """out[n] = W2 · cols[n] per group (+ bias): (N, K, L) -> (N, O, L).

    One matmul batched over n (and over the groups), in cols' own layout.
    """
    N, K, L = cols.shape
    Cout = w2.shape[0]
    if groups == 1:
        out = matmul(xp, w2, cols)  # (N, O, L)
    else:
        G = groups
        wg = xp.reshape(w2, (G, Cout // G, K // G))  # (G, O/G, K/G)
        cg = xp.reshape(cols, (N, G, K // G, L))  # (N, G, K/G, L)
        out = xp.reshape(matmul(xp, wg, cg), (N, Cout, L))  # (N, O, L)
    if bias is not None:  # in place on the fresh product, on every core with the tier
        out = _add_broadcast_into(out, xp.reshape(bias, (1, Cout, 1)))  # (N, O, L)
    return out


def _mix_backward(
    xp: Any, dout3: Array, cols: Array, w2: Array, groups: int, has_bias: bool,
    *, need_dcols: bool = True,
) -> tuple[Array | None, Array, Array | None]:
    """VJP of _mix_forward: (dcols, dW2, db); dcols is None when not needed.

    dW2 = Σ_n dout[n] · cols[n]ᵀ, one product per sample added in order
    (the bits of a batched product summed over n, without its (N, O, K)
    temporary), then dcols[n] = W2ᵀ · dout[n], one batched matmul.
    """
    N, K, L = cols.shape
    Cout = w2.shape[0]
    if groups == 1:
        dw2 = _sum_of_products(xp, dout3, cols)  # (O, K)
        dcols = matmul(xp, w2.mT, dout3) if need_dcols else None  # (N, K, L)
    else:
        G = groups
        wg = xp.reshape(w2, (G, Cout // G, K // G))  # (G, O/G, K/G)
        cg = xp.reshape(cols, (N, G, K // G, L))  # (N, G, K/G, L)
        dg = xp.reshape(dout3, (N, G, Cout // G, L))  # (N, G, O/G, L)
        dwg = _sum_of_products(xp, dg, cg)  # (G, O/G, K/G)
        dw2 = xp.reshape(dwg, (Cout, K // G))  # (O, K/G)
        dcols = (xp.reshape(matmul(xp, wg.mT, dg), (N, K, L))  # (N, K, L)
                 if need_dcols else None)
    dbias = xp.sum(dout3, axis=(0, 2)) if has_bias else None  # (O,)
    return dcols, dw2, dbias


def _sum_of_products(xp: Any, a: Array, b: Array) -> Array:
    """Σ_n a[n] · b[n]ᵀ over the leading axis, accumulated in order: the same
    additions as ``xp.sum(a @ bᵀ, axis=0)``, one product alive at a time.

        a (N, ..., O, L), b (N, ..., K, L) -> (..., O, K)
    """
    total = matmul(xp, a[0, ...], b[0, ...].mT)  # (..., O, K), a fresh array
    for n in range(1, int(a.shape[0])):
        total += matmul(xp, a[n, ...], b[n, ...].mT)
    return total


# ---------------------------------------------------------------------------
# im2col and its adjoint


def _im2col(
    xp: Any, xpad: Array, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair
) -> Array:
    """Gather the KH*KW strided slices of the padded input: (N, C*KH*KW, L).

    Row c*KH*KW + u*KW + v holds xpad[n, c, s_h·i + d_h·u, s_w·j + d_w·v] over
    the output positions (i, j), matching weight.reshape(O, C/G*KH*KW) per group.
    """
    N, C = xpad.shape[0], xpad.shape[1]
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    patches = [
        xpad[:, :, window(u * dh, sh, ho), window(v * dw, sw, wo)]
        for u in range(kh)
        for v in range(kw)
    ]
    cols = xp.stack(patches, axis=2)  # (N, C, KH*KW, Ho, Wo)
    return xp.reshape(cols, (N, C * kh * kw, ho * wo))  # (N, C*KH*KW, L)


def _col2im(
    xp: Any,
    dcols: Array,
    padded: Shape,
    kernel: Pair,
    stride: Pair,
    dilation: Pair,
    out_hw: Pair,
) -> Array:
    """Adjoint of _im2col: scatter-add each kernel offset's slice into zeros."""
    N, C = padded[0], padded[1]
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    d5 = xp.reshape(dcols, (N, C, kh * kw, ho, wo))  # (N, C, KH*KW, Ho, Wo)
    dxpad = zeros_like_shape(dcols, padded)  # (N, C, Hp, Wp)
    for u in range(kh):
        for v in range(kw):
            index = (
                slice(None),
                slice(None),
                window(u * dh, sh, ho),
                window(v * dw, sw, wo),
            )
            accumulate(dxpad, index, d5[:, :, u * kw + v, :, :])
    return dxpad


# ---------------------------------------------------------------------------
# validation


def _conv2d_out_hw(
    hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Pair:
    out = []
    for axis, n, k, s, p, d in zip("HW", hw, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1  # extent of the dilated kernel
        if n + 2 * p < span:
            raise ValueError(
                f"x: padded input size {axis} + 2*padding = {n} + 2*{p} = "
                f"{n + 2 * p} is smaller than the dilated kernel extent "
                f"dilation*(K - 1) + 1 = {span}: no output positions "
                f"(kernel {kernel}, dilation {dilation}, padding {padding})"
            )
        out.append((n + 2 * p - span) // s + 1)
    return out[0], out[1]


def _check_groups(groups: Any) -> int:
    groups = as_int("groups", groups, "a positive int")
    if groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups}")
    return groups


def _check_channels(x: Array, weight: Array, groups: int, layout: str) -> None:
    C, Cout = x.shape[1], weight.shape[0]
    if C % groups:
        raise ValueError(
            f"groups: expected a divisor of the input channels C = x.shape[1] = {C}, "
            f"got groups={groups}"
        )
    if Cout % groups:
        raise ValueError(
            f"groups: expected a divisor of the output channels "
            f"O = weight.shape[0] = {Cout}, got groups={groups}"
        )
    if weight.shape[1] * groups != C:
        raise ValueError(
            f"weight: expected shape {layout} with C/groups = {C}/{groups} = "
            f"{C // groups} for x with C = {C}, got shape {tuple(weight.shape)}"
        )


def _check_bias(bias: Array | None, weight: Array) -> None:
    if bias is None:
        return
    check_array("bias", bias)
    Cout = weight.shape[0]
    if tuple(bias.shape) != (Cout,):
        raise ValueError(
            f"bias: expected shape (O,) = ({Cout},) for weight with O = {Cout}, "
            f"got shape {tuple(bias.shape)}"
        )


def _check_finite_args(x: Array, weight: Array, bias: Array | None) -> None:
    check_finite("x", x)
    check_finite("weight", weight)
    if bias is not None:
        check_finite("bias", bias)


def _check_conv2d_args(
    x: Array,
    weight: Array,
    bias: Array | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
) -> tuple[Pair, Pair, Pair, int]:
    check_array("x", x)
    check_array("weight", weight)
    if x.ndim != 4:
        raise ValueError(
            f"x: expected a 4-D array (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if weight.ndim != 4:
        raise ValueError(
            f"weight: expected a 4-D array (O, C/groups, KH, KW), "
            f"got shape {tuple(weight.shape)}"
        )
    _check_bias(bias, weight)
    check_same_dtype(x=x, weight=weight, bias=bias)
    stride_ = as_tuple("stride", stride, 2, minimum=1)
    padding_ = as_tuple("padding", padding, 2, minimum=0)
    dilation_ = as_tuple("dilation", dilation, 2, minimum=1)
    groups = _check_groups(groups)
    _check_channels(x, weight, groups, "(O, C/groups, KH, KW)")
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(
            f"weight: expected a kernel of at least 1x1, got shape "
            f"{tuple(weight.shape)}"
        )
    return (
        (stride_[0], stride_[1]),
        (padding_[0], padding_[1]),
        (dilation_[0], dilation_[1]),
        groups,
    )


def _check_pointwise_args(
    x: Array, weight: Array, bias: Array | None, groups: Any
) -> int:
    check_array("x", x)
    check_array("weight", weight)
    if not 2 <= x.ndim <= 5:
        raise ValueError(
            f"x: expected a 2-D to 5-D array (N, C, *S) with 0 to 3 spatial axes, "
            f"got shape {tuple(x.shape)}"
        )
    rank = x.ndim - 2
    ones = (1,) * rank
    layout = "(O, C/groups)" + (
        f" or (O, C/groups, {', '.join('1' * rank)})" if rank else ""
    )
    if weight.ndim not in (2, 2 + rank) or tuple(weight.shape[2:]) not in ((), ones):
        raise ValueError(
            f"weight: expected shape {layout} for a {x.ndim}-D x, "
            f"got shape {tuple(weight.shape)}"
        )
    _check_bias(bias, weight)
    check_same_dtype(x=x, weight=weight, bias=bias)
    groups = _check_groups(groups)
    _check_channels(x, weight, groups, layout)
    return groups


def _check_dout(dout: Array, weight: Array, want: Shape) -> None:
    """Validate dout against the forward's output shape and weight's dtype."""
    check_array("dout", dout)
    if tuple(dout.shape) != tuple(want):
        raise ValueError(
            f"dout: expected the forward's output shape {tuple(want)}, "
            f"got {tuple(dout.shape)}"
        )
    check_same_dtype(dout=dout, weight=weight)

