"""How a model answers a batch: class logits of a classification head, or per-choice log-likelihoods of an LM.

Multiple-choice scores reuse the statistics log-probabilities (pymerge.stats.logprobs), so the model is scored on
exactly the distribution its exact Fisher is taken over: causal LMs run context + answer per choice; T5 runs
the encoder once per example and all its answers through the decoder as one batch.
"""
from __future__ import annotations

from typing import Dict

import torch

from pymerge.stats import logprobs as objectives


def _no_rows(rows: int) -> None:  # the objectives tell Fisher hooks the batch size; nothing listens here
    return None


@torch.no_grad()
def class_logits(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, C] logits of a sequence-classification model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if logits.dim() != 2:
        raise ValueError(f"{type(model).__name__}: expected classification logits [N, C], got "
                         f"{tuple(logits.shape)} (is this a ...ForSequenceClassification model?)")
    return logits


@torch.no_grad()
def choice_log_probs(model, batch: Dict[str, torch.Tensor], length_normalize: bool = True) -> torch.Tensor:
    """[N, C] log p(choice | context), normalised over the choices; an answer's score is the sum (mean with
    length_normalize, i.e. the lowest perplexity wins) of its token log-likelihoods."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "choice_ids" in inputs:
        out = objectives.multiple_choice_seq2seq(model, inputs, _no_rows, length_normalize)
    else:
        out = objectives.multiple_choice_causal(model, inputs, _no_rows, length_normalize)
    return out.log_probs[:, 0, :]
