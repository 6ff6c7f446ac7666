"""Planning a merge from headers only: which tensor is merged, copied or kept as a task head, with which side
inputs. No tensor data is read, so `pymerge inspect` and every check before a long merge reuse it.

Parameters that are not shared by all models (task heads, differently sized rows) follow the head policy:
`heads: keep` (default) writes each model's head tensors to heads/<task>.safetensors (+ its config) and puts
the `config_from` model's head into the main checkpoint so `from_pretrained(out)` loads without missing
weights; `heads: drop` leaves them out. Tensors matching `head_patterns` are heads even when shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from pymerge.config import MergeConfig, load_config
from pymerge.io.errors import CheckpointError, IncompatibleModelsError
from pymerge.io.reader import TensorSource, open_fisher, open_source
from pymerge.methods.base import MergeMethod, pattern_matches

# Config fields that must agree for two checkpoints to be one architecture.
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "n_embd", "n_layer", "n_head", "d_model", "num_layers", "num_heads", "d_ff")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
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


def _first(items, n=MAX_LISTED) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(str(i) for i in items[:n]) + more


def check_architectures(sources: List[TensorSource]) -> None:
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


def base_prefix(models: List[TensorSource], base: TensorSource, names: List[str]) -> Tuple[str, str]:
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


@dataclass
class TensorSurvey:
    """The fate of every tensor name, with every difference found (not only the first): the rules `plan_merge`
    enforces and `pymerge inspect` reports."""

    names: List[str]
    entries: List[PlanEntry]
    heads: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)        # absent in some model (not a head)
    shapes: List[str] = field(default_factory=list)         # shapes differ between the models
    base_missing: List[str] = field(default_factory=list)   # no counterpart in the base model
    base_shapes: List[str] = field(default_factory=list)    # shape differs from the base model's
    mixed_dtypes: List[str] = field(default_factory=list)   # dtypes differ and no `dtype:` casts them
    prefix: Tuple[str, str] = ("", "")

    @property
    def unshared(self) -> List[str]:
        return self.missing + self.shapes + self.base_missing + self.base_shapes


def tensor_names(models: List[TensorSource]) -> List[str]:
    """Every tensor name of the models, in first-seen order."""
    names: List[str] = []
    seen = set()
    for m in models:
        for k in m.keys():
            if k not in seen:
                seen.add(k)
                names.append(k)
    return names


def survey_tensors(models: List[TensorSource], base: Optional[TensorSource], head_patterns,
                   dtype: Optional[torch.dtype] = None) -> TensorSurvey:
    """Classify every tensor name as merge / copy / head, and collect every reason one cannot be merged."""
    names = tensor_names(models)
    prefix = base_prefix(models, base, names) if base is not None else ("", "")

    def base_name(n: str) -> Optional[str]:
        strip, add = prefix
        if not n.startswith(strip):
            return None
        b = add + n[len(strip):]
        return b if b in base else None

    sv = TensorSurvey(names, [], prefix=prefix)
    for n in names:
        have = [i for i, m in enumerate(models) if n in m]
        if any(pattern_matches(p, n) for p in head_patterns):
            sv.entries.append(PlanEntry(n, "head", (), torch.float32, models=have))
            sv.heads.append(n)
            continue
        missing = [models[i].label for i in range(len(models)) if i not in have]
        if missing:
            sv.missing.append(f"{n!r} missing in {', '.join(missing)}")
            continue
        shapes = [m.shape(n) for m in models]
        if len(set(shapes)) > 1:
            sv.shapes.append(f"{n!r} has shapes " + ", ".join(f"{tuple(s)} in {m.label}" for s, m in zip(shapes, models)))
            continue
        bn = None
        if base is not None:
            bn = base_name(n)
            if bn is None:
                sv.base_missing.append(f"{n!r} missing in base model {base.label}")
                continue
            if base.shape(bn) != shapes[0]:
                sv.base_shapes.append(f"{n!r} has shape {tuple(shapes[0])} in the models but "
                                      f"{tuple(base.shape(bn))} in base model {base.label}")
                continue
        dtypes = [m.dtype(n) for m in models] + ([base.dtype(bn)] if bn else [])
        if any(d not in FLOAT_DTYPES for d in dtypes):
            sv.entries.append(PlanEntry(n, "copy", tuple(shapes[0]), models[0].dtype(n), models=have))
            continue
        if len(set(dtypes)) > 1 and dtype is None:
            sv.mixed_dtypes.append(f"{n!r}: " + ", ".join(sorted({str(d).replace('torch.', '') for d in dtypes})))
            continue
        sv.entries.append(PlanEntry(n, "merge", tuple(shapes[0]), dtype or dtypes[0], base_name=bn))
    return sv


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
    check_architectures(models + ([base] if base is not None else []))

    use_base = base is not None and method.needs_base
    sv = survey_tensors(models, base if use_base else None, cfg.head_patterns, cfg.dtype)
    entries, prefix, unshared, mixed = sv.entries, sv.prefix, sv.unshared, sv.mixed_dtypes
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
