"""Publishing a case atomically: nothing half-written is ever visible, and
nothing a user already has is lost.

A writer fills a temporary sibling directory ``.tmp-<case-id>-<hex>``
(``_make_temp_dir``, owned by a shared flock: ``_own``), fsyncs every file
(``_write_file``, ``_fsync_dir``) and then, under an advisory lock on the
block directory itself (``_locked``), renames it into place (``_publish``;
with ``force`` exchanged atomically with the old case where Linux
``renameat2`` can, ``_exchange``).  Temporaries a killed writer left behind
are removed by the next writer (``_sweep_stale``).  What goes into the
directory is ``manifest`` and ``containers`` business.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from refattn.golden.errors import CaseExistsError, FixtureError
from refattn.golden.files import display_path, read_regular, shown
from refattn.golden.manifest import FILE_NAMES, MANIFEST_NAME, SCHEMA

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: publish without the lock
    fcntl = None  # type: ignore[assignment]


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
    """With force, only a refattn case is replaced: a real directory (not a
    link) holding nothing but regular files named like a case's, whose
    manifest.json is a refattn manifest of this very case (schema, block and
    case id; its tensors may be damaged: replacing them is what force is
    for).  Anything else may be the user's own files and is refused."""
    refuse = f"{display_path(case_dir)}: exists and is not a refattn case"
    if case_dir.is_symlink() or not case_dir.is_dir():
        raise FixtureError(f"{refuse} directory; refusing to replace it")
    names = (MANIFEST_NAME, *FILE_NAMES.values())
    entries = list(os.scandir(case_dir))
    foreign = sorted(shown(e.name) for e in entries
                     if e.name not in names or not e.is_file(follow_symlinks=False))
    if foreign:
        raise FixtureError(
            f"{refuse}: it holds {', '.join(foreign)}, which no case holds; "
            "refusing to replace it"
        )
    try:
        manifest = json.loads(read_regular(case_dir / MANIFEST_NAME,
                                           limit=64 * 2**20))
    except (OSError, ValueError, RecursionError):
        manifest = None
    expected = {"schema": SCHEMA, "block": case_dir.parent.name,
                "case_id": case_dir.name}
    if not isinstance(manifest, dict) or any(
            manifest.get(k) != v for k, v in expected.items()):
        raise FixtureError(
            f"{refuse}: its {MANIFEST_NAME} is not the manifest of "
            f"{case_dir.parent.name}/{case_dir.name}; refusing to replace it "
            "(remove it yourself if it may go)"
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

