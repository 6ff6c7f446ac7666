"""The `pymerge` command: merge fine-tuned models, compute their statistics, search merge coefficients.

Wiring only: each command is a module of pymerge.commands with HELP, DESCRIPTION, add_arguments(parser) and
run(args). Only the command being run gets its full arguments (some need heavy imports), so `pymerge --help`
and argument errors stay fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("merge", "inspect", "fisher", "stats", "demo", "search")

EPILOG = "Run `pymerge COMMAND --help` for a command's options. Documentation: README.md of the project."


def _command_module(name: str):
    return importlib.import_module(f"pymerge.commands.{name}")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    from pymerge import __version__

    parser = argparse.ArgumentParser(
        prog="pymerge", epilog=EPILOG,
        description="Merge fine-tuned models: Fisher merging, DF-Merge coefficient search, RegMean / MaTS and "
                    "the classic baselines, streamed tensor by tensor into Hugging Face checkpoints.")
    parser.add_argument("--version", action="version", version=f"pymerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        mod = _command_module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == selected:
            mod.add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    from pymerge.errors import PymergeError, UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print(f"pymerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        if args.debug:
            raise
        print(f"pymerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (PymergeError, ValueError, OSError, TypeError, KeyError) as exc:
        if args.debug:
            raise
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing entry {exc}"
        print(f"pymerge {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
