"""The CPU kernels: one multi-threaded pass per step, compiled by numba.

Every kernel is ``numba.njit(parallel=True, cache=True)`` over C-contiguous
float32 or float64 arrays, split into independent rows by ``prange`` (the
threads of numba's pool, one per core).  Sums are accumulated in float64
for either dtype and rounded once at the end; element-wise formulas use
the data's dtype in the order the NumPy ops write them, so an output that
involves no sum and no ``exp`` is the same bits as the NumPy path's.

Layouts (the wrappers of ``refattn.cpu.kernel_ops`` reshape to them):

- rows ``(R, L)``: R independent rows of L contiguous values;
- planes ``(N, C, L)``: C channels of L positions per sample;
- images ``(N, C, H, W)`` of any strides (the max-pool kernels), or
  C-contiguous (the small convolution).

This module imports numba at import time; ``refattn.cpu.kernel_ops``
imports it only when numba is installed.
"""

from __future__ import annotations

import math
import os
from decimal import Context, Decimal

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

if "NUMBA_THREADING_LAYER" not in os.environ:
    # TBB when its wheel is installed (the cpu extra brings it where one
    # exists), else the workqueue; never OpenMP, which numba would take
    # before the workqueue.  Measured on 2 cores (docs/cpu-kernels.md, "The
    # threading layer"): a launch costs 4 us on TBB (25 us right after a
    # GEMM) and about 100 us on the workqueue, whose workers sleep between
    # loops; GNU OpenMP's workers spin after each loop against OpenBLAS's,
    # so a launch right after a GEMM costs 3.6 ms, and a forked child that
    # launches one is terminated.
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]
    numba.config.THREADING_LAYER = "default"

__all__ = [
    "add_channel",
    "add_outer_products",
    "add_spatial",
    "channel_pool_max_mean",
    "exp_nonpositive",
    "gate_channel_backward",
    "gate_channel_forward",
    "gate_spatial_backward",
    "gate_spatial_forward",
    "group_mean_var",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "norm_apply",
    "norm_backward_apply",
    "norm_row_sums",
    "relu_backward_flat",
    "relu_flat",
    "row_max_arg",
    "small_conv_backward",
    "small_conv_forward",
    "softmax_backward_rows",
    "softmax_rows",
]

_jit = numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
# For kernels whose only multi-term arithmetic is a float64 sum: "reassoc"
# lets LLVM split the sum into SIMD lanes (a 4x faster reduction at
# (2048, 784) float32; softmax's backward at (4, 784, 196) float32: 2.98 ->
# 2.34 ms forward + backward); the order of a float64 sum moves its result by
# far less than the tier's tolerance, and a regrouped product inside a summed
# term (the norms' dout ⊙ x̂) by an ulp of that term at most.
_jit_sum = numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)


# ---------------------------------------------------------------------------
# exp(v) for v <= 0 in the data's dtype, in a form LLVM vectorises
#
# numba's math.exp is a call into libm per element, which LLVM cannot turn
# into SIMD code (the PyPI llvmlite has no vector math library).  Written as
# arithmetic, exp vectorises:
#
#     v = k ln2 + r,  k = round(v / ln2),  |r| <= ln2 / 2
#     e^r = Σ_{n=0..Q} r^n / n!   (Q = 7 for float32, 13 for float64: the
#                                  first term left out is below 0.1 ulp)
#     e^v = (e^r · 2^(k+B)) · 2^(−B)
#
# ln2 is split in two (ln2 = hi + lo, hi with few significant bits) so that
# k·hi is exact.  2^(k+B) is built from its bits; the bias B (64 | 512)
# keeps it a normal number down to the smallest subnormal result, so that
# the last product rounds once, into the subnormals where it must.  Below
# v = −104 (float32) or −746 (float64) e^v rounds to 0; a NaN stays NaN.
# Measured over [−750, 0] (tests/cpu): 1.15 ulp at most in float32 (NumPy's
# own float32 exp: 2.35 ulp), 1.16 ulp in float64 (NumPy's: 0.72).
# _exp32 and _exp64 are compiled on their own with fastmath off and not
# inlined by numba, so that a caller's `reassoc` cannot regroup the range
# reduction (LLVM still inlines them, keeping each instruction's flags).


