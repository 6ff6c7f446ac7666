"""Text classification: tokenised batches and accuracy of a sequence-classification model."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def make_batches(tokenizer, examples: Sequence[tuple], batch_size: int = 32, max_length: int = 64,
                 with_labels: bool = True) -> Iterator[dict]:
    """(text, label) pairs -> dicts of input_ids / attention_mask (/ labels), padded per batch."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            batch["labels"] = torch.tensor([y for _, y in chunk], dtype=torch.long)
        yield batch


@torch.no_grad()
def accuracy(model, tokenizer, examples: Sequence[tuple], batch_size: int = 64, max_length: int = 64) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    if not examples:
        raise ValueError("accuracy: no examples to evaluate")
    was_training = model.training
    model.eval()
    correct = 0
    for batch in make_batches(tokenizer, examples, batch_size, max_length):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(examples)
