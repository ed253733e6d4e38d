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
from typing import IO, Any

import numpy as np

from refattn.golden.errors import FixtureError
from refattn.golden.files import display_path, shown
from refattn.golden.manifest import (
    _FLOATS,
    _SAFETENSORS_DTYPES,
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


def _safetensors_header_limit(expected: Mapping[str, Any]) -> int:
    """The most header bytes a case's safetensors file can need: its keys,
    dtypes, shapes, offsets and the metadata entry, with room to spare.  A
    longer header is refused before it is read (JSON parsing costs far more
    memory than the bytes themselves)."""
    per_entry = sum(2 * len(k) + 96 + 24 * len(e["shape"]) for k, e in expected.items())
    return 8192 + 2 * per_entry


# own parser: safetensors' fails test_duplicated_tensor_key_in_safetensors_header
def _read_safetensors(
    f: IO[bytes], path: Path, expected: Mapping[str, Any], case: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {}
    where = display_path(path)
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        return arrays, [
            f"{where}: truncated: {size} bytes, fewer than the 8-byte header length"
        ]
    (n,) = struct.unpack("<Q", f.read(8))
    limit = min(_MAX_SAFETENSORS_HEADER, _safetensors_header_limit(expected))
    if n > limit:
        return arrays, [
            f"{where}: header claims {n} bytes, more than the {limit} bytes the "
            "manifest's tensors can need (corrupted file)"
        ]
    if 8 + n > size:
        return arrays, [
            f"{where}: truncated: header claims {n} bytes but only {size - 8} follow"
        ]
    try:
        header = _parse_json(f.read(n))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return arrays, [f"{where}: header is not valid JSON ({shown(str(err))})"]
    if not isinstance(header, dict):
        return arrays, [f"{where}: header is not a JSON object"]
    problems = _safetensors_metadata_problems(
        where, header.pop("__metadata__", None), case
    )
    buffer = size - 8 - n
    regions = []
    for key, info in header.items():
        at = f"{where}: tensor {shown(key)}"
        if key not in expected:
            problems.append(f"{at}: not listed in the manifest")
            continue
        at = f"{where}: tensor '{key}'"  # a manifest key: checked, printable
        entry = _safetensors_entry(info, expected[key])
        if isinstance(entry, str):
            problems.append(f"{at}: {entry}")
            continue
        dtype, shape, begin, end = entry
        regions.append((begin, end, key))
        if end > buffer:
            problems.append(
                f"{at}: truncated: data ends at byte {8 + n + end} "
                f"but the file has {size} bytes"
            )
            continue
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
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
                f"{where}: tensor '{key}': data starts at {begin}, "
                f"expected {offset} (gap or overlap between tensors)"
            )
        offset = max(offset, end)
    if offset < buffer:
        problems.append(
            f"{where}: {buffer - offset} unexpected bytes after the last "
            "tensor (appended data?)"
        )
    return arrays, problems


def _safetensors_entry(info: Any, entry: Mapping[str, Any]
                       ) -> tuple[str, tuple[int, ...], int, int] | str:
    """``(dtype, shape, begin, end)`` of a header entry, checked against the
    manifest's entry before anything is computed from it (a shape of 65
    dimensions or a dimension of 2**63 never reaches NumPy); else the
    problem."""
    try:
        dtype = _FROM_SAFETENSORS[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if not all(_is_int(d) and d >= 0 for d in (*shape, begin, end)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        return f"malformed header entry {shown(info)}"
    if dtype != entry["dtype"] or list(shape) != entry["shape"]:
        return (f"dtype {dtype} shape {shown(list(shape))} in the file, manifest "
                f"says {entry['dtype']} {entry['shape']}")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if end - begin != nbytes:
        return (f"data_offsets [{begin}, {end}) hold {end - begin} bytes, dtype "
                f"{dtype} shape {list(shape)} needs {nbytes}")
    return dtype, shape, begin, end


def _safetensors_metadata_problems(
    where: str, meta: Any, case: Mapping[str, Any]
) -> list[str]:
    if meta is None:
        return []
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return [f"{where}: __metadata__ is not a string-to-string map"]
    if METADATA_KEY not in meta:
        return []
    try:
        info = _parse_json(meta[METADATA_KEY].encode("utf-8"))
    except (ValueError, RecursionError) as err:
        return [f"{where}: __metadata__ {METADATA_KEY!r} is not valid JSON "
                f"({shown(str(err))})"]
    bad = [k for k in case if isinstance(info, dict) and info.get(k) != case[k]]
    if not isinstance(info, dict) or bad:
        return [
            f"{where}: __metadata__ names a different case ({', '.join(bad)} differ"
            " from the manifest): the tensor file belongs to another case"
        ]
    return []


_EOCD = struct.Struct("<4s4H2IH")  # end of central directory, 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_EOCD = struct.Struct("<4sQ2H2I4Q")  # 56 bytes
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # 30 bytes
_EOCD_MAX = (0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
"""What the end record holds in a field whose value only the zip64 record has."""


# kept with any reader: np.load (zipfile) fails test_appended_tail, test_appended_tails
def _npz_end_problems(f: IO[bytes], where: str) -> list[str]:
    """An npz written by np.savez is one zip archive and nothing else: it
    ends with its end-of-central-directory record (no comment), preceded by
    the zip64 records when it has them, preceded by the central directory.
    Anything else (bytes appended, a second archive prepended, zip64
    records pointing elsewhere) is refused before ``zipfile`` reads a byte,
    which also keeps ``zipfile`` from allocating a claimed directory size."""
    size = os.fstat(f.fileno()).st_size
    if size < _EOCD.size:
        return [f"{where}: {size} bytes, too short for a zip archive (truncated)"]
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_here, n_total, size_cd, offset_cd, comment = _EOCD.unpack(
        f.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment:
        return [
            f"{where}: does not end with a zip end-of-central-directory record "
            "(truncated, or data appended)"
        ]
    end_of_cd = size - _EOCD.size
    f.seek(max(end_of_cd - _ZIP64_LOCATOR.size, 0))
    if f.read(4) == b"PK\x06\x07":  # zipfile writes zip64 records past 2 GiB
        zip64 = _zip64_end(f, end_of_cd, where)
        if isinstance(zip64, str):
            return [zip64]
        fields = (disk, cd_disk, n_here, n_total, size_cd, offset_cd)
        if any(v not in (w, m) for v, w, m in zip(fields, zip64, _EOCD_MAX)):
            return [f"{where}: the zip end record and the zip64 end record disagree; "
                    "refusing an ambiguous archive"]
        disk, cd_disk, n_here, n_total, size_cd, offset_cd, end_of_cd = zip64
    elif 0xFFFFFFFF in (size_cd, offset_cd) or 0xFFFF in (n_here, n_total):
        return [f"{where}: the zip end record refers to zip64 end records that are "
                "not there (truncated archive)"]
    if disk or cd_disk or n_here != n_total:
        return [f"{where}: a multi-disk zip archive; refusing it"]
    if offset_cd + size_cd != end_of_cd:
        # zipfile tolerates bytes before the archive (it shifts every offset),
        # so a whole npz appended to another would read as the second one
        return [
            f"{where}: the zip central directory does not end where the end record "
            f"says ({offset_cd} + {size_cd} != {end_of_cd}): data was prepended, "
            "inserted or appended"
        ]
    return []


def _zip64_end(f: IO[bytes], eocd_at: int, where: str
               ) -> tuple[int, int, int, int, int, int, int] | str:
    """The zip64 end record's (disk, cd disk, entries here, entries, cd size,
    cd offset, record offset), found right before the end record as the
    format places it, or the problem."""
    at = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if at < 0:
        return f"{where}: zip64 end records missing (truncated archive)"
    f.seek(at)
    raw = f.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
    record, locator = raw[:_ZIP64_EOCD.size], raw[_ZIP64_EOCD.size:]
    lsig, ldisk, record_at, ndisks = _ZIP64_LOCATOR.unpack(locator)
    sig, rsize, _, _, disk, cd_disk, n_here, n_total, size_cd, offset_cd = (
        _ZIP64_EOCD.unpack(record))
    if (lsig != b"PK\x06\x07" or sig != b"PK\x06\x06" or record_at != at
            or ldisk or ndisks != 1 or rsize != _ZIP64_EOCD.size - 12):
        return (f"{where}: the zip64 end records are not where the end record "
                "needs them (another archive's, or data inserted); refusing an "
                "ambiguous archive")
    return disk, cd_disk, n_here, n_total, size_cd, offset_cd, at


def _zip_layout_problems(f: IO[bytes], zf: zipfile.ZipFile, where: str) -> list[str]:
    """The members lie back to back from byte 0 up to the central directory
    (local header, name, extra field, data; no data descriptors), each
    local header naming its member: no byte of the file belongs to no
    member, so no other zip reader can find other tensors in it, and no
    member claims more bytes than the file holds."""
    offset = 0
    for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
        name = shown(info.filename)
        if info.header_offset != offset:
            return [f"{where}: member {name} starts at byte {info.header_offset}, "
                    f"expected {offset} (bytes outside every member: another archive "
                    "or data hidden in this one); refusing an ambiguous archive"]
        f.seek(offset)
        header = f.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            return [f"{where}: member {name}: local header truncated"]
        sig, _, flags, _, _, _, _, _, _, n_name, n_extra = _LOCAL_HEADER.unpack(header)
        if sig != b"PK\x03\x04" or flags & 0x08:
            return [f"{where}: member {name}: no local header where the directory "
                    "says, or a data descriptor (numpy.savez writes neither)"]
        offset += _LOCAL_HEADER.size + n_name + n_extra + info.compress_size
        if offset > zf.start_dir:
            return [f"{where}: member {name} claims {info.compress_size} bytes, more "
                    "than the archive holds before its directory"]
    if offset != zf.start_dir:
        return [f"{where}: {zf.start_dir - offset} bytes between the last member and "
                "the central directory belong to no member; refusing an ambiguous "
                "archive"]
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
                f"dtype {dtype.name} shape {shown(list(shape))} in the file, "
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
    f: IO[bytes], path: Path, expected: Mapping[str, Any], case: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays: dict[str, np.ndarray] = {}
    where = display_path(path)
    problems = _npz_end_problems(f, where)
    if problems:
        return arrays, problems
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return arrays, [f"{where}: not a valid npz (zip) archive ({shown(str(err))})"]
    with zf:
        problems = _zip_layout_problems(f, zf, where)
        if problems:
            return arrays, problems
        seen: set[str] = set()
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else None
            if key is None or key in seen:
                problems.append(f"{where}: unexpected archive member "
                                f"{shown(info.filename)}")
                continue
            seen.add(key)
            if key not in expected:
                problems.append(f"{where}: tensor {shown(key)}: not listed in the "
                                "manifest")
                continue
            at = f"{where}: tensor '{key}'"
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
                problems.append(f"{at}: corrupted archive member ({shown(str(err))})")
            except ValueError as err:
                problems.append(f"{at}: {shown(' '.join(str(err).split()))}")
    return arrays, problems


def _load_file(
    path: Path, file: IO[bytes] | Exception | None, manifest: Mapping[str, Any],
    fmt: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check one tensor file of a case (opened by the caller, or the
    exception opening it gave) against the manifest.  Every error a hostile
    file can provoke becomes a problem naming the file; none is raised."""
    where = display_path(path)
    if isinstance(file, FileNotFoundError) or file is None:
        return {}, [f"{where}: missing (listed in the manifest's formats)"]
    if isinstance(file, OSError):
        return {}, [f"{where}: cannot be read ({file.strerror or file})"]
    if isinstance(file, Exception):
        return {}, [str(file)]
    case = {k: manifest[k] for k in ("schema", "block", "case_id", "digest")}
    try:
        reader = _read_safetensors if fmt == "safetensors" else _read_npz
        arrays, problems = reader(file, path, manifest["tensors"], case)
    except OSError as err:
        return {}, [f"{where}: cannot be read ({err.strerror or err})"]
    except (ValueError, TypeError, OverflowError, MemoryError, EOFError,
            zipfile.BadZipFile, zlib.error, struct.error) as err:
        return {}, [f"{where}: unreadable ({type(err).__name__}: "
                    f"{shown(' '.join(str(err).split()))})"]
    return arrays, problems + _tensor_problems(where, arrays, problems, manifest)


def _tensor_problems(where: str, arrays: Mapping[str, np.ndarray], problems: list[str],
                     manifest: Mapping[str, Any]) -> list[str]:
    """Each tensor read against its manifest entry: present, dtype, shape,
    sha256, finite."""
    out: list[str] = []
    for key, entry in manifest["tensors"].items():
        at = f"{where}: tensor '{key}'"
        a = arrays.get(key)
        if a is None:
            if not arrays and problems:
                continue  # the file as a whole is unreadable: said once above
            if not any(f"tensor '{key}'" in p for p in problems):
                out.append(f"{at}: listed in the manifest but missing from the file")
            continue
        if a.dtype.name != entry["dtype"] or list(a.shape) != entry["shape"]:
            out.append(
                f"{at}: dtype {a.dtype.name} shape {list(a.shape)} in the "
                f"file, manifest says {entry['dtype']} {entry['shape']}"
            )
        elif tensor_digest(key, a) != entry["sha256"]:
            out.append(
                f"{at}: sha256 mismatch: the stored data differ from the "
                "manifest (corrupted or modified file)"
            )
        elif a.dtype.name in _FLOATS and not np.isfinite(a).all():
            out.append(f"{at}: holds NaN or infinite values")
    return out


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

