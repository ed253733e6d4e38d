"""What several subcommands share besides their options (those are in
``options``): the exit-2 error ``BadInput`` and ``signals_deferred``.

Imported by the subcommand modules and by ``main``; imports no other module
of refattn/cli, so ``main`` can import every subcommand without a cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click


class BadInput(click.ClickException):
    """Bad usage or input: one line ``Error: ...`` on stderr, exit status 2."""

    exit_code = 2


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done (a fixture write
    completes, then the process stops): an exception raised at an arbitrary
    line of the writer, or of the shutil calls it makes, could abandon its
    temporary directory or even close a descriptor twice."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)
