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

This module is the public face of the format.  The work is split by concern:
``manifest`` (schema, keys, digests, validation, assembly), ``containers``
(the safetensors and npz files), ``publish`` (atomic publishing) and
``errors``; the names they define that users import are re-exported here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refattn.golden.containers import _load_file, _safetensors_bytes, _write_npz
from refattn.golden.errors import CaseExistsError, FixtureError, _raise_problems
from refattn.golden.files import DirectorySnapshot, display_path, shown
from refattn.golden.manifest import (
    DTYPES,
    FILE_NAMES,
    FORMATS,
    MANIFEST_NAME,
    METADATA_KEY,
    ROLES,
    SCHEMA,
    _manifest_digest_problems,
    _ordered_keys,
    _plan_case,
    _pretty_json,
    canonical_json,
    case_digest,
    load_manifest,
    manifest_open_problem,
    parse_manifest,
    split_key,
    tensor_digest,
    validate_manifest,
)
from refattn.golden.publish import (
    _check_replaceable,
    _fsync_dir,
    _locked,
    _make_temp_dir,
    _own,
    _publish,
    _sweep_stale,
    _write_file,
)
from refattn.golden.tolerance import tolerance_for

__all__ = [
    "DTYPES",
    "FILE_NAMES",
    "FORMATS",
    "MANIFEST_NAME",
    "METADATA_KEY",
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
    "planned_manifest",
    "read_case",
    "split_key",
    "summarize_case",
    "tensor_digest",
    "tolerance_for",
    "validate_manifest",
    "verify_case",
    "write_case",
]

# What write_case takes per tensor key (see its docstring).
Tensors = Mapping[str, np.ndarray]
Tolerances = Mapping[str, tuple[float, float]]  # (rtol, absolute atol)
Accumulation = Mapping[str, int]  # accumulation length, for the tolerance rule
Checks = Mapping[str, tuple[str, str]]  # (kind, reason) of a partial check


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

    The manifest and the tensor file are opened together (one snapshot of
    the case directory, ``files.DirectorySnapshot``), so a case replaced by
    ``write_case(..., force=True)`` while it is read is read whole, the old
    version or the new one, never reported corrupted.

    Args:
        case_dir: the case directory (holding manifest.json).
        source: "safetensors", "npz", or "auto" (the first of the manifest's
            formats, safetensors when listed).

    Raises:
        FixtureError: naming the file and tensor of the first problem (schema,
            fields, missing/extra tensors, shape, dtype, digest, truncation,
            non-finite values, a pickled array, a FIFO or device in place of
            a file).
    """
    path = Path(case_dir)
    if source not in ("auto", *FORMATS):
        raise ValueError(
            f"source: expected 'auto', 'safetensors' or 'npz', got {shown(source)}"
        )
    with _case_snapshot(path) as snap:
        manifest = _snapshot_manifest(snap, path)
        fmt = manifest["formats"][0] if source == "auto" else source
        if fmt not in manifest["formats"]:
            raise FixtureError(
                f"{display_path(path / MANIFEST_NAME)}: format {fmt!r} is not among "
                f"the case's formats {manifest['formats']!r}"
            )
        arrays, problems = _load_file(path / FILE_NAMES[fmt],
                                      snap.files.get(FILE_NAMES[fmt]), manifest, fmt)
    _raise_problems(
        problems + _manifest_digest_problems(manifest, path / MANIFEST_NAME)
    )
    return GoldenCase(path, manifest, {k: arrays[k] for k in manifest["tensors"]})


def _case_snapshot(path: Path) -> DirectorySnapshot:
    """The manifest and both tensor files of a case, opened together."""
    if not path.is_dir():
        raise FixtureError(f"{display_path(path)}: not a directory (expected a "
                           "fixture case)")
    try:
        return DirectorySnapshot(path, (MANIFEST_NAME, *FILE_NAMES.values()))
    except OSError as err:
        raise FixtureError(f"{display_path(path)}: cannot be read "
                           f"({err.strerror or err})") from None


def _snapshot_manifest(snap: DirectorySnapshot, path: Path) -> dict[str, Any]:
    file = snap.files[MANIFEST_NAME]
    if isinstance(file, Exception):
        raise FixtureError(manifest_open_problem(path / MANIFEST_NAME, file))
    return parse_manifest(file, path / MANIFEST_NAME)


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
    per-tensor sha256, extra or missing tensors), read as one snapshot (see
    ``read_case``).  Never raises for a broken case: the problems are
    returned, each naming the file (a file that is a FIFO or a device is a
    problem, and is not read)."""
    path = Path(case_dir)
    try:
        with _case_snapshot(path) as snap:
            manifest = _snapshot_manifest(snap, path)
            problems = _manifest_digest_problems(manifest, path / MANIFEST_NAME)
            for fmt in FORMATS:
                name = FILE_NAMES[fmt]
                if fmt in manifest["formats"]:
                    problems += _load_file(path / name, snap.files.get(name),
                                           manifest, fmt)[1]
                elif not isinstance(snap.files.get(name), FileNotFoundError):
                    problems.append(
                        f"{display_path(path / name)}: present but not listed in the "
                        "manifest's formats (stale file?)"
                    )
    except FixtureError as err:
        return VerifyResult(path, False, tuple(err.problems), None)
    except (OSError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError) as err:  # a reader's gap: still a problem, by case
        return VerifyResult(path, False, (
            f"{display_path(path)}: unreadable ({type(err).__name__}: "
            f"{shown(' '.join(str(err).split()))})",), None)
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
        if MANIFEST_NAME in filenames or MANIFEST_NAME in dirnames:  # the latter: a
            # directory where the manifest belongs, which verify must report
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


# ---------------------------------------------------------------------------
# writing


def planned_manifest(
    block: str, case_id: str, tensors: Tensors, manifest: Mapping[str, Any], *,
    tolerances: Tolerances | None = None, accumulation: Accumulation | None = None,
    checks: Checks | None = None, formats: Iterable[str] = FORMATS,
) -> dict[str, Any]:
    """The manifest ``write_case`` would write for these arguments (its
    ``digest`` included), without writing anything: a caller compares it
    with an existing case's to keep an identical case instead of rewriting
    it.  Raises as ``write_case`` does for invalid arguments."""
    _, planned = _plan_case(block, case_id, tensors, manifest, formats,
                            tolerances, accumulation, checks)
    return planned


def write_case(
    root: str | os.PathLike[str],
    block: str, case_id: str, tensors: Tensors, manifest: Mapping[str, Any], *,
    tolerances: Tolerances | None = None, accumulation: Accumulation | None = None,
    checks: Checks | None = None, formats: Iterable[str] = FORMATS,
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
    arrays, m = _plan_case(block, case_id, tensors, manifest, formats,
                           tolerances, accumulation, checks)
    fmts = m["formats"]
    root = Path(root)
    block_dir = root / block
    final = block_dir / case_id
    if os.path.lexists(final) and not force:
        raise CaseExistsError(
            f"{final}: case exists; pass --force (force=True) to replace it"
        )
    if os.path.lexists(final):
        _check_replaceable(final)  # refused before anything is written
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
