"""The ``refattn-golden/1`` fixture format: write, read, verify, summarize.

A case is one directory ``<root>/<block>/<case-id>/`` holding

* ``manifest.json``: what the case is (block, config, dtype, seed, ...), every
  tensor's role, shape, dtype, sha256 and tolerance, and the case digest;
* ``tensors.safetensors``: the primary tensor file;
* ``tensors.npz``: a mirror with the same keys (plain ``.npy`` members).

Digests hash canonical content (key, dtype, shape, little-endian C-order
bytes), never container bytes, so both files verify against one manifest.
docs/format.md is the specification; this module implements it.

Safety: reading never unpickles, never trusts a length before checking it
against the file, and never returns data from a case with any problem.
Writing is atomic (a temporary sibling directory renamed into place under an
advisory lock) and never replaces an existing case without ``force``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refattn.golden.tolerance import tolerance_for

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: publish without the lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FILE_NAMES",
    "FORMATS",
    "MANIFEST_NAME",
    "ROLES",
    "SCHEMA",
    "CaseExistsError",
    "FixtureError",
    "GoldenCase",
    "VerifyResult",
    "canonical_json",
    "case_digest",
    "find_cases",
    "load_manifest",
    "read_case",
    "split_key",
    "summarize_case",
    "tensor_digest",
    "tolerance_for",
    "validate_manifest",
    "verify_case",
    "write_case",
]

SCHEMA = "refattn-golden/1"
MANIFEST_NAME = "manifest.json"
FORMATS = ("safetensors", "npz")
FILE_NAMES = {"safetensors": "tensors.safetensors", "npz": "tensors.npz"}
METADATA_KEY = "refattn-golden"
"""The one ``__metadata__`` key of the safetensors file (more keys are not
byte-deterministic in safetensors 0.8)."""

# Longest prefix first: "output.state.x" is an output_state, not an output.
_PREFIXES = (
    ("output.state.", "output_state"),
    ("grad.input.", "grad_input"),
    ("grad.param.", "grad_param"),
    ("input.", "input"),
    ("param.", "param"),
    ("state.", "state"),
    ("cotangent.", "cotangent"),
    ("output.", "output"),
    ("aux.", "aux"),
)
ROLES = (
    "input",
    "param",
    "state",
    "cotangent",
    "output",
    "output_state",
    "grad_input",
    "grad_param",
    "aux",
)
_ROLE_ORDER = {role: i for i, role in enumerate(ROLES)}

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "int64": "I64",
    "int32": "I32",
    "bool": "BOOL",
}
_FROM_SAFETENSORS = {code: name for name, code in _SAFETENSORS_DTYPES.items()}
DTYPES = tuple(_SAFETENSORS_DTYPES)
_FLOATS = ("float32", "float64")

_NAME_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_MAX_SAFETENSORS_HEADER = 100_000_000
_MAX_MANIFEST_BYTES = 64 * 2**20
_MAX_NPY_HEADER = 65536
_TENSOR_FIELDS = (
    "role",
    "dtype",
    "shape",
    "sha256",
    "rtol",
    "atol",
    "accumulation_length",
)
_OPTIONAL_TENSOR_FIELDS = ("check", "check_reason")
"""Present only on a tensor not checked in full (``strength.CHECK_KINDS``):
``check`` is "zero" or "none" and ``check_reason`` says why."""
_PARTIAL_CHECKS = ("zero", "none")
_FIELD_ORDER = (
    "schema",
    "block",
    "preset",
    "case_id",
    "config",
    "dtype",
    "mode",
    "seed",
    "rng",
    "input_constraints",
    "redraws",
    "inputs",
    "outputs",
    "formats",
    "anchor_names",
    "tensors",
    "digest",
    "provenance",
)
_PROVENANCE_FIELDS = ("refattn", "numpy", "python", "platform", "backend")


class FixtureError(ValueError):
    """A fixture case is malformed, corrupted or cannot be written.

    The message names the file and, where one is involved, the tensor;
    ``problems`` lists every problem found (the message shows the first).
    """

    def __init__(self, message: str, problems: Iterable[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


class CaseExistsError(FixtureError):
    """The case directory exists and ``force`` was not given."""


def _raise_problems(problems: list[str]) -> None:
    if problems:
        more = (
            f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        )
        raise FixtureError(problems[0] + more, problems)


# ---------------------------------------------------------------------------
# keys, canonical JSON and digests


def split_key(key: str) -> tuple[str, str]:
    """Split a tensor key into ``(role, name)``: "grad.param.fc.weight" ->
    ("grad_param", "fc.weight").  The longest matching prefix wins.

    Raises:
        FixtureError: the key has no known prefix or its name is not dotted
            ``[A-Za-z0-9_]`` segments.
    """
    if isinstance(key, str):
        for prefix, role in _PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if _NAME_RE.match(name):
                    return role, name
                break
    raise FixtureError(
        f"tensor key {key!r}: expected <prefix><name> with prefix one of "
        f"{', '.join(p for p, _ in _PREFIXES)} and a name of dotted "
        "[A-Za-z0-9_] segments"
    )


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes digests are taken over: sorted keys, separators
    "," and ":", ASCII only (``\\uXXXX`` escapes), no NaN/Infinity, floats in
    Python's shortest round-trip ``repr``."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _canonical_array(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian copy (or the array itself if already so).
    Not ``np.ascontiguousarray``: that turns a 0-d array into shape (1,)."""
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def _dtype_name(array: np.ndarray) -> str:
    name = array.dtype.name
    if name not in _SAFETENSORS_DTYPES or array.dtype.hasobject:
        raise FixtureError(
            f"dtype {array.dtype!s} is not supported; "
            f"expected one of {', '.join(DTYPES)}"
        )
    return name


