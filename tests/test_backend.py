"""The backend's fast paths: each named function equals its plain formula on
NumPy (every route it may take) and on array_api_strict, for float32 and
float64, contiguous, strided, broadcast and empty arrays."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import backend
from refattn.backend import (
    add_along_axis,
    all_finite,
    matmul,
    mean_last_axis,
    route_along_axis,
    sum_product_to_shape,
    sum_to_shape,
)

DTYPES = ["float32", "float64"]
SCREEN_UP_TO = backend._ISFINITE_WITHOUT_SCREEN_UP_TO


class _Sub(np.ndarray):
    """An ndarray subclass: never taken for a plain NumPy array."""


def _layouts(xb: Any, host: np.ndarray) -> dict[str, Any]:
    """`host` on backend `xb` as a contiguous array, a strided view (every
    other element of the last axis), a transposed view and a broadcast view
    (the first row repeated along axis 0)."""
    full = xb.asarray(host)
    xp = xb.xp
    return {
        "contiguous": full,
        "strided": full[..., ::2],
        "transposed": xp.permute_dims(full, tuple(reversed(range(full.ndim)))),
        "broadcast": xp.broadcast_to(full[: min(1, host.shape[0]), ...], tuple(full.shape)),
    }


def _host(a: Any) -> np.ndarray:
    return backend.to_host(a)


def _within_rounding(got: Any, want: Any, scale: Any, terms: int, dtype: str) -> None:
    """|got − want| <= terms·eps·scale elementwise: the worst case of two
    summation orders over `terms` products whose magnitudes sum to `scale`."""
    g, w, s = _host(got), _host(want), _host(scale)
    assert g.shape == w.shape and g.dtype == w.dtype
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(g - w) <= max(terms, 64) * eps * s + np.finfo(dtype).tiny)


# ---------------------------------------------------------------------------
# the one NumPy test and the namespace shortcut


def test_plain_numpy_is_exactly_ndarray(xb) -> None:
    a = np.zeros((2, 3))
    assert backend._is_plain_numpy(a)
    assert not backend._is_plain_numpy(a.view(_Sub))
    assert not backend._is_plain_numpy(np.float64(1.0))
    assert not backend._is_plain_numpy([1.0])
    assert backend._is_plain_numpy(xb.asarray(a)) == (xb.name == "numpy")


def test_namespace_shortcut_finds_what_the_generic_walk_finds() -> None:
    a, b = np.zeros(3), np.ones((2, 2), np.float32)
    assert backend._all_plain_numpy((a, None, b))
    assert not backend._all_plain_numpy((None,))
    assert not backend._all_plain_numpy((a, a.view(_Sub)))
    assert backend.namespace(a, None, w=b) is array_api_compat.array_namespace(a, b)
    sub = backend.namespace(a.view(_Sub))  # the generic walk
    assert sub is array_api_compat.array_namespace(a)


def test_namespace_shortcut_does_not_hide_mixed_libraries() -> None:
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="different libraries"):
        backend.namespace(x=np.zeros(2), w=xs.zeros(2))


@pytest.mark.parametrize("dtype", [*DTYPES, "int64", "int32", "bool"])
def test_dtype_name_is_the_dtype_s_own_name(xb, dtype) -> None:
    host = np.zeros((2, 3), dtype=dtype)
    a = xb.asarray(host) if xb.name == "numpy" else xb.xp.asarray(host)
    for view in (a, a[:, ::2], host.view(_Sub) if xb.name == "numpy" else a):
        assert backend.dtype_name(view) == np.dtype(dtype).name
    if dtype in DTYPES:
        backend.check_array("a", a)
    else:
        with pytest.raises(TypeError, match=f"a: expected dtype float32 or float64, got {dtype}"):
            backend.check_array("a", a)


# ---------------------------------------------------------------------------
# all_finite


def _finite_cases(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    big = {"float32": 3e38, "float64": 1e300}[dtype]
    out = {
        f"n={n}": rng.standard_normal((n // 8, 8)).astype(dtype)
        for n in (8, SCREEN_UP_TO, SCREEN_UP_TO + 8, 8 * SCREEN_UP_TO)
    }
    out["empty"] = np.zeros((0, 8), dtype)
    out["overflowing screen"] = np.full((2 * SCREEN_UP_TO // 8, 8), big, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, -1])
def test_all_finite_is_all_of_isfinite(xb, dtype, bad, where) -> None:
    """Every route (small NumPy arrays, the Σ a² screen, the Σ a screen, the
    element-by-element fallback after an overflow) answers xp.all(isfinite)."""
    checked = 0
    for name, host in _finite_cases(dtype).items():
        if bad is not None and host.size:
            host = host.copy()
            host[where, where] = bad  # the last element also sits in the broadcast row
            host[0, -1] = bad  # ... and the first in every other view
        for layout, a in _layouts(xb, host).items():
            want = bool(xb.xp.all(xb.xp.isfinite(a)))
            with np.errstate(over="ignore", invalid="ignore"):
                assert all_finite(a) == want, (name, layout)
            checked += not want
    assert checked > 0 or bad is None


def test_all_finite_sees_a_nan_in_a_broadcast_view_s_only_row() -> None:
    """The screen reduces a broadcast view to its distinct elements: those
    must still hold the NaN."""
    row = np.ones((1, SCREEN_UP_TO + 1))
    row[0, -1] = np.nan
    view = np.broadcast_to(row, (4, SCREEN_UP_TO + 1))
    assert not all_finite(view)
    assert all_finite(np.broadcast_to(np.ones((1, SCREEN_UP_TO + 1)), view.shape))


def test_check_finite_counts_after_the_screen() -> None:
    a = np.ones((3, SCREEN_UP_TO))
    a[0, 0], a[2, -1] = np.nan, -np.inf
    with pytest.raises(backend.NonFiniteError, match=r"^a: .* got 2 NaN/Inf of 12288"):
        backend.check_finite("a", a)


# ---------------------------------------------------------------------------
# sum_product_to_shape


# (full shape, reduced shape, route on plain NumPy)
ROUTES = [
    ((8, 16, 7, 6), (8, 16, 1, 1), "rows"),  # channel gate
    ((8, 16, 7, 6), (8, 1, 1, 1), "rows"),
    ((5, 9), (1, 1), "rows"),  # everything into one row
    ((4, 9, 6), (4, 9, 1), "rows"),  # softmax over the last axis
    ((8, 16, 7, 6), (8, 1, 7, 6), "einsum"),  # spatial gate
    ((4, 9, 6), (4, 1, 6), "einsum"),  # softmax over a middle axis
    ((8, 16, 7, 6), (16, 1, 1), "einsum"),  # a dropped leading axis
    ((8, 16, 7, 6), (8, 16, 7, 6), "einsum"),  # nothing summed
    ((5000, 3), (1, 3), "plain"),  # past _EINSUM_MAX_TERMS per output
    ((3, 2, 5000), (1, 2, 1), "plain"),  # ... with a pairwise sum along the last axis
    ((3, 2, 0, 4), (3, 2, 1, 1), "rows"),
    ((0, 3, 4), (1, 3, 1), "einsum"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("full", "shape", "route"), ROUTES)
def test_sum_product_to_shape_is_sum_to_shape_of_the_product(xb, full, shape, route, dtype):
    rng = np.random.default_rng(2)
    host_a = rng.standard_normal(full).astype(dtype)
    host_b = rng.standard_normal(full).astype(dtype)
    terms = max(host_a.size, 1) // max(int(np.prod(shape)), 1)
    views_b = _layouts(xb, host_b)
    for layout, a in _layouts(xb, host_a).items():
        s = _reduced_like(layout, tuple(a.shape), full, shape)
        if s is None:
            continue
        b = views_b[layout]
        got = sum_product_to_shape(a, b, s)
        want = sum_to_shape(a * b, s)
        assert tuple(got.shape) == s and got.dtype == a.dtype, layout
        _within_rounding(got, want, sum_to_shape(xb.xp.abs(a * b), s), terms, dtype)


def _reduced_like(layout: str, view: tuple[int, ...], full: tuple[int, ...],
                  shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """`shape` (a reduction of `full`) carried over to a view of `full`:
    the last axis halved by the strided view, all axes reversed by the
    transposed one (None where dropped leading axes would become trailing)."""
    if layout == "strided":
        return shape[:-1] + (view[-1] if shape[-1] != 1 else 1,)
    if layout == "transposed":
        return tuple(reversed(shape)) if len(shape) == len(full) else None
    return shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("full", "shape", "route"), ROUTES)
def test_sum_product_to_shape_routes_are_the_documented_ones(full, shape, route, dtype):
    """Bit-equal to the route the docstring names: row dot products, one
    einsum, or the product then the pairwise sum."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal(full).astype(dtype)
    b = rng.standard_normal(full).astype(dtype)
    if route == "rows":
        k = backend._leading_rank(full, shape)
        rows = (int(np.prod(full[:k])), int(np.prod(full[k:])))
        want = np.reshape(np.vecdot(a.reshape(rows), b.reshape(rows)), shape)
    elif route == "einsum":
        lead = len(full) - len(shape)
        keep = [i for i in range(len(full)) if i >= lead and shape[i - lead] != 1]
        want = np.reshape(np.einsum(a, list(range(len(full))), b, list(range(len(full))),
                                    keep), shape)
    else:
        want = sum_to_shape(a * b, shape)
    np.testing.assert_array_equal(sum_product_to_shape(a, b, shape), want)


