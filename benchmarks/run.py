"""refattn (NumPy) against PyTorch eager autograd, side by side in one run.

    python -m benchmarks.run                      # the full CPU suite
    python -m benchmarks.run --quick --blocks gap  # a smoke run (seconds)
    python -m benchmarks.run --update-docs         # also rewrite docs/benchmarks.md
    python -m benchmarks.run --gpu                 # CuPy vs PyTorch CUDA (GPU machines)

Every measurement runs in a fresh worker process (``benchmarks/worker.py``):
one per (block, side, dtype, round), the two sides alternating, with the
BLAS/OpenMP/allocator environment variables a normal user does not set
removed and the same allocator settings for both sides.  See
docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(ROOT))

from benchmarks.cases import (
    BLOCK_ORDER,
    STANDARD,
    SWEEP_BLOCKS,
    build_config,
    flops,
    sweep_shapes,
)

RESULTS_DIR = ROOT / "benchmarks" / "results"
DOCS_PATH = ROOT / "docs" / "benchmarks.md"

# Variables that change which kernels or how many threads BLAS / OpenMP / the
# allocator use.  A normal user's shell has none of them; the parent may (CI
# images set OPENBLAS_CORETYPE=Haswell, which halves NumPy's GEMM on AVX-512).
SCRUB_PREFIXES = (
    "OPENBLAS_",
    "GOTO",
    "OMP_",
    "MKL_",
    "KMP_",
    "MALLOC_",
    "ATEN_",
    "NPY_",
    "GLIBC_TUNABLES",
    "PYTHONMALLOC",
    "DNNL_",
    "ONEDNN_",
)

# glibc malloc settings, identical for both sides.  "default": glibc's own
# (a dynamic mmap threshold, large freed blocks go back to the kernel and are
# page-faulted in again on reuse); "retain": freed memory stays in the heap.
MALLOC_MODES: dict[str, dict[str, str]] = {
    "default": {},
    "retain": {
        "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
    },
}

SIDES = ("refattn", "torch")
# The standard table (CPU) also times refattn's matmuls alone ("matmuls": the
# worker replays the matmuls of one forward + backward on their operands), so
# each row carries its floor: matmuls alone / PyTorch, the ratio refattn would
# reach if every pass but the BLAS calls were free.
FLOOR_SIDES = ("refattn", "matmuls", "torch")


# ---------------------------------------------------------------------------
# environment and workers


def clean_env(malloc: str) -> tuple[dict[str, str], dict[str, str]]:
    """The workers' environment and the variables removed from ours."""
    env = dict(os.environ)
    scrubbed = {k: v for k, v in env.items() if k.startswith(SCRUB_PREFIXES)}
    for k in scrubbed:
        del env[k]
    env.update(MALLOC_MODES[malloc])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env, scrubbed


