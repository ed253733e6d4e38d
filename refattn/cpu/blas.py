"""NumPy's own BLAS, for the one product ``np.matmul`` cannot make: C += A·B.

``np.matmul`` always writes its product into fresh memory, so a sum of
products costs one more pass over the output per term: a k x k convolution
as shifted products (``refattn.ops.conv._conv2d_shifted``) adds each of its
KH·KW products into the sum, and its backward adds each tap's share into
the input gradient.  A BLAS GEMM computes C ← α A·B + β C; with β = 1 it
adds the product as it writes it, and the extra pass and the product's
temporary are gone.

``add_product_into(c, a, b)`` calls the GEMM of the BLAS that NumPy itself
uses, through ctypes, so that it shares NumPy's thread pool.  A second BLAS
(SciPy's wheels bundle their own OpenBLAS) brings a second pool, whose
threads are still spinning when NumPy's next product starts: on 2 cores,
a 3x3 convolution's nine products through SciPy's GEMM followed by one
``np.matmul`` took 24.0 ms at float32, against 9.9 ms all through NumPy
(docs/cpu-kernels.md, "Sums of products").  The override is part of the
tier, registered with its kernels, though it needs no numba itself.

``gemm()`` finds it only where the interface is unambiguous: NumPy's wheels
bundle OpenBLAS as ``libscipy_openblas64_``, whose CBLAS functions
``scipy_cblas_{s,d}gemm64_`` take 64-bit integers.  A first call checks the
function on small exact products (a transposed operand, a leading dimension
wider than the rows, β = 1); a build that is not found or fails the check
gives None, and the NumPy formulas run (NumPy with Accelerate, MKL or a
system BLAS).

Accuracy: OpenBLAS adds α·(A·B) to C one block of the contraction at a
time (a few hundred terms), each block's sum in the order of the β = 0
call that ``np.matmul`` makes.  Measured on the AMD EPYC host: with one
block (K = 64 and 96 in the convolutions' products) the result is the
product written and then added, bit for bit; a longer K regroups the sum
(float64 from K = 300 on), and a product with one row or one column (which
NumPy makes as a matrix-vector product) sums in another order.  The tier
claims its tolerance, ``kernel_ops.TOLERANCE``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["add_product_into", "applies", "gemm", "library_path", "product_into"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOLS = {np.dtype(np.float32): "scipy_cblas_sgemm64_",
            np.dtype(np.float64): "scipy_cblas_dgemm64_"}
_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}

Gemm = dict[np.dtype, Callable[..., None]]

_found: Gemm | None = None
_looked = False
_lock = threading.Lock()


def library_path() -> str | None:
    """The bundled OpenBLAS of this NumPy (``numpy.libs`` on Linux and
    Windows, ``numpy/.dylibs`` on macOS), or None."""
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (KeyError, TypeError, ValueError):  # a NumPy that does not say
        return None
    if config.get("name") != "scipy-openblas" or "USE64BITINT" not in str(
        config.get("openblas configuration", "")
    ):
        return None
    package = os.path.dirname(np.__file__)
    for folder in (os.path.join(package, os.pardir, "numpy.libs"),
                   os.path.join(package, ".dylibs")):
        hits = sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*")))
        if hits:
            return os.path.abspath(hits[0])
    return None


def _bind(path: str) -> Gemm:
    library = ctypes.CDLL(path)  # already loaded by NumPy: the same instance
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    found: Gemm = {}
    for dtype, symbol in _SYMBOLS.items():
        f = getattr(library, symbol)
        f.restype = None
        scalar = _CTYPES[dtype]
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64,
                      scalar, ptr, i64, ptr, i64, scalar, ptr, i64]
        found[dtype] = f
    return found


def _passes_check(found: Gemm) -> bool:
    """Small integer products, exact in either dtype: c (3, 5) inside a wider
    buffer, a (3, 4) given transposed, b (4, 5) row-major; c + a·b must be
    exactly NumPy's."""
    for dtype in found:
        buf = np.arange(24, dtype=dtype).reshape(3, 8) - 7
        c = buf[:, 2:7]  # (3, 5), leading dimension 8
        a = (np.arange(12, dtype=dtype).reshape(4, 3) % 5 - 2).T  # (3, 4), column-major
        b = np.arange(20, dtype=dtype).reshape(4, 5) % 7 - 3  # (4, 5)
        want = c + a @ b
        before = buf.copy()
        _call(found, c, a, b)
        outside = np.ones(buf.shape, dtype=bool)
        outside[:, 2:7] = False
        if not (np.array_equal(c, want) and np.array_equal(buf[outside], before[outside])):
            return False
    return True


