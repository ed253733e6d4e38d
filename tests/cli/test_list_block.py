"""``refattn list BLOCK``: parameter names, preset changes, and only the keys
that matter; the inert keys it leaves out are proven inert here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from refattn.blocks.registry import BLOCKS
from refattn.blocks.spec import config_to_dict
from refattn.cli import main
from refattn.golden.generate import CaseRequest, generate_case

SPATIAL = {"spatial_kernel", "channel_pool_order", "spatial_bias", "spatial_bn",
           "bn_eps", "bn_momentum", "spatial_relu"}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def list_json(block: str) -> dict:
    result = run("list", block, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    return row


def test_gate_block_lists_only_its_own_keys():
    row = list_json("cbam_channel")
    assert not SPATIAL & set(row["config"]), row["config"]
    assert SPATIAL <= set(row["inert"])
    for changes in row["preset_changes"].values():
        assert not SPATIAL & set(changes)
    spatial = list_json("cbam_spatial")
    assert {"reduction", "pool_types", "mlp_bias"}.isdisjoint(spatial["config"])
    assert "spatial_kernel" in spatial["config"]
    # the text shows the same, and no spatial key under cbam_channel
    text = run("list", "cbam_channel").output
    assert "spatial_kernel" not in text and "mlp_bias: true -> false" in text


def test_preset_changes_are_a_diff_against_the_default_config():
    """Recomputed from the presets' configs: each change is a key whose value
    differs, with the default's value first; nothing else is listed."""
    row = list_json("cbam")
    spec = BLOCKS["cbam"]
    base = config_to_dict(spec.config())
    for preset, changes in row["preset_changes"].items():
        values = config_to_dict(spec.config(preset))
        for key, (old, new) in changes.items():
            assert old == base[key] and new == values[key] != base[key]
        live_diff = {k for k in values if values[k] != base[k]} - set(
            spec.inert_keys(spec.config(preset)))
        assert set(changes) == live_diff
    assert row["preset_changes"]["jongchan"] == {}
    assert row["preset_changes"]["ultralytics"]["mlp_layers"] == [2, 1]
    # ultralytics' one layer makes reduction inert: not a change, even if set
    assert "reduction" not in row["preset_changes"]["ultralytics"]


def test_parameter_names_canonical_and_per_preset_anchor():
    row = list_json("cbam")
    spec = BLOCKS["cbam"]
    for preset, params in row["parameters"].items():
        cfg = spec.config(preset)
        shapes = spec.fixture_shapes(cfg)
        expected = spec.param_shapes(cfg, shapes)
        assert {k: tuple(v["shape"]) for k, v in params.items()} == {
            k: tuple(v) for k, v in expected.items()}
        anchors = spec.anchor_names(preset, cfg, shapes)
        assert {k: v["anchor"] for k, v in params.items() if v["anchor"]} == anchors
    assert row["parameters"]["luuuyi"]["mlp.fc1.weight"]["anchor"] == "ca.fc.0.weight"
    assert "mlp.fc1.bias" not in row["parameters"]["luuuyi"]
    text = run("list", "cbam").output
    line = next(ln for ln in text.splitlines() if "ChannelGate.mlp.1.weight" in ln)
    assert line.split() == ["mlp.fc1.weight", "(2,", "32)", "->",
                            "ChannelGate.mlp.1.weight"]


def test_block_without_presets():
    row = list_json("conv1x1")
    assert row["preset_changes"] == {} and list(row["parameters"]) == ["default"]
    assert all(v["anchor"] is None for v in row["parameters"]["default"].values())
    assert "parameters (canonical name, shape)" in run("list", "conv1x1").output


@pytest.mark.parametrize("block", ["cbamx", "", "CBAM", "../cbam", "cbam\x00"])
@pytest.mark.parametrize("as_json", [False, True])
def test_unknown_block_exits_2_naming_the_blocks(block, as_json):
    result = run("list", block, *(["--json"] if as_json else []))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert "no block" in lines[0] and ", ".join(BLOCKS) in lines[0]


# ---------------------------------------------------------------------------
# the inert keys are inert: changing one changes no tensor of the case

OTHER_VALUE = {
    "reduction": lambda v: v // 2, "hidden_channels": lambda v: 3 if v is None else None,
    "hidden_divisor": lambda v: 4 if v is None else 2 * v,
    "mlp_layers": lambda v: 3 - v, "pool_types": lambda v: ("max",),
    "mlp_bias": lambda v: not v, "spatial": lambda v: not v,
    "spatial_kernel": lambda v: 3, "channel_pool_order": lambda v: "avgmax",
    "spatial_bias": lambda v: not v,
    "spatial_bn": lambda v: None if v else "train", "bn_eps": lambda v: 1e-2,
    "bn_momentum": lambda v: 0.5, "spatial_relu": lambda v: not v,
}


def _tensors(block: str, preset: str, cfg, shapes) -> dict[str, np.ndarray]:
    req = CaseRequest(block, preset, shapes=shapes)
    return generate_case(req, BLOCKS[block].check_config(cfg)).tensors


def changes_nothing(block: str, preset: str, cfg, key: str) -> bool:
    """Does giving `key` another value leave every tensor of the case as it is
    (same inputs, parameters, outputs, gradients and intermediates)?"""
    shapes = BLOCKS[block].fixture_shapes(cfg)
    other = dataclasses.replace(cfg, **{key: OTHER_VALUE[key](getattr(cfg, key))})
    a = _tensors(block, preset, cfg, shapes)
    b = _tensors(block, preset, other, shapes)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


CASES = [(block, preset, mode) for block in ("cbam", "cbam_channel", "cbam_spatial")
         for preset in BLOCKS[block].presets for mode in ("train", "eval")]


@pytest.mark.parametrize("block, preset, mode", CASES)
def test_inert_keys_change_no_tensor(block, preset, mode):
    spec = BLOCKS[block]
    cfg = spec.with_bn_mode(spec.config(preset), mode) or spec.config(preset)
    inert = spec.inert_keys(cfg)
    for key in sorted(inert):
        assert changes_nothing(block, preset, cfg, key), (block, preset, key)


@pytest.mark.parametrize("block, preset, key", [
    ("cbam_channel", "jongchan", "reduction"),
    ("cbam_channel", "jongchan", "pool_types"),
    ("cbam_spatial", "jongchan", "spatial_kernel"),
    ("cbam_spatial", "seed", "channel_pool_order"),
    ("cbam", "jongchan", "bn_momentum"),  # train mode: the running stats move
    ("cbam", "jongchan", "bn_eps"),
    ("cbam", "timm", "hidden_divisor"),
    ("cbam", "luuuyi", "spatial_relu"),
])
def test_the_inertness_check_catches_a_live_key(block, preset, key):
    """A key wrongly claimed inert is caught: the same check fails on it."""
    spec = BLOCKS[block]
    cfg = spec.config(preset)
    assert key not in spec.inert_keys(cfg)
    assert not changes_nothing(block, preset, cfg, key)
