"""pymerge.dfmerge / pymerge.search on tiny random BERT, GPT-2 and T5 with synthetic tasks."""
import json
import random

import os
import numpy as np
import pytest
import torch

import pymerge
from pymerge.eval.tasks import Task, TaskError, fisher_batches
from pymerge.fisher import estimate
from pymerge.search import loop, optimizers
from pymerge.search.api import REPORT_NAME, engine_config
from pymerge.search.log import TrialLogError
from pymerge.search.objective import DFMergeObjective, InsufficientMemoryError
from tests.search_models import InlinePool, bert_zoo, gpt2_zoo, t5_zoo

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(n_init=2, n_iter=2, fisher_examples=3, progress=False)


def _same_trials(a, b):
    """Equal but for the times (phase seconds and the search's elapsed seconds)."""
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in a]
    return strip == [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in b]


@pytest.mark.parametrize("zoo", [bert_zoo, gpt2_zoo, t5_zoo])
def test_end_to_end_merged_weights_equal_the_engine(zoo):
    """The in-place working model at the best λ equals the merge engine's dfmerge with the same Fishers, bit for
    bit; every task was scored and the trajectory has the paper's phases."""
    import pymerge.search.api as dfm

    base, fts, tasks = zoo()
    seen = {}
    real = dfm.DFMergeObjective

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["obj"] = self

    dfm.DFMergeObjective = Spy
    try:
        res = pymerge.dfmerge(base, fts, tasks, **FAST)
    finally:
        dfm.DFMergeObjective = real
    obj = seen["obj"]
    assert [t["phase"] for t in res.trials] == ["random", "random", "search", "search"]
    assert all(0.0 <= v <= 1.0 for v in res.lambdas) and len(res.lambdas) == len(tasks)
    assert set(res.validation) == {t.name for t in tasks}
    assert res.objective == pytest.approx(sum(res.validation.values()) / len(tasks))
    assert res.objective == max(t["objective"] for t in res.trials)
    plain = pymerge.merge_state_dicts(engine_config(obj, base, fts, res.lambdas, 1e-8)).state_dict
    for name, t in res.state_dict.items():
        assert torch.equal(t, plain[name]), name
    # the Fisher really is the one at θ_pre + λ_i τ_i: recompute it on a fresh copy of the fine-tuned model
    i, lam = 0, res.lambdas[0]
    import copy

    point = copy.deepcopy(fts[0])
    with torch.no_grad():
        for n, p in point.named_parameters():
            if n in obj.body_names:
                j = obj.body_names.index(n)
                p.copy_(pymerge.ops.weighted_sum([obj.finetuned[0][j], obj.pre[j]], [lam, 1 - lam]))
            p.requires_grad_(n in obj.body_names)
    ref = estimate(point, fisher_batches(point, tasks[0], 3), mode="exact", length_normalize=tasks[0].length_normalize)
    for n in obj.body_names:
        torch.testing.assert_close(res.fishers[i].tensors[n], ref.tensors[n], rtol=1e-5, atol=1e-10)


def test_best_model_written_through_the_engine_loads_with_each_head(tmp_path):
    from pymerge.io.heads import load_with_head

    base, fts, tasks = bert_zoo()
    res = pymerge.dfmerge(base, fts, tasks, out_dir=tmp_path / "out", **FAST)
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["best"]["lambdas"] == res.lambdas and report["test"] == res.test
    assert len(report["trials"]) == 4
    for i, task in enumerate(tasks):
        model = load_with_head(tmp_path / "out", task.name)
        got = pymerge.eval.tasks.evaluate(model, task, "test")
        assert got == res.test[task.name]
    with pytest.raises(FileExistsError):
        pymerge.dfmerge(base, fts, tasks, out_dir=tmp_path / "out", **FAST)