def tensor_digest(name: str, array: np.ndarray) -> str:
    """sha256 (hex) of a tensor's canonical content.

    Hashed bytes: ``b"refattn-golden/1\\0" + name + b"\\0" + dtype + b"\\0" +
    shape + b"\\0" + payload`` where dtype is the NumPy name ("float64"),
    shape the decimal dimensions joined by "," ("" for 0-d) and payload the
    little-endian C-order element bytes.  Memory layout and byte order of
    ``array`` do not matter.
    """
    array = np.asarray(array)
    dtype = _dtype_name(array)
    h = hashlib.sha256()
    h.update(SCHEMA.encode("ascii") + b"\0")
    h.update(name.encode("utf-8") + b"\0")
    h.update(dtype.encode("ascii") + b"\0")
    h.update(",".join(str(int(d)) for d in array.shape).encode("ascii") + b"\0")
    h.update(_canonical_array(array).reshape(-1).view(np.uint8))
    return h.hexdigest()


def case_digest(manifest: Mapping[str, Any], tensor_digests: Mapping[str, str]) -> str:
    """sha256 (hex) of a case: the manifest without ``digest`` and
    ``provenance`` as canonical JSON, a newline, then one line
    ``"<key> <sha256>\\n"`` per tensor in sorted key order."""
    core = {k: v for k, v in manifest.items() if k not in ("digest", "provenance")}
    h = hashlib.sha256(canonical_json(core) + b"\n")
    for key in sorted(tensor_digests):
        h.update(f"{key} {tensor_digests[key]}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# manifest validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_str_list(m: Mapping[str, Any], field: str, where: str) -> list[str]:
    v = m[field]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        return [f"{where}: field '{field}': expected a list of strings, got {v!r}"]
    if len(set(v)) != len(v):
        return [f"{where}: field '{field}': duplicate entries in {v!r}"]
    return []


def _check_tensor_entry(key: str, e: Any, case_dtype: Any, where: str) -> list[str]:
    at = f"{where}: tensor '{key}'"
    try:
        role, _ = split_key(key)
    except FixtureError as err:
        return [f"{where}: {err}"]
    if not isinstance(e, dict):
        return [f"{at}: expected an object, got {e!r}"]
    if not set(_TENSOR_FIELDS) <= set(e) <= set(_TENSOR_FIELDS + _OPTIONAL_TENSOR_FIELDS):
        return [
            f"{at}: expected the fields {', '.join(_TENSOR_FIELDS)} (and optionally "
            f"{', '.join(_OPTIONAL_TENSOR_FIELDS)}), got {', '.join(sorted(e))}"
        ]
    out = []
    if ("check" in e) != ("check_reason" in e):
        out.append(f"{at}: 'check' and 'check_reason' come together, got only one")
    elif "check" in e:
        if e["check"] not in _PARTIAL_CHECKS:
            out.append(f"{at}: check: expected one of {', '.join(_PARTIAL_CHECKS)}, "
                       f"got {e['check']!r}")
        if not isinstance(e["check_reason"], str) or not e["check_reason"].strip():
            out.append(f"{at}: check_reason: expected a non-empty string, "
                       f"got {e['check_reason']!r}")
    if e["role"] != role:
        out.append(f"{at}: role {e['role']!r} does not match the key prefix ({role!r})")
    if e["dtype"] not in DTYPES:
        out.append(f"{at}: dtype {e['dtype']!r} is not one of {', '.join(DTYPES)}")
    elif e["dtype"] in _FLOATS and e["dtype"] != case_dtype:
        out.append(f"{at}: dtype {e['dtype']} differs from the case dtype {case_dtype}")
    shape = e["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        out.append(f"{at}: shape: expected a list of ints >= 0, got {shape!r}")
    if not isinstance(e["sha256"], str) or not _HEX64_RE.match(e["sha256"]):
        out.append(
            f"{at}: sha256: expected 64 lowercase hex digits, got {e['sha256']!r}"
        )
    for f in ("rtol", "atol"):
        if not _is_number(e[f]) or e[f] < 0:
            out.append(f"{at}: {f}: expected a finite number >= 0, got {e[f]!r}")
    k = e["accumulation_length"]
    if k is not None and not (_is_int(k) and k >= 1):
        out.append(
            f"{at}: accumulation_length: expected null or an int >= 1, got {k!r}"
        )
    return out


def validate_manifest(
    manifest: Any, where: str, *, need_digest: bool = True
) -> list[str]:
    """Every schema problem of a manifest (empty list: valid)."""
    if not isinstance(manifest, dict):
        return [f"{where}: expected a JSON object, got {type(manifest).__name__}"]
    if manifest.get("schema") != SCHEMA:
        return [f"{where}: schema {manifest.get('schema')!r} is not {SCHEMA!r}"]
    required = [f for f in _FIELD_ORDER if need_digest or f != "digest"]
    missing = [f for f in required if f not in manifest]
    if missing:
        return [f"{where}: missing field(s): {', '.join(missing)}"]
    m = manifest
    out: list[str] = []

    def bad(field: str, expected: str) -> None:
        out.append(f"{where}: field '{field}': expected {expected}, got {m[field]!r}")

    for f in ("block", "case_id"):
        if not isinstance(m[f], str) or not _ID_RE.match(m[f]):
            bad(f, "a name of [A-Za-z0-9._-] starting with a letter or digit")
    if m["preset"] is not None and not isinstance(m["preset"], str):
        bad("preset", "a string or null")
    for f in ("config", "input_constraints", "provenance", "anchor_names", "tensors"):
        if not isinstance(m[f], dict):
            bad(f, "an object")
    if m["dtype"] not in _FLOATS:
        bad("dtype", "'float32' or 'float64'")
    if m["mode"] not in ("train", "eval", None):
        bad("mode", "'train', 'eval' or null")
    for f in ("seed", "redraws"):
        if not _is_int(m[f]) or m[f] < 0:
            bad(f, "an int >= 0")
    if not isinstance(m["rng"], str) or not m["rng"]:
        bad("rng", "a non-empty string")
    for f in ("inputs", "outputs", "formats"):
        out += _check_str_list(m, f, where)
    if isinstance(m["formats"], list) and (
        not m["formats"] or not set(m["formats"]) <= set(FORMATS)
    ):
        bad("formats", f"a non-empty list of {', '.join(FORMATS)}")
    if isinstance(m["anchor_names"], dict) and not all(
        isinstance(v, str) for v in m["anchor_names"].values()
    ):
        bad("anchor_names", "an object of strings")
    if isinstance(m["provenance"], dict):
        lacking = [
            f for f in _PROVENANCE_FIELDS if not isinstance(m["provenance"].get(f), str)
        ]
        if lacking:
            bad("provenance", f"string fields {', '.join(_PROVENANCE_FIELDS)}")
    if need_digest and (
        not isinstance(m["digest"], str) or not _HEX64_RE.match(m["digest"])
    ):
        bad("digest", "64 lowercase hex digits")
    if out or not isinstance(m["tensors"], dict):
        return out
    if not m["tensors"]:
        return [f"{where}: field 'tensors': no tensors"]
    for key, entry in m["tensors"].items():
        out += _check_tensor_entry(key, entry, m["dtype"], where)
    if out:
        return out
    names: dict[str, set[str]] = {role: set() for role in ROLES}
    for key in m["tensors"]:
        role, name = split_key(key)
        names[role].add(name)
    if names["input"] != set(m["inputs"]):
        out.append(
            f"{where}: field 'inputs' {m['inputs']!r} does not match the "
            f"input.* tensors {sorted(names['input'])!r}"
        )
    if not set(m["outputs"]) <= names["output"]:
        out.append(
            f"{where}: field 'outputs' {m['outputs']!r} names outputs without "
            f"an output.* tensor (have {sorted(names['output'])!r})"
        )
    if not names["cotangent"] <= set(m["outputs"]):
        out.append(
            f"{where}: cotangent.* tensors {sorted(names['cotangent'])!r} "
            f"name outputs not in 'outputs' {m['outputs']!r}"
        )
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text} overflows to infinity")
    return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_json(data: bytes) -> Any:
    return json.loads(
        data.decode("utf-8"),
        object_pairs_hook=_no_duplicates,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
    )


def load_manifest(case_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``<case_dir>/manifest.json``: schema, required fields
    and their types, tensor entries, and the consistency of ``inputs``,
    ``outputs`` and the tensor keys.  (The case digest and the tensor files
    are checked by ``read_case`` and ``verify_case``.)

    Raises:
        FixtureError: naming the manifest file and the first problem.
    """
    path = Path(case_dir) / MANIFEST_NAME
    if not Path(case_dir).is_dir():
        raise FixtureError(f"{case_dir}: not a directory (expected a fixture case)")
    try:
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise FixtureError(f"{path}: {size} bytes, larger than any manifest")
        manifest = _parse_json(path.read_bytes())
    except FileNotFoundError:
        raise FixtureError(f"{path}: missing (not a fixture case)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        if isinstance(err, FixtureError):
            raise
        if isinstance(err, OSError):
            raise FixtureError(f"{path}: cannot be read ({err.strerror})") from None
        raise FixtureError(f"{path}: not valid JSON ({err})") from None
    _raise_problems(validate_manifest(manifest, str(path)))
    return manifest


def _manifest_digest_problems(manifest: Mapping[str, Any], path: Path) -> list[str]:
    digests = {k: e["sha256"] for k, e in manifest["tensors"].items()}
    digest = case_digest(manifest, digests)
    if digest != manifest["digest"]:
        return [
            f"{path}: case digest mismatch: recorded {manifest['digest']}, "
            f"computed {digest} (the manifest was edited after it was written)"
        ]
    return []


# ---------------------------------------------------------------------------
# container readers: (arrays, problems); nothing is trusted before it is checked


def _read_safetensors(
    path: Path, expected: Mapping[str, Any], case: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            return arrays, [
                f"{path}: truncated: {size} bytes, fewer than the 8-byte header length"
            ]
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_SAFETENSORS_HEADER:
            return arrays, [
                f"{path}: header claims {n} bytes, more than the "
                f"{_MAX_SAFETENSORS_HEADER}-byte limit (corrupted file)"
            ]
        if 8 + n > size:
            return arrays, [
                f"{path}: truncated: header claims {n} bytes but only {size - 8} follow"
            ]
        try:
            header = _parse_json(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            return arrays, [f"{path}: header is not valid JSON ({err})"]
        if not isinstance(header, dict):
            return arrays, [f"{path}: header is not a JSON object"]
        problems = _safetensors_metadata_problems(
            path, header.pop("__metadata__", None), case
        )
        buffer = size - 8 - n
        regions = []
        for key, info in header.items():
            at = f"{path}: tensor '{key}'"
            if key not in expected:
                problems.append(f"{at}: not listed in the manifest")
                continue
            try:
                dtype = _FROM_SAFETENSORS[info["dtype"]]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                if not all(_is_int(d) and d >= 0 for d in (*shape, begin, end)):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                problems.append(f"{at}: malformed header entry {info!r}")
                continue
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if end - begin != nbytes:
                problems.append(
                    f"{at}: data_offsets [{begin}, {end}) hold {end - begin}"
                    f" bytes, dtype {dtype} shape {list(shape)} needs {nbytes}"
                )
                continue
            regions.append((begin, end, key))
            if end > buffer:
                problems.append(
                    f"{at}: truncated: data ends at byte {8 + n + end} "
                    f"but the file has {size} bytes"
                )
                continue
            f.seek(8 + n + begin)
            raw = f.read(nbytes)
            arrays[key] = (
                np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
                .reshape(shape)
                .astype(dtype)
            )
        regions.sort()
        offset = 0
        for begin, end, key in regions:
            if begin != offset:
                problems.append(
                    f"{path}: tensor '{key}': data starts at {begin}, "
                    f"expected {offset} (gap or overlap between tensors)"
                )
            offset = max(offset, end)
        if offset < buffer:
            problems.append(
                f"{path}: {buffer - offset} unexpected bytes after the last "
                "tensor (appended data?)"
            )
    return arrays, problems


def _safetensors_metadata_problems(
    path: Path, meta: Any, case: Mapping[str, Any]
) -> list[str]:
    if meta is None:
        return []
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return [f"{path}: __metadata__ is not a string-to-string map"]
    if METADATA_KEY not in meta:
        return []
    try:
        info = _parse_json(meta[METADATA_KEY].encode("utf-8"))
    except (ValueError, RecursionError) as err:
        return [f"{path}: __metadata__ {METADATA_KEY!r} is not valid JSON ({err})"]
    bad = [k for k in case if isinstance(info, dict) and info.get(k) != case[k]]
    if not isinstance(info, dict) or bad:
        return [
            f"{path}: __metadata__ names a different case ({', '.join(bad)} differ"
            " from the manifest): the tensor file belongs to another case"
        ]
    return []


def _npz_end_problems(path: Path) -> list[str]:
    """An npz written by np.savez ends with its end-of-central-directory record
    (no comment); anything after it was appended."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(size - 22, 0))
        tail = f.read(22)
    if len(tail) < 22 or tail[:4] != b"PK\x05\x06" or tail[20:22] != b"\0\0":
        return [
            f"{path}: does not end with a zip end-of-central-directory record "
            "(truncated, or data appended)"
        ]
    size_cd, offset_cd = struct.unpack("<II", tail[12:20])
    zip64 = 0xFFFFFFFF in (size_cd, offset_cd)  # > 4 GiB: the zip64 record has them
    if not zip64 and offset_cd + size_cd != size - 22:
        # zipfile tolerates bytes before the archive (it shifts every offset),
        # so a whole npz appended to another would read as the second one
        return [
            f"{path}: the zip central directory does not end where the end record "
            f"says ({offset_cd} + {size_cd} != {size - 22}): data was prepended, "
            "inserted or appended"
        ]
    return []


def _read_npy_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, entry: Mapping[str, Any]
) -> np.ndarray:
    """Read one ``.npy`` member; raise ``ValueError`` with a reason.  Only
    stored (uncompressed) members are read, so no read can exceed the bytes
    actually in the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"member is compressed (zip method {info.compress_type}); the npz "
            "mirror stores members uncompressed, as numpy.savez writes them"
        )
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            read_header = np.lib.format.read_array_header_1_0
        elif version == (2, 0):
            read_header = np.lib.format.read_array_header_2_0
        else:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read_header(fp, max_header_size=_MAX_NPY_HEADER)
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError(
                f"refused: dtype {dtype} is an object/structured array "
                "(would need pickle)"
            )
        if dtype.name != entry["dtype"] or list(shape) != entry["shape"]:
            raise ValueError(
                f"dtype {dtype.name} shape {list(shape)} in the file, "
                f"manifest says {entry['dtype']} {entry['shape']}"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        header_len = fp.tell()
        if info.file_size != header_len + nbytes:
            raise ValueError(
                f"member holds {info.file_size - header_len} data bytes, "
                f"expected {nbytes}"
            )
        raw = fp.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"truncated: {len(raw)} of {nbytes} data bytes")
        a = np.frombuffer(raw, dtype=dtype).reshape(
            shape, order="F" if fortran else "C"
        )
        return np.asarray(a, dtype=dtype.newbyteorder("="), order="C").copy()


def _read_npz(
    path: Path, expected: Mapping[str, Any], case: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {}
    problems = _npz_end_problems(path)
    if problems:
        return arrays, problems
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return arrays, [f"{path}: not a valid npz (zip) archive ({err})"]
    with zf:
        seen: set[str] = set()
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else None
            if key is None or key in seen:
                problems.append(f"{path}: unexpected archive member {info.filename!r}")
                continue
            seen.add(key)
            at = f"{path}: tensor '{key}'"
            if key not in expected:
                problems.append(f"{at}: not listed in the manifest")
                continue
            try:
                arrays[key] = _read_npy_member(zf, info, expected[key])
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                OSError,
                NotImplementedError,
                RuntimeError,
            ) as err:
                problems.append(f"{at}: corrupted archive member ({err})")
            except ValueError as err:
                problems.append(f"{at}: {' '.join(str(err).split())}")
    return arrays, problems


def _load_file(
    case_dir: Path, manifest: Mapping[str, Any], fmt: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Load one tensor file of a case and check it against the manifest."""
    path = case_dir / FILE_NAMES[fmt]
    case = {k: manifest[k] for k in ("schema", "block", "case_id", "digest")}
    if not path.is_file():
        return {}, [f"{path}: missing (listed in the manifest's formats)"]
    try:
        reader = _read_safetensors if fmt == "safetensors" else _read_npz
        arrays, problems = reader(path, manifest["tensors"], case)
    except OSError as err:
        return {}, [f"{path}: cannot be read ({err.strerror or err})"]
    for key, entry in manifest["tensors"].items():
        at = f"{path}: tensor '{key}'"
        a = arrays.get(key)
        if a is None:
            if not arrays and problems:
                continue  # the file as a whole is unreadable: said once above
            if not any(f"tensor '{key}'" in p for p in problems):
                problems.append(
                    f"{at}: listed in the manifest but missing from the file"
                )
            continue
        if a.dtype.name != entry["dtype"] or list(a.shape) != entry["shape"]:
            problems.append(
                f"{at}: dtype {a.dtype.name} shape {list(a.shape)} in the "
                f"file, manifest says {entry['dtype']} {entry['shape']}"
            )
        elif tensor_digest(key, a) != entry["sha256"]:
            problems.append(
                f"{at}: sha256 mismatch: the stored data differ from the "
                "manifest (corrupted or modified file)"
            )
        elif a.dtype.name in _FLOATS and not np.isfinite(a).all():
            problems.append(f"{at}: holds NaN or infinite values")
    return arrays, problems


# ---------------------------------------------------------------------------
# reading and verifying


@dataclass(frozen=True)
class GoldenCase:
    """A verified case: its directory, manifest and tensors (keyed as stored)."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def block(self) -> str:
        return str(self.manifest["block"])

    @property
    def case_id(self) -> str:
        return str(self.manifest["case_id"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def by_role(self, role: str) -> dict[str, np.ndarray]:
        """The tensors of one role keyed by name without the prefix:
        ``case.by_role("grad_param")`` -> ``{"fc.weight": ..., ...}``."""
        if role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
        out = {}
        for key, a in self.tensors.items():
            r, name = split_key(key)
            if r == role:
                out[name] = a
        return out

    def tolerance(self, key: str) -> tuple[float, float]:
        """``(rtol, atol)`` of a tensor: |a - e| <= atol + rtol * |e|."""
        e = self.manifest["tensors"][key]
        return float(e["rtol"]), float(e["atol"])


def read_case(case_dir: str | os.PathLike[str], *, source: str = "auto") -> GoldenCase:
    """Read a case, checking everything before returning any data.

    Args:
        case_dir: the case directory (holding manifest.json).
        source: "safetensors", "npz", or "auto" (the first of the manifest's
            formats, safetensors when listed).

    Raises:
        FixtureError: naming the file and tensor of the first problem (schema,
            fields, missing/extra tensors, shape, dtype, digest, truncation,
            non-finite values, a pickled array).
    """
    path = Path(case_dir)
    if source not in ("auto", *FORMATS):
        raise ValueError(
            f"source: expected 'auto', 'safetensors' or 'npz', got {source!r}"
        )
    manifest = load_manifest(path)
    fmt = manifest["formats"][0] if source == "auto" else source
    if fmt not in manifest["formats"]:
        raise FixtureError(
            f"{path / MANIFEST_NAME}: format {fmt!r} is not among the "
            f"case's formats {manifest['formats']!r}"
        )
    arrays, problems = _load_file(path, manifest, fmt)
    _raise_problems(
        problems + _manifest_digest_problems(manifest, path / MANIFEST_NAME)
    )
    return GoldenCase(path, manifest, {k: arrays[k] for k in manifest["tensors"]})


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify_case``: ``ok`` is True when ``problems`` is empty."""

    path: Path
    ok: bool
    problems: tuple[str, ...]
    digest: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "problems": list(self.problems),
            "digest": self.digest,
        }


