"""One module per `pymerge` command: HELP, DESCRIPTION, add_arguments(parser), run(args) -> exit code.

Modules here import nothing heavy at module level (torch, transformers): `pymerge --help` lists them all.
"""
