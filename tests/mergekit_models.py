"""Tiny random Llama / Mistral-style causal LMs on disk (with word-level tokenizers) for the mergekit tests."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]


def llama_config(kind: str = "llama", layers: int = 4, vocab: int = 32):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if kind == "mistral" else LlamaConfig
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **extra)


def save_tokenizer(path: Path, words: List[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))


def make_model(path: Path, seed: int, kind: str = "llama", layers: int = 4, base: Optional[Path] = None,
               scale: float = 0.05, words: Optional[List[str]] = None) -> Path:
    """A random model (seed), or `base` perturbed by scale · N(0, 1) (a fine-tune of it)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM

    words = words or WORDS
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        if len(words) != model.config.vocab_size:
            model.resize_token_embeddings(len(words))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    else:
        cls = MistralForCausalLM if kind == "mistral" else LlamaForCausalLM
        model = cls(llama_config(kind, layers, len(words)))
    model.save_pretrained(str(path))
    save_tokenizer(path, words)
    return path


def build_family(root: Path, kind: str = "llama", n: int = 3, layers: int = 4) -> dict:
    """base + n fine-tunes of it: {"base": path, "ft0": ..., ...}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"base": make_model(root / f"{kind}_base", 0, kind, layers)}
    for i in range(n):
        out[f"ft{i}"] = make_model(root / f"{kind}_ft{i}", 10 + i, kind, layers, base=out["base"])
    return out
