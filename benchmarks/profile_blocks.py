"""Where the time goes: per-function, per-matmul and per-torch-op breakdowns.

    python -m benchmarks.profile_blocks --blocks cgnl,cross_layer --dtype float32
    python -m benchmarks.profile_blocks --blocks mlpconv --html /tmp/prof

For each block at its standard shape, after two warm-up calls:

1. refattn under cProfile: the functions of refattn (and the array-API
   wrappers it calls) by self time, with file:line;
2. every ``xp.matmul`` refattn makes, and every GEMM with β = 1 of the CPU
   tier (``refattn.cpu.blas``), timed individually: the calling line in
   refattn, operand shapes and strides, milliseconds and GFLOP/s (a matmul
   far below the machine's GEMM rate points at a layout problem or at a
   matmul too small to amortise its overhead);
3. PyTorch's eager ops under ``torch.profiler`` (self CPU time), for the
   same block, so the two sides' cost centres can be compared.

Run it on a quiet machine: the numbers are single-process wall times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from math import prod
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import BLOCK_ORDER, STANDARD, build_config


def _setup(block: str, dtype: str) -> tuple[Any, Any, dict, dict, dict, dict]:
    import numpy as np

    from benchmarks.worker import _draw
    from refattn.blocks.registry import BLOCKS

    case = STANDARD[block]
    cfg = build_config(block, case.preset, case.overrides, case.shapes)
    inputs, params, state, dout = _draw(block, cfg, case.shapes, 0)

    def cast(d: dict) -> dict:
        return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in d.items()}

    return (
        BLOCKS[block],
        cfg,
        cast(inputs),
        cast(params),
        cast(state),
        {"out": np.ascontiguousarray(dout, dtype=dtype)},
    )


def _caller(depth: int = 2) -> str:
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename
        if "/refattn/" in name and not name.endswith(("backend.py", "blas.py", "overrides.py")) \
                and f.f_code.co_name not in ("_add_product_into", "_product_into"):
            return f"{name.split('/refattn/', 1)[1]}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def matmul_log(
    spec: Any, cfg: Any, inputs: dict, params: dict, state: dict, douts: dict
) -> list[dict[str, Any]]:
    """Every matrix product of one forward+backward, timed, with its calling
    line: the matmuls, the CPU tier's GEMMs with β = 1 and its matmuls into
    a buffer's rows."""
    import array_api_compat.numpy as anp

    from refattn.cpu import blas

    orig, gemm, write = anp.matmul, blas._call, blas._write
    log: list[dict[str, Any]] = []

    def timed_call(tag: str, call: Callable[[], Any], a: Any, b: Any) -> Any:
        t0 = time.perf_counter()
        out = call()
        dt = time.perf_counter() - t0
        out_shape = tuple(a.shape[:-1]) + (b.shape[-1],) if out is None else out.shape
        fl = 2 * prod(out_shape) * a.shape[-1]
        log.append(
            {
                "where": _caller(3) + tag,
                "a": list(a.shape),
                "a_strides": list(a.strides),
                "b": list(b.shape),
                "b_strides": list(b.strides),
                "out": list(out_shape),
                "ms": dt * 1e3,
                "gflops": fl / dt / 1e9 if dt > 0 else None,
            }
        )
        return out

    def timed(a: Any, b: Any, /, **kw: Any) -> Any:
        return timed_call("", lambda: orig(a, b, **kw), a, b)

    def timed_gemm(found: Any, c: Any, a: Any, b: Any) -> None:
        timed_call(" [GEMM, beta = 1]", lambda: gemm(found, c, a, b), a, b)

    def timed_write(c: Any, a: Any, b: Any) -> None:
        timed_call(" [matmul into rows]", lambda: write(c, a, b), a, b)

    anp.matmul, blas._call, blas._write = timed, timed_gemm, timed_write
    try:
        _outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)
    finally:
        anp.matmul, blas._call, blas._write = orig, gemm, write
    return log


