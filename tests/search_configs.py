"""`pymerge search` YAML files over the tiny BERT checkpoints of tests/engine_models.build_zoo (models sst: 2
labels, topic: 3), with synthetic labelled .jsonl validation and test files written beside them."""
import json
import random


def write_examples(path, n, labels, seed):
    """n rows {"text", "label"}; the first word names the label, so a model can learn it."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(labels)
            words = " ".join(f"w{rng.randrange(27)}" for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"text": f"w{y} {words}", "label": y}) + "\n")
    return path


def write_search_config(tmp_path, zoo, *, topic_parameters, parameters):
    """tmp_path/search.yml: sst with validation and test files, topic with `topic_parameters`, and the search's
    `parameters` (both given as the inside of a YAML flow mapping)."""
    for name, labels in (("sst", 2), ("topic", 3)):
        write_examples(tmp_path / f"{name}-val.jsonl", 8, labels, 1)
        write_examples(tmp_path / f"{name}-test.jsonl", 5, labels, 2)
    cfg = tmp_path / "search.yml"
    cfg.write_text(f"""
base_model: {zoo['bert_base']}
models:
  - model: {zoo['sst']}
    name: sst
    parameters: {{validation: sst-val.jsonl, test: sst-test.jsonl}}
  - model: {zoo['topic']}
    name: topic
    parameters: {{{topic_parameters}}}
parameters: {{{parameters}}}
""")
    return cfg
