"""Kernel dispatch in the ops and blocks, checked on CuPy arrays.

Shared by tier 2 (test_dispatch.py: the NumPy-backed CuPy stand-in of
cupy_standin.py, its RawModule running the host shim) and tier 3
(test_gpu.py: real CuPy on a GPU).  Each test takes a fixture ``gpu``
(``Gpu``): the CuPy Array API namespace, and the kernel templates launched
through ``refattn.cuda._runner.CupyRunner`` (recorded by ``recording``).

What is checked:

* every wired op, called as a block calls it, launches exactly its kernels
  (forward and backward), returns a kernel cache, and matches NumPy; with
  ``use_kernels(False)`` it launches nothing, returns the generic cache and
  matches NumPy too (float32 and float64, awkward shapes: rows longer than
  a block, more rows than a small grid, size-1 axes);
* the cases a kernel does not cover stay generic (no launch);
* ``REFATTN_KERNELS=generic`` and ``set_kernels_enabled(False)`` switch every
  kernel off;
* the first CuPy array that reaches an override point registers every
  kernel of ``kernel_ops.OVERRIDES`` into ``refattn.ops.overrides``, once;
* every block preset, kernels on and off, float32 and float64, matches NumPy;
* golden cases generated with the CuPy backend (``generate_case(..., xp=)``
  and ``refattn golden --backend cupy``) match the NumPy ones within the
  tolerances of their manifests.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import refattn.cuda as rc
from refattn import backend
from refattn.blocks.registry import BLOCKS
from refattn.cuda import kernel_ops
from refattn.cuda._runner import CupyRunner
from refattn.golden.generate import MAX_REDRAWS, expand_requests, generate_case
from refattn.ops import conv, elementwise, linear, norm, overrides, pool, softmax

__all__ = [
    "test_block_presets_match_numpy",
    "test_bad_dout_raises_the_same_error_on_both_paths",
    "test_cbam_launches_every_kernel_of_its_gates",
    "test_cgnl_taylor_moments_take_their_kernel",
    "test_every_op_is_covered",
    "test_first_cupy_array_registers_the_kernels_once",
    "test_golden_case_with_the_cupy_backend_matches_numpy",
    "test_golden_cli_with_backend_cupy",
    "test_kernels_off_by_environment_or_api",
    "test_unwired_cases_stay_generic",
    "test_wired_op_takes_its_kernel_and_matches",
]

DTYPES = ("float32", "float64")


@dataclass
class Gpu:
    """CuPy (or its stand-in) as the tests see it."""

    name: str
    xp: Any  # array_api_compat.cupy
    launched: list[str] = field(default_factory=list)  # kernel templates

    def to_device(self, a: np.ndarray) -> Any:
        return backend.from_host(np.ascontiguousarray(a), self.xp)

    def to_host(self, a: Any) -> np.ndarray:
        return backend.to_host(a)


@contextlib.contextmanager
def recording(launched: list[str]) -> Iterator[list[str]]:
    """Record the template of every kernel CupyRunner launches (and launch it)."""
    original = CupyRunner.launch

    def launch(self: CupyRunner, base: str, dtype: Any, grid: int, args: Any) -> None:
        launched.append(base)
        original(self, base, dtype, grid, args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CupyRunner, "launch", launch)
        yield launched


def _tol(dtype: str) -> float:
    return 2e-5 if dtype == "float32" else 1e-10


def assert_close(actual: Any, desired: Any, dtype: str, what: str) -> None:
    """Element-wise, relative to the largest magnitude of `desired`."""
    if desired is None:
        assert actual is None, what
        return
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    assert a.shape == d.shape, (what, a.shape, d.shape)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    tol = _tol(dtype)
    np.testing.assert_allclose(
        a, d, rtol=tol, atol=tol * max(scale, 1e-30), err_msg=what
    )


# ---------------------------------------------------------------------------
# op cases


def _identity(out: Any) -> Any:
    return out


@dataclass(frozen=True)
class OpCase:
    """One op called as a block calls it.

    ``forward(a)`` takes the inputs by name and returns ``(out, cache)``;
    ``output(out)`` is the differentiable output (and ``extras(out)`` other
    outputs worth comparing); ``dout(xp, g)`` builds the cotangent from an
    array of the output's shape the way the block does (a slice of a larger
    array, ...).  ``fwd`` / ``bwd``: the kernel templates the kernel path
    launches, in order.
    """

    id: str
    shapes: dict[str, tuple[int, ...]]
    forward: Callable[[dict[str, Any]], tuple[Any, Any]]
    backward: Callable[[Any, Any], Any]
    fwd: tuple[str, ...] = ()
    bwd: tuple[str, ...] = ()
    output: Callable[[Any], Any] = _identity
    extras: Callable[[Any], tuple[Any, ...]] = lambda out: ()
    dout: Callable[[Any, Any], Any] = lambda xp, g: g
    positive: tuple[str, ...] = ()  # inputs drawn positive (variances)
    zero_maps: bool = False  # x[0, 1] all zero (the lp pool's ||x|| = 0 rule)

    def __str__(self) -> str:
        return self.id


def _k(*names: str) -> tuple[str, ...]:
    return tuple(f"refattn_{n}" for n in names)


def _plane_of_two(xp: Any, g: Any) -> Any:
    """CBAM's dm[:, 0:1]: a non-contiguous channel slice of a (N, 2, *S) array."""
    return xp.concat([g, xp.zeros_like(g)], axis=1)[:, 0:1, ...]


