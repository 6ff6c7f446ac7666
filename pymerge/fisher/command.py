"""Compatibility module: the `pymerge fisher` command lives in pymerge.commands.fisher."""
from pymerge.commands.fisher import add_arguments, main, run  # noqa: F401
from pymerge.commands.stats import make_batches  # noqa: F401
from pymerge.io.rows import read_rows  # noqa: F401
