"""Executing a plan: stream tensor by tensor (row chunks for elementwise methods) from the inputs through the
method into a sink, reading the next tensor on a background thread while the current one is merged.

Peak memory is a few tensors: each tensor is read from every input, merged and written before the next one.
Methods that are elementwise (average, task arithmetic, Fisher, DF-Merge) are further fed in row chunks of at
most `chunk_bytes`, so even a huge embedding matrix costs a bounded amount of memory. TIES (per-tensor top-k)
and DARE (masks keyed by flat element index) need whole tensors.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from pymerge.engine.plan import MergePlan, PlanEntry
from pymerge.io.chunks import row_chunks
from pymerge.io.errors import CheckpointError
from pymerge.methods.base import PrepareInputs, TensorInputs, resolve

DEFAULT_CHUNK_BYTES = 32 * 2**20
PREFETCH_BYTES = 512 * 2**20  # read the next tensor ahead only while both fit in this much memory


def _check_values(t: torch.Tensor, label: str, name: str, fisher: bool = False) -> None:
    """NaN / Inf (and, for a Fisher, negative values) with one reduction pass and no temporary tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    finite = lo > float("-inf") and hi < float("inf")  # NaN fails both comparisons
    if not finite:
        what = "Fisher" if fisher else "weights"
        raise CheckpointError(f"{label}: {what} tensor {name!r} contains NaN or Inf")
    if fisher and lo < 0:
        raise CheckpointError(f"{label}: Fisher tensor {name!r} has negative values (a Fisher is >= 0)")


def _load_inputs(plan: MergePlan, e: PlanEntry, rows) -> Tuple[list, Optional[torch.Tensor], dict]:
    """Read (and check) every input of one tensor or row chunk; runs on the prefetch thread."""
    method, check = plan.config.method, plan.config.check_finite
    xs = []
    for m in plan.models:
        t = m.read(e.name, rows)
        if check:
            _check_values(t, m.label, e.name)
        xs.append(t.to(e.dtype) if t.dtype != e.dtype else t)
    base = None
    if method.needs_base:
        base = plan.base.read(e.base_name, rows)
        if check:
            _check_values(base, plan.base.label, e.base_name)
        if base.dtype != e.dtype:
            base = base.to(e.dtype)
    aux = {}
    for p, sources in plan.aux.items():
        key = method.aux_key(p, e.name)
        if key is None:  # no side input for this tensor
            aux[p] = [None] * len(sources)
            continue
        ts = [s.read(key, rows) for s in sources]
        if check:
            is_fisher = method.param(p).file_format == "fisher"
            for s, t in zip(sources, ts):
                _check_values(t, s.label, key, fisher=is_fisher)
        aux[p] = ts
    return xs, base, aux


def run_plan(plan: MergePlan, sink, progress: bool, chunk_bytes: Optional[int], prefetch: bool = True) -> None:
    """Merge every plan entry into `sink`. The inputs of the next tensor (chunk) are read on a background
    thread while the current one is merged (file reads and torch kernels release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    cfg, method = plan.config, plan.config.method
    globals_raw = cfg.global_values()
    models_raw = [cfg.model_values(i) for i in range(len(plan.models))]
    state = method.prepare(PrepareInputs(
        params=dict(globals_raw), model_params=models_raw, aux_sources=plan.aux,
        merged_names=[e.name for e in plan.entries if e.kind == "merge"]))
    owned = all(m.owned for m in plan.models)
    tasks = []  # (entry, rows, last chunk of the entry?)
    for e in plan.entries:
        chunks = row_chunks(e.shape, chunk_bytes) if e.kind == "merge" and method.elementwise else [None]
        tasks += [(e, rows, j == len(chunks) - 1) for j, rows in enumerate(chunks)]
    merge_ids = [j for j, (e, _, _) in enumerate(tasks) if e.kind == "merge"]
    per_elem = [len(plan.models) * torch.empty((), dtype=e.dtype).element_size()
                + (torch.empty((), dtype=e.dtype).element_size() if method.needs_base else 0)
                + 4 * sum(len(v) for v in plan.aux.values()) for e, _, _ in tasks]

    def task_bytes(j):
        e, rows, _ = tasks[j]
        n = 1
        for s in e.shape[1:]:
            n *= s
        return per_elem[j] * n * ((rows[1] - rows[0]) if rows else (e.shape[0] if e.shape else 1))

    # prefetch the next merge task only when it and the current one fit the budget together
    next_merge = {a: b for a, b in zip(merge_ids, merge_ids[1:]) if task_bytes(a) + task_bytes(b) <= PREFETCH_BYTES}

    bar = tqdm(total=len(plan.entries), desc=f"pymerge {method.name}", unit="tensor", disable=not progress)
    pending: Dict[int, Any] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        def fetch(j):
            if j not in pending:
                e, rows, _ = tasks[j]
                pending[j] = pool.submit(_load_inputs, plan, e, rows)

        try:
            for j, (e, rows, last) in enumerate(tasks):
                if e.kind == "head":
                    if cfg.heads == "keep":
                        for i in e.models:
                            t = plan.models[i].read(e.name)
                            if cfg.check_finite:
                                _check_values(t, plan.models[i].label, e.name)
                            if cfg.dtype is not None and t.is_floating_point():
                                t = t.to(cfg.dtype)
                            sink.head(i, e.name, t)
                elif e.kind == "copy":
                    sink.main(e.name, plan.models[plan.config_index or 0].read(e.name))
                else:
                    fetch(j)
                    if prefetch and j in next_merge:
                        fetch(next_merge[j])
                    xs, base, aux = pending.pop(j).result()
                    g = {k: resolve(v, e.name, k) for k, v in globals_raw.items()}
                    mp = [{k: resolve(v, e.name, k) for k, v in m.items() if k not in plan.aux} for m in models_raw]
                    out = method.merge_tensor(TensorInputs(e.name, xs, base, g, mp, aux, state, owned=owned))
                    del xs, base, aux
                    sink.main(e.name, out if out.dtype == e.dtype else out.to(e.dtype))
                    del out
                if last:
                    bar.update(1)
        finally:
            for f in pending.values():
                f.cancel()
    bar.close()
