"""RegMean's Gram statistics: per linear layer (1/N) Σ z zᵀ over the N non-padding token rows of its input,
z augmented with a trailing 1 when the layer has a bias (weight and bias solved together), fp32 accumulation.
One forward per batch (no backward), through the shared capture."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from pymerge.stats import linear, logprobs
from pymerge.stats.batches import all_reduce_sums, my_batches
from pymerge.stats.capture import FrozenParameters, LayerCapture
from pymerge.stats.registry import register
from pymerge.stats.store import Statistics, base_metadata

MODES = ("forward",)  # inputs only: no expectation over outcomes


def _matrices(d_aug: int, k: int):
    return [d_aug]


@register("gram", modes=MODES, default_mode="forward",
          summary="RegMean Gram per linear layer: (1/N) Σ z zᵀ of its (bias-augmented) input rows")
def collect_gram(model, batches, *, mode: str = "forward", exclude: Sequence[str] = (), model_kind: str = "auto",
                 log_prob_fn: Optional[Callable] = None, max_memory_bytes: Optional[int] = None) -> Statistics:
    """Gram statistics of every nn.Linear / Conv1D of `model` (but those matching an `exclude` glob) over
    `batches` (the formats of pymerge.stats.logprobs; the model runs as for the Fisher). Refuses, before any
    work, matrices that do not fit (max_memory_bytes, default: the device's free memory)."""
    layers, device, dtype = linear.prepare("gram", model, exclude, _matrices, max_memory_bytes)
    moments = linear.SecondMoments(layers, device, dtype)
    rows = linear.TokenRows()

    def on_call(call):
        moments.add(call.name, call.inputs[0], rows)

    examples = 0
    with FrozenParameters(model), torch.no_grad(), \
            LayerCapture(layers, need_grads=False, on_call=on_call) as capture:
        for index, batch in my_batches(batches, device):
            _, objective = logprobs.resolve(model, batch, model_kind, log_prob_fn)
            rows.set_batch(batch)
            objective(model, batch, lambda n: None)
            linear.check_captured(capture.calls)
            capture.clear()
            moments.end_batch()
            examples += next(iter(batch.values())).shape[0]
    names = list(layers)
    counts = all_reduce_sums(moments.sums(), [float(examples)] + [moments.count[n] for n in names])
    examples, tokens = int(counts[0]), dict(zip(names, counts[1:]))
    if examples == 0:
        raise ValueError("batches: no examples (the iterable was empty)")
    tensors = {n + ".gram": moments.mean_(n, tokens[n]) for n in names}
    metadata = base_metadata("gram", mode, examples, model)
    metadata["layers"] = linear.layer_metadata(layers, tokens)
    return Statistics(tensors, metadata)
