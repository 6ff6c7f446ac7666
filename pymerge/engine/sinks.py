"""Where merged tensors go: dicts in memory (tests, small models) or an atomic output directory on disk."""
from __future__ import annotations

from typing import Dict, List

import torch

from pymerge.engine.plan import MergePlan
from pymerge.io.writer import OutputDirectory, safe_task_name


class MemorySink:
    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.main_names = {e.name for e in plan.main_entries()}
        self.state: Dict[str, List[torch.Tensor]] = {}
        self.heads: Dict[str, Dict[str, torch.Tensor]] = {}

    def main(self, name, t):
        self.state.setdefault(name, []).append(t)

    def head(self, i, name, t):
        if self.plan.config.heads != "keep":
            return
        self.heads.setdefault(self.plan.task_names[i], {})[name] = t
        if i == self.plan.config_index and name in self.main_names:
            self.state[name] = [t]

    def result(self):
        return {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in self.state.items()}


class DiskSink:
    def __init__(self, plan: MergePlan, out: OutputDirectory):
        self.plan = plan
        self.ckpt = out.checkpoint([(e.name, e.dtype, e.shape) for e in plan.main_entries()],
                                   plan.config.max_shard_size)
        self.head_files = {}
        for i, task in enumerate(plan.task_names):
            es = plan.head_entries(i)
            if es:
                src = plan.models[i]
                self.head_files[i] = out.file(
                    f"heads/{safe_task_name(task)}.safetensors",
                    [(e.name, head_dtype(plan, src, e), tuple(src.shape(e.name))) for e in es],
                    metadata={"pymerge_task": task})

    def main(self, name, t):
        self.ckpt.write(name, t)

    def head(self, i, name, t):
        if i in self.head_files:
            self.head_files[i].write(name, t)
            if i == self.plan.config_index and name in self.ckpt:
                self.ckpt.write(name, t)


def head_dtype(plan, src, e):
    d = src.dtype(e.name)
    out = getattr(plan.config, "out_dtype", None) or plan.config.dtype
    return out if out is not None and d.is_floating_point else d
