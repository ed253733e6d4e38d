"""Hostile files: refuse early, name the file, never hang, never allocate
what a file merely claims.

Families (each counted in the "reliability figures"):

* special files where a case file, a --names map, a --json report, a
  --plot image or a --results file belongs: a FIFO (no writer: a read
  would block forever), a link to /dev/zero (endless), a directory, a
  socket.  Refused by name before a byte is read, within seconds;
* zip (npz) archives that other zip tools would read differently: a
  member whose directory entry claims 8 TiB, a second archive prepended
  to a zip64 one, a second central directory inserted; and an honest
  zip64 archive, which must still be read;
* safetensors headers that used to escape the reader's error handling (65
  dimensions, a dimension of 2**63) or cost gigabytes of RAM (a long
  header within the old limit): each a problem naming the file, and a
  tree verify still reports its good cases;
* manifests that are truncated or hold wrong-typed fields (``input_shapes``
  a string): ``golden_cases`` and ``verify`` name the file;
* a reader racing a forced rewrite of the same case never reports it
  corrupted (one snapshot per read);
* attacker-controlled text (tensor keys, member names, manifest fields) is
  printed escaped and bounded: no ESC byte reaches the terminal, no line
  longer than a few kilobytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIGURES, assert_one_error_line, perfect_results, write_small_case

from refattn.cli import main
from refattn.golden.format import (
    FixtureError,
    case_digest,
    read_case,
    verify_case,
    write_case,
)
from refattn.testing import golden_cases

FILES = ("manifest.json", "tensors.safetensors", "tensors.npz")
SECONDS = 20
"""A read that takes longer than this is taken to hang."""


@contextmanager
def deadline(seconds: int = SECONDS) -> Iterator[None]:
    """Fail (instead of hanging the run) if the block takes too long: a
    blocked open() or read() is interrupted by SIGALRM."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def case(small_case_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the small conv1x1 case."""
    src = next(small_case_root.rglob("manifest.json")).parent
    return Path(shutil.copytree(src, tmp_path / "tree" / "conv1x1" / src.name))


def _invoke(*args: Any) -> Any:
    with deadline():
        return CliRunner().invoke(main, [str(a) for a in args])


def _exit2(*args: Any) -> str:
    res = _invoke(*args)
    assert res.exit_code == 2, (args, res.output)
    return assert_one_error_line(res.stderr, res.stdout)


# ---------------------------------------------------------------------------
# special files


def _special(kind: str, path: Path) -> None:
    """Put a special file of `kind` at `path` (which must not exist)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero link":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":  # bound by a relative name: AF_UNIX paths are short
        cwd = os.getcwd()
        s = socket.socket(socket.AF_UNIX)
        try:
            os.chdir(path.parent)
            s.bind(path.name)
        finally:
            s.close()
            os.chdir(cwd)


SPECIAL = ("fifo", "dev-zero link", "directory", "socket")
WHAT = {"fifo": "FIFO", "dev-zero link": "character device", "directory": "directory",
        "socket": "socket"}


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("name", FILES)
def test_special_file_in_a_case(case: Path, tmp_path: Path, kind: str,
                                name: str) -> None:
    results = perfect_results(case, tmp_path / "r.npz")
    (case / name).unlink()
    _special(kind, case / name)
    with deadline():
        result = verify_case(case)
        assert not result.ok
        assert any(name in p and WHAT[kind] in p for p in result.problems) or (
            kind == "directory" and any(name in p for p in result.problems)), \
            result.problems
        with pytest.raises(FixtureError, match=name):
            read_case(case, source="npz" if name == "tensors.npz" else "auto")
        if name == "manifest.json":
            with pytest.raises(FixtureError, match="manifest.json"):
                golden_cases(case.parent.parent)
    res = _invoke("verify", case.parent.parent)
    assert res.exit_code == 1 and name in res.stdout, res.output
    for args in (("show", case), ("validate", case, "--results", results)):
        assert name in _exit2(*args)
    FIGURES["special files in a case (verify, read, golden_cases, CLI)"] += 1


@pytest.fixture
def their_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``MODULE:FACTORY`` of a correct torch 1x1 convolution in the current
    directory (a module name of its own per test: imports are cached)."""
    pytest.importorskip("torch")
    name = f"their_conv_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def make(config):\n"
        "    return torch.nn.Conv2d(config['in_channels'], config['out_channels'], 1)\n")
    monkeypatch.chdir(tmp_path)
    return f"{name}:make"


