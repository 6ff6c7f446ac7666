"""`pymerge fisher MODEL --data FILE -o FILE`: a model's diagonal Fisher, stored for later merges."""
from __future__ import annotations

HELP = "compute and store a model's diagonal Fisher"
DESCRIPTION = """\
Compute the diagonal Fisher of MODEL on the examples of --data (JSONL or CSV) and store it as a safetensors
file for Fisher merging (`parameters: {fisher: FILE}` in a merge config).

  pymerge fisher ./ft-sentiment --data val.jsonl -o ft-sentiment.fisher.safetensors"""


def add_arguments(p) -> None:
    from pymerge.fisher import command  # the Fisher engine: only when this command runs

    command.add_arguments(p)


def run(args) -> int:
    from pymerge.fisher import command

    return command.run(args)
