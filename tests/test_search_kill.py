"""`pymerge search` killed with SIGKILL and resumed with --resume ends where an uninterrupted run ends.

The search runs in a real child process (forked from a forkserver that imported torch once) on tiny BERT
checkpoints on disk. It is killed twice: once from outside
(kill -9 when its trial log holds a random number of finished evaluations), once in the middle of writing a
trial line (the driver writes half the line, fsyncs it and SIGKILLs itself: what kill -9 at that instant
leaves). Then --resume runs to the end. The final λ, metrics, report and whole trajectory equal the
uninterrupted run's, and the resumed runs evaluate exactly the evaluations missing from the log, never a
finished one again (the driver records every evaluation it starts).
"""
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from pymerge import cli
from tests import engine_models as em
from tests.search_configs import write_search_config

pytestmark = pytest.mark.usefixtures("one_thread")

N_INIT, N_ITER = 3, 4
N = N_INIT + N_ITER

# The search processes are forked from a multiprocessing forkserver that imported torch, transformers and
# pymerge once (a fresh interpreter per run would spend most of this test importing them). Each runs
# `pymerge search ...` (pymerge.cli.main) with two test hooks installed from outside the package: every
# evaluation the search starts is appended to `calls`, and with cut=j the trial log's append of trial j writes
# half its line, fsyncs, and the process SIGKILLs itself.
PRELOAD = ["torch", "transformers", "transformers.models.bert.modeling_bert",
           "transformers.models.bert.tokenization_bert", "pymerge.cli", "pymerge.search.api",
           "pymerge.search.config", "pymerge.engine", "tests.engine_models"]


def _search_process(argv, calls, cut, output):
    import torch

    from pymerge.search import log as trial_log
    from pymerge.search.objective import DFMergeObjective

    torch.set_num_threads(1)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    real_call, real_append = DFMergeObjective.__call__, trial_log.TrialLog.append

    def counted(self, lambdas):
        with open(calls, "a") as f:
            f.write(json.dumps([float(v) for v in lambdas]) + "\n")
        return real_call(self, lambdas)

    def append(self, record):
        if cut is not None and record.get("trial") == cut:
            line = (json.dumps(record, sort_keys=True) + "\n").encode()
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            os.fsync(self._file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real_append(self, record)

    DFMergeObjective.__call__ = counted
    trial_log.TrialLog.append = append
    sys.exit(cli.main([str(a) for a in argv]))


def _config(tmp_path, zoo):
    return write_search_config(
        tmp_path, zoo, topic_parameters="validation: topic-val.jsonl, test: topic-test.jsonl",
        parameters=f"optimizer: gp-ei, n_init: {N_INIT}, n_iter: {N_ITER}, fisher_examples: 3, seed: 4, "
                   "optimizer_options: {candidates: 128, restarts: 1}")


def _driver(argv, calls, cut=None):
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    proc = ctx.Process(target=_search_process, args=(argv, str(calls), cut, str(calls) + ".out"), daemon=True)
    proc.start()
    return proc


def _output(calls):
    path = Path(str(calls) + ".out")
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _finished_lines(log):
    """The complete trial lines of a log (the header and a half-written tail left out)."""
    if not log.exists():
        return []
    text = log.read_bytes()
    lines = text.split(b"\n")[:-1]  # after the last newline: an unfinished write
    return [json.loads(line) for line in lines if line and b'"header"' not in line]


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in records]


def test_search_killed_twice_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    zoo = em.build_zoo(tmp_path / "zoo")
    cfg = _config(tmp_path, zoo)
    ref_out = tmp_path / "ref"
    assert cli.main(["search", str(cfg), "-o", str(ref_out), "--no-progress"]) == 0
    capsys.readouterr()
    ref = json.loads((ref_out / "pymerge_search.json").read_text())
    ref_log = _finished_lines(tmp_path / "ref.trials.jsonl")
    assert len(ref["trials"]) == N and sorted(r["trial"] for r in ref_log) == list(range(N))
    lambdas = [r["lambdas"] for r in ref["trials"]]

    rng = random.Random()
    seed = rng.randrange(10 ** 6)
    rng = random.Random(seed)
    out, log = tmp_path / "out", tmp_path / "out.trials.jsonl"
    argv = ["search", cfg, "-o", out, "--no-progress"]

    # 1. kill -9 from outside once the log holds k finished evaluations
    k = rng.randrange(1, N - 2)
    proc = _driver(argv, tmp_path / "calls1")
    deadline = time.monotonic() + 300
    while len(_finished_lines(log)) < k and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.is_alive(), (seed, k, _output(tmp_path / "calls1"))  # (it ended before the kill)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, (seed, _output(tmp_path / "calls1"))
    first = _finished_lines(log)
    done = len(first)
    assert k <= done < N and not out.exists(), (seed, done)
    assert [r["trial"] for r in first] == list(range(done))
    assert _calls(tmp_path / "calls1")[:done] == lambdas[:done]

    # 2. --resume, killed in the middle of writing trial j's line
    j = rng.randrange(done, N)
    proc = _driver(argv + ["--resume"], tmp_path / "calls2", cut=j)
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL, (seed, _output(tmp_path / "calls2"))
    assert not log.read_bytes().endswith(b"\n"), "the log should end in a half-written line"
    second = _finished_lines(log)
    assert [r["trial"] for r in second] == list(range(j)), seed
    assert _calls(tmp_path / "calls2") == lambdas[done:j + 1], seed  # nothing finished is evaluated again

    # 3. --resume to the end
    proc = _driver(argv + ["--resume"], tmp_path / "calls3")
    proc.join(300)
    assert proc.exitcode == 0, (seed, _output(tmp_path / "calls3"))
    assert _calls(tmp_path / "calls3") == lambdas[j:], seed  # trial j's line never finished: evaluated again
    final = _finished_lines(log)
    assert [r["trial"] for r in final] == list(range(N)), seed  # each trial logged exactly once, in order
    assert log.read_bytes().endswith(b"\n") and log.read_bytes().count(b'"header"') == 1
    assert _strip(final) == _strip(ref_log), seed
    got = json.loads((out / "pymerge_search.json").read_text())
    assert got["best"] == ref["best"] and got["validation"] == ref["validation"] and got["test"] == ref["test"]
    assert _strip(got["trials"]) == _strip(ref["trials"]), seed
    # the elapsed search time goes on across the runs (the budget counts it): never backwards
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(final, final[1:]))
    assert "best λ" in _output(tmp_path / "calls3")
    # the written model is the uninterrupted run's
    ref_w, got_w = em.load_dir(ref_out), em.load_dir(out)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[n], got_w[n]) for n in ref_w)
