"""Command line: `pymerge merge | inspect | fisher | demo`. Argument parsing and reports only; no math here."""
from __future__ import annotations

import argparse
import sys


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge models as a YAML config says",
                       description="Merge models as CONFIG says, streaming tensor by tensor into OUT (a directory "
                                   "that transformers' from_pretrained loads).")
    p.add_argument("config", help="YAML merge config (see README: Merging)")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the merge succeeded)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin pickle checkpoints (loaded with torch.load(weights_only=True))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="report whether models are mergeable",
                       description="Report names, shapes, dtypes and missing tensors of the models and whether "
                                   "they can be merged (exit status 1 when they cannot).")
    p.add_argument("models", nargs="+", help="model directories or .safetensors files")
    p.add_argument("--base", help="pretrained base model (for task-vector methods)")
    p.add_argument("--head-pattern", action="append", default=None,
                   help="pattern of task-specific tensors (repeatable; default: classifier.* score.* ...)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin pickle checkpoints")
    p.add_argument("--max-listed", type=int, default=10, help="how many differences to list per kind")


def _add_fisher(sub, wanted: bool):
    p = sub.add_parser("fisher", help="compute and store a model's diagonal Fisher",
                       description="Compute a diagonal Fisher of MODEL on --data and store it for later merges.")
    if not wanted:  # import the Fisher engine only when its command runs
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    try:
        from pymerge.fisher import command
    except ImportError as exc:
        p.set_defaults(fisher_missing=str(exc))
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    command.add_arguments(p)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pymerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the whole pipeline on an embedded default")
    _add_merge(sub)
    _add_inspect(sub)
    _add_fisher(sub, wanted=bool(argv) and argv[0] == "fisher")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pymerge.demo import run_demo

        return run_demo()
    if args.command == "fisher":
        if getattr(args, "fisher_missing", None):
            print(f"pymerge fisher: the Fisher engine (pymerge.fisher.command) is not available in this "
                  f"install: {args.fisher_missing}", file=sys.stderr)
            return 2
        from pymerge.fisher import command

        return command.run(args)
    if args.command == "merge":
        return _run_merge(args)
    if args.command == "inspect":
        return _run_inspect(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _fail(msg: str) -> int:
    print(f"pymerge: error: {msg}", file=sys.stderr)
    return 1


def _run_merge(args) -> int:
    from pymerge.merge import merge

    try:
        result = merge(args.config, args.out, force=args.force, progress=not args.no_progress,
                       allow_pickle=True if args.allow_pickle else None)
    except (ValueError, OSError, TypeError) as exc:
        return _fail(str(exc))
    s = result.plan.summary()
    heads = [t for i, t in enumerate(result.plan.task_names) if result.plan.head_entries(i)]
    print(f"merged {s['tensors'].get('merge', 0)} tensors with {s['method']} into {result.out_dir}"
          + (f"; task heads kept in heads/ for {', '.join(heads)}" if heads else ""))
    return 0


def _run_inspect(args) -> int:
    from pymerge.mergeability import inspect_models

    try:
        report, ok = inspect_models(args.models, base=args.base, head_patterns=args.head_pattern,
                                    allow_pickle=args.allow_pickle, max_listed=args.max_listed)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
