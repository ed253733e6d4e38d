"""The user's module under ``refattn validate --torch MODULE:FACTORY`` cannot
end validation without a verdict, nor corrupt its report.

* ``sys.exit(0)`` or a raised ``KeyboardInterrupt`` in their module (at
  import, in the factory, the forward or the backward) is exit 2 with one
  ``Error:`` line naming the factory and the exception, never exit 0 without
  a report; through the library (``refattn.testing``) it is
  ``UserCodeError``, not a ``SystemExit`` that would end a pytest run.  A
  real Ctrl-C while their code runs is still an interrupt, not exit 2.
* Text their code prints does not reach stdout: ``--json`` output stays
  parseable, and the text is shown on stderr after the report.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import refattn_cmd, subprocess_env
from refattn.golden.format import find_cases

pytestmark = pytest.mark.usefixtures("torch")  # skips when torch is absent

MODULE = """
import sys
import torch

STAGE = {stage!r}
HOW = {how!r}


def _act(where):
    print(f"hello from the {{where}}")
    if where == STAGE:
        if HOW == "exit":
            sys.exit(0)
        if HOW == "interrupt":
            raise KeyboardInterrupt
        if HOW == "sleep":  # in steps: a SIGINT that the kernel hands to another
            open("started", "w").close()  # thread (BLAS, TBB) is seen between them
            import time
            for _ in range(600):
                time.sleep(0.1)


_act("import")


class Conv(torch.nn.Conv2d):
    def forward(self, x):
        _act("forward")
        out = super().forward(x)
        return out if STAGE != "backward" else _Hook.apply(out)


class _Hook(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _act("backward")
        return g


def make(config):
    _act("factory")
    return Conv(config["in_channels"], config["out_channels"], 1)
"""


@pytest.fixture
def case(tmp_path: Path, small_case_root: Path) -> Path:
    (source,) = find_cases(small_case_root)
    return Path(shutil.copytree(source, tmp_path / "case"))


def _module(where: Path, stage: str, how: str) -> str:
    name = f"user_{stage}_{how}"
    source = MODULE.format(stage=stage, how=how)
    (where / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def _validate(case: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(refattn_cmd("validate", str(case), "--torch", f"{name}:make",
                                      *extra),
                          cwd=case.parent, capture_output=True, text=True, timeout=120,
                          env=subprocess_env())


@pytest.mark.parametrize("stage, how", [
    ("import", "exit"), ("factory", "exit"), ("forward", "exit"), ("backward", "exit"),
    ("factory", "interrupt"), ("forward", "interrupt"),
])
def test_exit_or_interrupt_in_their_code_is_no_verdict(case: Path, stage: str,
                                                      how: str) -> None:
    name = _module(case.parent, stage, how)
    result = _validate(case, name, "--json")
    assert result.returncode == 2, result
    assert result.stdout == "", result.stdout  # no report, and none of their text
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    line = lines[-1]  # after their captured text: one Error line, last
    assert [ln for ln in lines if ln.startswith("Error: ")] == [line], result.stderr
    raised = "SystemExit(0)" if how == "exit" else "KeyboardInterrupt"
    assert f"{name}" in line and f"raised {raised}" in line, line
    assert line.endswith("no verdict"), line
    assert f"hello from the {stage}" in result.stderr  # their text, kept for them


def test_their_prints_do_not_corrupt_the_json_report(case: Path) -> None:
    name = _module(case.parent, "none", "none")
    result = _validate(case, name, "--json")
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert "hello" not in result.stdout
    err = result.stderr.splitlines()
    assert err[0] == f"output of {name}:make (captured):"
    for where in ("import", "factory", "forward"):
        assert f"hello from the {where}" in err


def test_library_raises_user_code_error_not_system_exit(case: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    from refattn.adapters.torch import UserCodeError
    from refattn.testing import assert_matches_golden, validate_case

    monkeypatch.syspath_prepend(str(tmp_path))
    for stage, how, raised in [("factory", "exit", "SystemExit(0)"),
                               ("forward", "interrupt", "KeyboardInterrupt")]:
        module = __import__(_module(tmp_path, stage, how))
        pattern = rf"raised {re.escape(raised)} .*no verdict"
        with pytest.raises(UserCodeError, match=pattern):
            validate_case(case, module.make)
        with pytest.raises(ValueError, match=rf"raised {re.escape(raised)}"):
            assert_matches_golden(case, module.make)
    assert issubclass(UserCodeError, ValueError)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_real_ctrl_c_in_their_code_is_still_an_interrupt(case: Path) -> None:
    name = _module(case.parent, "forward", "sleep")
    proc = subprocess.Popen(
        refattn_cmd("validate", str(case), "--torch", f"{name}:make"), cwd=case.parent,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while not (case.parent / "started").exists():
            alive = proc.poll() is None and time.monotonic() < deadline
            assert alive, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, 2), (proc.returncode, out, err)
    assert "no verdict" not in err and "Traceback" not in err, err
