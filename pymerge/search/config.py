"""The `pymerge search` YAML config: reading and checking it (`load_config`) and building its tasks
(`build_tasks`, one pymerge.eval.Task per fine-tuned model, tokenised with that model's tokenizer).

Shared by `pymerge search` and `pymerge plot landscape`. No torch at import time (transformers and the task
classes are imported inside build_tasks), so command modules may import this module cheaply.
"""
from __future__ import annotations

TASK_KEYS = ("validation", "test", "fisher_data", "kind", "choices", "choices_column", "metric", "text_column",
             "text_pair_column", "label_column", "max_length", "batch_size", "length_normalize")
SEARCH_KEYS = ("optimizer", "n_init", "n_iter", "seed", "bounds", "beta", "xi", "optimizer_options",
               "fisher_examples", "use_fisher", "search", "patience", "time_budget", "workers", "backend",
               "ray_address", "ray_options", "device", "batch_size", "eps")
TOP_KEYS = ("base_model", "models", "parameters")


def _suggest(key, allowed, where):
    import difflib

    from pymerge.errors import excerpt

    close = difflib.get_close_matches(excerpt(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown key {excerpt(key)}{hint}; expected one of {', '.join(allowed)}"


def load_config(path):
    """The config as (base path, [(model path, name, task params)], search params), checked and with paths
    resolved relative to the YAML file."""
    from pathlib import Path

    from pymerge.config import load_yaml

    path = Path(path)
    doc = load_yaml(path)  # bounded: size, alias expansion, nesting, duplicate keys; short excerpts in errors
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with {', '.join(TOP_KEYS)}")
    for k in doc:
        if k not in TOP_KEYS:
            raise ValueError(_suggest(k, TOP_KEYS, str(path)))
    root = path.parent

    def resolve(value, where):
        if not isinstance(value, str) or not value:
            from pymerge.errors import excerpt

            raise ValueError(f"{path}: {where}: expected a path, got {excerpt(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else root / p

    if "base_model" not in doc:
        raise ValueError(f"{path}: base_model (the pretrained model) is required")
    base = resolve(doc["base_model"], "base_model")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{path}: models: expected a non-empty list of {{model, name, parameters}}")
    entries = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(m, dict) or "model" not in m:
            raise ValueError(f"{path}: {where}: expected a mapping with 'model'")
        for k in m:
            if k not in ("model", "name", "parameters"):
                raise ValueError(_suggest(k, ("model", "name", "parameters"), f"{path}: {where}"))
        params = dict(m.get("parameters") or {})
        for k in params:
            if k not in TASK_KEYS:
                raise ValueError(_suggest(k, TASK_KEYS, f"{path}: {where}.parameters"))
        if "validation" not in params:
            raise ValueError(f"{path}: {where}.parameters: 'validation' (a JSONL / CSV file) is required")
        for k in ("validation", "test", "fisher_data"):
            if params.get(k) is not None:
                params[k] = resolve(params[k], f"{where}.parameters.{k}")
        model = resolve(m["model"], f"{where}.model")
        entries.append((model, str(m.get("name") or model.name), params))
    search = dict(doc.get("parameters") or {})
    for k in search:
        if k not in SEARCH_KEYS:
            raise ValueError(_suggest(k, SEARCH_KEYS, f"{path}: parameters"))
    if "bounds" in search:
        b = search["bounds"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2):
            raise ValueError(f"{path}: parameters.bounds: expected [lo, hi], got {b!r}")
        search["bounds"] = (float(b[0]), float(b[1]))
    return base, entries, search


def _examples(file, params, label2id, kind, where, labelled=True):
    import json

    from pathlib import Path

    from pymerge.io.rows import label_id, read_rows

    rows = read_rows(Path(file), what=where)
    if not rows:
        raise ValueError(f"{where} {file}: no examples")
    text_col = params.get("text_column", "text")
    pair_col = params.get("text_pair_column")
    label_col = params.get("label_column", "label")
    choices_col = params.get("choices_column")
    out = []
    for n, row in enumerate(rows, 1):
        at = f"{file}: example {n}"
        if text_col not in row:
            raise ValueError(f"{at}: no column {text_col!r} (columns: {sorted(row)})")
        ex = {"text": str(row[text_col])}
        if pair_col:
            ex["text_pair"] = str(row[pair_col])
        if choices_col:
            value = row.get(choices_col)
            ex["choices"] = json.loads(value) if isinstance(value, str) else value
        if labelled:
            if label_col not in row:
                raise ValueError(f"{at}: no label column {label_col!r} (columns: {sorted(row)})")
            value = row[label_col]
            if kind == "classification":
                value = label_id(value, label2id, at)
            elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            ex["label"] = value
        out.append(ex)
    return out


def build_tasks(entries):
    """One pymerge.eval.Task per model entry, tokenised with the model's own tokenizer."""
    import transformers

    from pymerge.eval.tasks import Task

    from pymerge.io.reader import read_model_config

    tasks = []
    for model, name, params in entries:
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model}: model {name}: not a Hugging Face model directory (no config.json)")
        read_model_config(model)  # a clear error naming config.json before transformers reads it
        tok = transformers.AutoTokenizer.from_pretrained(model)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        config = transformers.AutoConfig.from_pretrained(model)
        kind = params.get("kind", "classification")
        label2id = getattr(config, "label2id", None) or {}
        where = f"model {name}"
        val = _examples(params["validation"], params, label2id, kind, where)
        test = _examples(params["test"], params, label2id, kind, where) if params.get("test") else None
        fisher = _examples(params["fisher_data"], params, label2id, kind, where, labelled=False) \
            if params.get("fisher_data") else None
        extra = {k: params[k] for k in ("max_length", "batch_size", "length_normalize", "choices") if k in params}
        tasks.append(Task(name, val, test=test, kind=kind, fisher_inputs=fisher,
                          metric=params.get("metric", "accuracy"), tokenizer=tok, **extra))
    return tasks
