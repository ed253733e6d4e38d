"""Concurrent writers into one fixture tree.

Real ``refattn golden`` processes race for the same cases: without --force
exactly one wins and the loser exits 2 with one line saying the case exists;
with --force every run succeeds and the survivors are complete cases.
Processes writing different cases into one block directory never remove
each other's live temporary directories (the stale sweep only takes
directories whose writer's flock is gone).  tests/golden/test_format.py
covers the same races between threads of one process.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import (
    FIGURES,
    assert_one_error_line,
    refattn_cmd,
    subprocess_env,
    temporaries,
    write_small_case,
)
from refattn.golden.format import find_cases, verify_case

SMALL = ["-b", "conv1x1", "--shape", "x=1,2,2,3", "--set", "out_channels=2"]


def _race(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen(refattn_cmd(*argv), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for argv in argvs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    FIGURES["concurrent golden runs"] += len(argvs)
    return out


def _all_complete(root: Path) -> list[Path]:
    cases = find_cases(root)
    assert cases
    for case in cases:
        result = verify_case(case)
        assert result.ok, result.problems
    assert temporaries(root) == []
    return cases


def _settled(results: list, *, winners: int = 1) -> None:
    """Identical runs racing for one case: each keeps the case the other
    wrote (exit 0, ``kept (identical)``) or, when the other published it
    between its check and its own write, refuses in one line (exit 2);
    at least `winners` runs exit 0."""
    codes = [r.returncode for r in results]
    assert set(codes) <= {0, 2} and codes.count(0) >= winners, [
        (r.returncode, r.stderr) for r in results]
    for loser in (r for r in results if r.returncode == 2):
        line = assert_one_error_line(loser.stderr, loser.stdout)
        assert "case exists" in line, line


@pytest.mark.parametrize("trial", range(3))
def test_two_identical_runs_leave_one_case(tmp_path: Path, trial: int) -> None:
    out = str(tmp_path / "out")
    results = _race(["golden", *SMALL, "--out", out], ["golden", *SMALL, "--out", out])
    _settled(results)
    assert len(_all_complete(tmp_path / "out")) == 1


def test_two_forced_runs_both_succeed(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_small_case(tmp_path / "out", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                     overrides={"out_channels": 2})
    results = _race(["golden", *SMALL, "--force", "--out", out],
                    ["golden", *SMALL, "--force", "--out", out],
                    ["golden", *SMALL, "--out", out])
    assert [r.returncode for r in results[:2]] == [0, 0], [r.stderr for r in results]
    _settled(results[2:], winners=0)
    assert len(_all_complete(tmp_path / "out")) == 1


@pytest.mark.slow
def test_two_full_sets_race(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    _settled(_race(["golden", "--all", "--out", out], ["golden", "--all", "--out", out]))
    n = len(_all_complete(tmp_path / "out"))
    forced = _race(["golden", "--all", "--force", "--out", out],
                   ["golden", "--all", "--force", "--out", out])
    assert [r.returncode for r in forced] == [0, 0], [r.stderr for r in forced]
    assert len(_all_complete(tmp_path / "out")) == n


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from refattn.golden.format import write_case
    from refattn.golden.generate import expand_requests, generate_case

    root, me, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    req, cfg = expand_requests("conv1x1", None, {"out_channels": 2},
                               shapes={"x": (1, 2, 2, 3)}, seed=me)[0]
    case = generate_case(req, cfg)
    for i in range(rounds):
        # each writer replaces its own case over and over (sweeping as it goes)
        # and, every other round, a case all writers share
        for cid in (case.case_id, "shared") if i % 2 else (case.case_id,):
            m = dict(case.manifest, case_id=cid)
            write_case(root, "conv1x1", cid, case.tensors, m, force=True,
                       tolerances=case.tolerances, accumulation=case.accumulation)
    print("done")
""")


def test_writers_of_different_cases_share_a_block_directory(tmp_path: Path) -> None:
    root = tmp_path / "out"
    n, rounds = 4, 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(i),
                               str(rounds)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for i in range(n)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    FIGURES["concurrent library writers"] += n
    FIGURES["concurrent library writes"] += n * (rounds + rounds // 2)
    assert len(_all_complete(root)) == n + 1


def test_a_live_writers_temporary_is_not_swept(tmp_path: Path) -> None:
    """A temporary whose owner holds its flock survives other writers' sweeps;
    once the owner is gone, the next write removes it."""
    root = tmp_path / "out"
    block = root / "conv1x1"
    block.mkdir(parents=True)
    live = block / ".tmp-someone-0123456789ab"
    live.mkdir()
    (live / "manifest.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(live)!r}, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            print("holding", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        write_small_case(root, "conv1x1", shapes={"x": (1, 2, 2, 3)},
                         overrides={"out_channels": 2})
        assert live.is_dir(), "a live writer's temporary was swept"
        assert [p.name for p in find_cases(root)] == ["default-float64-out_channels.2-x.1x2x2x3-f776d748"]
    finally:
        holder.communicate("", timeout=30)
    write_small_case(root, "conv1x1", shapes={"x": (1, 2, 2, 3)},
                     overrides={"out_channels": 2}, force=True)
    assert not live.exists(), "a dead writer's temporary survived the next write"
    # and a user's own hidden directory, not named like a temporary, is kept
    mine = block / ".tmp-notes"
    mine.mkdir()
    write_small_case(root, "conv1x1", shapes={"x": (1, 2, 2, 3)},
                     overrides={"out_channels": 2}, force=True)
    assert mine.is_dir()
    assert fcntl is not None