def verify_case(case_dir: str | os.PathLike[str]) -> VerifyResult:
    """Check a case completely: the manifest (schema, fields, case digest) and
    every tensor file listed in its formats (presence, header, shapes, dtypes,
    per-tensor sha256, extra or missing tensors).  Never raises for a broken
    case: the problems are returned."""
    path = Path(case_dir)
    try:
        manifest = load_manifest(path)
    except FixtureError as err:
        return VerifyResult(path, False, tuple(err.problems), None)
    problems = _manifest_digest_problems(manifest, path / MANIFEST_NAME)
    for fmt in FORMATS:
        if fmt in manifest["formats"]:
            problems += _load_file(path, manifest, fmt)[1]
        elif (path / FILE_NAMES[fmt]).exists():
            problems.append(
                f"{path / FILE_NAMES[fmt]}: present but not listed in the "
                "manifest's formats (stale file?)"
            )
    return VerifyResult(path, not problems, tuple(problems), manifest["digest"])


def find_cases(root: str | os.PathLike[str], *,
               problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Every directory under ``root`` (``root`` included) holding a
    manifest.json, sorted; hidden directories (``.tmp-*`` of an interrupted
    write, ``.git``) are skipped.  A case directory is not searched further.

    Symbolic links to directories are followed, so a case or block directory
    may be a link; a case reached through two names is listed under both.
    Nothing else is passed over in silence: a link that leads back to a
    directory on its own path (a loop: not followed), a dangling link, a
    link to something other than a directory (where a case directory could
    be) and a directory that cannot be listed are each a problem
    ``(path, reason)``.  With ``problems`` given they are appended to it,
    sorted, and the cases found are returned; without it they raise.

    Raises:
        FixtureError: ``root`` does not exist or is not a directory; or,
            when ``problems`` is None, the problems above (all listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise FixtureError(f"{root}: no such directory")
    found = []
    bad: list[tuple[Path, str]] = []

    def unlistable(err: OSError) -> None:
        bad.append((Path(err.filename), f"cannot list the directory: {err.strerror}"))

    # walked path -> the real paths of it and of every directory above it on
    # the walk: a link whose target is among them would be searched forever
    on_path = {os.fspath(root): (os.path.realpath(root),)}
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable,
                                                followlinks=True):
        above = on_path.pop(dirpath)
        if MANIFEST_NAME in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        searched = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                continue
            real = os.path.realpath(path)
            if real in above:
                bad.append((Path(path), f"symbolic link to {real}, a directory on "
                                        "its own path (a loop): not followed"))
                continue
            on_path[path] = (*above, real)
            searched.append(name)
        dirnames[:] = searched
        for name in filenames:  # os.walk lists dangling links among the files
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not os.path.islink(path):
                continue
            if os.path.exists(path):
                bad.append((Path(path), f"symbolic link to {os.path.realpath(path)}, "
                                        "which is not a directory (expected a case or "
                                        "block directory)"))
            else:
                bad.append((Path(path), f"dangling symbolic link (to "
                                        f"{os.readlink(path)}, which does not exist)"))
    bad.sort()
    if problems is not None:
        problems.extend(bad)
    else:
        _raise_problems([f"{path}: {reason}" for path, reason in bad])
    return sorted(found)


def summarize_case(case: GoldenCase) -> list[dict[str, Any]]:
    """One row per tensor (role order, then key): tensor, role, shape, dtype,
    min, max, mean_abs (None for empty tensors), rtol, atol, and check: "-"
    for data (inputs, parameters, cotangents), else "full", "zero", "none"
    (the manifest's check kind) or "WEAK" (a full check whose tolerance
    cannot reject a wrong result, ``strength.tolerance_weaknesses``) -- with
    the reason in ``check_reason``."""
    from refattn.golden.strength import CHECKED_PREFIXES, tolerance_weaknesses

    rows = []
    for key in _ordered_keys(case.manifest["tensors"]):
        a = case.tensors[key]
        e = case.manifest["tensors"][key]
        v = a.astype(np.float64)
        stats: dict[str, float | None] = {"min": None, "max": None, "mean_abs": None}
        if v.size:
            stats = {
                "min": float(v.min()),
                "max": float(v.max()),
                "mean_abs": float(np.abs(v).mean()),
            }
        rows.append(
            {
                "tensor": key,
                "role": e["role"],
                "shape": tuple(a.shape),
                "dtype": e["dtype"],
                **stats,
                "rtol": e["rtol"],
                "atol": e["atol"],
                "check": "-",
                "check_reason": None,
            }
        )
        if key.startswith(CHECKED_PREFIXES):
            kind = e.get("check", "full")
            weak = tolerance_weaknesses(key, a, e["rtol"], e["atol"],
                                        str(case.manifest["dtype"]), kind)
            rows[-1]["check"] = "WEAK" if weak else kind
            rows[-1]["check_reason"] = ("; ".join(w.detail for w in weak) if weak
                                        else e.get("check_reason"))
    return rows


def _ordered_keys(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_ROLE_ORDER[split_key(k)[0]], k))


