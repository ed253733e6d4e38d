"""Corrupted fixtures: nothing broken is ever used.

For every file of a case (manifest.json, tensors.safetensors, tensors.npz):
single-byte flips at many offsets (headers and data, including the lowest
mantissa bit of single elements), truncation at many offsets, appended
tails, two tensors' data exchanged, manifests whose digests, shapes or
dtypes disagree with the data, tensor files of another case, and hostile
safetensors headers.  After each corruption:

* ``verify_case`` reports a problem and ``read_case`` (reading the damaged
  file) raises ``FixtureError``, both naming the file (and, for damaged
  tensor data, the tensor); or
* the change is *neutral*: the case still verifies and every reader returns
  tensors bit-identical to the original and the same manifest content
  (JSON whitespace, zip timestamps, the provenance block, which the case
  digest leaves out by design).  Neutral changes are counted separately.

A sample of the corruptions also goes through ``refattn verify`` (exit 1,
naming the file), ``refattn show`` and ``refattn validate`` (exit 2, one
line naming the file).  Extends tests/golden/test_format.py, which names
the tensor for one flip per tensor and a few truncations.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import struct
import zipfile
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
    tensor_digest,
    verify_case,
)

FILES = ("manifest.json", "tensors.safetensors", "tensors.npz")
SOURCE = {"manifest.json": "auto", "tensors.safetensors": "safetensors",
          "tensors.npz": "npz"}
CLI_EVERY = 29
"""One corruption in this many also goes through the three CLI commands."""


class Lab:
    """A case to damage and restore, with its pristine bytes and contents."""

    def __init__(self, case: Path, results: Path) -> None:
        self.case = case
        self.results = results
        self.pristine = {name: (case / name).read_bytes() for name in FILES}
        golden = read_case(case)
        self.tensors = golden.tensors
        self.manifest = golden.manifest
        self.tried = 0

    def restore(self) -> None:
        for name, data in self.pristine.items():
            (self.case / name).write_bytes(data)

    @functools.cache  # noqa: B019 - one Lab per test
    def regions(self, name: str) -> dict[str, tuple[int, int]]:
        """Byte range of every tensor's data inside a (pristine) tensor file."""
        data = self.pristine[name]
        if name == "tensors.safetensors":
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            header.pop("__metadata__", None)
            return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                    for k, v in header.items()}
        out = {}
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                at = info.header_offset
                fn_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
                start = at + 30 + fn_len + extra_len
                major = data[start + 6]
                if major == 1:
                    (hlen,) = struct.unpack("<H", data[start + 8 : start + 10])
                    begin = start + 10 + hlen
                else:
                    (hlen,) = struct.unpack("<I", data[start + 8 : start + 12])
                    begin = start + 12 + hlen
                key = info.filename[:-4]
                out[key] = (begin, begin + self.tensors[key].nbytes)
        return out

    def tensor_at(self, name: str, offset: int) -> str | None:
        if name == "manifest.json":
            return None
        for key, (b, e) in self.regions(name).items():
            if b <= offset < e:
                return key
        return None

    def check(self, kind: str, name: str, tensor: str | None = None,
              *, cli: bool = False) -> str:
        """After one corruption of file `name`: refused by name, or neutral.
        Returns "caught" or "neutral"; restores the case."""
        self.tried += 1
        try:
            return self._check(kind, name, tensor, cli or self.tried % CLI_EVERY == 0)
        finally:
            self.restore()

    def _check(self, kind: str, name: str, tensor: str | None, cli: bool) -> str:
        result = verify_case(self.case)
        try:
            got = read_case(self.case, source=SOURCE[name])
            err = None
        except FixtureError as e:
            got, err = None, e
        if result.ok:  # neutral, or a miss: every reader must see the pristine case
            assert err is None, f"{kind}: verify passed but read_case refused: {err}"
            assert tensor is None, f"{kind}: damaged data of {tensor} not detected"
            for source in ("safetensors", "npz"):
                case = read_case(self.case, source=source)
                assert case.tensors.keys() == self.tensors.keys(), kind
                for k, a in case.tensors.items():
                    want = self.tensors[k]
                    assert a.dtype == want.dtype and a.shape == want.shape, (kind, k)
                    assert a.tobytes() == want.tobytes(), f"{kind}: {k} changed unseen"
                core = {k: v for k, v in case.manifest.items() if k != "provenance"}
                assert core == {k: v for k, v in self.manifest.items()
                                if k != "provenance"}, kind
            FIGURES[f"corruption {kind} neutral"] += 1
            return "neutral"
        if err is None:
            # read_case checks the manifest and the file it reads; a problem in
            # another file of the case is verify's (and the CLI's) to report
            read = {"safetensors": "tensors.safetensors", "npz": "tensors.npz"}[
                got.manifest["formats"][0] if SOURCE[name] == "auto" else SOURCE[name]]
            assert not any(read in p or "manifest.json" in p
                           for p in result.problems), (kind, result.problems)
            for k, a in got.tensors.items():
                assert a.tobytes() == self.tensors[k].tobytes(), (kind, k)
            self._check_cli(None)
            FIGURES[f"corruption {kind} caught"] += 1
            return "caught"
        text = str(err)
        if name == "manifest.json":  # named where the disagreement shows
            assert any(f in text for f in FILES), text
        else:
            assert name in text, text
            assert any(name in p for p in result.problems), result.problems
        if tensor is not None:
            assert f"'{tensor}'" in text, (kind, tensor, text)
            assert any(f"'{tensor}'" in p for p in result.problems), result.problems
        if cli:
            self._check_cli(name)
        FIGURES[f"corruption {kind} caught"] += 1
        return "caught"

    def _check_cli(self, name: str | None) -> None:
        runner = CliRunner()
        verify = runner.invoke(main, ["verify", str(self.case)])
        assert verify.exit_code == 1 and "FAILED" in verify.stdout, verify.output
        want = name if name != "manifest.json" else None
        if want:
            assert want in verify.stdout, verify.stdout
        for args in (["show", str(self.case)],
                     ["validate", str(self.case), "--results", str(self.results)]):
            res = runner.invoke(main, args)
            assert res.exit_code == 2, (args, res.output)
            line = assert_one_error_line(res.stderr, res.stdout)
            assert (want or "") in line and any(f in line for f in FILES), line
            assert res.stdout == "", res.stdout  # nothing printed from a broken case
        FIGURES["corruption CLI checks (verify, show, validate)"] += 3


