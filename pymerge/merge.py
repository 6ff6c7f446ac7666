"""The streaming merge engine: plan from headers only, then merge tensor by tensor into an atomic output.

    plan_merge(config)        opens every input lazily and validates names, shapes, dtypes, architectures and
                              Fisher files; no tensor data is read
    merge(config, out_dir)    streams the plan into a sharded safetensors checkpoint (+ heads/TASK.safetensors)
    merge_state_dicts(config) the same plan and methods, into dicts in memory (tests, small models)

Peak memory is a few tensors: each tensor is read from every input, merged and written before the next one.
Methods that are elementwise (average, task arithmetic, Fisher, DF-Merge) are further fed in row chunks of at
most `chunk_bytes`, so even a huge embedding matrix costs a bounded amount of memory. TIES (per-tensor top-k)
and DARE (masks keyed by flat element index) need whole tensors.

Parameters that are not shared by all models (task heads, differently sized rows) follow the head policy:
`heads: keep` (default) writes each model's head tensors to heads/<task>.safetensors (+ its config) and puts
the `config_from` model's head into the main checkpoint so `from_pretrained(out)` loads without missing
weights; `heads: drop` leaves them out. Tensors matching `head_patterns` are heads even when shared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from pymerge.config import MergeConfig, load_config
from pymerge.io.chunks import row_chunks
from pymerge.io.errors import CheckpointError, IncompatibleModelsError
from pymerge.io.reader import TensorSource, open_fisher, open_source
from pymerge.io.writer import COPIED_FILES, TOKENIZER_FILES, OutputDirectory, check_target, safe_task_name
from pymerge.methods.base import MergeMethod, PrepareInputs, TensorInputs, pattern_matches, resolve

# Config fields that must agree for two checkpoints to be one architecture.
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "n_embd", "n_layer", "n_head", "d_model", "num_layers", "num_heads", "d_ff")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_CHUNK_BYTES = 32 * 2**20
PREFETCH_BYTES = 512 * 2**20  # read the next tensor ahead only while both fit in this much memory
MAX_LISTED = 8


@dataclass
class PlanEntry:
    name: str                     # tensor name as in the models
    kind: str                     # "merge" (body), "copy" (non-float, taken from config_from), "head"
    shape: Tuple[int, ...]
    dtype: torch.dtype            # output dtype
    models: List[int] = field(default_factory=list)  # heads: which models have it
    base_name: Optional[str] = None


@dataclass
class MergePlan:
    config: MergeConfig
    models: List[TensorSource]
    base: Optional[TensorSource]
    aux: Dict[str, List[TensorSource]]
    entries: List[PlanEntry]
    config_index: Optional[int]              # model whose config/tokenizer/head go into the main output
    base_prefix: Tuple[str, str] = ("", "")  # (strip from model name, add) to get the base name
    ignored_base: List[str] = field(default_factory=list)

    @property
    def task_names(self) -> List[str]:
        return [m.name for m in self.config.models]

    def main_entries(self) -> List[PlanEntry]:
        keep = self.config.heads == "keep"
        return [e for e in self.entries
                if e.kind != "head" or (keep and self.config_index is not None and self.config_index in e.models)]

    def head_entries(self, i: int) -> List[PlanEntry]:
        if self.config.heads != "keep":
            return []
        return [e for e in self.entries if e.kind == "head" and i in e.models]

    def summary(self) -> Dict[str, Any]:
        kinds: Dict[str, int] = {}
        for e in self.entries:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return {"method": self.config.merge_method, "tensors": kinds, "heads_policy": self.config.heads,
                "base_prefix": self.base_prefix, "ignored_base_tensors": len(self.ignored_base)}


@dataclass
class MergeResult:
    out_dir: Optional[Path]
    state_dict: Dict[str, torch.Tensor]            # in-memory merges only
    heads: Dict[str, Dict[str, torch.Tensor]]      # in-memory merges only
    plan: MergePlan


# --------------------------------------------------------------------------------------------------
# planning (headers only)
# --------------------------------------------------------------------------------------------------
def _first(items, n=MAX_LISTED) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(str(i) for i in items[:n]) + more


def _check_architectures(sources: List[TensorSource]) -> None:
    ref = next((s for s in sources if s.config), None)
    if ref is None:
        return
    diffs = []
    for s in sources:
        if not s.config or s is ref:
            continue
        for k in ARCH_KEYS:
            if k in ref.config and k in s.config and ref.config[k] != s.config[k]:
                diffs.append(f"{k}: {ref.config[k]!r} in {ref.label} vs {s.config[k]!r} in {s.label}")
    if diffs:
        raise IncompatibleModelsError(f"models have different architectures: {_first(diffs)}")


def _base_prefix(models: List[TensorSource], base: TensorSource, names: List[str]) -> Tuple[str, str]:
    """How body names map to base names, e.g. ('bert.', '') for a BertModel base of *ForSequenceClassification."""
    base_keys = set(base.keys())
    cands = {("", "")}
    cands |= {(n.split(".")[0] + ".", "") for n in names if "." in n}
    cands |= {("", k.split(".")[0] + ".") for k in base_keys if "." in k}

    def score(c):
        strip, add = c
        return sum(1 for n in names if n.startswith(strip) and add + n[len(strip):] in base_keys)

    best = max(sorted(cands), key=lambda c: (score(c), c == ("", "")))
    return best if score(best) > 0 else ("", "")


def plan_merge(config: Union[MergeConfig, Mapping, str, Path], **overrides) -> MergePlan:
    """Validate the config, open all inputs lazily and decide the fate of every tensor. Reads no tensor data."""
    cfg = load_config(config)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    method = cfg.method
    models = [open_source(m.model, label=m.name, allow_pickle=cfg.allow_pickle) for m in cfg.models]
    base = None
    if cfg.base_model is not None:
        base = open_source(cfg.base_model.model, label=cfg.base_model.name, allow_pickle=cfg.allow_pickle)
    _check_architectures(models + ([base] if base is not None else []))

    names: List[str] = []
    seen = set()
    for m in models:
        for k in m.keys():
            if k not in seen:
                seen.add(k)
                names.append(k)

    prefix = ("", "")
    use_base = base is not None and method.needs_base
    if use_base:
        prefix = _base_prefix(models, base, names)

    def base_name(n: str) -> Optional[str]:
        strip, add = prefix
        if not n.startswith(strip):
            return None
        b = add + n[len(strip):]
        return b if b in base else None

    entries: List[PlanEntry] = []
    unshared: List[str] = []
    mixed: List[str] = []
    for n in names:
        have = [i for i, m in enumerate(models) if n in m]
        if any(pattern_matches(p, n) for p in cfg.head_patterns):
            entries.append(PlanEntry(n, "head", (), torch.float32, models=have))
            continue
        missing = [models[i].label for i in range(len(models)) if i not in have]
        if missing:
            unshared.append(f"{n!r} missing in {', '.join(missing)}")
            continue
        shapes = [m.shape(n) for m in models]
        if len(set(shapes)) > 1:
            unshared.append(f"{n!r} has shapes " + ", ".join(f"{tuple(s)} in {m.label}" for s, m in zip(shapes, models)))
            continue
        bn = None
        if use_base:
            bn = base_name(n)
            if bn is None:
                unshared.append(f"{n!r} missing in base model {base.label}")
                continue
            if base.shape(bn) != shapes[0]:
                unshared.append(f"{n!r} has shape {tuple(shapes[0])} in the models but {tuple(base.shape(bn))} "
                                f"in base model {base.label}")
                continue
        dtypes = [m.dtype(n) for m in models] + ([base.dtype(bn)] if bn else [])
        if any(d not in FLOAT_DTYPES for d in dtypes):
            entries.append(PlanEntry(n, "copy", tuple(shapes[0]), models[0].dtype(n), models=have))
            continue
        if len(set(dtypes)) > 1 and cfg.dtype is None:
            mixed.append(f"{n!r}: " + ", ".join(sorted({str(d) for d in dtypes})))
            continue
        entries.append(PlanEntry(n, "merge", tuple(shapes[0]), cfg.dtype or dtypes[0], base_name=bn))
    if unshared:
        raise IncompatibleModelsError(
            f"the models differ in {len(unshared)} tensor(s) that are not task heads: {_first(unshared)}. "
            f"Tensors matching head_patterns {cfg.head_patterns} are kept per task; add patterns for other "
            "task-specific tensors, or check that these models come from the same pretrained model")
    if mixed:
        raise IncompatibleModelsError(
            f"inputs have different dtypes for {len(mixed)} tensor(s): {_first(mixed)}. Set `dtype:` "
            "(e.g. float32) to cast every input explicitly")
    if not any(e.kind == "merge" for e in entries):
        raise IncompatibleModelsError("the models share no tensor that could be merged")

    ignored = []
    if use_base:
        mapped = {e.base_name for e in entries if e.base_name}
        ignored = [k for k in base.keys() if k not in mapped]

    aux = _open_aux(cfg, models, entries)
    config_index = 0
    if cfg.config_from is not None:
        config_index = next((i for i, m in enumerate(cfg.models) if m.name == cfg.config_from), None)
    plan = MergePlan(cfg, models, base, aux, entries, config_index, prefix, ignored)
    for e in entries:  # a head in the main checkpoint is the config_from model's (own dtype unless `dtype`)
        if e.kind == "head":
            owner = models[config_index if config_index in e.models else e.models[0]]
            e.shape = tuple(owner.shape(e.name))
            d = owner.dtype(e.name)
            e.dtype = cfg.dtype if cfg.dtype is not None and d.is_floating_point else d
    return plan


def _open_aux(cfg: MergeConfig, models: List[TensorSource], entries: List[PlanEntry]) -> Dict[str, List[TensorSource]]:
    """Open per-model file parameters (Fisher files) and check they match the models' names and shapes."""
    aux: Dict[str, List[TensorSource]] = {}
    method = cfg.method
    for p in method.params:
        if not p.is_file:
            continue
        sources = []
        for i, spec in enumerate(cfg.models):
            value = cfg.model_values(i)[p.name]
            label = f"{p.name} of {spec.name}"
            if p.file_format == "fisher":
                src = open_fisher(value, label=label)
            else:
                src = open_source(value, label=label)
                if isinstance(value, (str, Path)):
                    src.label = f"{label} ({value})"
            if method.fisher_mode is not None and src.metadata.get("mode") != method.fisher_mode:
                raise CheckpointError(
                    f"{src.label}: method {method.name!r} needs a Fisher of mode {method.fisher_mode!r}, "
                    f"got mode {src.metadata.get('mode')!r}")
            problems = []
            model_keys = set(models[i].keys())
            for e in entries:
                if e.kind != "merge":
                    continue
                key = method.aux_key(p.name, e.name)
                if key is None:
                    continue
                if key not in src:
                    problems.append(f"no entry for {key!r}")
                    continue
                err = method.aux_shape_error(p.name, e.name, e.shape, src.shape(key))
                if err:
                    problems.append(f"{key!r} {err}")
            foreign = [k for k in src.keys() if k not in model_keys]
            if foreign and type(method).aux_key is MergeMethod.aux_key:  # same-name side inputs only
                problems.append(f"names the model does not have: {_first(foreign, 3)}")
            if problems:
                raise IncompatibleModelsError(
                    f"{src.label} ({value}) does not match model {spec.name}: {_first(problems)}")
            sources.append(src)
        aux[p.name] = sources
    return aux


