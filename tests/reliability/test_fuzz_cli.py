"""Hostile command lines: every subcommand with malformed options, unknown
blocks and presets, bad ``--set`` values and types, bad shapes, missing
paths, files where directories belong and directories that cannot be
written.

The contract (DESIGN section 9): exit 0 on success, 1 when a check fails, 2
on bad usage or input with exactly one ``Error: ...`` line on stderr (after
click's ``Usage:``/``Try`` lines for a usage error), never a traceback and
never "internal error".  Fuzzed in-process with CliRunner, and spot-checked
with real subprocesses of the installed ``refattn`` script.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import (
    FIGURES,
    assert_one_error_line,
    perfect_results,
    run_refattn,
    snapshot,
    write_small_case,
)
from refattn.cli import main

SMALL_BLOCKS = ["conv1x1", "gap", "nin_head", "cbam_channel"]
JUNK = ["--bogus", "-x", "", "--", "ü", "-", "--json=1", "--help=no", "x" * 300]


# ---------------------------------------------------------------------------
# a sandbox of paths, built once per module


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths for the fuzzers, which may create some of them (--out)."""
    return _make_sandbox(tmp_path_factory.mktemp("cli_sandbox"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same paths, untouched by the fuzzers: for the targeted tests."""
    return _make_sandbox(tmp_path_factory.mktemp("cli_pristine"))


def _make_sandbox(root: Path) -> dict[str, str]:
    good = write_small_case(root / "tree", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                            overrides={"out_channels": 2})
    broken = Path(shutil.copytree(good, root / "broken" / "conv1x1" / "case"))
    data = bytearray((broken / "tensors.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / "tensors.npz").write_bytes(bytes(data))
    (root / "afile.txt").write_text("precious")
    (root / "empty").mkdir()
    results = perfect_results(good, root / "perfect.npz")
    wrong = root / "wrong.npz"
    with np.load(results) as z:
        arrays = {k: z[k] + 1.0 for k in z.files}
    np.savez(wrong, **arrays)
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, None]
    np.savez(root / "object.npz", allow_pickle=True, **{"output.out": obj})
    (root / "garbage.safetensors").write_bytes(b"\xff" * 64)
    return {
        "case": str(good), "tree": str(root / "tree"), "broken": str(broken),
        "file": str(root / "afile.txt"), "under_file": str(root / "afile.txt" / "sub"),
        "missing": str(root / "no" / "such" / "dir"), "empty": str(root / "empty"),
        "manifest": str(good / "manifest.json"), "results": str(results),
        "wrong": str(wrong), "object": str(root / "object.npz"),
        "garbage": str(root / "garbage.safetensors"), "out": str(root / "out"),
        "root": str(root), "blank": "",
    }


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Run in `path` (created), so relative defaults (--out) land there."""
    path.mkdir(parents=True, exist_ok=True)
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _path(kind: str, box: dict[str, str]) -> str:
    return box[kind]


PATH_KINDS = ["case", "tree", "broken", "file", "under_file", "missing", "empty",
              "manifest", "results", "wrong", "object", "garbage", "out", "blank"]


# ---------------------------------------------------------------------------
# command-line strategies


def _choice(xs: list[Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from(xs)


SETS = ["out_channels=3", "out_channels=abc", "out_channels=0", "out_channels=-2",
        "out_channels=2.5", "out_channels=[1,2]", "out_channels=null", "=1",
        "noequals", "nokey=1", "bias=maybe", "bias=true", "bias=1", "stride=2",
        "stride=[2,1]", "stride=[0,1]", "padding=-1", "groups=3", "keepdim=true",
        "reduction=4", "reduction=1e400", "pool_types=[\"avg\",\"foo\"]",
        "pool_types={}", "spatial_bn=eval", "bn_eps=NaN", "bn_eps=Infinity",
        "bn_momentum=2", "channels=[4,4,3]", "channels=[]", "kernel_size=0",
        "relu_last=\"no\"", "x=\u00e9"]
SHAPES = ["x=1,2", "x=0,2,3,4", "x=a", "y=1,2,3,4", "x=1,4,3,3", "x=2,4,5,7",
          "x=-1,2,2,2", "x=1,2,3,4,5", "x=", "=1,2,3,4", "x=1.5,2,3,4",
          "x=1,8,4,4", "x=2,32,3,3", "x=1,16,2,2"]


@st.composite
def command_lines(draw: st.DrawFn, box: dict[str, str]) -> list[str]:
    cmd = draw(_choice(["golden", "golden", "gradcheck", "verify", "show",
                        "validate", "validate", "list", "info", "bogus"]))
    args: list[str] = [cmd]
    if cmd in ("golden", "gradcheck") and draw(_choice([True] * 4 + [False])):
        args += ["-b", draw(_choice(SMALL_BLOCKS))]
    if cmd in ("verify", "show", "validate") and draw(_choice([True] * 4 + [False])):
        args.append(_path(draw(_choice(["case", "tree", "broken", *PATH_KINDS])), box))
    if cmd == "validate" and draw(_choice([True] * 2 + [False])):
        args += ["--results", _path(draw(_choice(["results", "wrong", *PATH_KINDS])),
                                    box)]
    n = draw(st.integers(0, 4))
    for _ in range(n):
        junk = draw(_choice([False] * 7 + [True]))
        opt = draw(_choice(JUNK if junk else _options(cmd)))
        args.append(opt)
        if opt in ("-b", "--block"):
            args.append(draw(_choice(SMALL_BLOCKS + ["nope", "", "CBAM", "cbam;rm"])))
        elif opt in ("-p", "--preset"):
            args.append(draw(_choice(["jongchan", "seed", "nope", "", "nin_cifar_1"])))
        elif opt == "--set":
            args.append(draw(_choice(SETS)))
        elif opt == "--shape":
            args.append(draw(_choice(SHAPES)))
        elif opt == "--dtype":
            args.append(draw(_choice(["float64", "float32", "float16", ""])))
        elif opt == "--seed":
            args.append(draw(_choice(["0", "1", "-1", "abc", "2.5", ""])))
        elif opt == "--format":
            args.append(draw(_choice(["npz", "safetensors", "hdf5", ",", "npz,npz"])))
        elif opt == "--mode":
            args.append(draw(_choice(["fast", "taylor", "bogus"])))
        elif opt == "--backend":
            args.append(draw(_choice(["numpy", "cupy", "jax"])))
        elif opt == "--torch":
            args.append(draw(_choice(["nope", "x:y", "os:getcwd", "json:loads",
                                      "no_such_mod_xyz:f", ":f", "a:"])))
        elif opt == "--names":
            args.append(draw(_choice(["canonical", "anchor", _path("file", box),
                                      _path("missing", box)])))
        elif opt in ("--out", "--json-path", "--results", "--plot"):
            kind = draw(_choice(PATH_KINDS))
            value = _path(kind, box)
            if opt == "--plot":
                value = draw(_choice([value, value + ".png"]))
            args[-1] = "--json" if opt == "--json-path" else opt
            args.append(value)
        elif opt == "PATH":
            args[-1] = _path(draw(_choice(PATH_KINDS)), box)
    return args


def _options(cmd: str) -> list[str]:
    common: list[str] = []
    if cmd == "golden":
        return common + ["-b", "--block", "-p", "--set", "--set", "--shape", "--dtype",
                         "--seed", "--out", "--out", "--format", "--force", "--json",
                         "--backend"]
    if cmd == "gradcheck":
        return common + ["-b", "-b", "-p", "--set", "--shape", "--seed", "--mode",
                         "--json-path", "--plot"]
    if cmd in ("verify", "show"):
        return common + ["PATH", "PATH", "--json", "--plot"]
    if cmd == "validate":
        return common + ["PATH", "PATH", "--results", "--results", "--torch", "--names",
                         "--json"]
    if cmd == "list":
        return common + ["--json", "PATH", "cbam", "nope"]
    return common + ["--json"]


def _check_result(result: Any, args: list[str]) -> int:
    """The exit-code contract for one invocation; returns the exit code."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        raise AssertionError(f"{args}: {type(exc).__name__}: {exc}") from exc
    output = result.stdout + result.stderr
    assert "Traceback" not in output, (args, output)
    assert "internal error" not in output, (args, output)
    code = result.exit_code
    assert code in (0, 1, 2), (args, code, output)
    if code == 2:
        assert_one_error_line(result.stderr, result.stdout)
    elif code == 1:
        # only a failed check exits 1: verify/validate/gradcheck with a report
        assert args[0] in ("verify", "validate", "gradcheck"), (args, output)
        assert result.stdout.strip(), (args, output)
    return code


def _report_targets(args: list[str], tree: Path, before: dict[str, bytes]) -> set[str]:
    """The tree-relative paths given to --plot or --json that held a report
    refattn wrote (a PNG naming refattn, or a JSON list of report entries):
    the only files a command may replace."""
    targets = set()
    for opt, value in zip(args, args[1:]):
        path = Path(value) if value else None
        if opt not in ("--plot", "--json") or path is None or not path.is_relative_to(tree):
            continue
        key = path.relative_to(tree).as_posix()
        old = before.get(key, b"")
        if opt == "--plot":
            ours = old.startswith(b"\x89PNG") and b"refattn" in old[:65536]
        else:
            try:
                report = json.loads(old)
            except ValueError:
                report = None
            ours = isinstance(report, list) and bool(report) and all(
                isinstance(r, dict) and {"case", "ok"} <= set(r) for r in report)
        if ours:
            targets.add(key)
    return targets


def _fuzz_cli(box: dict[str, str], data: st.DataObject, counter: str) -> None:
    args = data.draw(command_lines(box), label="argv")
    gradcheck_blocks = [a for a in args if a in ("nin_head", "cbam_channel")]
    if args[0] == "gradcheck" and gradcheck_blocks:
        args = [a if a not in gradcheck_blocks else "gap" for a in args]  # keep it fast
    note(f"argv={args}")
    before = snapshot(Path(box["root"]) / "tree")
    precious = Path(box["file"]).read_text()
    with _cwd(Path(box["root"]) / "cwd"):
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    code = _check_result(result, args)
    FIGURES[counter] += 1
    FIGURES[f"{counter} exit {code}"] += 1
    after = snapshot(Path(box["root"]) / "tree")
    # nothing changed or lost, but for an earlier refattn report that the
    # command was told to write (it may replace its own plot or JSON)
    written = _report_targets(args, Path(box["root"]) / "tree", before) if code != 2 else set()
    kept = {k: v for k, v in before.items() if k not in written}
    assert {k: after.get(k) for k in kept} == kept, args
    assert Path(box["file"]).read_text() == precious



def test_only_an_earlier_refattn_report_may_be_replaced(tmp_path: Path) -> None:
    """The fuzz test's one exception to 'nothing in the tree changes' covers a
    refattn plot or report named by --plot/--json, never a manifest, a foreign
    PNG or a file the command did not name."""
    before = {"a.png": b"\x89PNG\r\n\x1a\n...tEXtSoftware\x00refattn 0.1",
              "b.png": b"\x89PNG\r\n\x1a\n...tEXtSoftware\x00Matplotlib",
              "r.json": b'[{"case": "c", "ok": true, "mode": "fast"}]',
              "manifest.json": b'{"format": "refattn-golden"}',
              "empty.json": b"[]"}
    named = lambda *names: [a for n in names  # noqa: E731
                            for a in ("--plot" if n.endswith("png") else "--json",
                                      str(tmp_path / n))]
    assert _report_targets(["gradcheck", *named("a.png", "r.json")], tmp_path,
                           before) == {"a.png", "r.json"}
    assert _report_targets(["gradcheck", *named("b.png", "manifest.json", "empty.json")],
                           tmp_path, before) == set()
    assert _report_targets(["gradcheck", "--plot", str(tmp_path.parent / "a.png")],
                           tmp_path, before) == set()
    assert _report_targets(["verify", str(tmp_path / "a.png")], tmp_path, before) == set()

_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much,
                              HealthCheck.function_scoped_fixture],
}


@settings(max_examples=max(250, settings.default.max_examples), **_SETTINGS)
@given(data=st.data())
def test_cli_exit_codes_under_hostile_command_lines(sandbox: dict[str, str],
                                                    data: st.DataObject) -> None:
    _fuzz_cli(sandbox, data, "CLI fuzz invocations")


@pytest.mark.slow
@settings(max_examples=max(1500, settings.default.max_examples), derandomize=False,
          **_SETTINGS)
@given(data=st.data())
def test_cli_exit_codes_under_hostile_command_lines_long(sandbox: dict[str, str],
                                                         data: st.DataObject) -> None:
    _fuzz_cli(sandbox, data, "CLI fuzz invocations (slow, random)")


# ---------------------------------------------------------------------------
# targeted cases


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


@pytest.mark.parametrize("args,needle", [
    (["golden", "-b", "conv1x1", "--shape", "x=1,4,100000,100000"], "needs about"),
    (["golden", "-b", "cgnl", "--set", "kernel=gaussian", "--set", "gamma=1e300"],
     "gamma"),
    (["golden", "-b", "cgnl", "--set", "kernel=gaussian", "--set", "order=1000"],
     "order"),
    (["gradcheck", "-b", "cross_layer", "--set", "planes=1180591620717411303424"],
     "theta.weight"),
    (["verify", ""], "empty path"),
])
def test_inputs_that_once_escaped_as_internal_errors(args: list[str], needle: str,
                                                     tmp_path: Path) -> None:
    with _cwd(tmp_path):
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert needle in assert_one_error_line(result.stderr, result.stdout)


def test_output_path_under_a_file_and_unwritable_dirs(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep")
    result = _invoke("golden", "-b", "gap", "--out", str(tmp_path / "afile" / "sub"))
    line = assert_one_error_line(result.stderr)
    assert "afile" in line and result.exit_code == 2
    assert (tmp_path / "afile").read_text() == "keep"
    result = _invoke("golden", "-b", "gap", "--out", "/proc/refattn-test")
    assert result.exit_code == 2 and "/proc/refattn-test" in assert_one_error_line(
        result.stderr)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _invoke("golden", "-b", "gap", "--out", str(locked))
        if os.geteuid() == 0:  # root ignores the mode bits: the write succeeds
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2
            assert "Permission denied" in assert_one_error_line(result.stderr)
            assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_block_directory_leaves_nothing(tmp_path: Path) -> None:
    assert _invoke("golden", "-b", "gap", "--out", str(tmp_path)).exit_code == 0
    block = tmp_path / "gap"
    block.chmod(0o500)
    try:
        result = _invoke("golden", "-b", "gap", "--seed", "1", "--out", str(tmp_path))
        assert result.exit_code == 2
        assert "Permission denied" in assert_one_error_line(result.stderr)
    finally:
        block.chmod(0o700)
    assert [p.name for p in block.iterdir()] == ["default-float64"]


SUBPROCESS_CASES = [
    (["golden"], "--block"),
    (["golden", "-b", "nope"], "unknown block 'nope'"),
    (["golden", "-b", "cbam", "--set", "reduction=abc"], "reduction"),
    (["golden", "-b", "cbam", "--shape", "x=1,2"], "x"),
    (["golden", "-b", "gap", "--out", "{file}/sub"], "Not a directory"),
    (["verify", "{missing}"], "no such file or directory"),
    (["verify", "{file}"], "not a directory"),
    (["show", "{broken}"], "tensors.npz"),
    (["validate", "{broken}", "--results", "{results}"], "tensors.npz"),
    (["validate", "{case}", "--results", "{object}"], "pickle"),
    (["validate", "{case}", "--results", "{garbage}"], "garbage.safetensors"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("args,needle", SUBPROCESS_CASES,
                         ids=[" ".join(a)[:40] for a, _ in SUBPROCESS_CASES])
def test_real_process_exit_2_one_line(pristine: dict[str, str], args: list[str],
                                      needle: str) -> None:
    argv = [a.format(**pristine) for a in args]
    proc = run_refattn(*argv, cwd=pristine["root"])
    FIGURES["CLI subprocess runs"] += 1
    assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
    assert needle in assert_one_error_line(proc.stderr, proc.stdout)
    assert proc.stdout == ""


def test_real_process_exit_codes_0_and_1(pristine: dict[str, str]) -> None:
    ok = run_refattn("validate", pristine["case"], "--results", pristine["results"])
    bad = run_refattn("validate", pristine["case"], "--results", pristine["wrong"])
    failed = run_refattn("verify", str(Path(pristine["broken"]).parents[1]))
    FIGURES["CLI subprocess runs"] += 3
    assert ok.returncode == 0 and "PASS" in ok.stdout and ok.stderr == "", ok
    assert bad.returncode == 1 and "FAIL" in bad.stdout and bad.stderr == "", bad
    assert failed.returncode == 1 and "tensors.npz" in failed.stdout, failed
    assert "Traceback" not in ok.stderr + bad.stderr + failed.stderr
