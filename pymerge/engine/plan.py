"""Planning a merge from headers only: which tensor is merged, copied or kept as a task head, with which side
inputs. No tensor data is read, so `pymerge inspect` and every check before a long merge reuse it.

Parameters that are not shared by all models (task heads, differently sized rows) follow the head policy:
`heads: keep` (default) writes each model's head tensors to heads/<task>.safetensors (+ its config) and puts
the `config_from` model's head into the main checkpoint so `from_pretrained(out)` loads without missing
weights; `heads: drop` leaves them out. Tensors matching `head_patterns` are heads even when shared.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from pymerge.config import MergeConfig, load_config
from pymerge.io.errors import CheckpointError, IncompatibleModelsError
from pymerge.engine.tokenizer import apply_tokenizer_source
from pymerge.io.fingerprint import ModelFingerprints
from pymerge.io.reader import TensorSource, open_source
from pymerge.methods.base import ConfigError, MergeMethod, layer_depth, layer_index, pattern_matches
from pymerge.methods.layers import LayerInfo, SideInput, open_side_input

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
    layer: Optional[LayerInfo] = None  # merged with the other tensors of this layer (weight, then bias)
    depth: float = 0.0            # position over the layers in [0, 1] (values that vary across layers)
    compute_dtype: Optional[torch.dtype] = None  # inputs are cast to this (default: dtype); `out_dtype` differs


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
    side_inputs: Tuple[SideInput, ...] = ()                            # what the method reads, by kind
    layer_stats: Dict[str, List[Any]] = field(default_factory=dict)    # param -> per model LayerStatistics
    global_aux: Dict[str, TensorSource] = field(default_factory=dict)  # param -> one source (e.g. init model)
    layers: Dict[str, LayerInfo] = field(default_factory=dict)         # module -> layer merged as one unit
    unused_layers: List[str] = field(default_factory=list)  # statistics of layers the checkpoints do not store
    tokenizer: Any = None                    # tokenizer_source: the output tokenizer (engine/tokenizer.py)

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
                "base_prefix": self.base_prefix, "ignored_base_tensors": len(self.ignored_base),
                "side_inputs": [f"{s.param}: {s.kind}" for s in self.side_inputs],
                "layers_merged_together": len(self.layers), "statistics_unused": self.unused_layers}


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
    models, base, tokenizer = apply_tokenizer_source(cfg, models, base)

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

    config_index = 0
    if cfg.config_from is not None:
        config_index = next((i for i, m in enumerate(cfg.models) if m.name == cfg.config_from), None)
    plan = MergePlan(cfg, models, base, {}, entries, config_index, prefix, ignored, tokenizer=tokenizer)
    _open_side_inputs(plan)
    for e in entries:  # a head in the main checkpoint is the config_from model's (own dtype unless `dtype`)
        if e.kind == "head":
            owner = models[config_index if config_index in e.models else e.models[0]]
            e.shape = tuple(owner.shape(e.name))
            d = owner.dtype(e.name)
            e.dtype = cfg.dtype if cfg.dtype is not None and d.is_floating_point else d
    assign_depths(plan)
    apply_out_dtype(plan)
    return plan


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def num_layers(source: TensorSource, names: List[str]) -> Optional[int]:
    """The model's layer count: its config, else the highest numbered layer in the tensor names + 1."""
    for k in LAYER_COUNT_KEYS:
        if source.config and isinstance(source.config.get(k), int):
            return source.config[k]
    found = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else None


def assign_depths(plan: MergePlan) -> None:
    """Each entry's depth t for gradients: a stacked-slices source knows it per slice (mergekit), otherwise
    layer / (num_layers - 1), 0 outside the layers."""
    src = plan.models[0]
    by_source = getattr(src, "layer_depth", None)
    n = None if by_source else num_layers(src, [e.name for e in plan.entries])
    for e in plan.entries:
        e.depth = by_source(e.name) if by_source else layer_depth(e.name, n)


