"""``refattn golden --preset all --dtype all`` and the readable ids of cases
with --set / --shape values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from refattn.cli import main
from refattn.golden.generate import CaseRequest
from refattn.golden.manifest import _ID_RE

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.stderr  # click's usage errors add the usage above
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def _digests(block_dir: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "manifest.json").read_text())["digest"]
            for p in sorted(block_dir.iterdir()) if (p / "manifest.json").is_file()}


@pytest.mark.parametrize("block", ["gc", "cgnl"])
def test_every_preset_and_dtype_of_a_block_reproduces_the_committed_set(
        tmp_path: Path, block: str):
    """The committed set's cases, each with the same digest when the command
    runs again.  The committed digests themselves may differ on another CPU:
    NumPy's SIMD exp and OpenBLAS's kernels are chosen per instruction set
    and can move a float64 result by an ulp (an AMD EPYC and an AVX-512 Xeon
    differ in gc's softmax and in cgnl's BLAS sums), so
    tests/golden/test_committed.py
    compares every committed case with a fresh one within its tolerances."""
    committed = _digests(ROOT / "golden" / block)
    assert committed, f"golden/{block} is missing: run `refattn golden --all --out golden`"
    written = []
    for out in (tmp_path / "one", tmp_path / "two"):
        result = run("golden", "--block", block, "--preset", "all", "--dtype", "all",
                     "--out", str(out), "--json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert [r["status"] for r in rows] == ["written"] * len(committed)
        written.append(_digests(out / block))
    assert set(written[0]) == set(committed)
    assert written[0] == written[1]


def test_every_preset_with_modes_of_a_bn_block(tmp_path: Path):
    """cbam: every preset x BN mode in float32; --mode eval keeps the eval case
    of each BN preset and the one case of each preset without a live BN."""
    from refattn.blocks.registry import BLOCKS

    result = run("golden", "--block", "cbam", "--preset", "all", "--dtype", "float32",
                 "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    ids = [r["case"].split("/")[1] for r in json.loads(result.stdout)]
    if (ROOT / "golden" / "cbam").is_dir():
        assert sorted(ids) == sorted(p.name for p in (ROOT / "golden" / "cbam").iterdir()
                                     if p.name.endswith("float32"))
    for preset in BLOCKS["cbam"].presets:
        assert any(i.startswith(f"{preset}-") for i in ids), preset
    eval_run = run("golden", "--block", "cbam", "--preset", "all", "--dtype", "float32",
                   "--mode", "eval", "--out", str(tmp_path), "--json")
    assert eval_run.exit_code == 0, eval_run.output
    kept = [r["case"].split("/")[1] for r in json.loads(eval_run.stdout)]
    assert kept == [i for i in ids if "-train-" not in i]
    assert all(r["status"] == "kept (identical)" for r in json.loads(eval_run.stdout))


@pytest.mark.parametrize("args, needle", [
    (["--block", "cbam", "--preset", "alll"], "cbam has no preset 'alll' (presets: "
     "jongchan, luuuyi, seed, ultralytics, timm, timm_light; or all for every one)"),
    (["--block", "gap", "--preset", "all", "--mode", "eval"], "no live batch norm"),
    (["--block", "cbam", "--preset", "all", "--dtype", "float16"], "float16"),
    (["--block", "cbam", "--preset", "all", "--set", "reduction=0"], "reduction"),
    (["--all", "--block", "cbam"], "--preset all --dtype all"),
])
def test_bad_block_runs_exit_2_with_one_line(tmp_path: Path, args, needle):
    line = one_line_error(run("golden", *args, "--out", str(tmp_path)))
    assert needle in line
    assert not (tmp_path / "cbam").exists()


def test_readable_id_spells_the_overrides():
    req = CaseRequest("gc", "mmcv", {"fusion_types": ("channel_add", "channel_mul")})
    assert req.case_id(None) == "mmcv-float64-fusion_types.channel_add.channel_mul-b6c79be3"
    req = CaseRequest("cbam", "jongchan", {"spatial_kernel": 3, "spatial_bn": None,
                                           "mlp_bias": True},
                      shapes={"x": (2, 16, 7, 6)}, dtype="float32", seed=5)
    case_id = req.case_id(None)
    assert case_id.startswith("jongchan-float32-s5-mlp_bias.true-spatial_bn.none-"
                              "spatial_kernel.3-x.2x16x7x6-")
    # the hash is the one the bare-hash ids had, so it still tells cases apart
    assert len(case_id.rsplit("-", 1)[1]) == 8


def test_readable_id_does_not_depend_on_the_order_of_the_options():
    a = CaseRequest("cbam", "seed", {"reduction": 4, "mlp_bias": True},
                    shapes={"x": (2, 8, 7, 6)})
    b = CaseRequest("cbam", "seed", {"mlp_bias": True, "reduction": 4},
                    shapes={"x": (2, 8, 7, 6)})
    assert a.case_id("train") == b.case_id("train")


def test_a_case_without_overrides_keeps_its_bare_id():
    assert CaseRequest("cbam", "jongchan").case_id("train") == "jongchan-train-float64"
    assert CaseRequest("gap").case_id(None) == "default-float64"


@pytest.mark.parametrize("overrides", [
    {"mode": "../../etc/passwd"},
    {"mode": "a b\tc\n\x00;rm -rf ~"},
    {"mode": "é" * 300},
    {"k" * 500: "v" * 500},
    {"mode": "-"},
    {"mode": ""},
])
@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_hostile_overrides_give_a_safe_id(overrides, seed):
    """Whatever the values, the id is one safe directory name the fixture format
    takes (no separator, no dot-dot path, at most 128 characters)."""
    case_id = CaseRequest("cbam", "timm_light", overrides, dtype="float32",
                          seed=seed).case_id("train")
    assert _ID_RE.match(case_id), case_id
    assert "/" not in case_id and len(case_id) <= 128
    assert case_id.startswith("timm_light-train-float32-")


def test_values_that_spell_alike_get_different_ids():
    """The sanitizing merges a/b and a_b; the hash keeps them apart."""
    a = CaseRequest("cgnl", "yue", {"mode": "a/b"}).case_id(None)
    b = CaseRequest("cgnl", "yue", {"mode": "a_b"}).case_id(None)
    assert a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]
    assert a != b


def test_a_readable_id_case_is_written_and_globbed(tmp_path: Path):
    """The docs glob `<preset>-<dtype>-*`: a readable id still matches it."""
    result = run("golden", "--block", "gc", "--set", "fusion_types=channel_add,channel_mul",
                 "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    found = [p.name for p in (tmp_path / "gc").glob("mmcv-float64-*")]
    assert found == ["mmcv-float64-fusion_types.channel_add.channel_mul-b6c79be3"]
    again = run("golden", "--block", "gc", "--set", "fusion_types=channel_add,channel_mul",
                "--out", str(tmp_path))
    assert "1 kept (identical)" in again.output
