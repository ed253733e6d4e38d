"""The click group, its global options and the error policy of every command.

Imports every subcommand module and registers its command; no subcommand
imports this module (what they share is in ``common`` and ``options``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from refattn import __version__
from refattn.cli import golden, gradcheck, info, list_cmd, show, validate, verify
from refattn.golden.files import printable


class RefattnGroup(click.Group):
    """A click group that turns library errors into one-line messages.

    Bad input (``ValueError``, ``TypeError``, ``OSError`` and refattn's own
    input errors) exits 2; any other exception is a refattn bug and exits 1
    with one line that says so.  ``--debug`` re-raises instead, so the
    traceback is shown.  A reader that closes stdout early (``| head -1``)
    does not change the exit status: the command runs to its end with the
    rest of its output discarded (``_PipeSafeStdout``).
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run with SIGTERM raising ``SystemExit(143)``, so that ``finally``
        blocks run instead of the process vanishing (a fixture write that has
        started holds it back until it completes: ``common.signals_deferred``); a
        second SIGTERM kills at once."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return super().main(*args, **kwargs)
        previous = signal.getsignal(signal.SIGTERM)

        def terminate(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise SystemExit(128 + signum)

        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, terminate)
        try:
            return super().main(*args, **kwargs)
        finally:
            if previous in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _stdout_until_the_reader_leaves():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as err:  # its message may quote their text
            err.message = printable(" ".join(str(err.message).split()), ERROR_CHARS)
            raise
        except BrokenPipeError:
            # a pipe closed under a stream other than sys.stdout (stderr, say):
            # the command stopped before its verdict, so it is not a success
            _silence_stdout()
            ctx.exit(1)
        except (ValueError, TypeError, OSError, KeyError) as err:
            if _debug(ctx):
                raise
            _one_line(err)
            ctx.exit(2)
        except MemoryError as err:  # shapes too large for this machine: bad input
            if _debug(ctx):
                raise
            sized = ctx.invoked_subcommand in ("golden", "gradcheck")
            _one_line(err, prefix="out of memory" + (
                " (use smaller --shape or --set values)" if sized else ""))
            ctx.exit(2)
        except RecursionError as err:  # input nested too deeply to parse
            if _debug(ctx):
                raise
            _one_line(err, prefix="input nested too deeply")
            ctx.exit(2)
        except Exception as err:  # a bug: still one line unless --debug
            if _debug(ctx):
                raise
            _one_line(err, prefix="internal error (please report; --debug shows "
                          "the traceback)")
            ctx.exit(1)


class _PipeSafeStdout:
    """``sys.stdout`` while a command runs: once the reader of the pipe has
    left (``refattn verify DIR | head -1``), writes are discarded instead of
    raising ``BrokenPipeError``, so the command runs to its end and exits
    with its own status (1 when a check failed), which ``set -o pipefail``
    then sees; the reader only chose to read less of the report."""

    buffer = None
    """Hidden, so that click writes text through ``write`` and never around it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # click probes for a binary stream with b""
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not self.reader_gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._reader_left()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_left()

    def _reader_left(self) -> None:
        self.reader_gone = True
        _silence_stdout()  # the interpreter's last flush must not fail either

    def __getattr__(self, name: str) -> Any:  # encoding, errors, isatty, fileno, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def _stdout_until_the_reader_leaves() -> Iterator[None]:
    """Install ``_PipeSafeStdout`` over ``sys.stdout`` for the block."""
    previous = sys.stdout
    if previous is None or isinstance(previous, _PipeSafeStdout):
        yield
        return
    sys.stdout = _PipeSafeStdout(previous)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = previous


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (CliRunner): nothing to redirect
        pass
    finally:
        os.close(devnull)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


ERROR_CHARS = 2000
"""The longest error text printed: the rest is counted, not shown."""


def _one_line(err: BaseException, prefix: str = "") -> None:
    """The ``Error:`` line: one line (whitespace runs folded), non-printable
    characters escaped, at most ``ERROR_CHARS`` characters."""
    text = str(err) if not isinstance(err, KeyError) else str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror or text}: {err.filename}"
    text = " ".join(text.split()) or type(err).__name__
    lead = f"{prefix}: " if prefix else ""
    click.echo(f"Error: {lead}{printable(text, ERROR_CHARS)}", err=True)


@click.group(
    cls=RefattnGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 88},
)
@click.version_option(__version__, "--version", prog_name="refattn")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """refattn: reference forward/backward passes, gradient checks and golden
    fixtures for CNN attention blocks."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


main.add_command(info.info)
main.add_command(list_cmd.list_cmd)
main.add_command(golden.golden)
main.add_command(gradcheck.gradcheck_cmd)
main.add_command(verify.verify)
main.add_command(show.show)
main.add_command(validate.validate)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
