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
from pymerge.methods.layers import LayerInputs
from pymerge.ops import NonFiniteInputError

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


def _method_checks(plan: MergePlan, t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the method's merge_tensor checks this input for NaN / Inf itself (`MergeMethod.checks_finite`), so
    reading it needs no check pass of its own. Not when the cast to the compute dtype narrows it: a finite value
    could overflow to Inf there, and the error must describe the file's values."""
    widening = t.dtype == dtype or (dtype == torch.float32 and t.dtype in (torch.float16, torch.bfloat16))
    return plan.config.method.checks_finite and widening


def _read_model_tensors(plan: MergePlan, e: PlanEntry, rows, method_checks: bool = False):
    """Every model's (and the base model's) tensor `e`, checked and cast to the compute dtype. method_checks: the
    method may check them (see _method_checks); the third result says whether any check was left to it."""
    check = plan.config.check_finite
    dtype = e.compute_dtype or e.dtype
    left = False
    xs = []
    for m in plan.models:
        t = m.read(e.name, rows)
        if check and method_checks and _method_checks(plan, t, dtype):
            left = True
        elif check:
            _check_values(t, m.label, e.name)
        xs.append(t.to(dtype) if t.dtype != dtype else t)
    base = None
    if plan.config.method.needs_base:
        base = plan.base.read(e.base_name, rows)
        if check and method_checks and _method_checks(plan, base, dtype):
            left = True
        elif check:
            _check_values(base, plan.base.label, e.base_name)
        if base.dtype != dtype:
            base = base.to(dtype)
    return xs, base, left


def _merge_checked(plan: MergePlan, e: PlanEntry, method, inputs: TensorInputs) -> torch.Tensor:
    """method.merge_tensor; a NaN / Inf its own check found becomes the engine's CheckpointError naming the model
    (or base model) and tensor, as _check_values words it."""
    try:
        return method.merge_tensor(inputs)
    except NonFiniteInputError as err:
        if not inputs.check_finite:
            raise
        if err.arg == "pretrained":
            label, name = plan.base.label, e.base_name
        else:
            label, name = plan.models[err.index].label, e.name
        raise CheckpointError(f"{label}: weights tensor {name!r} contains NaN or Inf") from None


def _load_inputs(plan: MergePlan, e: PlanEntry, rows) -> Tuple[list, Optional[torch.Tensor], dict, bool]:
    """Read (and check) every input of one tensor or row chunk; runs on the prefetch thread. The last result:
    whether the finiteness check of the models / base is left to the method (MergeMethod.checks_finite)."""
    method, check = plan.config.method, plan.config.check_finite
    xs, base, left = _read_model_tensors(plan, e, rows, method_checks=True)
    aux = {}
    kinds = {s.param: s.kind for s in plan.side_inputs}
    for p, sources in plan.aux.items():
        key = method.aux_key(p, e.name)
        if key is None:  # no side input for this tensor
            aux[p] = [None] * len(sources)
            continue
        ts = [s.read(key, rows) if s is not None else None for s in sources]
        if check:
            for s, t in zip(sources, ts):
                if t is not None:
                    _check_values(t, s.label, key, fisher=kinds.get(p) in ("fisher", "masks"))
        aux[p] = ts
    for p, src in plan.global_aux.items():
        t = src.read(e.name, rows)
        if check:
            _check_values(t, src.label, e.name)
        aux[p] = [t.to(e.dtype) if t.dtype != e.dtype else t]
    return xs, base, aux, left


def _load_layer(plan: MergePlan, e: PlanEntry, bias: Optional[PlanEntry]):
    """Read one layer: every model's weight and bias, the base model's, and each model's layer statistics."""
    info = e.layer
    ws, bw, _ = _read_model_tensors(plan, e, None)
    bs, bb, _ = _read_model_tensors(plan, bias, None) if bias is not None else (None, None, False)
    stats = {p: [s.read_layer(info.module) if s is not None else None for s in sources]
             for p, sources in plan.layer_stats.items()}
    labels = {p: [s.label if s is not None else "-" for s in sources] for p, sources in plan.layer_stats.items()}
    extra = {}
    for p, src in plan.global_aux.items():
        extra[p] = (src.read(info.weight).to(e.dtype), src.read(info.bias).to(e.dtype) if bias is not None else None)
    return dict(weights=ws, biases=bs, base_weight=bw, base_bias=bb, stats=stats, labels=labels, extra=extra)


def _task_bytes(plan: MergePlan, e: PlanEntry, rows, bias: Optional[PlanEntry]) -> int:
    """Bytes one task reads: the models' (and base) tensors plus its side inputs by their kind and dtype."""
    def numel(shape, rows=None):
        n = 1
        for s in shape[1:]:
            n *= s
        return n * ((rows[1] - rows[0]) if rows else (shape[0] if shape else 1))

    size = torch.empty((), dtype=e.dtype).element_size()
    copies = len(plan.models) + (1 if plan.config.method.needs_base else 0)
    n = numel(e.shape, rows) + (numel(bias.shape) if bias is not None else 0)
    total = copies * size * n
    row_shape = (n,)
    for spec in plan.side_inputs:
        count = 1 if spec.scope == "global" else len(plan.models)
        if spec.per_layer:
            total += count * spec.nbytes(row_shape, e.layer) if e.layer is not None else 0
        elif e.layer is None or spec.scope == "global":
            total += count * spec.nbytes(row_shape)
    return total


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
    by_name = {e.name: e for e in plan.entries}
    tasks = []  # (entry, rows, last chunk of the entry?); a layer's bias rides with its weight
    for e in plan.entries:
        chunk = e.kind == "merge" and method.elementwise and e.layer is None
        chunks = row_chunks(e.shape, chunk_bytes) if chunk else [None]
        tasks += [(e, rows, j == len(chunks) - 1) for j, rows in enumerate(chunks)]

    def bias_of(e):
        return by_name[e.layer.bias] if e.layer is not None and e.layer.bias is not None else None

    def is_layer_lead(e):
        return e.layer is not None and e.name == e.layer.weight

    merge_ids = [j for j, (e, _, _) in enumerate(tasks)
                 if e.kind == "merge" and (e.layer is None or is_layer_lead(e))]
    nbytes = {j: _task_bytes(plan, tasks[j][0], tasks[j][1], bias_of(tasks[j][0])) for j in merge_ids}
    # prefetch the next merge task only when it and the current one fit the budget together
    next_merge = {a: b for a, b in zip(merge_ids, merge_ids[1:]) if nbytes[a] + nbytes[b] <= PREFETCH_BYTES}
    file_params = {p.name for p in method.params if p.is_file}

    bar = tqdm(total=len(plan.entries), desc=f"pymerge {method.name}", unit="tensor", disable=not progress)
    pending: Dict[int, Any] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        def fetch(j):
            if j not in pending:
                e, rows, _ = tasks[j]
                if is_layer_lead(e):
                    pending[j] = pool.submit(_load_layer, plan, e, bias_of(e))
                else:
                    pending[j] = pool.submit(_load_inputs, plan, e, rows)

        def resolved(name, depth=None):
            g = {k: resolve(v, name, k, depth) for k, v in globals_raw.items() if k not in file_params}
            mp = [{k: resolve(v, name, k, depth) for k, v in m.items() if k not in file_params} for m in models_raw]
            return g, mp

        try:
            for j, (e, rows, last) in enumerate(tasks):
                if e.kind == "head":
                    if cfg.heads == "keep":
                        for i in e.models:
                            t = plan.models[i].read(e.name)
                            if cfg.check_finite:
                                _check_values(t, plan.models[i].label, e.name)
                            out_dtype = getattr(cfg, "out_dtype", None) or cfg.dtype
                            if out_dtype is not None and t.is_floating_point():
                                t = t.to(out_dtype)
                            sink.head(i, e.name, t)
                elif e.kind == "copy":
                    sink.main(e.name, plan.models[plan.config_index or 0].read(e.name))
                elif e.layer is not None and not is_layer_lead(e):
                    pass  # a layer's bias: written with its weight
                elif e.layer is not None:
                    fetch(j)
                    if prefetch and j in next_merge:
                        fetch(next_merge[j])
                    g, mp = resolved(e.name, e.depth)
                    outs = method.merge_layer(LayerInputs(info=e.layer, params=g, model_params=mp, state=state,
                                                          **pending.pop(j).result()))
                    for part in [e] + ([bias_of(e)] if e.layer.bias is not None else []):
                        if part.name not in outs:
                            raise RuntimeError(f"{method.name}: merge_layer returned no {part.name!r}")
                        out = outs[part.name]
                        if tuple(out.shape) != tuple(part.shape):
                            raise RuntimeError(f"{method.name}: merge_layer returned {part.name!r} of shape "
                                               f"{tuple(out.shape)}, expected {tuple(part.shape)}")
                        sink.main(part.name, out if out.dtype == part.dtype else out.to(part.dtype))
                    del outs
                else:
                    fetch(j)
                    if prefetch and j in next_merge:
                        fetch(next_merge[j])
                    xs, base, aux, left = pending.pop(j).result()
                    g, mp = resolved(e.name, e.depth)
                    out = _merge_checked(plan, e, method, TensorInputs(e.name, xs, base, g, mp, aux, state,
                                                                       owned=owned, check_finite=left))
                    del xs, base, aux
                    sink.main(e.name, out if out.dtype == e.dtype else out.to(e.dtype))
                    del out
                if last:
                    bar.update(1)
        finally:
            for f in pending.values():
                f.cancel()
    bar.close()
