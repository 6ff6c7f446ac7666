"""`pymerge fisher MODEL --data FILE -o FILE`: a model's diagonal Fisher (or mask Fisher), stored for later
merges: the per-parameter case of `pymerge stats`, with which it shares data formats, loading and writing."""
from __future__ import annotations

import argparse
import sys

from pymerge.commands.stats import add_data_arguments, collect_command, standalone_main

HELP = "compute and store a model's diagonal Fisher"
DESCRIPTION = """\
Compute the diagonal Fisher of MODEL on the examples of --data (JSONL or CSV) and store it as a safetensors
file for Fisher merging (`parameters: {fisher: FILE}` in a merge config). `pymerge stats` computes the other
kinds of statistics (Gram, K-FAC).

  pymerge fisher ./ft-sentiment --data val.jsonl -o ft-sentiment.fisher.safetensors"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--mode", default="exact", choices=["exact", "sampled", "empirical", "masks"],
                        help="expectation over labels: exact, sampled, or the data's labels (empirical); "
                             "masks: head/neuron mask Fisher (default: exact)")
    parser.add_argument("--num-samples", type=int, default=1, help="draws per example for --mode sampled")
    parser.add_argument("--mask-mode", default="empirical", choices=["empirical", "exact"],
                        help="for --mode masks: true labels (the paper's choice) or exact over the classes")


def run(args: argparse.Namespace) -> int:
    if args.mode == "masks":  # the mask Fisher is the `masks` kind of statistics
        return collect_command(args, "fisher", "masks", args.mask_mode)
    return collect_command(args, "fisher", "fisher", args.mode)


def main(argv=None) -> int:
    return standalone_main("pymerge fisher", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