def test_same_seed_same_trajectory_and_other_seed_differs(tmp_path):
    base, fts, tasks = bert_zoo()
    runs = [pymerge.dfmerge(base, fts, tasks, seed=s, log=tmp_path / f"{k}.jsonl", **FAST).trials
            for k, s in enumerate((7, 7, 8))]
    assert _same_trials(runs[0], runs[1])
    assert [r["lambdas"] for r in runs[0]] != [r["lambdas"] for r in runs[2]]
    logged = [json.loads(line) for line in (tmp_path / "0.jsonl").read_text().splitlines()]
    assert "header" in logged[0] and _same_trials(logged[1:], runs[0])
    assert set(logged[1]["seconds"]) == {"fisher", "combine", "evaluate"}


@pytest.mark.parametrize("optimizer", ["gp-ucb", "TwoPointsDE"])
def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, optimizer):
    """Killed at a random evaluation (an exception mid-evaluation, plus a half-written last line as kill -9
    leaves it): the resumed run does not repeat finished evaluations and gives the same λ and metrics."""
    base, fts, tasks = bert_zoo()
    settings = dict(FAST, n_iter=3, optimizer=optimizer, seed=3)
    full = pymerge.dfmerge(base, fts, tasks, log=tmp_path / "full.jsonl", **settings)
    crash_at = random.Random(optimizer).randrange(1, 5)
    calls = {"n": 0}
    real = DFMergeObjective.__call__

    def flaky(self, lambdas):
        calls["n"] += 1
        if calls["n"] == crash_at + 1:
            raise KeyboardInterrupt("killed")
        return real(self, lambdas)

    monkeypatch.setattr(DFMergeObjective, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        pymerge.dfmerge(base, fts, tasks, log=tmp_path / "run.jsonl", **settings)
    with open(tmp_path / "run.jsonl", "ab") as f:
        f.write(b'{"trial": 99, "lambdas": [0.1')  # a write cut off by kill -9
    monkeypatch.setattr(DFMergeObjective, "__call__", real)
    evaluated = {"n": 0}

    def counting(self, lambdas):
        evaluated["n"] += 1
        return real(self, lambdas)

    monkeypatch.setattr(DFMergeObjective, "__call__", counting)
    with pytest.raises(FileExistsError, match="resume"):
        pymerge.dfmerge(base, fts, tasks, log=tmp_path / "run.jsonl", **settings)
    resumed = pymerge.dfmerge(base, fts, tasks, log=tmp_path / "run.jsonl", resume=True, **settings)
    assert evaluated["n"] == 5 - crash_at
    assert _same_trials(resumed.trials, full.trials)
    assert resumed.lambdas == full.lambdas and resumed.validation == full.validation and resumed.test == full.test
    with pytest.raises(TrialLogError, match="other settings"):
        pymerge.dfmerge(base, fts, tasks, log=tmp_path / "run.jsonl", resume=True, **dict(settings, seed=4))


def test_ablation_without_fisher_equals_general_task_arithmetic():
    base, fts, tasks = bert_zoo()
    res = pymerge.dfmerge(base, fts, tasks, use_fisher=False, **FAST)
    assert res.method == "general_task_arithmetic" and res.fishers == []
    plain = pymerge.merge_state_dicts({
        "merge_method": "general_task_arithmetic", "base_model": base,
        "models": [{"model": m, "name": t.name, "parameters": {"lambda": lam}}
                   for m, t, lam in zip(fts, tasks, res.lambdas)]}).state_dict
    for name, t in res.state_dict.items():
        assert torch.equal(t, plain[name]), name


def test_ablation_without_search_equals_fisher_merging():
    """λ_i = 1/M with Fishers at the fine-tuned models θ_i: the Fishers equal `estimate` on the fine-tuned models
    themselves, the weights equal the dfmerge method with λ = 1/M exactly and Fisher merging (eq. 4, fallback
    average) to float rounding (eq. 8 and eq. 4 are the same merge written differently)."""
    base, fts, tasks = bert_zoo()
    res = pymerge.dfmerge(base, fts, tasks, search=False, **FAST)
    assert res.lambdas == [0.5, 0.5] and len(res.trials) == 1
    fishers = []
    for m, t in zip(fts, tasks):
        for n, p in m.named_parameters():
            p.requires_grad_(not n.startswith("classifier"))
        fishers.append(estimate(m, fisher_batches(m, t, 3), mode="exact"))
    for f, g in zip(fishers, res.fishers):
        assert all(torch.equal(f.tensors[n], g.tensors[n]) for n in g.tensors)
    models = [{"model": m, "name": t.name, "parameters": {"fisher": f}} for m, t, f in zip(fts, tasks, fishers)]
    as_dfmerge = pymerge.merge_state_dicts({"merge_method": "dfmerge", "base_model": base, "parameters": {"lambda": 0.5},
                                            "models": models}).state_dict
    as_fisher = pymerge.merge_state_dicts({"merge_method": "fisher", "models": models,
                                           "parameters": {"fallback": "average"}}).state_dict
    for name, t in res.state_dict.items():
        assert torch.equal(t, as_dfmerge[name]), name
        torch.testing.assert_close(t, as_fisher[name], rtol=1e-5, atol=1e-6)


def test_gp_reaches_the_optimum_of_a_smooth_function_in_fewer_evaluations_than_random():
    def f(x):
        return float(np.exp(-((x[0] - 0.3) ** 2 + (x[1] - 0.7) ** 2) / 0.05))

    def evaluations_to_optimum(name, seed, budget=40):
        opt = optimizers.make_optimizer(name, 2, budget=budget, seed=seed,
                                        options={"n_init": 5, "candidates": 512, "restarts": 2}
                                        if name.startswith("gp") else None)
        for k in range(budget):
            cand = opt.ask()
            y = f(optimizers.values(cand))
            opt.tell(cand, -y)
            if y >= 0.97:
                return k + 1
        return budget + 1

    seeds = range(3)
    mean = {n: np.mean([evaluations_to_optimum(n, s) for s in seeds]) for n in ("gp-ei", "gp-ucb", "random")}
    assert mean["gp-ei"] < mean["random"] and mean["gp-ucb"] < mean["random"], mean


def test_any_nevergrad_optimizer_and_grid_by_name():
    base, fts, tasks = bert_zoo()
    for name in ("NGOpt", "RandomSearch"):
        res = pymerge.dfmerge(base, fts, tasks, optimizer=name, **dict(FAST, n_iter=1))
        assert len(res.trials) == 3
    # the grid walks a regular lattice in order: 2 steps per coordinate over [0.2, 0.6]
    opt = optimizers.make_optimizer("grid", 2, lo=0.2, hi=0.6, budget=4, options={"steps": 2})
    pts = []
    for _ in range(4):
        c = opt.ask()
        pts.append(optimizers.values(c))
        opt.tell(c, 0.0)
    assert pts == [[0.2, 0.2], [0.2, 0.6], [0.6, 0.2], [0.6, 0.6]]
    with pytest.raises(ValueError, match="unknown 'bogus'"):
        optimizers.make_optimizer("bogus", 2)


def test_patience_and_user_objective():
    base, fts, tasks = bert_zoo()
    res = pymerge.dfmerge(base, fts, tasks, patience=1, objective=lambda m: -abs(m["t0"] - 0.5),
                          **dict(FAST, n_iter=10))
    first_best = max(range(len(res.trials)), key=lambda k: (res.trials[k]["objective"], -k))
    assert len(res.trials) < 12 and len(res.trials) <= max(first_best + 2, 2)
    assert res.objective == -abs(res.validation["t0"] - 0.5)


@pytest.mark.slow  # two spawned processes import torch + transformers
def test_workers_evaluate_a_batch_in_processes_like_one_process(tmp_path):
    """workers=2: two spawned processes, each with its own working model, give the trajectory that the same
    batched ask / tell gives evaluated in this process."""
    base, fts, tasks = bert_zoo()
    obj = DFMergeObjective(base, fts, tasks, fisher_examples=3)
    # each worker runs with cpu_count // workers threads; floating-point sums depend on the thread count, so the
    # in-process reference uses the same (else a metric may flip at a decision boundary)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        inline = loop.run_search(obj, 2, n_init=2, n_iter=2, workers=2, pool=InlinePool(), progress=False, seed=5)
    finally:
        torch.set_num_threads(threads)
    import pymerge.search.api as dfm

    seen, real = {}, dfm.DFMergeObjective

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["obj"] = self

    dfm.DFMergeObjective = Spy  # in this process only: the spawned workers import the real class
    try:
        res = pymerge.dfmerge(base, fts, tasks, workers=2, seed=5, log=tmp_path / "w.jsonl", **FAST)
    finally:
        dfm.DFMergeObjective = real
    # the parent's objective never went to a worker: pickling it for torch.multiprocessing would have moved its
    # working body and scratch into shared memory, which concurrent workers then overwrite together (a race)
    parent = seen["obj"]
    assert not any(p.is_shared() for p in parent.model.parameters())
    assert not any(t.is_shared() for t in parent._scratch)
    assert _same_trials(res.trials, inline)


def test_the_objective_refuses_pickling_and_the_pool_gets_the_worker_function():
    """A DFMergeObjective sent to a process would share its in-place working model with every worker; the loop
    submits pool_evaluate (the worker's own objective) instead."""
    import pickle

    from concurrent.futures import Future

    base, fts, tasks = bert_zoo()
    obj = DFMergeObjective(base, fts, tasks, fisher_examples=3)
    with pytest.raises(TypeError, match="DFMergeObjective is not picklable"):
        pickle.dumps(obj)
    submitted = []

    class Recording:
        def submit(self, fn, *args):
            submitted.append(fn)
            fut = Future()
            fut.set_result(obj(*args))
            return fut

    def remote(lam):
        raise AssertionError("only submitted, never called here")

    loop.run_search(obj, 2, n_init=2, n_iter=0, workers=2, pool=Recording(), pool_evaluate=remote, progress=False)
    assert submitted == [remote, remote]


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    base, fts, tasks = bert_zoo()
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* GiB .* only 0.00 GiB"):
        pymerge.dfmerge(base, fts, tasks, memory_limit=1000, **FAST)
    with pytest.raises(ValueError, match="expected 2 tasks"):
        pymerge.dfmerge(base, fts, tasks[:1], **FAST)
    wrong = Task("t1", [{"input_ids": [3, 4], "label": 2}] * 3)  # model 1 has a 2-class head
    with pytest.raises(TaskError, match="label 2 out of range for a head with 2 outputs"):
        pymerge.dfmerge(base, fts, [tasks[0], wrong], **FAST)
    mc = Task("mc", [{"input_ids": [3], "choices": [[1], [2]], "label": 0}], kind="multiple_choice")
    with pytest.raises(TaskError, match="language-model head"):
        pymerge.dfmerge(base, fts, [tasks[0], mc], **FAST)
    with pytest.raises(ValueError, match="names must be unique"):
        pymerge.dfmerge(base, fts, [tasks[0], tasks[0]], **FAST)
    (tmp_path / "log.jsonl").write_text('{"header": {}}\nnot json\n{"trial": 1}\n')
    with pytest.raises(TrialLogError, match="log.jsonl:2: not valid JSON"):
        pymerge.dfmerge(base, fts, tasks, log=tmp_path / "log.jsonl", resume=True, **FAST)


class _FakeClock:
    """Seconds that pass only when a fake evaluation says so (no timing in the test)."""

    def __init__(self, t0):
        self.t = t0

    def __call__(self):
        return self.t


def _timed_evaluate(clock, fail_at=None):
    """A smooth objective whose evaluation takes 1 to 2 fake seconds depending on the point (multiples of 0.25,
    so every sum of them is exact), and that can crash at its fail_at-th call."""
    calls = []

    def evaluate(lam):
        calls.append(list(lam))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        clock.t += 1.0 + 0.25 * int(lam[0] * 4)
        value = -((lam[0] - 0.3) ** 2 + (lam[1] - 0.6) ** 2)
        return {"a": value}, value, {"fisher": 0.5, "combine": 0.0, "evaluate": 0.5}

    return evaluate, calls


BUDGETED = dict(optimizer="gp-ucb", n_init=3, n_iter=30, seed=2, time_budget=7.0, progress=False,
                options={"candidates": 64, "restarts": 1})


def test_time_budget_counts_the_time_logged_before_a_resume(tmp_path):
    """The budget is the search's own time summed over its runs: a run crashed at a random evaluation and
    resumed (with a clock that starts anywhere) stops at the trial where the uninterrupted run stopped, with the
    same elapsed times; it does not start a fresh budget."""
    clock = _FakeClock(100.0)
    evaluate, _ = _timed_evaluate(clock)
    full = loop.run_search(evaluate, 2, log_path=tmp_path / "full.jsonl", clock=clock, **BUDGETED)
    assert 4 <= len(full) < 33  # the budget stopped it, not n_iter
    assert full[-1]["elapsed"] >= 7.0 > full[-2]["elapsed"]
    assert full[0]["elapsed"] == 1.0 + 0.25 * int(full[0]["lambdas"][0] * 4)
    for crash_at in sorted({random.Random(9).randrange(2, len(full)), len(full) - 1}):
        log = tmp_path / f"crash{crash_at}.jsonl"
        clock = _FakeClock(5000.0)
        evaluate, _ = _timed_evaluate(clock, fail_at=crash_at)
        with pytest.raises(KeyboardInterrupt):
            loop.run_search(evaluate, 2, log_path=log, clock=clock, **BUDGETED)
        clock = _FakeClock(-7.25)
        evaluate, calls = _timed_evaluate(clock)
        resumed = loop.run_search(evaluate, 2, log_path=log, resume=True, clock=clock, **BUDGETED)
        assert resumed == full, crash_at  # λ, metrics, objective, phase, seconds and elapsed
        assert calls == [r["lambdas"] for r in full[crash_at - 1:]]  # only the unfinished ones
    # a resume with a larger budget goes on from where the budget stopped it
    clock = _FakeClock(0.0)
    evaluate, calls = _timed_evaluate(clock)
    longer = loop.run_search(evaluate, 2, log_path=tmp_path / "full.jsonl", resume=True, clock=clock,
                             **dict(BUDGETED, time_budget=10.0))
    assert longer[:len(full)] == full and len(longer) > len(full) and len(calls) == len(longer) - len(full)
    assert longer[-1]["elapsed"] >= 10.0 > longer[-2]["elapsed"]


def test_time_budget_of_a_log_without_elapsed_counts_its_phase_seconds(tmp_path):
    """A log written before "elapsed" existed: the time already spent is the sum of its phase seconds (1 s per
    trial here), so with a 4 s budget the resumed search ends after the fourth trial."""
    clock = _FakeClock(0.0)
    evaluate, _ = _timed_evaluate(clock, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        loop.run_search(evaluate, 2, log_path=tmp_path / "old.jsonl", clock=clock, **BUDGETED)
    lines = (tmp_path / "old.jsonl").read_text().splitlines()
    old = [json.loads(line) for line in lines]
    for rec in old[1:]:
        del rec["elapsed"]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    clock = _FakeClock(0.0)
    evaluate, calls = _timed_evaluate(clock)
    resumed = loop.run_search(evaluate, 2, log_path=tmp_path / "old.jsonl", resume=True, clock=clock,
                              **dict(BUDGETED, time_budget=4.0))
    assert len(resumed) == 4 and len(calls) == 2


class _ReversedPool:
    """An executor whose futures finish in the reverse order of their submission: once no point has come for
    a moment, the pending ones are resolved last-submitted first, each only after the loop has taken the
    result of the one before (so the loop sees them finish one by one)."""

    def __init__(self):
        import threading

        self.pending, self.lock = [], threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._resolve, daemon=True)
        self.thread.start()

    def submit(self, fn, *args):
        import threading
        from concurrent.futures import Future

        class Observed(Future):
            def result(self, timeout=None):
                try:
                    return super().result(timeout)
                finally:
                    self.taken.set()

        fut = Observed()
        fut.taken = threading.Event()
        with self.lock:
            self.pending.append((fut, fn, args))
        self.wake.set()
        return fut

    def _resolve(self):
        import time

        while not self.closed:
            if not self.wake.wait(0.05):
                continue
            self.wake.clear()
            time.sleep(0.02)  # more of the batch may come
            if self.wake.is_set():
                continue
            with self.lock:
                batch, self.pending = self.pending, []
            for fut, fn, args in reversed(batch):
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # a crash in a worker reaches the loop through its future
                    fut.set_exception(exc)
                fut.taken.wait(10)


def test_a_batch_is_told_in_asked_order_whichever_worker_finishes_first(tmp_path):
    """The trajectory of workers=3 does not depend on the order the workers finish in: evaluated in a pool that
    finishes each batch backwards, it equals the one evaluated in order; the log shows the finishing order."""
    def evaluate(lam):
        value = -((lam[0] - 0.3) ** 2 + (lam[1] - 0.6) ** 2)
        return {"a": value}, value, {"fisher": 0.0, "combine": 0.0, "evaluate": 0.0}

    settings = dict(optimizer="gp-ei", n_init=3, n_iter=5, seed=1, workers=3, progress=False,
                    options={"candidates": 64, "restarts": 1})
    ordered = loop.run_search(evaluate, 2, pool=InlinePool(), **settings)
    pool = _ReversedPool()
    try:
        backwards = loop.run_search(evaluate, 2, pool=pool, log_path=tmp_path / "log.jsonl", **settings)
    finally:
        pool.closed = True
    assert _same_trials(backwards, ordered) and len(ordered) == 8
    logged = [json.loads(line)["trial"] for line in (tmp_path / "log.jsonl").read_text().splitlines()[1:]]
    assert logged == [2, 1, 0, 5, 4, 3, 7, 6]


def test_backend_ray_without_ray_installed_is_a_clear_error(monkeypatch):
    import sys

    from pymerge.search.workers import MissingExtraError

    base, fts, tasks = bert_zoo()
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingExtraError, match=r"backend ray needs `pip install pymerge\[ray\]`"):
        pymerge.dfmerge(base, fts, tasks, workers=2, backend="ray", **FAST)
    with pytest.raises(ValueError, match="backend: expected one of local, ray, got 'dask'"):
        pymerge.dfmerge(base, fts, tasks, backend="dask", **FAST)
    with pytest.raises(ValueError, match="ray_options: expected a mapping"):
        pymerge.dfmerge(base, fts, tasks, backend="ray", ray_options=4, **FAST)


