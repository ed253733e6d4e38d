"""The two tensor files of a case: ``tensors.safetensors`` and its
``tensors.npz`` mirror, read and written.

Readers return ``(arrays, problems)`` and trust nothing before it is checked
against the file: a length, an offset, a shape, a dtype, a zip member.
``_load_file`` reads one file of a case and checks every tensor against the
manifest (presence, dtype, shape, sha256, finiteness).  Writers produce the
bytes the format specifies (docs/format.md); where they land on disk, and
how atomically, is ``publish``'s business.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refattn.golden.errors import FixtureError
from refattn.golden.manifest import (
    _FLOATS,
    _SAFETENSORS_DTYPES,
    FILE_NAMES,
    METADATA_KEY,
    _is_int,
    _parse_json,
    canonical_json,
    tensor_digest,
)

_FROM_SAFETENSORS = {code: name for name, code in _SAFETENSORS_DTYPES.items()}
_MAX_SAFETENSORS_HEADER = 100_000_000
_MAX_NPY_HEADER = 65536


# ---------------------------------------------------------------------------
# readers: (arrays, problems); nothing is trusted before it is checked


# own parser: safetensors' fails test_duplicated_tensor_key_in_safetensors_header
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


# kept with any reader: np.load (zipfile) fails test_appended_tail, test_appended_tails
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


# own member reader: np.load fails test_compressed_npz_members_are_refused
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
# writers


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