# --------------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------------
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


def _run(plan: MergePlan, sink, progress: bool, chunk_bytes: Optional[int], prefetch: bool = True) -> None:
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


class _MemorySink:
    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.main_names = {e.name for e in plan.main_entries()}
        self.state: Dict[str, List[torch.Tensor]] = {}
        self.heads: Dict[str, Dict[str, torch.Tensor]] = {}

    def main(self, name, t):
        self.state.setdefault(name, []).append(t)

    def head(self, i, name, t):
        if self.plan.config.heads != "keep":
            return
        self.heads.setdefault(self.plan.task_names[i], {})[name] = t
        if i == self.plan.config_index and name in self.main_names:
            self.state[name] = [t]

    def result(self):
        return {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in self.state.items()}


class _DiskSink:
    def __init__(self, plan: MergePlan, out: OutputDirectory):
        self.plan = plan
        self.ckpt = out.checkpoint([(e.name, e.dtype, e.shape) for e in plan.main_entries()],
                                   plan.config.max_shard_size)
        self.head_files = {}
        for i, task in enumerate(plan.task_names):
            es = plan.head_entries(i)
            if es:
                src = plan.models[i]
                self.head_files[i] = out.file(
                    f"heads/{safe_task_name(task)}.safetensors",
                    [(e.name, _head_dtype(plan, src, e), tuple(src.shape(e.name))) for e in es],
                    metadata={"pymerge_task": task})

    def main(self, name, t):
        self.ckpt.write(name, t)

    def head(self, i, name, t):
        if i in self.head_files:
            self.head_files[i].write(name, t)
            if i == self.plan.config_index and name in self.ckpt:
                self.ckpt.write(name, t)


