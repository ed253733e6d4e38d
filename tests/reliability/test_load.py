"""Under load: the whole fixture set, written and validated, in bounded memory.

``refattn golden --all`` into a fresh directory, and ``refattn validate`` of
every case of the committed golden/ set against a results file built from
the case itself (a perfect implementation: every case must PASS), each run
as a child of a fresh wrapper process whose ``getrusage(RUSAGE_CHILDREN)``
gives the child's peak RSS.  The bounds are generous (1 GiB, minutes); the
measured figures are printed in the "reliability figures" summary and
quoted in docs/reliability.md.  Timing belongs to benchmarks: these bounds
only catch a runaway.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import FIGURES, REPO, refattn_cmd, subprocess_env
from refattn.golden.format import find_cases, verify_case

MAX_RSS_MIB = 1024
MAX_SECONDS = 300

MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    t = time.perf_counter()
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB (Linux)
    print(json.dumps({"code": proc.returncode, "wall_s": wall,
                      "peak_mib": peak_kib / 1024, "stdout": proc.stdout[-4000:],
                      "stderr": proc.stderr[-4000:]}))
""")


def _measured(*argv: str, cwd: Path | None = None) -> dict[str, object]:
    """Run argv as the only child of a fresh process; its exit code, wall
    time and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True,
                          text=True, env=subprocess_env(), cwd=cwd,
                          timeout=MAX_SECONDS + 60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


pytestmark = pytest.mark.skipif(sys.platform != "linux",
                                reason="ru_maxrss units and fork semantics: Linux")


def test_golden_all_in_bounded_memory(tmp_path: Path) -> None:
    out = tmp_path / "all"
    m = _measured(*refattn_cmd("golden", "--all", "--out", str(out)))
    assert m["code"] == 0, m["stderr"]
    cases = find_cases(out)
    assert len(cases) >= 50 and all(verify_case(c).ok for c in cases)
    FIGURES["golden --all: cases written"] = len(cases)
    FIGURES["golden --all: peak RSS (MiB)"] = round(m["peak_mib"])
    FIGURES["golden --all: wall time (ms)"] = round(1000 * m["wall_s"])
    assert m["peak_mib"] < MAX_RSS_MIB and m["wall_s"] < MAX_SECONDS


VALIDATE_ALL = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from refattn.cli import main
    from refattn.golden.format import find_cases, read_case

    root, work = Path(sys.argv[1]), Path(sys.argv[2])
    prefixes = ("output.", "grad.input.", "grad.param.", "aux.")
    codes, t = [], time.perf_counter()
    for i, case in enumerate(find_cases(root)):
        tensors = read_case(case).tensors
        results = work / f"r{i}.npz"
        np.savez(results, **{k: v for k, v in tensors.items()
                             if k.startswith(prefixes)})
        try:
            main(["validate", str(case), "--results", str(results), "--json"],
                 standalone_mode=False)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code)
        results.unlink()
    print(json.dumps({"codes": codes, "seconds": time.perf_counter() - t}))
""")


def test_validate_every_committed_case_in_bounded_memory(tmp_path: Path) -> None:
    golden = REPO / "golden"
    if not golden.is_dir():
        pytest.skip("no committed golden/ set")
    n = len(find_cases(golden))
    m = _measured(sys.executable, "-c", VALIDATE_ALL, str(golden), str(tmp_path))
    assert m["code"] == 0, m["stderr"]
    lines = [ln for ln in str(m["stdout"]).splitlines() if ln.startswith('{"codes"')]
    data = json.loads(lines[-1])
    assert data["codes"] == [0] * n, data["codes"]  # every case PASSes perfect results
    FIGURES["validate (all committed cases): cases"] = n
    FIGURES["validate (all committed cases): peak RSS (MiB)"] = round(m["peak_mib"])
    FIGURES["validate (all committed cases): wall time (ms)"] = round(
        1000 * m["wall_s"])
    assert m["peak_mib"] < MAX_RSS_MIB and m["wall_s"] < MAX_SECONDS
    # and one real `refattn validate` process on the largest committed case
    largest = max(find_cases(golden),
                  key=lambda c: sum(f.stat().st_size for f in c.iterdir()))
    results = tmp_path / "largest.npz"
    from conftest import perfect_results

    perfect_results(largest, results)
    one = _measured(*refattn_cmd("validate", str(largest), "--results", str(results)))
    assert one["code"] == 0, one["stderr"]
    FIGURES["validate (largest case, one process): peak RSS (MiB)"] = round(
        one["peak_mib"])
    FIGURES["validate (largest case, one process): wall time (ms)"] = round(
        1000 * one["wall_s"])
    assert one["peak_mib"] < MAX_RSS_MIB