@pytest.fixture
def lab(small_case_root: Path, tmp_path: Path) -> Lab:
    root = Path(shutil.copytree(small_case_root, tmp_path / "root"))
    case = next(p.parent for p in root.rglob("manifest.json"))
    return Lab(case, perfect_results(case, tmp_path / "perfect.npz"))


@pytest.fixture
def lab32(tmp_path: Path) -> Lab:
    case = write_small_case(tmp_path / "root32", "conv1x1", shapes={"x": (1, 2, 2, 3)},
                            overrides={"out_channels": 2}, dtype="float32")
    return Lab(case, perfect_results(case, tmp_path / "perfect32.npz"))


def _flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# byte flips


def _flip_offsets(size: int, stride: int) -> list[int]:
    return sorted(set(range(0, size, stride)) | {size - 1})


def _flips(lab: Lab, stride: int, masks: tuple[int, ...]) -> None:
    for name in FILES:
        path = lab.case / name
        for mask in masks:
            for offset in _flip_offsets(len(lab.pristine[name]), stride):
                _flip(path, offset, mask)
                lab.check("flip", name, lab.tensor_at(name, offset))


def test_byte_flips_sampled(lab: Lab) -> None:
    _flips(lab, stride=9, masks=(0x01,))
    _flips(lab, stride=23, masks=(0x80, 0xFF))


