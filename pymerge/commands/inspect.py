"""`pymerge inspect MODEL...`: can these models be merged?"""
from __future__ import annotations

HELP = "report whether models can be merged"
DESCRIPTION = """\
Report names, shapes, dtypes and missing tensors of the models and whether they can be merged, reading file
headers only (fast on any size). Exit status 1 when they cannot be merged.

  pymerge inspect ./ft-a ./ft-b --base ./pretrained"""


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model directories or .safetensors files")
    p.add_argument("--base", help="pretrained base model (for task-vector methods)")
    p.add_argument("--head-pattern", action="append", default=None,
                   help="pattern of task-specific tensors (repeatable; default: classifier.* score.* ...)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin pickle checkpoints")
    p.add_argument("--max-listed", type=int, default=10, help="how many differences to list per kind")


def run(args) -> int:
    from pymerge.engine.inspect import inspect_models

    report, ok = inspect_models(args.models, base=args.base, head_patterns=args.head_pattern,
                                allow_pickle=args.allow_pickle, max_listed=args.max_listed)
    print(report)
    return 0 if ok else 1