@intrinsic
def _float_from_bits(typingctx, bits):  # pragma: no cover - compiled
    """The float whose IEEE 754 bit pattern is `bits`: int32 -> float32,
    int64 -> float64."""
    if bits == types.int32:
        sig, llvm_type = types.float32(types.int32), ir.FloatType()
    elif bits == types.int64:
        sig, llvm_type = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return sig, codegen


def _ln2_split(bits: int) -> tuple[float, float]:
    """ln2 = hi + lo: hi is ln2 cut to `bits` significant bits, so that k·hi
    is exact in a dtype of p bits while k has at most p − `bits` of them; lo
    is the rest, from ln2 to 60 digits."""
    ln2 = Decimal(2).ln(Context(prec=60))
    mant, exp2 = math.frexp(float(ln2))
    hi = math.ldexp(math.floor(math.ldexp(mant, bits)), exp2 - bits)
    return hi, float(ln2 - Decimal(hi))


# float32: k >= −150 (8 bits), so hi keeps 16 of float32's 24 bits.  The
# constants are NumPy float32 scalars, which numba compiles as float32.
_F32 = np.float32
_F32_LN2_HI, _F32_LN2_LO = (_F32(c) for c in _ln2_split(16))
_F32_LOG2E, _F32_LOWEST, _F32_HALF = _F32(1 / math.log(2)), _F32(-104.0), _F32(0.5)
_F32_BIAS = 64
_F32_UNBIAS = _F32(2.0**-_F32_BIAS)
_F32_C0, _F32_C1, _F32_C2, _F32_C3, _F32_C4, _F32_C5, _F32_C6, _F32_C7 = (
    _F32(1 / math.factorial(n)) for n in range(8))

# float64: k >= −1075 (11 bits), hi keeps 32 bits.
_F64_LN2_HI, _F64_LN2_LO = _ln2_split(32)
_F64_LOG2E, _F64_LOWEST = 1 / math.log(2), -746.0
_F64_BIAS = 512
_F64_UNBIAS = 2.0**-_F64_BIAS
(_F64_C0, _F64_C1, _F64_C2, _F64_C3, _F64_C4, _F64_C5, _F64_C6, _F64_C7, _F64_C8,
 _F64_C9, _F64_C10, _F64_C11, _F64_C12, _F64_C13) = (
    1 / math.factorial(n) for n in range(14))


def _exp_nonpositive(v):  # pragma: no cover - replaced by the overload
    """e^v for v <= 0 (or NaN), in v's dtype; compiled code only."""
    raise NotImplementedError("compiled by numba only")


@numba.njit(fastmath=False)
def _exp32(v):  # pragma: no cover - compiled
    x = max(v, _F32_LOWEST)
    k = np.floor(x * _F32_LOG2E + _F32_HALF)  # float32
    r = (x - k * _F32_LN2_HI) - k * _F32_LN2_LO
    p = _F32_C7 * r + _F32_C6
    p = p * r + _F32_C5
    p = p * r + _F32_C4
    p = p * r + _F32_C3
    p = p * r + _F32_C2
    p = p * r + _F32_C1
    p = p * r + _F32_C0
    bits = numba.int32(numba.int32(k) + numba.int32(127 + _F32_BIAS))
    two_k = _float_from_bits(numba.int32(bits << numba.int32(23)))  # 2^(k+B)
    e = (p * two_k) * _F32_UNBIAS
    return e if v == v else v


