"""pymerge: Fisher-weighted and data-aware merging of fine-tuned models, with fused C++/CUDA kernels."""
from pymerge import ops  # noqa: F401

__version__ = "0.1.0"
