"""The ``refattn`` command line: a thin click layer over the library.

One module per subcommand; each parses, calls library functions and prints.
Exit codes: 0 success, 1 a check failed, 2 bad usage or input (one line,
never a traceback unless ``--debug``).
"""

from __future__ import annotations

from refattn.cli.main import main

__all__ = ["main"]