def _row_of_stack(xp: Any, g: Any) -> Any:
    """CBAM's dd[t, ...]: one descriptor of the (T, N, C) stack."""
    return xp.stack([xp.zeros_like(g), g], axis=0)[1, ...]


def _channel_pool(kind: str, shape: tuple[int, ...]) -> OpCase:
    return OpCase(
        f"channel_pool-{kind}-{len(shape) - 2}d",
        {"x": shape},
        lambda a: pool.channel_pool_forward(a["x"], kind=kind),
        pool.channel_pool_backward,
        _k("channel_pool_fwd"),
        _k("channel_pool_bwd"),
        dout=_plane_of_two,
    )


def _global_pool(kind: str, shape: tuple[int, ...], keepdim: bool = False,
                 zero_maps: bool = False) -> OpCase:
    suffix = "-keepdim" if keepdim else ""
    suffix += "-zero-map" if zero_maps else ""
    return OpCase(
        f"global_pool-{kind}-{len(shape) - 2}d{suffix}",
        {"x": shape},
        lambda a: pool.global_pool_forward(a["x"], kind=kind, keepdim=keepdim),
        pool.global_pool_backward,
        _k(f"global_{kind}_pool_fwd"),
        _k(f"global_{kind}_pool_bwd"),
        dout=(lambda xp, g: g) if keepdim else _row_of_stack,
        zero_maps=zero_maps,
    )


def _gate(kind: str, x: tuple[int, ...], z: tuple[int, ...]) -> OpCase:
    return OpCase(
        f"gate_mul-{kind}-{len(x) - 2}d",
        {"x": x, "z": z},
        lambda a: elementwise.gate_mul_forward(a["x"], a["z"]),
        elementwise.gate_mul_backward,
        _k(f"gate_mul_{kind}_fwd"),
        _k(f"gate_mul_{kind}_bwd"),
    )


def _max_pool(x: tuple[int, ...], k: Any, s: Any = None, tag: str = "") -> OpCase:
    return OpCase(
        f"max_pool-{len(x) - 2}d{tag}",
        {"x": x},
        lambda a: pool.max_pool_forward(a["x"], kernel_size=k, stride=s),
        pool.max_pool_backward,
        _k("max_pool_fwd"),
        _k("max_pool_bwd"),
    )


def _conv(tag: str, x: tuple[int, ...], w: tuple[int, ...], bias: bool, padding: int,
          kernel: bool, **options: Any) -> OpCase:
    shapes = {"x": x, "weight": w} | ({"bias": (w[0],)} if bias else {})
    return OpCase(
        f"conv2d-{tag}",
        shapes,
        lambda a: conv.conv2d_forward(
            a["x"], a["weight"], a.get("bias"), padding=padding, **options
        ),
        conv.conv2d_backward,
        _k("small_conv_fwd") if kernel else (),
        _k("small_conv_dx_bwd", "small_conv_dw_bwd") if kernel else (),
    )