@numba.njit(fastmath=False)
def _exp64(v):  # pragma: no cover - compiled
    x = max(v, _F64_LOWEST)
    k = np.floor(x * _F64_LOG2E + 0.5)  # float64
    r = (x - k * _F64_LN2_HI) - k * _F64_LN2_LO
    p = _F64_C13 * r + _F64_C12
    p = p * r + _F64_C11
    p = p * r + _F64_C10
    p = p * r + _F64_C9
    p = p * r + _F64_C8
    p = p * r + _F64_C7
    p = p * r + _F64_C6
    p = p * r + _F64_C5
    p = p * r + _F64_C4
    p = p * r + _F64_C3
    p = p * r + _F64_C2
    p = p * r + _F64_C1
    p = p * r + _F64_C0
    bits = numba.int64(numba.int64(k) + (1023 + _F64_BIAS))
    two_k = _float_from_bits(numba.int64(bits << 52))  # 2^(k+B)
    e = (p * two_k) * _F64_UNBIAS
    return e if v == v else v


@overload(_exp_nonpositive, inline="always")
def _exp_nonpositive_typed(v):  # pragma: no cover - compiled
    if v == types.float32:
        return lambda v: _exp32(v)
    if v == types.float64:
        return lambda v: _exp64(v)
    return None


@numba.njit(inline="always")
def _row_max(v):  # pragma: no cover - compiled
    """max of a 1-D array, in eight independent lanes so that LLVM vectorises
    it (a single running max is a chain of compares: 0.20 instead of 0.06 ms
    for the rows of (3136, 196) float32).  A NaN may or may not win; the
    softmax's output is NaN on such a row either way."""
    n = v.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = v[0]
    for j in range(0, n - n % 8, 8):
        m0 = v[j] if v[j] > m0 else m0
        m1 = v[j + 1] if v[j + 1] > m1 else m1
        m2 = v[j + 2] if v[j + 2] > m2 else m2
        m3 = v[j + 3] if v[j + 3] > m3 else m3
        m4 = v[j + 4] if v[j + 4] > m4 else m4
        m5 = v[j + 5] if v[j + 5] > m5 else m5
        m6 = v[j + 6] if v[j + 6] > m6 else m6
        m7 = v[j + 7] if v[j + 7] > m7 else m7
    for j in range(n - n % 8, n):
        m0 = v[j] if v[j] > m0 else m0
    m0 = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    return m0


@numba.njit(cache=True, fastmath=False, nogil=True)
def exp_nonpositive(v, out):  # pragma: no cover - compiled
    """out = e^v element by element, v <= 0 (the tests' handle on the scalar
    exp; one thread)."""
    for i in range(v.shape[0]):
        out[i] = _exp_nonpositive(v[i])


# ---------------------------------------------------------------------------
# softmax along the last axis of (R, L)


@_jit_sum
def softmax_rows(x, y):  # pragma: no cover - compiled
    """y[r] = exp(x[r] − max x[r]) / Σ exp(x[r] − max x[r]), scaled by the
    float64 reciprocal of the sum."""
    R, L = x.shape
    for r in numba.prange(R):
        m = _row_max(x[r])
        for j in range(L):
            y[r, j] = _exp_nonpositive(x[r, j] - m)
        total = 0.0
        for j in range(L):
            total += y[r, j]
        inv = 1.0 / total
        for j in range(L):
            y[r, j] = y[r, j] * inv


@_jit_sum
def softmax_backward_rows(dout, y, dx):  # pragma: no cover - compiled
    """dx[r] = (dout[r] − Σ dout[r] ⊙ y[r]) ⊙ y[r]."""
    R, L = y.shape
    for r in numba.prange(R):
        total = 0.0
        for j in range(L):
            total += dout[r, j] * y[r, j]
        for j in range(L):
            dx[r, j] = (dout[r, j] - total) * y[r, j]