def apply_out_dtype(plan: MergePlan) -> None:
    """`out_dtype`: merge in the compute dtype, write float tensors in out_dtype (mergekit's dtype/out_dtype)."""
    out = getattr(plan.config, "out_dtype", None)
    if out is None:
        return
    for e in plan.entries:
        if e.dtype.is_floating_point:
            e.compute_dtype = e.dtype
            e.dtype = out


def _open_side_inputs(plan: MergePlan) -> None:
    """Open the side inputs the method declares (by kind) and check them against the models before any data is
    read: per-parameter files (Fisher, masks, a whole model) by name and shape; layer statistics (gram, kfac) by
    their layers' weight / bias names, orientation and shapes. Layer kinds turn each layer with statistics into
    one unit (weight then bias in the output order) that the method merges with `merge_layer`."""
    cfg, models, method = plan.config, plan.models, plan.config.method
    g = cfg.global_values()
    mv = [cfg.model_values(i) for i in range(len(models))]
    plan.side_inputs = tuple(method.side_inputs(g, mv))
    fingerprints = {spec_m.name: ModelFingerprints(m) for spec_m, m in zip(cfg.models, models)}
    for spec in plan.side_inputs:
        if spec.scope == "global":
            value = g.get(spec.param)
            if value is None:
                raise ConfigError(f"method {method.name!r} needs the parameter {spec.param!r}")
            src = open_side_input(spec, value, spec.param)
            _check_per_parameter(plan, spec, src, None, value, "the merge")
            plan.global_aux[spec.param] = src
            continue
        sources = []
        for i, spec_m in enumerate(cfg.models):
            value = mv[i].get(spec.param)
            label = f"{spec.param} of {spec_m.name}"
            if value is None:
                if not spec.optional:
                    raise ConfigError(f"model {spec_m.name}: method {method.name!r} needs parameter {spec.param!r} "
                                      f"(a {spec.kind} file)")
                sources.append(None)
                continue
            src = open_side_input(spec, value, label)
            if spec.kind in STATS_KINDS:
                check_stats_file(src, models[i], spec_m.name, method, spec.param, spec.kind,
                                 allow_foreign=cfg.allow_foreign_stats, fingerprints=fingerprints)
            if spec.per_layer:
                for m in src.check_model(models[i], spec_m.name):
                    if m not in plan.unused_layers:
                        plan.unused_layers.append(m)
            else:
                _check_per_parameter(plan, spec, src, i, value, f"model {spec_m.name}")
            sources.append(src)
        if spec.per_layer:
            plan.layer_stats[spec.param] = sources
        else:
            plan.aux[spec.param] = sources
    for param, sources in plan.layer_stats.items():
        _group_layers(plan, param, sources)


def _check_per_parameter(plan: MergePlan, spec, src, i: Optional[int], value, whose: str) -> None:
    method = plan.config.method
    if spec.kind in ("fisher", "masks") and method.fisher_mode is not None \
            and src.metadata.get("mode") != method.fisher_mode:
        raise CheckpointError(f"{src.label}: method {method.name!r} needs a Fisher of mode {method.fisher_mode!r}, "
                              f"got mode {src.metadata.get('mode')!r}")
    problems = []
    for e in plan.entries:
        if e.kind != "merge":
            continue
        key = method.aux_key(spec.param, e.name)
        if key is None:
            continue
        if key not in src:
            problems.append(f"no entry for {key!r}")
            continue
        err = method.aux_shape_error(spec.param, e.name, e.shape, src.shape(key))
        if err:
            problems.append(f"{key!r} {err}")
    if i is not None and spec.kind != "model":
        model_keys = set(plan.models[i].keys())
        foreign = [k for k in src.keys() if k not in model_keys]
        if foreign and type(method).aux_key is MergeMethod.aux_key:  # same-name side inputs only
            problems.append(f"names the model does not have: {_first(foreign, 3)}")
    if problems:
        raise IncompatibleModelsError(f"{src.label} does not match {whose}: {_first(problems)}")


