"""The refattn-golden/1 format: digests, tolerances, atomic writes, and a
reader that refuses every kind of broken case by name."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refattn.golden import format as fmt
from refattn.golden import publish
from refattn.golden.format import (
    SCHEMA,
    CaseExistsError,
    FixtureError,
    case_digest,
    find_cases,
    read_case,
    split_key,
    summarize_case,
    tensor_digest,
    tolerance_for,
    verify_case,
    write_case,
)

safetensors_numpy = pytest.importorskip("safetensors.numpy")


# ---------------------------------------------------------------------------
# helpers


def make_tensors(dtype: str = "float64", seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors of every role, with awkward layouts: Fortran order, a strided
    view, a transpose, a 0-d array, an empty array."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    big = rng.standard_normal((3, 8)).astype(dt)
    return {
        "input.x": rng.standard_normal((2, 3, 4, 5)).astype(dt),
        "param.fc.weight": np.asfortranarray(rng.standard_normal((4, 3)).astype(dt)),
        "param.fc.bias": big[:, ::2][1],  # strided view
        "state.bn.running_mean": rng.standard_normal(3).astype(dt),
        "cotangent.out": rng.standard_normal((3, 2)).astype(dt).T,  # transpose
        "output.out": rng.standard_normal((2, 3)).astype(dt),
        "output.state.bn.running_mean": rng.standard_normal(3).astype(dt),
        "grad.input.x": rng.standard_normal((2, 3, 4, 5)).astype(dt),
        "grad.param.fc.weight": big[:, 1:5].T,  # non-contiguous transpose of a slice
        "aux.scale": np.asarray(rng.standard_normal(), dtype=dt),  # 0-d
        "aux.empty": np.zeros((0, 3), dtype=dt),
        "aux.argmax": rng.integers(0, 9, size=(2, 3)),
    }


def make_manifest(dtype: str = "float64", **changes: Any) -> dict[str, Any]:
    m = {
        "block": "cgnl",
        "preset": "official",
        "case_id": "case-a",
        "config": {"planes": 4, "groups": 2, "scale": True, "eps": 1e-5},
        "dtype": dtype,
        "mode": "train",
        "seed": 7,
        "rng": "numpy.random.default_rng(PCG64)",
        "input_constraints": {"relu_margin": 1e-3},
        "redraws": 0,
        "inputs": ["x"],
        "outputs": ["out"],
        "anchor_names": {"fc.weight": "module.fc.weight"},
        "provenance": {"backend": "numpy"},
    }
    m.update(changes)
    return m


def write(
    root: Path,
    dtype: str = "float64",
    case_id: str = "case-a",
    seed: int = 0,
    **kw: Any,
) -> Path:
    return write_case(
        root,
        "cgnl",
        case_id,
        make_tensors(dtype, seed),
        make_manifest(dtype, case_id=case_id),
        **kw,
    )


def snapshot(root: Path) -> dict[str, Any]:
    out = {}
    for dirpath, _, files in os.walk(root):
        d = Path(dirpath)
        out[str(d.relative_to(root))] = ("dir", d.stat().st_mode)
        for f in files:
            p = d / f
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def data_offset(path: Path, array: np.ndarray) -> int:
    """Offset of a tensor's little-endian payload inside a container file."""
    payload = np.asarray(
        array, dtype=array.dtype.newbyteorder("<"), order="C"
    ).tobytes()
    data = path.read_bytes()
    at = data.find(payload)
    assert at >= 0 and data.find(payload, at + 1) < 0, "payload not unique in file"
    return at


def assert_names(err: FixtureError | str, file: str, tensor: str | None = None) -> None:
    text = str(err)
    assert file in text, text
    if tensor is not None:
        assert f"'{tensor}'" in text, text


# ---------------------------------------------------------------------------
# tolerance rule


def test_tolerance_formula_and_ranges() -> None:
    u = {
        name: float(np.finfo(name).eps) / 2
        for name in ("float16", "float32", "float64")
    }
    for dtype, lower in (("float64", "float32"), ("float32", "float16")):
        for k in (1, 100, 10_000, 100_000):
            rtol, atol_rel = tolerance_for(dtype, k)
            assert rtol == atol_rel
            assert rtol == pytest.approx(math.sqrt(u[dtype] * u[lower] * k), rel=1e-12)
    assert (
        1e-12
        <= tolerance_for("float64", 1)[0]
        <= tolerance_for("float64", 100_000)[0]
        < 1e-8
    )
    assert (
        1e-6
        <= tolerance_for("float32", 1)[0]
        <= tolerance_for("float32", 100_000)[0]
        < 1e-2
    )
    assert tolerance_for("int64", 50) == (0.0, 0.0)
    assert tolerance_for("bool", 1) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "10"])
