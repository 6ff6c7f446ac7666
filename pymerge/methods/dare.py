"""DARE (Yu et al.): drop each task-vector entry with probability p, rescale by 1/(1-p), then merge the
sparsified task vectors with task arithmetic or TIES (`over`).

The random mask of model i and tensor NAME depends only on (seed, i, NAME), so a merge is reproducible and
does not depend on the order tensors are processed in or on the device.
"""
import zlib

from pymerge import ops
from pymerge.methods.base import MergeMethod, Param, in_range
from pymerge.methods.registry import register


def tensor_seed(seed: int, model_index: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{model_index}:{name}".encode())) % (2**62)


@register
class Dare(MergeMethod):
    name = "dare"
    description = "drop-and-rescale task vectors, then task arithmetic or TIES"
    needs_base = True
    params = (
        Param("p", float, check=in_range(0.0, 1.0, hi_open=True), help="drop probability (required)"),
        Param("seed", int, 0, help="random seed"),
        Param("over", str, "task_arithmetic", choices=("task_arithmetic", "ties"), help="how to combine"),
        Param("lambda", float, 1.0, help="scaling of the merged task vector"),
        Param("weight", float, 1.0, scope="model", help="per-model factor (over: task_arithmetic)"),
        Param("density", float, 1.0, check=in_range(0.0, 1.0, lo_open=True),
              help="TIES trim density after dropping (over: ties; 1 = sign election only)"),
    )

    def merge_tensor(self, x):
        p, seed = x.params["p"], x.params["seed"]
        tvs = [ops.dare(tv, p, tensor_seed(seed, i, x.name)) for i, tv in enumerate(x.task_vectors())]
        lam = x.params["lambda"]
        if x.params["over"] == "ties":
            return ops.ties_merge(x.base, tvs, x.params["density"], lam)
        coeffs = [lam * w for w in x.per_model("weight")]
        return ops.weighted_sum(tvs, coeffs, base=x.base)
