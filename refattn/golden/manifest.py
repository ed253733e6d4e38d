"""The manifest of a ``refattn-golden/1`` case: what every field means and how
it is checked.

Holds the schema constants, tensor keys and roles (``split_key``, ``ROLES``),
canonical JSON and the tensor and case digests (the hashed bytes are the
format's specification: docs/format.md), manifest validation
(``validate_manifest``), strict JSON parsing and ``load_manifest``, and the
checks and assembly of a new case's manifest (names, formats, tensors,
tolerances, checks, provenance, field order) for ``write_case`` and
``planned_manifest``.  Knows nothing of the tensor files (``containers``) or
of publishing a case (``publish``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from refattn.golden.errors import FixtureError, _raise_problems
from refattn.golden.files import (
    TooLarge,
    display_path,
    open_regular,
    read_regular,
    shown,
)
from refattn.golden.tolerance import tolerance_for

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
DTYPES = tuple(_SAFETENSORS_DTYPES)
_FLOATS = ("float32", "float64")

_NAME_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_MAX_KEY_CHARS = 200
_MAX_NDIM = 32
"""More dimensions than any tensor of a block has (NumPy's own limit is 64)."""
_MAX_TENSOR_BYTES = 2**48
"""Larger than any fixture tensor can be (256 TiB); a bound for sizes read."""
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_MAX_MANIFEST_BYTES = 64 * 2**20
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
                if _NAME_RE.match(name) and len(key) <= _MAX_KEY_CHARS:
                    return role, name
                break
    raise FixtureError(
        f"tensor key {shown(key)}: expected <prefix><name> with prefix one of "
        f"{', '.join(p for p, _ in _PREFIXES)} and a name of dotted "
        f"[A-Za-z0-9_] segments (at most {_MAX_KEY_CHARS} characters)"
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


def _ordered_keys(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_ROLE_ORDER[split_key(k)[0]], k))


# ---------------------------------------------------------------------------
# manifest validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_str_list(m: Mapping[str, Any], field: str, where: str) -> list[str]:
    v = m[field]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        return [f"{where}: field '{field}': expected a list of strings, got {shown(v)}"]
    if len(set(v)) != len(v):
        return [f"{where}: field '{field}': duplicate entries in {shown(v)}"]
    return []


def _check_tensor_entry(key: str, e: Any, case_dtype: Any, where: str) -> list[str]:
    at = f"{where}: tensor '{key}'"
    try:
        role, _ = split_key(key)
    except FixtureError as err:
        return [f"{where}: {err}"]
    if not isinstance(e, dict):
        return [f"{at}: expected an object, got {shown(e)}"]
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
                       f"got {shown(e['check'])}")
        if not isinstance(e["check_reason"], str) or not e["check_reason"].strip():
            out.append(f"{at}: check_reason: expected a non-empty string, "
                       f"got {shown(e['check_reason'])}")
    if e["role"] != role:
        out.append(f"{at}: role {shown(e['role'])} does not match the key prefix ({shown(role)})")
    if e["dtype"] not in DTYPES:
        out.append(f"{at}: dtype {shown(e['dtype'])} is not one of {', '.join(DTYPES)}")
    elif e["dtype"] in _FLOATS and e["dtype"] != case_dtype:
        out.append(f"{at}: dtype {e['dtype']} differs from the case dtype {case_dtype}")
    out += _shape_problems(at, e["shape"], e["dtype"])
    if not isinstance(e["sha256"], str) or not _HEX64_RE.match(e["sha256"]):
        out.append(
            f"{at}: sha256: expected 64 lowercase hex digits, got {shown(e['sha256'])}"
        )
    for f in ("rtol", "atol"):
        if not _is_number(e[f]) or e[f] < 0:
            out.append(f"{at}: {f}: expected a finite number >= 0, got {shown(e[f])}")
    k = e["accumulation_length"]
    if k is not None and not (_is_int(k) and k >= 1):
        out.append(
            f"{at}: accumulation_length: expected null or an int >= 1, got {shown(k)}"
        )
    return out


def _shape_problems(at: str, shape: Any, dtype: Any) -> list[str]:
    """A tensor entry's shape: a list of at most ``_MAX_NDIM`` ints >= 0
    whose tensor holds fewer than ``_MAX_TENSOR_BYTES`` bytes (a bound every
    reader can rely on before it allocates anything)."""
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return [f"{at}: shape: expected a list of ints >= 0, got {shown(shape)}"]
    if len(shape) > _MAX_NDIM:
        return [f"{at}: shape: {len(shape)} dimensions, more than the {_MAX_NDIM} "
                "a fixture tensor may have"]
    itemsize = np.dtype(dtype).itemsize if dtype in DTYPES else 8
    if math.prod(shape) * itemsize >= _MAX_TENSOR_BYTES:
        return [f"{at}: shape: {shown(shape)} holds {math.prod(shape)} elements, "
                f"more than any fixture tensor ({_MAX_TENSOR_BYTES} bytes at most)"]
    return []


