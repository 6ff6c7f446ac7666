"""Errors a user can act on. The command line prints them as one line, without a traceback."""


class PymergeError(Exception):
    """Something about the inputs or the environment is wrong; the message says what and where (exit 1)."""


class UsageError(PymergeError):
    """A command was called wrongly: missing or conflicting arguments (exit 2)."""
