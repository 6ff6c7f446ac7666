"""One way to get log-probabilities for every statistic: per model kind, the normalised log-probabilities of
the outcomes, and the expectation over outcomes (the Fisher modes) as cotangents on them.

Every objective maps (model, batch) to `Outcomes`: log p(y | x_n) as log_probs [N, F, C] over C outcomes for F
independent factors per example (F = 1 for a class or an answer choice; F = tokens for causal-LM token
prediction, whose sequence log-likelihood is the sum over its unpadded tokens), a mask [N, F] of factors that
count, and the observed labels [N, F] (for the empirical Fisher; -100 = ignore).

Batch formats (dicts of tensors, as HF models take them):
- sequence classification: input_ids [N, T], attention_mask [N, T], (token_type_ids), labels [N].
- causal-LM tokens: input_ids [N, T], attention_mask [N, T], optional labels [N, T] (-100 = not scored;
  default: the input ids). Each token is predicted from its prefix.
- multiple choice, causal LM: input_ids [N, C, T] (context + answer c, padded), attention_mask [N, C, T],
  choice_mask [N, C, T] (1 on the answer tokens that are scored), labels [N] (index of the right answer).
- multiple choice, encoder-decoder (T5): input_ids [N, T], attention_mask [N, T] (the question, encoded once),
  choice_ids [N, C, L] (answer tokens, padded with pad_token_id or -100), choice_attention_mask [N, C, L], labels [N].
An answer's score is the sum of its token log-likelihoods (mean with length_normalize=True, as DF-Merge),
and p(c | x) = softmax over the C scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Outcomes:
    log_probs: torch.Tensor  # [N, F, C], normalised over C
    mask: torch.Tensor  # [N, F] float: 1 where the factor counts
    labels: Optional[torch.Tensor]  # [N, F] long, -100 = ignore


Batch = Dict[str, torch.Tensor]
SetRows = Callable[[int], None]  # tells the layer hooks how many rows the next forward has


def _labels_2d(batch: Batch, n: int) -> Optional[torch.Tensor]:
    labels = batch.get("labels")
    if labels is None:
        return None
    return labels.reshape(n, -1).long()


def _model_inputs(batch: Batch, drop=("labels",)) -> Batch:
    return {k: v for k, v in batch.items() if k not in drop}


def sequence_classification(model: nn.Module, batch: Batch, set_rows: SetRows, length_normalize=False) -> Outcomes:
    n = batch["input_ids"].shape[0]
    set_rows(n)
    logits = model(**_model_inputs(batch)).logits.float()
    if logits.dim() != 2:
        raise ValueError(f"sequence classification: expected logits [N, C], got {tuple(logits.shape)}")
    lp = logits.log_softmax(-1).unsqueeze(1)
    return Outcomes(lp, torch.ones(n, 1, device=lp.device), _labels_2d(batch, n))


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[t] | prefix) for logits predicting position t + 1: [B, T-1]."""
    lp = logits[:, :-1].float().log_softmax(-1)
    return lp.gather(-1, targets[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)


def causal_lm_tokens(model: nn.Module, batch: Batch, set_rows: SetRows, length_normalize=False) -> Outcomes:
    ids = batch["input_ids"]
    n = ids.shape[0]
    am = batch.get("attention_mask", torch.ones_like(ids))
    set_rows(n)
    logits = model(input_ids=ids, attention_mask=am).logits
    lp = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
    targets = batch.get("labels", ids)[:, 1:].long()
    mask = (am[:, 1:] > 0) & (am[:, :-1] > 0) & (targets != -100)
    labels = targets.masked_fill(~mask, -100)
    return Outcomes(lp, mask.float(), labels)


def _choice_outcomes(token_lp: torch.Tensor, scored: torch.Tensor, n: int, c: int, length_normalize: bool,
                     labels: Optional[torch.Tensor]) -> Outcomes:
    scored = scored.float()
    score = (token_lp * scored).sum(-1)
    if length_normalize:
        score = score / scored.sum(-1).clamp(min=1)
    lp = score.reshape(n, c).log_softmax(-1).unsqueeze(1)
    return Outcomes(lp, torch.ones(n, 1, device=lp.device), None if labels is None else labels.reshape(n, 1).long())


def multiple_choice_causal(model: nn.Module, batch: Batch, set_rows: SetRows, length_normalize=False) -> Outcomes:
    ids = batch["input_ids"]
    n, c, t = ids.shape
    am = batch.get("attention_mask", torch.ones_like(ids)).reshape(n * c, t)
    set_rows(n * c)
    flat = ids.reshape(n * c, t)
    logits = model(input_ids=flat, attention_mask=am).logits
    token_lp = _token_log_probs(logits, flat)
    scored = batch["choice_mask"].reshape(n * c, t)[:, 1:] * am[:, 1:]
    return _choice_outcomes(token_lp, scored, n, c, length_normalize, batch.get("labels"))


def multiple_choice_seq2seq(model: nn.Module, batch: Batch, set_rows: SetRows, length_normalize=False) -> Outcomes:
    from transformers.modeling_outputs import BaseModelOutput

    ids, choices = batch["input_ids"], batch["choice_ids"]
    n, c, length = choices.shape
    am = batch.get("attention_mask", torch.ones_like(ids))
    set_rows(n)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=am).last_hidden_state
    # The encoder ran once per example; each example's C answers reuse it (gradients add up through the repeat).
    set_rows(n * c)
    flat = choices.reshape(n * c, length).long()
    pad = model.config.pad_token_id
    targets = flat.masked_fill(flat == -100, pad)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(c, 0)),
                attention_mask=am.repeat_interleave(c, 0), decoder_input_ids=model._shift_right(targets))
    token_lp = out.logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    cam = batch.get("choice_attention_mask")
    scored = (flat != -100) if cam is None else (cam.reshape(n * c, length) > 0) & (flat != -100)
    return _choice_outcomes(token_lp, scored, n, c, length_normalize, batch.get("labels"))