def _input_shapes_problems(m: Mapping[str, Any], where: str) -> list[str]:
    """The optional ``input_shapes`` field (what a factory is told): an
    object mapping every name of ``inputs`` to the shape of its tensor."""
    if "input_shapes" not in m:
        return []
    given = m["input_shapes"]
    expected = {name: m["tensors"][f"input.{name}"]["shape"] for name in m["inputs"]
                if f"input.{name}" in m["tensors"]}
    exact = isinstance(given, dict) and all(
        isinstance(v, list) and all(_is_int(d) for d in v) for v in given.values())
    if not exact or given != expected:
        return [f"{where}: field 'input_shapes': expected {shown(expected)} (the "
                f"shapes of the input.* tensors), got {shown(given)}"]
    return []


def validate_manifest(
    manifest: Any, where: str, *, need_digest: bool = True
) -> list[str]:
    """Every schema problem of a manifest (empty list: valid)."""
    if not isinstance(manifest, dict):
        return [f"{where}: expected a JSON object, got {type(manifest).__name__}"]
    if manifest.get("schema") != SCHEMA:
        return [f"{where}: schema {shown(manifest.get('schema'))} is not {shown(SCHEMA)}"]
    required = [f for f in _FIELD_ORDER if need_digest or f != "digest"]
    missing = [f for f in required if f not in manifest]
    if missing:
        return [f"{where}: missing field(s): {', '.join(missing)}"]
    m = manifest
    out: list[str] = []

    def bad(field: str, expected: str) -> None:
        out.append(f"{where}: field '{field}': expected {expected}, got {shown(m[field])}")

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
            f"{where}: field 'inputs' {shown(m['inputs'])} does not match the "
            f"input.* tensors {shown(sorted(names['input']))}"
        )
    if not set(m["outputs"]) <= names["output"]:
        out.append(
            f"{where}: field 'outputs' {shown(m['outputs'])} names outputs without "
            f"an output.* tensor (have {shown(sorted(names['output']))})"
        )
    out += _input_shapes_problems(m, where)
    if not names["cotangent"] <= set(m["outputs"]):
        out.append(
            f"{where}: cotangent.* tensors {shown(sorted(names['cotangent']))} "
            f"name outputs not in 'outputs' {shown(m['outputs'])}"
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


# json.loads alone fails test_unreadable_manifest (NaN, duplicate keys)
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
    are checked by ``read_case`` and ``verify_case``.)  Only a regular file
    of at most 64 MiB is read (``files.open_regular``): a FIFO or a link to
    a device is refused without blocking or reading it.

    Raises:
        FixtureError: naming the manifest file and the first problem.
    """
    if not Path(case_dir).is_dir():
        raise FixtureError(f"{display_path(case_dir)}: not a directory (expected a "
                           "fixture case)")
    manifest = manifest_json(case_dir)
    _raise_problems(validate_manifest(manifest, display_path(Path(case_dir) /
                                                             MANIFEST_NAME)))
    return manifest  # type: ignore[no-any-return]


def manifest_open_problem(path: Path, err: Exception) -> str:
    """The problem of a manifest that could not be opened (``open_regular``)."""
    if isinstance(err, FileNotFoundError):
        return f"{display_path(path)}: missing (not a fixture case)"
    if isinstance(err, OSError):
        return f"{display_path(path)}: cannot be read ({err.strerror or err})"
    return str(err)


def parse_manifest(file: IO[bytes], path: Path) -> dict[str, Any]:
    """Read (at most ``_MAX_MANIFEST_BYTES``), parse and validate an opened
    manifest file; ``FixtureError`` naming `path` and the first problem."""
    manifest = _manifest_json(file, path)
    _raise_problems(validate_manifest(manifest, display_path(path)))
    return manifest


def manifest_json(case_dir: str | os.PathLike[str]) -> Any:
    """The parsed JSON of ``<case_dir>/manifest.json``, not validated (a
    regular file of at most 64 MiB, strict JSON); ``FixtureError`` naming
    the file when it cannot be read or parsed."""
    path = Path(case_dir) / MANIFEST_NAME
    try:
        file = open_regular(path)
    except (OSError, ValueError) as err:
        raise FixtureError(manifest_open_problem(path, err)) from None
    with file:
        return _manifest_json(file, path)


def _manifest_json(file: IO[bytes], path: Path) -> Any:
    where = display_path(path)
    try:
        manifest = _parse_json(read_regular(path, limit=_MAX_MANIFEST_BYTES,
                                            file=file))
    except TooLarge:
        raise FixtureError(f"{where}: larger than {_MAX_MANIFEST_BYTES} bytes, "
                           "larger than any manifest") from None
    except OSError as err:
        raise FixtureError(f"{where}: cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FixtureError(f"{where}: not valid JSON ({shown(str(err))})") from None
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
# assembling the manifest of a new case


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


def _plan_case(
    block: Any, case_id: Any, tensors: Any, manifest: Any, formats: Iterable[str],
    tolerances: Any, accumulation: Any, checks: Any,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Check a new case's names, formats and tensors and assemble its manifest:
    (the canonical arrays, the manifest with its digest), as ``write_case``
    writes them."""
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
    return arrays, _assemble_manifest(
        block, case_id, arrays, manifest, fmts, tolerances, accumulation, checks
    )


def _assemble_manifest(
    block: str, case_id: str, arrays: Mapping[str, np.ndarray], manifest: Any,
    formats: list[str], tolerances: Any, accumulation: Any, checks: Any,
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