@pytest.mark.parametrize("kind", ("fifo", "dev-zero link", "directory"))
def test_special_file_given_as_an_option(case: Path, tmp_path: Path, kind: str,
                                         their_module: str) -> None:
    def special(name: str) -> Path:
        path = tmp_path / name
        _special(kind, path)
        return path

    lines = [
        _exit2("validate", case, "--results", special("special.npz")),
        _exit2("validate", case, "--torch", their_module, "--names",
               special("special.json")),
        _exit2("gradcheck", "--block", "gap", "--json", special("special-report.json")),
    ]
    if kind != "directory":  # click itself refuses a directory for --plot
        pytest.importorskip("matplotlib")
        lines.append(_exit2("show", case, "--plot", special("special.png")))
    for line in lines:
        assert "special" in line, line
    FIGURES["special files given as --results/--names/--json/--plot"] += len(lines)


def test_results_file_as_fifo_is_named(case: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "r.npz"
    os.mkfifo(fifo)
    line = _exit2("validate", case, "--results", fifo)
    assert "r.npz" in line and "FIFO" in line
    FIGURES["special files given as --results/--names/--json/--plot"] += 1


# ---------------------------------------------------------------------------
# zip (npz) archives that other zip tools would read differently


def _eocd(data: bytes) -> tuple[int, int]:
    """(central directory offset, size) from the end record (no comment)."""
    size_cd, offset_cd = struct.unpack("<II", data[-10:-2])
    return offset_cd, size_cd


def _npz_bytes(arrays: dict[str, np.ndarray], *, zip64_records: bool = False) -> bytes:
    """np.savez of `arrays`; with `zip64_records`, as zipfile writes an archive
    past 2 GiB: zip64 end records and zip64 extra fields in the directory."""
    import io

    buf = io.BytesIO()
    old = zipfile.ZIP64_LIMIT
    if zip64_records:
        zipfile.ZIP64_LIMIT = 16  # every offset and size counts as "large"
    try:
        np.savez(buf, allow_pickle=False, **arrays)
    finally:
        zipfile.ZIP64_LIMIT = old
    return buf.getvalue()


def _with_markers(data: bytes) -> bytes:
    """The end record's counts, size and offset replaced by the zip64 markers
    (0xFFFF, 0xFFFFFFFF), so zip readers take them from the zip64 record."""
    eocd = bytearray(data[-22:])
    eocd[8:12] = b"\xff\xff\xff\xff"
    eocd[12:20] = b"\xff" * 8
    return data[:-22] + bytes(eocd)


def _claim_member_size(data: bytes, member: str, claim: int) -> bytes:
    """Set the sizes a zip64 directory entry gives for `member` to `claim`."""
    out = bytearray(data)
    at = out.index(b"PK\x01\x02")
    while at >= 0:
        n_name, n_extra = struct.unpack("<HH", out[at + 28:at + 32])
        name = out[at + 46:at + 46 + n_name].decode()
        if name == member:
            extra = at + 46 + n_name
            assert struct.unpack("<H", out[extra:extra + 2])[0] == 1  # zip64 field
            out[extra + 4:extra + 20] = struct.pack("<QQ", claim, claim)
            return bytes(out)
        at = out.find(b"PK\x01\x02", at + 46 + n_name + n_extra)
    raise AssertionError(member)


def _npz_case_arrays(case: Path) -> dict[str, np.ndarray]:
    return dict(read_case(case).tensors)


def _check_refused_quickly(case: Path, why: str) -> None:
    """verify and read_case refuse the npz by name, in bounded time and memory."""
    tracemalloc.start()
    try:
        with deadline():
            result = verify_case(case)
            with pytest.raises(FixtureError, match="tensors.npz"):
                read_case(case, source="npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.ok and any("tensors.npz" in p for p in result.problems), why
    assert peak < 64 * 2**20, f"{why}: {peak} bytes allocated"
    FIGURES["hostile npz archives refused"] += 1


def test_member_claiming_8_tib(case: Path) -> None:
    arrays = _npz_case_arrays(case)
    data = _npz_bytes(arrays, zip64_records=True)
    key = sorted(arrays)[0]
    (case / "tensors.npz").write_bytes(_claim_member_size(data, f"{key}.npy", 2**43))
    _check_refused_quickly(case, "directory claims 8 TiB")


def _npz_with_member(arrays: dict[str, np.ndarray], key: str, content: bytes) -> bytes:
    """An npz (zip64 directory entries) whose member for `key` holds `content`."""
    import io

    buf = io.BytesIO()
    old = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 16
    try:
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for k in sorted(arrays):
                with zf.open(f"{k}.npy", "w", force_zip64=True) as w:
                    if k == key:
                        w.write(content)
                    else:
                        np.lib.format.write_array(w, arrays[k], allow_pickle=False)
    finally:
        zipfile.ZIP64_LIMIT = old
    return buf.getvalue()


def test_member_claiming_8_tib_with_a_matching_manifest(case: Path) -> None:
    """The manifest (re-digested), the .npy header and the zip directory all
    claim 2**40 elements: only the bytes actually in the file refute it."""
    import io

    arrays = _npz_case_arrays(case)
    key = "cotangent.out"
    _redigest(case, lambda m: m["tensors"][key].update(shape=[2**40]))
    header = np.lib.format.header_data_from_array_1_0(arrays[key].reshape(-1))
    header["shape"] = (2**40,)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    head_len = member.tell()
    member.write(arrays[key].tobytes())
    data = _npz_with_member(arrays, key, member.getvalue())
    claim = head_len + 8 * 2**40
    (case / "tensors.npz").write_bytes(_claim_member_size(data, f"{key}.npy", claim))
    _check_refused_quickly(case, "directory, header and manifest claim 8 TiB")


def test_honest_zip64_archive_is_read(case: Path) -> None:
    """zipfile writes zip64 end records once an archive passes 2 GiB; such an
    npz is a valid mirror (the read-back check used to refuse it)."""
    arrays = _npz_case_arrays(case)
    (case / "tensors.npz").write_bytes(_npz_bytes(arrays, zip64_records=True))
    assert verify_case(case).ok, verify_case(case).problems
    got = read_case(case, source="npz").tensors
    assert all(got[k].tobytes() == a.tobytes() for k, a in arrays.items())
    (case / "tensors.npz").write_bytes(_with_markers(_npz_bytes(arrays,
                                                                zip64_records=True)))
    assert verify_case(case).ok, verify_case(case).problems
    FIGURES["honest zip64 npz mirrors read"] += 2


def _evil_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: -a for k, a in arrays.items()}


def test_prepended_archive_before_a_zip64_one(case: Path) -> None:
    arrays = _npz_case_arrays(case)
    good = _with_markers(_npz_bytes(arrays, zip64_records=True))
    evil = _npz_bytes(_evil_arrays(arrays))
    (case / "tensors.npz").write_bytes(evil + good)
    with zipfile.ZipFile(case / "tensors.npz") as zf:  # what zipfile alone reads
        assert zf.namelist()
    _check_refused_quickly(case, "prepended archive")


def test_second_central_directory(case: Path) -> None:
    """Another archive (members, directory and end record) inserted between
    the last member and the real directory: the real end record, with its
    offset moved, still describes the real archive, while a reader that
    scans from the front finds the other tensors first."""
    arrays = _npz_case_arrays(case)
    good = _npz_bytes(arrays)
    evil = _npz_bytes(_evil_arrays(arrays))
    offset, _ = _eocd(good)
    eocd = bytearray(good[-22:])
    eocd[16:20] = struct.pack("<I", offset + len(evil))
    data = good[:offset] + evil + good[offset:-22] + bytes(eocd)
    (case / "tensors.npz").write_bytes(data)
    with zipfile.ZipFile(case / "tensors.npz") as zf:
        assert sorted(zf.namelist()) == sorted(f"{k}.npy" for k in arrays)
    _check_refused_quickly(case, "second central directory")


# ---------------------------------------------------------------------------
# safetensors headers that escaped the reader or cost gigabytes


def _st_header(case: Path) -> tuple[dict[str, Any], bytes]:
    data = (case / "tensors.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(case: Path, header: Any, body: bytes, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (case / "tensors.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)


def _dims_65(entry: dict[str, Any]) -> None:
    n = int(np.prod(entry["shape"]))
    entry["shape"] = [1] * 64 + [n]


def _dim_2_63(entry: dict[str, Any]) -> None:
    begin = entry["data_offsets"][0]
    entry.update(shape=[2**63, 0], data_offsets=[begin, begin])


@pytest.mark.parametrize("edit", [_dims_65, _dim_2_63], ids=["65 dims", "dim 2**63"])
def test_header_entries_that_used_to_escape(case: Path, tmp_path: Path,
                                            edit: Callable[[dict[str, Any]], None]
                                            ) -> None:
    header, body = _st_header(case)
    key = sorted(k for k in header if k != "__metadata__")[0]
    edit(header[key])
    _write_st(case, header, body)
    result = verify_case(case)
    assert not result.ok and any("tensors.safetensors" in p for p in result.problems)
    with pytest.raises(FixtureError, match="tensors.safetensors"):
        read_case(case)
    # a tree: the broken case is a failed case, the good one still reported
    write_small_case(tmp_path / "tree", "gap", shapes={"x": (1, 2, 2, 2)})
    res = _invoke("verify", tmp_path / "tree")
    assert res.exit_code == 1, res.output
    assert "OK      " in res.stdout and "FAILED  " in res.stdout, res.stdout
    FIGURES["safetensors header entries that used to escape (65 dims, 2**63)"] += 1


def test_long_header_is_refused_unread(case: Path) -> None:
    """A 28 MB header within the old 100 MB limit: refused from its length
    alone, before one byte of it is parsed."""
    header, body = _st_header(case)
    filler = {f"junk{i}": {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}
              for i in range(400_000)}
    raw = json.dumps({**header, **filler}).encode()
    assert len(raw) > 25 * 2**20
    _write_st(case, None, body, raw=raw)
    del raw, filler
    tracemalloc.start()
    try:
        result = verify_case(case)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert any("header claims" in p for p in result.problems), result.problems
    assert peak < 8 * 2**20, peak
    FIGURES["long safetensors headers refused unread"] += 1


# ---------------------------------------------------------------------------
# manifests: truncated, wrong-typed fields


def test_truncated_manifest_in_golden_cases(case: Path) -> None:
    data = (case / "manifest.json").read_bytes()
    for cut in (1, len(data) // 3, len(data) - 2):
        (case / "manifest.json").write_bytes(data[:cut])
        with pytest.raises(FixtureError, match="manifest.json"):
            golden_cases(case.parent.parent)
        FIGURES["truncated manifests in golden_cases"] += 1


def _redigest(case: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((case / "manifest.json").read_text())
    edit(m)
    m["digest"] = case_digest(m, {k: e["sha256"] for k, e in m["tensors"].items()})
    (case / "manifest.json").write_text(json.dumps(m))


WRONG_FIELDS = {
    "input_shapes a string": lambda m: m.update(input_shapes="x"),
    "input_shapes a list": lambda m: m.update(input_shapes=[[1, 2, 2, 3]]),
    "input_shapes of another shape": lambda m: m.update(input_shapes={"x": [9, 9]}),
    "input_shapes with float dims": lambda m: m.update(
        input_shapes={k: [float(d) for d in v] for k, v in m["input_shapes"].items()}),
    "input_shapes naming another input": lambda m: m.update(
        input_shapes={"y": next(iter(m["input_shapes"].values()))}),
    "shape of 33 dims": lambda m: m["tensors"][sorted(m["tensors"])[0]].update(
        shape=[1] * 33),
    "shape of 2**62 elements": lambda m: m["tensors"][sorted(m["tensors"])[0]].update(
        shape=[2**31, 2**31]),
}


@pytest.mark.parametrize("label", sorted(WRONG_FIELDS))
def test_wrong_typed_manifest_fields(case: Path, label: str) -> None:
    _redigest(case, WRONG_FIELDS[label])
    result = verify_case(case)
    assert not result.ok and all("manifest.json" in p for p in result.problems), label
    field = "input_shapes" if "input_shapes" in label else "shape"
    assert any(field in p for p in result.problems), result.problems
    line = _exit2("show", case)
    assert "manifest.json" in line and "internal error" not in line
    FIGURES["wrong-typed manifest fields"] += 1


def test_wrong_typed_input_shapes_never_reach_the_torch_adapter(
        case: Path, their_module: str) -> None:
    _redigest(case, WRONG_FIELDS["input_shapes a string"])
    assert "input_shapes" in _exit2("validate", case, "--torch", their_module)
    FIGURES["wrong-typed manifest fields"] += 1


# ---------------------------------------------------------------------------
# a reader racing a forced rewrite


def _two_versions(root: Path) -> list[Any]:
    from refattn.golden.generate import expand_requests, generate_case

    out = []
    for seed in (0, 1):
        req, cfg = expand_requests("conv1x1", None, {"out_channels": 3},
                                   shapes={"x": (2, 3, 4, 4)}, seed=seed)[0]
        g = generate_case(req, cfg)
        g.manifest["case_id"] = "race"
        out.append(g)
    return out


def test_reader_racing_forced_rewrites_never_sees_corruption(tmp_path: Path) -> None:
    versions = _two_versions(tmp_path)
    root = tmp_path / "tree"

    def write(g: Any) -> Path:
        return write_case(root, g.block, "race", g.tensors, g.manifest,
                          tolerances=g.tolerances, accumulation=g.accumulation,
                          checks=g.checks, force=True)

    case = write(versions[0])
    digests = {g.manifest["seed"]: None for g in versions}
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        while not stop.is_set():
            write(versions[writes[0] % 2])
            writes[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    reads, bad = 0, []
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end or writes[0] < 20:
            result = verify_case(case)
            if not result.ok:
                bad.append(result.problems)
            try:
                got = read_case(case)
                digests[got.manifest["seed"]] = got.manifest["digest"]
            except FixtureError as err:
                bad.append(err.problems)
            reads += 2
    finally:
        stop.set()
        thread.join()
    FIGURES["snapshot reads racing forced rewrites"] += reads
    FIGURES["snapshot rewrites raced"] += writes[0]
    assert not bad, f"{len(bad)} of {reads} reads saw a complete case as broken: {bad[0]}"
    assert writes[0] >= 20


# ---------------------------------------------------------------------------
# attacker-controlled text: escaped and bounded


ESC = "\x1b]0;owned\x07\x1b[2J"


def _assert_clean(text: str, *, longest: int = 6000) -> None:
    assert "\x1b" not in text and "\x07" not in text, repr(text[:200])
    assert max((len(ln) for ln in text.splitlines()), default=0) <= longest


def test_escapes_in_safetensors_keys_and_npz_members(case: Path) -> None:
    arrays = _npz_case_arrays(case)
    header, body = _st_header(case)
    header[f"output.{ESC}"] = {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}
    _write_st(case, header, body)
    arrays[f"aux.{ESC}" + "x" * 20000] = np.zeros(1)
    (case / "tensors.npz").write_bytes(_npz_bytes(arrays))
    result = verify_case(case)
    assert len(result.problems) >= 2
    for p in result.problems:
        _assert_clean(p, longest=1000)
    res = _invoke("verify", case)
    _assert_clean(res.stdout)
    line = _exit2("show", case)
    _assert_clean(line)
    FIGURES["attacker text escaped and bounded"] += 3


def test_huge_hostile_manifest_field(case: Path) -> None:
    """A 20 MB string of escape sequences in a manifest field (within the 64
    MiB manifest limit): every message quoting it stays one short line."""
    _redigest(case, lambda m: m.update(mode=ESC * 1_500_000))
    assert (case / "manifest.json").stat().st_size > 20 * 2**20
    result = verify_case(case)
    assert not result.ok
    for p in result.problems:
        _assert_clean(p, longest=1000)
    for res in (_invoke("verify", case), _invoke("verify", case, "--json")):
        _assert_clean(res.stdout)
    _assert_clean(_exit2("show", case))
    FIGURES["attacker text escaped and bounded"] += 4


def test_results_keys_with_escapes_give_one_bounded_line(case: Path,
                                                         tmp_path: Path) -> None:
    arrays = {f"output.{ESC}{i}" + "y" * 60000: np.zeros(1) for i in range(300)}
    np.savez(tmp_path / "r.npz", **arrays)
    line = _exit2("validate", case, "--results", tmp_path / "r.npz")
    _assert_clean(line, longest=2200)
    assert "more characters" in line
    FIGURES["attacker text escaped and bounded"] += 1
