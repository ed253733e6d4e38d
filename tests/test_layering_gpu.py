"""The GPU seam: the math never imports refattn.cuda; refattn.cuda registers
its kernels into refattn.ops.overrides, lazily, and never imports back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "refattn"
NOT_MATH = {"registry.py", "spec.py"}  # the blocks' registry and contract


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return _imported(path.read_text(encoding="utf-8"), _module_name(path),
                     is_package=path.name == "__init__.py")


def _imported(text: str, module: str, *, is_package: bool) -> set[str]:
    """Every module an import statement of `text` names, at any depth
    (functions included), relative imports resolved; ``from a import b``
    names both ``a`` and ``a.b`` (b may be a module)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _refattn_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _loads(name: str, modules: dict[str, Path]) -> set[str]:
    """The refattn modules importing `name` loads: its parent packages, and
    every refattn module their imports name, transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages load first
            mod = ".".join(parts[:i])
            if mod in modules and mod not in seen:
                seen.add(mod)
                todo.extend(m for m in _imports(modules[mod]) if m in modules)
    return seen


def _is_cuda(name: str) -> bool:
    return name == "refattn.cuda" or name.startswith("refattn.cuda.")


def test_math_does_not_import_cuda() -> None:
    math = [p for sub in ("ops", "blocks") for p in sorted((ROOT / sub).glob("*.py"))
            if p.name not in NOT_MATH]
    assert len(math) > 10
    offenders = {p.name: sorted(filter(_is_cuda, _imports(p))) for p in math}
    assert not {k: v for k, v in offenders.items() if v}, offenders

    modules = _refattn_modules()
    for path in sorted((ROOT / "cuda").glob("*.py")):
        for name in sorted(_imports(path)):
            if name.startswith("refattn.ops") and name in modules:
                back = sorted(filter(_is_cuda, _loads(name, modules)))
                assert not back, f"{path.name} imports {name}, which loads {back}"


def test_the_scan_sees_imports_in_functions_and_relative_ones() -> None:
    """A guard against a vacuous pass of the scan above."""
    text = (
        "def f():\n    from refattn.cuda import kernel_ops\n"
        "from ..cuda.launch import softmax_forward\n"
        "from . import pool\n"
    )
    found = _imported(text, "refattn.ops.probe", is_package=False)
    assert {"refattn.cuda.kernel_ops", "refattn.cuda.launch",
            "refattn.ops.pool"} <= found
    assert sorted(filter(_is_cuda, _loads("refattn.cuda.kernel_ops",
                                          _refattn_modules())))


def test_numpy_and_strict_runs_never_load_the_kernels() -> None:
    code = """
import sys
import numpy as np
import array_api_strict as xs
import refattn.blocks.specs.cbam as cbam
from refattn import backend
from refattn.ops import softmax_forward

cfg = cbam.PRESETS["jongchan"]
shapes = cbam.fixture_shapes(cfg)
params, state = cbam.init_params(cfg, shapes, seed=0)
x = np.random.default_rng(0).standard_normal(shapes["x"])
outputs, cache = cbam.forward({"x": x}, params, state, cfg)
cbam.backward({"out": np.ones_like(outputs["out"])}, cache)
y, _ = softmax_forward(backend.from_host(np.ones((2, 3)), xs))
kernels = ("refattn.cuda.launch", "refattn.cuda.kernel_ops", "cupy")
loaded = sorted(m for m in sys.modules if m.startswith(kernels))
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
