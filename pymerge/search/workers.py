"""Worker pools for `workers > 1`: each worker holds its own DFMergeObjective (its own working model, built
once), so per evaluation only λ goes to a worker and (metrics, objective, seconds) come back.

- backend "local": one spawned process per worker on this machine (one GPU each where there are several).
- backend "ray": one Ray actor per worker, on a Ray cluster (`ray_address`, e.g. "auto" or
  "ray://head:10001") or on a local Ray instance started here; an optional extra (`pip install pymerge[ray]`).
  Model paths must be readable on every node (nn.Modules are shipped once through Ray's object store).

Both give the loop (pymerge.search.loop.run_search) an executor-like `submit(fn, lambdas)` returning a
concurrent.futures.Future; the loop tells the optimiser in asked order, never in finishing order, so the
trajectory for one seed does not depend on the backend or on which worker finishes first.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from pymerge.errors import PymergeError

BACKENDS = ("local", "ray")
RAY_MISSING = "backend ray needs `pip install pymerge[ray]`"

_WORKER = None  # this worker process's own objective


class MissingExtraError(PymergeError, ImportError):
    """An optional extra that an option needs is not installed."""


def _build_worker(pretrained, finetuned, tasks, kwargs, device, threads: int) -> None:
    global _WORKER
    import torch

    from pymerge.search.objective import DFMergeObjective

    torch.set_num_threads(max(1, int(threads)))
    _WORKER = DFMergeObjective(pretrained, finetuned, tasks, **{**kwargs, "device": device})


def _init_worker(pretrained, finetuned, tasks, kwargs, devices, workers) -> None:
    device = devices.get() if devices is not None else kwargs.get("device")
    _build_worker(pretrained, finetuned, tasks, kwargs, device, (os.cpu_count() or 1) // workers)  # share the cores


def worker_evaluate(lambdas):
    """Evaluates in this worker's own objective (built once per worker), never in one sent with the call."""
    if _WORKER is None:
        raise RuntimeError("worker_evaluate runs only in a worker of make_pool (no worker objective here)")
    return _WORKER(lambdas)


def check_backend(backend: str, workers: int, ray_address=None, ray_options=None) -> None:
    """Before any work: a known backend, a worker count, Ray's settings, and Ray installed when it is asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    if ray_options is not None and not isinstance(ray_options, dict):
        raise ValueError(f"ray_options: expected a mapping of Ray actor options (num_cpus, num_gpus, ...), got "
                         f"{type(ray_options).__name__}")
    if ray_address is not None and not isinstance(ray_address, str):
        raise ValueError(f"ray_address: expected an address such as 'auto' or 'ray://head:10001', got "
                         f"{ray_address!r}")
    if backend == "ray":
        _import_ray()


def make_pool(backend: str, workers: int, pretrained, finetuned, tasks, kwargs, *, ray_address: Optional[str] = None,
              ray_options: Optional[dict] = None):
    """A pool of `workers` workers (None for one local worker: the caller evaluates in its own process)."""
    check_backend(backend, workers, ray_address, ray_options)
    if backend == "ray":
        return RayPool(workers, pretrained, finetuned, tasks, kwargs, address=ray_address, options=ray_options)
    if workers == 1:
        return None
    return _local_pool(workers, pretrained, finetuned, tasks, kwargs)


def _local_pool(workers: int, pretrained, finetuned, tasks, kwargs):
    """One spawned process per worker, each with its own working model (on its own GPU where there are
    several). Spawn, not fork: a forked child of a process whose OpenMP / CUDA threads are running can hang."""
    from concurrent.futures import ProcessPoolExecutor

    import torch
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    devices = None
    if kwargs.get("device") is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        devices = ctx.Queue()
        for w in range(workers):
            devices.put(f"cuda:{w % torch.cuda.device_count()}")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(pretrained, finetuned, tasks, kwargs, devices, workers))


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(RAY_MISSING) from exc
    return ray


class _RayWorker:
    """A Ray actor: builds its objective once, then runs `fn(*args)` (worker_evaluate(λ)) against it."""

    def __init__(self, setup, device, threads):
        pretrained, finetuned, tasks, kwargs = setup
        _build_worker(pretrained, finetuned, tasks, kwargs, device, threads)

    def call(self, fn, *args):
        return fn(*args)


class RayPool:
    """One Ray actor per worker. submit(fn, *args) runs fn(*args) in a free actor (the first free one, in order)
    and returns a concurrent.futures.Future. The models, tasks and settings go to the object store once and
    every actor reads them from there; afterwards each call carries only its arguments (λ).

    options: Ray actor options per worker (default {"num_cpus": 1}, plus one GPU per actor, or a share of one,
    when the cluster has GPUs); each actor runs torch with num_cpus threads. The Ray instance is started (or
    joined at `address`) when none is initialised in this process, and shut down again by shutdown()."""

    def __init__(self, workers: int, pretrained, finetuned, tasks, kwargs, *, address: Optional[str] = None,
                 options: Optional[dict] = None):
        check_backend("ray", workers, address, options)
        ray = _import_ray()
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kw = {}
            if address is None:  # a local instance: its workers import this very pymerge (a source tree too)
                import pymerge

                root = os.path.dirname(os.path.dirname(os.path.abspath(pymerge.__file__)))
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
                kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **kw)
        options = dict(options or {})
        options.setdefault("num_cpus", 1)
        if "num_gpus" not in options and kwargs.get("device") is None:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            if gpus > 0:
                options["num_gpus"] = min(1.0, gpus / workers)
        threads = max(1, int(options["num_cpus"]))
        setup = ray.put((pretrained, finetuned, tasks, kwargs))
        actor = ray.remote(_RayWorker).options(**options)
        self._actors = [actor.remote(setup, kwargs.get("device"), threads) for _ in range(workers)]
        self._busy = [0] * workers
        self._lock = threading.Lock()
        self.submitted = 0

    def submit(self, fn, *args):
        with self._lock:
            i = self._busy.index(min(self._busy))  # the first free actor (or the least loaded)
            self._busy[i] += 1
            self.submitted += 1
        future = self._actors[i].call.remote(fn, *args).future()

        def release(_):
            with self._lock:
                self._busy[i] -= 1

        future.add_done_callback(release)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        for actor in self._actors:
            try:
                self._ray.kill(actor)
            except Exception:  # already gone (its node died): nothing to release
                pass
        self._actors = []
        if self._started:
            self._ray.shutdown()
