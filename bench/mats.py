"""MaTS' conjugate gradient: pymerge's batched torch solver against the seed's approach (scipy.sparse.linalg.cg
per layer through a LinearOperator whose matvec converts numpy -> torch -> numpy on every call and sums
C_m x over the models), side by side in one run, at equal iterations and at equal residual.

    .venv/bin/python bench/mats.py                 # MiniLM-sized layers, 6 layers' worth, M = 3 and 8, 100 its
    .venv/bin/python bench/mats.py --quick         # 1 layer's worth, M = 3, 20 iterations
    .venv/bin/python bench/mats.py --device cuda   # pymerge's solver on the GPU (the baseline stays on the CPU)

Layers of one MiniLM layer (hidden 384, FFN 1536), weight and bias solved together (d' = d + 1): q, k, v, o
[384, 385], FFN in [1536, 385], FFN out [384, 1537]. Statistics: random input Grams with a decaying spectrum
(the regmean objective) and random output-gradient factors (kfac). Both solvers run fp32 from the same
task-arithmetic-like start. pymerge groups equal-shaped layers into one batched solve; for the regmean objective
it sums the Grams once (A X = X Σ G_m), where the seed's matvec sums M products per step. "same-matvec scipy"
gives scipy that precomputed sum too, to show how much of the gap is the solver itself.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pymerge.solvers import GramObjective, KFACObjective, conjugate_gradient  # noqa: E402


def layer_shapes(layers: int):
    """(k, d') -> count of layers with that shape, for `layers` MiniLM layers."""
    return {(384, 385): 4 * layers, (1536, 385): layers, (384, 1537): layers}


def spd_factor(n, rows, g, decay=2.0):
    """A Gram-like PSD matrix: (1/N) ZᵀZ of N rows with per-feature scales decaying over `decay` decades."""
    scales = torch.logspace(0, -decay, n)
    z = torch.randn(rows, n, generator=g) * scales
    return (z.T @ z) / rows


def make_problem(m_models, shapes, objective, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = {}
    for (k, d), count in shapes.items():
        base = torch.randn(count, k, d, generator=g) * 0.05
        thetas = torch.stack([base + 0.01 * torch.randn(count, k, d, generator=g) for _ in range(m_models)])
        a = torch.stack([torch.stack([spd_factor(d, 2 * d, g) for _ in range(count)]) for _ in range(m_models)])
        gout = None
        if objective == "kfac":
            gout = torch.stack([torch.stack([spd_factor(k, 2 * k, g, 1.0) for _ in range(count)])
                                for _ in range(m_models)])
        x0 = base + 0.3 * (thetas - base).sum(0)
        groups[(k, d)] = (thetas, a, gout, x0)
    return groups


# ---------------------------------------------------------------- pymerge
def run_pymerge(groups, objective, iterations, tolerance, device):
    out = {}
    for shape, (thetas, a, gout, x0) in groups.items():
        th = [t.to(device) for t in thetas]
        if objective == "regmean":
            obj = GramObjective(th, [x.to(device) for x in a])
        else:
            obj = KFACObjective(th, [x.to(device) for x in a], [x.to(device) for x in gout])
        res = conjugate_gradient(obj.matvec, obj.b, x0.to(device), iterations=iterations, tolerance=tolerance)
        out[shape] = (res.x, res.iterations, obj)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


# ---------------------------------------------------------------- the seed's approach
def run_scipy(groups, objective, iterations, tolerances, same_matvec=False):
    """scipy cg per layer; tolerances: per shape, per layer relative residual (0: run all iterations)."""
    from scipy.sparse.linalg import LinearOperator, cg

    out = {}
    for shape, (thetas, a, gout, x0) in groups.items():
        k, d = shape
        m_models, count = thetas.shape[0], thetas.shape[1]
        xs, its = [], []
        for i in range(count):
            am = [a[m, i] for m in range(m_models)]
            gm = [gout[m, i] for m in range(m_models)] if gout is not None else None
            a_sum = sum(am) if same_matvec else None

            def apply(x):
                if objective == "regmean":
                    return x @ a_sum if same_matvec else sum(x @ am_ for am_ in am)
                return sum(g_ @ x @ a_ for g_, a_ in zip(gm, am))

            def matvec(v):
                x = torch.tensor(np.asarray(v, dtype=np.float32)).reshape(k, d)  # numpy -> torch each step
                return apply(x).numpy().reshape(-1)                                # and back

            b = sum((thetas[m, i] @ am[m]) if objective == "regmean" else (gm[m] @ thetas[m, i] @ am[m])
                    for m in range(m_models)).numpy().reshape(-1)
            op = LinearOperator((k * d, k * d), matvec=matvec, dtype=np.float32)
            count_its = [0]
            x, _ = cg(op, b, x0=x0[i].numpy().reshape(-1), rtol=float(tolerances[shape][i]), atol=0.0,
                      maxiter=iterations, callback=lambda _: count_its.__setitem__(0, count_its[0] + 1))
            xs.append(torch.from_numpy(x.reshape(k, d)))
            its.append(count_its[0])
        out[shape] = (torch.stack(xs), its)
    return out


def relative_residuals(groups, objective, xs):
    """True ||b - A x|| / ||b|| per layer, recomputed in float64 (independent of either solver's recursion)."""
    res = {}
    for shape, (thetas, a, gout, _) in groups.items():
        th, x = thetas.double(), xs[shape].double().cpu()
        if objective == "regmean":
            b = (th @ a.double()).sum(0)
            ax = (x.unsqueeze(0) @ a.double()).sum(0)
        else:
            b = (gout.double() @ th @ a.double()).sum(0)
            ax = (gout.double() @ x.unsqueeze(0) @ a.double()).sum(0)
        res[shape] = ((b - ax).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))
    return res


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--layers", type=int, default=6, help="MiniLM layers' worth of linear layers")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--objectives", nargs="+", default=["regmean", "kfac"], choices=["regmean", "kfac"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="1 layer's worth, M = 3, 20 iterations")
    args = ap.parse_args()
    if args.quick:
        args.models, args.layers, args.iterations = [3], 1, 20
    device = torch.device(args.device)
    shapes = layer_shapes(args.layers)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}; load {os.getloadavg()[0]:.1f}")
    print(f"# layers: {sum(shapes.values())} ({', '.join(f'{c} x {s}' for s, c in shapes.items())}), "
          f"{args.iterations} iterations")
    print("| objective | M | scipy (seed) s | same-matvec scipy s | pymerge s | speed-up vs seed | vs same-matvec "
          "| equal residual: scipy s / pymerge s (its) | speed-up | max rel. residual scipy / pymerge |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for objective in args.objectives:
        for m in args.models:
            groups = make_problem(m, shapes, objective)
            zero = {s: [0.0] * c for s, c in shapes.items()}
            # equal iterations (tolerance 0: every solver runs all of them)
            py, t_py = timed(lambda: run_pymerge(groups, objective, args.iterations, 0.0, device))
            sp, t_sp = timed(lambda: run_scipy(groups, objective, args.iterations, zero))
            t_same = float("nan")  # kfac: no sum to precompute, the seed's matvec is already the same one
            if objective == "regmean":
                _, t_same = timed(lambda: run_scipy(groups, objective, args.iterations, zero, same_matvec=True))
            r_sp = relative_residuals(groups, objective, {s: v[0] for s, v in sp.items()})
            r_py = relative_residuals(groups, objective, {s: v[0] for s, v in py.items()})
            # equal residual: pymerge runs until it is at least as accurate as scipy was after its iterations
            # (the tightest layer of each shape sets the batch's tolerance); scipy re-run to its own residual
            tol = min(float(r.min()) for r in r_sp.values())
            py2, t_py2 = timed(lambda: run_pymerge(groups, objective, 3 * args.iterations, tol, device))
            r_py2 = relative_residuals(groups, objective, {s: v[0] for s, v in py2.items()})
            its2 = max(v[1] for v in py2.values())
            worst_sp = max(float(r.max()) for r in r_sp.values())
            worst_py = max(float(r.max()) for r in r_py.values())
            worst_py2 = max(float(r.max()) for r in r_py2.values())
            reached = "" if worst_py2 <= worst_sp * 1.05 else " NOT reached"
            print(f"| {objective} | {m} | {t_sp:.2f} | {t_same:.2f} | {t_py:.2f} | **{t_sp / t_py:.1f}x** | "
                  f"{t_same / t_py:.1f}x | {t_sp:.2f} / {t_py2:.2f} ({its2}) | {t_sp / t_py2:.1f}x | "
                  f"{worst_sp:.1e} / {worst_py:.1e} (eq. res.: {worst_py2:.1e}{reached}) |", flush=True)
            del groups, py, sp, py2


if __name__ == "__main__":
    main()