# ---------------------------------------------------------------------------
# the norms: statistics, normalise-and-affine, and the backward's two passes
#
# x̂ = (x − mean) · inv_std is never stored: the forward writes y only, and
# the backward recomputes x̂ from x where it reads it, with the same
# arithmetic: dx has the bits it would have with a stored x̂, and the
# reassociating row sums may move a term of Σ dout ⊙ x̂ by an ulp.  Row r
# of the (R, L) rows belongs to statistics group k = (r // per) % len(mean)
# and to channel c = r % len(γ).


@_jit_sum
def group_mean_var(x, mean, var):  # pragma: no cover - compiled
    """For each b, the mean and the biased variance of x[:, b, :] (A, B, L):
    mean = Σ x / n rounded to x's dtype, then var = Σ (x − mean)² / n with
    the difference in x's dtype (as NumPy's x − mean); both sums in float64.
    The second pass reads the group while the first has left it in cache."""
    A, B, L = x.shape
    n = A * L
    for b in numba.prange(B):
        t = 0.0
        for a in range(A):
            for j in range(L):
                t += x[a, b, j]
        mean[b] = t / n
        m = mean[b]  # rounded to x's dtype
        q = 0.0
        for a in range(A):
            for j in range(L):
                d = x[a, b, j] - m
                q += float(d) * float(d)
        var[b] = q / n


