"""The errors pymerge raises for its users, and what the command line does with them.

`pymerge/cli.py` turns them into one line `pymerge <cmd>: error: ...` and an exit status, never a traceback:
    UsageError                      -> 2  (a bad argument or option: the command was called wrongly)
    PymergeError, ValueError, OSError -> 1  (the command ran and failed: bad input file, disk full, ...)
    Interrupted (SIGINT / SIGTERM)  -> 128 + signal number, after the partial output was removed
"""
from __future__ import annotations

import errno
import reprlib

EXIT_FAILURE = 1
EXIT_USAGE = 2

# Longest excerpt of a user's value (or of any message) that an error may echo.
EXCERPT_CHARS = 80


class PymergeError(Exception):
    """A failure the user can act on (exit status 1)."""

    exit_code = EXIT_FAILURE


class UsageError(PymergeError):
    """The command was called wrongly: a bad option, a missing argument (exit status 2)."""

    exit_code = EXIT_USAGE


class DiskFullError(PymergeError, OSError):
    """Writing an output ran out of space (or quota); the message names the path and the bytes needed."""

    def __init__(self, message: str, filename=None):
        OSError.__init__(self, errno.ENOSPC, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so that `with` blocks clean up on the way out."""

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum = signum
        self.name = name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_repr = reprlib.Repr()
_repr.maxstring = EXCERPT_CHARS
_repr.maxother = EXCERPT_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """A short repr of a user's value for error messages: bounded in size whatever the value holds
    (a long string, a huge or recursive list), so an error never echoes a whole file."""
    text = _repr.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def shorten(message: str, limit: int = 1000) -> str:
    """Cut a message to `limit` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]} ... ({len(message) - limit} more characters)"
