"""Shared pieces of the reliability tests: the CLI error contract, small
fixture cases, subprocess helpers, and the figures each test reports.

The figures (examples fuzzed, corruptions tried, interruption points, peak
memory, ...) are collected in a session-wide ``FIGURES`` dict and printed at
the end of the run ("reliability figures"), so every CI log carries the
numbers that docs/reliability.md quotes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES: Counter[str] = Counter()
"""Session-wide counters, printed by pytest_terminal_summary."""

CHECKED_PREFIXES = ("output.", "grad.input.", "grad.param.", "aux.")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for key in sorted(FIGURES):
            terminalreporter.write_line(f"{key}: {FIGURES[key]}")


# ---------------------------------------------------------------------------
# the CLI error contract


def assert_one_error_line(stderr: str, output: str = "") -> str:
    """Exit-2 contract: stderr holds exactly one ``Error: `` line, last, and
    nothing else but click's usage lines (``Usage: ...``, ``Try ...``) before
    it; no traceback anywhere.  Returns the error line."""
    assert "Traceback" not in stderr + output, stderr + output
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], stderr
    assert all(ln.startswith(("Usage: ", "Try ")) for ln in lines[:-1]), stderr
    assert "internal error" not in errors[0], stderr
    return errors[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """A child environment: one BLAS thread, no hypothesis or pytest state."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def refattn_cmd(*args: str) -> list[str]:
    """The installed console script when it is on PATH, else python -c."""
    exe = Path(sys.executable).with_name("refattn")
    if exe.is_file():
        return [str(exe), *args]
    return [sys.executable, "-c", "from refattn.cli import main; main()", *args]


def run_refattn(*args: str, timeout: float = 120, **kwargs: Any
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(refattn_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), **kwargs)


# ---------------------------------------------------------------------------
# small cases


def write_small_case(root: Path, block: str = "conv1x1", *, force: bool = False,
                     seed: int = 0, overrides: dict[str, Any] | None = None,
                     shapes: dict[str, tuple[int, ...]] | None = None,
                     dtype: str = "float64") -> Path:
    """Generate and write one real case (both formats); returns its directory."""
    from refattn.golden.format import write_case
    from refattn.golden.generate import expand_requests, generate_case

    req, cfg = expand_requests(block, None, overrides or {}, shapes=shapes,
                               seed=seed, dtype=dtype)[0]
    case = generate_case(req, cfg)
    return write_case(root, case.block, case.case_id, case.tensors, case.manifest,
                      tolerances=case.tolerances, accumulation=case.accumulation,
                      force=force)


def perfect_results(case_dir: Path, out: Path) -> Path:
    """A results file built from the case itself: a perfect implementation."""
    from refattn.golden.format import read_case

    case = read_case(case_dir)
    arrays = {k: v for k, v in case.tensors.items() if k.startswith(CHECKED_PREFIXES)}
    with open(out, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    return out


def snapshot(root: Path, *, skip_temporaries: bool = True) -> dict[str, bytes]:
    """Every file under `root` with its bytes (writers' hidden temporaries,
    ``.tmp-*`` and ``.old-*``, skipped when asked)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        if skip_temporaries:
            dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def temporaries(root: Path) -> list[Path]:
    """Writers' leftover temporaries under `root`."""
    return sorted(p for p in root.rglob("*")
                  if p.is_dir() and p.name.startswith((".tmp-", ".old-")))


@pytest.fixture(scope="session")
def small_case_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine tree with one small conv1x1 case; copy before changing it."""
    root = tmp_path_factory.mktemp("pristine")
    write_small_case(root, "conv1x1", shapes={"x": (1, 2, 2, 3)},
                     overrides={"out_channels": 2})
    return root