def cprofile_table(
    spec: Any,
    cfg: Any,
    inputs: dict,
    params: dict,
    state: dict,
    douts: dict,
    reps: int,
    top: int,
) -> tuple[float, list[dict[str, Any]]]:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(reps):
        outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)
        del outputs, cache
    prof.disable()
    wall = (time.perf_counter() - t0) / reps
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (fname, line, func), (_, nc, tt, ct, _) in entries:
        short = fname.split("/site-packages/", 1)[-1]
        short = short.split("/refattn/", 1)[-1] if "/refattn/" in short else short
        rows.append(
            {
                "function": f"{short}:{line}({func})",
                "calls": nc // reps,
                "self_ms": tt * 1e3 / reps,
                "cum_ms": ct * 1e3 / reps,
            }
        )
    rows.sort(key=lambda r: -r["self_ms"])
    return wall * 1e3, rows[:top]


def torch_ops(block: str, dtype: str, reps: int, top: int) -> tuple[float, list[dict]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.torch_blocks import input_order, load_refattn_params, make_module
    from benchmarks.worker import _draw

    case = STANDARD[block]
    cfg = build_config(block, case.preset, case.overrides, case.shapes)
    inputs, params, state, dout = _draw(block, cfg, case.shapes, 0)
    tdt = getattr(torch, dtype)
    module = make_module(block, cfg, case.shapes).to(tdt)
    load_refattn_params(module, block, {**params, **state})
    xs = [
        torch.tensor(inputs[k], dtype=tdt).requires_grad_()
        for k in input_order(block, case.shapes)
    ]
    dy = torch.tensor(dout, dtype=tdt)

    def rep() -> None:
        module.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None
        module(*xs).backward(dy)

    wall = _median_ms(rep, max(reps, 9)) / 1e3  # without the profiler's overhead
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            rep()
    rows = []
    for e in prof.key_averages():
        rows.append(
            {
                "op": e.key,
                "calls": e.count // reps,
                "self_ms": e.self_cpu_time_total / 1e3 / reps,
                "total_ms": e.cpu_time_total / 1e3 / reps,
            }
        )
    rows.sort(key=lambda r: -r["self_ms"])
    return wall * 1e3, rows[:top]


def profile_block(
    block: str, dtype: str, reps: int, top: int, html: Path | None, with_torch: bool
) -> dict[str, Any]:
    spec, cfg, inputs, params, state, douts = _setup(block, dtype)
    for _ in range(2):
        outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)
    del outputs, cache
    res: dict[str, Any] = {"block": block, "dtype": dtype}
    res["breakdown"] = breakdown(spec, cfg, inputs, params, state, douts, max(reps, 9))
    res["refattn_ms_profiled"], res["functions"] = cprofile_table(
        spec, cfg, inputs, params, state, douts, reps, top
    )
    res["matmuls"] = matmul_log(spec, cfg, inputs, params, state, douts)
    res["lines"] = line_times(spec, cfg, inputs, params, state, douts, reps)[:top]
    res["checks"] = check_log(spec, cfg, inputs, params, state, douts)
    by_line: dict[str, float] = defaultdict(float)
    for m in res["matmuls"]:
        by_line[m["where"]] += m["ms"]
    res["matmul_ms_total"] = sum(by_line.values())
    if html is not None:
        try:
            from pyinstrument import Profiler
        except ImportError:
            print("pyinstrument not installed; --html skipped", file=sys.stderr)
        else:
            p = Profiler(interval=0.0005)
            p.start()
            for _ in range(reps):
                _outputs, cache = spec.forward(inputs, params, state, cfg)
                spec.backward(douts, cache)
            p.stop()
            html.mkdir(parents=True, exist_ok=True)
            (html / f"{block}-{dtype}.html").write_text(p.output_html())
            (html / f"{block}-{dtype}.txt").write_text(p.output_text(unicode=False))
    if with_torch:
        res["torch_ms_profiled"], res["torch_ops"] = torch_ops(block, dtype, reps, top)
    return res