class WorkerError(RuntimeError):
    pass


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def background_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` while this benchmark is idle:
    the load other processes put on the machine (None where /proc/stat is
    unreadable)."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


QUIET = {"threshold": 0.0, "max_wait": 0.0}


def wait_quiet() -> float | None:
    """Wait (up to QUIET['max_wait'] s) until other processes use less than
    QUIET['threshold'] of the CPUs; return the last background measurement."""
    busy = background_busy(0.5)
    if busy is None or QUIET["threshold"] <= 0:
        return busy
    deadline = time.monotonic() + QUIET["max_wait"]
    while (
        busy is not None and busy > QUIET["threshold"] and time.monotonic() < deadline
    ):
        time.sleep(2.0)
        busy = background_busy(1.0)
    return busy


def run_worker(
    job: Mapping[str, Any], env: Mapping[str, str], timeout: float | None = None
) -> dict[str, Any]:
    """Run one job in a fresh interpreter; its last stdout line is the JSON."""
    busy = wait_quiet() if job.get("task") in ("block", "gemm") else None
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(dict(job))]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=dict(env),
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkerError(f"timeout after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise WorkerError(f"worker failed ({proc.returncode}): " + " | ".join(tail))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["background_busy"] = busy
    return res


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    q = (
        statistics.quantiles(ms, n=4, method="inclusive")
        if len(ms) > 1
        else [ms[0]] * 3
    )
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "n": len(ms),
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
        mem = next(
            line
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem_gb = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gb = None
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": mem_gb,
        "simd": simd,
        "kernel": platform.release(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
    }


def _uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, check=False, text=True
        ).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the measurements


def measure_block(
    block: str,
    dtype: str,
    shapes: Mapping[str, Any],
    args: argparse.Namespace,
    env: Mapping[str, str],
    rounds: int,
    device: str,
    sides: Sequence[str] = SIDES,
) -> dict[str, Any]:
    """Every side, `rounds` fresh processes each, the order alternating."""
    case = STANDARD[block]
    per_side: dict[str, dict[str, Any]] = {s: {"times": [], "runs": []} for s in sides}
    for r in range(rounds):
        order = tuple(sides) if r % 2 == 0 else tuple(sides)[::-1]
        for side in order:
            job = {
                "task": "block",
                "side": side,
                "block": block,
                "dtype": dtype,
                "preset": case.preset,
                "overrides": dict(case.overrides),
                "shapes": {k: list(v) for k, v in shapes.items()},
                "seed": args.seed,
                "warmup": args.warmup,
                "reps": args.reps,
                "min_time": args.min_time,
                "device": device,
                "torch_loss": args.torch_loss,
            }
            try:
                res = run_worker(job, env, timeout=args.timeout)
            except WorkerError as exc:
                _log(f"  {block} {dtype} {side}: {exc}")
                per_side[side]["error"] = str(exc)
                continue
            per_side[side]["times"] += res.pop("times")
            per_side[side]["runs"].append(res)
    out: dict[str, Any] = {"shapes": {k: list(v) for k, v in shapes.items()}}
    cfg = build_config(block, case.preset, case.overrides, shapes)
    fl = flops(block, cfg, shapes)
    out["flops"] = fl
    for side, d in per_side.items():
        if not d["times"]:
            out[side] = {"error": d.get("error", "no result")}
            continue
        runs = d["runs"]
        s = summarize(d["times"])
        s["first_ms"] = min(x["first_s"] for x in runs) * 1e3
        live = [x["peak_mb"] for x in runs if x.get("peak_mb") is not None]
        s["peak_mb"] = max(live) if live else max(x["peak_hwm_mb"] for x in runs)
        s["peak_method"] = "live (mallopt)" if live else "VmHWM"
        s["peak_hwm_mb"] = max(x.get("peak_hwm_mb", x["peak_mb"]) for x in runs)
        s["peak_first_mb"] = max(x["peak_first_mb"] for x in runs)
        s["mem_method"] = runs[0]["mem_method"]
        s["minflt_per_rep"] = statistics.mean(x["minflt_per_rep"] for x in runs)
        s["nivcsw_per_rep"] = statistics.mean(x["nivcsw_per_rep"] for x in runs)
        cpw = [x["cpu_per_wall"] for x in runs if x["cpu_per_wall"] is not None]
        s["cpu_per_wall"] = statistics.mean(cpw) if cpw else None
        s["loadavg_1min"] = [x["loadavg"][0] for x in runs]
        s["background_busy"] = [x.get("background_busy") for x in runs]
        s["gflops"] = (
            fl["total"] / (s["median_ms"] * 1e-3) / 1e9 if fl["total"] else None
        )
        out[side] = s
    if "median_ms" in out["refattn"] and "median_ms" in out["torch"]:
        out["ratio"] = out["refattn"]["median_ms"] / out["torch"]["median_ms"]
        out["ratio_min"] = out["refattn"]["min_ms"] / out["torch"]["min_ms"]
    if "median_ms" in out.get("matmuls", {}) and "median_ms" in out["torch"]:
        out["floor"] = out["matmuls"]["median_ms"] / out["torch"]["median_ms"]
    return out


def measure_gemm(
    args: argparse.Namespace, env: Mapping[str, str], dtypes: Sequence[str], device: str
) -> dict[str, Any]:
    n = args.gemm_n or (8192 if device == "cuda" else 1024 if args.quick else 2048)
    out: dict[str, Any] = {"n": n}
    for dtype in dtypes:
        for side in SIDES:
            job = {
                "task": "gemm",
                "side": side,
                "dtype": dtype,
                "n": n,
                "warmup": 1 if args.quick else 2,
                "reps": 3 if args.quick else 10,
                "device": device,
            }
            try:
                res = run_worker(job, env, timeout=args.timeout)
            except WorkerError as exc:
                out[f"{side}/{dtype}"] = {"error": str(exc)}
                continue
            s = summarize(res["times"])
            s["gflops"] = res["flops"] / (s["median_ms"] * 1e-3) / 1e9
            s["gflops_best"] = res["flops"] / (s["min_ms"] * 1e-3) / 1e9
            s["minflt_per_rep"] = res["minflt_per_rep"]
            out[f"{side}/{dtype}"] = s
            _log(
                f"  gemm {n}^3 {side:7s} {dtype}: {s['gflops']:.0f} GFLOP/s "
                f"(median), {s['gflops_best']:.0f} (best)"
            )
    return out


def measure_gradcheck(
    blocks: Sequence[str], args: argparse.Namespace, env: Mapping[str, str]
) -> dict[str, Any]:
    variants = [
        ("refattn", "fast"),
        ("refattn", "full"),
        ("torch", "fast_mode"),
        ("torch", "default"),
    ]
    out: dict[str, Any] = {}
    for block in blocks:
        row: dict[str, Any] = {}
        for side, variant in variants:
            job = {
                "task": "gradcheck",
                "side": side,
                "block": block,
                "preset": STANDARD[block].preset,
                "variant": variant,
                "max_jacobian_gb": args.gradcheck_max_jacobian_gb,
            }
            try:
                res = run_worker(job, env, timeout=args.gradcheck_timeout)
            except WorkerError as exc:
                row[f"{side}/{variant}"] = {"error": str(exc)}
                _log(f"  gradcheck {block} {side} {variant}: {exc}")
                continue
            row[f"{side}/{variant}"] = res
            row.setdefault("shapes", res["shapes"])
            row.setdefault("elements", res["elements"])
            if "outputs" in res:
                row["outputs"] = res["outputs"]
            took = (
                "skipped: " + res["skipped"]
                if res.get("skipped")
                else f"{res['seconds']:8.2f} s ok={res['ok']}"
            )
            _log(f"  gradcheck {block} {side:7s} {variant:9s} {took}")
        # the CLI, as a user runs it (process start, case generation, every BN mode)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*refattn_cli(), "gradcheck", "--block", block],
            cwd=ROOT,
            env=dict(env),
            capture_output=True,
            check=False,
            text=True,
        )
        if proc.returncode in (0, 1):
            row["cli_fast_s"] = time.perf_counter() - t0
        else:
            row["cli_fast_s"] = None
            row["cli_error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        out[block] = row
    return out


def measure_golden(env: Mapping[str, str]) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="refattn-golden-bench-")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*refattn_cli(), "golden", "--all", "--out", tmp],
            cwd=ROOT,
            env=dict(env),
            capture_output=True,
            check=False,
            text=True,
        )
        wall = time.perf_counter() - t0
        cases = sum(1 for _ in Path(tmp).glob("*/*/manifest.json"))
        res: dict[str, Any] = {"seconds": wall, "cases": cases, "rc": proc.returncode}
        if proc.returncode != 0:
            res["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refattn_cli() -> list[str]:
    """The ``refattn`` console script beside this interpreter (as a user runs
    it), else the module."""
    script = Path(sys.executable).with_name("refattn")
    if script.exists():
        return [str(script)]
    found = shutil.which("refattn")
    return [found] if found else [sys.executable, "-m", "refattn.cli.main"]


# ---------------------------------------------------------------------------
# driver


SECTIONS = ("gemm", "standard", "sweep", "gradcheck", "golden")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--blocks",
        default=",".join(BLOCK_ORDER),
        help="comma-separated blocks (default: all)",
    )
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"what to run, a subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--reps", type=int, default=15, help="timed reps per process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="fresh processes per side, alternating the order of the sides",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.5,
        help="keep timing until this many seconds (at most 20 x reps)",
    )
    p.add_argument(
        "--malloc",
        choices=("default", "retain", "both"),
        default="both",
        help="glibc allocator settings (identical for both sides); 'both' "
        "runs the standard table under each",
    )
    p.add_argument(
        "--torch-loss",
        choices=("vjp", "sum"),
        default="vjp",
        help="torch backward as y.backward(dy) or (y*dy).sum().backward()",
    )
    p.add_argument(
        "--sweep",
        default="14,20,28,40,56",
        help="spatial sizes of the attention-block sweep",
    )
    p.add_argument("--sweep-dtypes", default="float32")
    p.add_argument("--gradcheck-timeout", type=float, default=600.0)
    p.add_argument(
        "--gradcheck-max-jacobian-gb",
        type=float,
        default=2.0,
        help="skip torch's default (dense Jacobian) gradcheck above this",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the float64 equivalence check of the PyTorch modules",
    )
    p.add_argument("--gemm-n", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="per worker, seconds")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 reps, one round, GEMM 1024, standard shapes only",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="before each timing process, wait until other processes use "
        "less than this fraction of the CPUs (0: never wait)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="longest wait for --quiet per process",
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="refattn on CuPy vs PyTorch CUDA (needs a GPU)",
    )
    p.add_argument("--out", type=Path, default=None, help="results JSON path")
    p.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="start from this results JSON and replace only what this run "
        "measures (rerun noisy blocks); written back to it unless --out",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help=f"rewrite the generated part of {DOCS_PATH.relative_to(ROOT)}",
    )
    args = p.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.reps, args.warmup, args.rounds, args.min_time = 3, 1, 1, 0.0
        args.quiet = 0.0
        args.sections = [x for x in args.sections if x in ("gemm", "standard")]
        if args.malloc == "both":
            args.malloc = "default"
    if args.gpu:  # gradchecks and fixtures are float64 CPU work
        args.sections = [x for x in args.sections if x not in ("gradcheck", "golden")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    QUIET.update(threshold=args.quiet, max_wait=args.quiet_wait)
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    unknown = [b for b in blocks if b not in STANDARD]
    if unknown:
        print(
            f"--blocks: unknown {unknown}; known: {', '.join(BLOCK_ORDER)}",
            file=sys.stderr,
        )
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    device = "cuda" if args.gpu else "cpu"
    modes = ["default", "retain"] if args.malloc == "both" else [args.malloc]
    env, scrubbed = clean_env("default")
    started = time.time()
    now = _dt.datetime.now().isoformat(timespec="seconds")
    results: dict[str, Any] = {}
    if args.merge is not None:
        results = json.loads(args.merge.read_text())
        results.setdefault("merged_runs", []).append(
            {
                "date": now,
                "argv": list(argv) if argv is not None else sys.argv[1:],
                "uptime": _uptime(),
            }
        )
    else:
        results = {
            "schema": "refattn-bench/1",
            "date": now,
            "device": device,
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "uptime_start": _uptime(),
        }
    results["machine"] = machine_info()
    results["scrubbed_env"] = scrubbed
    results.setdefault("malloc_modes", {}).update({m: MALLOC_MODES[m] for m in modes})
    _log(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; "
        f"{_uptime()}"
    )
    if scrubbed:
        _log(f"removed from the workers' environment: {scrubbed}")
    results["info"] = {
        side: run_worker({"task": "info", "side": side}, env) for side in SIDES
    }
    if device == "cuda":
        checks = (
            ("torch.cuda.is_available()", results["info"]["torch"].get("cuda")),
            ("cupy.is_available()", results["info"]["refattn"].get("cupy_available")),
        )
        missing = [what for what, ok in checks if not ok]
        if missing:
            print(
                f"--gpu: no usable GPU here ({' and '.join(missing)}: False)",
                file=sys.stderr,
            )
            return 2

    if not args.no_check:
        _log("checking the PyTorch modules against refattn (float64, small shapes)")
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.equivalence", *blocks],
            cwd=ROOT,
            env=env,
            capture_output=True,
            check=False,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results.setdefault("equivalence", {}).update(json.loads(proc.stdout))

    if "gemm" in args.sections:
        _log("GEMM")
        results["gemm"] = measure_gemm(args, env, dtypes, device)

    if "standard" in args.sections:
        std = results.setdefault("standard", {})
        for mode in modes:
            env_m, _ = clean_env(mode)
            table = std.setdefault(mode, {})
            for block in blocks:
                for dtype in dtypes:
                    res = measure_block(
                        block,
                        dtype,
                        STANDARD[block].shapes,
                        args,
                        env_m,
                        args.rounds,
                        device,
                        FLOOR_SIDES if device == "cpu" else SIDES,
                    )
                    res["measured_at"] = _dt.datetime.now().isoformat(
                        timespec="seconds"
                    )
                    table[f"{block}/{dtype}"] = res
                    _log(f"  [{mode}] {block:11s} {dtype}: " + _line(res))
            # keep the table in the canonical block order after a merge
            std[mode] = {
                k: table[k]
                for k in sorted(
                    table, key=lambda k: (BLOCK_ORDER.index(k.split("/")[0]), k)
                )
            }

    sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    sweep_blocks = [b for b in blocks if b in SWEEP_BLOCKS]
    if "sweep" in args.sections and sweep and sweep_blocks:
        _log("size sweep")
        table = results.setdefault("sweep", {})
        for block in sweep_blocks:
            for dtype in [d.strip() for d in args.sweep_dtypes.split(",") if d.strip()]:
                for side_len in sweep:
                    shapes = sweep_shapes(block, side_len)
                    res = measure_block(block, dtype, shapes, args, env, 1, device)
                    res["hw"] = side_len * side_len
                    res["measured_at"] = _dt.datetime.now().isoformat(
                        timespec="seconds"
                    )
                    table[f"{block}/{dtype}/{side_len}"] = res
                    _log(f"  {block:11s} {dtype} {side_len}x{side_len}: " + _line(res))
        results["sweep"] = {
            k: table[k]
            for k in sorted(
                table,
                key=lambda k: (
                    BLOCK_ORDER.index(k.split("/")[0]),
                    k.split("/")[1],
                    int(k.split("/")[2]),
                ),
            )
        }

    if "gradcheck" in args.sections:
        _log("gradcheck timing")
        results.setdefault("gradcheck", {}).update(measure_gradcheck(blocks, args, env))
        results["gradcheck"] = {
            b: results["gradcheck"][b] for b in BLOCK_ORDER if b in results["gradcheck"]
        }
    if "golden" in args.sections:
        _log("refattn golden --all")
        results["golden_all"] = measure_golden(env)
        _log(f"  {results['golden_all']}")

    results["uptime_end"] = _uptime()
    results["elapsed_s"] = results.get("elapsed_s", 0.0) + time.time() - started
    suffix = "-quick" if args.quick else ""
    out = (
        args.out
        or args.merge
        or (RESULTS_DIR / f"{_dt.date.today().isoformat()}-{device}{suffix}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    from benchmarks.report import render_markdown, update_docs

    md = render_markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    _log(f"wrote {out} and {out.with_suffix('.md')}")
    if args.update_docs:
        update_docs(DOCS_PATH, results, out)
        _log(f"updated {DOCS_PATH}")
    return 0


def _line(res: Mapping[str, Any]) -> str:
    parts = []
    for side in (name for name in FLOOR_SIDES if name in res):
        s = res[side]
        if "median_ms" in s:
            parts.append(
                f"{side} {s['median_ms']:8.2f} ms (peak {s['peak_mb']:6.1f} MB, "
                f"load {max(s['loadavg_1min']):.1f})"
            )
        else:
            parts.append(f"{side} ERROR")
    if "ratio" in res:
        parts.append(f"ratio {res['ratio']:.2f}")
    if "floor" in res:
        parts.append(f"floor {res['floor']:.2f}")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
