"""Merge methods: one small module each, registered by name (see registry.py and base.py).

To add one: subclass `MergeMethod` in its own module, decorate it with `@register`, and import the module below.
Per-model side files are `Param(..., type="file", scope="model")`; the method says what they hold with
`side_inputs(params, model_params)` (kinds fisher, masks, tensors, model, gram, kfac: pymerge/methods/layers.py).
Per-parameter kinds arrive as `inputs.aux[param][i]` with each tensor (override `aux_key` to map a tensor name to
another entry name); layer kinds (gram, kfac) make the engine hand each linear layer's weight and bias together
to `merge_layer` (regmean.py, mats.py).
"""
from pymerge.methods.base import ConfigError, MergeMethod, Param, TensorInputs  # noqa: F401
from pymerge.methods.registry import available, get_method, register  # noqa: F401

# Built-in methods (import order = listing order).
from pymerge.methods import average, task_arithmetic, general_task_arithmetic, ties, dare  # noqa: F401,E402
from pymerge.methods import fisher, dfmerge, mask_fisher  # noqa: F401,E402
from pymerge.methods import slerp, passthrough, model_stock, della, breadcrumbs  # noqa: F401,E402
from pymerge.methods import regmean, mats  # noqa: F401,E402
