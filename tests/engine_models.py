"""Tiny random Hugging Face models on disk for the engine tests: a BERT base, fine-tuned BERT classifiers
(2, 2 and 3 labels), a GPT-2 base and fine-tunes, and Fisher files for them."""
from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]


def bert_config(num_labels=2):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=16, num_labels=num_labels)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                      eos_token_id=0)


def _perturb(model, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save_tokenizer(path: Path):
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(path))


def fisher_for(state, seed, path: Path, mode="exact"):
    from pymerge.fisher import store

    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.rand(v.shape, generator=g) ** 2 + 1e-3 for k, v in state.items() if v.is_floating_point()}
    meta = {"pymerge_fisher": "1", "mode": mode, "num_examples": "8",
            "structure": store.structure_fingerprint(state), "weights": store.weights_fingerprint(state)}
    store.save(path, store.Fisher(tensors, meta))
    return path


def build_zoo(root: Path) -> dict:
    """Writes the models once; returns their paths."""
    from transformers import BertForSequenceClassification, BertModel, GPT2LMHeadModel

    torch.manual_seed(0)
    zoo = {}
    base = BertModel(bert_config())
    zoo["bert_base"] = root / "bert_base"
    base.save_pretrained(zoo["bert_base"])
    save_tokenizer(zoo["bert_base"])
    for i, (name, labels) in enumerate([("sst", 2), ("rte", 2), ("topic", 3)]):
        m = BertForSequenceClassification(bert_config(labels))
        m.bert.load_state_dict(base.state_dict())
        _perturb(m, seed=10 + i)
        zoo[name] = root / name
        m.save_pretrained(zoo[name])
        save_tokenizer(zoo[name])
        from safetensors.torch import load_file

        zoo[name + "_fisher"] = fisher_for(load_file(str(zoo[name] / "model.safetensors")), 100 + i,
                                           root / f"{name}.fisher.safetensors")
    g = GPT2LMHeadModel(gpt2_config())
    zoo["gpt2_base"] = root / "gpt2_base"
    g.save_pretrained(zoo["gpt2_base"], max_shard_size="4KB")
    for i in range(2):
        m = GPT2LMHeadModel(gpt2_config())
        m.load_state_dict(g.state_dict())
        _perturb(m, seed=20 + i)
        zoo[f"gpt2_ft{i}"] = root / f"gpt2_ft{i}"
        m.save_pretrained(zoo[f"gpt2_ft{i}"], max_shard_size="4KB")
    return zoo


def load_dir(path) -> dict:
    """All tensors of a checkpoint directory, read with the safetensors library (independent of pymerge.io)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(path / shard)))
        return out
    return load_file(str(path / "model.safetensors"))
