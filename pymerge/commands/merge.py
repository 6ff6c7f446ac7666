"""`pymerge merge CONFIG OUT`: run a merge described by a YAML config."""
from __future__ import annotations

HELP = "merge models as a YAML config says"
DESCRIPTION = """\
Merge the models listed in CONFIG (a YAML file: merge_method, models, base_model, parameters; see README,
"Merging") and write the result to OUT, a directory that transformers' from_pretrained loads. Tensors are
streamed one at a time, so memory stays at a few tensors whatever the model size. Task heads are kept per task
in OUT/heads/. OUT is written atomically: it appears complete or not at all.

  pymerge merge merge.yml merged/
  pymerge merge merge.yml -o merged/ --force"""


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML merge config (see README: Merging)")
    p.add_argument("out", nargs="?", help="output directory (must not exist unless --force)")
    p.add_argument("-o", "--out", dest="out_option", metavar="OUT", help="output directory (same as OUT)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the merge succeeded)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin pickle checkpoints (loaded with torch.load(weights_only=True))")
    p.add_argument("--allow-foreign-stats", action="store_true",
                   help="accept Fisher / statistics files whose fingerprints say they were computed on another "
                        "model than the one they are paired with (config: allow_foreign_stats: true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_dir(args) -> str:
    """OUT given positionally (as mergekit takes it) or with -o; once, or twice the same."""
    from pymerge.errors import UsageError

    if args.out and args.out_option and args.out != args.out_option:
        raise UsageError(f"two different outputs given: {args.out!r} and -o {args.out_option!r}")
    out = args.out or args.out_option
    if not out:
        raise UsageError("no output directory: give it as `pymerge merge CONFIG OUT` or with -o OUT")
    return out


def run(args) -> int:
    from pymerge.engine import merge

    result = merge(args.config, output_dir(args), force=args.force, progress=not args.no_progress,
                   allow_pickle=True if args.allow_pickle else None,
                   allow_foreign_stats=True if args.allow_foreign_stats else None)
    s = result.plan.summary()
    heads = [t for i, t in enumerate(result.plan.task_names) if result.plan.head_entries(i)]
    print(f"merged {s['tensors'].get('merge', 0)} tensors with {s['method']} into {result.out_dir}"
          + (f"; task heads kept in heads/ for {', '.join(heads)}" if heads else ""))
    return 0
