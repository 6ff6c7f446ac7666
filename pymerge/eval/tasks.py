"""Tasks for evaluation and for the coefficient search: data, how the model answers, and the metric.

A `Task` holds a validation set, an optional test set, unlabelled inputs for the Fisher (default: the validation
inputs), a metric ("accuracy", "macro_f1" or any callable (predictions, labels) -> float) and how the model
answers:

- kind="classification": the argmax of a sequence-classification head (each task keeps its own head);
- kind="multiple_choice": the answer with the highest log-likelihood under a language model (the lowest
  perplexity with length_normalize=True, as DF-Merge scores T5). Causal LMs (GPT-2, LLaMA-style) read
  context + answer; encoder-decoders (T5) encode the context once and decode every answer in one batch.
  Answers are per example (`"choices"` in the example) or shared by the task (`choices=`, e.g. label strings).

An example is a mapping with "label" (an int; for multiple choice also the text of the right answer) and either
"text" (+ optional "text_pair"; needs `tokenizer`) or "input_ids" (a list of token ids); `(text, label)` tuples
are accepted too. Choices are strings (tokenised) or lists of token ids.

Batches have the formats of pymerge.stats.logprobs, so the same batches feed `pymerge.fisher.estimate`
(`fisher_batches`) and the evaluation (`evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from pymerge.eval import metrics as _metrics
from pymerge.eval import scoring

KINDS = ("classification", "multiple_choice")
SPLITS = ("validation", "test", "fisher")


class TaskError(ValueError):
    """A task definition that cannot work (raised before any model work starts)."""


@dataclass
class _Item:
    ids: Optional[List[int]]                 # pre-tokenised context, or None (text below)
    text: Optional[str]
    text_pair: Optional[str]
    choices: Optional[List[Any]]             # per-example answers (strings or id lists)
    label: Any                               # int, answer text, or None (unlabelled)


@dataclass
class Task:
    name: str
    validation: Sequence[Any]
    test: Optional[Sequence[Any]] = None
    kind: str = "classification"
    fisher_inputs: Optional[Sequence[Any]] = None
    metric: Union[str, Callable] = "accuracy"
    choices: Optional[Sequence[Any]] = None
    num_labels: Optional[int] = None
    head: Optional[Mapping[str, torch.Tensor]] = None
    tokenizer: Any = None
    length_normalize: bool = True
    max_length: int = 128
    batch_size: int = 32
    _cache: Dict[Any, list] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"task name: expected a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise TaskError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        _metrics.get_metric(self.metric, f"{where}: metric")
        for attr in ("max_length", "batch_size"):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TaskError(f"{where}: {attr} must be a positive integer, got {v!r}")
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels < 1):
            raise TaskError(f"{where}: num_labels must be a positive integer, got {self.num_labels!r}")
        if self.kind == "classification" and self.choices is not None:
            raise TaskError(f"{where}: choices are for kind='multiple_choice' (classification uses the head)")
        if self.choices is not None and len(self.choices) < 2:
            raise TaskError(f"{where}: choices must list at least 2 answers, got {len(self.choices)}")
        self.validation = self._items(self.validation, "validation", labelled=True)
        if self.test is not None:
            self.test = self._items(self.test, "test", labelled=True)
        raw = self.fisher_inputs
        if raw is None:
            self.fisher_inputs = [_Item(i.ids, i.text, i.text_pair, i.choices, None) for i in self.validation]
        else:
            self.fisher_inputs = self._items(raw, "fisher_inputs", labelled=False)

    # ------------------------------------------------------------------ checks without a model
    def _items(self, examples, split: str, labelled: bool) -> List[_Item]:
        where = f"task {self.name!r}: {split}"
        if examples is None or isinstance(examples, (str, bytes)) or not hasattr(examples, "__len__"):
            raise TaskError(f"{where}: expected a list of examples, got {type(examples).__name__}")
        if len(examples) == 0:
            raise TaskError(f"{where} set is empty")
        items = []
        for n, ex in enumerate(examples):
            at = f"{where} example {n}"
            if isinstance(ex, _Item):  # already checked (dataclasses.replace of a Task)
                ex = {k: v for k, v in (("input_ids", ex.ids), ("text", ex.text), ("text_pair", ex.text_pair),
                                        ("choices", ex.choices), ("label", ex.label)) if v is not None}
            if isinstance(ex, tuple) and len(ex) == 2:
                ex = {"text": ex[0], "label": ex[1]}
            if not isinstance(ex, Mapping):
                raise TaskError(f"{at}: expected a mapping with 'text' or 'input_ids' (and 'label'), "
                                f"got {type(ex).__name__}")
            ids, text = ex.get("input_ids"), ex.get("text")
            if ids is None and text is None:
                raise TaskError(f"{at}: needs 'text' or 'input_ids' (keys: {sorted(ex)})")
            if ids is not None:
                ids = _id_list(ids, f"{at}: input_ids")
            elif self.tokenizer is None:
                raise TaskError(f"{at}: has text but the task has no tokenizer (pass tokenizer= or input_ids)")
            choices = ex.get("choices")
            if self.kind == "multiple_choice":
                choices = self.choices if choices is None else choices
                if choices is None:
                    raise TaskError(f"{at}: multiple choice needs 'choices' in the example or choices= on the task")
                if len(choices) < 2:
                    raise TaskError(f"{at}: needs at least 2 choices, got {len(choices)}")
                for c in choices:
                    if isinstance(c, str):
                        if self.tokenizer is None:
                            raise TaskError(f"{at}: choice {c!r} is text but the task has no tokenizer")
                    else:
                        _id_list(c, f"{at}: choice")
                choices = list(choices)
            elif choices is not None:
                raise TaskError(f"{at}: has 'choices' but the task is kind='classification'")
            label = ex.get("label")
            if labelled:
                label = self._check_label(label, choices, at)
            items.append(_Item(ids, None if text is None else str(text),
                               None if ex.get("text_pair") is None else str(ex.get("text_pair")), choices, label))
        if self.kind == "multiple_choice":
            counts = {len(i.choices) for i in items}
            if len(counts) > 1:
                raise TaskError(f"{where}: every example must have the same number of choices, got {sorted(counts)}")
        return items

    def _check_label(self, label, choices, at: str) -> int:
        if self.kind == "multiple_choice" and isinstance(label, str):
            if label not in choices:
                raise TaskError(f"{at}: label {label!r} is not one of its choices {choices}")
            return choices.index(label)
        if isinstance(label, bool) or not isinstance(label, int):
            if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
                label = int(label)
            else:
                raise TaskError(f"{at}: label must be an integer class index, got {label!r}")
        bound = len(choices) if self.kind == "multiple_choice" else self.num_labels
        if label < 0 or (bound is not None and label >= bound):
            what = "choices" if self.kind == "multiple_choice" else "num_labels"
            raise TaskError(f"{at}: label {label} out of range [0, {bound if bound is not None else 'inf'}) "
                            f"({what} = {bound})")
        return label

    def split(self, split: str) -> List[_Item]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        items = {"validation": self.validation, "test": self.test, "fisher": self.fisher_inputs}[split]
        if items is None:
            raise TaskError(f"task {self.name!r}: has no {split} set")
        return items

    @property
    def metric_fn(self):
        return _metrics.get_metric(self.metric)

    # ------------------------------------------------------------------ checks against a model
    def check_model(self, model) -> None:
        """Raises TaskError if `model` (with this task's head in place) cannot answer this task: no classification
        head, a head whose number of classes does not fit the labels / num_labels, or multiple choice on a model
        without a language-model head. Runs one example through the model for classification."""
        where = f"task {self.name!r}"
        cls = type(model).__name__
        if self.kind == "multiple_choice":
            get_out = getattr(model, "get_output_embeddings", None)
            if get_out is None or get_out() is None:
                raise TaskError(f"{where}: multiple choice scores answers by their log-likelihood, which needs a "
                                f"model with a language-model head (...ForCausalLM, ...LMHeadModel, "
                                f"...ForConditionalGeneration); got {cls}")
            if _is_encoder_decoder(model) and not hasattr(model, "get_encoder"):
                raise TaskError(f"{where}: encoder-decoder {cls} has no get_encoder()")
            return
        if cls.endswith(("LMHeadModel", "ForCausalLM", "ForConditionalGeneration", "ForMaskedLM")):
            raise TaskError(f"{where}: classification needs a sequence-classification head; {cls} is a language "
                            f"model (use kind='multiple_choice' with choices, or a ...ForSequenceClassification)")
        probe = next(iter(self.batches(model, "validation", batch_size=1)))
        try:
            logits = scoring.class_logits(model, _to(probe, _device(model)))
        except ValueError as exc:
            raise TaskError(f"{where}: {exc}") from exc
        except Exception as exc:  # a head of the wrong shape fails inside the forward
            raise TaskError(f"{where}: the model's head does not fit ({type(exc).__name__}: {exc})") from exc
        classes = logits.shape[-1]
        if self.num_labels is not None and classes != self.num_labels:
            raise TaskError(f"{where}: the head has {classes} outputs but the task has num_labels={self.num_labels}")
        top = max(i.label for i in self.validation + (self.test or []))
        if top >= classes:
            raise TaskError(f"{where}: label {top} out of range for a head with {classes} outputs")

    # ------------------------------------------------------------------ batches
    def batches(self, model, split: str = "validation", batch_size: Optional[int] = None, labels: bool = True,
                limit: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """CPU batches of `split` in the format `model` takes (pymerge.stats.logprobs' formats)."""
        items = self.split(split)
        if limit is not None:
            items = items[:limit]
        arch = "seq2seq" if _is_encoder_decoder(model) else "causal"
        encoded = self._encoded(split, arch, items)
        pad = _pad_id(model, self.tokenizer)
        bs = batch_size or self.batch_size
        for lo in range(0, len(encoded), bs):
            chunk = encoded[lo:lo + bs]
            if self.kind == "classification":
                batch = _collate_classification(chunk, pad)
            elif arch == "seq2seq":
                batch = _collate_seq2seq(chunk, pad)
            else:
                batch = _collate_causal(chunk, pad, self.max_length)
            if labels and split != "fisher":
                batch["labels"] = torch.tensor([items[lo + j].label for j in range(len(chunk))], dtype=torch.long)
            yield batch

    def sorted_batches(self, model, split: str = "validation", batch_size: Optional[int] = None
                       ) -> Tuple[List[Dict[str, torch.Tensor]], List[int]]:
        """(unlabelled CPU batches, order) of `split` for evaluation: the examples sorted by token length (stable)
        so that a batch pads to lengths near its own, collated once and kept (the search scores the same sets
        every evaluation); order[k] is the example index of the k-th row over all batches. Sorting only
        regroups examples: an example's padded positions are masked, so its scores do not depend on its batch."""
        items = self.split(split)
        arch = "seq2seq" if _is_encoder_decoder(model) else "causal"
        pad = _pad_id(model, self.tokenizer)
        bs = batch_size or self.batch_size
        key = ("sorted", split, arch, len(items), pad, bs)
        if key not in self._cache:
            encoded = self._encoded(split, arch, items)
            order = sorted(range(len(encoded)), key=lambda k: self._length(encoded[k], arch))
            batches = []
            for lo in range(0, len(order), bs):
                chunk = [encoded[k] for k in order[lo:lo + bs]]
                if self.kind == "classification":
                    batches.append(_collate_classification(chunk, pad))
                elif arch == "seq2seq":
                    batches.append(_collate_seq2seq(chunk, pad))
                else:
                    batches.append(_collate_causal(chunk, pad, self.max_length))
            self._cache[key] = (batches, order)
        return self._cache[key]

    def _length(self, enc, arch: str) -> Tuple[int, int]:
        """The padded width an encoded example needs: its tokens, or (context, longest answer) for choices."""
        if self.kind == "classification":
            return len(enc["input_ids"]), 0
        ctx, answers = enc
        if arch == "seq2seq":
            return len(ctx), max(len(a) for a in answers)
        # a causal row is the context cut to fit max_length, then the answer (as _collate_causal builds it)
        return max(min(len(ctx), max(1, self.max_length - len(a))) + len(a) for a in answers), 0

    def _encoded(self, split: str, arch: str, items: List[_Item]) -> list:
        key = (split, arch, len(items))
        if key not in self._cache:
            self._cache[key] = [self._encode(i, arch) for i in items]
        return self._cache[key]

    def _encode(self, item: _Item, arch: str):
        tok = self.tokenizer
        if item.ids is not None:
            ctx = {"input_ids": list(item.ids)[:self.max_length]}
        else:
            enc = tok(item.text, item.text_pair, truncation=True, max_length=self.max_length)
            ctx = {k: list(enc[k]) for k in ("input_ids", "token_type_ids") if k in enc}
        if self.kind == "classification":
            return ctx
        answers = []
        for c in item.choices:
            if isinstance(c, str):
                c = tok(c, add_special_tokens=(arch == "seq2seq"))["input_ids"]
            answers.append([int(t) for t in c])
        if any(len(a) == 0 for a in answers):
            raise TaskError(f"task {self.name!r}: an answer choice is empty after tokenisation ({item.choices})")
        return ctx["input_ids"], answers


# ---------------------------------------------------------------------- collation
def _pad(rows: List[List[int]], value: int) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _collate_classification(chunk, pad: int) -> Dict[str, torch.Tensor]:
    ids, mask = _pad([c["input_ids"] for c in chunk], pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    if all("token_type_ids" in c for c in chunk):
        batch["token_type_ids"] = _pad([c["token_type_ids"] for c in chunk], 0)[0]
    return batch


def _collate_causal(chunk, pad: int, max_length: int) -> Dict[str, torch.Tensor]:
    """input_ids [N, C, T] = context + answer c (the context cut from the left to fit max_length)."""
    n, c = len(chunk), len(chunk[0][1])
    rows, answer_starts = [], []
    for ctx, answers in chunk:
        for a in answers:
            keep = max(1, max_length - len(a))
            head = ctx[-keep:]
            rows.append(head + a)
            answer_starts.append(len(head))
    ids, mask = _pad(rows, pad)
    choice_mask = torch.zeros_like(mask)
    for i, (r, s) in enumerate(zip(rows, answer_starts)):
        choice_mask[i, s:len(r)] = 1
    t = ids.shape[1]
    return {"input_ids": ids.view(n, c, t), "attention_mask": mask.view(n, c, t),
            "choice_mask": choice_mask.view(n, c, t)}


def _collate_seq2seq(chunk, pad: int) -> Dict[str, torch.Tensor]:
    """input_ids [N, T] (the context, encoded once), choice_ids [N, C, L] (every answer, decoded together)."""
    n, c = len(chunk), len(chunk[0][1])
    ids, mask = _pad([ctx for ctx, _ in chunk], pad)
    cids, cmask = _pad([a for _, answers in chunk for a in answers], pad)
    length = cids.shape[1]
    return {"input_ids": ids, "attention_mask": mask, "choice_ids": cids.view(n, c, length),
            "choice_attention_mask": cmask.view(n, c, length)}


# ---------------------------------------------------------------------- evaluation
def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _pad_id(model, tokenizer) -> int:
    for src in (getattr(model, "config", None), tokenizer):
        pad = getattr(src, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _scores(model, task: Task, batch) -> torch.Tensor:
    if task.kind == "classification":
        return scoring.class_logits(model, batch)
    return scoring.choice_log_probs(model, batch, task.length_normalize)


def predict(model, task: Task, split: str = "validation", batch_size: Optional[int] = None,
            sort_by_length: bool = True) -> Tuple[List[int], List[int]]:
    """(predicted class / answer indices, labels) of `model` on a split of `task`, batched, in eval mode, in the
    split's order. sort_by_length (default): batches of similar lengths, collated once and cached on the task
    (Task.sorted_batches), and one device sync at the end; False: batches in the split's order."""
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        if not sort_by_length:
            preds: List[int] = []
            for batch in task.batches(model, split, batch_size, labels=False):
                preds += _scores(model, task, _to(batch, device)).argmax(-1).tolist()
        else:
            batches, order = task.sorted_batches(model, split, batch_size)
            top = [_scores(model, task, _to(b, device)).argmax(-1) for b in batches]
            ranked = torch.cat(top).tolist()  # one .tolist() (a device sync), not one per batch
            preds = [0] * len(order)
            for row, k in enumerate(order):
                preds[k] = ranked[row]
    finally:
        model.train(was_training)
    return preds, [item.label for item in task.split(split)]


def evaluate(model, task: Task, split: str = "validation", batch_size: Optional[int] = None) -> float:
    """The task's metric of `model` on `split` ("validation" | "test")."""
    if split not in ("validation", "test"):
        raise ValueError(f"split: expected 'validation' or 'test', got {split!r}")
    preds, labels = predict(model, task, split, batch_size)
    return float(task.metric_fn(preds, labels))


def fisher_batches(model, task: Task, n: int = 30, batch_size: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """The first `n` unlabelled Fisher inputs of `task` as batches for `pymerge.fisher.estimate(mode="exact")`
    (the expectation is over the head's classes, or over the answer choices)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive number of Fisher examples, got {n!r}")
    return list(task.batches(model, "fisher", batch_size, labels=False, limit=n))


def _id_list(ids, where: str) -> List[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
        raise TaskError(f"{where}: expected a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise TaskError(f"{where}: token ids must be non-negative integers")
    return [int(t) for t in ids]
