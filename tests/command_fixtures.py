"""What the tests of `pymerge fisher` and `pymerge stats` share: a tiny saved BERT classifier with its own word
tokenizer and labels by name, a few JSONL rows, and the batches Python makes of them.

    from command_fixtures import ROWS, model_dir, python_batches, write_rows  # model_dir: a pytest fixture
"""
import json

import pytest
import torch
import transformers

import fisher_models as fm

WORDS = [f"w{i}" for i in range(fm.VOCAB - 5)]
ROWS = [{"text": "w1 w2 w3", "label": "pos"}, {"text": "w4 w5", "label": "neg"},
        {"text": "w7 w8 w9 w10 w11", "label": 1}]


def save_tiny_bert(path):
    """A tiny random BERT classifier (labels neg / pos) saved as safetensors with a BertTokenizer over WORDS."""
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    model = fm.bert(num_labels=2, dtype=torch.float32)
    model.config.label2id, model.config.id2label = {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_of(row) -> int:
    return 1 if row["label"] in ("pos", 1) else 0


def python_batches(model_dir, chunks=(ROWS[:2], ROWS[2:])):
    """The batches `--batch-size len(chunk)` should make of the rows, tokenised here in Python."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for rows in chunks:
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        out.append(dict(enc, labels=torch.tensor([label_of(r) for r in rows])))
    return out
