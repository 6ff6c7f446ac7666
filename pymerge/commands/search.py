"""`pymerge search CONFIG -o OUT`: DF-Merge's coefficient search from a YAML config."""
from __future__ import annotations

HELP = "search merging coefficients (DF-Merge: Bayesian optimisation over λ with Fishers at θ_pre + λτ)"
DESCRIPTION = """\
Search the coefficients λ of DF-Merge (Lee et al. 2025) on the tasks' validation sets, then write the best merged
model to OUT (a Hugging Face directory with heads/<task>.safetensors per task) and a JSON report
(OUT/pymerge_search.json: best λ, per-task validation and test metrics, the whole trajectory). Every finished
evaluation is appended to a JSONL trial log (default OUT.trials.jsonl beside OUT); after a crash, --resume
continues from it without repeating finished evaluations.

  base_model: ./bert-base
  models:
    - model: ./ft-sentiment
      name: sentiment
      parameters: {validation: sent-val.jsonl, test: sent-test.jsonl, metric: accuracy}
    - model: ./t5-ft-qasc
      name: qasc
      parameters: {validation: qasc-val.jsonl, kind: multiple_choice, choices: ["yes", "no"]}
  parameters: {optimizer: gp-ei, n_init: 10, n_iter: 50, seed: 0, fisher_examples: 30}

Data files are the JSONL / CSV files `pymerge fisher --data` reads (columns text [, text_pair], label; for
multiple choice, label = the index or text of the right answer, and choices per task or a JSON list column).

  pymerge search search.yml -o merged/
  pymerge search search.yml -o merged/ --resume"""

TASK_KEYS = ("validation", "test", "fisher_data", "kind", "choices", "choices_column", "metric", "text_column",
             "text_pair_column", "label_column", "max_length", "batch_size", "length_normalize")
SEARCH_KEYS = ("optimizer", "n_init", "n_iter", "seed", "bounds", "beta", "xi", "optimizer_options",
               "fisher_examples", "use_fisher", "search", "patience", "time_budget", "workers", "device",
               "batch_size", "eps")
TOP_KEYS = ("base_model", "models", "parameters")


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML search config (models, base_model, per-task data, parameters)")
    p.add_argument("-o", "--out", required=True, help="output directory for the best merged model (+ report)")
    p.add_argument("--log", default=None, help="JSONL trial log (default: OUT.trials.jsonl beside OUT)")
    p.add_argument("--resume", action="store_true", help="continue the search recorded in the trial log")
    p.add_argument("--force", action="store_true", help="replace OUT and start the trial log again if they exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    return base, entries, search


def _examples(file, params, label2id, kind, where, labelled=True):
    import json

    from pymerge.commands.stats import read_rows

    rows = read_rows(file)
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
                from pymerge.commands.stats import _label_id

                value = _label_id(value, label2id, at)
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


def run(args) -> int:
    from pathlib import Path

    from pymerge.errors import UsageError
    from pymerge.io.writer import check_target

    from pymerge.io.writer import check_not_input

    out = Path(args.out)
    log = Path(args.log) if args.log else out.parent / f"{out.name}.trials.jsonl"
    base, entries, search = load_config(args.config)
    inputs = [("config file", Path(args.config)), ("base model", base)] + [(f"model {n}", m) for m, n, _ in entries]
    inputs += [(f"{k} file of {n}", p[k]) for _, n, p in entries for k in ("validation", "test", "fisher_data")
               if p.get(k) is not None]
    for target in (out, log):  # before any work: an output never is, holds or lies inside an input
        check_not_input(target, inputs)
    check_target(out, args.force)
    if log.exists() and not (args.resume or args.force):
        raise UsageError(f"trial log {log} exists: pass --resume to continue that search or --force to start again")
    tasks = build_tasks(entries)
    from pymerge.search.api import dfmerge

    if "bounds" in search:
        b = search["bounds"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2):
            raise ValueError(f"{args.config}: parameters.bounds: expected [lo, hi], got {b!r}")
        search["bounds"] = (float(b[0]), float(b[1]))
    result = dfmerge(base, [m for m, _, _ in entries], tasks, log=log, resume=args.resume, overwrite=args.force,
                     out_dir=out, force=args.force, progress=not args.no_progress, **search)
    lam = ", ".join(f"{t.name}={v:.4f}" for t, v in zip(tasks, result.lambdas))
    print(f"best λ ({lam}) at trial {result.best_trial}: validation objective {result.objective:.4f}")
    for t in tasks:
        test = result.test[t.name]
        print(f"  {t.name}: validation {result.validation[t.name]:.4f}" +
              (f", test {test:.4f}" if test is not None else ""))
    print(f"wrote {result.out_dir} (report {result.out_dir}/pymerge_search.json), trial log {log}")
    return 0
