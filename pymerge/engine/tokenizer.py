"""`tokenizer_source` (mergekit's semantics): the output tokenizer is the base's, one model's, or the union of
all, and every model's embedding rows (input embeddings and LM head) are permuted into its vocabulary first.

Row of token T in model m: m's own row when m's tokenizer has T; otherwise a default shared by the models
missing T: the row of the only model that has T, else the base model's row, else the mean of the rows of the
models that have T (zero when none has it). The union keeps the base tokenizer (the first model's without a
base) and adds the others' missing tokens, as mergekit does. Embedding tensors are recognised by name
(`EMBED_MARKERS`) and by having one row per token of the model's config `vocab_size`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional

import torch

from pymerge.io.errors import CheckpointError
from pymerge.io.reader import TensorSource

EMBED_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")


class OutputTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def _load_tokenizer(directory: Optional[Path], label: str):
    from transformers import AutoTokenizer

    if directory is None:
        raise CheckpointError(f"{label}: tokenizer_source needs each model's tokenizer files; this input has "
                              "no directory")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 (transformers raises many kinds)
        raise CheckpointError(f"{label}: cannot load its tokenizer from {directory}: {exc}") from None


def _union(base_tok, others):
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:  # a copy: never modify a loaded tokenizer
        base_tok.save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d)
    have = set(out.get_vocab())
    for tok in others:
        for t in sorted(tok.get_vocab(), key=tok.get_vocab().get):
            if t not in have:
                out.add_tokens(t)
                have.add(t)
    return out


def _is_embedding(name: str, shape, vocab_rows: Optional[int]) -> bool:
    return (len(shape) == 2 and vocab_rows is not None and shape[0] == vocab_rows
            and any(m in name for m in EMBED_MARKERS))


class EmbeddingPermuter:
    """Permutes the embedding tensors of all sources into the output vocabulary, one tensor name at a time."""

    def __init__(self, sources: List[TensorSource], vocabs: List[Dict[str, int]], out_vocab: Dict[str, int],
                 base_index: Optional[int]):
        self.sources, self.vocabs, self.out_vocab, self.base_index = sources, vocabs, out_vocab, base_index
        self.rows = len(out_vocab)
        self._cache: Dict[str, List[Optional[torch.Tensor]]] = {}

    def _names(self, name: str) -> List[Optional[str]]:
        """`name` in every source: the same name, or the one that differs by a leading module prefix (a
        `BertModel` base names `embeddings.word_embeddings.weight` what the models call `bert.embeddings...`);
        None where a source lacks it (a base model without the fine-tuned models' LM head)."""
        out: List[Optional[str]] = []
        for s in self.sources:
            if name in s:
                out.append(name)
                continue
            hits = [k for k in s.keys() if k.endswith("." + name) or name.endswith("." + k)]
            if len(hits) > 1:
                raise CheckpointError(f"{s.label}: tokenizer_source: several tensors could be {name!r}: {hits[:3]}")
            out.append(hits[0] if hits else None)
        return out

    def tensor(self, i: int, name: str) -> torch.Tensor:
        names = self._names(name)
        key = min((n for n in names if n is not None), key=len)
        if key not in self._cache:
            self._cache[key] = self._permute(names)
        got = self._cache[key]
        t, got[i] = got[i], None
        if all(x is None for x in got):
            del self._cache[key]
        return t

    def _permute(self, names: List[Optional[str]]) -> List[Optional[torch.Tensor]]:
        olds = [s.read(n).float() if n is not None else None for s, n in zip(self.sources, names)]
        h = next(o for o in olds if o is not None).shape[1]
        n = len(self.sources)
        out = [torch.zeros(self.rows, h) for _ in range(n)]
        for tok, new in self.out_vocab.items():
            idx = [v.get(tok, -1) for v in self.vocabs]
            idx = [j if olds[k] is not None and 0 <= j < olds[k].shape[0] else -1 for k, j in enumerate(idx)]
            have = [k for k in range(n) if idx[k] >= 0]
            if len(have) == sum(o is not None for o in olds):
                for k in have:
                    out[k][new] = olds[k][idx[k]]
                continue
            if len(have) == 1:
                default = olds[have[0]][idx[have[0]]]
            elif not have:
                default = torch.zeros(h)
            elif self.base_index is not None and idx[self.base_index] >= 0:
                default = olds[self.base_index][idx[self.base_index]]
            else:
                default = sum(olds[k][idx[k]] for k in have) / len(have)
            for k in range(n):
                out[k][new] = olds[k][idx[k]] if idx[k] >= 0 else default
        return [o.to(s.dtype(nm)) if nm is not None else None for o, s, nm in zip(out, self.sources, names)]


class PermutedSource(TensorSource):
    """A source whose embedding tensors are read through the permuter (new row count); the rest unchanged."""

    def __init__(self, inner: TensorSource, permuter: EmbeddingPermuter, index: int, embed_names: List[str]):
        self.inner, self.permuter, self.index = inner, permuter, index
        self.embed_names = set(embed_names)
        self.label = inner.label
        self.metadata = inner.metadata
        self.config = copy.deepcopy(inner.config)
        if self.config is not None and "vocab_size" in self.config:
            self.config["vocab_size"] = permuter.rows

    @property
    def directory(self):
        return self.inner.directory

    @property
    def owned(self):
        return self.inner.owned

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        s = tuple(self.inner.shape(name))
        return (self.permuter.rows,) + s[1:] if name in self.embed_names else s

    def dtype(self, name):
        return self.inner.dtype(name)

    def read(self, name, rows=None):
        if name not in self.embed_names:
            return self.inner.read(name, rows)
        t = self.permuter.tensor(self.index, name)
        return t if rows is None else t[rows[0]:rows[1]].clone()

    def __getattr__(self, attr):  # layer_depth and friends of the wrapped source
        if attr in ("inner",):
            raise AttributeError(attr)
        return getattr(self.inner, attr)


def apply_tokenizer_source(cfg, models: List[TensorSource], base: Optional[TensorSource]):
    """(models, base, OutputTokenizer) with embeddings permuted per `cfg.tokenizer_source`; unchanged if unset."""
    choice = getattr(cfg, "tokenizer_source", None)
    if choice is None:
        return models, base, None
    sources = models + ([base] if base is not None else [])
    toks = [_load_tokenizer(s.directory, s.label) for s in sources]
    base_index = len(models) if base is not None else None
    first = toks[base_index] if base_index is not None else toks[0]
    if choice == "base":
        out_tok = first
    elif choice == "union":
        out_tok = _union(first, [t for i, t in enumerate(toks) if i != (base_index or 0)])
    elif isinstance(choice, str) and choice in [m.name for m in cfg.models]:
        out_tok = toks[[m.name for m in cfg.models].index(choice)]
    else:
        out_tok = _load_tokenizer(Path(choice), f"tokenizer_source {choice}")
    out_vocab = out_tok.get_vocab()
    vocabs = [t.get_vocab() for t in toks]
    permuter = EmbeddingPermuter(sources, vocabs, out_vocab, base_index)
    wrapped = []
    for i, s in enumerate(sources):
        rows = (s.config or {}).get("vocab_size")
        names = [n for n in s.keys() if _is_embedding(n, s.shape(n), rows)]
        if not names:
            raise CheckpointError(f"{s.label}: tokenizer_source found no embedding tensor with vocab_size {rows} "
                                  f"rows (looked for names containing {list(EMBED_MARKERS)})")
        wrapped.append(PermutedSource(s, permuter, i, names))
    new_models = wrapped[:len(models)]
    new_base = wrapped[len(models)] if base is not None else None
    return new_models, new_base, OutputTokenizer(out_tok)