def _head_dtype(plan, src, e):
    d = src.dtype(e.name)
    return plan.config.dtype if plan.config.dtype is not None and d.is_floating_point else d


def merge_state_dicts(config, *, progress: bool = False, chunk_bytes: Optional[int] = None) -> MergeResult:
    """Run a merge in memory: returns the main state dict and, per task, its head tensors (`heads: keep`)."""
    plan = plan_merge(config)
    sink = _MemorySink(plan)
    _run(plan, sink, progress, chunk_bytes)
    return MergeResult(None, sink.result(), sink.heads, plan)


def merge(config, out_dir, *, force: bool = False, progress: bool = True,
          chunk_bytes: Optional[int] = DEFAULT_CHUNK_BYTES, allow_pickle: Optional[bool] = None) -> MergeResult:
    """Merge as the config says into `out_dir` (a directory `from_pretrained` loads), atomically.

    `config` is a YAML path, a dict or a MergeConfig. An existing `out_dir` is replaced only with force=True.
    """
    check_target(out_dir, force)  # before any work
    plan = plan_merge(config, allow_pickle=allow_pickle)
    with OutputDirectory(out_dir, force=force) as out:
        sink = _DiskSink(plan, out)
        _run(plan, sink, progress, chunk_bytes)
        _write_side_files(plan, out)
        target = out.commit()
    return MergeResult(target, {}, {}, plan)