@pytest.mark.slow
def test_byte_flips_every_offset(lab: Lab) -> None:
    _flips(lab, stride=1, masks=(0x01,))


@pytest.mark.parametrize("which", ["float64", "float32"])
def test_lowest_mantissa_bit_of_single_elements(which: str, lab: Lab,
                                                lab32: Lab) -> None:
    """The smallest possible change of a value (one ulp of one element, in the
    first, a middle and the last element of every tensor) is caught by the
    digests and named by tensor."""
    lab = lab if which == "float64" else lab32
    for name in FILES[1:]:
        for key, (begin, end) in lab.regions(name).items():
            item = lab.tensors[key].itemsize
            count = (end - begin) // item
            for element in sorted({0, count // 2, count - 1}):
                _flip(lab.case / name, begin + element * item, 0x01)  # LE: low byte
                assert lab.check("low-mantissa flip", name, key) == "caught"
                FIGURES[f"low-mantissa flips ({which})"] += 1


# ---------------------------------------------------------------------------
# truncation and appended tails


def _truncations(lab: Lab, stride: int) -> None:
    for name in FILES:
        data = lab.pristine[name]
        for cut in _flip_offsets(len(data), stride):
            (lab.case / name).write_bytes(data[:cut])
            lab.check("truncation", name)
        FIGURES["truncation points"] += len(_flip_offsets(len(data), stride))


def test_truncation_sampled(lab: Lab) -> None:
    _truncations(lab, stride=17)


@pytest.mark.slow
def test_truncation_every_other_offset(lab: Lab) -> None:
    _truncations(lab, stride=2)


TAILS = [b"\0", b"\n", b" ", b"x", b"\0" * 16, b"PK\x05\x06" + b"\0" * 18, b"{}",
         b"\xff" * 100]


@pytest.mark.parametrize("name", FILES)
def test_appended_tails(lab: Lab, name: str) -> None:
    for tail in [*TAILS, lab.pristine[name]]:
        (lab.case / name).write_bytes(lab.pristine[name] + tail)
        outcome = lab.check("appended tail", name)
        if name != "manifest.json" or tail.strip(b" \n"):
            assert outcome == "caught", (name, tail[:8])


# ---------------------------------------------------------------------------
# tensors exchanged; manifests that disagree with the data


def _same_size_pairs(lab: Lab) -> list[tuple[str, str]]:
    keys = sorted(lab.tensors)
    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]
            if lab.tensors[a].shape == lab.tensors[b].shape
            and not np.array_equal(lab.tensors[a], lab.tensors[b])]


def test_swapped_tensors_are_named(lab: Lab) -> None:
    pairs = _same_size_pairs(lab)
    assert pairs
    for a, b in pairs:
        # safetensors: exchange the two data ranges in place
        data = bytearray(lab.pristine["tensors.safetensors"])
        (ra, rb) = (lab.regions("tensors.safetensors")[k] for k in (a, b))
        data[ra[0] : ra[1]], data[rb[0] : rb[1]] = (
            lab.pristine["tensors.safetensors"][rb[0] : rb[1]],
            lab.pristine["tensors.safetensors"][ra[0] : ra[1]])
        (lab.case / "tensors.safetensors").write_bytes(bytes(data))
        problems = verify_case(lab.case).problems
        assert any(f"'{a}'" in p for p in problems) and any(f"'{b}'" in p for p in
                                                            problems), problems
        assert lab.check("swapped tensors", "tensors.safetensors") == "caught"
        # npz: the same keys with the data exchanged
        swapped = dict(lab.tensors)
        swapped[a], swapped[b] = lab.tensors[b], lab.tensors[a]
        with open(lab.case / "tensors.npz", "wb") as f:
            np.savez(f, **swapped)
        assert lab.check("swapped tensors", "tensors.npz") == "caught"


