"""Reading files that someone else may have prepared: ask what a file is
before reading it, read no more than a bound, and quote what it says safely.

Every reader of refattn that takes a path from a user or from a fixture tree
goes through ``open_regular`` / ``read_regular``:

* the file is opened with ``O_NONBLOCK``, so a FIFO without a writer does
  not block the open, and then ``fstat`` says what it is: anything but a
  regular file (a FIFO, ``/dev/zero`` or another device, a socket, a
  directory) is refused by name before one byte is read;
* its size is checked against the caller's bound before reading, and the
  read itself stops one byte past the bound (a file that grows meanwhile is
  refused, not read to its end).

``shown`` quotes attacker-controlled text (tensor keys, zip member names,
header fields, manifest values) for a message: non-printable characters
escaped, so no terminal escape sequence reaches a terminal, and the length
bounded, so one bad field cannot make a 20 MB line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Any

__all__ = ["DirectorySnapshot", "NotRegularFile", "TooLarge", "display_path", "open_regular",
           "printable", "read_regular", "shown"]

SHOWN_CHARS = 120
"""Characters of a quoted value kept in a message (the rest is counted)."""


class NotRegularFile(ValueError):
    """The path is a FIFO, a device, a socket or a directory: not read."""


class TooLarge(ValueError):
    """The file is larger than the reader's bound: not read."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, limit: int | None = None,
                 what: str = "", dir_fd: int | None = None) -> IO[bytes]:
    """Open `path` for binary reading if it is a regular file (links are
    followed: what they lead to must be a regular file) of at most `limit`
    bytes.  With `dir_fd`, the file named ``Path(path).name`` in that open
    directory is opened (`path` is then only what messages call it).

    Raises:
        NotRegularFile: naming the path and what it is instead.
        TooLarge: naming the path, its size and the bound.
        OSError: it cannot be opened (missing, no permission).
    """
    lead = f"{what}: " if what else ""
    name: str | os.PathLike[str] = path if dir_fd is None else Path(path).name
    _require_regular(os.stat(name, dir_fd=dir_fd).st_mode, path, lead)  # a socket
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)  # again: what was opened, not what was there before
        _require_regular(st.st_mode, path, lead)
        if limit is not None and st.st_size > limit:
            raise TooLarge(f"{lead}{display_path(path)}: {st.st_size} bytes, more than the "
                           f"{limit}-byte limit for this file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, path: str | os.PathLike[str], lead: str) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{lead}{display_path(path)}: is {_kind(mode)}, not a "
                             "regular file; refusing to read it")


def read_regular(path: str | os.PathLike[str], *, limit: int, what: str = "",
                 file: IO[bytes] | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (``open_regular``),
    read with a bound: a file that grew past `limit` meanwhile is refused.
    With `file` (already opened by ``open_regular``), that file is read."""
    if file is None:
        with open_regular(path, limit=limit, what=what) as f:
            data = _read_bounded(f, limit + 1)
    else:
        data = _read_bounded(file, limit + 1)
    if len(data) > limit:
        lead = f"{what}: " if what else ""
        raise TooLarge(f"{lead}{path}: grew past the {limit}-byte limit while being "
                       "read; refusing it")
    return data


def printable(text: str, limit: int = 4000) -> str:
    """`text` with every non-printable character escaped (``\\x1b``,
    ``\\n``, ...) and at most `limit` characters of it kept: safe to print
    on one terminal line."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _read_bounded(f: IO[bytes], most: int) -> bytes:
    """At most `most` bytes of `f`, in chunks of what the file holds: a read
    of n bytes allocates n bytes before it reads, however short the file."""
    chunks, total = [], 0
    while total < most:
        chunk = f.read(min(most - total, max(os.fstat(f.fileno()).st_size, 4096)))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for a one-line message: its ``repr`` (which quotes a
    string), every non-printable character escaped (ESC included), at most
    `limit` characters of it and a count of what was left out."""
    return printable(repr(value), limit)


def display_path(path: str | os.PathLike[str]) -> str:
    """A path for a message: as is when printable and short, else ``shown``."""
    text = os.fspath(path)
    if text.isprintable() and len(text) <= 4 * SHOWN_CHARS:
        return text
    return shown(text, 4 * SHOWN_CHARS)


def is_regular(path: Path) -> bool:
    """True for a regular file (following links), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


class DirectorySnapshot:
    """Some files of one directory, opened together through one descriptor
    of the directory: what they hold belongs to one version of it, even
    while a writer atomically replaces the directory (``publish``) meanwhile.

    ``files[name]`` is an open file, or the exception that opening it gave
    (``FileNotFoundError``, ``NotRegularFile``, ...).  When a file is missing
    and the path now names another directory than the one opened (it was
    replaced, and the old one is being removed), everything is opened again
    from the new one, up to ``ATTEMPTS`` times.  Use as a context manager:
    the files are closed on exit.
    """

    ATTEMPTS = 5

    def __init__(self, directory: str | os.PathLike[str], names: tuple[str, ...]) -> None:
        self.directory = Path(directory)
        self.files: dict[str, IO[bytes] | Exception] = {}
        for attempt in range(self.ATTEMPTS):
            complete = self._open_all(names)
            if complete or attempt == self.ATTEMPTS - 1 or not self._replaced():
                return
            self.close()

    def _open_all(self, names: tuple[str, ...]) -> bool:
        """Open every name; True when all opened or failed for a reason
        other than being missing."""
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        self._dir_fd = os.open(self.directory, flags)
        for name in names:
            try:
                self.files[name] = open_regular(self.directory / name, dir_fd=self._dir_fd)
            except (OSError, ValueError) as err:
                self.files[name] = err
        return not any(isinstance(f, FileNotFoundError) for f in self.files.values())

    def _replaced(self) -> bool:
        try:
            now = os.stat(self.directory)
        except OSError:
            return False
        opened = os.fstat(self._dir_fd)
        return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)

    def close(self) -> None:
        for f in self.files.values():
            if not isinstance(f, Exception):
                f.close()
        self.files = {}
        if getattr(self, "_dir_fd", None) is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> DirectorySnapshot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