def test_sum_product_to_shape_other_namespaces_sum_the_product(xb) -> None:
    """Off plain NumPy, outside the rows route, exactly sum_to_shape(a ⊙ b)."""
    rng = np.random.default_rng(4)
    a, b = (xb.asarray(rng.standard_normal((6, 5, 4))) for _ in range(2))
    for shape in [(6, 1, 4), (1, 5, 1), (5, 4)]:
        got, want = sum_product_to_shape(a, b, shape), sum_to_shape(a * b, shape)
        if xb.name != "numpy":
            np.testing.assert_array_equal(_host(got), _host(want))


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.data(),
    st.sampled_from(DTYPES),
)
def test_sum_product_to_shape_property(full, data, dtype) -> None:
    """Any shape that broadcasts to `full`, leading axes dropped or not."""
    keep = data.draw(st.lists(st.booleans(), min_size=len(full), max_size=len(full)))
    shape = tuple(n if k else 1 for n, k in zip(full, keep))
    shape = shape[data.draw(st.integers(0, len(shape) - 1)):]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a, b = (rng.standard_normal(full).astype(dtype) for _ in range(2))
    got = sum_product_to_shape(a, b, shape)
    _within_rounding(got, sum_to_shape(a * b, shape), sum_to_shape(np.abs(a * b), shape),
                     a.size, dtype)


