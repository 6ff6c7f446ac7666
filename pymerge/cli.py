"""Command line: `pymerge demo | merge | fisher | inspect`. Argument parsing only; no math here."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the whole pipeline on an embedded default")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pymerge.demo import run_demo

        return run_demo()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
