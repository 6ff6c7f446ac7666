"""The files beside the merged tensors: config.json, tokenizer files, per-task head configs, pymerge_merge.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from pymerge.engine.plan import MergePlan
from pymerge.io.writer import COPIED_FILES, TOKENIZER_FILES, OutputDirectory, safe_task_name


def write_side_files(plan: MergePlan, out: OutputDirectory) -> None:
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
    description = describe(plan)
    out.write_json("pymerge_merge.json", description)
    write_model_card(plan, out, description)
    write_single_shard_index(plan, out)
    write_tokenizer(plan, out)


def write_model_card(plan: MergePlan, out: OutputDirectory, description: Dict[str, Any]) -> None:
    """README.md: method, inputs, parameters, pymerge version (replaces any README of the inputs)."""
    from pymerge.engine.card import model_card

    (out.tmp / "README.md").write_text(model_card(plan, description))


def write_single_shard_index(plan: MergePlan, out: OutputDirectory) -> None:
    """`model.safetensors.index.json` also for a single shard (README promises it; sharded outputs have it)."""
    from pymerge.io.safetensors_file import nbytes

    if not (out.tmp / "model.safetensors").exists() or (out.tmp / "model.safetensors.index.json").exists():
        return
    entries = plan.main_entries()
    out.write_json("model.safetensors.index.json", {
        "metadata": {"total_size": sum(nbytes(e.dtype, e.shape) for e in entries)},
        "weight_map": {e.name: "model.safetensors" for e in entries}})


def write_tokenizer(plan: MergePlan, out: OutputDirectory) -> None:
    """`tokenizer_source`: the chosen (or union) tokenizer replaces the copied one."""
    tok = getattr(plan, "tokenizer", None)
    if tok is not None:
        for f in TOKENIZER_FILES:
            if (out.tmp / f).exists():
                (out.tmp / f).unlink()
        tok.save(out.tmp)


def describe(plan: MergePlan) -> Dict[str, Any]:
    cfg = plan.config

    def plain(v):
        if hasattr(v, "rules"):
            return [{"filter": p, "value": plain(x)} if p is not None else {"value": plain(x)} for p, x in v.rules]
        if hasattr(v, "values") and isinstance(getattr(v, "values"), tuple):  # a Gradient
            return list(v.values)
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)

    return {
        "merge_method": cfg.merge_method,
        "parameters": {k: plain(v) for k, v in cfg.values.items()},
        "models": [{"model": _model_ref(m), "name": m.name,
                    "parameters": {k: plain(v) for k, v in m.values.items()}} for m in cfg.models],
        "base_model": _model_ref(cfg.base_model) if cfg.base_model else None,
        "dtype": str(cfg.dtype).replace("torch.", "") if cfg.dtype else None,
        "out_dtype": str(cfg.out_dtype).replace("torch.", "") if getattr(cfg, "out_dtype", None) else None,
        "tokenizer_source": None if getattr(cfg, "tokenizer_source", None) is None else str(cfg.tokenizer_source),
        "heads": cfg.heads,
        "head_patterns": cfg.head_patterns,
        "summary": plan.summary(),
    }


def _model_ref(spec) -> str:
    """A path as given, a LoRA as PATH+ADAPTER, layer slices as their parts; in-memory models by name."""
    m = spec.model
    if isinstance(m, (str, Path)):
        return str(m)
    if hasattr(m, "parts"):
        return " + ".join(f"{p}[{a}:{b}]" for p, (a, b) in m.parts)
    if hasattr(m, "adapter_path"):
        return str(m)
    return spec.name