# ---------------------------------------------------------------------------
# mean_last_axis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("full", [(8, 16, 49), (2, 3, 1), (0, 4, 6), (1, 7)])
def test_mean_last_axis_is_the_mean(xb, full, dtype) -> None:
    """Bit-equal to a @ (1/L, ..., 1/L), and the mean to rounding."""
    host = np.random.default_rng(5).standard_normal(full).astype(dtype)
    xp = xb.xp
    for layout, a in _layouts(xb, host).items():
        length = int(a.shape[-1])
        if length == 0:
            with pytest.raises(ValueError, match="non-empty last axis"):
                mean_last_axis(a)
            continue
        got = mean_last_axis(a)
        w = xp.full((length,), 1.0 / length, dtype=a.dtype, device=backend.device(a))
        np.testing.assert_array_equal(_host(got), _host(xp.matmul(a, w)), err_msg=layout)
        mean = xp.mean(a, axis=-1)
        _within_rounding(got, mean, xp.mean(xp.abs(a), axis=-1), length + 1, dtype)


def test_mean_last_axis_refuses_an_empty_axis(xb) -> None:
    with pytest.raises(ValueError, match=r"a: expected a non-empty last axis, got shape \(3, 0\)"):
        mean_last_axis(xb.asarray(np.zeros((3, 0))))


