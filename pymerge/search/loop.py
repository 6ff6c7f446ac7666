"""The ask / evaluate / tell loop: trial log, resume, patience, wall-clock budget, progress bar, batches.

`run_search(evaluate, dimension, ...)` maximises `evaluate(lambdas) -> (metrics, objective, seconds)`.
With workers > 1 the optimiser is asked for a batch of `workers` points, evaluated by
`pool.submit(pool_evaluate, lambdas)` (a concurrent.futures executor, or pymerge.search.workers' Ray actor pool),
told in asked order whichever worker finishes first. For a process pool, pool_evaluate must be a module-level
function that evaluates in the worker's own state: submitting `evaluate` itself would pickle it (and its working
model) with every point. On resume the logged trials are replayed: the optimiser is asked as before (asks are
deterministic given the seed and the history told) and told the logged objective; only missing trials are
evaluated, so the run ends where an uninterrupted run ends.

The wall-clock budget (time_budget seconds) counts the search's own time across resumes: every trial record
carries "elapsed", the search's seconds when it finished (a resumed run continues from the largest logged
value; time lost to a kill, after the last finished evaluation, and model loading before the loop are not
counted). Before each ask the budget is compared with the elapsed of the last finished evaluation, a number in
the log, so a resumed search stops exactly where the uninterrupted one did, and a resume with a larger budget
goes on.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Callable, Dict, List, Optional, Tuple

from pymerge.search import optimizers
from pymerge.search.log import TrialLogError, elapsed, open_log

Evaluation = Tuple[Dict[str, float], float, Dict[str, float]]


def _same_point(a: List[float], b: List[float]) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


def run_search(evaluate: Callable[[List[float]], Evaluation], dimension: int, *, optimizer: str = "gp-ei",
               n_init: int = 10, n_iter: int = 50, bounds=(0.0, 1.0), seed: int = 0,
               options: Optional[dict] = None, log_path=None, header: Optional[dict] = None, resume: bool = False,
               overwrite: bool = False, patience: Optional[int] = None, time_budget: Optional[float] = None,
               workers: int = 1, pool=None, pool_evaluate: Optional[Callable] = None, progress: bool = True,
               describe: Optional[Callable] = None, remote_always: bool = False,
               clock: Callable[[], float] = time.monotonic) -> List[dict]:
    """Runs the search; returns the trial records in order. Budget: n_init + n_iter evaluations (for the GP,
    n_init random points then n_iter acquisition steps; for other optimisers, the total), fewer with patience
    or time_budget (seconds, see the module doc). With a pool, a batch with a single point left to evaluate is
    evaluated here unless remote_always (the workers hold the devices). clock: seconds (tests inject a fake)."""
    for name, v in (("n_init", n_init), ("n_iter", n_iter)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
    if n_init + n_iter < 1:
        raise ValueError("n_init + n_iter: the search needs at least one evaluation")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    if workers > 1 and pool is None:
        raise ValueError("workers > 1 needs a pool (an executor with submit())")
    remote = evaluate if pool_evaluate is None else pool_evaluate
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience: expected a positive integer, got {patience!r}")
    if time_budget is not None and not (float(time_budget) > 0):
        raise ValueError(f"time_budget: expected seconds > 0, got {time_budget!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    budget = n_init + n_iter
    options = dict(options or {})
    key = optimizers.resolve_name(optimizer)
    if key in ("PymergeGPEI", "PymergeGPUCB"):
        options.setdefault("n_init", n_init)
    opt = optimizers.make_optimizer(optimizer, dimension, lo=lo, hi=hi, budget=budget, seed=seed, workers=workers,
                                    options=options)
    full_header = {"optimizer": key, "options": options, "seed": seed, "bounds": [lo, hi], "dimension": dimension,
                   "n_init": n_init, "n_iter": n_iter, "workers": workers, "patience": patience, **(header or {})}
    log, logged = (None, {}) if log_path is None else open_log(log_path, full_header, resume=resume,
                                                                overwrite=overwrite)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, desc=f"search ({key})", unit="eval", dynamic_ncols=True)
    trials: List[dict] = []
    best, since_best = -math.inf, 0
    # the search clock: this run counts from its first evaluation on, after the log's largest elapsed
    summed, offset = 0.0, 0.0
    for t in sorted(logged):
        offset = max(offset, elapsed(logged[t], summed))
        summed += sum(float(v) for v in logged[t]["seconds"].values())
    start: List[float] = []
    spent, summed = 0.0, 0.0  # elapsed of the last finished trial (replayed or new); summed phase seconds

    def now() -> float:
        if not start:
            start.append(clock())
        return offset + clock() - start[0]

    try:
        k = 0
        while k < budget:
            if patience is not None and since_best >= patience and k >= n_init:
                break
            if time_budget is not None and spent >= float(time_budget):
                break
            cands = [opt.ask() for _ in range(min(workers, budget - k))]
            records: List[Optional[dict]] = [None] * len(cands)
            todo = []
            for j, cand in enumerate(cands):
                lam = optimizers.values(cand)
                rec = logged.get(k + j)
                if rec is not None:
                    if not _same_point([float(v) for v in rec["lambdas"]], lam):
                        raise TrialLogError(f"{log_path}: trial {k + j} was {rec['lambdas']} but the optimiser now "
                                            f"asks {lam}: the log comes from other settings or another version")
                    records[j] = rec
                else:
                    todo.append((j, lam))

            def finish(j, lam, result):
                metrics, objective, seconds = result
                rec = {"trial": k + j, "lambdas": lam, "metrics": {t: float(v) for t, v in metrics.items()},
                       "objective": float(objective), "phase": optimizers.phase(key, k + j, options),
                       "seconds": {s: float(v) for s, v in seconds.items()}, "elapsed": now()}
                if log is not None:
                    log.append(rec)
                records[j] = rec

            if todo:
                now()  # the clock starts with the first evaluation of this run (the replay is not counted again)
            if pool is None or (len(todo) <= 1 and not remote_always):
                for j, lam in todo:
                    finish(j, lam, evaluate(lam))
            else:
                futures = {pool.submit(remote, lam): (j, lam) for j, lam in todo}
                pending = set(futures)
                while pending:  # log each as it finishes: a kill loses only the unfinished ones
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in sorted(done, key=lambda f: futures[f][0]):
                        j, lam = futures[fut]
                        finish(j, lam, fut.result())
            for cand, rec in zip(cands, records):
                value = float(rec["objective"])
                opt.tell(cand, -value if math.isfinite(value) else 5e20)
                if value > best + 1e-12:
                    best, since_best = value, 0
                else:
                    since_best += 1
                trials.append(rec)
                spent = max(spent, elapsed(rec, summed))
                summed += sum(float(v) for v in rec["seconds"].values())
                if bar is not None:
                    best_rec = max(trials, key=lambda r: r["objective"])
                    lam_txt = ",".join(f"{v:.3f}" for v in best_rec["lambdas"])
                    bar.set_postfix_str(f"best={best:.4f} λ=[{lam_txt}]" + (f" {describe(rec)}" if describe else ""),
                                        refresh=False)
                    bar.update(1)
            k += len(cands)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return trials


def best_trial(trials: List[dict]) -> dict:
    """The trial with the highest objective (the first one on ties)."""
    if not trials:
        raise ValueError("no trials")
    return max(trials, key=lambda r: (r["objective"], -r["trial"]))