# ---------------------------------------------------------------------------
# writing


def _jsonable(obj: Any, where: str) -> Any:
    """A JSON-ready deep copy: NumPy scalars -> Python, tuples -> lists."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise FixtureError(f"manifest: {where}: non-finite number {obj!r}")
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise FixtureError(f"manifest: {where}: key {k!r} is not a string")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise FixtureError(f"manifest: {where}: {type(obj).__name__} is not JSON data")


def _sorted_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted_json(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted_json(v) for v in obj]
    return obj


def _prepare_tensors(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise FixtureError("tensors: expected a non-empty dict of key -> ndarray")
    out = {}
    for key, a in tensors.items():
        split_key(key)
        if not isinstance(a, (np.ndarray, np.generic)):
            raise TypeError(
                f"tensor '{key}': expected a NumPy ndarray, got {type(a).__name__}"
            )
        a = np.asarray(a)
        try:
            dtype = _dtype_name(a)
        except FixtureError as err:
            raise FixtureError(f"tensor '{key}': {err}") from None
        if dtype in _FLOATS and not np.isfinite(a).all():
            raise FixtureError(f"tensor '{key}': holds NaN or infinite values")
        out[key] = _canonical_array(a)
    return out


def _tensor_entries(
    arrays: Mapping[str, np.ndarray],
    tolerances: Mapping[str, tuple[float, float]] | None,
    accumulation: Mapping[str, int] | None,
    checks: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    tolerances = dict(tolerances or {})
    accumulation = dict(accumulation or {})
    checks = dict(checks or {})
    for what, d in (("tolerances", tolerances), ("accumulation", accumulation),
                    ("checks", checks)):
        unknown = sorted(set(d) - set(arrays))
        if unknown:
            raise FixtureError(f"{what}: keys {unknown!r} are not tensors of the case")
    entries = {}
    for key in _ordered_keys(arrays):
        a = arrays[key]
        k = accumulation.get(key)
        if k is not None and (not _is_int(k) or k < 1):
            raise FixtureError(
                f"accumulation: tensor '{key}': expected an int >= 1, got {k!r}"
            )
        if key in tolerances:
            pair = tolerances[key]
            try:
                rtol, atol = (float(t) for t in pair)
            except (TypeError, ValueError):
                raise FixtureError(
                    f"tolerances: tensor '{key}': expected (rtol, atol), got {pair!r}"
                ) from None
            if not all(math.isfinite(t) and t >= 0 for t in (rtol, atol)):
                raise FixtureError(
                    f"tolerances: tensor '{key}': expected finite "
                    f"values >= 0, got {pair!r}"
                )
        else:
            rtol, atol_rel = tolerance_for(a.dtype.name, 1 if k is None else int(k))
            scale = float(np.max(np.abs(a.astype(np.float64)))) if a.size else 0.0
            atol = atol_rel * scale
            k = 1 if k is None else k
        role, _ = split_key(key)
        entries[key] = {
            "role": role,
            "dtype": a.dtype.name,
            "shape": list(a.shape),
            "sha256": tensor_digest(key, a),
            "rtol": rtol,
            "atol": atol,
            "accumulation_length": None if k is None else int(k),
        }
        if key in checks:
            kind, reason = checks[key]
            entries[key] |= {"check": kind, "check_reason": reason}
    return entries


def _assemble_manifest(
    block: str,
    case_id: str,
    arrays: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
    formats: list[str],
    tolerances: Any,
    accumulation: Any,
    checks: Any = None,
) -> dict[str, Any]:
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest: expected a dict, got {type(manifest).__name__}")
    m = _jsonable(manifest, "manifest")
    for field, value in (("block", block), ("case_id", case_id)):
        if m.get(field, value) != value:
            raise FixtureError(
                f"manifest: field '{field}' is {m[field]!r} but the case"
                f" is written as {value!r}"
            )
    from refattn import __version__

    provenance = {
        "refattn": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": "numpy",
    }
    given = m.get("provenance") or {}
    if not isinstance(given, dict):
        raise FixtureError(
            f"manifest: field 'provenance': expected an object, got {given!r}"
        )
    provenance.update(given)
    m.update(
        schema=SCHEMA,
        block=block,
        case_id=case_id,
        formats=formats,
        provenance=provenance,
        tensors=_tensor_entries(arrays, tolerances, accumulation, checks),
    )
    m.pop("digest", None)
    _raise_problems(validate_manifest(m, "manifest", need_digest=False))
    m["digest"] = case_digest(m, {k: e["sha256"] for k, e in m["tensors"].items()})
    ordered = {f: m[f] if f == "tensors" else _sorted_json(m[f]) for f in _FIELD_ORDER}
    for f in sorted(set(m) - set(_FIELD_ORDER)):
        ordered[f] = _sorted_json(m[f])
    return ordered


def _pretty_json(obj: Any, indent: str = "") -> str:
    """Indented JSON with lists of scalars (shapes, names) kept on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [
            f"{inner}{json.dumps(k)}: {_pretty_json(v, inner)}" for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [f"{inner}{_pretty_json(v, inner)}" for v in obj]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(obj, ensure_ascii=True, allow_nan=False)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _safetensors_bytes(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> bytes:
    try:
        from safetensors.numpy import save
    except ImportError:
        raise FixtureError(
            "writing tensors.safetensors needs the safetensors package (pip install "
            "'refattn[golden]'), or write only the npz mirror (formats=('npz',))"
        ) from None
    # contiguous arrays only: safetensors 0.8 silently corrupts strided ones
    data = {k: np.asarray(a, order="C") for k, a in arrays.items()}
    return save(data, metadata={METADATA_KEY: canonical_json(dict(meta)).decode()})


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "xb") as f:
        np.savez(f, allow_pickle=False, **{k: arrays[k] for k in sorted(arrays)})
        f.flush()
        os.fsync(f.fileno())


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE).
    False when the platform or file system cannot do it."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if (
        _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        == 0
    ):
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _check_replaceable(case_dir: Path) -> None:
    """With force, only a directory holding nothing but case files is replaced."""
    if case_dir.is_symlink() or not case_dir.is_dir():
        raise FixtureError(
            f"{case_dir}: exists and is not a case directory; refusing to replace it"
        )
    foreign = sorted(
        p.name
        for p in case_dir.iterdir()
        if p.name not in (MANIFEST_NAME, *FILE_NAMES.values())
    )
    if foreign:
        raise FixtureError(
            f"{case_dir}: holds files that are not part of a case "
            f"({', '.join(foreign)}); refusing to replace it"
        )