# ---------------------------------------------------------------------------
# matmul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((8, 16, 1), (8, 1, 49)),  # an outer product per sample
        ((16, 1), (3, 1, 49)),  # a shared left factor, broadcast over the batch
        ((2, 1, 5, 1), (3, 1, 7)),  # batch axes broadcast on both sides
        ((1, 1), (1, 1)),
        ((8, 16, 3), (8, 3, 49)),  # k > 1: the GEMM
        ((4, 2), (2, 6)),
    ],
)
def test_matmul_is_xp_matmul_bit_for_bit(xb, a_shape, b_shape, dtype) -> None:
    """k = 1 takes the broadcast multiply: one product per element, so the
    same bits as the GEMM, shape and batch broadcasting included."""
    rng = np.random.default_rng(11)
    a = xb.asarray(rng.standard_normal(a_shape).astype(dtype))
    b = xb.asarray(rng.standard_normal(b_shape).astype(dtype))
    got, want = _host(matmul(xb.xp, a, b)), _host(xb.xp.matmul(a, b))
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_matmul_leaves_a_shape_mismatch_to_the_gemm() -> None:
    """(3, 1) x (3, 4) has no product; the broadcast multiply would silently
    give a (3, 4) array, so only a true k = 1 pair takes it."""
    with pytest.raises(ValueError):
        matmul(np, np.ones((3, 1)), np.ones((3, 4)))


# ---------------------------------------------------------------------------
# route_along_axis, add_along_axis


def _routed(xp: Any, values: Any, idx: Any, axis: int, size: int) -> Any:
    """The plain formula: out[..., j, ...] = values if j == idx else 0."""
    at = [1] * values.ndim
    at[axis] = size
    positions = xp.reshape(xp.arange(size, device=backend.device(idx)), tuple(at))
    return xp.where(positions == xp.astype(idx, xp.int64), values, xp.zeros_like(values))


def _route_case(xb, dtype: str, shape: tuple[int, ...], axis: int, idx_dtype: str):
    rng = np.random.default_rng(6)
    size = shape[axis]
    one = list(shape)
    one[axis] = 1
    idx = rng.integers(0, max(size, 1), size=one).astype(idx_dtype)
    values = rng.standard_normal(one).astype(dtype)
    return xb.asarray(values), xb.asarray(idx), size


ROUTE_SHAPES = [((4, 6, 5), 1), ((4, 6, 5), -1), ((4, 6, 5), 0), ((0, 6, 5), 1),
                ((3, 200, 2), 1)]


ROUTE_CASES = [(shape, axis, idx) for shape, axis in ROUTE_SHAPES
               for idx in ("int8", "int16", "int64")
               if not (idx == "int8" and shape[axis] > 127)]  # int8 indexes < 128


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis", "idx_dtype"), ROUTE_CASES)
def test_route_along_axis_is_compare_and_select(xb, shape, axis, idx_dtype, dtype) -> None:
    values, idx, size = _route_case(xb, dtype, shape, axis, idx_dtype)
    want = _routed(xb.xp, values, idx, axis, size)
    first = values[: min(1, values.shape[0]), ...]
    for v in (values, xb.xp.broadcast_to(first, tuple(values.shape))):
        got = route_along_axis(v, idx, axis, size)
        assert got.dtype == values.dtype and tuple(got.shape) == tuple(want.shape)
        np.testing.assert_array_equal(_host(got), _host(_routed(xb.xp, v, idx, axis, size)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), ROUTE_SHAPES)
def test_add_along_axis_adds_the_routed_values_in_place(xb, shape, axis, dtype) -> None:
    values, idx, size = _route_case(xb, dtype, shape, axis, "int16")
    total = xb.asarray(np.random.default_rng(7).standard_normal(shape).astype(dtype))
    want = total + _routed(xb.xp, values, idx, axis, size)
    got = add_along_axis(total, idx, values, axis)
    assert got is total
    np.testing.assert_array_equal(_host(got), _host(want))


def test_add_along_axis_writes_through_a_strided_buffer(xb) -> None:
    """The caller's buffer may be a view: the sum lands in its memory."""
    base = xb.asarray(np.zeros((4, 12, 5)))
    total = base[:, ::2, :]  # (4, 6, 5), strided along the routed axis
    values, idx, size = _route_case(xb, "float64", (4, 6, 5), 1, "int8")
    add_along_axis(total, idx, values, 1)
    np.testing.assert_array_equal(_host(base)[:, ::2, :],
                                  _host(_routed(xb.xp, values, idx, 1, size)))
    assert not np.any(_host(base)[:, 1::2, :])