def _edited_manifest(lab: Lab, edit: Any, *, redigest: bool) -> None:
    m = json.loads(lab.pristine["manifest.json"])
    edit(m)
    if redigest:  # a consistent manifest: only the data can betray it
        m["digest"] = case_digest(m, {k: e["sha256"] for k, e in m["tensors"].items()})
    (lab.case / "manifest.json").write_text(json.dumps(m, indent=2))


def _manifest_edits(lab: Lab) -> list[tuple[str, Any]]:
    keys = sorted(lab.tensors)
    a, b = keys[0], keys[-1]
    shaped = next(k for k in keys if lab.tensors[k].ndim >= 2)
    other = tensor_digest(a, lab.tensors[a] + 1.0)
    return [
        ("sha256 of another tensor",
         lambda m: m["tensors"][a].update(sha256=m["tensors"][b]["sha256"])),
        ("sha256 of other data", lambda m: m["tensors"][a].update(sha256=other)),
        ("shape permuted", lambda m: m["tensors"][shaped].update(
            shape=list(reversed(m["tensors"][shaped]["shape"])))),
        ("shape grown", lambda m: m["tensors"][shaped]["shape"].__setitem__(0, 2)),
        ("dtype float32", lambda m: m["tensors"][a].update(dtype="float32")),
        ("dtype int64", lambda m: m["tensors"][a].update(dtype="int64")),
        ("tensor dropped", lambda m: m["tensors"].pop(b)),
        ("tensor renamed", lambda m: m["tensors"].update(
            {"aux.renamed": m["tensors"].pop(b)})),
        ("formats npz only", lambda m: m.update(formats=["npz"])),
        ("tolerance loosened", lambda m: m["tensors"][b].update(rtol=1.0)),
        ("config edited", lambda m: m["config"].update(out_channels=3)),
    ]


def test_manifests_that_disagree_with_the_data(lab: Lab) -> None:
    for label, edit in _manifest_edits(lab):
        for redigest in (False, True):
            _edited_manifest(lab, edit, redigest=redigest)
            outcome = lab.check(f"manifest edit ({label})", "manifest.json", cli=True)
            assert outcome == "caught", label
            FIGURES["manifest disagreements"] += 1


def test_tensor_files_of_another_case(lab: Lab, tmp_path: Path) -> None:
    other = write_small_case(tmp_path / "other", "conv1x1", seed=5,
                             shapes={"x": (1, 2, 2, 3)}, overrides={"out_channels": 2})
    for name in FILES:
        shutil.copy(other / name, lab.case / name)
        if name == "manifest.json":
            # the case directory now holds the other case's manifest: it must be
            # refused against our tensor files, by file
            assert lab.check("file of another case", name) == "caught"
        else:
            assert lab.check("file of another case", name) == "caught"


# ---------------------------------------------------------------------------
# hostile safetensors headers


