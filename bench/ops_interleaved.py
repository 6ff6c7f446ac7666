"""Fused element-wise ops and dare against a copy of the same bytes, timed alternately in one process.

Each round runs the op, then a torch copy_ moving the op's bytes (read + written); the minimum over rounds of each
is kept, so on a shared, loaded machine both see the same conditions. --threads 1 --cpu uses the thread's CPU time
(time.thread_time) instead of wall time: it leaves out the time the process was descheduled, the steadiest
per-core measure on a busy machine. To compare two builds, run this script from two checkouts alternately.

  PYTHONPATH=. python bench/ops_interleaved.py [--rounds 15] [--threads 1 --cpu] [--n 4] [--ops ws,fmo,dare]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pymerge import ops  # noqa: E402

OPS = "ws,wso,fm,fmo,df,dfo,dare"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n", type=float, default=4, help="elements in millions")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--ops", default=OPS, help=f"comma-separated subset of {OPS} (o: out=, a reused output)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cpu", action="store_true", help="time the thread's CPU time (use with --threads 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu else time.perf_counter
    n, m = int(args.n * 1e6), args.models
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        es = torch.empty((), dtype=dt).element_size()
        g = torch.Generator().manual_seed(0)
        pre = torch.randn(n, generator=g).to(dt)
        xs = [torch.randn(n, generator=g).to(dt) for _ in range(m)]
        fs = [torch.rand(n, generator=g).to(dt) for _ in range(m)]
        w = [1.0 / m] * m
        buf = torch.empty_like(pre)
        cases = {
            "ws": ((m + 2) * n * es, lambda: ops.weighted_sum(xs, w, pre)),
            "wso": ((m + 2) * n * es, lambda: ops.weighted_sum(xs, w, pre, out=buf)),
            "fm": ((2 * m + 1) * n * es, lambda: ops.fisher_merge(xs, fs, w)),
            "fmo": ((2 * m + 1) * n * es, lambda: ops.fisher_merge(xs, fs, w, out=buf)),
            "df": ((2 * m + 2) * n * es, lambda: ops.dfmerge_combine(pre, xs, fs, w)),
            "dfo": ((2 * m + 2) * n * es, lambda: ops.dfmerge_combine(pre, xs, fs, w, out=buf)),
            "dare": (2 * n * es, lambda: ops.dare(xs[0], 0.9, 7)),
        }
        for op in args.ops.split(","):
            nbytes, fn = cases[op]
            src = torch.ones(nbytes // 2 // es, dtype=dt)
            dst = torch.empty_like(src)
            fn()
            dst.copy_(src)
            best_op = best_copy = float("inf")
            for _ in range(args.rounds):
                t0 = clock()
                fn()
                t1 = clock()
                dst.copy_(src)
                t2 = clock()
                best_op, best_copy = min(best_op, t1 - t0), min(best_copy, t2 - t1)
            print(f"{op:5s} {name:9s} op {best_op * 1e3:7.2f} ms  copy {best_copy * 1e3:6.2f} ms  "
                  f"share {best_copy / best_op:5.0%}", flush=True)
    print("load average", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