def test_a_crash_in_the_middle_of_a_batch_resumes_only_the_unfinished_points(tmp_path):
    """workers=3, the batch finishing backwards: a crash after some of a batch finished (logged out of trial
    order) resumes with only the missing points of that batch evaluated, and the uninterrupted trajectory."""
    def evaluator(fail_at=None):
        calls = []

        def evaluate(lam):
            calls.append(list(lam))
            if len(calls) == fail_at:
                raise KeyboardInterrupt("killed")
            value = -((lam[0] - 0.3) ** 2 + (lam[1] - 0.6) ** 2)
            return {"a": value}, value, {"fisher": 0.0, "combine": 0.0, "evaluate": 0.0}

        return evaluate, calls

    settings = dict(optimizer="gp-ucb", n_init=3, n_iter=5, seed=2, workers=3, progress=False,
                    options={"candidates": 64, "restarts": 1})
    evaluate, _ = evaluator()
    full = loop.run_search(evaluate, 2, pool=InlinePool(), **settings)
    evaluate, _ = evaluator(fail_at=5)  # batch 2 (trials 3, 4, 5) runs backwards: 5 finishes, 4 crashes
    pool = _ReversedPool()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_search(evaluate, 2, pool=pool, log_path=tmp_path / "log.jsonl", **settings)
    finally:
        pool.closed = True
    logged = [json.loads(line)["trial"] for line in (tmp_path / "log.jsonl").read_text().splitlines()[1:]]
    assert logged == [2, 1, 0, 5]
    evaluate, calls = evaluator()
    resumed = loop.run_search(evaluate, 2, pool=InlinePool(), log_path=tmp_path / "log.jsonl", resume=True, **settings)
    assert _same_trials(resumed, full)
    assert calls == [full[3]["lambdas"], full[4]["lambdas"]] + [r["lambdas"] for r in full[6:]]