@_jit
def norm_apply(x, mean, inv_std, per, gamma, beta, y):  # pragma: no cover
    """y = x̂ · γ[c] + β[c], x̂ = (x − mean[k]) · inv_std[k] (empty γ: no
    scale; empty β: no shift; both empty: y = x̂)."""
    R, L = x.shape
    G = mean.shape[0]
    C = gamma.shape[0]
    Cb = beta.shape[0]
    for r in numba.prange(R):
        k = (r // per) % G
        m = mean[k]
        s = inv_std[k]
        if C > 0 and Cb > 0:
            g = gamma[r % C]
            b = beta[r % Cb]
            for j in range(L):
                y[r, j] = ((x[r, j] - m) * s) * g + b
        elif C > 0:
            g = gamma[r % C]
            for j in range(L):
                y[r, j] = ((x[r, j] - m) * s) * g
        elif Cb > 0:
            b = beta[r % Cb]
            for j in range(L):
                y[r, j] = ((x[r, j] - m) * s) + b
        else:
            for j in range(L):
                y[r, j] = (x[r, j] - m) * s


@_jit_sum
def norm_row_sums(dout, x, mean, inv_std, per, s_d, s_dxhat):  # pragma: no cover
    """s_d[r] = Σ dout[r];  s_dxhat[r] = Σ dout[r] ⊙ x̂[r]  (float64)."""
    R, L = x.shape
    G = mean.shape[0]
    for r in numba.prange(R):
        k = (r // per) % G
        m = mean[k]
        s = inv_std[k]
        t = 0.0
        tx = 0.0
        for j in range(L):
            v = dout[r, j]
            t += v
            tx += v * ((x[r, j] - m) * s)
        s_d[r] = t
        s_dxhat[r] = tx


@_jit
def norm_backward_apply(dout, x, mean, inv_std, per, a, b, c, dx):  # pragma: no cover
    """dx[r] = dout[r] · a[r] − x̂[r] · b[r] − c[r]  (c may be empty: no term)."""
    R, L = x.shape
    G = mean.shape[0]
    has_c = c.shape[0] == R
    for r in numba.prange(R):
        k = (r // per) % G
        m = mean[k]
        s = inv_std[k]
        ar = a[r]
        br = b[r]
        if has_c:
            cr = c[r]
            for j in range(L):
                dx[r, j] = dout[r, j] * ar - ((x[r, j] - m) * s) * br - cr
        else:
            for j in range(L):
                dx[r, j] = dout[r, j] * ar - ((x[r, j] - m) * s) * br


# ---------------------------------------------------------------------------
# gates: x ⊙ s with s broadcast over positions or channels, and its backward


@_jit
def gate_channel_forward(x, s, y):  # pragma: no cover - compiled
    """Rows (R, L), one gate value per row: y = x · s[r] (NumPy's bits)."""
    R, L = x.shape
    for r in numba.prange(R):
        g = s[r]
        for j in range(L):
            y[r, j] = x[r, j] * g


@_jit
def gate_spatial_forward(x, s, y):  # pragma: no cover - compiled
    """Planes (N, C, L), one gate value per (n, position): y = x · s[n]."""
    N, C, L = x.shape
    for r in numba.prange(N * C):
        n = r // C
        for j in range(L):
            y[n, r - n * C, j] = x[n, r - n * C, j] * s[n, j]


@_jit_sum
def gate_channel_backward(dout, x, s, dx, ds):  # pragma: no cover - compiled
    """Rows (R, L), one gate value per row: dx = dout · s[r], ds[r] = Σ dout ⊙ x."""
    R, L = x.shape
    for r in numba.prange(R):
        g = s[r]
        t = 0.0
        for j in range(L):
            d = dout[r, j]
            dx[r, j] = d * g
            t += d * x[r, j]
        ds[r] = t


@_jit_sum
def gate_spatial_backward(dout, x, s, dx, ds):  # pragma: no cover - compiled
    """Planes (N, C, L), one gate value per (n, position): dx = dout · s[n],
    ds[n, p] = Σ_c dout ⊙ x (float64)."""
    N, C, L = x.shape
    for n in numba.prange(N):
        for j in range(L):
            ds[n, j] = 0.0
        for c in range(C):
            for j in range(L):
                d = dout[n, c, j]
                dx[n, c, j] = d * s[n, j]
                ds[n, j] += d * x[n, c, j]


# ---------------------------------------------------------------------------
# ReLU, a + b broadcast per row or per position, the rank-2 update


@_jit
def relu_flat(x, y):  # pragma: no cover - compiled
    """Flat (M,): y = max(x, 0) with NumPy's ``maximum(x, 0.0)`` bits: NaN
    is passed through, -0.0 becomes +0.0."""
    zero = x.dtype.type(0.0)
    for j in numba.prange(x.shape[0]):
        v = x[j]
        y[j] = v if (v > zero or v != v) else zero


@_jit
def relu_backward_flat(dout, y, dx):  # pragma: no cover - compiled
    """Flat (M,): dx = dout · 1[y > 0], the mask as 1 / 0 in the data's
    dtype (NumPy's product, signed zeros and NaN included)."""
    one, zero = y.dtype.type(1.0), y.dtype.type(0.0)
    for j in numba.prange(y.shape[0]):
        dx[j] = dout[j] * (one if y[j] > zero else zero)


@_jit
def add_channel(a, b, out):  # pragma: no cover - compiled
    """Rows (R, L), one value per row: out = a + b[r] (NumPy's bits)."""
    R, L = a.shape
    for r in numba.prange(R):
        t = b[r]
        for j in range(L):
            out[r, j] = a[r, j] + t


@_jit
def add_spatial(a, b, out):  # pragma: no cover - compiled
    """Planes (N, C, L), one value per (n, position): out = a + b[n] (NumPy's bits)."""
    N, C, L = a.shape
    for r in numba.prange(N * C):
        n = r // C
        for j in range(L):
            out[n, r - n * C, j] = a[n, r - n * C, j] + b[n, j]


@_jit
def add_outer_products(base, u1, v1, u2, v2, out):  # pragma: no cover - compiled
    """Planes (N, n, m): out = base + (u1[b, i] v1[b, j] + u2[b', i] v2[b, j]),
    b' = b when u2 has N rows, else 0; the NumPy passes' order, so their bits."""
    N, n, m = base.shape
    shared = u2.shape[0] == 1
    for r in numba.prange(N * n):
        b = r // n
        i = r - b * n
        a1 = u1[b, i]
        a2 = u2[0, i] if shared else u2[b, i]
        for j in range(m):
            out[b, i, j] = base[b, i, j] + (a1 * v1[b, j] + a2 * v2[b, j])


# ---------------------------------------------------------------------------
# pools


@numba.njit(inline="always")
def _max_step(a, j, m, k):  # pragma: no cover - compiled
    """One lane's step: (a, j) replaces (m, k) when a > m (the first of
    equal maxima stays), as two selects that LLVM vectorises."""
    g = a > m
    return (a if g else m), (j if g else k)


@numba.njit(inline="always")
def _max_arg(v):  # pragma: no cover - compiled
    """(max v, its first position), in eight independent lanes as _row_max
    (lane u sees positions u, u + 8, ...; the first of equal maxima wins in
    each lane, and across lanes the earliest position): the arg-max pool of
    (2048, 784) float32 takes 0.55 instead of 2.0 ms."""
    n = v.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = v[0]
    k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = 0
    for j in range(0, n - n % 8, 8):
        m0, k0 = _max_step(v[j], j, m0, k0)
        m1, k1 = _max_step(v[j + 1], j + 1, m1, k1)
        m2, k2 = _max_step(v[j + 2], j + 2, m2, k2)
        m3, k3 = _max_step(v[j + 3], j + 3, m3, k3)
        m4, k4 = _max_step(v[j + 4], j + 4, m4, k4)
        m5, k5 = _max_step(v[j + 5], j + 5, m5, k5)
        m6, k6 = _max_step(v[j + 6], j + 6, m6, k6)
        m7, k7 = _max_step(v[j + 7], j + 7, m7, k7)
    for j in range(n - n % 8, n):
        m0, k0 = _max_step(v[j], j, m0, k0)
    m, k = m0, k0
    for mu, ku in ((m1, k1), (m2, k2), (m3, k3), (m4, k4), (m5, k5), (m6, k6),
                   (m7, k7)):
        if mu > m or (mu == m and ku < k):
            m, k = mu, ku
    return m, k


@_jit
def row_max_arg(x, out, arg):  # pragma: no cover - compiled
    """out[r] = max x[r], arg[r] = its first position (a NaN counts only at
    position 0, as the comparisons skip it elsewhere; inputs are finite)."""
    R, L = x.shape
    for r in numba.prange(R):
        out[r], arg[r] = _max_arg(x[r])


@_jit
def channel_pool_max_mean(x, want_max, out, arg):  # pragma: no cover - compiled
    """Planes (N, C, L): the max over c (first arg-max into arg) or the mean."""
    N, C, L = x.shape
    for n in numba.prange(N):
        if want_max:
            for j in range(L):
                out[n, j] = x[n, 0, j]
                arg[n, j] = 0
            for c in range(1, C):
                for j in range(L):
                    v = x[n, c, j]
                    if v > out[n, j]:
                        out[n, j] = v
                        arg[n, j] = c
        else:
            acc = np.zeros(L, dtype=np.float64)
            for c in range(C):
                for j in range(L):
                    acc[j] += x[n, c, j]
            for j in range(L):
                out[n, j] = acc[j] / C


@_jit
def max_pool2d_forward(x, kh, kw, sh, sw, out, idx):  # pragma: no cover - compiled
    """(N, C, H, W), any strides (a channel slice of a larger array too) ->
    (N, C, Ho, Wo): window max and the row-major offset of its first arg-max."""
    C = x.shape[1]
    Ho, Wo = out.shape[2], out.shape[3]
    for q in numba.prange(x.shape[0] * C):
        n, c = q // C, q % C
        for i in range(Ho):
            for j in range(Wo):
                m = x[n, c, i * sh, j * sw]
                k = 0
                for a in range(kh):
                    for b in range(kw):
                        v = x[n, c, i * sh + a, j * sw + b]
                        if v > m:
                            m = v
                            k = a * kw + b
                out[n, c, i, j] = m
                idx[n, c, i, j] = k


@_jit
def max_pool2d_backward(dout, idx, kw, sh, sw, dx):  # pragma: no cover - compiled
    """dx (N, C, H, W), zeroed here, gets dout at each window's arg-max
    (summed where windows overlap; one plane per thread, so no two threads
    meet).  dout may have any strides."""
    C = dx.shape[1]
    Ho, Wo = dout.shape[2], dout.shape[3]
    for q in numba.prange(dx.shape[0] * C):
        n, c = q // C, q % C
        dx[n, c, :, :] = 0.0
        for i in range(Ho):
            for j in range(Wo):
                k = idx[n, c, i, j]
                dx[n, c, i * sh + k // kw, j * sw + k % kw] += dout[n, c, i, j]


# ---------------------------------------------------------------------------
# small k x k convolution, 'same' padding p = (k − 1)/2, stride 1


@_jit_sum
def small_conv_forward(x, w, b, has_bias, out):  # pragma: no cover - compiled
    """Images (N, C, H, W), weight (O, C, k, k): out[n, o, i, j] = b[o] +
    Σ_{c,u,v} w[o, c, u, v] · x[n, c, i + u − p, j + v − p] over the taps
    inside the image (float64 sums), one output plane per thread step, each
    tap a pass over the plane's rows."""
    N, C, H, W = x.shape
    O, k = w.shape[0], w.shape[2]
    p = (k - 1) // 2
    for q in numba.prange(N * O):
        n = q // O
        o = q % O
        acc = np.zeros((H, W))
        for c in range(C):
            for u in range(k):
                for v in range(k):
                    wt = np.float64(w[o, c, u, v])
                    for i in range(max(0, p - u), min(H, H + p - u)):
                        for j in range(max(0, p - v), min(W, W + p - v)):
                            acc[i, j] += wt * x[n, c, i + u - p, j + v - p]
        for i in range(H):
            for j in range(W):
                out[n, o, i, j] = acc[i, j] + b[o] if has_bias else acc[i, j]


@_jit_sum
def small_conv_backward(dout, x, w, dx, dw, db):  # pragma: no cover - compiled
    """VJP of small_conv_forward (float64 sums):
    dx[n, c, i + u − p, j + v − p] += w[o, c, u, v] · dout[n, o, i, j],
    dw[o, c, u, v] = Σ_{n,i,j} dout[n, o, i, j] · x[n, c, i + u − p, j + v − p],
    db[o] = Σ dout[:, o]; dx by input plane (no two threads meet), dw and db
    by tap."""
    N, C, H, W = x.shape
    O, k = w.shape[0], w.shape[2]
    p = (k - 1) // 2
    for q in numba.prange(N * C):
        n = q // C
        c = q % C
        acc = np.zeros((H, W))
        for o in range(O):
            for u in range(k):
                for v in range(k):
                    wt = np.float64(w[o, c, u, v])
                    for i in range(max(0, p - u), min(H, H + p - u)):
                        for j in range(max(0, p - v), min(W, W + p - v)):
                            acc[i + u - p, j + v - p] += wt * dout[n, o, i, j]
        for i in range(H):
            for j in range(W):
                dx[n, c, i, j] = acc[i, j]
    taps = O * C * k * k
    for tap in numba.prange(taps + O):
        t = 0.0
        if tap >= taps:  # the bias sums
            o = tap - taps
            for n in range(N):
                for i in range(H):
                    for j in range(W):
                        t += dout[n, o, i, j]
            db[o] = t
        else:
            o = tap // (C * k * k)
            c = (tap // (k * k)) % C
            u = (tap // k) % k
            v = tap % k
            for n in range(N):
                for i in range(max(0, p - u), min(H, H + p - u)):
                    for j in range(max(0, p - v), min(W, W + p - v)):
                        t += np.float64(dout[n, o, i, j]) * x[n, c, i + u - p, j + v - p]
            dw[o, c, u, v] = t