def _group_layers(plan: MergePlan, param: str, sources) -> None:
    """Layers listed by every model's statistics whose weight (and bias) are merged tensors become units."""
    present = [s for s in sources if s is not None]
    if not present:
        return
    ref = present[0]
    for s in present[1:]:
        diff = sorted(set(ref.layers) ^ set(s.layers))
        if diff:
            raise IncompatibleModelsError(f"{s.label} and {ref.label} describe different layers: {_first(diff, 3)} "
                                          "(statistics of different architectures?)")
        for m, info in s.layers.items():
            if info != ref.layers[m]:
                raise IncompatibleModelsError(f"{s.label}: layer {m!r} is {info}, but {ref.label} says "
                                              f"{ref.layers[m]}")
    by_name = {e.name: e for e in plan.entries}
    for m, info in ref.layers.items():
        w = by_name.get(info.weight)
        b = by_name.get(info.bias) if info.bias is not None else None
        if w is None or w.kind != "merge" or (info.bias is not None and (b is None or b.kind != "merge")):
            continue  # e.g. a task head kept per model: not merged, its statistics are unused
        if m in plan.layers:
            raise ConfigError(f"layer {m!r} has statistics in two side inputs")
        plan.layers[m] = info
        w.layer = info
        if b is not None:  # the bias follows its weight, so the unit writes both in output order
            b.layer = info
            plan.entries.remove(b)
            plan.entries.insert(plan.entries.index(w) + 1, b)


# --------------------------------------------------------------------------------------------------
# statistics files paired with models; outputs against inputs
# --------------------------------------------------------------------------------------------------
STATS_KINDS = ("fisher", "masks", "gram", "kfac")


def stats_kind(metadata: Mapping[str, str]) -> Optional[str]:
    """fisher | masks | gram | kfac; files from before `kind` existed are fisher, or masks by their mode."""
    if metadata.get("kind"):
        return metadata["kind"]
    if metadata.get("pymerge_fisher") is not None:
        return "masks" if metadata.get("mode") == "masks" else "fisher"
    return None


def check_stats_file(src: TensorSource, model: TensorSource, model_name: str, method: MergeMethod, param: str,
                     want: Optional[str], *,
                     allow_foreign: bool = False, fingerprints: Optional[Dict[str, ModelFingerprints]] = None
                     ) -> None:
    """A statistics file must be of the kind the method takes, and computed on the model it is paired with:
    its stored structure fingerprint (names and shapes) must be the model's, and, unless the method says its
    statistics come from other points (DF-Merge), its weights fingerprint too. `allow_foreign` skips the
    fingerprints (not the kind)."""
    meta = src.metadata or {}
    have = stats_kind(meta)
    if want is not None and have is not None and have != want:
        hint = {"masks": " (a Fisher of mode 'masks', from `pymerge fisher --mode masks`)"}.get(want, "")
        if have == "masks":
            hint += "; a mask Fisher is merged with merge_method mask_fisher"
        raise CheckpointError(
            f"{src.label}: is a {have} statistics file (mode {meta.get('mode')!r}), but `{param}` of method "
            f"{method.name!r} takes a {want} file{hint}")
    if allow_foreign:
        return
    fingerprints = dict(fingerprints or {})
    mine = fingerprints.setdefault(model_name, ModelFingerprints(model))
    where = model_name if model.label == model_name else f"{model_name} ({model.label})"
    if getattr(src, "layers", None):  # layer statistics name modules; their parameters are the candidates
        keys = [n for info in src.layers.values() for n in (info.weight, info.bias) if n is not None]
    else:
        keys = list(src.keys()) if hasattr(src, "keys") else []

    def others(matches):
        hits = [n for n, fp in fingerprints.items() if n != model_name and matches(fp)]
        return (f"; it matches model {', '.join(hits)} of this merge (files swapped?)" if hits
                else "; it matches no model of this merge")

    override = ("Give each model its own file, or set `allow_foreign_stats: true` in the config "
                "(CLI: --allow-foreign-stats) if this is intended")
    stored = meta.get("structure")
    if stored and not mine.has_structure(stored, keys):
        raise IncompatibleModelsError(
            f"{src.label} was computed on a model of another structure than {where}: structure fingerprint "
            f"{stored} in the file, {next(mine.structures(keys))} for the model (names and shapes)"
            f"{others(lambda fp: fp.has_structure(stored, keys))}. {override}")
    stored = meta.get("weights")
    if stored and getattr(method, "stats_at_model_weights", True) and not mine.has_weights(stored, keys):
        raise IncompatibleModelsError(
            f"{src.label} was computed on other weights than model {where}: weights fingerprint {stored} "
            f"in the file, {next(mine.weights_candidates(keys))} for the model"
            f"{others(lambda fp: fp.has_weights(stored, keys))}. {override}")


