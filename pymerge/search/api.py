"""`pymerge.dfmerge(pretrained, finetuned, tasks, ...)`: the DF-Merge coefficient search end to end.

Search λ on the validation sets (DFMergeObjective + run_search), re-evaluate the best λ (deterministic: the
same Fishers and weights as its trial), score the test sets, and write the best merged model through the merge
engine (`pymerge.merge` with method dfmerge and the Fishers at the best λ, or general_task_arithmetic for the
no-Fisher ablation): a Hugging Face directory with heads/<task>.safetensors per task, plus a JSON report.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from pymerge.eval.metrics import metric_name
from pymerge.eval.tasks import Task
from pymerge.search.loop import best_trial, run_search
from pymerge.search.objective import DFMergeObjective
from pymerge.search.workers import check_backend, make_pool, worker_evaluate

REPORT_NAME = "pymerge_search.json"


@dataclass
class DFMergeResult:
    lambdas: List[float]                      # best coefficients λ
    objective: float                          # their validation objective
    validation: Dict[str, float]              # per-task validation metric at the best λ
    test: Dict[str, Optional[float]]          # per-task test metric (None: the task has no test set)
    trials: List[dict]                        # the trajectory (trial log records, in order)
    best_trial: int
    method: str                               # "dfmerge" | "general_task_arithmetic" (no-Fisher ablation)
    state_dict: Dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # merged body at best λ (CPU)
    fishers: list = field(repr=False, default_factory=list)  # pymerge.fisher.Fisher per task at the best λ
    out_dir: Optional[Path] = None
    report: dict = field(repr=False, default_factory=dict)

    @property
    def test_mean(self) -> Optional[float]:
        vals = [v for v in self.test.values() if v is not None]
        return sum(vals) / len(vals) if vals else None


# ------------------------------------------------------------------------------------------ output
def _atomic_json(path: Path, obj, force: bool) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists; pass force=True (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _fisher_for_engine(obj: DFMergeObjective, i: int):
    """Task i's Fisher keyed as the engine reads the model: tied aliases (GPT-2's lm_head.weight) included."""
    from pymerge.fisher import Fisher

    fisher = obj.fisher_objects[i]
    tensors = dict(fisher.tensors)
    ptr_to_name = {p.data_ptr(): n for n, p in zip(obj.body_names, obj._params)}
    for name, t in obj.model.state_dict().items():
        if name not in tensors and t.data_ptr() in ptr_to_name:
            tensors[name] = tensors[ptr_to_name[t.data_ptr()]]
    return Fisher(tensors, dict(fisher.metadata))


def engine_config(obj: DFMergeObjective, pretrained, finetuned, lambdas, eps: float) -> dict:
    """The merge-engine config that writes the working model's current merge (dfmerge with the last Fishers,
    or general task arithmetic when the search ran without Fisher)."""
    models = []
    for i, (src, task) in enumerate(zip(finetuned, obj.tasks)):
        params = {"lambda": float(lambdas[i])}
        if obj.use_fisher:
            params["fisher"] = _fisher_for_engine(obj, i)
        models.append({"model": src, "name": task.name, "parameters": params})
    cfg = {"merge_method": "dfmerge" if obj.use_fisher else "general_task_arithmetic", "base_model": pretrained,
           "models": models, "heads": "keep"}
    if obj.use_fisher:
        cfg["parameters"] = {"eps": eps}
        # these Fishers were just estimated on the working model (body of θ_pre + λ_i τ_i, the head of the task
        # swapped in), so their pairing with the models is known; their fingerprints describe the working model
        cfg["allow_foreign_stats"] = True
    return cfg


# ------------------------------------------------------------------------------------------ the API
def dfmerge(pretrained, finetuned: Sequence, tasks: Sequence[Task], *, optimizer: str = "gp-ei", n_init: int = 10,
            n_iter: int = 50, bounds=(0.0, 1.0), seed: int = 0, beta: Optional[float] = None,
            xi: Optional[float] = None, optimizer_options: Optional[dict] = None, fisher_examples: int = 30,
            use_fisher: bool = True, search: bool = True,
            objective: Optional[Callable[[Dict[str, float]], float]] = None, patience: Optional[int] = None,
            time_budget: Optional[float] = None, workers: int = 1, backend: str = "local",
            ray_address: Optional[str] = None, ray_options: Optional[dict] = None, device=None,
            log: Union[str, os.PathLike, None] = None, resume: bool = False, overwrite: bool = False,
            out_dir: Union[str, os.PathLike, None] = None, force: bool = False, report: Union[str, os.PathLike, None] = None,
            progress: bool = True, eps: float = 1e-8, batch_size: Optional[int] = None,
            memory_limit: Optional[int] = None, fisher_options: Optional[dict] = None) -> DFMergeResult:
    """DF-Merge (Lee et al. 2025): search λ ∈ [lo, hi]^M maximising the mean validation metric (or `objective`)
    of θ_pre + M Σ F_i λ_i τ_i / Σ F_i with F_i the exact Fisher at θ_pre + λ_i τ_i on `fisher_examples`
    unlabelled inputs of task i.

    pretrained / finetuned: nn.Modules or model directories; tasks[i] is fine-tuned model i's task (its head
    comes from that model). optimizer: "gp-ei" | "gp-ucb" (n_init random points then n_iter GP steps; beta /
    xi set UCB's β and EI's ξ) | "grid" | any nevergrad name (budget n_init + n_iter). Ablations: use_fisher=False
    (general task arithmetic with searched λ); search=False (Fisher merging: λ_i = 1/M, Fishers at θ_i).
    workers > 1: a batch of `workers` points per ask, each evaluated by its own worker holding its own working
    model: backend "local" (a spawned process per worker) or "ray" (a Ray actor per worker, on the cluster at
    ray_address or a local Ray instance; ray_options: actor options such as num_cpus / num_gpus; needs
    `pip install pymerge[ray]`; with Ray every evaluation runs in an actor, workers=1 included). Same results
    for one seed whatever the backend (pymerge.search.workers).
    fisher_options: extra arguments of `pymerge.fisher.estimate` (e.g. batched_backward, max_rounds_per_backward).
    patience: stop after that many evaluations without improvement (past the random points); time_budget:
    seconds of search, counted across resumes from the log's "elapsed" (pymerge.search.loop), so a resumed
    search stops where the uninterrupted one would.
    log: JSONL trial log (resume=True continues it after a crash). out_dir: write the best merged model (HF
    directory, heads per task) and the report there (REPORT_NAME) atomically; report: the JSON report elsewhere.
    """
    tasks = list(tasks)
    finetuned = list(finetuned)
    check_backend(backend, workers, ray_address, ray_options)  # before any work
    if out_dir is not None:
        from pymerge.io.writer import check_target

        check_target(out_dir, force)  # before any work
    options = dict(optimizer_options or {})
    if beta is not None:
        options["beta"] = float(beta)
    if xi is not None:
        options["xi"] = float(xi)
    kwargs = dict(fisher_examples=fisher_examples, use_fisher=use_fisher, objective=objective, device=device,
                  eps=eps, batch_size=batch_size, memory_limit=memory_limit, fisher_options=fisher_options)
    obj = DFMergeObjective(pretrained, finetuned, tasks, **kwargs)
    M = len(tasks)
    header = {"tasks": [t.name for t in tasks], "metrics": [metric_name(t.metric) for t in tasks],
              "fisher_examples": fisher_examples, "use_fisher": use_fisher, "search": search, "eps": eps,
              "objective": "mean" if objective is None else metric_name(objective)}
    if search:
        pool = make_pool(backend, workers, pretrained, finetuned, tasks, kwargs, ray_address=ray_address,
                         ray_options=ray_options)
        try:
            trials = run_search(obj, M, optimizer=optimizer, n_init=n_init, n_iter=n_iter, bounds=bounds, seed=seed,
                                options=options, log_path=log, header=header, resume=resume, overwrite=overwrite,
                                patience=patience, time_budget=time_budget, workers=workers, pool=pool,
                                pool_evaluate=worker_evaluate, progress=progress, remote_always=backend == "ray")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        best = best_trial(trials)
        lambdas, fisher_at = [float(v) for v in best["lambdas"]], None
    else:  # Fisher merging: λ_i = 1/M, each Fisher at the fine-tuned model θ_i = θ_i(1)
        lambdas, fisher_at = [1.0 / M] * M, [1.0] * M
        best = None
    metrics, value, seconds = obj.evaluate_fixed(lambdas, fisher_at=fisher_at)
    if best is None:
        best = {"trial": 0, "lambdas": lambdas, "metrics": metrics, "objective": value, "phase": "search",
                "seconds": seconds, "elapsed": sum(seconds.values())}
        trials = [best]
        if log is not None:
            from pymerge.search.log import open_log

            log_file, _ = open_log(log, {**header, "optimizer": None, "lambdas": lambdas}, resume=False,
                                   overwrite=overwrite or resume)
            with log_file:
                log_file.append(best)
    elif metrics != best["metrics"]:
        import warnings

        warnings.warn(f"re-evaluating the best λ {lambdas} gave {metrics}, not its logged {best['metrics']}: the "
                      "evaluation is not deterministic here (GPU kernels?) or the log comes from other models / data")
    test = {}
    for i, task in enumerate(tasks):
        if task.test is None:
            test[task.name] = None
        else:
            obj.use_head(i)
            from pymerge.eval.tasks import evaluate

            test[task.name] = evaluate(obj.model, task, "test", batch_size)
    method = "dfmerge" if use_fisher else "general_task_arithmetic"
    fishers = list(obj.fisher_objects) if use_fisher else []
    rep = {"method": method, "ablation": None if use_fisher and search else
           ("no_fisher" if not use_fisher else "no_search"),
           "tasks": [t.name for t in tasks], "settings": {**header, "optimizer": optimizer if search else None,
                                                          "n_init": n_init, "n_iter": n_iter, "seed": seed,
                                                          "bounds": list(map(float, bounds)), "options": options},
           "best": {"trial": best["trial"], "lambdas": lambdas, "objective": float(value)},
           "validation": metrics, "test": test,
           "test_mean": (sum(v for v in test.values() if v is not None) / max(1, sum(v is not None for v in test.values())))
           if any(v is not None for v in test.values()) else None,
           "trials": trials}
    result = DFMergeResult(lambdas, float(value), metrics, test, trials, int(best["trial"]), method,
                           obj.merged_state(), fishers, None, rep)
    if out_dir is not None:
        import pymerge

        cfg = engine_config(obj, pretrained, finetuned, lambdas, eps)
        merged = pymerge.merge(cfg, out_dir, force=force, progress=progress)
        result.out_dir = merged.out_dir
        _atomic_json(Path(merged.out_dir) / REPORT_NAME, rep, force=True)
    if report is not None:
        _atomic_json(Path(report), rep, force=force or overwrite)
    return result
