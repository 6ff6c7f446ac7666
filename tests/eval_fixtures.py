"""Synthetic tasks on token ids for the eval and search tests (no tokenizer, no hub)."""
import random

from tests.fisher_models import VOCAB


def classification_examples(n, num_labels, seed, length=(3, 9)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(num_labels)
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(*length))]
        ids[0] = 1 + label  # a learnable cue
        out.append({"input_ids": ids, "label": label})
    return out


def choice_examples(n, num_choices, seed, per_example=True):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = {"input_ids": [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 7))],
              "label": rng.randrange(num_choices)}
        if per_example:
            ex["choices"] = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 4))] for _ in range(num_choices)]
        out.append(ex)
    return out
