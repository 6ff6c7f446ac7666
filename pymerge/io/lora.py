"""A LoRA adapter merged into its base model through PEFT (mergekit's `model: PATH+ADAPTER`), in memory.

The merge happens on first use: transformers loads PATH with the class named in its config, PEFT applies the
adapter and `merge_and_unload` folds it into the weights. Only the tensors PATH's checkpoint stores are
exposed (tied weights stay tied), so the result lines up with the other models tensor by tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from pymerge.io.errors import CheckpointError
from pymerge.io.reader import CheckpointDir, TensorSource


class LoraSource(TensorSource):
    def __init__(self, base: Path, adapter: Path, label: Optional[str] = None):
        self.base_path, self.adapter_path = Path(base), Path(adapter)
        self.label = label or f"{base}+{adapter}"
        self._base = CheckpointDir(self.base_path)
        self._tensors: Optional[Dict[str, torch.Tensor]] = None

    def input_paths(self):
        return [self.base_path, self.adapter_path]

    def __str__(self):
        return f"{self.base_path}+{self.adapter_path}"

    @property
    def config(self):
        return self._base.config

    @property
    def directory(self):
        return self._base.directory

    owned = False  # tensors live in memory: methods must not modify them in place

    def _merged(self) -> Dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                from peft import PeftModel
            except ImportError:
                raise CheckpointError(f"{self.label}: merging a LoRA adapter needs PEFT: pip install "
                                      "'pymerge[lora]' (peft)") from None
            import transformers

            arch = (self.config or {}).get("architectures") or ["AutoModelForCausalLM"]
            cls = getattr(transformers, arch[0], None) or transformers.AutoModelForCausalLM
            model = cls.from_pretrained(str(self.base_path), dtype=torch.float32)
            merged = PeftModel.from_pretrained(model, str(self.adapter_path)).merge_and_unload()
            state = merged.state_dict()
            missing = [k for k in self._base.keys() if k not in state]
            if missing:
                raise CheckpointError(f"{self.label}: the merged model lacks {missing[:3]} of the base checkpoint")
            self._tensors = {k: state[k].detach().to(self._base.dtype(k)).contiguous() for k in self._base.keys()}
        return self._tensors

    def keys(self):
        return self._base.keys()

    def shape(self, name):
        return self._base.shape(name)

    def dtype(self, name):
        return self._base.dtype(name)

    def read(self, name, rows=None):
        t = self._merged()[name]
        return t if rows is None else t[rows[0]:rows[1]]
