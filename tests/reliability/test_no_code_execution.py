"""Nothing refattn reads is executed.

* Source-level: no module of refattn/ imports pickle (or its relatives),
  every ``np.load`` passes ``allow_pickle=False``, every ``torch.load``
  ``weights_only=True``, nothing calls ``eval``/``exec``/``__import__``,
  and ``importlib.import_module`` appears only where the module names are
  refattn's own constants or the one the user names (``--torch MODULE:F``).
* A crafted npz whose object array runs code when unpickled (its
  ``__reduce__`` writes a marker file) is refused by ``read_case``,
  ``verify_case``, ``load_results`` and the CLI, and the marker never
  appears, while ``np.load(allow_pickle=True)`` shows that the trap works.
* Crafted safetensors results files (odd JSON, huge offsets, overlapping
  ranges, non-UTF-8) are refused by ``load_results`` with a ValueError.
* The PyTorch adapter imports exactly the module the user names (checked
  on ``sys.modules`` in a fresh interpreter), and ``refattn validate``
  imports nothing a manifest names.
"""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import (
    FIGURES,
    REPO,
    assert_one_error_line,
    perfect_results,
    subprocess_env,
    write_small_case,
)
from refattn.cli import main
from refattn.golden.format import FixtureError, read_case, verify_case
from refattn.validate import load_results

SOURCES = sorted((REPO / "refattn").rglob("*.py"))
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve",
                     "marshal", "joblib", "jsonpickle", "yaml"}
IMPORT_MODULE_ALLOWED = {
    "refattn/blocks/registry.py": "refattn's own block modules (_MODULES)",
    "refattn/cli/info.py": "optional backends, a constant tuple",
    "refattn/adapters/common.py": "the module the user names with --torch/--jax/--keras",
    "refattn/ops/overrides.py": "the kernel tiers' loaders (LOADERS), a constant tuple",
}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: Any) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant)
               and k.value.value is value for k in call.keywords)


def test_sources_never_unpickle_or_evaluate() -> None:
    assert len(SOURCES) > 30
    problems = []
    for path in SOURCES:
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            bad = FORBIDDEN_MODULES.intersection(names)
            if bad:
                problems.append(f"{rel}:{node.lineno}: imports {sorted(bad)}")
        for call in _calls(tree):
            name = _dotted(call.func)
            where = f"{rel}:{call.lineno}"
            if name in ("np.load", "numpy.load") and not _keyword_is(
                    call, "allow_pickle", False):
                problems.append(f"{where}: {name} without allow_pickle=False")
            if name.endswith("read_array") and not _keyword_is(call, "allow_pickle",
                                                                False):
                problems.append(f"{where}: {name} without allow_pickle=False")
            if name == "torch.load" and not _keyword_is(call, "weights_only", True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("eval", "exec", "__import__", "compile", "builtins.eval",
                        "builtins.exec"):
                problems.append(f"{where}: calls {name}")
            if name.endswith("import_module") and rel not in IMPORT_MODULE_ALLOWED:
                problems.append(f"{where}: import_module outside the allowed places")
        FIGURES["source files scanned for unpickling/eval"] += 1
    assert problems == []


# ---------------------------------------------------------------------------
# a pickle that runs code


class Trap:
    """Unpickling runs exec() of code that writes a marker file: what an
    attacker's object array would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        code = f"open({str(self.marker)!r}, 'w').write('code ran')"
        return (exec, (code,))


def _trap_npz(path: Path, marker: Path, base: dict[str, np.ndarray]) -> None:
    obj = np.empty(3, dtype=object)
    obj[:] = [Trap(marker)] * 3
    payload = {k: np.asarray(v, order="C") for k, v in base.items()}
    payload[next(k for k in payload if k.startswith("output."))] = obj
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=True, **payload)


def test_pickled_object_arrays_never_run(tmp_path: Path) -> None:
    case = write_small_case(tmp_path / "root", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                            overrides={"out_channels": 2})
    marker = tmp_path / "MARKER"
    golden = read_case(case)
    good_results = perfect_results(case, tmp_path / "r.npz")
    # as the case's own npz mirror
    _trap_npz(case / "tensors.npz", marker, golden.tensors)
    with pytest.raises(FixtureError, match=r"tensors\.npz.*pickle"):
        read_case(case, source="npz")
    assert not verify_case(case).ok
    runner = CliRunner()
    for args in (["verify", str(case)], ["show", str(case)],
                 ["validate", str(case), "--results", str(good_results)]):
        res = runner.invoke(main, args)
        assert res.exit_code == (1 if args[0] == "verify" else 2), res.output
        assert "tensors.npz" in res.output and "Traceback" not in res.output
    # as a third party's results file
    results = tmp_path / "theirs.npz"
    _trap_npz(results, marker, {k: v for k, v in golden.tensors.items()
                                if k.startswith("output.")})
    with pytest.raises(ValueError, match="theirs.npz"):
        load_results(results)
    clean = write_small_case(tmp_path / "clean", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                             overrides={"out_channels": 2})
    res = runner.invoke(main, ["validate", str(clean), "--results", str(results)])
    assert res.exit_code == 2 and "theirs.npz" in assert_one_error_line(res.stderr)
    assert not marker.exists(), "unpickling ran code"
    FIGURES["pickle traps refused"] += 6
    # the trap is real: numpy with allow_pickle=True runs it
    with np.load(results, allow_pickle=True) as z:
        z[next(k for k in z.files if k.startswith("output."))]
    assert marker.read_text() == "code ran"


# ---------------------------------------------------------------------------
# hostile safetensors results files


def _st_file(path: Path, header: bytes, body: bytes = b"\0" * 48,
             claim: int | None = None) -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header) if claim is None else claim)
                     + header + body)
    return path


HOSTILE = {
    "huge length claim": (b'{"output.out":{"dtype":"F64","shape":[6],'
                          b'"data_offsets":[0,48]}}', 2**63),
    "claim past the end": (b'{"output.out":{"dtype":"F64","shape":[6],'
                           b'"data_offsets":[0,48]}}', 10**8),
    "non-UTF-8": (b'{"\xff\xfe":{"dtype":"F64","shape":[6],"data_offsets":[0,48]}}',
                  None),
    "offsets past the end": (b'{"output.out":{"dtype":"F64","shape":[6],'
                             b'"data_offsets":[4611686018427387904,'
                             b'4611686018427387952]}}', None),
    "overlapping ranges": (b'{"output.out":{"dtype":"F64","shape":[6],'
                           b'"data_offsets":[0,48]},"aux.a":{"dtype":"F64",'
                           b'"shape":[6],"data_offsets":[0,48]}}', None),
    "shape overflow": (b'{"output.out":{"dtype":"F64","shape":[4294967296,'
                       b'4294967296,4294967296],"data_offsets":[0,48]}}', None),
    "negative dim": (b'{"output.out":{"dtype":"F64","shape":[-6],'
                     b'"data_offsets":[0,48]}}', None),
    "object dtype": (b'{"output.out":{"dtype":"O","shape":[6],'
                     b'"data_offsets":[0,48]}}', None),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, None),
    "not an object": (b"[1,2,3]", None),
    "metadata not strings": (b'{"__metadata__":{"a":1},"output.out":{"dtype":"F64",'
                             b'"shape":[6],"data_offsets":[0,48]}}', None),
}


@pytest.mark.parametrize("label", sorted(HOSTILE))
def test_hostile_safetensors_results_are_refused(tmp_path: Path, label: str) -> None:
    header, claim = HOSTILE[label]
    path = _st_file(tmp_path / "theirs.safetensors", header, claim=claim)
    with pytest.raises(ValueError, match="theirs.safetensors"):
        load_results(path)
    FIGURES["hostile safetensors results files refused"] += 1


def test_odd_fields_in_a_results_header_are_only_data(tmp_path: Path) -> None:
    """Unknown fields are ignored by the safetensors reader (nothing of them
    is evaluated); the values come from the data range alone."""
    body = np.arange(6, dtype="<f8").tobytes()
    path = _st_file(tmp_path / "theirs.safetensors",
                    b'{"output.out":{"dtype":"F64","shape":[2,3],"data_offsets":'
                    b'[0,48],"__reduce__":"os.system","py/object":"builtins.eval"}}',
                    body)
    got = load_results(path)
    np.testing.assert_array_equal(got["output.out"], np.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------------------
# imports: only what the user names


PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch  # noqa: F401  (torch itself is expected)
    from refattn.adapters.torch import load_factory
    before = set(sys.modules)
    factory = load_factory(sys.argv[2])
    after = set(sys.modules)
    print(json.dumps({"new": sorted(after - before), "name": factory.__name__}))
""")


