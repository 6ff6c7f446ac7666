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

Parameters also choose the wall-clock budget (time_budget: seconds of search, counted across --resume from the
trial log), patience, and parallel workers (workers: N, backend: local | ray, ray_address, ray_options; Ray
needs `pip install pymerge[ray]`).

Data files are the JSONL / CSV files `pymerge fisher --data` reads (columns text [, text_pair], label; for
multiple choice, label = the index or text of the right answer, and choices per task or a JSON list column).

  pymerge search search.yml -o merged/
  pymerge search search.yml -o merged/ --resume"""


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML search config (models, base_model, per-task data, parameters)")
    p.add_argument("-o", "--out", required=True, help="output directory for the best merged model (+ report)")
    p.add_argument("--log", default=None, help="JSONL trial log (default: OUT.trials.jsonl beside OUT)")
    p.add_argument("--resume", action="store_true", help="continue the search recorded in the trial log")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists, and start the trial log again (with --resume: continue it)")
    p.add_argument("--backend", choices=("local", "ray"), default=None,
                   help="where workers evaluate: local processes or Ray actors (default: the config's, else local)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join with backend ray (e.g. auto, ray://head:10001; default: the config's, "
                        "else a local Ray instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from pymerge.errors import UsageError
    from pymerge.io.writer import check_not_input, check_target
    from pymerge.search.config import build_tasks, load_config

    out = Path(args.out)
    log = Path(args.log) if args.log else out.parent / f"{out.name}.trials.jsonl"
    base, entries, search = load_config(args.config)
    if args.backend is not None:
        search["backend"] = args.backend
    if args.ray_address is not None:
        search["ray_address"] = args.ray_address
    from pymerge.search.workers import check_backend

    check_backend(search.get("backend", "local"), search.get("workers", 1), search.get("ray_address"),
                  search.get("ray_options"))  # e.g. Ray missing: before any work
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

    result = dfmerge(base, [m for m, _, _ in entries], tasks, log=log, resume=args.resume,
                     overwrite=args.force and not args.resume,
                     out_dir=out, force=args.force, progress=not args.no_progress, **search)
    lam = ", ".join(f"{t.name}={v:.4f}" for t, v in zip(tasks, result.lambdas))
    print(f"best λ ({lam}) at trial {result.best_trial}: validation objective {result.objective:.4f}")
    for t in tasks:
        test = result.test[t.name]
        print(f"  {t.name}: validation {result.validation[t.name]:.4f}" +
              (f", test {test:.4f}" if test is not None else ""))
    print(f"wrote {result.out_dir} (report {result.out_dir}/pymerge_search.json), trial log {log}")
    return 0