def custom(log_prob_fn) -> Callable:
    """Wraps a user function (model, batch) -> log-probs [N, C] or [N, F, C] (or a tuple (log_probs, mask))."""

    def objective(model, batch, set_rows, length_normalize=False):
        if "input_ids" in batch:
            set_rows(batch["input_ids"].shape[0])
        out = log_prob_fn(model, batch)
        lp, mask = out if isinstance(out, tuple) else (out, None)
        if not isinstance(lp, torch.Tensor) or lp.dim() not in (2, 3):
            raise ValueError("log_prob_fn: expected log-probabilities [N, C] or [N, F, C]")
        lp = lp.float() if lp.dim() == 3 else lp.float().unsqueeze(1)
        if (lp.detach().logsumexp(-1).abs() > 1e-3).any():
            raise ValueError("log_prob_fn: the log-probabilities are not normalised over the last dimension "
                             "(return log_softmax(logits), not logits)")
        n = lp.shape[0]
        mask = torch.ones(lp.shape[:2], device=lp.device) if mask is None else mask.float().reshape(lp.shape[:2])
        return Outcomes(lp, mask, _labels_2d(batch, n))

    return objective


KINDS = {
    "sequence_classification": sequence_classification,
    "causal_lm": causal_lm_tokens,
    "multiple_choice": None,  # resolved per batch format below
}