def test_torch_adapter_imports_only_the_named_module(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("def make(config):\n    return None\n")
    (pkg / "other.py").write_text(
        f"open({str(tmp_path / 'OTHER')!r}, 'w').write('imported')\n")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path),
                           "userpkg.models:make"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data == {"new": ["userpkg", "userpkg.models"], "name": "make"}
    assert not (tmp_path / "OTHER").exists()


VALIDATE_PROBE = textwrap.dedent("""
    import json, sys
    from refattn.cli import main
    before = set(sys.modules)
    try:
        main(["validate", sys.argv[1], "--results", sys.argv[2]])
    except SystemExit as e:
        code = e.code
    print(json.dumps({"code": code, "new": sorted(set(sys.modules) - before)}))
""")


def test_validate_imports_nothing_a_manifest_names(tmp_path: Path) -> None:
    from refattn.golden.format import write_case
    from refattn.golden.generate import expand_requests, generate_case

    evil = tmp_path / "evilmod.py"
    evil.write_text(f"open({str(tmp_path / 'EVIL')!r}, 'w').write('imported')\n")
    # a valid case whose manifest names a module every way it can
    gen = generate_case(*expand_requests("conv1x1", None, {"out_channels": 2},
                                         shapes={"x": (1, 2, 2, 3)})[0])
    m = json.loads(json.dumps(gen.manifest))
    m["config"]["factory"] = "evilmod:make"
    m["anchor_names"]["weight"] = "evilmod"
    m["input_constraints"]["hook"] = "__import__('evilmod')"
    m["provenance"]["backend"] = "evilmod"
    case = write_case(tmp_path / "root", gen.block, gen.case_id, gen.tensors, m,
                      tolerances=gen.tolerances, accumulation=gen.accumulation)
    assert verify_case(case).ok
    results = perfect_results(case, tmp_path / "r.npz")
    proc = subprocess.run([sys.executable, "-c", VALIDATE_PROBE, str(case),
                           str(results)], capture_output=True, text=True,
                          cwd=tmp_path, env=subprocess_env(), timeout=300)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["code"] == 0, proc.stdout + proc.stderr
    assert "evilmod" not in data["new"] and not (tmp_path / "EVIL").exists()
    assert not any(m.startswith("torch") for m in data["new"])  # not even torch