def test_tolerance_rejects_bad_length(bad: Any) -> None:
    with pytest.raises(ValueError, match="accumulation_length"):
        tolerance_for("float32", bad)


def test_tolerance_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        tolerance_for("float16", 1)


def _passes(actual: np.ndarray, expected: np.ndarray, dtype: str, k: int) -> bool:
    rtol, atol_rel = tolerance_for(dtype, k)
    atol = atol_rel * np.max(np.abs(expected))
    return bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))


@pytest.mark.parametrize("k", [1, 100, 10_000])
def test_tolerance_accepts_correct_sums_and_rejects_lower_precision(k: int) -> None:
    """Sequential sums of K terms: computed in the fixture dtype they pass the
    rule against the exactly rounded sum (math.fsum); computed one precision
    lower they fail it."""
    rng = np.random.default_rng(k)
    terms64 = rng.standard_normal((64, k))
    terms32 = terms64.astype(np.float32)

    exact64 = np.array([math.fsum(r) for r in terms64])
    exact32 = np.array([math.fsum(r) for r in terms32.astype(np.float64)])
    sum64 = np.cumsum(terms64, axis=1)[:, -1]
    sum32 = np.cumsum(terms32, axis=1, dtype=np.float32)[:, -1].astype(np.float64)
    sum16 = np.cumsum(terms32.astype(np.float16), axis=1, dtype=np.float16)[
        :, -1
    ].astype(np.float64)
    sum32_of64 = np.cumsum(terms64.astype(np.float32), axis=1, dtype=np.float32)[
        :, -1
    ].astype(np.float64)

    assert _passes(sum64, exact64, "float64", k)
    assert not _passes(sum32_of64, exact64, "float64", k)
    assert _passes(sum32, exact32, "float32", k)
    assert not _passes(sum16, exact32, "float32", k)


# ---------------------------------------------------------------------------
# keys and digests


@pytest.mark.parametrize(
    "key,role,name",
    [
        ("input.x", "input", "x"),
        ("input.x_kv.0", "input", "x_kv.0"),
        ("param.mlp.fc1.weight", "param", "mlp.fc1.weight"),
        ("state.bn.running_var", "state", "bn.running_var"),
        ("cotangent.out", "cotangent", "out"),
        ("output.out", "output", "out"),
        ("output.state.bn.running_var", "output_state", "bn.running_var"),
        ("grad.input.x", "grad_input", "x"),
        ("grad.param.fc.bias", "grad_param", "fc.bias"),
        ("aux.attention", "aux", "attention"),
    ],
)
def test_split_key(key: str, role: str, name: str) -> None:
    assert split_key(key) == (role, name)


@pytest.mark.parametrize(
    "key",
    [
        "x",
        "grad.x",
        "input.",
        "input..x",
        "input.x.",
        "inputs.x",
        "aux.a-b",
        "param.fc weight",
        "",
    ],
)
def test_split_key_rejects(key: str) -> None:
    with pytest.raises(FixtureError, match="tensor key"):
        split_key(key)


def test_tensor_digest_follows_the_documented_recipe() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    want = hashlib.sha256(
        b"refattn-golden/1\0output.y\0float64\0" + b"2,3\0" + a.astype("<f8").tobytes()
    ).hexdigest()
    assert tensor_digest("output.y", a) == want
    s = np.asarray(np.float32(0.25))
    want0 = hashlib.sha256(
        b"refattn-golden/1\0aux.s\0float32\0\0" + struct.pack("<f", 0.25)
    ).hexdigest()
    assert tensor_digest("aux.s", s) == want0


def test_tensor_digest_ignores_layout_but_not_content() -> None:
    a = np.random.default_rng(1).standard_normal((3, 4))
    d = tensor_digest("input.x", a)
    assert tensor_digest("input.x", np.asfortranarray(a)) == d
    assert tensor_digest("input.x", a.astype(">f8")) == d
    assert tensor_digest("input.x", a.T.copy().T) == d
    assert tensor_digest("input.y", a) != d
    assert tensor_digest("input.x", a.reshape(4, 3)) != d
    assert tensor_digest("input.x", a.astype(np.float32)) != d
    b = a.copy()
    b[2, 3] = np.nextafter(b[2, 3], np.inf)
    assert tensor_digest("input.x", b) != d
    assert tensor_digest("aux.s", np.zeros(())) != tensor_digest("aux.s", np.zeros(1))


