"""Merge configuration (YAML in the spirit of mergekit's), validated completely before any tensor is read.

    merge_method: ties
    base_model: ./base
    models:
      - model: ./ft-sentiment
        name: sentiment                      # task name (heads/sentiment.safetensors); default: directory name
        parameters: {weight: 0.6, fisher: ./ft-sentiment.fisher.safetensors}
      - model: ./ft-topic
    parameters: {density: 0.2, lambda: 1.0}  # global values; also defaults of per-model parameters
    dtype: float32                           # cast inputs and output (needed when input dtypes differ)
    heads: keep                              # keep | drop  (task-specific parameters, see head_patterns)
    head_patterns: [classifier.*, score.*]
    config_from: sentiment                   # whose config.json / tokenizer files are copied (default: first)
    max_shard_size: 2GB
    allow_pickle: false
    check_finite: true
    allow_foreign_stats: false               # accept Fisher / statistics files computed on another model
    out_dtype: bfloat16                      # written dtype, when it differs from the compute `dtype`
    tokenizer_source: base                   # base | union | a model (name or path): tokenizer + embeddings

mergekit's forms are accepted where the features overlap (see `pymerge.mergekit_compat`): `slices` with
`sources` / `layer_range` instead of `models`, the base model listed among `models`, `model: PATH+ADAPTER`
(a LoRA adapter merged into PATH through PEFT first), `tokenizer: {source: ...}`.

Relative paths in a YAML file are relative to the file's directory; in a dict, to the working directory.
In Python, `model` may also be an nn.Module or a state dict, and `fisher` a `pymerge.fisher.Fisher`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from pymerge.errors import excerpt, shorten
from pymerge.io.writer import parse_size
from pymerge.methods.base import REQUIRED, ConfigError, Filtered, MergeMethod, chain, parse_value, suggest
from pymerge.methods.registry import get_method

DEFAULT_HEAD_PATTERNS = ("classifier.*", "score.*", "qa_outputs.*", "classification_head.*")
TOP_LEVEL_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "heads", "head_patterns",
                  "config_from", "max_shard_size", "allow_pickle", "check_finite", "allow_foreign_stats",
                  "slices", "out_dtype", "tokenizer_source", "tokenizer")
MODEL_KEYS = ("model", "name", "parameters")
HEAD_POLICIES = ("keep", "drop")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelSpec:
    model: Any                 # resolved Path, or an in-memory module / state dict / TensorSource
    name: str
    values: Dict[str, Any] = field(default_factory=dict)   # per-model parameter values (scalars or Filtered)


@dataclass
class MergeConfig:
    method: MergeMethod
    models: List[ModelSpec]
    base_model: Optional[ModelSpec]
    values: Dict[str, Any]                 # global parameter values (scalars or Filtered)
    dtype: Optional[torch.dtype] = None
    heads: str = "keep"
    head_patterns: List[str] = field(default_factory=lambda: list(DEFAULT_HEAD_PATTERNS))
    config_from: Optional[str] = None
    max_shard_size: int = 2 * 10**9
    allow_pickle: bool = False
    check_finite: bool = True
    allow_foreign_stats: bool = False
    source: Optional[Path] = None          # the YAML file it was read from (an input the output must not touch)
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[Any] = None  # "base" | "union" | a model name | a Path
    slices: Optional[List[Dict[str, Any]]] = None  # as given (mergekit), for the model card

    @property
    def merge_method(self) -> str:
        return self.method.name

    def model_values(self, i: int) -> Dict[str, Any]:
        """Per-model parameter values of model i, with top-level values and declared defaults filled in."""
        out = {}
        for p in self.method.params:
            if p.scope != "model":
                continue
            general = self.values.get(p.name, p.default)
            if p.name in self.models[i].values:
                out[p.name] = chain(self.models[i].values[p.name], general)
            elif p.name in self.values:
                out[p.name] = self.values[p.name]
            else:
                out[p.name] = p.default
        return out

    def global_values(self) -> Dict[str, Any]:
        return {p.name: self.values.get(p.name, p.default) for p in self.method.params if p.scope == "global"}


def _is_pathlike(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _resolve_path(value, base_dir: Optional[Path], where: str, what: str):
    if not _is_pathlike(value):
        return value
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: empty {what} path")
    p = Path(os.path.expanduser(str(value)))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.exists():
        raise ConfigError(f"{where}: {what} {excerpt(str(value), 300)} not found (looked at {excerpt(str(p), 300)})")
    return p


def _check_keys(d: Mapping, allowed, where: str):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {excerpt(k)}{suggest(excerpt(k), allowed)}")


def _model_entry(raw, base_dir, where) -> Dict[str, Any]:
    if _is_pathlike(raw) or not isinstance(raw, Mapping):
        raw = {"model": raw}
    _check_keys(raw, MODEL_KEYS, where)
    if "model" not in raw or raw["model"] is None:
        raise ConfigError(f"{where}: missing `model` (a model directory)")
    entry = dict(raw)
    entry["model"] = _resolve_model(raw["model"], base_dir, where)
    return entry


def _resolve_model(value, base_dir, where):
    """A model path, or mergekit's `PATH+ADAPTER` (a LoRA adapter merged into PATH before merging)."""
    from pymerge import mergekit_compat

    lora = mergekit_compat.lora_reference(value, base_dir, where, _resolve_path)
    return lora if lora is not None else _resolve_path(value, base_dir, where, "model")