_GEMM_OPS = (
    "mkldnn_convolution",
    "convolution_backward",
    "slow_conv2d",
    "aten::bmm",
    "aten::mm",
    "aten::addmm",
)
"""Self-time entries of torch.profiler that are convolution / matmul kernels
(their parents, aten::convolution etc., have ~0 self time)."""


def _torch_gemm_ms(res: dict[str, Any]) -> float:
    """Self time of torch's convolution and matmul kernels in one profile."""
    return sum(
        r["self_ms"] for r in res["torch_ops"] if any(k in r["op"] for k in _GEMM_OPS)
    )


def _median_ms(fn: Any, reps: int) -> float:
    import statistics

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def line_times(
    spec: Any, cfg: Any, inputs: dict, params: dict, state: dict, douts: dict, reps: int
) -> list[dict[str, Any]]:
    """Wall time per source line of refattn over `reps` forward+backward calls.

    A line tracer runs in refattn's frames only; the time until the next
    traced event goes to the line that was executing, so a line's time
    includes the NumPy work it does inline (operators, ufuncs, matmuls) and
    any non-refattn function it calls, but not the refattn functions it
    calls (they have lines of their own).
    """
    import linecache

    times: dict[tuple[str, int], float] = defaultdict(float)
    hits: dict[tuple[str, int], int] = defaultdict(int)
    state_: list[Any] = [None, 0.0]  # the executing (file, line), since when

    def local(frame: Any, event: str, arg: Any) -> Any:
        now = time.perf_counter()
        if state_[0] is not None:
            times[state_[0]] += now - state_[1]
        if event == "line":
            state_[0] = (frame.f_code.co_filename, frame.f_lineno)
            hits[state_[0]] += 1
        elif event == "return":
            back = frame.f_back
            state_[0] = (
                (back.f_code.co_filename, back.f_lineno)
                if back is not None and "/refattn/" in back.f_code.co_filename
                else None
            )
        state_[1] = time.perf_counter()
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if "/refattn/" not in frame.f_code.co_filename:
            return None
        return local(frame, event, arg)

    sys.settrace(tracer)
    try:
        for _ in range(reps):
            outputs, cache = spec.forward(inputs, params, state, cfg)
            spec.backward(douts, cache)
            del outputs, cache
    finally:
        sys.settrace(None)
    rows = []
    for (fname, line), t in times.items():
        rows.append(
            {
                "where": f"{fname.split('/refattn/', 1)[1]}:{line}",
                "ms": t * 1e3 / reps,
                "hits": hits[(fname, line)] // reps,
                "code": linecache.getline(fname, line).strip(),
            }
        )
    rows.sort(key=lambda r: -r["ms"])
    return rows


def check_log(
    spec: Any, cfg: Any, inputs: dict, params: dict, state: dict, douts: dict
) -> list[dict[str, Any]]:
    """Every ``backend.check_finite`` call of one forward+backward, timed."""
    from refattn import backend

    original = backend.check_finite
    log: list[dict[str, Any]] = []

    def timed(name: str, a: Any) -> None:
        t0 = time.perf_counter()
        original(name, a)
        log.append(
            {
                "name": name,
                "shape": list(a.shape),
                "where": _caller(),
                "ms": (time.perf_counter() - t0) * 1e3,
            }
        )

    patched = [
        m
        for mod, m in list(sys.modules.items())
        if mod.startswith("refattn.") and getattr(m, "check_finite", None) is original
    ]
    for m in patched:
        m.check_finite = timed  # type: ignore[attr-defined]
    try:
        _outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)
    finally:
        for m in patched:
            m.check_finite = original  # type: ignore[attr-defined]
    return log


