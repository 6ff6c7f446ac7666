"""Model Stock (Jang et al. 2024): move from the base towards the average of the fine-tuned models by
t = N cos θ / (1 + (N - 1) cos θ), cos θ the mean pairwise cosine between task vectors (per tensor, or per
row with `filter_wise: true`), as mergekit does: θ = t · mean_i θ_i + (1 - t) · θ_pre. Needs N >= 2.
"""
import torch

from pymerge import ops
from pymerge.methods.base import ConfigError, MergeMethod, Param
from pymerge.methods.registry import register


def stock_ratio(task_vectors, filter_wise: bool) -> torch.Tensor:
    """t (a 0-d tensor, or one value per row with filter_wise) from fp32 task vectors."""
    if filter_wise:
        vs = [v.unsqueeze(0) if v.dim() < 2 else v.reshape(v.shape[0], -1) for v in task_vectors]
    else:
        vs = [v.reshape(-1) for v in task_vectors]
    cos = []
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            norm = torch.linalg.vector_norm(vs[i], dim=-1) * torch.linalg.vector_norm(vs[j], dim=-1)
            cos.append(((vs[i] * vs[j]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)
    n = len(vs)
    return n * c / (1 + (n - 1) * c)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    description = "Model Stock: interpolate base -> average by the task vectors' mean cosine"
    needs_base = True
    params = (Param("filter_wise", bool, False, help="one ratio per row (output filter) instead of per tensor"),
              Param("weight", float, 1.0, scope="model", help="accepted for mergekit configs; no effect (as there)"),)

    def validate(self, global_params, model_params):
        if len(model_params) < 2:
            raise ConfigError(f"model_stock needs at least 2 models besides base_model, got {len(model_params)}")

    def merge_tensor(self, x):
        n = len(x.models)
        tvs = [m.float() - x.base.float() for m in x.models]
        t = stock_ratio(tvs, x.params["filter_wise"])
        del tvs
        if t.dim() == 0:
            t = float(t)
            return ops.weighted_sum(list(x.models) + [x.base], [t / n] * n + [1.0 - t])
        avg = sum(m.float() for m in x.models) / n  # fp32: a bf16 average would round before the blend
        shape = (-1,) + (1,) * (x.base.dim() - 1)
        t = t.reshape(shape)
        return t * avg + (1 - t) * x.base.float()
