"""The streaming merge engine: plan from headers only, then merge tensor by tensor into an atomic output.

    plan_merge(config)        opens every input lazily and validates names, shapes, dtypes, architectures and
                              side-input files; no tensor data is read                      (plan.py)
    merge(config, out_dir)    streams the plan into a sharded safetensors checkpoint (+ heads/TASK.safetensors)
                              and its side files                                  (run.py, sinks.py, output.py)
    merge_state_dicts(config) the same plan and methods, into dicts in memory (tests, small models)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from pymerge.engine.output import write_side_files
from pymerge.engine.plan import ARCH_KEYS, FLOAT_DTYPES, MergePlan, PlanEntry, check_outputs, plan_merge  # noqa: F401
from pymerge.engine.run import DEFAULT_CHUNK_BYTES, run_plan
from pymerge.engine.sinks import DiskSink, MemorySink
from pymerge.io.writer import OutputDirectory, check_target


@dataclass
class MergeResult:
    out_dir: Optional[Path]
    state_dict: Dict[str, torch.Tensor]            # in-memory merges only
    heads: Dict[str, Dict[str, torch.Tensor]]      # in-memory merges only
    plan: MergePlan


def merge_state_dicts(config, *, progress: bool = False, chunk_bytes: Optional[int] = None) -> MergeResult:
    """Run a merge in memory: returns the main state dict and, per task, its head tensors (`heads: keep`)."""
    plan = plan_merge(config)
    sink = MemorySink(plan)
    run_plan(plan, sink, progress, chunk_bytes)
    return MergeResult(None, sink.result(), sink.heads, plan)


def merge(config, out_dir, *, force: bool = False, progress: bool = True,
          chunk_bytes: Optional[int] = DEFAULT_CHUNK_BYTES, allow_pickle: Optional[bool] = None,
          allow_foreign_stats: Optional[bool] = None) -> MergeResult:
    """Merge as the config says into `out_dir` (a directory `from_pretrained` loads), atomically.

    `config` is a YAML path, a dict or a MergeConfig. An existing `out_dir` is replaced only with force=True,
    and never when it is, contains or lies inside an input.
    """
    plan = plan_merge(config, allow_pickle=allow_pickle, allow_foreign_stats=allow_foreign_stats)  # headers only
    check_outputs(plan, out_dir)  # before any work: an input is never a target, --force or not
    check_target(out_dir, force)
    with OutputDirectory(out_dir, force=force) as out:
        sink = DiskSink(plan, out)
        run_plan(plan, sink, progress, chunk_bytes)
        write_side_files(plan, out)
        target = out.commit()
    return MergeResult(target, {}, {}, plan)

