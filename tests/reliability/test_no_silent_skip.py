"""Nothing under a fixture tree is passed over in silence, and a report cut
short by its reader never turns a failure into success.

* Symbolic links: a case or block directory that is a link is searched like
  any other (``find_cases``, ``golden_cases``, ``refattn verify``); a link
  loop, a dangling link and a link to a file are each reported by name
  (``refattn verify`` counts them as failed entries, exit 1) instead of
  being skipped or followed forever.
* Broken pipes: ``refattn verify DIR | head -1`` keeps verify's own exit
  status (1 when a case failed), so ``set -o pipefail`` sees the failure;
  the other report commands exit 0 only when they succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import refattn_cmd, subprocess_env
from refattn.cli import main
from refattn.golden.format import FixtureError, find_cases, read_case
from refattn.testing import golden_cases


def _copy_case(small_case_root: Path, dest: Path) -> Path:
    """A copy of the pristine small case at `dest` (its parents created)."""
    (source,) = find_cases(small_case_root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest)
    return dest


def _corrupt(case: Path) -> Path:
    """Flip the lowest mantissa bit of the last element of the safetensors file."""
    path = case / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01
    path.write_bytes(bytes(data))
    return case


def _verify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout


@pytest.fixture
def tree(tmp_path: Path, small_case_root: Path) -> Path:
    """tree/conv1x1/good (a real case) and tree/conv1x1/bad, a symbolic link
    to a corrupted case outside the tree."""
    root = tmp_path / "tree"
    _copy_case(small_case_root, root / "conv1x1" / "good")
    outside = _corrupt(_copy_case(small_case_root, tmp_path / "elsewhere" / "bad"))
    (root / "conv1x1" / "bad").symlink_to(outside, target_is_directory=True)
    return root


# ---------------------------------------------------------------------------
# symbolic links


def test_symlinked_case_is_verified(tree: Path) -> None:
    code, out = _verify(str(tree))
    assert code == 1, out
    assert f"FAILED  {tree / 'conv1x1' / 'bad'}: " in out
    assert "sha256 mismatch" in out
    assert out.splitlines()[-1] == "2 case(s) verified, 1 failed"
    assert find_cases(tree) == [tree / "conv1x1" / "bad", tree / "conv1x1" / "good"]
    assert golden_cases(tree) == find_cases(tree)


def test_symlinked_block_directory_is_searched(tmp_path: Path,
                                               small_case_root: Path) -> None:
    block = tmp_path / "elsewhere" / "conv1x1"
    _corrupt(_copy_case(small_case_root, block / "case"))
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "conv1x1").symlink_to(block, target_is_directory=True)
    assert find_cases(tmp_path / "tree") == [tmp_path / "tree" / "conv1x1" / "case"]
    code, out = _verify(str(tmp_path / "tree"))
    assert code == 1 and out.splitlines()[-1] == "1 case(s) verified, 1 failed", out


def test_dangling_link_and_link_to_a_file_are_failed_entries(tree: Path) -> None:
    block = tree / "conv1x1"
    (block / "gone").symlink_to(tree.parent / "no-such-case")
    (tree.parent / "notes.txt").write_text("not a case\n")
    (block / "file").symlink_to(tree.parent / "notes.txt")
    (block / "README.md").write_text("a plain file is not a problem\n")

    code, out = _verify(str(tree))
    assert code == 1, out
    assert f"FAILED  {block / 'gone'}: " in out and "dangling symbolic link" in out
    assert f"FAILED  {block / 'file'}: " in out and "not a directory" in out
    assert out.splitlines()[-1] == "4 case(s) verified, 3 failed"
    assert "README.md" not in out

    code, out = _verify(str(tree), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    by_path = {c["path"]: c for c in report["cases"]}
    assert set(by_path) == {str(block / n) for n in ("bad", "file", "gone", "good")}
    assert by_path[str(block / "gone")]["problems"][0].startswith(f"{block / 'gone'}: ")

    problems: list[tuple[Path, str]] = []
    assert find_cases(tree, problems=problems) == [block / "bad", block / "good"]
    assert [p for p, _ in problems] == [block / "file", block / "gone"]
    for search in (find_cases, golden_cases):
        with pytest.raises(FixtureError,
                           match="file: symbolic link to .* not a dir") as err:
            search(tree)
        gone = f"{block / 'gone'}: dangling symbolic link"
        assert err.value.problems[1].startswith(gone)


def test_only_a_dangling_link_is_a_failure_not_an_empty_tree(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "case").symlink_to(tmp_path / "missing")
    code, out = _verify(str(tmp_path / "tree"))
    assert code == 1 and out.splitlines()[-1] == "1 case(s) verified, 1 failed", out


def test_link_loops_are_reported_not_followed(tree: Path) -> None:
    block = tree / "conv1x1"
    (block / "up").symlink_to("..", target_is_directory=True)  # into an ancestor
    (tree / "a").mkdir()
    (tree / "b").mkdir()
    (tree / "a" / "to-b").symlink_to(tree / "b", target_is_directory=True)
    (tree / "b" / "to-a").symlink_to(tree / "a", target_is_directory=True)

    problems: list[tuple[Path, str]] = []
    cases = find_cases(tree, problems=problems)
    assert cases == [block / "bad", block / "good"]
    looped = {p: reason for p, reason in problems}
    assert set(looped) == {block / "up", tree / "a" / "to-b" / "to-a",
                           tree / "b" / "to-a" / "to-b"}
    assert all("loop" in reason for reason in looped.values())

    code, out = _verify(str(tree))
    assert code == 1, out
    assert f"FAILED  {block / 'up'}: " in out
    assert out.splitlines()[-1] == "5 case(s) verified, 4 failed"


def test_a_case_reached_twice_is_reported_under_both_names(tree: Path) -> None:
    (tree / "alias").symlink_to(tree / "conv1x1", target_is_directory=True)
    assert [str(p.relative_to(tree)) for p in find_cases(tree)] == [
        "alias/bad", "alias/good", "conv1x1/bad", "conv1x1/good"]


# ---------------------------------------------------------------------------
# broken pipes


def _pipeline(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env=subprocess_env())


def _exe() -> str:
    return " ".join(refattn_cmd())


@pytest.fixture
def failing_tree(tmp_path: Path, small_case_root: Path) -> Path:
    """A corrupted case first, then enough good ones that the report goes on
    after the reader of `head -1` has left."""
    root = tmp_path / "tree"
    _corrupt(_copy_case(small_case_root, root / "conv1x1" / "a-bad"))
    for i in range(6):
        _copy_case(small_case_root, root / "conv1x1" / f"good-{i}")
    return root


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_verify_keeps_its_failure_through_a_closed_pipe(failing_tree: Path,
                                                        reader: str) -> None:
    result = _pipeline(f"{_exe()} verify tree | {reader}", failing_tree.parent)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    if reader == "head -1":
        assert result.stdout.startswith("FAILED  tree/conv1x1/a-bad: ")


def test_verify_success_through_a_closed_pipe(failing_tree: Path) -> None:
    shutil.rmtree(failing_tree / "conv1x1" / "a-bad")
    result = _pipeline(f"{_exe()} verify tree | true", failing_tree.parent)
    assert result.returncode == 0, result


def _closed_pipe_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run refattn with stdout a pipe whose reader is already gone: the first
    write fails with EPIPE, deterministically."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(refattn_cmd(*args), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              cwd=cwd, env=subprocess_env())
    finally:
        os.close(write_end)


def test_report_commands_keep_their_status_when_the_reader_is_gone(
        failing_tree: Path, tmp_path: Path) -> None:
    bad = failing_tree / "conv1x1" / "a-bad"
    good = failing_tree / "conv1x1" / "good-0"
    wrong = tmp_path / "wrong.npz"
    case = read_case(good)
    arrays = {k: v + 1.0 for k, v in case.tensors.items() if k.startswith("output.")}
    with open(wrong, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)

    expected = {
        ("verify", str(failing_tree)): 1,
        ("verify", str(failing_tree), "--json"): 1,
        ("verify", str(good)): 0,
        ("validate", str(good), "--results", str(wrong)): 1,
        ("validate", str(good), "--results", str(wrong), "--json"): 1,
        ("show", str(good)): 0,
        ("show", str(bad)): 2,
        ("list",): 0,
        ("list", "--json"): 0,
    }
    got = {}
    for args, want in expected.items():
        result = _closed_pipe_run(*args, cwd=tmp_path)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        got[args] = result.returncode
    assert got == expected
