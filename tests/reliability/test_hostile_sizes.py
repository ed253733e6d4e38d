"""Hostile sizes and options: refuse up front, name the option, never get
killed; and never overwrite or delete what refattn did not write.

Families (each counted in the "reliability figures"):

* the memory a case needs (``golden.resources.case_bytes``) is never below
  what generating and writing it really takes (measured with tracemalloc
  for every block and preset), and the memory available is the least of
  MemAvailable, the cgroup limits (v1 and v2, nested) and the rlimits;
* ``golden`` and ``gradcheck`` refuse what will not fit, before drawing,
  with one line naming the option: under a fake small limit, under a real
  ``prlimit --as``, and inside a real memory cgroup (where the machine
  lets the tests make one), where the same command used to be OOM-killed;
* impossible combinations (``--set reduction=100000``) and sizes NumPy
  would refuse with its own words are refused naming the option;
* ``gradcheck --mode full`` states its cost and keeps to ``--max-evals``;
* ``--seed`` (honoured by ``golden --all``, bounded before generating),
  ``--out ''``;
* ``golden --force`` replaces only a refattn case; ``--json`` and ``--plot``
  replace only a report or a plot refattn wrote;
* the CLI never blames itself for the user's errors: a factory returning
  None/dict/str, ``--device xyz``, a 50,000-deep ``--set`` list, a
  non-UTF-8 ``--names`` file each exit 2 with one line naming the cause.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import (
    FIGURES,
    assert_one_error_line,
    refattn_cmd,
    subprocess_env,
    write_small_case,
)

from refattn.blocks.registry import BLOCKS
from refattn.cli import main
from refattn.cli import sizes as cli_sizes
from refattn.golden import resources
from refattn.golden.format import verify_case, write_case
from refattn.golden.generate import (
    CaseRequest,
    all_requests,
    case_shapes,
    expand_requests,
    generate_case,
)
from refattn.golden.resources import Available, available_bytes, case_bytes

BIG_GAP = ["golden", "--block", "gap", "--shape", "x=1,1,12000,12000"]
"""1.1 GB of input alone: more than a 1 GiB limit allows."""


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def _exit2(*args: Any) -> str:
    res = _invoke(*args)
    assert res.exit_code == 2, (args, res.output)
    return assert_one_error_line(res.stderr, res.stdout)


# ---------------------------------------------------------------------------
# the estimate and the available memory


def _measured_peak(req: CaseRequest, cfg: Any) -> int:
    """tracemalloc's peak of generating, writing and reading back one case."""
    tracemalloc.start()
    try:
        case = generate_case(req, cfg)
        with tempfile.TemporaryDirectory() as d:
            write_case(d, case.block, case.case_id, case.tensors, case.manifest,
                       tolerances=case.tolerances, accumulation=case.accumulation,
                       checks=case.checks)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _scaled(req: CaseRequest, cfg: Any, factor: int) -> CaseRequest:
    spec = BLOCKS[req.block]
    shapes = {k: (s[0] * factor, s[1], *(d * factor for d in s[2:]))
              for k, s in spec.fixture_shapes(cfg).items()}
    return CaseRequest(req.block, req.preset, {}, shapes=shapes, dtype=req.dtype)


BASELINE = 2 * 2**20
"""What one case costs besides its tensors (tracemalloc of small buffers)."""


@pytest.mark.slow
def test_estimate_is_never_below_the_measured_peak() -> None:
    """Every block and preset at twice its fixture shapes: the estimate covers
    the measured peak; with a third of its copies it would not (the check
    can fail)."""
    _measured_peak(*all_requests(("float64",))[0])  # first-call imports and caches
    short = 0
    seen = set()
    for req, cfg in all_requests(("float64",)):
        if (req.block, req.preset) in seen:
            continue
        seen.add((req.block, req.preset))
        scaled = _scaled(req, cfg, 2)
        shapes, _, params = case_shapes(scaled, cfg)
        estimate = case_bytes(req.block, shapes, params)
        peak = _measured_peak(scaled, cfg)
        assert peak <= estimate + BASELINE, (req.block, req.preset, peak, estimate)
        short += peak > estimate * 2 // resources.COPIES + BASELINE
        FIGURES["memory estimates checked against a measured peak"] += 1
    assert short, "a third of the copies should under-estimate some case"


