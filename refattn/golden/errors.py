"""The errors of the fixture format, shared by every module of refattn/golden
that reads, checks or writes a case (re-exported by ``refattn.golden.format``)."""

from __future__ import annotations

from collections.abc import Iterable


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