def test_case_digest_excludes_provenance_and_key_order() -> None:
    m = make_manifest()
    digests = {"input.x": "a" * 64, "output.out": "b" * 64}
    d = case_digest(m, digests)
    shuffled = dict(reversed(list(m.items())))
    shuffled["provenance"] = {"numpy": "9.9", "platform": "other"}
    shuffled["digest"] = "0" * 64
    assert case_digest(shuffled, dict(reversed(list(digests.items())))) == d
    assert case_digest(make_manifest(seed=8), digests) != d
    assert case_digest(m, {**digests, "output.out": "c" * 64}) != d


# ---------------------------------------------------------------------------
# writing and reading back


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_round_trip_both_formats(tmp_path: Path, dtype: str) -> None:
    tensors = make_tensors(dtype)
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest(dtype))
    assert case == tmp_path / "cgnl" / "case-a"
    assert sorted(p.name for p in case.iterdir()) == [
        "manifest.json",
        "tensors.npz",
        "tensors.safetensors",
    ]
    third_party = {
        "safetensors": safetensors_numpy.load_file(case / "tensors.safetensors"),
        "npz": dict(np.load(case / "tensors.npz", allow_pickle=False)),
    }
    for source in ("safetensors", "npz", "auto"):
        got = read_case(case, source=source)
        assert set(got.tensors) == set(tensors)
        for key, a in tensors.items():
            b = got.tensors[key]
            assert b.dtype == a.dtype and b.shape == a.shape, key
            assert np.array_equal(b, a), key
            assert b.flags.c_contiguous and b.flags.writeable
    for loaded in third_party.values():
        assert set(loaded) == set(tensors)
        for key, a in tensors.items():
            assert loaded[key].shape == a.shape and np.array_equal(loaded[key], a), key
    assert verify_case(case).ok


def test_writer_is_immune_to_the_safetensors_strided_bug(tmp_path: Path) -> None:
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    case = write_case(
        tmp_path,
        "cgnl",
        "case-a",
        {**make_tensors(), "param.fc.weight": a[:, :3].T},
        make_manifest(),
    )
    assert np.array_equal(read_case(case).tensors["param.fc.weight"], a[:, :3].T)
    direct = safetensors_numpy.load(safetensors_numpy.save({"w": a}))["w"]
    if np.array_equal(direct, a):
        pytest.skip("this safetensors version round-trips Fortran arrays itself")


def test_manifest_contents(tmp_path: Path) -> None:
    tensors = make_tensors("float32")
    case = write_case(
        tmp_path,
        "cgnl",
        "case-a",
        tensors,
        make_manifest("float32"),
        accumulation={"output.out": 400, "grad.input.x": 30},
        tolerances={"grad.input.x": (1e-3, 2e-6), "aux.scale": (0.0, 1e-7)},
    )
    m = json.loads((case / "manifest.json").read_text())
    assert m["schema"] == SCHEMA and m["block"] == "cgnl" and m["case_id"] == "case-a"
    assert m["formats"] == ["safetensors", "npz"]
    assert set(m["provenance"]) >= {"refattn", "numpy", "python", "platform", "backend"}
    assert m["provenance"]["numpy"] == np.__version__
    assert set(m["tensors"]) == set(tensors)
    out = m["tensors"]["output.out"]
    rtol, atol_rel = tolerance_for("float32", 400)
    assert out["role"] == "output" and out["accumulation_length"] == 400
    assert out["rtol"] == rtol
    assert out["atol"] == pytest.approx(
        atol_rel * np.abs(tensors["output.out"]).max(), rel=1e-12
    )
    assert out["shape"] == [2, 3] and out["dtype"] == "float32"
    assert out["sha256"] == tensor_digest("output.out", tensors["output.out"])
    gx = m["tensors"]["grad.input.x"]
    assert (gx["rtol"], gx["atol"], gx["accumulation_length"]) == (1e-3, 2e-6, 30)
    sc = m["tensors"]["aux.scale"]
    assert (sc["rtol"], sc["atol"], sc["accumulation_length"]) == (0.0, 1e-7, None)
    assert m["tensors"]["aux.argmax"]["rtol"] == m["tensors"]["aux.argmax"]["atol"] == 0
    assert m["tensors"]["aux.empty"]["atol"] == 0.0
    assert m["tensors"]["input.x"]["accumulation_length"] == 1
    assert m["digest"] == case_digest(
        m, {k: e["sha256"] for k, e in m["tensors"].items()}
    )
    got = read_case(case)
    assert got.tolerance("grad.input.x") == (1e-3, 2e-6)
    assert set(got.by_role("grad_input")) == {"x"}
    assert set(got.by_role("output_state")) == {"bn.running_mean"}
    with pytest.raises(ValueError, match="role"):
        got.by_role("grad")


