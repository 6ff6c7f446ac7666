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
    out.write_json("pymerge_merge.json", describe(plan))


def describe(plan: MergePlan) -> Dict[str, Any]:
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