def _batch_norm(tag: str, x: tuple[int, ...], *, training: bool, affine: bool,
                stats: bool) -> OpCase:
    C = x[1]
    shapes = {"x": x}
    if affine:
        shapes |= {"weight": (C,), "bias": (C,)}
    if stats:
        shapes |= {"running_mean": (C,), "running_var": (C,)}
    return OpCase(
        f"batch_norm-{tag}",
        shapes,
        lambda a: norm.batch_norm_forward(
            a["x"], a.get("weight"), a.get("bias"), a.get("running_mean"),
            a.get("running_var"), training=training, momentum=0.01, eps=1e-5,
        ),
        norm.batch_norm_backward,
        _k("batch_norm_stats_fwd") if training else (),
        _k("batch_norm_reduce_bwd"),
        output=lambda out: out.y,
        extras=lambda out: (out.running_mean, out.running_var),
        positive=("running_var",),
    )


def _group_norm(tag: str, x: tuple[int, ...], groups: int, affine: bool) -> OpCase:
    shapes = {"x": x} | ({"weight": (x[1],), "bias": (x[1],)} if affine else {})
    return OpCase(
        f"group_norm-{tag}",
        shapes,
        lambda a: norm.group_norm_forward(
            a["x"], a.get("weight"), a.get("bias"), num_groups=groups
        ),
        norm.group_norm_backward,
        _k("group_norm_stats_fwd"),
        _k("group_norm_reduce_bwd", *(("batch_norm_reduce_bwd",) if affine else ())),
    )


WIRED: list[OpCase] = [
    _channel_pool("max", (3, 5, 7, 9)),
    _channel_pool("mean", (3, 5, 7, 9)),
    _channel_pool("max", (2, 4, 33)),
    _channel_pool("mean", (2, 3, 3, 4, 5)),
    _channel_pool("max", (2, 1, 5, 6)),
    *(_global_pool(kind, (3, 5, 7, 9)) for kind in ("avg", "max", "lp", "lse")),
    _global_pool("avg", (2, 3, 4, 5, 6), keepdim=True),
    _global_pool("max", (2, 3, 40), keepdim=True),
    _global_pool("lp", (2, 3, 5, 4), zero_maps=True),
    _gate("channel", (3, 5, 7, 9), (3, 5, 1, 1)),
    _gate("spatial", (3, 5, 7, 9), (3, 1, 7, 9)),
    _gate("channel", (4, 6), (4, 6)),
    _gate("spatial", (2, 4, 3, 5, 3), (2, 1, 3, 5, 3)),
    OpCase(
        "softmax-last-3d",
        {"x": (2, 5, 33)},
        lambda a: softmax.softmax_forward(a["x"], axis=-1),
        softmax.softmax_backward,
        _k("softmax_fwd"),
        _k("softmax_bwd"),
    ),
    OpCase(
        "softmax-last-2d",
        {"x": (7, 70)},
        lambda a: softmax.softmax_forward(a["x"], axis=1),
        softmax.softmax_backward,
        _k("softmax_fwd"),
        _k("softmax_bwd"),
    ),
    _max_pool((2, 3, 11), 2),
    _max_pool((2, 3, 7, 9), 2),
    _max_pool((2, 3, 9, 8), 3, 2, "-overlap"),
    _max_pool((2, 3, 3, 6, 5), (1, 2, 2)),
    _conv("cbam-k7", (3, 2, 7, 9), (1, 2, 7, 7), False, 3, True),
    _conv("k3-bias", (2, 2, 5, 6), (1, 2, 3, 3), True, 1, True),
    _conv("k5-3to2-bias", (2, 3, 6, 4), (2, 3, 5, 5), True, 2, True),
    _batch_norm("train-cbam", (3, 1, 7, 9), training=True, affine=True, stats=True),
    _batch_norm("eval", (2, 6, 5, 4), training=False, affine=True, stats=True),
    _batch_norm("train-bare", (4, 3, 10), training=True, affine=False, stats=False),
    _batch_norm("train-2d", (6, 4), training=True, affine=True, stats=True),
    _group_norm("affine", (2, 6, 5, 7), 3, True),
    _group_norm("bare", (3, 4, 33), 2, False),
]
"""Wired ops, with the kernels each launches."""