def test_writer_accepts_numpy_scalars_in_the_manifest(tmp_path: Path) -> None:
    m = make_manifest(
        seed=np.int64(7), config={"eps": np.float64(1e-5), "k": (np.int32(3), 3)}
    )
    case = write_case(tmp_path, "cgnl", "case-a", make_tensors(), m)
    got = read_case(case).manifest
    assert got["seed"] == 7 and got["config"] == {"eps": 1e-5, "k": [3, 3]}


def test_deterministic_bytes_and_no_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write(tmp_path / "one")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3.0e7)
    monkeypatch.setattr(time, "time_ns", lambda: int((real() + 3.0e7) * 1e9))
    b = write(tmp_path / "two")
    for name in ("manifest.json", "tensors.safetensors", "tensors.npz"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert read_case(a).manifest["digest"] == read_case(b).manifest["digest"]
    assert write(tmp_path / "three", seed=1) != a
    assert (
        read_case(tmp_path / "three" / "cgnl" / "case-a").manifest["digest"]
        != read_case(a).manifest["digest"]
    )


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    case = write(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CaseExistsError) as info:
        write(tmp_path, seed=3)
    assert str(case) in str(info.value) and "--force" in str(info.value)
    assert snapshot(tmp_path) == before
    assert verify_case(case).ok


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "move-aside"])
def test_force_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    case = write(tmp_path)
    old = read_case(case).manifest["digest"]
    assert write(tmp_path, seed=3, force=True) == case
    new = read_case(case)
    assert new.manifest["digest"] != old
    assert np.array_equal(new.tensors["input.x"], make_tensors(seed=3)["input.x"])
    assert sorted(os.listdir(tmp_path / "cgnl")) == ["case-a"]


def test_force_refuses_to_replace_foreign_files(tmp_path: Path) -> None:
    case = write(tmp_path)
    (case / "notes.txt").write_text("mine")
    with pytest.raises(FixtureError, match="notes.txt"):
        write(tmp_path, seed=3, force=True)
    assert (case / "notes.txt").read_text() == "mine"