def _with_header(lab: Lab, header: Any, *, raw: bytes | None = None,
                 claim: int | None = None) -> None:
    data = lab.pristine["tensors.safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    body = data[8 + n :]
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    size = len(text) if claim is None else claim
    path = lab.case / "tensors.safetensors"
    path.write_bytes(struct.pack("<Q", size) + text + body)


def _header(lab: Lab) -> dict[str, Any]:
    data = lab.pristine["tensors.safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _hostile_headers(lab: Lab) -> list[tuple[str, dict[str, Any]]]:
    h = _header(lab)
    keys = [k for k in h if k != "__metadata__"]
    a, b = keys[0], keys[1]
    out = []

    def variant(label: str, edit: Any, **kw: Any) -> None:
        g = json.loads(json.dumps(h))
        edit(g)
        out.append((label, {"header": g, **kw}))

    def length(entry: dict[str, Any]) -> int:
        return entry["data_offsets"][1] - entry["data_offsets"][0]

    variant("offsets beyond the file", lambda g: g[a].update(
        data_offsets=[2**62, 2**62 + length(g[a])]))
    variant("offsets 2**64", lambda g: g[a].update(data_offsets=[0, 2**64]))
    variant("negative offsets", lambda g: g[a].update(data_offsets=[-8, 0]))
    variant("overlapping ranges", lambda g: g[b].update(data_offsets=[
        g[a]["data_offsets"][0], g[a]["data_offsets"][0] + length(g[b])]))
    variant("huge shape", lambda g: g[a].update(shape=[2**40, 2**40]))
    variant("negative shape", lambda g: g[a].update(shape=[-1, 3]))
    variant("float shape", lambda g: g[a].update(shape=[1.5]))
    variant("unknown dtype", lambda g: g[a].update(dtype="C64"))
    variant("object dtype", lambda g: g[a].update(dtype="OBJECT"))
    variant("dtype F32 for F64 data", lambda g: g[a].update(
        dtype="F32", shape=[2 * int(np.prod(g[a]["shape"]))]))
    variant("entry not an object", lambda g: g.update({a: [1, 2, 3]}))
    variant("odd extra field", lambda g: g[a].update(__class__="os.system",
                                                      pickle="cos\nsystem\n"))
    variant("metadata not strings", lambda g: g.update(__metadata__={"x": 1}))
    variant("metadata of another case", lambda g: g["__metadata__"].update(
        {"refattn-golden": json.dumps({"block": "cbam"})}))
    variant("extra tensor", lambda g: g.update(
        {"aux.extra": {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}}))
    variant("missing tensor", lambda g: g.pop(a))
    out.append(("header claims 10**8 bytes", {"header": h, "claim": 10**8}))
    out.append(("header claims 2**64-1 bytes", {"header": h, "claim": 2**64 - 1}))
    out.append(("header claims 7 bytes", {"header": h, "claim": 7}))
    out.append(("non-UTF-8 header", {"header": None, "raw": b'{"\xff\xfe": 1}'}))
    out.append(("not JSON", {"header": None, "raw": b"\x00" * 64}))
    out.append(("duplicate keys", {"header": None, "raw": (
        b'{"' + a.encode() + b'": 1, "' + a.encode() + b'": 2}')}))
    out.append(("deep nesting", {"header": None, "raw": b"[" * 50000 + b"]" * 50000}))
    out.append(("NaN literal", {"header": None, "raw": b'{"a": NaN}'}))
    out.append(("JSON array", {"header": None, "raw": b"[1, 2, 3]"}))
    return out


def test_hostile_safetensors_headers(lab: Lab) -> None:
    outcomes = {}
    for label, kw in _hostile_headers(lab):
        _with_header(lab, kw.pop("header"), **kw)
        outcomes[label] = lab.check(f"hostile header ({label})", "tensors.safetensors")
        FIGURES["hostile safetensors headers"] += 1
    # an unknown extra field in an entry changes nothing that is read
    assert {k for k, v in outcomes.items() if v == "neutral"} <= {"odd extra field"}


# ---------------------------------------------------------------------------
# the committed set: one flip in every file of every case


GOLDEN = Path(__file__).resolve().parents[2] / "golden"


@pytest.mark.slow
def test_one_flip_in_every_committed_file(tmp_path: Path) -> None:
    if not GOLDEN.is_dir():
        pytest.skip("no committed golden/ set")
    root = Path(shutil.copytree(GOLDEN, tmp_path / "golden"))
    cases = sorted(p.parent for p in root.rglob("manifest.json"))
    rng = np.random.default_rng(7)
    for case in cases:
        lab = Lab(case, perfect_results(case, tmp_path / "r.npz"))
        for name in FILES:
            size = len(lab.pristine[name])
            offset = int(rng.integers(0, size))
            _flip(case / name, offset, 0x01)
            lab.check("flip (committed set)", name, lab.tensor_at(name, offset))