def resolve(model: nn.Module, batch: Batch, kind: str = "auto", log_prob_fn=None):
    """(kind name, objective function) for this model and batch."""
    if log_prob_fn is not None:
        return "custom", custom(log_prob_fn)
    if "input_ids" not in batch:
        raise ValueError(f"batch: expected an 'input_ids' tensor (keys: {sorted(batch)}); "
                         "or pass log_prob_fn for other inputs")
    if kind in ("auto", "multiple_choice"):
        if "choice_ids" in batch:
            return "multiple_choice_seq2seq", multiple_choice_seq2seq
        if batch["input_ids"].dim() == 3:
            if "choice_mask" not in batch:
                raise ValueError("batch: multiple choice input_ids [N, C, T] need a 'choice_mask' [N, C, T] "
                                 "marking the answer tokens")
            return "multiple_choice_causal", multiple_choice_causal
        if kind == "multiple_choice":
            raise ValueError("batch: multiple choice needs input_ids [N, C, T] + choice_mask (causal LM) or "
                             "choice_ids [N, C, L] (encoder-decoder)")
    cls = type(model).__name__
    if kind == "sequence_classification" or (kind == "auto" and cls.endswith("ForSequenceClassification")):
        return "sequence_classification", sequence_classification
    if kind == "causal_lm" or (kind == "auto" and (cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"))):
        return "causal_lm", causal_lm_tokens
    raise ValueError(f"cannot tell what to estimate the Fisher of for {cls}: pass kind='sequence_classification' "
                     "| 'causal_lm' | 'multiple_choice', or log_prob_fn=(model, batch) -> log-probs [N, C]")


# ------------------------------------------------------------------------------ classification log-probs, labels
LABEL_KEYS = ("labels", "label")


def classification_log_probs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[N, C] log p(c | x_n) of an HF sequence classification model (GPT-2 heads pick the last non-pad token)."""
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"the model returned logits of shape {shape}; expected [batch, classes >= 2] from a "
                         f"sequence classification head; pass log_prob_fn=(model, batch) -> [N, C] log-probs "
                         f"for other models")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


def class_labels(batch: Mapping[str, torch.Tensor], index: int, n: int, classes: int, device) -> torch.Tensor:
    """The batch's labels as [n] class ids in [0, classes), with errors naming the batch."""
    key = next((k for k in LABEL_KEYS if k in batch), None)
    if key is None:
        raise ValueError(f"mode='empirical' needs labels: batch {index} has no 'labels' key (keys: {sorted(batch)}); "
                         f"add labels or use mode='exact'")
    labels = torch.as_tensor(batch[key], device=device).reshape(-1)
    if labels.numel() != n or labels.dtype.is_floating_point:
        raise ValueError(f"batch {index}: '{key}' must be {n} integer class ids (one per example), got shape "
                         f"{tuple(labels.shape)} dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"batch {index}: '{key}' has class ids outside [0, {classes})")
    return labels.long()


def is_normalised(logp: torch.Tensor) -> bool:
    """Rows are log-probabilities of a full distribution (sum of exp = 1), as a softmax head gives."""
    tol = 1e-3 if logp.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
    return bool((torch.logsumexp(logp.detach().double(), dim=1).abs() < tol).all())


# ------------------------------------------------------------------------------ the expectation over outcomes
# The Fisher modes, once for every statistic built from output gradients (diagonal Fisher, K-FAC).
MODES = ("exact", "sampled", "empirical")


def check_mode(mode: str, num_samples: int = 1) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "sampled" and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")


def compact_exact_rounds(p: torch.Tensor) -> torch.Tensor:
    """[M, C] probabilities -> [M, max(C - 1, 1), C] vectors a_k with Σ_k a_k a_kᵀ = diag(p) - p pᵀ (in float64).

    Why this gives the exact Fisher with one round fewer: for a normalised distribution the score has mean zero,
    Σ_c p_c ∇log p_c = 0, so E_y (∇log p_y)² = Σ_{a,b} (diag(p))_ab J_a∘J_b equals the same sum with
    diag(p) - p pᵀ (the added term is (Σ_a p_a J_a)² = 0). That matrix is the covariance of a one-hot draw and
    has rank C - 1; its stick-breaking (Cholesky) factor is a_k = √(p_k q_{k+1} / q_k) (e_k - Σ_{j>k} p_j e_j /
    q_{k+1}) with q_k = Σ_{j>=k} p_j. Each a_k sums to zero, so the log-softmax backward passes it unchanged.
    Every round is still a square, so nothing cancels: binary classification costs one backward instead of two.
    """
    p = p.double()
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    m, c = p.shape
    if c < 2:
        return torch.zeros(m, 1, c, dtype=torch.float64, device=p.device)
    q = p.flip(-1).cumsum(-1).flip(-1)  # q[:, k] = Σ_{j>=k} p_j, summed from the small tail up (no cancellation)
    q_next = q[:, 1:]  # q_{k+1}, k = 0..C-2
    head = torch.where(q[:, :-1] > 0, p[:, :-1] * q_next / q[:, :-1], torch.zeros_like(q_next)).sqrt()  # [M, C-1]
    ratio = torch.where(q_next[:, :, None] > 0, p[:, None, :] / q_next[:, :, None].clamp(min=1e-300),
                        torch.zeros(1, dtype=p.dtype, device=p.device))  # [M, C-1, C]: p_j / q_{k+1}
    k = torch.arange(c - 1, device=p.device)[:, None]
    j = torch.arange(c, device=p.device)[None, :]
    shape = torch.where(j == k, torch.ones(1, dtype=p.dtype, device=p.device),
                        torch.where(j > k, -ratio, torch.zeros(1, dtype=p.dtype, device=p.device)))
    return head[:, :, None] * shape


def cotangents(out: Outcomes, mode: str, num_samples: int, generator: torch.Generator, index: int,
               compact: bool = False) -> torch.Tensor:
    """[R, N, F, C] output gradients of the log-probabilities, one slice per pseudo-example round R, such that
    Σ_r (∂/∂θ <cot_r, log p>)² is the per-example E_y (∂ log p(y)/∂θ)² of the mode: empirical (R = 1, the
    label),
    exact (R = C, class c scaled by √p_c; with compact=True R = C - 1 rounds of `compact_exact_rounds`, valid
    when log p is a normalised distribution as a function of θ, e.g. a log-softmax) or sampled (R = num_samples
    draws, each scaled by 1/√num_samples). Sampled draws use `generator` (seeded by the caller: seed * 1_000_003
    + batch index)."""
    lp = out.log_probs
    n, f, c = lp.shape
    mask = out.mask.to(lp.dtype)
    if mode == "empirical":
        if out.labels is None:
            raise ValueError(f"batch {index}: mode='empirical' needs 'labels' in every batch")
        labels = out.labels.reshape(n, -1)
        if labels.shape[1] != f:
            raise ValueError(f"batch {index}: labels shape {tuple(out.labels.shape)} does not match {n} x {f} outcomes")
        if ((labels >= c) | (labels < -100) | ((labels < 0) & (labels != -100))).any():
            raise ValueError(f"batch {index}: labels must be in [0, {c}) (or -100 to ignore)")
        valid = mask * (labels != -100).to(lp.dtype)
        return (F.one_hot(labels.clamp(min=0), c).to(lp.dtype) * valid[..., None]).unsqueeze(0)
    p = lp.detach().exp()
    if mode == "exact":
        if f > 1:
            raise ValueError("mode='exact' enumerates one categorical outcome per example (classification, multiple "
                             "choice); token-level LM statistics need mode='sampled' or 'empirical'")
        if compact:
            rounds = compact_exact_rounds(p.reshape(n * f, c)).to(lp.dtype)  # [N F, R, C]
            return rounds.reshape(n, f, -1, c).permute(2, 0, 1, 3) * mask[None, ..., None]
        eye = torch.eye(c, dtype=lp.dtype, device=lp.device)  # round k: class k with output gradient × √p_k
        return eye[:, None, None, :] * (p.sqrt() * mask[..., None]).permute(2, 0, 1)[..., None]
    if mode != "sampled":
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    draws = torch.multinomial(p.reshape(-1, c), num_samples, replacement=True, generator=generator)
    onehot = F.one_hot(draws.T.reshape(num_samples, n, f), c).to(lp.dtype)
    return onehot * mask[None, ..., None] / math.sqrt(num_samples)
