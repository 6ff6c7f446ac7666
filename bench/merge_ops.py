"""Benchmark of the fused merge ops against eager torch and the memory-bandwidth ceiling, side by side.

For each device (CPU; CUDA when present), dtype (fp32, bf16, fp16), M models and N parameters it times
  fused    pymerge.ops.<op> (one pass: reads every input once, writes the output once)
  eager    the formula a user writes in torch (as FusionBench / MergeLM do), e.g. sum(w*f*p) / sum(w*f)
  copy     the bandwidth ceiling: a torch copy_ into a preallocated tensor moving the same bytes as the op
           (bytes read + bytes written), timed alternately with the fused op (round by round)
  clone    the same bytes copied into a fresh tensor (allocation + first-touch page faults, which every op
           returning a new tensor pays too)
and prints GB/s (op bytes / time) and the ratios fused/copy (share of the ceiling), fused/clone and
eager/fused (speed-up).
Times are the minimum over repeats. Run:  python bench/merge_ops.py [--quick] [--device cpu|cuda|all]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pymerge import ops  # noqa: E402


def timeit(fn, device, repeats):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- the eager formulas a user would write ------------------------------------------------------
def eager_fisher(params, fishers, weights, eps=1e-8):
    num = sum(w * f * p for w, f, p in zip(weights, fishers, params))
    den = sum(w * f for w, f in zip(weights, fishers))
    return torch.where(den > eps, num / den, params[0])


def eager_dfmerge(pre, taus, fishers, lambdas, eps=1e-8):
    num = sum(f * (l * t) for f, l, t in zip(fishers, lambdas, taus))
    den = sum(fishers)
    plain = sum(l * t for l, t in zip(lambdas, taus))
    return pre + torch.where(den > eps, len(taus) * num / den, plain)


def eager_weighted_sum(tensors, weights, base):
    return base + sum(w * t for w, t in zip(weights, tensors))


def eager_ties(pre, taus, density, lam):
    k = max(1, math.ceil(density * pre.numel()))
    trimmed = []
    for t in taus:
        thr = t.abs().flatten().float().kthvalue(t.numel() - k + 1).values
        trimmed.append(t * (t.abs() >= thr))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return pre + lam * mean


def eager_dare(t, p, seed):
    g = torch.Generator(device=t.device).manual_seed(seed)
    keep = torch.rand(t.shape, generator=g, device=t.device) >= p
    return t * keep / (1 - p)


def timeit_interleaved(fns, device, repeats):
    """Minimum time of each of fns, run alternately round by round: on a shared (loaded) machine every contender
    sees the same conditions, so their ratios are steadier than with one timing loop after another."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns:
        fn()
    sync()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def time_with_ceiling(fused, nbytes_moved, dtype, device, repeats):
    """The fused op's time, interleaved with the ceiling: GB/s of torch copy_ moving nbytes_moved bytes (half
    read, half written) into a preallocated tensor, and of clone() moving the same bytes into a fresh tensor
    (allocation and first-touch page faults included, as an op that returns a new tensor pays them)."""
    elems = max(1, nbytes_moved // 2 // torch.empty((), dtype=dtype).element_size())
    src = torch.ones(elems, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t_fused, t_copy, t_clone = timeit_interleaved([fused, lambda: dst.copy_(src), src.clone], device, repeats)
    moved = 2 * elems * src.element_size()
    return t_fused, (moved / t_copy / 1e9, moved / t_clone / 1e9)


def row(op, device, dtype, m, n, fused_t, eager_t, nbytes, ceilings):
    ceil_gbs, clone_gbs = ceilings
    fused_gbs = nbytes / fused_t / 1e9
    eager_gbs = nbytes / eager_t / 1e9 if eager_t else float("nan")
    print(f"{device:4s} {op:16s} {str(dtype).replace('torch.', ''):8s} M={m:<2d} N={n / 1e6:6.1f}M  "
          f"fused {fused_t * 1e3:8.2f} ms {fused_gbs:7.2f} GB/s | eager {eager_t * 1e3:9.2f} ms {eager_gbs:7.2f} GB/s | "
          f"copy {ceil_gbs:6.2f} clone {clone_gbs:6.2f} GB/s | fused/copy {fused_gbs / ceil_gbs:5.0%} "
          f"fused/clone {fused_gbs / clone_gbs:5.0%}  eager/fused {eager_t / fused_t:6.1f}x",
          flush=True)


def free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def bench_fisher(device, dtype, m, n, repeats):
    es = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * m + 1) * n * es
    if nbytes * 3 > free_bytes(device) * 0.6:  # inputs + eager temporaries
        print(f"{device:4s} fisher_merge    {dtype} M={m} N={n / 1e6:.0f}M: skipped (needs ~{3 * nbytes / 2**30:.1f} GiB)")
        return
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(n, generator=g, device=device).to(dtype) for _ in range(m)]
    fishers = [torch.rand(n, generator=g, device=device).to(dtype) for _ in range(m)]
    w = [1.0 / m] * m
    eager_t = timeit(lambda: eager_fisher(params, fishers, w), device, max(1, repeats // 2))
    fused_t, ceilings = time_with_ceiling(lambda: ops.fisher_merge(params, fishers, w), nbytes, dtype, device, repeats)
    row("fisher_merge", device, dtype, m, n, fused_t, eager_t, nbytes, ceilings)
    buf = torch.empty_like(params[0])  # out=: one reused output buffer, no fresh allocation per call
    out_t, ceilings = time_with_ceiling(lambda: ops.fisher_merge(params, fishers, w, out=buf), nbytes, dtype, device,
                                        repeats)
    row("fisher_merge+out", device, dtype, m, n, out_t, eager_t, nbytes, ceilings)
    del params, fishers, buf


def bench_others(device, dtype, m, n, repeats):
    es = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(1)
    pre = torch.randn(n, generator=g, device=device).to(dtype)
    taus = [torch.randn(n, generator=g, device=device).to(dtype) for _ in range(m)]
    fishers = [torch.rand(n, generator=g, device=device).to(dtype) for _ in range(m)]
    lam = [0.5] * m
    buf = torch.empty_like(pre)  # out=: one reused output buffer
    cases = [
        ("weighted_sum", (m + 2) * n * es, lambda: ops.weighted_sum(taus, lam, pre),
         lambda: eager_weighted_sum(taus, lam, pre)),
        ("weighted_sum+out", (m + 2) * n * es, lambda: ops.weighted_sum(taus, lam, pre, out=buf),
         lambda: eager_weighted_sum(taus, lam, pre)),
        ("dfmerge_combine", (2 * m + 2) * n * es, lambda: ops.dfmerge_combine(pre, taus, fishers, lam),
         lambda: eager_dfmerge(pre, taus, fishers, lam)),
        ("dfmerge+out", (2 * m + 2) * n * es, lambda: ops.dfmerge_combine(pre, taus, fishers, lam, out=buf),
         lambda: eager_dfmerge(pre, taus, fishers, lam)),
        ("ties_merge", (m + 2) * n * es, lambda: ops.ties_merge(pre, taus, 0.2, 1.0),
         lambda: eager_ties(pre, taus, 0.2, 1.0)),
        ("dare", 2 * n * es, lambda: ops.dare(taus[0], 0.9, 7), lambda: eager_dare(taus[0], 0.9, 7)),
    ]
    for name, nbytes, fused, eager in cases:
        eager_t = timeit(eager, device, max(1, repeats // 2))
        fused_t, ceilings = time_with_ceiling(fused, nbytes, dtype, device, repeats)
        row(name, device, dtype, m, n, fused_t, eager_t, nbytes, ceilings)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (a minute or two)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--sizes", type=float, nargs="*", help="parameter counts in millions")
    ap.add_argument("--models", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu", "cuda"]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no CUDA device: CPU only")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"compiled kernels: {ops._use_kernel('fisher_merge', torch.zeros(1))}")
    for device in devices:
        if device == "cuda":
            print(f"GPU: {torch.cuda.get_device_name()}")
        sizes = args.sizes or ([4] if args.quick else [16, 64, 256])
        repeats = args.repeats or (7 if args.quick else 5)
        if device == "cuda":
            repeats *= 4
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n_m in sizes:
                for m in args.models:
                    bench_fisher(device, dtype, m, int(n_m * 1e6), repeats)
            bench_others(device, dtype, 4, int(sizes[0] * 1e6), repeats)


if __name__ == "__main__":
    main()