UNWIRED: list[OpCase] = [
    OpCase(
        "gate_mul-batch-broadcast",
        {"x": (3, 5, 7, 9), "z": (1, 5, 1, 1)},
        lambda a: elementwise.gate_mul_forward(a["x"], a["z"]),
        elementwise.gate_mul_backward,
    ),
    OpCase(
        "gate_mul-full",
        {"x": (3, 5, 7, 9), "z": (3, 5, 7, 9)},
        lambda a: elementwise.gate_mul_forward(a["x"], a["z"]),
        elementwise.gate_mul_backward,
    ),
    OpCase(
        "softmax-axis1",
        {"x": (2, 5, 33)},
        lambda a: softmax.softmax_forward(a["x"], axis=1),
        softmax.softmax_backward,
    ),
    _conv("wide-8to1", (2, 8, 6, 7), (1, 8, 3, 3), False, 1, False),
    _conv("stride2", (2, 2, 7, 8), (1, 2, 3, 3), False, 1, False, stride=2),
    _conv("valid", (2, 2, 7, 8), (1, 2, 3, 3), True, 0, False),
    _conv("1x1", (2, 2, 5, 6), (4, 2, 1, 1), True, 0, False),
    _conv("dilated", (2, 2, 9, 9), (1, 2, 3, 3), False, 2, False, dilation=2),
    OpCase(
        "global_pool-avg-4d",
        {"x": (2, 3, 2, 3, 2, 3)},
        lambda a: pool.global_pool_forward(a["x"], kind="avg"),
        pool.global_pool_backward,
    ),
    OpCase(
        "channel_pool-max-4d",
        {"x": (2, 3, 2, 3, 2, 3)},
        lambda a: pool.channel_pool_forward(a["x"], kind="max"),
        pool.channel_pool_backward,
    ),
    OpCase(
        "avg_pool-2d",
        {"x": (2, 3, 7, 9)},
        lambda a: pool.avg_pool_forward(a["x"], kernel_size=2),
        pool.avg_pool_backward,
    ),
    OpCase(
        "matmul",
        {"a": (2, 5, 7), "b": (2, 7, 3)},
        lambda a: linear.matmul_forward(a["a"], a["b"]),
        linear.matmul_backward,
    ),
    OpCase(
        "pointwise_conv",
        {"x": (2, 6, 5, 4), "weight": (3, 6)},
        lambda a: conv.pointwise_conv_forward(a["x"], a["weight"]),
        conv.pointwise_conv_backward,
    ),
    OpCase(
        "relu",
        {"x": (3, 5, 7)},
        lambda a: elementwise.relu_forward(a["x"]),
        elementwise.relu_backward,
    ),
    OpCase(
        "sigmoid",
        {"z": (3, 5, 7)},
        lambda a: elementwise.sigmoid_forward(a["z"]),
        elementwise.sigmoid_backward,
    ),
    OpCase(
        "mul",
        {"a": (3, 5, 7), "b": (1, 5, 1)},
        lambda a: elementwise.mul_forward(a["a"], a["b"]),
        elementwise.mul_backward,
    ),
    OpCase(
        "add",
        {"a": (3, 5, 7), "b": (5, 1)},
        lambda a: elementwise.add_forward(a["a"], a["b"]),
        elementwise.add_backward,
    ),
    OpCase(
        "linear",
        {"x": (2, 3, 5), "weight": (4, 5), "bias": (4,)},
        lambda a: linear.linear_forward(a["x"], a["weight"], a["bias"]),
        linear.linear_backward,
    ),
]
"""Cases with no kernel: the generic path on CuPy too."""


def test_every_op_is_covered() -> None:
    """Each op of refattn.ops.OPS runs on CuPy in WIRED or UNWIRED."""
    from refattn.ops import OPS

    covered = {case.id.split("-")[0] for case in WIRED + UNWIRED}
    assert set(OPS) <= covered, sorted(set(OPS) - covered)
    wired = {case.id.split("-")[0] for case in WIRED}
    assert wired | {"cgnl_moments"} == set(kernel_ops.KERNEL_OPS)


