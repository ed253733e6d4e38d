"""The built documentation site, shared by the tests that read it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
