"""General task arithmetic (GTA, DF-Merge §2): θ = θ_pre + Σ λ_i τ_i with one coefficient per model."""
from pymerge.methods.base import MergeMethod, Param
from pymerge.methods.registry import register
from pymerge.methods.task_arithmetic import task_vector_sum


@register
class GeneralTaskArithmetic(MergeMethod):
    name = "general_task_arithmetic"
    elementwise = True
    description = "pretrained + sum_i lambda_i * task vector i"
    needs_base = True
    params = (Param("lambda", float, scope="model", help="per-model coefficient λ_i (required)"),)

    def merge_tensor(self, x):
        return task_vector_sum(x, x.per_model("lambda"))
