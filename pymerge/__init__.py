"""pymerge: Fisher-weighted and data-aware merging of fine-tuned models, with fused C++/CUDA kernels.

Importing pymerge is cheap: the command line's `--help` must not pay for `import torch`. The public names are
loaded on first use (PEP 562). When torch is already imported, the compiled ops are loaded at once, so
`import torch; import pymerge` is enough for `torch.ops.pymerge.*` to exist.
"""
import importlib
import sys

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "ops": ("pymerge.ops", None),
    "engine": ("pymerge.engine", None),
    "merge": ("pymerge.engine", "merge"),
    "merge_state_dicts": ("pymerge.engine", "merge_state_dicts"),
    "plan_merge": ("pymerge.engine", "plan_merge"),
    "dfmerge": ("pymerge.search.api", "dfmerge"),
    "DFMergeResult": ("pymerge.search.api", "DFMergeResult"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pymerge' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


if "torch" in sys.modules:
    from pymerge import ops  # noqa: F401,E402  (registers torch.ops.pymerge.*)
