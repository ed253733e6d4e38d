"""Helpers of the adapter tests: the committed and generated golden cases and
the keys an implementation is compared on.  (A module of its own, not
conftest.py: several test directories have a conftest, so ``from conftest
import`` would depend on the collection order.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from refattn.cli import main
from refattn.golden.format import read_case

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "golden"


def committed(path: str) -> Any:
    """A case of the committed fixture set, read."""
    return read_case(COMMITTED / path)


def golden_case(root: Path, block: str, preset: str, dtype: str, *sets: str) -> Path:
    """One case written with ``refattn golden`` under `root` (a block with
    no train/eval split)."""
    args = ["golden", "--block", block, "--preset", preset, "--dtype", dtype,
            "--out", str(root), "--json"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    return Path(row["path"])


def checked_keys(case: Any) -> list[str]:
    """The keys an implementation is compared on, aux (intermediates, which
    no adapter collects) aside."""
    return sorted(k for k in case.tensors if k.startswith(("output.", "grad.")))
