"""The `pymerge` command: merge fine-tuned models, compute their statistics, search merge coefficients.

Wiring only: each command is a module of pymerge.commands with HELP, DESCRIPTION, add_arguments(parser) and
run(args). Only the command being run gets its full arguments (some need heavy imports), so `pymerge --help`
and argument errors stay fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("merge", "inspect", "fisher", "stats", "demo", "search", "plot")

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
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback of an error")
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


# Argument names (argparse dests) that name what a command reads and what it writes, for every command. Before a
# command runs: an output may not be, contain or lie inside an input (symlinks resolved; --force or not), and a
# model directory's config.json must be a JSON object (transformers would fail on it without naming it).
INPUT_ARGS = {"model": "model", "models": "model", "base": "base model", "data": "--data file",
              "config": "config file"}
MODEL_ARGS = ("model", "models", "base")
OUTPUT_ARGS = ("output", "out", "out_option")
# Where a command's argument names mean something else than the defaults above.
COMMAND_PATH_ARGS = {
    "search": {"outputs": ("out", "log")},  # --log: the trial log it writes
    "plot": {"inputs": {"log": "trial log", "source": "landscape source"}, "outputs": ("out", "save_grid")},
}


def check_paths(args) -> None:
    def given(dest):
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        return [v for v in values if isinstance(v, str) and v]

    roles = COMMAND_PATH_ARGS.get(getattr(args, "command", None), {})
    input_args = {**INPUT_ARGS, **roles.get("inputs", {})}
    outputs = [v for dest in roles.get("outputs", OUTPUT_ARGS) for v in given(dest)]
    inputs = [(input_args[dest], v) for dest in input_args for v in given(dest)]
    if outputs and inputs:
        from pymerge.io.writer import check_not_input

        for out in outputs:
            check_not_input(out, inputs)
    for dest in MODEL_ARGS:
        for v in given(dest):
            if os.path.isdir(v):
                from pymerge.io.reader import read_model_config

                read_model_config(v)


def main(argv=None) -> int:
    from pymerge.errors import Interrupted, PymergeError, UsageError, shorten
    from pymerge.signals import signals_interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)

    def fail(kind: str, message: str, code: int) -> int:
        print(f"pymerge {args.command}: {kind}: {shorten(message, 2000)}", file=sys.stderr)
        return code

    try:
        with signals_interrupt():  # SIGTERM cleans up like Ctrl-C
            check_paths(args)
            return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        what = f" ({exc.name})" if isinstance(exc, Interrupted) else ""
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        print(f"pymerge {args.command}: interrupted{what}", file=sys.stderr)
        return code
    except BrokenPipeError:  # `pymerge inspect ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 1
    except UsageError as exc:
        if debug:
            raise
        return fail("error", str(exc), 2)
    except (PymergeError, ValueError, OSError, TypeError, KeyError) as exc:
        if debug:
            raise
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing entry {exc}"
        return fail("error", msg or type(exc).__name__, getattr(exc, "exit_code", 1))
    except Exception as exc:  # a bug: still one line, the traceback on request
        if debug:
            raise
        return fail("internal error", f"{type(exc).__name__}: {exc} (run `pymerge --debug {args.command} ...` "
                    "for the traceback, and please report it)", 1)


if __name__ == "__main__":
    sys.exit(main())
