"""The documentation site builds with ``mkdocs build --strict``: no broken
link, no page missing from or unknown to the navigation, no mkdocstrings
reference that does not resolve, and the generated pages are complete.

Skipped when the ``docs`` extra (mkdocs, mkdocs-material, mkdocstrings) is
not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
          "pymdownx")


def _missing() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name
            found = False
        if not found:
            out.append(name)
    return out


pytestmark = pytest.mark.skipif(
    bool(_missing()),
    reason=f"the docs extra is not installed (missing {', '.join(_missing())}): "
    "pip install -e '.[docs]'",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
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


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "search" / "search_index.json").is_file()


def test_generated_pages_are_in_the_site(site: Path) -> None:
    from refattn.cli import main

    ops = (site / "ops" / "index.html").read_text(encoding="utf-8")
    assert "refattn-vjp" in ops and "conv2d_backward" in ops
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    for name in main.commands:
        assert f'id="refattn-{name}"' in cli, name


def test_api_reference_renders_every_module(site: Path) -> None:
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for mod in ("refattn.backend", "refattn.gradcheck", "refattn.blocks.registry",
                "refattn.validate", "refattn.testing", "refattn.golden.format"):
        assert f'id="{mod}"' in api, mod
    assert 'id="refattn.gradcheck.gradcheck"' in api
