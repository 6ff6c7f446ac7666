"""Loads the compiled ops (pymerge._C) once and says clearly when they are missing."""
import os
import warnings

import torch

_loaded = None


def load() -> bool:
    """Import pymerge._C, which registers torch.ops.pymerge.*. Returns whether it is available.

    Without the extension the pure-torch references in pymerge.ops are used, with one warning;
    PYMERGE_REQUIRE_EXTENSION=1 (set by the test suite) turns that into an error instead.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        from pymerge import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)

        _loaded = True
    except ImportError as exc:
        if os.environ.get("PYMERGE_REQUIRE_EXTENSION") == "1":
            raise ImportError(
                "pymerge._C is not built: run `make build` (or `pip install --no-build-isolation .`)"
            ) from exc
        warnings.warn(
            f"pymerge._C could not be imported ({exc}); falling back to the slow pure-torch reference ops. "
            "Build it with `make build` or `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        _loaded = False
    return _loaded


def has_op(name: str) -> bool:
    """Whether torch.ops.pymerge.<name> has a kernel for the given device type."""
    return load() and hasattr(torch.ops.pymerge, name)


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("pymerge::fisher_merge", "CUDA")
