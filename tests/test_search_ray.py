"""The Ray backend of the search (pymerge[ray]) against a local Ray instance: one actor per worker holding its
own working model, only λ sent per evaluation, and the trajectory of the in-process batched search."""
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


import pymerge  # noqa: E402
from pymerge.search import loop, workers  # noqa: E402
from pymerge.search.objective import DFMergeObjective  # noqa: E402
from tests.search_models import InlinePool, bert_zoo, worker_probe as probe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# slow: a Ray instance and two actor processes that import torch + transformers; one thread, as each actor runs
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    # the actors import this checkout's pymerge and tests
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()




FAST = dict(n_init=2, n_iter=2, fisher_examples=3, progress=False)


def test_ray_workers_hold_their_models_and_give_the_trajectory_of_the_in_process_search(local_ray, tmp_path,
                                                                                          monkeypatch):
    base, fts, tasks = bert_zoo()
    obj = DFMergeObjective(base, fts, tasks, fisher_examples=3)
    inline = loop.run_search(obj, 2, n_init=2, n_iter=2, workers=2, pool=InlinePool(), progress=False, seed=5)
    sent, probes = [], []
    real_submit, real_shutdown = workers.RayPool.submit, workers.RayPool.shutdown

    def spy(self, fn, *args):
        sent.append((fn, args))
        return real_submit(self, fn, *args)

    def shutdown(self, *a, **k):  # before the actors go: ask each which objective it holds, twice
        for _ in range(2):
            probes.append(sorted(f.result(timeout=300) for f in [real_submit(self, probe), real_submit(self, probe)]))
        probes.append(self._started)
        return real_shutdown(self, *a, **k)

    monkeypatch.setattr(workers.RayPool, "submit", spy)
    monkeypatch.setattr(workers.RayPool, "shutdown", shutdown)
    res = pymerge.dfmerge(base, fts, tasks, workers=2, backend="ray", seed=5, log=tmp_path / "r.jsonl", **FAST)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in inline]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in res.trials] == strip
    # every evaluation went to an actor, carrying only the worker function and λ
    assert len(sent) == len(res.trials) == 4
    assert all(fn is workers.worker_evaluate and len(args) == 1 and all(type(v) is float for v in args[0])
               for fn, args in sent)
    assert [list(args[0]) for _, args in sent] == [r["lambdas"] for r in res.trials]
    # one actor per worker, each a process of its own holding the objective it built once (two probes: the same
    # objects), with num_cpus threads; the Ray instance it did not start is left running
    first, again, started = probes
    assert len({pid for pid, *_ in first}) == 2 and os.getpid() not in {pid for pid, *_ in first}
    assert first == again and not started
    assert all(need == obj.memory_needed and threads == 1 for _, _, need, threads in first)
    assert ray.is_initialized()
    # the backend is not one of the search's settings: the finished log resumes with the local backend,
    # evaluating nothing again, and agrees
    before = (tmp_path / "r.jsonl").read_bytes()
    resumed = pymerge.dfmerge(base, fts, tasks, workers=2, seed=5, log=tmp_path / "r.jsonl", resume=True, **FAST)
    assert (tmp_path / "r.jsonl").read_bytes() == before
    assert resumed.lambdas == res.lambdas and resumed.validation == res.validation