def _same_model(a, b) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a is b


def _default_name(model, i) -> str:
    if isinstance(model, Path):
        return model.stem if model.is_file() else model.name
    if hasattr(model, "adapter_path"):  # PATH+ADAPTER: named after the adapter
        return model.adapter_path.name
    return f"model{i}"


# Configs are small: these bounds refuse alias bombs (anchors nested to expand to billions of nodes) and huge
# files before anything walks the values, and cost nothing for a real config (a few hundred nodes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 20_000      # collections and scalars, counting every alias at its expanded size
MAX_CONFIG_CHARS = 2_000_000   # characters of all scalars, likewise expanded
MAX_CONFIG_DEPTH = 64


def load_yaml(path: Union[str, os.PathLike], what: str = "config"):
    """Parse a small YAML file safely: safe tags only, bounded size / expansion / nesting, no duplicate keys.
    Errors name the file and the line, and echo at most a short excerpt of a value."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found" if not path.exists()
                          else f"{path}: {what} must be a YAML file, this is a directory")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {what} file is {size:,} bytes; a {what} is a small YAML file "
                          f"(at most {MAX_CONFIG_BYTES:,} bytes)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (bad byte at offset {exc.start})") from None
    loader = _BoundedLoader(text, path, what)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        message = str(exc).replace('"<unicode string>"', "the file").replace('"<file>"', "the file")
        raise ConfigError(f"{path}: invalid YAML: {shorten(message, 600)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: {what} is nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _bounded_loader_class():
    import yaml

    class BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml parses ~5x faster
        """SafeLoader that measures the composed document before constructing any value."""

        def __init__(self, text, path, what):
            super().__init__(text)
            self.name = str(path)  # marks in error messages name the file
            self._path, self._what = path, what

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                self._measure(node)
            return node

        def _refuse(self, node, why):
            line = f" (line {node.start_mark.line + 1})" if node.start_mark is not None else ""
            raise ConfigError(f"{self._path}: {self._what} {why}{line}; refused before expanding it")

        def _measure(self, root):
            """Expanded size of the node graph, each shared (aliased) node counted once per use, computed
            with one visit per distinct node, so an alias bomb is measured without being expanded."""
            memo = {}
            stack = set()

            def size(node, depth):
                key = id(node)
                if key in memo:
                    return memo[key]
                if key in stack:
                    self._refuse(node, "refers to itself through an alias (a recursive structure)")
                if depth > MAX_CONFIG_DEPTH:
                    self._refuse(node, f"is nested more than {MAX_CONFIG_DEPTH} levels deep")
                stack.add(key)
                nodes, chars = 1, 0
                if isinstance(node, yaml.ScalarNode):
                    chars = len(node.value)
                else:
                    if isinstance(node, yaml.MappingNode):
                        children = [c for pair in node.value for c in pair]
                        keys = [k.value for k, _ in node.value
                                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]
                        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
                        if dup is not None:
                            self._refuse(node, f"has the key {excerpt(dup)} twice in one mapping")
                    else:
                        children = node.value
                    for child in children:
                        n, c = size(child, depth + 1)
                        nodes, chars = nodes + n, chars + c
                        if nodes > MAX_CONFIG_NODES or chars > MAX_CONFIG_CHARS:
                            self._refuse(node, f"expands to more than {MAX_CONFIG_NODES:,} values or "
                                               f"{MAX_CONFIG_CHARS:,} characters (through anchors and aliases?)")
                stack.discard(key)
                memo[key] = (nodes, chars)
                return memo[key]

            size(root, 0)

    return BoundedLoader


def _BoundedLoader(text, path, what):
    global _LOADER
    if _LOADER is None:
        _LOADER = _bounded_loader_class()
    return _LOADER(text, path, what)


_LOADER = None


def load_config(config: Union[str, os.PathLike, Mapping, MergeConfig], *, base_dir=None) -> MergeConfig:
    """Parse and validate a config (YAML path, dict or MergeConfig). Raises ConfigError naming the bad key."""
    if isinstance(config, MergeConfig):
        return config
    if _is_pathlike(config):
        path = Path(config)
        raw = load_yaml(path)
        base_dir = path.parent if base_dir is None else Path(base_dir)
        src = str(path)
    else:
        raw, src = config, "config"
        base_dir = Path(base_dir) if base_dir is not None else None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(raw, TOP_LEVEL_KEYS, src)

    if "merge_method" not in raw:
        raise ConfigError(f"{src}: missing `merge_method`")
    if not isinstance(raw["merge_method"], str):
        raise ConfigError(f"{src}: merge_method must be a method name, got {excerpt(raw['merge_method'])}")
    try:
        method = get_method(raw["merge_method"])
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc}") from None

    base = None
    if raw.get("base_model") is not None:
        b = _model_entry(raw["base_model"], base_dir, f"{src}: base_model")
        if b.get("parameters"):
            raise ConfigError(f"{src}: base_model takes no parameters")
        base = ModelSpec(b["model"], str(b.get("name") or "base"))

    slice_params: Dict[str, Any] = {}
    if raw.get("slices") is not None:
        from pymerge import mergekit_compat

        if raw.get("models") is not None:
            raise ConfigError(f"{src}: give either `models` or `slices`, not both")
        entries, base_parts, slice_params = mergekit_compat.slice_models(
            raw["slices"], base, base_dir, src, bool(raw.get("allow_pickle", False)), _resolve_model, _same_model)
        if base_parts is not None:
            base = ModelSpec(base_parts, base.name)
    else:
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise ConfigError(f"{src}: `models` must be a non-empty list of models (or mergekit's `slices`)")
        entries = [_model_entry(m, base_dir, f"{src}: models[{i}]") for i, m in enumerate(models_raw)]
        if base is not None and method.needs_base:  # mergekit lists the base among the models
            is_base = [_same_model(e["model"], base.model) for e in entries]
            rest = [e for e, b in zip(entries, is_base) if not b]
            if rest:  # its parameters are ignored, as mergekit does (models that are all the base stay)
                entries = rest
    if len(entries) > 15:
        raise ConfigError(f"{src}: at most 15 models can be merged at once, got {len(entries)}")

    by_name = {p.name: p for p in method.params}
    global_values: Dict[str, Any] = {}
    params_raw = raw.get("parameters") or {}
    if not isinstance(params_raw, Mapping):
        raise ConfigError(f"{src}: `parameters` must be a mapping")
    params_raw = {**params_raw, **slice_params}  # a (single) slice's parameters override the top level
    for k, v in params_raw.items():
        if k not in by_name:
            raise ConfigError(f"{src}: parameters: unknown parameter {excerpt(k)} for method {method.name!r}"
                              f"{suggest(excerpt(k), by_name)}")
        if by_name[k].is_file and by_name[k].scope == "model":
            raise ConfigError(f"{src}: parameters: {k!r} is a per-model file; set it under each model's parameters")
        global_values[k] = parse_value(by_name[k], v, f"{src}: parameters")
        if by_name[k].is_file:  # a global file (e.g. mats' init_model): relative to the config like models
            global_values[k] = _resolve_path(global_values[k], base_dir, f"{src}: parameters", k)

    models: List[ModelSpec] = []
    for i, e in enumerate(entries):
        where = f"{src}: models[{i}]"
        name = str(e.get("name") or _default_name(e["model"], i))
        values = {}
        p_raw = e.get("parameters") or {}
        if not isinstance(p_raw, Mapping):
            raise ConfigError(f"{where}: `parameters` must be a mapping")
        for k, v in p_raw.items():
            if k not in by_name:
                raise ConfigError(f"{where}: unknown parameter {excerpt(k)} for method {method.name!r}{suggest(excerpt(k), by_name)}")
            if by_name[k].scope != "model":
                raise ConfigError(f"{where}: parameter {k!r} of {method.name!r} is global; set it under the "
                                  "top-level `parameters`")
            value = parse_value(by_name[k], v, where)
            if by_name[k].is_file:
                value = _resolve_path(value, base_dir, where, k)
            values[k] = value
        for p in method.params:
            if p.scope == "model" and p.default is REQUIRED and p.name not in values and p.name not in global_values:
                raise ConfigError(f"{where}: method {method.name!r} needs parameter {p.name!r} for every model")
        models.append(ModelSpec(e["model"], name, values))
    for p in method.params:
        if p.scope == "global" and p.default is REQUIRED and p.name not in global_values:
            raise ConfigError(f"{src}: method {method.name!r} needs parameter {p.name!r} under `parameters`")

    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{src}: models share the name(s) {dup}; give each a distinct `name`")

    dtype, out_dtype = raw.get("dtype"), raw.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and str(value) not in DTYPES:
            raise ConfigError(f"{src}: {key} {excerpt(value)} is not supported{suggest(excerpt(value), DTYPES)}")
    dtype = DTYPES[str(dtype)] if dtype is not None else None
    out_dtype = DTYPES[str(out_dtype)] if out_dtype is not None else None
    from pymerge import mergekit_compat

    tokenizer_source = mergekit_compat.tokenizer_source(raw, names, base, base_dir, src, _resolve_model)
    heads = raw.get("heads", "keep")
    if heads not in HEAD_POLICIES:
        raise ConfigError(f"{src}: heads must be one of {list(HEAD_POLICIES)}, got {excerpt(heads)}")
    patterns = raw.get("head_patterns", list(DEFAULT_HEAD_PATTERNS))
    if patterns is None:
        patterns = []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{src}: head_patterns must be a list of name patterns, got {excerpt(patterns)}")
    config_from = raw.get("config_from")
    if config_from is not None and config_from not in names + ([base.name] if base else []):
        raise ConfigError(f"{src}: config_from {excerpt(config_from)} is not a model name"
                          f"{suggest(excerpt(config_from), names + ([base.name] if base else []))}")
    try:
        shard = parse_size(raw.get("max_shard_size", "2GB"))
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc}") from None
    for key in ("allow_pickle", "check_finite", "allow_foreign_stats"):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{src}: {key} must be true or false, got {excerpt(raw[key])}")

    cfg = MergeConfig(method=method, models=models, base_model=base, values=global_values, dtype=dtype,
                      heads=heads, head_patterns=list(patterns), config_from=config_from, max_shard_size=shard,
                      allow_pickle=bool(raw.get("allow_pickle", False)),
                      check_finite=bool(raw.get("check_finite", True)),
                      allow_foreign_stats=bool(raw.get("allow_foreign_stats", False)),
                      source=Path(src) if _is_pathlike(config) else None, out_dtype=out_dtype,
                      tokenizer_source=tokenizer_source,
                      slices=list(raw["slices"]) if raw.get("slices") is not None else None)
    method.validate(cfg.global_values(), [cfg.model_values(i) for i in range(len(models))])
    why = method.base_needed(cfg.global_values())
    if why is not None and base is None:
        raise ConfigError(f"{src}: merge_method {method.name!r} needs `base_model` (the pretrained model the others "
                          f"were fine-tuned from): it {why}")
    method.needs_base = why is not None  # this merge's need (the engine reads it), not the method's in general
    return cfg


__all__ = ["MergeConfig", "ModelSpec", "ConfigError", "load_config", "DEFAULT_HEAD_PATTERNS", "Filtered"]