def _draw(case: OpCase, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in case.shapes.items():
        a = rng.standard_normal(shape)
        if name in case.positive:
            a = 0.5 + np.abs(a)
        if name == "x" and case.zero_maps:
            a[0, 1] = 0.0
        out[name] = a.astype(dtype)
    return out


def _as_tuple(g: Any) -> tuple[Any, ...]:
    return g if isinstance(g, tuple) else (g,)


def _run(case: OpCase, host: dict[str, np.ndarray], cot: np.ndarray | None,
         to_device: Callable[[np.ndarray], Any], xp: Any
         ) -> tuple[list[Any], list[Any], Any, np.ndarray]:
    """Forward and backward; host copies of the outputs, the gradients, the
    forward cache, and the cotangent used (drawn when `cot` is None)."""
    a = {k: to_device(v) for k, v in host.items()}
    out, cache = case.forward(a)
    y = case.output(out)
    if cot is None:
        cot = np.random.default_rng(1).standard_normal(tuple(y.shape)).astype(
            backend.dtype_name(y)
        )
    grads = case.backward(case.dout(xp, to_device(cot)), cache)
    outs = [backend.to_host(y)] + [
        None if e is None else backend.to_host(e) for e in case.extras(out)
    ]
    g = [None if d is None else backend.to_host(d) for d in _as_tuple(grads)]
    for name, v in host.items():  # no op writes into its arguments
        np.testing.assert_array_equal(backend.to_host(a[name]), v, err_msg=name)
    return outs, g, cache, cot


def _numpy_reference(case: OpCase, host: dict[str, np.ndarray]) -> tuple[Any, ...]:
    import array_api_compat.numpy as cnp

    return _run(case, host, None, lambda v: v.copy(), cnp)


KERNEL_CACHES = {o.cache for o in kernel_ops.OVERRIDES.values()}


def _kernel_cache(cache: Any) -> bool:
    return type(cache) in KERNEL_CACHES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WIRED, ids=str)
def test_wired_op_takes_its_kernel_and_matches(gpu: Gpu, case: OpCase, dtype: str
                                                ) -> None:
    host = _draw(case, dtype)
    want_out, want_grads, _, cot = _numpy_reference(case, host)
    for kernels in (True, False):
        gpu.launched.clear()
        with rc.use_kernels(kernels):
            out, grads, cache, _ = _run(case, host, cot, gpu.to_device, gpu.xp)
        if kernels:
            assert tuple(gpu.launched) == case.fwd + case.bwd
            assert _kernel_cache(cache), type(cache)
        else:
            assert gpu.launched == []
            assert not _kernel_cache(cache), type(cache)
        path = "kernel" if kernels else "generic"
        for i, (o, w) in enumerate(zip(out, want_out, strict=True)):
            assert o is None or o.dtype == np.dtype(dtype)
            assert_close(o, w, dtype, f"{path} output {i}")
        for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
            assert g is None or g.dtype == np.dtype(dtype)
            assert_close(g, w, dtype, f"{path} gradient {i}")


@pytest.mark.parametrize("case", UNWIRED, ids=str)
def test_unwired_cases_stay_generic(gpu: Gpu, case: OpCase) -> None:
    host = _draw(case, "float64")
    want_out, want_grads, _, cot = _numpy_reference(case, host)
    gpu.launched.clear()
    out, grads, cache, _ = _run(case, host, cot, gpu.to_device, gpu.xp)
    assert gpu.launched == []
    assert not _kernel_cache(cache)
    for o, w in zip(out + grads, want_out + want_grads, strict=True):
        assert_close(o, w, "float64", case.id)