def test_estimate_of_the_big_conv_case() -> None:
    req, cfg = expand_requests("gap", None, {}, shapes={"x": (1, 1, 12000, 12000)})[0]
    shapes, _, params = case_shapes(req, cfg)
    assert case_bytes("gap", shapes, params) >= 3 * 8 * 12000 * 12000  # x, dx, copies


def _fake_system(tmp_path: Path, *, meminfo_kib: int, cgroup: str,
                 files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: "
                                  f"{meminfo_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text("VmSize:\t  1000 kB\nVmData:\t 500 kB\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


@pytest.mark.parametrize("layout", ["v1", "v2", "v2 parent", "v2 unified", "none"])
def test_available_memory_takes_the_tightest_limit(tmp_path: Path, layout: str) -> None:
    gib = 2**30
    cases = {
        "v1": ("4:memory:/job\n", {"memory/job/memory.limit_in_bytes": str(gib),
                                   "memory/job/memory.usage_in_bytes": str(gib // 4)},
               gib - gib // 4, "memory.limit_in_bytes"),
        "v2": ("0::/job/step\n", {"job/step/memory.max": str(2 * gib),
                                  "job/step/memory.current": str(gib),
                                  "job/memory.max": "max"},
               gib, "memory.max"),
        "v2 parent": ("0::/job/step\n", {"job/step/memory.max": "max",
                                         "job/memory.max": str(gib // 2),
                                         "job/memory.current": "0"},
                      gib // 2, "memory.max"),
        "v2 unified": ("0::/job\n", {"unified/job/memory.max": str(gib),
                                     "unified/job/memory.current": "0"},
                       gib, "memory.max"),
        "none": ("0::/\n4:memory:/\n", {"memory/memory.limit_in_bytes":
                                        "9223372036854771712"},
                 8 * gib, "MemAvailable"),
    }
    cgroup, files, want, source = cases[layout]
    proc, root = _fake_system(tmp_path, meminfo_kib=8 * 2**20, cgroup=cgroup,
                              files=files)
    got = available_bytes(proc, root)
    assert got is not None and got.bytes == want and source in got.source, got
    FIGURES["available-memory layouts (MemAvailable, cgroup v1/v2, nested)"] += 1


def test_rlimit_counts(tmp_path: Path) -> None:
    import resource

    proc, root = _fake_system(tmp_path, meminfo_kib=8 * 2**20, cgroup="0::/\n",
                              files={})
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = 3 * 2**30 if hard == resource.RLIM_INFINITY else min(hard, 3 * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        got = available_bytes(proc, root)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    assert got is not None and got.bytes == limit - 500 * 1024, got
    assert "RLIMIT_DATA" in got.source
    FIGURES["available-memory layouts (MemAvailable, cgroup v1/v2, nested)"] += 1


# ---------------------------------------------------------------------------
# refusing what will not fit, naming the option


@pytest.fixture
def little_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sees 64 MiB available (as under a tight cgroup)."""
    monkeypatch.setattr(cli_sizes, "available_bytes",
                        lambda: Available(64 * 2**20, "test limit 64 MiB"))


@pytest.mark.parametrize("args, option", [
    (BIG_GAP[1:], "--shape"),
    (["--block", "conv1x1", "--set", "out_channels=30000000"], "--set"),
    (["--block", "non_local", "--preset", "facebook", "--shape", "x=2,8,100,100"],
     "--shape"),
])
@pytest.mark.parametrize("command", ["golden", "gradcheck"])
def test_refused_before_drawing_under_a_small_limit(little_memory: None, tmp_path: Path,
                                                    command: str, args: list[str],
                                                    option: str) -> None:
    extra = ["--out", str(tmp_path / "out")] if command == "golden" else []
    start = time.monotonic()
    line = _exit2(command, *args, *extra)
    assert time.monotonic() - start < 10
    assert "needs about" in line and "test limit 64 MiB" in line and option in line
    assert not (tmp_path / "out").exists()
    FIGURES["cases refused for memory (fake limit)"] += 1


def test_a_case_that_fits_is_not_refused(little_memory: None, tmp_path: Path) -> None:
    res = _invoke("golden", "--block", "gap", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output


def _child_vm_size() -> int:
    """The address space a fresh refattn process maps once its CLI is loaded."""
    code = ("import refattn.cli.main, refattn.golden.generate, pathlib; print(next("
            "ln.split()[1] for ln in pathlib.Path('/proc/self/status').read_text()"
            ".splitlines() if ln.startswith('VmSize:')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=subprocess_env(), check=True)
    return int(out.stdout) * 1024


def test_golden_under_a_real_address_space_limit(tmp_path: Path) -> None:
    """``prlimit --as``: the kernel refuses allocations past the limit; the
    case is refused before any, naming the limit and --shape."""
    if shutil.which("prlimit") is None or not Path("/proc/self/status").is_file():
        pytest.skip("needs prlimit and /proc (Linux)")
    # room for the interpreter and its libraries, far less than the case needs
    limit = _child_vm_size() + 2**30
    cmd = ["prlimit", f"--as={limit}", *refattn_cmd(*BIG_GAP, "--out",
                                                     str(tmp_path / "out"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env=subprocess_env())
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    line = assert_one_error_line(res.stderr, res.stdout)
    assert "needs about" in line and "RLIMIT_AS" in line and "--shape" in line, line
    assert not (tmp_path / "out").exists()
    FIGURES["golden runs under a real limit (prlimit --as, cgroup)"] += 1


def _memory_cgroup() -> tuple[Path, str] | None:
    """A directory under this process's memory cgroup where a child cgroup
    can be made, and its version; None when the machine does not allow it."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            base, version = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "v1"
        elif controllers == "" and (Path("/sys/fs/cgroup") / "cgroup.controllers"
                                    ).is_file():
            base, version = Path("/sys/fs/cgroup") / rel.lstrip("/"), "v2"
        else:
            continue
        if base.is_dir() and os.access(base, os.W_OK):
            return base, version
    return None


def test_golden_inside_a_real_memory_cgroup(tmp_path: Path) -> None:
    """A 1 GiB memory cgroup: the same command used to be killed by the
    kernel without a word; it is refused, exit 2, naming the cgroup limit."""
    found = _memory_cgroup()
    if found is None:
        pytest.skip("cannot create a memory cgroup here (no writable cgroup "
                    "memory controller for this user)")
    base, version = found
    group = base / f"refattn-test-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        (group / limit_file).write_text(str(2**30))
    except OSError as err:
        pytest.skip(f"cannot create a memory cgroup here ({err.strerror})")
    try:
        script = (f"echo $$ > {group / 'cgroup.procs'} && exec "
                  + " ".join(f"'{a}'" for a in refattn_cmd(*BIG_GAP, "--out",
                                                           str(tmp_path / "out"))))
        res = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                             timeout=120, env=subprocess_env())
    finally:
        for _ in range(50):  # the child has exited; its cgroup empties shortly
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    line = assert_one_error_line(res.stderr, res.stdout)
    assert "needs about" in line and "cgroup" in line and "--shape" in line, line
    FIGURES["golden runs under a real limit (prlimit --as, cgroup)"] += 1


# ---------------------------------------------------------------------------
# impossible combinations and NumPy's own words


def test_reduction_that_blows_up_the_default_shape() -> None:
    for command in ("golden", "gradcheck"):
        start = time.monotonic()
        line = _exit2(command, "--block", "cbam", "--set", "reduction=100000")
        assert time.monotonic() - start < 10
        assert "--set reduction=100000" in line and "--shape" in line, line
        FIGURES["impossible option combinations refused"] += 1


def test_an_explicit_shape_lifts_the_default_shape_rule(tmp_path: Path) -> None:
    res = _invoke("golden", "--block", "cbam", "--set", "reduction=16", "--shape",
                  "x=1,32,3,3", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("shape", ["x=1,1,99999999999,99999999999",
                                   "x=1,1,9223372036854775807,2",
                                   "x=99999999999999999999999,1,1,1"])
@pytest.mark.parametrize("command", ["golden", "gradcheck"])
def test_sizes_numpy_would_refuse_name_the_option(command: str, shape: str) -> None:
    line = _exit2(command, "--block", "gap", "--shape", shape)
    for raw in ("Maximum allowed dimension", "array is too big", "internal error"):
        assert raw not in line, line
    assert "--shape" in line, line
    FIGURES["impossible option combinations refused"] += 1


# ---------------------------------------------------------------------------
# gradcheck --mode full: its cost, and --max-evals


def test_full_mode_states_its_cost() -> None:
    res = _invoke("gradcheck", "--block", "gap", "--mode", "full")
    assert res.exit_code == 0, res.output
    spec = BLOCKS["gap"]
    cfg = spec.config()
    elements = sum(math.prod(s) for s in spec.fixture_shapes(cfg).values())
    assert f"{2 * elements + 1:,} evaluations" in res.stderr, res.stderr
    assert f"[{2 * elements + 1} evaluations" in res.stdout, res.stdout
    FIGURES["gradcheck --mode full cost checks"] += 1


def test_full_mode_refuses_more_than_max_evals() -> None:
    line = _exit2("gradcheck", "--block", "mlpconv", "--mode", "full")
    assert "--max-evals 20,000" in line and "122,625 evaluations" in line, line
    line = _exit2("gradcheck", "--block", "gap", "--mode", "full", "--max-evals", "100")
    assert "421 evaluations" in line, line
    res = _invoke("gradcheck", "--block", "gap", "--mode", "full", "--max-evals", "421")
    assert res.exit_code == 0, res.output
    FIGURES["gradcheck --mode full cost checks"] += 3


# ---------------------------------------------------------------------------
# --seed and --out


@pytest.mark.slow
def test_golden_all_honours_the_seed(tmp_path: Path) -> None:
    res = _invoke("golden", "--all", "--seed", "5", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    seeds = {json.loads(p.read_text())["seed"] for p in tmp_path.rglob("manifest.json")}
    assert seeds == {5}
    assert all("-s5" in p.parent.name for p in tmp_path.rglob("manifest.json"))
    FIGURES["option checks (--seed, --out)"] += 1


def test_all_requests_pass_the_seed_on() -> None:
    assert {req.seed for req, _ in all_requests(seed=7)} == {7}


def test_huge_seed_is_refused_before_generating(tmp_path: Path) -> None:
    for command in ("golden", "gradcheck"):
        line = _exit2(command, "--block", "gap", "--seed", "9" * 130,
                      *(["--out", str(tmp_path / "o")] if command == "golden" else []))
        assert "--seed" in line and "case_id" not in line, line
    req, cfg = expand_requests("gap", None, {}, seed=10**130)[0]
    with pytest.raises(ValueError, match="seed"):
        generate_case(req, cfg)
    res = _invoke("golden", "--block", "gap", "--seed", str(2**63 - 1), "--out",
                  tmp_path / "o")
    assert res.exit_code == 0, res.output
    FIGURES["option checks (--seed, --out)"] += 3


def test_empty_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = _exit2("golden", "--block", "gap", "--out", "")
    assert "--out" in line and "empty" in line
    assert list(tmp_path.iterdir()) == []
    FIGURES["option checks (--seed, --out)"] += 1


# ---------------------------------------------------------------------------
# --force replaces only a refattn case; --json/--plot only refattn's files


def _case_dir(tmp_path: Path) -> Path:
    """Where `golden --block gap` writes its case under tmp_path/out."""
    req, _ = expand_requests("gap", None, {})[0]
    return tmp_path / "out" / "gap" / req.case_id(None)


@pytest.mark.parametrize("content", ["notes", "a directory named tensors.npz",
                                     "a manifest of another case", "empty",
                                     "a link to the user's directory"])
def test_force_never_replaces_the_users_directory(tmp_path: Path, content: str) -> None:
    target = _case_dir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("my own notes, not a fixture")
    if content == "a link to the user's directory":
        target.parent.mkdir(parents=True)
        target.symlink_to(mine)
    else:
        target.mkdir(parents=True)
        if content == "notes":
            (target / "manifest.json").write_text("my own notes, not a fixture")
        elif content == "a directory named tensors.npz":
            (target / "tensors.npz").mkdir()
            (target / "tensors.npz" / "thesis.tex").write_text("precious")
        elif content == "a manifest of another case":
            other = write_small_case(tmp_path / "other", "gap")
            shutil.copy(other / "manifest.json", target / "manifest.json")
            data = json.loads((target / "manifest.json").read_text())
            data["case_id"] = "default-float32"
            (target / "manifest.json").write_text(json.dumps(data))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    line = _exit2("golden", "--block", "gap", "--out", tmp_path / "out", "--force")
    assert "not a refattn case" in line, line
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    FIGURES["--force refusals of foreign directories"] += 1


def test_force_replaces_a_damaged_refattn_case(tmp_path: Path) -> None:
    assert _invoke("golden", "--block", "gap", "--out", tmp_path / "out").exit_code == 0
    target = _case_dir(tmp_path)
    data = bytearray((target / "tensors.npz").read_bytes())
    data[len(data) // 2] ^= 1
    (target / "tensors.npz").write_bytes(bytes(data))
    assert not verify_case(target).ok
    res = _invoke("golden", "--block", "gap", "--out", tmp_path / "out", "--force")
    assert res.exit_code == 0, res.output
    assert verify_case(target).ok


@pytest.mark.parametrize("old", ["[]", "[{}]", '[{"case": "x", "ok": true}]', "{}",
                                 "notes"])
def test_json_report_overwrites_only_a_refattn_report(tmp_path: Path, old: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(old)
    line = _exit2("gradcheck", "--block", "gap", "--json", path)
    assert "not a refattn JSON report" in line
    assert path.read_text() == old
    FIGURES["--json/--plot refusals of foreign files"] += 1


def test_json_report_replaces_an_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    assert _invoke("gradcheck", "--block", "gap", "--json", path).exit_code == 0
    first = path.read_text()
    res = _invoke("gradcheck", "--block", "gap", "--json", path, "--seed", "1")
    assert res.exit_code == 0, res.output
    assert path.read_text() != first


@pytest.mark.parametrize("old", ["text", "png of someone else"])
def test_plot_overwrites_only_a_refattn_plot(tmp_path: Path, old: str) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure.png"
    if old == "text":
        path.write_text("my notes")
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure().savefig(path)
        plt.close("all")
    before = path.read_bytes()
    line = _exit2("gradcheck", "--block", "gap", "--plot", path)
    assert "not a plot refattn wrote" in line
    assert path.read_bytes() == before
    FIGURES["--json/--plot refusals of foreign files"] += 1


@pytest.mark.slow
def test_plot_replaces_its_own_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure.png"
    assert _invoke("gradcheck", "--block", "gap", "--plot", path).exit_code == 0
    res = _invoke("gradcheck", "--block", "gap", "--plot", path)
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------
# the CLI does not blame itself


@pytest.fixture
def conv_case(tmp_path: Path) -> Path:
    return write_small_case(tmp_path / "tree", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                            overrides={"out_channels": 2})


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("torch")
    name = f"factories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def none(config):\n    return None\n"
        "def a_dict(config):\n    return {}\n"
        "def a_str(config):\n    return 'conv'\n"
        "def conv(config):\n"
        "    return torch.nn.Conv2d(config['in_channels'], config['out_channels'], 1)\n")
    monkeypatch.chdir(tmp_path)
    return name


@pytest.mark.parametrize("factory, returned", [("none", "NoneType"), ("a_dict", "dict"),
                                               ("a_str", "str")])
def test_factory_returning_no_module(conv_case: Path, factories: str, factory: str,
                                     returned: str) -> None:
    line = _exit2("validate", conv_case, "--torch", f"{factories}:{factory}")
    assert f"returned {returned}" in line and "torch.nn.Module" in line
    FIGURES["user errors the CLI used to blame on itself"] += 1


@pytest.mark.parametrize("device", ["xyz", "meta", "", "cuda:x"])
def test_bad_device(conv_case: Path, factories: str, device: str) -> None:
    line = _exit2("validate", conv_case, "--torch", f"{factories}:conv", "--device",
                  device)
    assert "--device" in line, line
    FIGURES["user errors the CLI used to blame on itself"] += 1


@pytest.mark.parametrize("command", ["golden", "gradcheck"])
def test_deeply_nested_set_value(command: str) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    line = _exit2(command, "--block", "conv1x1", "--set", f"out_channels={deep}")
    assert "--set" in line and "nested" in line and len(line) < 500, line
    FIGURES["user errors the CLI used to blame on itself"] += 1


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'{"weight": "\xe9"}'])
def test_non_utf8_names_file(conv_case: Path, factories: str, tmp_path: Path,
                             data: bytes) -> None:
    names = tmp_path / "names.json"
    names.write_bytes(data)
    line = _exit2("validate", conv_case, "--torch", f"{factories}:conv", "--names", names)
    assert "--names" in line and "names.json" in line and "UTF-8" in line, line
    FIGURES["user errors the CLI used to blame on itself"] += 1
