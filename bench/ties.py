#!/usr/bin/env python
"""ties_merge side by side with the copy ceiling, interleaved round by round (for a loaded machine).

Per dtype, at M models and N elements, each round times once each of
  copy       torch copy_ moving the op's bytes (M + 1 inputs read, 1 output written) into a preallocated tensor
  tv         ops.ties_merge on task vectors (the op alone)
  models     ops.ties_merge(models=True, check_finite=True): fine-tuned tensors in, τ_i formed and checked inside
  eager+tv   what the engine did before: τ_i = θ_i - θ_pre in eager torch, an aminmax NaN / Inf check of every
             input, then the op on task vectors
  general    the path of non-default options (here per-model weights 1, 0.5, 0.7, ...): each fp32 task vector
             trimmed (methods.sparsify.trim_magnitudes), then sparsify.combine in eager torch
and reports the minimum over rounds, GB/s of the op's bytes and the share of the copy ceiling. The floor of
TIES is (M + 2) / (2M + 2) of copy: the selection reads every input once more.

    python bench/ties.py [--models 4] [--size 4] [--rounds 15] [--dtypes float32 bfloat16 float16]
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
from pymerge.methods import sparsify  # noqa: E402


def eager_then_op(pre, models, density, lam):
    taus = [m - pre for m in models]
    for t in models + [pre]:
        lo, hi = torch.aminmax(t)
        assert float(lo) > -math.inf and float(hi) < math.inf
    return ops.ties_merge(pre, taus, density, lam)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--size", type=float, default=4, help="elements, in millions")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    m, n = args.models, int(args.size * 1e6)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, M={m}, N={n / 1e6:.1f}M, "
          f"density {args.density}, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        g = torch.Generator().manual_seed(0)
        base = torch.randn(n, generator=g)
        pre = base.to(dtype)
        models = [(base + 0.02 * torch.randn(n, generator=g)).to(dtype) for _ in range(m)]
        taus = [t - pre for t in models]
        weights = [(1.0, 0.5, 0.7)[i % 3] for i in range(m)]
        es = pre.element_size()
        nbytes = (m + 2) * n * es
        src = torch.ones(nbytes // 2 // es, dtype=dtype)
        dst = torch.empty_like(src)
        cases = {
            "copy": lambda: dst.copy_(src),
            "tv": lambda: ops.ties_merge(pre, taus, args.density, 1.0),
            "models": lambda: ops.ties_merge(pre, models, args.density, 1.0, models=True, check_finite=True),
            "eager+tv": lambda: eager_then_op(pre, models, args.density, 1.0),
            "general": lambda: sparsify.combine(pre, [sparsify.trim_magnitudes(t.float(), args.density) for t in taus],
                                                weights, "sum", True, 1.0),
        }
        if len(torch.ops.pymerge.ties_merge.default._schema.arguments) < 6:  # a build before the model form
            del cases["models"]
        else:
            assert torch.equal(cases["models"](), cases["tv"]())
        best = {k: math.inf for k in cases}
        for _ in range(args.rounds):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        copy_gbs = nbytes / best["copy"] / 1e9
        line = [f"{name:8s} copy {best['copy'] * 1e3:6.2f} ms {copy_gbs:5.1f} GB/s"]
        for k in [k for k in ("tv", "models", "eager+tv", "general") if k in cases]:
            line.append(f"{k} {best[k] * 1e3:7.2f} ms {best['copy'] / best[k]:4.0%} of copy")
        print(" | ".join(line), f"| floor {(m + 2) / (2 * m + 2):.0%}", flush=True)
        print(f"         load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