def breakdown(
    spec: Any, cfg: Any, inputs: dict, params: dict, state: dict, douts: dict, reps: int
) -> dict[str, float]:
    """Median fwd+bwd time split into matmuls, finiteness checks (both timed
    call by call) and the rest (element-wise ops, reductions, copies,
    allocation, Python), all in ms."""
    import resource

    def run() -> None:
        _outputs, cache = spec.forward(inputs, params, state, cfg)
        spec.backward(douts, cache)

    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = _median_ms(run, reps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / (reps + 2)
    mm = sorted(
        sum(m["ms"] for m in matmul_log(spec, cfg, inputs, params, state, douts))
        for _ in range(3)
    )[1]
    ck = sorted(
        sum(c["ms"] for c in check_log(spec, cfg, inputs, params, state, douts))
        for _ in range(3)
    )[1]
    return {
        "total_ms": total,
        "matmul_ms": mm,
        "checks_ms": ck,
        "other_ms": max(total - mm - ck, 0.0),
        "page_faults": faults,
    }


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            "| block | dtype | refattn ms | matmuls | finiteness checks | the rest | "
            "page faults / call | torch ms | torch conv/matmul kernels |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        b = res["breakdown"]
        t_total = res.get("torch_ms_profiled")
        t_gemm = _torch_gemm_ms(res) if "torch_ops" in res else None
        rows.append(
            f"| {res['block']} | {res['dtype']} | {b['total_ms']:.1f} | "
            f"{b['matmul_ms']:.1f} | "
            f"{b['checks_ms']:.1f} | {b['other_ms']:.1f} | {b['page_faults']:.0f} | "
            + (f"{t_total:.1f} | {t_gemm:.1f} |" if t_total is not None else "— | — |")
        )
    return "\n".join(rows)


def render(res: dict[str, Any]) -> str:
    b = res["breakdown"]
    out = [
        (
            f"== {res['block']} {res['dtype']}: refattn {b['total_ms']:.1f} ms per "
            f"fwd+bwd (median): matmuls {b['matmul_ms']:.1f}, finiteness checks "
            f"{b['checks_ms']:.1f}, the rest {b['other_ms']:.1f}; "
            f"{b['page_faults']:.0f} page faults per call"
        )
    ]
    out.append("-- refattn functions by self time (ms per fwd+bwd)")
    for r in res["functions"]:
        out.append(
            f"  {r['self_ms']:8.2f} self {r['cum_ms']:8.2f} cum {r['calls']:5d}x  "
            f"{r['function']}"
        )
    out.append(
        "-- refattn source lines by wall time (ms per fwd+bwd, under a line tracer)"
    )
    for r in res["lines"]:
        out.append(
            f"  {r['ms']:8.2f} {r['hits']:4d}x  {r['where']:34s} {r['code'][:90]}"
        )
    checks = sorted(res["checks"], key=lambda c: -c["ms"])
    out.append(
        f"-- finiteness checks: {len(checks)} calls, "
        f"{sum(c['ms'] for c in checks):.2f} ms; the largest:"
    )
    for c in checks[:6]:
        out.append(
            f"  {c['ms']:8.2f} ms  {c['name']:28s} {c['shape']!s:20s} {c['where']}"
        )
    out.append("-- refattn matmuls in call order")
    for m in res["matmuls"]:
        rate = f"{m['gflops']:6.0f}" if m["gflops"] else "     ?"
        out.append(
            f"  {m['ms']:8.2f} ms {rate} GFLOP/s  {m['a']!s:18s}{m['a_strides']!s:24s}"
            f" @ {m['b']!s:18s}{m['b_strides']!s:24s} {m['where']}"
        )
    if "torch_ops" in res:
        gemm_like = _torch_gemm_ms(res)
        out.append(
            f"-- torch ops by self CPU time (torch {res['torch_ms_profiled']:.1f} ms "
            f"per fwd+bwd (median, unprofiled); conv/matmul kernels "
            f"{gemm_like:.1f})"
        )
        for r in res["torch_ops"]:
            out.append(
                f"  {r['self_ms']:8.2f} self {r['total_ms']:8.2f} total "
                f"{r['calls']:4d}x  {r['op']}"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_blocks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--blocks", default=",".join(BLOCK_ORDER))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        help="also write pyinstrument HTML/text profiles to this folder",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = []
    for block in [b.strip() for b in args.blocks.split(",") if b.strip()]:
        res = profile_block(
            block, args.dtype, args.reps, args.top, args.html, not args.no_torch
        )
        print(render(res), flush=True)
        results.append(res)
    print(summary_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
