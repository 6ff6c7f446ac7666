"""K-FAC factors (MaTS eq. 13-14) per linear layer: the input factor A = E[z zᵀ] (z bias-augmented, as for the
Gram) and the output-gradient factor G = E[g gᵀ], g = ∂ log p(y | x)/∂o the gradient of the layer's output row o,
under a Fisher mode: empirical (the label; the default, the paper's best), exact (every outcome as a
pseudo-example weighted by p_c) or sampled. Both are averaged over the N non-padding token rows of the layer.

One forward captures Z (and the outputs), one backward per pseudo-example round (one for empirical) streams each
layer's G into G's accumulator as autograd produces it (capture.streamed_backward); no weight gradient is formed.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from pymerge.stats import linear, logprobs
from pymerge.stats.batches import all_reduce_sums, my_batches
from pymerge.stats.capture import FrozenParameters, LayerCapture, streamed_backward
from pymerge.stats.registry import register
from pymerge.stats.store import Statistics, base_metadata


def _matrices(d_aug: int, k: int):
    return [d_aug, k]


@register("kfac", modes=logprobs.MODES, default_mode="empirical",
          summary="K-FAC factors per linear layer: A = E[z zᵀ] of inputs, G = E[g gᵀ] of output gradients")
def collect_kfac(model, batches, *, mode: str = "empirical", num_samples: int = 1, seed: int = 0,
                 exclude: Sequence[str] = (), model_kind: str = "auto", log_prob_fn: Optional[Callable] = None,
                 length_normalize: bool = False, max_memory_bytes: Optional[int] = None) -> Statistics:
    """K-FAC factors of every nn.Linear / Conv1D of `model` (but those matching an `exclude` glob) over `batches`
    (formats of pymerge.stats.logprobs). mode / num_samples / seed as for the diagonal Fisher. Refuses, before any
    work, factors that do not fit (max_memory_bytes, default: the device's free memory)."""
    logprobs.check_mode(mode, num_samples)
    layers, device, dtype = linear.prepare("kfac", model, exclude, _matrices, max_memory_bytes)
    moments = linear.SecondMoments(layers, device, dtype)
    grams = {n: torch.zeros(linear.sizes(m)[1], linear.sizes(m)[1], dtype=dtype, device=device)
             for n, m in layers.items()}
    rows = linear.TokenRows()

    def on_grad(call, g):
        linear.add_gram_(grams[call.name], rows.select(call.name, g).to(dtype))

    examples = 0
    with FrozenParameters(model), LayerCapture(layers) as capture:
        for index, batch in my_batches(batches, device):
            _, objective = logprobs.resolve(model, batch, model_kind, log_prob_fn)
            rows.set_batch(batch)
            capture.clear()
            capture.enabled = True
            with torch.enable_grad():
                out = objective(model, batch, _set_rows(capture), length_normalize)
            capture.enabled = False
            linear.check_captured(capture.calls)
            calls = [c for c in capture.calls if c.output is not None]
            for c in calls:
                moments.add(c.name, c.inputs[0], rows)
            moments.end_batch()
            gen = torch.Generator(device=out.log_probs.device).manual_seed(seed * 1_000_003 + index)
            cot = logprobs.cotangents(out, mode, num_samples, gen, index)
            with torch.enable_grad():
                for r in range(cot.shape[0]):
                    streamed_backward(out.log_probs, calls, cot[r], on_grad, retain_graph=r + 1 < cot.shape[0])
            capture.clear()
            del out, calls
            examples += out_rows(batch)
    names = list(layers)
    sums = {n + ".a": t for n, t in moments.sums().items()}
    sums.update({n + ".g": t for n, t in grams.items()})
    counts = all_reduce_sums(sums, [float(examples)] + [moments.count[n] for n in names])
    examples, tokens = int(counts[0]), dict(zip(names, counts[1:]))
    if examples == 0:
        raise ValueError("batches: no examples (the iterable was empty)")
    tensors = {}
    for n in names:
        tensors[n + ".kfac_in"] = moments.mean_(n, tokens[n])
        tensors[n + ".kfac_out"] = grams[n].div_(max(tokens[n], 1.0)).float().cpu()
    metadata = base_metadata("kfac", mode, examples, model)
    metadata["layers"] = linear.layer_metadata(layers, tokens)
    metadata["length_normalize"] = str(bool(length_normalize))
    if mode == "sampled":
        metadata.update(num_samples=str(num_samples), seed=str(seed))
    return Statistics(tensors, metadata)


def out_rows(batch) -> int:
    return next(iter(batch.values())).shape[0]


def _set_rows(capture):
    def set_rows(n: int) -> None:
        capture.batch_size = n
    return set_rows
