"""Merge methods: one small module each, registered by name (see registry.py and base.py).

To add one (e.g. regmean / mats): subclass `MergeMethod` in its own module, decorate it with `@register`, and
import the module below. Per-model side inputs (Fisher, Gram matrices) are `Param(..., type="file",
scope="model")`; the engine opens them lazily and hands `inputs.aux[param][i]` per tensor (override `aux_key`
to map a parameter name to another entry name, e.g. a module's Gram matrix).
"""
from pymerge.methods.base import ConfigError, MergeMethod, Param, TensorInputs  # noqa: F401
from pymerge.methods.registry import available, get_method, register  # noqa: F401

# Built-in methods (import order = listing order).
from pymerge.methods import average, task_arithmetic, general_task_arithmetic, ties, dare  # noqa: F401,E402
from pymerge.methods import fisher, dfmerge, mask_fisher  # noqa: F401,E402
from pymerge.methods import slerp, passthrough, model_stock, della, breadcrumbs  # noqa: F401,E402
