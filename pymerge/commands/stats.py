"""`pymerge stats MODEL --data FILE --kind fisher|masks|gram|kfac -o FILE`: a model's statistics, stored for
later merges; and what `pymerge fisher` (the diagonal case) shares with it: the data formats, model loading,
tokenised batches and writing the file.

The model directory must hold safetensors weights (pickled .bin checkpoints are refused, never unpickled).
Data: JSONL (one object per line) or CSV with a text column (and an optional second text column for sentence
pairs) and, for the empirical modes, a label column (integers, or names from the model's label2id).
No torch import at module level: `pymerge --help` stays light.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List

HELP = "compute and store a model's statistics (Fisher, mask Fisher, RegMean Gram, K-FAC)"
DESCRIPTION = """\
Compute statistics of MODEL on the examples of --data (JSONL or CSV) and store them as one safetensors file
with metadata (kind, mode, examples, model fingerprint), for merge methods that need them
(`parameters: {stats: FILE}` in a merge config):

  fisher  diagonal Fisher per parameter (--mode exact | sampled | empirical; default exact)
  masks   mask Fisher of attention heads and FFN neurons (--mode empirical | exact; default empirical)
  gram    RegMean Gram (1/N) Z^T Z of every linear layer's input rows, padding masked (no --mode)
  kfac    K-FAC factors E[z z^T] and E[g g^T] of every linear layer (--mode empirical | exact | sampled;
          default empirical)

  pymerge stats ./ft-a --data val.jsonl --kind gram -o ft-a.gram.safetensors"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data, output and batching options shared by `pymerge stats` and `pymerge fisher`."""
    parser.add_argument("model", help="Hugging Face model directory (config.json + *.safetensors + tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL or CSV file of examples")
    parser.add_argument("-o", "--output", required=True, help="statistics file to write (.safetensors)")
    parser.add_argument("--text-column", default="text", help="column with the input text (default: text)")
    parser.add_argument("--text-pair-column", default=None, help="optional second text column (sentence pairs)")
    parser.add_argument("--label-column", default="label", help="column with the label (default: label)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-examples", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled mode")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--kind", default="fisher", help="fisher | masks | gram | kfac (default: fisher)")
    parser.add_argument("--mode", default=None, help="the kind's mode (default: the kind's own, see above)")
    parser.add_argument("--num-samples", type=int, default=1, help="draws per example for --mode sampled")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="gram / kfac: leave out linear layers whose module name matches this glob "
                             "(repeatable; e.g. 'lm_head')")



def load_model(model_dir: Path, device: str):
    import transformers

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if not list(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir}: no *.safetensors weights (pickled checkpoints are not loaded)")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    archs = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs) or not archs:
        auto = transformers.AutoModelForSequenceClassification
    elif any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        auto = transformers.AutoModelForCausalLM
    else:
        raise ValueError(f"{model_dir}: architecture {archs} is not supported by `pymerge stats` / `pymerge fisher` "
                         "(sequence classification or causal LM); use pymerge.stats.collect from Python")
    model = auto.from_pretrained(model_dir, use_safetensors=True).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS, masked out by attention_mask
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def make_batches(rows, tokenizer, args, label2id, need_labels: str = ""):
    """Tokenised batches of --batch-size rows (labels when every row has one). need_labels: why labels are
    required (empty when they are not), for the error message."""
    from pymerge.io.rows import label_id

    text_col, pair_col, label_col = args.text_column, args.text_pair_column, args.label_column
    batches = []
    for lo in range(0, len(rows), args.batch_size):
        chunk = rows[lo:lo + args.batch_size]
        for i, row in enumerate(chunk, lo + 1):
            for col in (text_col, pair_col):
                if col and col not in row:
                    raise ValueError(f"--data example {i}: no column {col!r} (columns: {sorted(row)})")
            if need_labels and label_col not in row:
                raise ValueError(f"--data example {i}: no label column {label_col!r} (needed by {need_labels})")
        texts = [str(r[text_col]) for r in chunk]
        pairs = [str(r[pair_col]) for r in chunk] if pair_col else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if all(label_col in r for r in chunk):
            import torch

            batch["labels"] = torch.tensor([label_id(r[label_col], label2id, f"--data example {lo + j + 1}")
                                            for j, r in enumerate(chunk)])
        batches.append(batch)
    return batches


def collect_to_file(args: argparse.Namespace, command: str, kind: str, mode, options: Dict[str, object]) -> int:
    """Load the model and data of `args`, collect statistics of `kind`, write them to --output."""
    import torch

    from pymerge.stats import registry, store

    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"pymerge {command}: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    estimator = registry.get(kind)  # unknown kinds and modes fail here, before the model loads
    mode = estimator.default_mode if mode is None else mode
    if mode not in estimator.modes:
        raise ValueError(f"--mode: {kind} statistics take one of {estimator.modes}, got {mode!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from pymerge.io.rows import read_rows

    rows = read_rows(Path(args.data))
    if args.num_examples is not None:
        rows = rows[:args.num_examples]
    if not rows:
        raise ValueError(f"--data {args.data}: no examples")
    model, tokenizer = load_model(Path(args.model), device)
    label2id = getattr(model.config, "label2id", None)
    need = f"--kind {kind} --mode {mode}" if mode == "empirical" else ""
    batches = make_batches(rows, tokenizer, args, label2id, need_labels=need)
    stats = registry.collect(model, batches, kind=kind, mode=mode, **options)
    stats.metadata.setdefault("model_path", str(Path(args.model).resolve()))
    stats.metadata.setdefault("data", str(Path(args.data).resolve()))
    store.save(out, stats, overwrite=args.force)
    size = sum(t.numel() for t in stats.tensors.values()) * 4
    print(f"pymerge {command}: wrote {out} ({kind}, mode {mode}: {len(stats.tensors)} tensors, {size / 2**20:.1f} "
          f"MiB, {stats.metadata['num_examples']} examples)")
    return 0


def collect_command(args: argparse.Namespace, command: str, kind: str, mode) -> int:
    """`pymerge <command>` computing statistics of `kind` (mode None: the kind's default) with the options of
    `args` that apply to it (`pymerge fisher` has no --exclude)."""
    options: Dict[str, object] = {}
    if kind in ("fisher", "kfac"):
        options.update(num_samples=args.num_samples, seed=args.seed)
    exclude = getattr(args, "exclude", None)
    if exclude:
        if kind not in ("gram", "kfac"):
            raise ValueError(f"--exclude: only for --kind gram or kfac (per-layer statistics), not {kind!r}")
        options["exclude"] = exclude
    return collect_to_file(args, command, kind, mode, options)


def run(args: argparse.Namespace) -> int:
    return collect_command(args, "stats", args.kind, args.mode)


def standalone_main(prog: str, command, argv=None) -> int:
    """`python -m pymerge.commands.<name>`: the command module's parser and run, outside `pymerge`."""
    parser = argparse.ArgumentParser(prog=prog, description=command.DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def main(argv=None) -> int:
    return standalone_main("pymerge stats", sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
