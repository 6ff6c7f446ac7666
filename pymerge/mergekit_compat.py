"""mergekit's config forms, translated into pymerge's while a config is loaded (no tensor is read).

- `slices: [{sources: [{model, layer_range, parameters}], parameters}]`: source k of every slice forms the
  k-th (virtual) model, a `LayerStack` of its layer ranges; the base model's sources form the base.
- `model: PATH+ADAPTER`: a LoRA adapter merged into PATH through PEFT before merging (`LoraSource`).
- `tokenizer_source: base | union | MODEL` and `tokenizer: {source: ...}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pymerge.methods.base import ConfigError

SLICE_KEYS = ("sources", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")


def lora_reference(value, base_dir, where, resolve_path):
    """`PATH+ADAPTER` -> LoraSource, when the string is not itself an existing path; else None."""
    if not isinstance(value, str) or "+" not in value:
        return None
    whole = Path(value).expanduser()
    if not whole.is_absolute() and base_dir is not None:
        whole = Path(base_dir) / whole
    if whole.exists():
        return None
    model, adapter = value.rsplit("+", 1)
    model_path = resolve_path(model, base_dir, where, "model")
    adapter_path = resolve_path(adapter, base_dir, where, "LoRA adapter")
    if not (adapter_path / "adapter_config.json").is_file():
        raise ConfigError(f"{where}: {adapter!r} is not a LoRA adapter directory (no adapter_config.json)")
    from pymerge.io.lora import LoraSource

    return LoraSource(model_path, adapter_path, label=value)


def _check_keys(d, allowed, where):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    bad = [k for k in d if k not in allowed]
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; expected one of {list(allowed)}")


def _layer_range(raw, where) -> Tuple[int, int]:
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or not 0 <= raw[0] < raw[1]):
        raise ConfigError(f"{where}: layer_range must be [first, stop] with 0 <= first < stop, got {raw!r}")
    return int(raw[0]), int(raw[1])


def slice_models(slices, base, base_dir, src: str, allow_pickle: bool, resolve_model, same_model):
    """(model entries, base LayerStack or None, slice-level parameters) from mergekit's `slices`."""
    from pymerge.io.layer_stack import LayerStack

    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{src}: `slices` must be a non-empty list of {{sources: [...]}}")
    per_slice: List[List[Dict[str, Any]]] = []
    base_parts: List[Tuple[Any, Tuple[int, int]]] = []
    slice_params = []
    for k, sl in enumerate(slices):
        w = f"{src}: slices[{k}]"
        _check_keys(sl, SLICE_KEYS, w)
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"{w}: `sources` must be a non-empty list of {{model, layer_range}}")
        entries = []
        for j, s in enumerate(sources):
            ws = f"{w}.sources[{j}]"
            _check_keys(s, SOURCE_KEYS, ws)
            if s.get("model") is None or "layer_range" not in s:
                raise ConfigError(f"{ws}: needs `model` and `layer_range`")
            entries.append({"model": resolve_model(s["model"], base_dir, ws),
                            "range": _layer_range(s["layer_range"], f"{ws}.layer_range"),
                            "parameters": dict(s.get("parameters") or {}), "where": ws})
        lengths = {e["range"][1] - e["range"][0] for e in entries}
        if len(lengths) > 1:
            raise ConfigError(f"{w}: all sources of a slice must span the same number of layers, got "
                              f"{[list(e['range']) for e in entries]}")
        if base is not None:
            b = [e for e in entries if same_model(e["model"], base.model)]
            others = [e for e in entries if not same_model(e["model"], base.model)]
            if b and others:  # the base is one of this slice's sources (mergekit): it becomes the base part
                base_parts.append((b[0]["model"], b[0]["range"]))
                entries = others
        per_slice.append(entries)
        slice_params.append(dict(sl.get("parameters") or {}))
    counts = {len(e) for e in per_slice}
    if len(counts) > 1:
        raise ConfigError(f"{src}: every slice needs the same number of sources (besides the base), got "
                          f"{[len(e) for e in per_slice]}")
    if base_parts and len(base_parts) != len(per_slice):
        raise ConfigError(f"{src}: base_model is a source of some slices but not of others")
    if any(p != slice_params[0] for p in slice_params):
        raise ConfigError(f"{src}: slices with different `parameters` are not supported; set them at the top "
                          "level (values may vary across layers: `t: [0, 0.5, 1]`)")
    out = []
    for j in range(counts.pop()):
        col = [sl[j] for sl in per_slice]
        if any(c["parameters"] != col[0]["parameters"] for c in col):
            raise ConfigError(f"{col[1]['where']}: parameters differ from those of the same source in slice 0; "
                              "per-slice parameters of one source are not supported")
        first = col[0]["model"]
        name = first.name if isinstance(first, Path) else str(first)
        if len({str(c["model"]) for c in col}) > 1:
            name = "stack"
        out.append({"model": LayerStack([(c["model"], c["range"]) for c in col], label=name,
                                        allow_pickle=allow_pickle),
                    "name": name if len(per_slice[0]) == 1 else f"{name}-{j}", "parameters": col[0]["parameters"]})
    base_stack = LayerStack(base_parts, label=base.name, allow_pickle=allow_pickle) if base_parts else None
    return out, base_stack, slice_params[0]


def tokenizer_source(raw: Mapping, names: List[str], base, base_dir, src: str, resolve_model) -> Optional[Any]:
    """`tokenizer_source` / `tokenizer: {source}`: "base", "union", a model name, or a model path."""
    value = raw.get("tokenizer_source")
    tok = raw.get("tokenizer")
    if tok is not None:
        if value is not None:
            raise ConfigError(f"{src}: give either tokenizer_source or tokenizer, not both")
        _check_keys(tok, ("source",), f"{src}: tokenizer")  # `tokens` / `pad_to_multiple_of`: not supported
        value = tok.get("source")
    if value is None:
        return None
    if value == "base":
        if base is None:
            raise ConfigError(f"{src}: tokenizer_source: base needs `base_model`")
        return "base"
    if value == "union" or value in names:
        return value
    path = resolve_model(value, base_dir, f"{src}: tokenizer_source")
    if isinstance(path, Path) and base is not None and isinstance(base.model, Path) and \
            path.resolve() == Path(base.model).resolve():
        return "base"
    return path
