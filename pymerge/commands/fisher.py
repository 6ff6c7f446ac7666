"""`pymerge fisher MODEL --data FILE -o FISHER`: estimate a model's diagonal Fisher on a labelled text file.

Wired into pymerge/cli.py by lazy import: `add_arguments(subparser)` and `run(args) -> int`.
The model directory must hold safetensors weights (pickled .bin checkpoints are refused, never unpickled).
Data: JSONL (one object per line) or CSV with a text column (and an optional second text column for sentence
pairs) and, for the empirical Fisher, a label column (integers, or names from the model's label2id).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Dict, List


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model directory (config.json + *.safetensors + tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL or CSV file of examples")
    parser.add_argument("-o", "--output", required=True, help="Fisher file to write (.safetensors)")
    parser.add_argument("--mode", default="exact", choices=["exact", "sampled", "empirical", "masks"],
                        help="expectation over labels: exact, sampled, or the data's labels (empirical); "
                             "masks: head/neuron mask Fisher (default: exact)")
    parser.add_argument("--num-samples", type=int, default=1, help="draws per example for --mode sampled")
    parser.add_argument("--mask-mode", default="empirical", choices=["empirical", "exact"],
                        help="for --mode masks: true labels (the paper's choice) or exact over the classes")
    parser.add_argument("--text-column", default="text", help="column with the input text (default: text)")
    parser.add_argument("--text-pair-column", default=None, help="optional second text column (sentence pairs)")
    parser.add_argument("--label-column", default="label", help="column with the label (default: label)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-examples", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled mode")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")


def read_rows(path: Path) -> List[Dict[str, object]]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: file not found")
    rows: List[Dict[str, object]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--data {path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise ValueError(f"--data {path}:{lineno}: expected a JSON object per line")
                rows.append(row)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"--data {path}: expected a .jsonl or .csv file")
    return rows


def _load_model(model_dir: Path, device: str):
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
        raise ValueError(f"{model_dir}: architecture {archs} is not supported by `pymerge fisher` "
                         "(sequence classification or causal LM); use pymerge.fisher.estimate from Python")
    model = auto.from_pretrained(model_dir, use_safetensors=True).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # GPT-2 style: pad with EOS, masked out by attention_mask
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _label_id(value, label2id, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if label2id and text in label2id:
        return int(label2id[text])
    raise ValueError(f"{where}: label {value!r} is neither an integer nor one of the model's labels "
                     f"{sorted(label2id) if label2id else []}")


def make_batches(rows, tokenizer, args, label2id, need_labels: bool):
    text_col, pair_col, label_col = args.text_column, args.text_pair_column, args.label_column
    batches = []
    for lo in range(0, len(rows), args.batch_size):
        chunk = rows[lo:lo + args.batch_size]
        for i, row in enumerate(chunk, lo + 1):
            for col in (text_col, pair_col):
                if col and col not in row:
                    raise ValueError(f"--data example {i}: no column {col!r} (columns: {sorted(row)})")
            if need_labels and label_col not in row:
                raise ValueError(f"--data example {i}: no label column {label_col!r} (needed by --mode empirical and --mode masks --mask-mode empirical)")
        texts = [str(r[text_col]) for r in chunk]
        pairs = [str(r[pair_col]) for r in chunk] if pair_col else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if all(label_col in r for r in chunk):
            import torch

            batch["labels"] = torch.tensor([_label_id(r[label_col], label2id, f"--data example {lo + j + 1}")
                                            for j, r in enumerate(chunk)])
        batches.append(batch)
    return batches


def run(args: argparse.Namespace) -> int:
    import torch

    from pymerge.stats import fisher as _fisher, store
    estimate = _fisher.estimate

    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"pymerge fisher: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = read_rows(Path(args.data))
    if args.num_examples is not None:
        rows = rows[:args.num_examples]
    if not rows:
        raise ValueError(f"--data {args.data}: no examples")
    model, tokenizer = _load_model(Path(args.model), device)
    label2id = getattr(model.config, "label2id", None)
    masks_need_labels = args.mode == "masks" and args.mask_mode == "empirical"
    batches = make_batches(rows, tokenizer, args, label2id, need_labels=args.mode == "empirical" or masks_need_labels)
    if args.mode == "masks":
        kwargs = dict(mask_mode=args.mask_mode)
    else:
        kwargs = dict(num_samples=args.num_samples, seed=args.seed)
    fisher = estimate(model, batches, mode=args.mode, **kwargs)
    fisher.metadata.setdefault("model_path", str(Path(args.model).resolve()))
    fisher.metadata.setdefault("data", str(Path(args.data).resolve()))
    store.save(out, fisher, overwrite=args.force)
    print(f"pymerge fisher: wrote {out} ({len(fisher.tensors)} tensors, {fisher.metadata['num_examples']} examples, "
          f"mode {args.mode})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymerge fisher", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
