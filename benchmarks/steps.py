"""The element-wise steps alone: NumPy, the CPU kernel tier and PyTorch.

    python -m benchmarks.steps                  # every step, float32 and float64
    python -m benchmarks.steps --steps softmax --dtypes float32 --reps 50

Each step the CPU kernel tier (``refattn.cpu``) replaces is timed forward +
backward at the shape it has inside a standard block case, three ways in one
process, the ways interleaved rep by rep so that a change in the machine's
load hits all three alike:

- ``numpy``: refattn's math step with ``REFATTN_KERNELS=generic`` (the
  NumPy formulas, several passes);
- ``tier``: the same call with the tier allowed (one multi-threaded numba
  pass where it applies);
- ``torch``: PyTorch's fused CPU op with autograd, on the same data.

The math steps are called, not the checked public functions, so no
finiteness screen is timed on either side.  This is the floor behind the
block ratios of ``benchmarks.run``: a block cannot beat PyTorch by more than
its GEMMs and these steps allow.  Printed: minimum and median ms per
forward + backward, and the ratios to PyTorch; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

Runner = Callable[[], Any]


def _steps(dtype: str) -> dict[str, tuple[str, Runner, Runner]]:
    """Step name -> (where its shape comes from, refattn fwd+bwd, torch fwd+bwd)."""
    import torch

    from refattn.ops.elementwise import _gate_mul, _gate_mul_backward
    from refattn.ops.norm import (
        _batch_norm,
        _batch_norm_backward,
        _group_norm,
        _group_norm_backward,
    )
    from refattn.ops.pool import _channel_pool, _max_pool, _max_pool_backward
    from refattn.ops.softmax import _softmax, _softmax_backward

    rng = np.random.default_rng(0)

    def draw(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    def leaf(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).requires_grad_()

    att, datt = draw(4, 784, 196), draw(4, 784, 196)  # non_local's attention
    z, dz = draw(4, 256, 28, 28), draw(4, 256, 28, 28)  # non_local's W output
    c = np.ones(256, dtype), np.zeros(256, dtype)
    y, dy = draw(8, 256, 784), draw(8, 256, 784)  # cgnl's z, GN with 8 groups
    xg, gate, dg = draw(8, 256, 28, 28), draw(8, 256, 1, 1), draw(8, 256, 28, 28)
    kv, dkv = draw(4, 256, 28, 28), draw(4, 256, 14, 14)  # non_local's phi|g
    k2 = ((2, 2), (2, 2), (14, 14))

    def softmax() -> None:
        _, cache = _softmax(att, 2)
        _softmax_backward(datt, cache)

    def batch_norm() -> None:
        (_, _, _), cache = _batch_norm(z, c[0], c[1], None, None, True, 0.1, 1e-5)
        _batch_norm_backward(dz, cache)

    def group_norm() -> None:
        _, cache = _group_norm(y, c[0], c[1], 8, 1e-5)
        _group_norm_backward(dy, cache)

    def gate_mul() -> None:
        _, cache = _gate_mul(xg, gate)
        _gate_mul_backward(dg, cache)

    def max_pool() -> None:
        _, cache = _max_pool(kv, *k2)
        _max_pool_backward(dkv, cache)

    def channel_pool() -> None:
        _channel_pool(xg, "max")
        _channel_pool(xg, "mean")

    t_att, t_z, t_y, t_xg, t_gate, t_kv = map(leaf, (att, z, y, xg, gate, kv))
    t_c = leaf(c[0]), leaf(c[1])
    F = torch.nn.functional

    def torch_softmax() -> None:
        torch.softmax(t_att, 2).backward(torch.from_numpy(datt))

    def torch_batch_norm() -> None:
        F.batch_norm(t_z, None, None, *t_c, True).backward(torch.from_numpy(dz))

    def torch_group_norm() -> None:
        F.group_norm(t_y, 8, *t_c).backward(torch.from_numpy(dy))

    def torch_gate_mul() -> None:
        (t_xg * torch.sigmoid(t_gate)).backward(torch.from_numpy(dg))

    def torch_max_pool() -> None:
        F.max_pool2d(t_kv, 2).backward(torch.from_numpy(dkv))

    def torch_channel_pool() -> None:
        with torch.no_grad():  # the tier replaces the forward only
            torch.max(t_xg, 1, keepdim=True)
            torch.mean(t_xg, 1, keepdim=True)

    return {
        "softmax": ("non_local attention (4,784,196)", softmax, torch_softmax),
        "batch_norm": ("non_local W_bn, train (4,256,28,28)", batch_norm,
                       torch_batch_norm),
        "group_norm": ("cgnl GN, 8 groups (8,256,784)", group_norm, torch_group_norm),
        "gate_mul": ("cbam channel gate (8,256,28,28)", gate_mul, torch_gate_mul),
        "max_pool": ("non_local 2x2 pool (4,256,28,28)", max_pool, torch_max_pool),
        "channel_pool": ("cbam channel max + mean (8,256,28,28), forward",
                         channel_pool, torch_channel_pool),
    }


def _timed(fn: Runner) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(steps: list[str], dtypes: list[str], reps: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for dtype in dtypes:
        table = _steps(dtype)
        for name in steps:
            where, ours, theirs = table[name]
            ways = {
                "numpy": partial(_with_kernels, "generic", ours),
                "tier": partial(_with_kernels, "auto", ours),
                "torch": theirs,
            }
            times: dict[str, list[float]] = {w: [] for w in ways}
            for w in ways.values():  # warm-up: numba's compile and caches
                w()
                w()
            for _ in range(reps):
                for way, fn in ways.items():
                    times[way].append(_timed(fn))
            row: dict[str, Any] = {"step": name, "dtype": dtype, "shape": where}
            for way, ts in times.items():
                row[f"{way}_min_ms"] = min(ts)
                row[f"{way}_median_ms"] = statistics.median(ts)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _with_kernels(value: str, fn: Runner) -> Any:
    old = os.environ.get("REFATTN_KERNELS")
    os.environ["REFATTN_KERNELS"] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["REFATTN_KERNELS"]
        else:
            os.environ["REFATTN_KERNELS"] = old


def _line(row: dict[str, Any]) -> str:
    def way(w: str) -> str:
        return f"{row[w + '_min_ms']:7.2f} ({row[w + '_median_ms']:7.2f})"

    t = row["torch_min_ms"]
    return (f"{row['step']:<13} {row['dtype']:<8} numpy {way('numpy')}  "
            f"tier {way('tier')}  torch {way('torch')} ms   min ratios to torch: "
            f"numpy {row['numpy_min_ms'] / t:.2f}, tier {row['tier_min_ms'] / t:.2f}")


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [("| step | shape | dtype | NumPy ms | CPU tier ms | PyTorch ms "
            "| NumPy / PyTorch | tier / PyTorch |"),
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["torch_min_ms"]
        out.append(
            f"| {r['step']} | {r['shape']} | {r['dtype']} | {r['numpy_min_ms']:.2f} "
            f"| {r['tier_min_ms']:.2f} | {t:.2f} | {r['numpy_min_ms'] / t:.2f} "
            f"| {r['tier_min_ms'] / t:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="softmax,batch_norm,group_norm,gate_mul,"
                   "max_pool,channel_pool")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows = measure(a.steps.split(","), a.dtypes.split(","), a.reps)
    print()
    print(markdown(rows))
    if a.json is not None:
        a.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