_TEMP_RE = re.compile(r"\.(tmp|old)-(.+)-[0-9a-f]{12}\Z")
"""Names of writers' temporaries: ``.tmp-<case-id>-<hex>``, ``.old-<case-id>-<hex>``."""


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory itself (no lock file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _own(directory: Path) -> int:
    """Open `directory` and hold a shared flock on it for as long as the
    descriptor is open: the mark of a live writer (see ``_sweep_stale``)."""
    fd = os.open(directory, os.O_RDONLY)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            raise
    return fd


def _sweep_stale(block_dir: Path) -> None:
    """Remove temporaries whose writer died (SIGKILL, a crash, power loss).

    A live writer holds a flock on its temporary directory from the moment
    it is created (``_own``; created under the block lock, which the caller
    holds, so there is no unowned window), and the kernel drops the flock
    when the writer dies: a temporary that can be locked has no owner.
    ``.old-*`` directories exist only while their writer holds the block
    lock, so under it they are always stale; one whose case directory is
    missing (a forced write without an atomic exchange died between its two
    renames) is the old case itself and is renamed back, not removed.
    Without fcntl nothing is swept (readers skip hidden directories anyway).
    """
    if fcntl is None:
        return
    for entry in os.scandir(block_dir):
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        final = block_dir / match.group(2)
        if match.group(1) == "old" and not os.path.lexists(final):
            os.rename(entry.path, final)  # the old case comes back
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer owns it
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory ``<parent>/<prefix><random hex>``, created with
    mode 0o777 & ~umask (``tempfile.mkdtemp`` would make it 0o700, and the
    published case would then be unreadable to other users)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue


def _publish(tmp: Path, final: Path, force: bool) -> None:
    """Move the complete case ``tmp`` to ``final`` (caller holds the lock)."""
    if not os.path.lexists(final):
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise CaseExistsError(
                    f"{final}: case exists (created concurrently); "
                    "pass --force (force=True) to replace it"
                ) from None
            raise
        return
    if not force:
        raise CaseExistsError(
            f"{final}: case exists; pass --force (force=True) to replace it"
        )
    _check_replaceable(final)
    if _exchange(tmp, final):
        return  # tmp now holds the old case; the caller removes it
    old = final.parent / f".old-{final.name}-{secrets.token_hex(6)}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_case(
    root: str | os.PathLike[str],
    block: str,
    case_id: str,
    tensors: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
    *,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    accumulation: Mapping[str, int] | None = None,
    checks: Mapping[str, tuple[str, str]] | None = None,
    formats: Iterable[str] = FORMATS,
    force: bool = False,
) -> Path:
    """Write one case to ``<root>/<block>/<case_id>/`` atomically.

    The writer fills the manifest's ``schema``, ``block``, ``case_id``,
    ``formats``, ``tensors`` (per tensor: role, dtype, shape, sha256, rtol,
    atol, accumulation_length), ``digest`` and any missing ``provenance``
    field; everything else must come in ``manifest`` (see docs/format.md).

    Tolerances: ``tolerances[key] = (rtol, atol)`` (absolute atol) overrides
    the rule; otherwise ``tolerance_for(dtype, accumulation.get(key, 1))``
    gives ``(rtol, atol_rel)`` and atol = atol_rel * max|tensor|.
    ``checks[key] = (kind, reason)`` marks a tensor that is not checked in
    full: kind "zero" (analytically zero, absolute tolerance only) or "none"
    (not checkable in this dtype); see ``refattn.golden.strength``.

    Steps: validate; write every file into ``<root>/<block>/.tmp-<case_id>-*``
    and fsync it; read it back and check every digest; then, under an
    advisory lock on the ``<root>/<block>`` directory itself, rename it into place (with
    ``force``, atomically exchanged with the old case, which is then
    removed).  The temporary directory is removed on any error, and nothing
    else under ``root`` is touched, except temporaries that a killed writer
    left in ``<root>/<block>``: they are removed first (``_sweep_stale``).

    Returns:
        The case directory.

    Raises:
        CaseExistsError: the case exists and ``force`` is false.
        FixtureError: invalid keys, names, tensors, tolerances or manifest.
        TypeError: a tensor is not a NumPy array.
    """
    for what, value in (("block", block), ("case_id", case_id)):
        if not isinstance(value, str) or not _ID_RE.match(value):
            raise FixtureError(
                f"{what}: expected a name of [A-Za-z0-9._-] starting "
                f"with a letter or digit, got {value!r}"
            )
    formats = tuple(formats)
    fmts = [f for f in FORMATS if f in formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not fmts:
        raise FixtureError(
            f"formats: expected a non-empty subset of {FORMATS}, got {tuple(formats)!r}"
        )
    arrays = _prepare_tensors(tensors)
    m = _assemble_manifest(
        block, case_id, arrays, manifest, fmts, tolerances, accumulation, checks
    )
    root = Path(root)
    block_dir = root / block
    final = block_dir / case_id
    if os.path.lexists(final) and not force:
        raise CaseExistsError(
            f"{final}: case exists; pass --force (force=True) to replace it"
        )
    block_dir.mkdir(parents=True, exist_ok=True)
    with _locked(block_dir):
        _sweep_stale(block_dir)
        tmp = _make_temp_dir(block_dir, f".tmp-{case_id}-")
        try:
            owner = _own(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        if "safetensors" in fmts:
            meta = {k: m[k] for k in ("schema", "block", "case_id", "digest")}
            _write_file(
                tmp / FILE_NAMES["safetensors"], _safetensors_bytes(arrays, meta)
            )
        if "npz" in fmts:
            _write_npz(tmp / FILE_NAMES["npz"], arrays)
        _write_file(tmp / MANIFEST_NAME, (_pretty_json(m) + "\n").encode("ascii"))
        _fsync_dir(tmp)
        result = verify_case(tmp)
        if not result.ok:
            raise FixtureError(
                f"{final}: read-back check of the written files failed: "
                f"{result.problems[0]}",
                result.problems,
            )
        # lock the block directory itself: no lock file is left behind
        with _locked(block_dir):
            _publish(tmp, final, force)
            _fsync_dir(block_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(owner)
    return final
