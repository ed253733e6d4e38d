"""Kill a fixture write at every step and check what it leaves (a helper
process of test_interrupt.py, run as ``python interrupt_driver.py ARGS``).

The driver prepares one case write, counts the Python lines executed by the
writer (its functions in refattn/golden/format.py, publish.py and
containers.py, and the shutil calls they make) and then, for
every k, forks a child that performs the same write and kills itself with
SIGKILL (or sends itself SIGTERM, through the CLI's handler) at its k-th
line.  After each child the parent checks:

* the case directory holds the complete old case, the complete new case, or
  (no old case) nothing; never a partial one (``verify_case`` and digests);
* every other file under the root is byte-for-byte unchanged;
* leftover writer temporaries (``.tmp-*``/``.old-*``) appear only after
  SIGKILL, are invisible to ``find_cases``, and the next write into the
  same block directory removes them.

Prints one JSON object: the counts and the list of violations (empty when
every interruption point passed).  A single process with one BLAS thread, so
fork() is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

TRACED = {
    "write_case", "_write_file", "_fsync_dir", "_safetensors_bytes", "_write_npz",
    "_exchange", "_check_replaceable", "_locked", "_own", "_sweep_stale",
    "_make_temp_dir", "_publish",
}


WRITER_FILES = tuple(os.path.join("golden", f)
                     for f in ("format.py", "publish.py", "containers.py"))
"""The modules of refattn/golden that hold the TRACED functions."""


def _tracer(limit: int | None, sig: int | None, counter: list[int]) -> Any:
    """A sys.settrace function counting lines of the writer (and of shutil when
    the writer calls it); at line `limit` it delivers `sig` to this process."""

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            counter[0] += 1
            if limit is not None and counter[0] == limit:
                os.kill(os.getpid(), sig)
        return local

    def global_(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        name = code.co_filename
        writer = name.endswith(WRITER_FILES)
        if writer and code.co_name in TRACED:
            return local
        if name.endswith("shutil.py") and _called_from_writer(frame):
            return local
        return None

    return global_


def _called_from_writer(frame: Any) -> bool:
    f = frame.f_back
    while f is not None:
        if f.f_code.co_filename.endswith(WRITER_FILES):
            return True
        f = f.f_back
    return False


def _snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".tmp-", ".old-"))]
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def left_old(root: Path) -> bool:
    return any(p.name.startswith(".old-") for p in root.rglob("*"))


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_dir() and p.name.startswith((".tmp-", ".old-")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--signal", choices=["kill", "term"], default="kill")
    ap.add_argument("--force", action="store_true", help="replace an existing case")
    ap.add_argument("--no-exchange", action="store_true",
                    help="the fallback publish path (old case moved aside)")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--report", required=True, help="where the JSON report goes")
    args = ap.parse_args()
    logs = Path(args.report).with_suffix(".child-output")

    import numpy as np

    from refattn.golden import format as fmt
    from refattn.golden import publish
    from refattn.golden.generate import expand_requests, generate_case

    if args.no_exchange:
        publish._exchange = lambda a, b: False  # type: ignore[assignment]
    root = Path(args.root)
    block, shapes, over = "conv1x1", {"x": (1, 2, 2, 3)}, {"out_channels": 2}
    new = generate_case(*expand_requests(block, None, over, shapes=shapes, seed=0)[0])
    old = generate_case(*expand_requests(block, None, over, shapes=shapes, seed=1)[0])
    case_id = new.case_id
    old_manifest = dict(old.manifest, case_id=case_id)
    cli_args = ["golden", "-b", block, "--shape", "x=1,2,2,3", "--set",
                "out_channels=2", "--out", str(root), *(["--force"] * args.force)]

    def write_old() -> Path:
        return fmt.write_case(root, block, case_id, old.tensors, old_manifest,
                              tolerances=old.tolerances, accumulation=old.accumulation,
                              force=True)

    def write_new() -> None:
        if args.signal == "term":  # through the CLI, whose handler turns SIGTERM
            from refattn.cli import main as cli  # into SystemExit (finally runs)

            cli.main(cli_args, standalone_mode=True)
        else:
            fmt.write_case(root, block, case_id, new.tensors, new.manifest,
                           tolerances=new.tolerances, accumulation=new.accumulation,
                           force=args.force)

    # the state every trial starts from: neighbours, user files, maybe the old case
    def reset() -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("user notes")
        (root / block).mkdir()
        (root / block / "README").write_text("user file in the block directory")
        fmt.write_case(root, block, "neighbour", old.tensors,
                       dict(old.manifest, case_id="neighbour"),
                       tolerances=old.tolerances, accumulation=old.accumulation)
        if args.force:
            write_old()

    reset()
    case_dir = root / block / case_id
    old_digest = (fmt.verify_case(case_dir).digest if args.force else None)
    before = {k: v for k, v in _snapshot(root).items()
              if not k.startswith(os.path.join(block, case_id) + os.sep)}

    # count the writer's lines in a full, uninterrupted write
    counter = [0]
    pid = os.fork()
    if pid == 0:
        _quiet(logs)
        sys.settrace(_tracer(None, None, counter))
        try:
            write_new()
        except SystemExit:
            pass
        sys.settrace(None)
        with open(logs.with_suffix(".count"), "w") as f:
            json.dump(counter[0], f)
        os._exit(0)
    os.waitpid(pid, 0)
    total = json.loads(logs.with_suffix(".count").read_text())
    new_digest = fmt.verify_case(case_dir).digest
    reset()

    sig = signal.SIGKILL if args.signal == "kill" else signal.SIGTERM
    violations: list[str] = []
    counts = {"points": 0, "old": 0, "new": 0, "absent": 0, "leftovers": 0,
              "swept": 0, "lines": total}
    for k in range(1, total + 1, args.stride):
        counts["points"] += 1
        pid = os.fork()
        if pid == 0:
            code = 0
            _quiet(logs)
            sys.settrace(_tracer(k, sig, [0]))
            try:
                write_new()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                code = 99
            sys.settrace(None)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        where = f"{args.signal} at line {k}/{total}"
        said = logs.read_text(errors="replace").strip()
        if "Error" in said or "Traceback" in said:
            violations.append(f"{where}: the child said {said[-300:]!r}")
        if args.signal == "kill" and not (os.WIFSIGNALED(status)
                                          and os.WTERMSIG(status) == signal.SIGKILL):
            violations.append(f"{where}: the child was not killed ({status})")
        if args.signal == "term" and not (os.WIFEXITED(status)
                                          and os.WEXITSTATUS(status) == 143):
            violations.append(f"{where}: exit status {status}, expected 143")
        # the case: absent (no old case), complete old, or complete new
        if case_dir.exists():
            result = fmt.verify_case(case_dir)
            if not result.ok:
                violations.append(f"{where}: partial case: {result.problems[0]}")
            elif result.digest == old_digest:
                counts["old"] += 1
            elif result.digest == new_digest:
                counts["new"] += 1
            else:
                violations.append(f"{where}: a case that is neither old nor new")
        elif args.force and not args.no_exchange:
            violations.append(f"{where}: the old case disappeared")
        elif args.force:
            # without an atomic exchange the old case sits in .old-* between the
            # two renames; the next write into the block directory puts it back
            counts["between renames"] = counts.get("between renames", 0) + 1
            if not left_old(root):
                violations.append(f"{where}: the old case is gone, not even in .old-*")
        else:
            counts["absent"] += 1
        after = {k2: v for k2, v in _snapshot(root).items()
                 if not k2.startswith(os.path.join(block, case_id) + os.sep)}
        if after != before:
            changed = sorted(set(after) ^ set(before)) or sorted(
                k2 for k2 in after if after[k2] != before[k2])
            violations.append(f"{where}: other files changed: {changed[:3]}")
        left = _temporaries(root)
        found = [str(p.relative_to(root)) for p in fmt.find_cases(root)]
        if any(".tmp-" in p or ".old-" in p for p in found):
            violations.append(f"{where}: find_cases returned a temporary: {found}")
        if left:
            counts["leftovers"] += 1
            if args.signal == "term":
                violations.append(f"{where}: SIGTERM left {left}")
            # the next write into the block directory sweeps them
            fmt.write_case(root, block, "next", new.tensors,
                           dict(new.manifest, case_id="next"),
                           tolerances=new.tolerances, accumulation=new.accumulation,
                           force=True)
            if _temporaries(root):
                violations.append(f"{where}: the next write left {_temporaries(root)}")
            else:
                counts["swept"] += 1
            if args.force:
                result = fmt.verify_case(case_dir)
                if not result.ok or result.digest not in (old_digest, new_digest):
                    violations.append(f"{where}: after the next write the case is "
                                      f"not complete: {result.problems[:1]}")
        reset()
    Path(args.report).write_text(json.dumps({"counts": counts,
                                             "violations": violations}))
    del np


def _quiet(path: Path) -> None:
    """Send this (child) process's stdout and stderr to `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    main()