def _write_side_files(plan: MergePlan, out: OutputDirectory) -> None:
    cfg = plan.config
    src = plan.models[plan.config_index] if plan.config_index is not None else plan.base
    main_dtypes = {e.dtype for e in plan.entries if e.kind == "merge"}
    if src is not None and src.config is not None:
        config = dict(src.config)
        if len(main_dtypes) == 1:
            dtype_name = str(next(iter(main_dtypes))).replace("torch.", "")
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype_name
        out.write_json("config.json", config)
    dirs = [s.directory for s in [src, plan.base] + plan.models if s is not None and s.directory is not None]
    for d in dirs[:1]:
        out.copy_files(d, [f for f in COPIED_FILES if f != "config.json"])
    for d in dirs:  # the first input that has tokenizer files provides them
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            out.copy_files(d, TOKENIZER_FILES)
            break
    for i, task in enumerate(plan.task_names):
        if plan.head_entries(i) and plan.models[i].config is not None:
            out.write_json(f"heads/{safe_task_name(task)}.config.json", plan.models[i].config)
    out.write_json("pymerge_merge.json", _describe(plan))


def _describe(plan: MergePlan) -> Dict[str, Any]:
    cfg = plan.config

    def plain(v):
        if hasattr(v, "rules"):
            return [{"filter": p, "value": x} if p is not None else {"value": x} for p, x in v.rules]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)

    return {
        "merge_method": cfg.merge_method,
        "parameters": {k: plain(v) for k, v in cfg.values.items()},
        "models": [{"model": str(m.model) if isinstance(m.model, (str, Path)) else m.name, "name": m.name,
                    "parameters": {k: plain(v) for k, v in m.values.items()}} for m in cfg.models],
        "base_model": str(cfg.base_model.model) if cfg.base_model and isinstance(cfg.base_model.model, (str, Path))
        else None,
        "dtype": str(cfg.dtype).replace("torch.", "") if cfg.dtype else None,
        "heads": cfg.heads,
        "head_patterns": cfg.head_patterns,
        "summary": plan.summary(),
    }
