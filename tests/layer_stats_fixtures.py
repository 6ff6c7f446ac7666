"""Gram / K-FAC statistics files in the SEAMS.md format, computed here with plain hooks for the method tests
(independent of pymerge.stats: the methods must read any file of that format, whoever wrote it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _linear_layers(model):
    from transformers.pytorch_utils import Conv1D

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            yield name, mod, False
        elif isinstance(mod, Conv1D):
            yield name, mod, True


def layer_statistics(model, batches, kind="gram", skip=("classifier", "score", "lm_head")):
    """{tensors}, {metadata} of kind gram or kfac; kfac's output factor from the gradients of the summed logits'
    log-softmax at random labels (empirical-like; any PSD factor serves the method tests)."""
    layers, acc, counts, handles = {}, {}, {}, []
    captured = {}
    for name, mod, transposed in _linear_layers(model):
        if any(name.startswith(s) for s in skip):
            continue
        w = mod.weight
        d, k = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        has_bias = mod.bias is not None
        layers[name] = {"weight": name + ".weight", "bias": name + ".bias" if has_bias else None,
                        "transposed": transposed, "in_features": d, "out_features": k, "tokens": 0}

        def fwd(mod, inp, out, name=name, has_bias=has_bias):
            z = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            if has_bias:
                z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)
            key = name + (".gram" if kind == "gram" else ".kfac_in")
            acc[key] = acc.get(key, 0) + z.T @ z
            counts[name] = counts.get(name, 0) + z.shape[0]
            if kind == "kfac" and out.requires_grad:
                out.register_hook(lambda g, name=name: captured.setdefault(name, []).append(g.detach()))
        handles.append(mod.register_forward_hook(fwd))
    gen = torch.Generator().manual_seed(0)
    try:
        for batch in batches:
            with torch.set_grad_enabled(kind == "kfac"):
                logits = model(**batch).logits
                if kind == "kfac":
                    lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
                    y = torch.randint(0, lp.shape[-1], (lp.shape[0],), generator=gen)
                    lp.gather(1, y[:, None]).sum().backward()
                    for name, gs in captured.items():
                        gg = gs[0].reshape(-1, gs[0].shape[-1]).double()
                        acc[name + ".kfac_out"] = acc.get(name + ".kfac_out", 0) + gg.T @ gg
                    captured.clear()
                    model.zero_grad()
    finally:
        for h in handles:
            h.remove()
    from pymerge.stats.store import structure_fingerprint, weights_fingerprint

    tensors = {}
    for name, info in layers.items():
        info["tokens"] = counts[name]
        for suffix in ((".gram",) if kind == "gram" else (".kfac_in", ".kfac_out")):
            tensors[name + suffix] = (acc[name + suffix] / counts[name]).float().contiguous()
    meta = {"pymerge_stats": "1", "kind": kind, "mode": "empirical" if kind == "kfac" else "inputs",
            "num_examples": str(sum(b["input_ids"].shape[0] for b in batches)), "layers": json.dumps(layers),
            "structure": structure_fingerprint(model), "weights": weights_fingerprint(model)}
    return tensors, meta


def random_batches(vocab, n=2, batch=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, vocab, (batch, seq), generator=g)} for _ in range(n)]


def write_layer_stats(model, path: Path, kind="gram", seed=0):
    from safetensors.torch import save_file

    tensors, meta = layer_statistics(model, random_batches(model.config.vocab_size, seed=seed), kind)
    save_file(tensors, str(path), metadata=meta)
    return path