def test_nothing_else_in_root_is_touched(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("keep")
    (tmp_path / "readme.md").write_text("keep")
    write(tmp_path, case_id="neighbour")
    (tmp_path / "cgnl" / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    write(tmp_path)
    write(tmp_path, seed=2, force=True)
    after = snapshot(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed - {"cgnl"} and all(
        k == "cgnl" or k.startswith(os.path.join("cgnl", "case-a")) for k in changed
    ), changed


def test_temp_dir_removed_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(path: Path, arrays: Any) -> None:
        (path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fmt, "_write_npz", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write(tmp_path)
    assert os.listdir(tmp_path / "cgnl") == []


def test_read_back_check_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fmt._safetensors_bytes

    def corrupting(arrays: Any, meta: Any) -> bytes:
        data = bytearray(real(arrays, meta))
        data[-3] ^= 1
        return bytes(data)

    monkeypatch.setattr(fmt, "_safetensors_bytes", corrupting)
    with pytest.raises(FixtureError, match="read-back") as info:
        write(tmp_path)
    assert_names(info.value, "tensors.safetensors")
    assert os.listdir(tmp_path / "cgnl") == []


def test_concurrent_writers_one_wins(tmp_path: Path) -> None:
    n = 4
    barrier = threading.Barrier(n)
    outcomes: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = write(tmp_path, seed=i)
        except Exception as err:
            outcomes[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if isinstance(o, Path)]
    losers = [o for o in outcomes if not isinstance(o, Path)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, CaseExistsError) for o in losers), outcomes
    assert verify_case(winners[0]).ok
    assert sorted(os.listdir(tmp_path / "cgnl")) == ["case-a"]


def test_concurrent_forced_writers_leave_one_complete_case(tmp_path: Path) -> None:
    write(tmp_path)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            write(tmp_path, seed=10 + i, force=True)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert verify_case(tmp_path / "cgnl" / "case-a").ok
    assert sorted(os.listdir(tmp_path / "cgnl")) == ["case-a"]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"block": "cbam"}, "block"),
        ({"inputs": ["x", "y"]}, "inputs"),
        ({"outputs": ["y"]}, "outputs"),
        ({"dtype": "float16"}, "dtype"),
        ({"mode": "training"}, "mode"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"config": [1, 2]}, "config"),
        ({"config": {"eps": float("nan")}}, "non-finite"),
        ({"config": {"f": object()}}, "object"),
        ({"anchor_names": {"a": 1}}, "anchor_names"),
        ({"provenance": "numpy"}, "provenance"),
    ],
)
def test_writer_rejects_bad_manifests(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    with pytest.raises(FixtureError, match=match):
        write_case(tmp_path, "cgnl", "case-a", make_tensors(), make_manifest(**change))
    assert not (tmp_path / "cgnl" / "case-a").exists()


@pytest.mark.parametrize(
    "field",
    ["preset", "config", "seed", "rng", "redraws", "input_constraints", "anchor_names"],
)
def test_writer_requires_fields(tmp_path: Path, field: str) -> None:
    m = make_manifest()
    del m[field]
    with pytest.raises(FixtureError, match=field):
        write_case(tmp_path, "cgnl", "case-a", make_tensors(), m)


def test_writer_rejects_bad_tensors_and_names(tmp_path: Path) -> None:
    t, m = make_tensors(), make_manifest()
    cases: list[tuple[dict[str, Any], str]] = [
        ({**t, "grad.x": t["input.x"]}, "grad.x"),
        ({**t, "aux.a b": t["input.x"]}, "aux.a b"),
        ({**t, "aux.bad": np.array([1.0, np.nan])}, "aux.bad"),
        ({**t, "aux.c": np.zeros(2, dtype=np.complex128)}, "aux.c"),
        ({**t, "aux.u8": np.zeros(2, dtype=np.uint8)}, "aux.u8"),
        ({**t, "aux.f32": np.zeros(2, dtype=np.float32)}, "aux.f32"),
        ({**t, "cotangent.y": t["output.out"]}, "cotangent"),
        ({}, "tensors"),
    ]
    for tensors, match in cases:
        with pytest.raises(FixtureError, match=match.replace(".", r"\.")):
            write_case(tmp_path, "cgnl", "case-a", tensors, m)
    with pytest.raises(TypeError, match="aux.list"):
        write_case(tmp_path, "cgnl", "case-a", {**t, "aux.list": [1.0]}, m)
    for bad_id in ("../x", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(FixtureError, match="case_id"):
            write_case(tmp_path, "cgnl", bad_id, t, m)
    with pytest.raises(FixtureError, match="tolerances"):
        write_case(tmp_path, "cgnl", "case-a", t, m, tolerances={"aux.none": (0, 0)})
    with pytest.raises(FixtureError, match="tolerances"):
        write_case(
            tmp_path, "cgnl", "case-a", t, m, tolerances={"output.out": (-1e-3, 0.0)}
        )
    with pytest.raises(FixtureError, match="accumulation"):
        write_case(tmp_path, "cgnl", "case-a", t, m, accumulation={"output.out": 0})
    with pytest.raises(FixtureError, match="formats"):
        write_case(tmp_path, "cgnl", "case-a", t, m, formats=("hdf5",))
    assert list(tmp_path.iterdir()) == []


def test_planned_manifest_is_what_write_case_writes(tmp_path: Path) -> None:
    """The plan equals the manifest written for the same arguments, options
    included, and invalid arguments fail the plan as they fail the writer."""
    t, m = make_tensors(), make_manifest()
    opts: dict[str, Any] = {
        "tolerances": {"output.out": (1e-6, 1e-9)},
        "accumulation": {"grad.input.x": 12},
        "formats": ("npz",),
    }
    planned = fmt.planned_manifest("cgnl", "case-a", t, m, **opts)
    written = fmt.load_manifest(write_case(tmp_path, "cgnl", "case-a", t, m, **opts))
    assert planned == written
    assert planned["formats"] == ["npz"]
    assert planned["tensors"]["output.out"]["rtol"] == 1e-6
    assert planned["digest"] != fmt.planned_manifest("cgnl", "case-a", t, m)["digest"]
    for formats in (("hdf5",), ("npz", "hdf5"), ()):
        with pytest.raises(FixtureError, match="formats"):
            fmt.planned_manifest("cgnl", "case-a", t, m, formats=formats)
    for bad_id in ("../x", ""):
        with pytest.raises(FixtureError, match="case_id"):
            fmt.planned_manifest("cgnl", bad_id, t, m)


def test_single_format_cases(tmp_path: Path) -> None:
    case = write(tmp_path, formats=("npz",))
    assert sorted(p.name for p in case.iterdir()) == ["manifest.json", "tensors.npz"]
    assert read_case(case).tensors.keys() == make_tensors().keys()
    with pytest.raises(FixtureError, match="safetensors"):
        read_case(case, source="safetensors")
    with pytest.raises(ValueError, match="source"):
        read_case(case, source="hdf5")
    shutil.copy(write(tmp_path / "b") / "tensors.safetensors", case)
    result = verify_case(case)
    assert not result.ok and "not listed" in result.problems[0]


# ---------------------------------------------------------------------------
# a broken case is refused, by file and tensor name


@pytest.mark.parametrize("name", ["tensors.safetensors", "tensors.npz"])
def test_flipped_byte_in_each_tensor_is_named(tmp_path: Path, name: str) -> None:
    tensors = make_tensors()
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest())
    path = case / name
    source = "safetensors" if name.endswith("safetensors") else "npz"
    for key, a in tensors.items():
        if a.size == 0:
            continue
        at = data_offset(path, a) + a.nbytes // 2
        flip_byte(path, at)
        result = verify_case(case)
        assert not result.ok
        assert len(result.problems) == 1, result.problems
        assert_names(result.problems[0], name, key)
        with pytest.raises(FixtureError) as info:
            read_case(case, source=source)
        assert_names(info.value, name, key)
        flip_byte(path, at)
        assert verify_case(case).ok


@pytest.mark.parametrize("name", ["tensors.safetensors", "tensors.npz"])
def test_truncated_files(tmp_path: Path, name: str) -> None:
    case = write(tmp_path)
    path = case / name
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8]) if name.endswith("safetensors") else (40,)
    offsets = sorted(
        {
            0,
            3,
            8,
            8 + n // 2,
            8 + n,
            8 + n + 13,
            len(data) // 2,
            len(data) - 23,
            len(data) - 1,
        }
    )
    source = "safetensors" if name.endswith("safetensors") else "npz"
    for cut in offsets:
        path.write_bytes(data[:cut])
        with pytest.raises(FixtureError) as info:
            read_case(case, source=source)
        assert_names(info.value, name)
        result = verify_case(case)
        assert not result.ok and name in result.problems[0]
    path.write_bytes(data)
    assert verify_case(case).ok


