"""The built documentation site, and the docs build's own modules
(``docs/_gen/mathml.py``, ``docs/_gen/worked.py``), shared by the tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
          "pymdownx", "latex2mathml")


def missing_docs_extra() -> list[str]:
    """The modules of the ``docs`` extra that are not importable."""
    out = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name
            found = False
        if not found:
            out.append(name)
    return out


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` of the repository's site, once per session
    (skipped when the ``docs`` extra is not installed)."""
    missing = missing_docs_extra()
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): "
                    "pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
         "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                        if line.startswith(("WARNING", "ERROR", "Aborted")))
        pytest.fail(f"mkdocs build --strict failed:\n{log or proc.stderr[-6000:]}")
    return out


def load_gen(name: str) -> ModuleType:
    """A module of docs/_gen by file (it is not a package)."""
    qualified = f"refattn_docs_{name}"
    if qualified not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            qualified, ROOT / "docs" / "_gen" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[qualified]


@pytest.fixture(scope="session")
def mathml() -> ModuleType:
    """The strict TeX -> MathML renderer of the site."""
    pytest.importorskip("latex2mathml")
    return load_gen("mathml")


@pytest.fixture(scope="session")
def worked() -> ModuleType:
    """The worked-example generator (and the step-comment resolver)."""
    return load_gen("worked")
