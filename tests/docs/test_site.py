"""The documentation site builds with ``mkdocs build --strict``: no broken
link, no page missing from or unknown to the navigation, no mkdocstrings
reference that does not resolve, and the generated pages are complete.

The build is the ``site`` fixture of ``conftest.py``, shared with
``test_rendered.py``; skipped when the ``docs`` extra is not installed.
"""

from __future__ import annotations

from pathlib import Path


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