def test_truncation_inside_a_tensor_names_it(tmp_path: Path) -> None:
    tensors = make_tensors()
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest())
    path = case / "tensors.safetensors"
    data = path.read_bytes()
    cut = data_offset(path, tensors["grad.input.x"]) + 5
    last = max(
        tensors, key=lambda k: data_offset(path, tensors[k]) if tensors[k].size else -1
    )
    path.write_bytes(data[:cut])
    with pytest.raises(FixtureError) as info:
        read_case(case)
    assert_names(info.value, "tensors.safetensors", "grad.input.x")
    assert f"'{last}'" in " ".join(info.value.problems)


@pytest.mark.parametrize("name", ["tensors.safetensors", "tensors.npz"])
def test_appended_tail(tmp_path: Path, name: str) -> None:
    case = write(tmp_path)
    with open(case / name, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(FixtureError) as info:
        read_case(case, source="npz" if name.endswith("npz") else "safetensors")
    assert_names(info.value, name)
    assert "appended" in str(info.value)


def test_huge_safetensors_header_claim(tmp_path: Path) -> None:
    case = write(tmp_path)
    path = case / "tensors.safetensors"
    for claim in (2**62, 100_000_001, 99_999_999):
        path.write_bytes(struct.pack("<Q", claim) + b'{"a": 1}')
        with pytest.raises(FixtureError) as info:
            read_case(case)
        assert_names(info.value, "tensors.safetensors")
        assert str(claim) in str(info.value)


def test_malformed_safetensors_headers(tmp_path: Path) -> None:
    case = write(tmp_path)
    path = case / "tensors.safetensors"
    good = path.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])

    def put(h: Any) -> None:
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + good[8 + n :])

    put([1, 2])
    with pytest.raises(FixtureError, match="JSON object"):
        read_case(case)
    bad = dict(header, **{"output.out": dict(header["output.out"], dtype="C64")})
    put(bad)
    with pytest.raises(FixtureError, match="malformed header entry") as info:
        read_case(case)
    assert_names(info.value, "tensors.safetensors", "output.out")
    shifted = dict(
        header,
        **{
            "output.out": dict(
                header["output.out"],
                data_offsets=[o + 8 for o in header["output.out"]["data_offsets"]],
            )
        },
    )
    put(shifted)
    with pytest.raises(FixtureError) as info:
        read_case(case)
    assert_names(info.value, "tensors.safetensors", "output.out")
    meta = dict(
        header,
        __metadata__={
            "refattn-golden": json.dumps(
                {
                    "schema": SCHEMA,
                    "block": "cgnl",
                    "case_id": "other",
                    "digest": "0" * 64,
                }
            )
        },
    )
    put(meta)
    with pytest.raises(FixtureError, match="another case"):
        read_case(case)
    path.write_bytes(good[:8] + b"\xff" + good[9:])
    with pytest.raises(FixtureError, match="JSON"):
        read_case(case)