def gemm() -> Gemm | None:
    """dtype -> NumPy's CBLAS ``?gemm``, found and checked once; None where
    it is not found or fails the check."""
    global _found, _looked
    if not _looked:
        with _lock:
            if not _looked:
                path = library_path()
                found = None
                if path is not None:
                    try:
                        found = _bind(path)
                    except (OSError, AttributeError):
                        found = None
                _found = found if found and _passes_check(found) else None
                _looked = True
    return _found


def _layout(a: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a 2-D operand BLAS reads in
    place: rows or columns of unit stride, the other stride at least their
    length; None otherwise."""
    it = a.itemsize
    s0, s1 = a.strides
    m, n = a.shape
    if s1 == it and s0 % it == 0 and s0 // it >= max(n, 1):
        return _NO_TRANS, s0 // it
    if s0 == it and s1 % it == 0 and s1 // it >= max(m, 1):
        return _TRANS, s1 // it
    return None


def applies(c: Any, a: Any, b: Any) -> bool:
    """Plain 2-D float32/float64 ndarrays of one dtype, (M, N) += (M, K)·(K, N)
    with M, N, K >= 1; c writeable, row-major (unit stride along a row, rows
    at least N apart) and sharing no memory with a or b.  a and b may have
    any strides (a copy is made of an operand BLAS cannot read in place)."""
    if not (type(c) is np.ndarray and type(a) is np.ndarray and type(b) is np.ndarray):
        return False
    if c.dtype not in _SYMBOLS or a.dtype != c.dtype or b.dtype != c.dtype:
        return False
    if c.ndim != 2 or a.ndim != 2 or b.ndim != 2:
        return False
    (m, n), (ma, k), (kb, nb) = c.shape, a.shape, b.shape
    if ma != m or nb != n or kb != k or min(m, n, k) < 1:
        return False
    layout = _layout(c)
    if layout is None or layout[0] != _NO_TRANS:
        return False
    if not (c.flags.writeable and c.flags.aligned):
        return False
    return not (np.may_share_memory(c, a) or np.may_share_memory(c, b))


def _call(found: Gemm, c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    layouts = []
    for operand in (a, b):
        layout = _layout(operand)
        if layout is None or not operand.flags.aligned:
            operand = np.ascontiguousarray(operand)
            layout = _layout(operand)
        layouts.append((operand, layout))
    (a, (ta, lda)), (b, (tb, ldb)) = layouts
    m, n = c.shape
    k = a.shape[1]
    found[c.dtype](_ROW_MAJOR, ta, tb, m, n, k, 1.0, a.ctypes.data, lda,
                   b.ctypes.data, ldb, 1.0, c.ctypes.data, c.strides[0] // c.itemsize)


def add_product_into(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """c ← c + a·b in place, one GEMM with β = 1; returns c.  The arguments
    satisfy ``applies`` and ``gemm()`` is not None."""
    found = gemm()
    assert found is not None, "add_product_into without NumPy's BLAS"
    _call(found, c, a, b)
    return c


def product_into(buf: np.ndarray, r0: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a·b written straight into the rows r0 : r0 + M of buf; returns buf.

    The β = 0 counterpart of ``add_product_into`` needs no ctypes:
    ``np.matmul(a, b, out=rows)`` hands the rows' memory to the same GEMM,
    with buf's row stride as its leading dimension, so that the product
    skips the fresh array and its copy.  Formed as ``backend.matmul`` forms
    it (a contraction of length 1 as a broadcast multiply), so the bits are
    the generic formula's.  The caller checks ``kernel_ops.into_applies``.
    """
    _write(buf[..., r0 : r0 + a.shape[-2], :], a, b)
    return buf


def _write(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[-1] == 1:
        np.multiply(a, b, out=c)
    else:
        np.matmul(a, b, out=c)
