"""The committed golden/ set: intact, complete, and reproducible by this code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from refattn.blocks.registry import BLOCKS
from refattn.blocks.spec import config_from_dict, json_ready
from refattn.golden.format import find_cases, read_case, verify_case
from refattn.golden.generate import (
    CaseRequest,
    all_requests,
    bn_mode_of,
    generate_case,
)

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
CASES = find_cases(GOLDEN) if GOLDEN.is_dir() else []


def test_the_committed_set_exists_and_is_small():
    assert CASES, "golden/ is missing: run `refattn golden --all --out golden`"
    size = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    # 98 cases (8 blocks, 3 gate sub-blocks, every preset) take 11.6 MiB
    assert size < 16 * 2**20, f"golden/ holds {size / 2**20:.1f} MiB (budget: 16 MiB)"


def test_every_preset_of_every_block_in_both_dtypes():
    want = {
        (req.block, req.case_id(bn_mode_of(BLOCKS[req.block], cfg)))
        for req, cfg in all_requests()
    }
    have = {(p.parent.name, p.name) for p in CASES}
    assert want == have


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_case_verifies_and_regenerates_within_tolerance(case_dir: Path):
    result = verify_case(case_dir)
    assert result.ok, result.problems
    case = read_case(case_dir)
    m = case.manifest
    spec = BLOCKS[m["block"]]
    cfg = config_from_dict(spec.config_cls, m["config"])
    shapes = {k: tuple(m["input_shapes"][k]) for k in m["inputs"]}
    fresh = generate_case(
        CaseRequest(m["block"], m["preset"], {}, shapes, m["dtype"], m["seed"]), cfg
    )
    assert set(fresh.tensors) == set(case.tensors)
    for key, expected in case.tensors.items():
        got = fresh.tensors[key]
        tol = m["tensors"][key]
        if tol["rtol"] == 0 and tol["atol"] == 0:  # drawn data: bit-identical
            np.testing.assert_array_equal(got, expected, err_msg=key)
        else:
            np.testing.assert_allclose(
                got, expected, rtol=tol["rtol"], atol=tol["atol"], err_msg=key
            )
    assert same_config(m["config"], fresh.manifest["config"], spec.config_cls)


def same_config(stored: dict, now: dict, cls: type) -> bool:
    """Does a stored manifest config state the config the code now writes?  A
    case written before a config key existed lacks that key; it states the
    same config only if the key is at its default in the fresh one."""
    added = set(now) - set(stored)
    if not set(stored) <= set(now):
        return False
    if json.dumps(stored, sort_keys=True) != json.dumps(
        {k: v for k, v in now.items() if k not in added}, sort_keys=True
    ):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: now[k] for k in added} == json_ready({k: defaults[k] for k in added})


def test_same_config_refuses_a_different_config():
    from refattn.blocks.cbam import CBAMConfig

    now = json_ready(dataclasses.asdict(CBAMConfig()))
    assert same_config(dict(now), now, CBAMConfig)
    older = {k: v for k, v in now.items() if k != "hidden_divisor"}
    assert same_config(older, now, CBAMConfig)  # a key added since, at its default
    assert not same_config(older, now | {"hidden_divisor": 8}, CBAMConfig)
    assert not same_config(now | {"reduction": 8}, now, CBAMConfig)
    assert not same_config(now | {"colour": 1}, now, CBAMConfig)
    assert not same_config(now, older, CBAMConfig)  # a key the code dropped