def test_duplicated_tensor_key_in_safetensors_header(tmp_path: Path) -> None:
    """A header that names a tensor twice is ambiguous (a reader keeping the
    first entry reads other data than one keeping the last) and is refused.
    safetensors' own reader (0.8) accepts it and keeps the last entry."""
    case = write(tmp_path)
    path = case / "tensors.safetensors"
    good = path.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = good[8 : 8 + n].rstrip(b" ")
    decoy = json.dumps(json.loads(header)["input.x"]).encode()
    text = b'{"output.out": ' + decoy + b", " + header[1:]
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + good[8 + n :])
    with pytest.raises(FixtureError, match="duplicate key 'output.out'") as info:
        read_case(case)
    assert_names(info.value, "tensors.safetensors")
    assert not verify_case(case).ok


def test_missing_and_extra_tensors_in_file(tmp_path: Path) -> None:
    tensors = make_tensors()
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest())
    digest = read_case(case).manifest["digest"]
    meta = {
        "refattn-golden": json.dumps(
            {"schema": SCHEMA, "block": "cgnl", "case_id": "case-a", "digest": digest}
        )
    }
    fewer = {
        k: np.asarray(v, order="C") for k, v in tensors.items() if k != "aux.scale"
    }
    (case / "tensors.safetensors").write_bytes(safetensors_numpy.save(fewer, meta))
    with pytest.raises(FixtureError, match="missing from the file") as info:
        read_case(case)
    assert_names(info.value, "tensors.safetensors", "aux.scale")
    more = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    more["aux.extra"] = np.ones(2)
    with open(case / "tensors.npz", "wb") as f:
        np.savez(f, **more)
    with pytest.raises(FixtureError, match="not listed") as info:
        read_case(case, source="npz")
    assert_names(info.value, "tensors.npz", "aux.extra")


MARKER: list[str] = []


def _unpickled(path: str) -> str:
    Path(path).write_text("unpickled!")
    MARKER.append(path)
    return path