def input_paths(plan: MergePlan) -> List[Tuple[str, Path]]:
    """Every input of a plan that lives on disk, as (what it is, path): models, base, side-input files,
    the config file."""
    cfg = plan.config
    found: List[Tuple[str, Path]] = []
    specs = list(cfg.models) + ([cfg.base_model] if cfg.base_model is not None else [])
    for spec in specs:
        if isinstance(spec.model, (str, os.PathLike)):
            what = "base model" if spec is cfg.base_model else f"model {spec.name}"
            found.append((what, Path(spec.model)))
    for i, spec in enumerate(cfg.models):
        for p in cfg.method.params:
            if p.is_file:
                value = cfg.model_values(i).get(p.name)
                if isinstance(value, (str, os.PathLike)):
                    found.append((f"{p.name} file of {spec.name}", Path(value)))
    for p in cfg.method.params:  # one file for the whole merge (e.g. mats' init_model)
        value = cfg.global_values().get(p.name) if p.is_file and p.scope == "global" else None
        if isinstance(value, (str, os.PathLike)):
            found.append((f"{p.name} file", Path(value)))
    if isinstance(getattr(cfg, "tokenizer_source", None), Path):  # a model directory (names stay strings)
        found.append(("tokenizer_source", cfg.tokenizer_source))
    if getattr(cfg, "source", None) is not None:
        found.append(("config file", Path(cfg.source)))
    # whatever the opened sources read (LoRA adapters, slices, wrapped models): the mechanism, not a list of keys
    named = [(f"model {spec.name}", src) for spec, src in zip(cfg.models, plan.models)]
    if plan.base is not None:
        named.append(("base model", plan.base))
    for param, sources in list(plan.aux.items()) + list(getattr(plan, "layer_stats", {}).items()):
        named += [(f"{param} file of {spec.name}", src) for spec, src in zip(cfg.models, sources) if src is not None]
    named += [(f"{param} file", src) for param, src in getattr(plan, "global_aux", {}).items()]
    for what, src in named:
        src = getattr(src, "source", src)  # layer statistics wrap a source
        if hasattr(src, "input_paths"):
            found += [(what, Path(p)) for p in src.input_paths()]
    return found


def check_outputs(plan: MergePlan, out_dir) -> None:
    """Before any work: every derived output file has its own name (two task names that map to one heads/ file
    are refused, naming both), and the output is not, does not contain and does not lie inside any input
    (symlinks resolved), with or without --force."""
    from pymerge.io.writer import check_not_input, safe_task_name

    seen: Dict[str, str] = {}
    for i, task in enumerate(plan.task_names):
        if not plan.head_entries(i):
            continue
        fname = f"heads/{safe_task_name(task)}.safetensors"
        key = fname.casefold()  # one file on case-insensitive filesystems
        if key in seen:
            raise IncompatibleModelsError(
                f"tasks {seen[key]!r} and {task!r} would both write their head to {fname}; give the models "
                "distinct `name`s (letters, digits, '.', '_' and '-' are kept, anything else becomes '_')")
        seen[key] = task
    check_not_input(out_dir, input_paths(plan))