def test_kernels_off_by_environment_or_api(gpu: Gpu, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """REFATTN_KERNELS=generic and set_kernels_enabled(False) reach every op."""
    cases = WIRED[::3]
    monkeypatch.setenv("REFATTN_KERNELS", "generic")
    for case in cases:
        gpu.launched.clear()
        _, _, cache, _ = _run(case, _draw(case, "float64"), None, gpu.to_device, gpu.xp)
        assert gpu.launched == [] and not _kernel_cache(cache), case.id
    monkeypatch.setenv("REFATTN_KERNELS", "auto")
    try:
        rc.set_kernels_enabled(False)
        for case in cases:
            gpu.launched.clear()
            host = _draw(case, "float64")
            _, _, cache, _ = _run(case, host, None, gpu.to_device, gpu.xp)
            assert gpu.launched == [] and not _kernel_cache(cache), case.id
    finally:
        rc.set_kernels_enabled(None)
    gpu.launched.clear()
    _, _, cache, _ = _run(cases[0], _draw(cases[0], "float64"), None, gpu.to_device,
                          gpu.xp)
    assert gpu.launched and _kernel_cache(cache)


def test_first_cupy_array_registers_the_kernels_once(
    gpu: Gpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an empty override table, the first CuPy array that reaches an
    override point calls kernel_ops.register (named in overrides.LOADERS),
    once, and every kernel is in the table."""
    calls = []
    register = kernel_ops.register

    def counting_register() -> None:
        calls.append("register")
        register()

    monkeypatch.setattr(kernel_ops, "register", counting_register)
    monkeypatch.setattr(overrides, "OVERRIDES", {})
    monkeypatch.setattr(overrides, "_loaded", False)
    case = WIRED[0]
    for _ in range(2):
        gpu.launched.clear()
        _, _, cache, _ = _run(case, _draw(case, "float64"), None, gpu.to_device,
                              gpu.xp)
        assert tuple(gpu.launched) == case.fwd + case.bwd and _kernel_cache(cache)
    assert calls == ["register"]
    assert overrides.OVERRIDES == kernel_ops.OVERRIDES


def test_bad_dout_raises_the_same_error_on_both_paths(gpu: Gpu) -> None:
    """The kernel backwards validate dout as the generic ones do."""
    for case in WIRED:
        host = _draw(case, "float64")
        errors = []
        for kernels in (True, False):
            with rc.use_kernels(kernels):
                dev = {k: gpu.to_device(v) for k, v in host.items()}
                out, cache = case.forward(dev)
                y = case.output(out)
                bad = gpu.to_device(np.zeros(tuple(y.shape) + (2,)))
                with pytest.raises((ValueError, TypeError)) as info:
                    case.backward(bad, cache)
                errors.append((info.type, str(info.value)))
        assert errors[0] == errors[1], case.id


# ---------------------------------------------------------------------------
# blocks


def _block_cases() -> list[Any]:
    out = []
    for name, spec in BLOCKS.items():
        for preset in list(spec.presets) or [None]:
            for req, cfg in expand_requests(name, preset, {}):
                label = f"{name}-{preset or 'default'}"
                train = spec.with_bn_mode(cfg, "train")
                if train is not None:
                    label += "-train" if train == cfg else "-eval"
                out.append(pytest.param(name, cfg, id=label))
    return out


BLOCK_CASES = _block_cases()

KERNEL_FREE_BLOCKS = ("conv1x1", "mlpconv")
"""Blocks made of matrix products, 1x1 / wide convolutions and ReLUs only."""


def _block_run(spec: Any, cfg: Any, host: dict[str, dict[str, np.ndarray]],
               cot: np.ndarray, xp: Any) -> dict[str, np.ndarray]:
    dev = {part: {k: backend.from_host(v, xp) for k, v in d.items()}
           for part, d in host.items()}
    outputs, cache = spec.forward(dev["inputs"], dev["params"], dev["state"], cfg)
    dinputs, dparams = spec.backward({"out": backend.from_host(cot, xp)}, cache)
    got = {f"output.{k}": backend.to_host(v) for k, v in outputs.items()}
    got |= {f"grad.input.{k}": backend.to_host(v) for k, v in dinputs.items()}
    got |= {f"grad.param.{k}": backend.to_host(v) for k, v in dparams.items()}
    return got


def _block_draw(spec: Any, cfg: Any, shapes: dict[str, Any], dtype: str, seed: int
                ) -> dict[str, dict[str, np.ndarray]]:
    params, state = spec.init_params(cfg, shapes, seed=seed)
    rng = np.random.default_rng([seed, 1])
    return {
        "inputs": {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()},
        "params": {k: np.asarray(v, dtype=dtype) for k, v in params.items()},
        "state": {k: np.asarray(v, dtype=dtype) for k, v in state.items()},
    }


BLOCK_MARGIN = {"float32": 1e-5, "float64": 1e-8}
"""Smallest relative distance of a draw from a ReLU kink or a max tie: far
beyond the round-off by which two correct implementations differ."""


def _family(key: str) -> str:
    return "grad." + key.split(".")[1] if key.startswith("grad.") else "output"


def _family_scales(tensors: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest magnitude per family (outputs, input grads, parameter grads):
    absolute errors are measured against it, so that a gradient which is
    analytically zero (round-off only, e.g. a bias before a softmax) is
    compared on the scale of its family, as the golden tolerances do."""
    out: dict[str, float] = {}
    for key, v in tensors.items():
        fam = _family(key)
        out[fam] = max(out.get(fam, 0.0), float(np.max(np.abs(v))) if v.size else 0.0)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block", "cfg"), BLOCK_CASES)
def test_block_presets_match_numpy(gpu: Gpu, block: str, cfg: Any, dtype: str) -> None:
    import array_api_compat.numpy as cnp

    spec = BLOCKS[block]
    shapes = spec.fixture_shapes(cfg)
    cfg = spec.resolve(cfg, shapes)
    margin = BLOCK_MARGIN[dtype]
    for seed in range(MAX_REDRAWS):  # a draw away from ReLU kinks and max ties
        host = _block_draw(spec, cfg, shapes, dtype, seed)
        inputs, params, state = host["inputs"], host["params"], host["state"]
        outputs, cache = spec.forward(inputs, params, state, cfg)
        if spec.kink_margin(cache) >= margin:
            break
    else:
        raise AssertionError(f"{block}: no draw with a kink margin >= {margin}")
    rng = np.random.default_rng(seed)
    cot = rng.standard_normal(tuple(outputs["out"].shape)).astype(dtype)
    want = _block_run(spec, cfg, host, cot, cnp)
    for kernels in (True, False):
        gpu.launched.clear()
        with rc.use_kernels(kernels):
            got = _block_run(spec, cfg, host, cot, gpu.xp)
        if not kernels or block in KERNEL_FREE_BLOCKS:
            assert gpu.launched == []
        else:
            assert gpu.launched, f"{block}: no kernel was launched"
        assert got.keys() == want.keys()
        scale = _family_scales(want)
        for key, w in want.items():
            g = got[key]
            assert g.dtype == np.dtype(dtype), key
            tol = _tol(dtype)
            np.testing.assert_allclose(
                g.astype(np.float64), w.astype(np.float64), rtol=tol,
                atol=tol * scale[_family(key)],
                err_msg=f"{block} {key} (kernels {kernels})",
            )


def test_cbam_launches_every_kernel_of_its_gates(gpu: Gpu) -> None:
    """The jongchan preset uses global pools, gates, channel pool, the 7x7
    conv and batch norm, each forward and backward."""
    import array_api_compat.numpy as cnp

    spec = BLOCKS["cbam"]
    cfg = spec.config("jongchan")
    shapes = spec.fixture_shapes(cfg)
    params, state = spec.init_params(cfg, shapes, seed=0)
    rng = np.random.default_rng(0)
    host = {"inputs": {"x": rng.standard_normal(shapes["x"])}, "params": params,
            "state": state}
    cot = rng.standard_normal(shapes["x"])
    gpu.launched.clear()
    got = _block_run(spec, cfg, host, cot, gpu.xp)
    want = _block_run(spec, cfg, host, cot, cnp)
    for key in want:
        assert_close(got[key], want[key], "float64", key)
    expected = _k(
        "global_avg_pool_fwd", "global_max_pool_fwd", "gate_mul_channel_fwd",
        "channel_pool_fwd", "channel_pool_fwd", "small_conv_fwd",
        "batch_norm_stats_fwd", "gate_mul_spatial_fwd",
        "gate_mul_spatial_bwd", "batch_norm_reduce_bwd", "small_conv_dx_bwd",
        "small_conv_dw_bwd", "channel_pool_bwd", "channel_pool_bwd",
        "gate_mul_channel_bwd", "global_avg_pool_bwd", "global_max_pool_bwd",
    )
    assert tuple(gpu.launched) == expected


@pytest.mark.parametrize(("order", "kernels"), [(3, True), (8, True), (9, False)])
@pytest.mark.parametrize("beta", ["const", "per_element"])
def test_cgnl_taylor_moments_take_their_kernel(gpu: Gpu, order: int, kernels: bool,
                                               beta: str) -> None:
    """CGNL's Gaussian kernel: the moments Σ φ^q w and their VJP by kernel up
    to order 8 (the kernel's limit), the generic matmuls beyond."""
    import array_api_compat.numpy as cnp

    spec = BLOCKS["cgnl"]
    cfg = spec.config("yue_gaussian", order=order, beta=beta, norm=None)
    shapes = spec.fixture_shapes(cfg)
    cfg = spec.resolve(cfg, shapes)
    host = _block_draw(spec, cfg, shapes, "float64", 0)
    cot = np.random.default_rng(2).standard_normal(shapes["x"])
    gpu.launched.clear()
    got = _block_run(spec, cfg, host, cot, gpu.xp)
    moments = _k("cgnl_moments_fwd", "cgnl_moments_bwd")
    assert tuple(b for b in gpu.launched if "cgnl" in b) == (moments if kernels else ())
    want = _block_run(spec, cfg, host, cot, cnp)
    scale = _family_scales(want)
    for key, w in want.items():
        np.testing.assert_allclose(got[key], w, rtol=1e-10,
                                   atol=1e-10 * scale[_family(key)], err_msg=key)


# ---------------------------------------------------------------------------
# golden cases with the CuPy backend


def _golden_requests() -> list[Any]:
    out = []
    for name, spec in BLOCKS.items():
        for preset in list(spec.presets) or [None]:
            for dtype in ("float64", "float32"):
                for req, cfg in expand_requests(name, preset, {}, dtype=dtype):
                    out.append(pytest.param(req, cfg, id=req.block + "-" +
                                            req.case_id(_mode(spec, cfg))))
    return out


def _mode(spec: Any, cfg: Any) -> str | None:
    train = spec.with_bn_mode(cfg, "train")
    return None if train is None else ("train" if train == cfg else "eval")


def _assert_case_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                         tolerance: Callable[[str], tuple[float, float]], where: str
                         ) -> None:
    assert got.keys() == want.keys(), where
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, (where, key)
        rtol, atol = tolerance(key)
        err = np.abs(g.astype(np.float64) - w.astype(np.float64))
        bound = atol + rtol * np.abs(w.astype(np.float64))
        bad = int(np.count_nonzero(err > bound))
        assert bad == 0, (
            f"{where} {key}: {bad} of {w.size} values outside rtol={rtol:g}, "
            f"atol={atol:g} (max error {float(err.max()):.3g})"
        )


def _assert_same_manifest(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal but for the backend and the last bits of the measured margin."""
    g, w = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    assert g["provenance"].pop("backend") == "cupy"
    w["provenance"].pop("backend")
    gm = g["input_constraints"].pop("kink_margin")
    wm = w["input_constraints"].pop("kink_margin")
    assert (gm is None) == (wm is None)
    if wm is not None:
        assert gm == pytest.approx(wm, rel=1e-6)
    assert g == w


@pytest.mark.parametrize(("req", "cfg"), _golden_requests())
def test_golden_case_with_the_cupy_backend_matches_numpy(gpu: Gpu, req: Any, cfg: Any
                                                         ) -> None:
    want = generate_case(req, cfg)
    got = generate_case(req, cfg, xp=gpu.xp)
    assert got.case_id == want.case_id
    _assert_same_manifest(got.manifest, want.manifest)
    _assert_case_matches(got.tensors, want.tensors, want.tolerances.__getitem__,
                         f"{req.block}/{want.case_id}")


def test_golden_cli_with_backend_cupy(gpu: Gpu, tmp_path: Any) -> None:
    """``refattn golden --backend cupy`` writes what --backend numpy writes,
    within the manifest tolerances."""
    from click.testing import CliRunner

    from refattn.cli.main import main as cli
    from refattn.golden.format import read_case

    runner = CliRunner()
    for name in ("numpy", "cupy"):
        gpu.launched.clear()
        result = runner.invoke(cli, [
            "golden", "--block", "cbam", "--preset", "jongchan", "--set",
            "spatial_bn=train", "--backend", name, "--out", str(tmp_path / name),
            "--format", "npz",
        ])
        assert result.exit_code == 0, result.output
        assert bool(gpu.launched) == (name == "cupy")
    cases = {n: sorted((tmp_path / n / "cbam").iterdir()) for n in ("numpy", "cupy")}
    assert [p.name for p in cases["numpy"]] == [p.name for p in cases["cupy"]]
    for want_dir, got_dir in zip(cases["numpy"], cases["cupy"], strict=True):
        want, got = read_case(want_dir), read_case(got_dir)
        _assert_case_matches(got.tensors, want.tensors, want.tolerance, got_dir.name)