class _Trap:
    """Unpickling this object writes a file: proof that pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_unpickled, (self.path,))


def test_npz_with_pickled_object_array_is_refused_unread(tmp_path: Path) -> None:
    tensors = make_tensors()
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest())
    trap = tmp_path / "trap.txt"
    payload = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    obj = np.empty((2, 3), dtype=object)
    obj[...] = _Trap(str(trap))
    payload["output.out"] = obj
    with open(case / "tensors.npz", "wb") as f:
        np.savez(f, allow_pickle=True, **payload)
    with pytest.raises(FixtureError) as info:
        read_case(case, source="npz")
    assert_names(info.value, "tensors.npz", "output.out")
    assert "pickle" in str(info.value)
    assert not trap.exists()
    assert not verify_case(case).ok and not trap.exists()
    np.load(case / "tensors.npz", allow_pickle=True)["output.out"]  # the trap works
    assert trap.exists()


def test_npz_not_a_zip(tmp_path: Path) -> None:
    case = write(tmp_path)
    (case / "tensors.npz").write_bytes(b"garbage" * 10 + b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(FixtureError) as info:
        read_case(case, source="npz")
    assert_names(info.value, "tensors.npz")


def _edit_manifest(case: Path, edit: Any) -> None:
    path = case / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit,match,tensor",
    [
        (lambda m: m.update(schema="refattn-golden/2"), "schema", None),
        (lambda m: m.pop("digest"), "missing field", None),
        (lambda m: m.update(seed="7"), "seed", None),
        (lambda m: m["tensors"].pop("aux.scale"), "not listed", "aux.scale"),
        (
            lambda m: m["tensors"]["output.out"].update(shape=[3, 2]),
            "shape",
            "output.out",
        ),
        (
            lambda m: m["tensors"]["grad.input.x"].update(sha256="0" * 64),
            "sha256",
            "grad.input.x",
        ),
        (lambda m: m["tensors"]["output.out"].update(role="aux"), "role", "output.out"),
        (lambda m: m["tensors"]["output.out"].update(rtol=-1.0), "rtol", "output.out"),
        (lambda m: m["tensors"]["output.out"].pop("atol"), "fields", "output.out"),
        (
            lambda m: m["tensors"].update({"grad.x": m["tensors"]["output.out"]}),
            "grad.x",
            None,
        ),
        (lambda m: m["config"].update(planes=5), "case digest mismatch", None),
    ],
)
def test_bad_manifest_is_named(
    tmp_path: Path, edit: Any, match: str, tensor: str | None
) -> None:
    case = write(tmp_path)
    _edit_manifest(case, edit)
    with pytest.raises(FixtureError, match=match) as info:
        read_case(case)
    assert_names(
        info.value,
        "manifest.json"
        if tensor is None or match in ("role", "rtol", "fields")
        else "tensors.safetensors",
        tensor,
    )
    result = verify_case(case)
    assert not result.ok and any(match in p for p in result.problems)


@pytest.mark.parametrize(
    "text", [b"", b"{not json", b"[]", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe"]
)
def test_unreadable_manifest(tmp_path: Path, text: bytes) -> None:
    case = write(tmp_path)
    (case / "manifest.json").write_bytes(text)
    with pytest.raises(FixtureError) as info:
        read_case(case)
    assert_names(info.value, "manifest.json")
    assert not verify_case(case).ok


def test_missing_files(tmp_path: Path) -> None:
    case = write(tmp_path)
    (case / "tensors.npz").unlink()
    assert read_case(case).tensors  # safetensors is enough to read
    result = verify_case(case)
    assert not result.ok and "tensors.npz: missing" in result.problems[0]
    (case / "manifest.json").unlink()
    with pytest.raises(FixtureError, match="manifest.json: missing"):
        read_case(case)
    with pytest.raises(FixtureError, match="not a directory"):
        read_case(tmp_path / "nope")


# ---------------------------------------------------------------------------
# finding and summarizing


def test_find_cases(tmp_path: Path) -> None:
    b = write(tmp_path / "tree", case_id="b")
    a = write(tmp_path / "tree", case_id="a")
    c = write_case(
        tmp_path / "tree" / "deeper",
        "cbam",
        "c",
        make_tensors(),
        make_manifest(block="cbam", case_id="c"),
    )
    hidden = tmp_path / "tree" / "cgnl" / ".tmp-x-123"
    shutil.copytree(a, hidden)
    assert find_cases(tmp_path / "tree") == [a, b, c]
    assert find_cases(a) == [a]
    assert find_cases(tmp_path / "tree" / "cgnl") == [a, b]
    (tmp_path / "empty").mkdir()
    assert find_cases(tmp_path / "empty") == []
    with pytest.raises(FixtureError, match="no such directory"):
        find_cases(tmp_path / "missing")


def test_summarize_case(tmp_path: Path) -> None:
    tensors = make_tensors("float32")
    case = read_case(
        write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest("float32"))
    )
    rows = summarize_case(case)
    assert [r["role"] for r in rows] == sorted(
        (r["role"] for r in rows), key=fmt.ROLES.index
    )
    by = {r["tensor"]: r for r in rows}
    assert set(by) == set(tensors)
    for key, a in tensors.items():
        r = by[key]
        assert r["shape"] == a.shape and r["dtype"] == a.dtype.name
        if a.size:
            v = [float(x) for x in a.ravel()]
            assert r["min"] == min(v) and r["max"] == max(v)
            assert r["mean_abs"] == pytest.approx(
                math.fsum(abs(x) for x in v) / len(v), rel=1e-12
            )
        else:
            assert r["min"] is r["max"] is r["mean_abs"] is None
        assert (r["rtol"], r["atol"]) == case.tolerance(key)


def test_compressed_npz_members_are_refused(tmp_path: Path) -> None:
    tensors = make_tensors()
    case = write_case(tmp_path, "cgnl", "case-a", tensors, make_manifest())
    with open(case / "tensors.npz", "wb") as f:
        np.savez_compressed(
            f, **{k: np.asarray(v, order="C") for k, v in tensors.items()}
        )
    with pytest.raises(FixtureError, match="compressed") as info:
        read_case(case, source="npz")
    assert_names(info.value, "tensors.npz", next(iter(tensors)))


def test_deeply_nested_manifest(tmp_path: Path) -> None:
    case = write(tmp_path)
    (case / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FixtureError) as info:
        read_case(case)
    assert_names(info.value, "manifest.json")


def test_forced_replacement_never_leaves_the_path_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every rename step of a forced write the case path holds a
    complete case (atomic exchange where the platform has it)."""
    probe_a, probe_b = tmp_path / "pa", tmp_path / "pb"
    probe_a.mkdir()
    probe_b.mkdir()
    (probe_a / "f").write_text("a")
    if not publish._exchange(probe_a, probe_b):
        pytest.skip("no atomic directory exchange on this platform/file system")
    assert (probe_b / "f").read_text() == "a"
    case = write(tmp_path / "root")
    seen: list[bool] = []
    real_rename, real_exchange = os.rename, publish._exchange

    def rename(a: Any, b: Any) -> None:
        real_rename(a, b)
        seen.append((case / "manifest.json").is_file())

    def exchange(a: Path, b: Path) -> bool:
        done = real_exchange(a, b)
        seen.append((case / "manifest.json").is_file())
        return done

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(publish, "_exchange", exchange)
    write(tmp_path / "root", seed=1, force=True)
    assert seen and all(seen), seen
    assert (
        read_case(case).tensors["input.x"][0, 0, 0, 0]
        == (make_tensors(seed=1)["input.x"][0, 0, 0, 0])
    )
