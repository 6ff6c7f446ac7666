"""pymerge: Fisher-weighted and data-aware merging of fine-tuned models, with fused C++/CUDA kernels."""
from pymerge import ops  # noqa: F401

__version__ = "0.1.0"

# The streaming merge engine: `pymerge.merge(config, out_dir, force=False)`. The submodule pymerge.merge is
# imported first so that the name `pymerge.merge` ends up bound to the function, not to the module.
from pymerge import merge as _merge_module  # noqa: E402
from pymerge.merge import merge, merge_state_dicts, plan_merge  # noqa: E402,F401
