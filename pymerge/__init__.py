"""pymerge: Fisher-weighted and data-aware merging of fine-tuned models, with fused C++/CUDA kernels."""
from pymerge import ops  # noqa: F401

__version__ = "0.1.0"

# The streaming merge engine: `pymerge.merge(config, out_dir, force=False)`. Importing from the submodule binds
# the name `pymerge.merge` to the function (the import sets the module attribute first, then this rebinds it).
from pymerge.merge import merge, merge_state_dicts, plan_merge  # noqa: E402,F401


def __getattr__(name):  # `pymerge.dfmerge` without importing nevergrad / scipy on `import pymerge`
    if name in ("dfmerge", "DFMergeResult"):
        import importlib

        return getattr(importlib.import_module("pymerge.search.api"), name)
    raise AttributeError(f"module 'pymerge' has no attribute {name!r}")
