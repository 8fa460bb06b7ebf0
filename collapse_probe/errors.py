"""Errors with a one-line message and a distinct exit code, so the CLI can print them without a traceback.

| exit | class                  | meaning                                                                  |
|------|------------------------|--------------------------------------------------------------------------|
| 1    | CollapseProbeError     | anything else we detected                                                |
| 2    | BadArgumentError       | bad arguments or inputs: missing file, empty image folder (click uses 2) |
| 3    | RefusedContentError    | the file would execute code or is a decompression bomb: refused          |
| 4    | MalformedFileError     | corrupt, truncated or not a checkpoint at all                            |
| 5    | UnsupportedLayoutError | readable, but not a layout/architecture we can map onto a model          |

The command line adds: 2 when an output cannot be written (disk full, read-only folder, no permission: the
``OSError``'s reason and path in one line), 130 / 143 for SIGINT / SIGTERM, and 141 when standard output was closed
before everything was written (``... | head``: a broken pipe, 128 + SIGPIPE as a shell reports it).
"""
from __future__ import annotations


class CollapseProbeError(Exception):
    exit_code = 1

    def __str__(self) -> str:  # one line, always
        return " ".join(super().__str__().split())


class BadArgumentError(CollapseProbeError):
    exit_code = 2


class RefusedContentError(CollapseProbeError):
    exit_code = 3


class MalformedFileError(CollapseProbeError):
    exit_code = 4


class UnsupportedLayoutError(CollapseProbeError):
    exit_code = 5


class UnsupportedModelError(UnsupportedLayoutError):
    """The model has no attention module we know how to probe."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """A foreign exception's message as one line of at most ``limit`` characters (its type name if it has none)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of a foreign exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(e).__name__


def printable(text: object) -> str:
    """``str(text)`` with bytes that are not UTF-8 (a file name the OS allows, carried as surrogates) shown as U+FFFD,
    so it can be printed, written into a report or a CSV file."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
