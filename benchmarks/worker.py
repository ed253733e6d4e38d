"""One measurement in a fresh process: ``python -m benchmarks.worker JSON``.

The parent (``benchmarks/run.py``) starts one worker per (block, side, dtype,
round) so that no measurement inherits another's heap, thread pools, BLAS
state or imported modules, and so that the refattn side never imports torch.
The worker prints exactly one JSON object on its last stdout line.

Tasks (``"task"`` in the JSON argument):

``block``      forward + backward of one block; side ``refattn`` (NumPy, or
               CuPy with ``device='cuda'``) or ``torch`` (eager autograd, CPU
               or CUDA), or ``matmuls``: only the matrix products of
               refattn's forward + backward (its matmuls and the CPU tier's
               GEMMs), replayed on the operands it gave them.
               Returns per-rep wall times, the first call's time, peak memory
               and process counters.
``gemm``       an n x n x n matmul (the machine's attainable matmul rate for
               that side and dtype).
``gradcheck``  refattn ``gradcheck_block`` (fast / full) or
               ``torch.autograd.gradcheck`` (default / fast_mode) on the
               block's fixture case.
``info``       library versions, BLAS / threads and allocator environment.

Peak memory (CPU), ``peak_mb``: the working memory of one forward+backward
beyond its inputs and parameters (saved activations, outputs, gradients and
temporaries), whichever allocator made it (NumPy, OpenBLAS, torch's CPU
allocator, oneDNN scratch pads; tracemalloc would see only NumPy's share).
After the timed reps the worker drops the last rep's results, switches glibc
to give every freed block of 64 KiB or more back to the kernel at once
(``mallopt``: fixed mmap threshold 64 KiB, trim threshold 0, then
``malloc_trim(0)``), resets the resident-set high-water mark (``/proc/self/
clear_refs``, value 5) and runs one more rep: ``peak_mb`` = VmHWM - VmRSS
before it.  Measuring a warm rep keeps one-time costs out (the first call of a
kernel faults in its shared-library code pages, 30-40 MB for torch's
autograd, which VmRSS counts); releasing freed memory at once keeps memory
cached by the allocator from hiding the rep's real demand.  Also recorded:
``peak_first_mb`` (VmHWM growth over the cold first call, code pages
included) and ``peak_hwm_mb`` (over the whole timed workload).  Where
clear_refs is not writable, the fallback is ``getrusage`` ``ru_maxrss``,
which only sees peaks above the set-up's own (``mem_method``).

GPU memory: torch ``max_memory_allocated`` after ``reset_peak_memory_stats``;
CuPy's default memory pool ``total_bytes`` growth (the pool keeps freed
blocks, so its growth is the workload's high-water mark at block granularity).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/worker.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import Shape, build_config

__all__ = ["main", "out_shape"]


# ---------------------------------------------------------------------------
# process counters


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemProbe:
    """Peak resident memory of a workload, relative to its start."""

    def __init__(self) -> None:
        gc.collect()
        self.exact = _reset_hwm()
        self.base_kb = _status_kb("VmRSS")
        self.base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        if self.exact:
            return (_status_kb("VmHWM") - self.base_kb) / 1024.0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base_maxrss
        return max(grown, 0) / 1024.0

    @property
    def method(self) -> str:
        return "VmHWM-reset" if self.exact else "ru_maxrss"


def _release_freed_memory() -> bool:
    """From now on give every freed block of 64 KiB or more back to the kernel
    at once (glibc ``mallopt``: fixed mmap threshold 64 KiB, trim threshold 0)
    and release what the heap holds, so that the resident set tracks live
    memory and a workload's VmHWM growth is its peak working memory."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 65536) == 1
        ok = ok and libc.mallopt(m_trim_threshold, 0) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _rusage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu": r.ru_utime + r.ru_stime,
        "minflt": r.ru_minflt,
        "majflt": r.ru_majflt,
        "nivcsw": r.ru_nivcsw,
        "nvcsw": r.ru_nvcsw,
    }


# ---------------------------------------------------------------------------
# inputs shared by both sides


def out_shape(block: str, cfg: Any, shapes: Mapping[str, Shape]) -> Shape:
    """Shape of the block's ``out`` without running it."""
    if block == "cross_layer":
        return tuple(shapes["x_q"])
    n, c, h, w = shapes["x"]
    if block == "gap":
        return (n, c, 1, 1) if cfg.keepdim else (n, c)
    if block in ("conv1x1", "mlpconv"):

        def pair(v: Any) -> tuple[int, int]:
            return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

        k = (1, 1) if block == "conv1x1" else pair(cfg.kernel_size)
        d = (1, 1) if block == "conv1x1" else pair(cfg.dilation)
        s, p = pair(cfg.stride), pair(cfg.padding)
        ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        o = cfg.out_channels if block == "conv1x1" else cfg.channels[-1]
        return (n, o, ho, wo)
    return (n, c, h, w)


def _draw(
    block: str, cfg: Any, shapes: Mapping[str, Shape], seed: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    """Host float64 inputs, params, state and cotangent (identical on both sides)."""
    import numpy as np

    from refattn.blocks.registry import BLOCKS, draw_case

    inputs, params, state = draw_case(BLOCKS[block], cfg, shapes, seed=seed)
    dout = np.random.default_rng(seed + 99).standard_normal(
        out_shape(block, cfg, shapes)
    )
    return inputs, params, state, dout


# ---------------------------------------------------------------------------
# the timing loop


def _sync_none() -> None:
    return None


def _runtime_warmup(side: str, device: str | None) -> None:
    """Start the library's lazy machinery (thread pools, autograd engine, CUDA
    context) on a tiny unrelated problem, so the block's first call and its
    peak memory measure the block, not the runtime's one-time set-up."""
    if side == "torch":
        import torch

        a = torch.ones(64, 64, device=device or "cpu", requires_grad=True)
        (a @ a).relu().sum().backward()
    elif device == "cuda":
        import cupy

        a = cupy.ones((64, 64))
        (a @ a).sum()
        cupy.cuda.Device().synchronize()
    else:
        import numpy as np

        a = np.ones((64, 64))
        (a @ a).sum()


def _time_loop(
    rep: Callable[[], None],
    warmup: int,
    reps: int,
    sync: Callable[[], None],
    min_time: float,
    clear: Callable[[], None] = _sync_none,
) -> dict[str, Any]:
    """First call (peak memory), warm-ups, then timed reps (at least `reps`,
    continuing until `min_time` seconds of timed work), then one more call
    for the steady-state peak."""
    probe = MemProbe()
    sync()
    t0 = time.perf_counter()
    rep()
    sync()
    first = time.perf_counter() - t0
    peak_first = probe.peak_mb()
    for _ in range(warmup):
        rep()
    sync()
    before = _rusage()
    times: list[float] = []
    wall0 = time.perf_counter()
    while len(times) < reps or (
        time.perf_counter() - wall0 < min_time and len(times) < 20 * reps
    ):
        t0 = time.perf_counter()
        rep()
        sync()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    after = _rusage()
    n = len(times)
    peak = probe.peak_mb()
    live = None
    clear()  # drop what the last rep left behind (torch's .grad tensors)
    gc.collect()
    if _release_freed_memory():
        steady = MemProbe()
        rep()
        sync()
        live = steady.peak_mb() if steady.exact else None
    return {
        "times": times,
        "first_s": first,
        "peak_first_mb": peak_first,
        "peak_mb": live,
        "peak_hwm_mb": peak,
        "mem_method": probe.method,
        "cpu_per_wall": (after["cpu"] - before["cpu"]) / wall if wall > 0 else None,
        "minflt_per_rep": (after["minflt"] - before["minflt"]) / n,
        "nivcsw_per_rep": (after["nivcsw"] - before["nivcsw"]) / n,
        "loadavg": os.getloadavg(),
    }


def _block_refattn(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    from refattn.blocks.registry import BLOCKS

    block, dtype = job["block"], job["dtype"]
    shapes = {k: tuple(v) for k, v in job["shapes"].items()}
    cfg = build_config(block, job["preset"], job["overrides"], shapes)
    spec = BLOCKS[block]
    inputs, params, state, dout = _draw(block, cfg, shapes, job["seed"])
    sync = _sync_none
    if job.get("device") == "cuda":
        import cupy as xp

        sync = xp.cuda.Device().synchronize

        def move(a: Any) -> Any:
            return xp.asarray(np.asarray(a, dtype=dtype))
    else:

        def move(a: Any) -> Any:
            return np.ascontiguousarray(a, dtype=dtype)

    inputs = {k: move(v) for k, v in inputs.items()}
    params = {k: move(v) for k, v in params.items()}
    state = {k: move(v) for k, v in state.items()}
    douts = {"out": move(dout)}
    del dout

    def rep() -> None:
        _outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)

    if job["side"] == "matmuls":
        rep = _matmuls_alone(rep)

    _runtime_warmup("refattn", job.get("device"))

    if job.get("device") == "cuda":
        import cupy

        pool = cupy.get_default_memory_pool()
        base = pool.total_bytes()
        res = _time_loop(rep, job["warmup"], job["reps"], sync, job["min_time"])
        res["peak_mb"] = res["peak_first_mb"] = res["peak_hwm_mb"] = (
            pool.total_bytes() - base
        ) / 2**20
        res["mem_method"] = "cupy-pool-growth"
        return res
    return _time_loop(rep, job["warmup"], job["reps"], sync, job["min_time"])


def _matmuls_alone(rep: Callable[[], None]) -> Callable[[], None]:
    """A rep that makes only the matrix products `rep` makes: its matmuls,
    the CPU tier's GEMMs with β = 1 and its matmuls into a buffer's rows
    (``refattn.cpu.blas``), on the same operands (the arrays themselves, so the same shapes, strides and values),
    in the same order, each matmul's result a fresh array as in the block.
    Its time is the floor of refattn's time with this BLAS: what the block
    would cost if every other pass were free."""
    import array_api_compat.numpy as anp

    from refattn.cpu import blas

    matmul, gemm, write = anp.matmul, blas._call, blas._write
    calls: list[Callable[[], Any]] = []

    def record_matmul(a: Any, b: Any, /, **kw: Any) -> Any:
        calls.append(lambda: matmul(a, b, **kw))
        return matmul(a, b, **kw)

    def record_gemm(found: Any, c: Any, a: Any, b: Any) -> None:
        calls.append(lambda: gemm(found, c, a, b))  # adds into c again: timing only
        gemm(found, c, a, b)

    def record_write(c: Any, a: Any, b: Any) -> None:
        calls.append(lambda: write(c, a, b))  # the same rows again
        write(c, a, b)

    anp.matmul, blas._call, blas._write = record_matmul, record_gemm, record_write
    try:
        rep()
    finally:
        anp.matmul, blas._call, blas._write = matmul, gemm, write

    def products() -> None:
        for call in calls:
            call()

    return products


def _block_torch(job: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.torch_blocks import input_order, load_refattn_params, make_module

    block = job["block"]
    dtype = getattr(torch, job["dtype"])
    dev = torch.device(job.get("device") or "cpu")
    shapes = {k: tuple(v) for k, v in job["shapes"].items()}
    cfg = build_config(block, job["preset"], job["overrides"], shapes)
    inputs, params, state, dout = _draw(block, cfg, shapes, job["seed"])
    module = make_module(block, cfg, shapes).to(device=dev, dtype=dtype)
    load_refattn_params(module, block, {**params, **state})
    xs = [
        torch.tensor(inputs[k], dtype=dtype, device=dev).requires_grad_()
        for k in input_order(block, shapes)
    ]
    dy = torch.tensor(dout, dtype=dtype, device=dev)
    del inputs, params, state, dout
    sum_loss = job.get("torch_loss", "vjp") == "sum"

    def clear() -> None:
        module.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None

    def rep() -> None:
        clear()
        y = module(*xs)
        if sum_loss:
            (y * dy).sum().backward()
        else:
            y.backward(dy)

    _runtime_warmup("torch", job.get("device"))
    if dev.type == "cuda":
        sync = torch.cuda.synchronize
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = _time_loop(rep, job["warmup"], job["reps"], sync, job["min_time"], clear)
        res["peak_mb"] = res["peak_first_mb"] = res["peak_hwm_mb"] = (
            torch.cuda.max_memory_allocated() - base
        ) / 2**20
        res["mem_method"] = "torch.cuda.max_memory_allocated"
        return res
    with torch.enable_grad():
        return _time_loop(
            rep, job["warmup"], job["reps"], _sync_none, job["min_time"], clear
        )


# ---------------------------------------------------------------------------
# GEMM, gradcheck, info


def _gemm(job: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    n, dtype = job["n"], job["dtype"]
    rng = np.random.default_rng(0)
    a_h, b_h = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    if job["side"] == "torch":
        import torch

        dev = torch.device(job.get("device") or "cpu")
        a = torch.tensor(a_h, dtype=getattr(torch, dtype), device=dev)
        b = torch.tensor(b_h, dtype=getattr(torch, dtype), device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else _sync_none

        def rep() -> None:
            torch.mm(a, b)
    elif job.get("device") == "cuda":
        import cupy

        a, b = cupy.asarray(a_h.astype(dtype)), cupy.asarray(b_h.astype(dtype))
        sync = cupy.cuda.Device().synchronize

        def rep() -> None:
            cupy.matmul(a, b)
    else:
        a, b = a_h.astype(dtype), b_h.astype(dtype)
        sync = _sync_none

        def rep() -> None:
            np.matmul(a, b)

    res = _time_loop(rep, job["warmup"], job["reps"], sync, 0.0)
    res["flops"] = 2 * n**3
    return res


def _gradcheck_case(
    block: str, preset: str | None
) -> tuple[Any, Any, dict, dict, dict]:
    """The case ``refattn gradcheck --block B [--preset P]`` checks first (for
    BN presets the train-mode case): float64 fixture shapes, margins kept."""
    from refattn.blocks.registry import BLOCKS
    from refattn.blocks.spec import config_from_dict
    from refattn.golden.generate import expand_requests, generate_case, split_case

    spec = BLOCKS[block]
    req, cfg = expand_requests(block, preset, {}, seed=0)[0]
    case = generate_case(req, cfg)
    inputs, params, state = split_case(case.tensors)
    resolved = config_from_dict(spec.config_cls, case.manifest["config"])
    return spec, resolved, inputs, params, state


def _gradcheck(job: Mapping[str, Any]) -> dict[str, Any]:
    block, variant = job["block"], job["variant"]
    spec, cfg, inputs, params, state = _gradcheck_case(block, job["preset"])
    from refattn.params import is_buffer

    n_elems = sum(int(v.size) for v in inputs.values()) + sum(
        int(v.size) for k, v in params.items() if not is_buffer(k)
    )
    info: dict[str, Any] = {
        "shapes": {k: list(v.shape) for k, v in inputs.items()},
        "elements": n_elems,
    }
    if job["side"] == "refattn":
        from refattn.blocks.registry import gradcheck_block, run_block

        run_block(spec, cfg, inputs, params, state)  # warm the code paths, like torch's
        t0 = time.perf_counter()
        report = gradcheck_block(spec, cfg, inputs, params, state, mode=variant, seed=0)
        info["seconds"] = time.perf_counter() - t0
        info["ok"] = bool(report.ok)
        return info

    import torch
    from torch.func import functional_call

    from benchmarks.torch_blocks import input_order, load_refattn_params, make_module

    shapes = {k: tuple(v.shape) for k, v in inputs.items()}
    module = make_module(block, cfg, shapes).double()
    load_refattn_params(module, block, {**params, **state})
    names = input_order(block, shapes)
    pnames = list(dict(module.named_parameters()))
    xs = [torch.tensor(inputs[k], requires_grad=True) for k in names]
    ps = [p.detach().clone().requires_grad_() for p in module.parameters()]
    n_in = len(xs)

    def f(*args: torch.Tensor) -> torch.Tensor:
        return functional_call(
            module, dict(zip(pnames, args[n_in:])), tuple(args[:n_in])
        )

    # warm up: autograd engine, oneDNN primitives for these shapes
    f(*xs, *ps).sum().backward()
    n_out = int(f(*xs, *ps).numel())
    info["outputs"] = n_out
    if variant == "default":
        # the slow mode stores a numerical and an analytical Jacobian
        jac_gb = 2 * n_elems * n_out * 8 / 2**30
        info["jacobian_gb"] = jac_gb
        if jac_gb > job.get("max_jacobian_gb", 2.0):
            info["seconds"] = None
            info["ok"] = None
            info["skipped"] = f"needs {jac_gb:.1f} GB for its two dense Jacobians"
            return info
    t0 = time.perf_counter()
    ok = torch.autograd.gradcheck(
        f, (*xs, *ps), fast_mode=variant == "fast_mode", raise_exception=False
    )
    info["seconds"] = time.perf_counter() - t0
    info["ok"] = bool(ok)
    return info


def _info(job: Mapping[str, Any]) -> dict[str, Any]:
    import platform

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(
                (
                    "MALLOC_",
                    "OPENBLAS",
                    "OMP_",
                    "MKL_",
                    "GOTO",
                    "LD_PRELOAD",
                    "ATEN_",
                    "NPY_",
                    "KMP_",
                )
            )
        },
    }
    import numpy as np

    out["numpy"] = np.__version__
    if job["side"] == "refattn":
        import refattn

        out["refattn"] = refattn.__version__
        try:
            from threadpoolctl import threadpool_info

            out["threadpools"] = threadpool_info()
        except ImportError:
            out["threadpools"] = "threadpoolctl not installed"
        try:
            import cupy

            out["cupy"] = cupy.__version__
            out["cupy_available"] = bool(cupy.is_available())
        except Exception as exc:  # noqa: BLE001  (ImportError, or CuPy's driver errors)
            out["cupy"] = f"unavailable: {type(exc).__name__}"
    else:
        import torch

        out["torch"] = torch.__version__
        out["threads"] = torch.get_num_threads()
        out["interop_threads"] = torch.get_num_interop_threads()
        out["mkl"] = torch.backends.mkl.is_available()
        out["mkldnn"] = torch.backends.mkldnn.is_available()
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["parallel_info"] = torch.__config__.parallel_info()
        out["config"] = torch.__config__.show()
        out["cuda"] = torch.cuda.is_available()
        if out["cuda"]:
            out["cuda_device"] = torch.cuda.get_device_name()
    return out


TASKS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "gemm": _gemm,
    "gradcheck": _gradcheck,
    "info": _info,
}


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    if job["task"] == "block":
        res = (_block_torch if job["side"] == "torch" else _block_refattn)(job)
    else:
        res = TASKS[job["task"]](job)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
