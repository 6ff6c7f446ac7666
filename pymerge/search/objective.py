"""The DF-Merge objective: λ -> Fisher at θ_pre + λ_i τ_i -> in-place eq. 8 -> every task's validation metric.

One working model lives on the device. The pretrained body θ_pre and each fine-tuned body θ_i are held once
(τ_i = θ_i - θ_pre is formed per tensor into a reused scratch buffer, exactly as the merge engine forms it, so
the merged weights equal `pymerge.merge_state_dicts` with the same method bit for bit). Per evaluation, for
each task i: the body parameters are set to θ_i(λ_i) = λ_i θ_i + (1 - λ_i) θ_pre in place, task i's head is
swapped in (a pointer swap), the exact diagonal Fisher is estimated on n unlabelled inputs of task i; then every
body parameter is overwritten with `ops.dfmerge_combine(..., out=param)` and each task is scored with its head.
Nothing is deep-copied, rebuilt or written to disk per evaluation.

Ablations (the paper's Table 3): use_fisher=False is general task arithmetic θ_pre + Σ λ_i τ_i (the engine's
fused weighted sum); the "no search" ablation is `evaluate_fixed(fisher_at=[1]*M, lambdas=[1/M]*M)`.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pymerge import ops
from pymerge.eval.tasks import Task, TaskError, evaluate, fisher_batches


class InsufficientMemoryError(ValueError):
    """The search cannot fit on its device (raised before any tensor is moved there)."""


def load_model(obj, label: str) -> nn.Module:
    """An nn.Module as is, or a Hugging Face model directory loaded with the class in its config.json."""
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, (str, os.PathLike)):
        raise TypeError(f"{label}: expected an nn.Module or a model directory, got {type(obj).__name__}")
    path = Path(obj)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{label}: {path} is not a model directory (no config.json)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(path).eval()


def _head_patterns():
    from pymerge.config import DEFAULT_HEAD_PATTERNS

    return DEFAULT_HEAD_PATTERNS


def _is_head(name: str, patterns) -> bool:
    from pymerge.methods.base import pattern_matches

    return any(pattern_matches(p, name) for p in patterns)


def _base_lookup(base: Dict[str, torch.Tensor], name: str) -> Optional[str]:
    """The pretrained tensor for a fine-tuned parameter: same name, or without the task model's prefix
    (BertModel's 'embeddings.x' for BertForSequenceClassification's 'bert.embeddings.x')."""
    if name in base:
        return name
    if "." in name and name.split(".", 1)[1] in base:
        return name.split(".", 1)[1]
    return None


def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class DFMergeObjective:
    """Callable λ -> (metrics {task: value}, objective, seconds {"fisher", "combine", "evaluate"})."""

    def __init__(self, pretrained, finetuned: Sequence, tasks: Sequence[Task], *, fisher_examples: int = 30,
                 use_fisher: bool = True, objective: Optional[Callable[[Dict[str, float]], float]] = None,
                 device: Union[str, torch.device, None] = None, eps: float = 1e-8, batch_size: Optional[int] = None,
                 memory_limit: Optional[int] = None, head_patterns: Optional[Sequence[str]] = None,
                 fisher_options: Optional[dict] = None):
        if not isinstance(finetuned, (list, tuple)) or not finetuned:
            raise ValueError("finetuned: expected a non-empty list of models (one per task)")
        if not isinstance(tasks, (list, tuple)) or len(tasks) != len(finetuned):
            raise ValueError(f"tasks: expected {len(finetuned)} tasks (one per fine-tuned model, same order), "
                             f"got {len(tasks) if isinstance(tasks, (list, tuple)) else type(tasks).__name__}")
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"tasks[{i}]: expected a pymerge.eval.Task, got {type(t).__name__}")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        if not isinstance(fisher_examples, int) or fisher_examples < 1:
            raise ValueError(f"fisher_examples: expected a positive integer, got {fisher_examples!r}")
        if objective is not None and not callable(objective):
            raise TypeError("objective: expected a callable (metrics dict) -> float")
        self.tasks = list(tasks)
        self.M = len(tasks)
        self.use_fisher = use_fisher
        self.fisher_examples = fisher_examples
        self.user_objective = objective
        self.eps = float(eps)
        self.batch_size = batch_size
        self.fisher_options = dict(fisher_options or {})
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        # exact mode: the C class rounds as C streamed backwards on CPU (faster there, bench/README "Fisher
        # engine"), one vmapped backward elsewhere; the Fisher is the same either way
        self.fisher_options.setdefault("batched_backward", self.device.type != "cpu")
        patterns = tuple(head_patterns) if head_patterns is not None else _head_patterns()
        self._build(pretrained, finetuned, patterns, memory_limit)

    # ------------------------------------------------------------------ set-up (once)
    def _build(self, pretrained, finetuned, patterns, memory_limit) -> None:
        base_model = load_model(pretrained, "pretrained")
        base = dict(base_model.state_dict())
        first = load_model(finetuned[0], "finetuned[0]")
        # the working model: the first fine-tuned model's architecture (with a head), copied once
        model = copy.deepcopy(first) if isinstance(finetuned[0], nn.Module) else first
        params = dict(model.named_parameters())
        body, heads = [], []
        for name, p in params.items():
            bname = _base_lookup(base, name)
            if _is_head(name, patterns) or bname is None or tuple(base[bname].shape) != tuple(p.shape):
                heads.append(name)
            else:
                body.append((name, bname))
        if not body:
            raise ValueError("pretrained: shares no parameter (by name and shape) with the fine-tuned models")
        self.body_names = [n for n, _ in body]
        self.head_names = heads
        # memory: working body + θ_pre + M θ_i + M fp32 Fishers + M scratch + heads, + the Fisher's own fp32
        # accumulator and its result (2 fp32 bodies) while one is estimated
        body_bytes = sum(params[n].numel() * params[n].element_size() for n in self.body_names)
        body_f32 = sum(params[n].numel() * 4 for n in self.body_names)
        biggest = max(params[n].numel() * params[n].element_size() for n in self.body_names)
        head_bytes = sum(params[n].numel() * params[n].element_size() for n in heads) * self.M
        fishers = (self.M * body_f32 + 2 * body_f32) if self.use_fisher else 0
        need = (2 + self.M) * body_bytes + fishers + self.M * biggest + head_bytes
        have = memory_limit if memory_limit is not None else _available_bytes(self.device)
        self.memory_needed = need
        if have is not None and need > have:
            raise InsufficientMemoryError(
                f"DF-Merge search needs about {_gib(need)} on {self.device} but only {_gib(have)} is available: "
                f"working body {_gib(body_bytes)} + pretrained {_gib(body_bytes)} + {self.M} fine-tuned bodies "
                f"{_gib(self.M * body_bytes)} + {'%d fp32 Fishers (+2 in flight) ' % self.M if self.use_fisher else ''}"
                f"{_gib(fishers)} + heads {_gib(head_bytes)} + scratch {_gib(self.M * biggest)} (activations come on "
                f"top). Use fewer tasks, a smaller dtype, or another device.")
        model.to(self.device).eval()
        self.model = model
        self._params = [dict(model.named_parameters())[n] for n in self.body_names]
        self.pre = [base[b].detach().to(self.device, params[n].dtype).contiguous() for n, b in body]
        del base, base_model
        self.finetuned: List[List[torch.Tensor]] = []
        self.heads: List[Dict[str, nn.Parameter]] = []
        for i, src in enumerate(finetuned):
            m = first if i == 0 else load_model(src, f"finetuned[{i}]")
            sd = dict(m.named_parameters())
            missing = [n for n in self.body_names + heads if n not in sd]
            if missing:
                raise ValueError(f"finetuned[{i}] ({self.tasks[i].name}): lacks parameters of the working model "
                                 f"(architectures differ?): {missing[:5]}")
            for n in self.body_names:
                if tuple(sd[n].shape) != tuple(params[n].shape):
                    raise ValueError(f"finetuned[{i}]: {n} has shape {tuple(sd[n].shape)}, expected "
                                     f"{tuple(params[n].shape)} (the first model's)")
            self.finetuned.append([sd[n].detach().to(self.device).contiguous().clone() if i == 0 and m is model
                                   else sd[n].detach().to(self.device).contiguous() for n in self.body_names])
            head = self.tasks[i].head
            if head is not None:
                unknown = [n for n in head if n not in params]
                if unknown:
                    raise TaskError(f"task {self.tasks[i].name!r}: head tensors {unknown[:5]} are not parameters of "
                                    f"{type(model).__name__}")
                self.heads.append({n: nn.Parameter(torch.as_tensor(t).detach().to(self.device).clone(),
                                                   requires_grad=False) for n, t in head.items()})
            else:
                self.heads.append({n: nn.Parameter(sd[n].detach().to(self.device).clone(), requires_grad=False)
                                   for n in heads})
            if m is not first:
                del m
        self.finetuned_sources = list(finetuned)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self._params:
            p.requires_grad_(True)  # the Fisher is taken of the shared body only, never of the heads
        # the last Fisher of each task (pymerge.fisher.Fisher); after an evaluation it holds the task's buffers,
        # which the next evaluation overwrites
        self.fisher_objects = [None] * self.M
        self._fisher_batches: List[Optional[list]] = [None] * self.M
        self._fisher_buffers: List[Optional[Dict[str, torch.Tensor]]] = [None] * self.M  # see fisher_at
        numels = max(p.numel() for p in self._params)
        self._scratch = [torch.empty(numels, dtype=self._params[0].dtype, device=self.device) for _ in range(self.M)]
        self._mixed_dtypes = len({p.dtype for p in self._params}) > 1
        # every task answers with its head before any work starts (errors name the task)
        for i, task in enumerate(self.tasks):
            self.use_head(i)
            task.check_model(self.model)
            task.split("fisher")

    # ------------------------------------------------------------------ per evaluation
    def use_head(self, i: int) -> None:
        """Swap task i's head parameters into the working model (no copy)."""
        for name, param in self.heads[i].items():
            owner, _, local = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            module._parameters[local] = param

    def _set_point(self, i: int, lam: float) -> None:
        """Body := θ_i(λ) = λ θ_i + (1 - λ) θ_pre, in place."""
        with torch.no_grad():
            for p, ft, pre in zip(self._params, self.finetuned[i], self.pre):
                ops.weighted_sum([ft, pre], [lam, 1.0 - lam], out=p.data)

    def fisher_at(self, i: int, lam: float, *, reuse_buffers: bool = False) -> List[torch.Tensor]:
        """Exact diagonal Fisher of task i at θ_i(λ) on its first n unlabelled inputs, body order, fp32 on device.

        Fresh tensors by default (callers may keep several, e.g. the landscape grid). reuse_buffers=True (what
        `evaluate_fixed` uses, the Fishers being consumed by the combine right away): on CPU the Fisher is
        accumulated into this task's own buffers, overwritten by the next such call; a fresh fp32 body per call
        costs first-touch page faults (~0.1 s a task for MiniLM). CUDA's caching allocator reuses memory anyway.
        """
        from pymerge.fisher import estimate

        self._set_point(i, lam)
        self.use_head(i)
        task = self.tasks[i]
        batches = self._fisher_batches[i]
        if batches is None:  # the same inputs every evaluation: tokenised and collated once
            batches = self._fisher_batches[i] = fisher_batches(self.model, task, self.fisher_examples,
                                                               self.batch_size)
        reuse = reuse_buffers and self.device.type == "cpu"
        fisher = estimate(self.model, batches, mode="exact", length_normalize=task.length_normalize,
                          out=self._fisher_buffers[i] if reuse else None, **self.fisher_options)
        if reuse:
            self._fisher_buffers[i] = fisher.tensors
        self.fisher_objects[i] = fisher
        return [fisher.tensors[n].to(self.device, non_blocking=True) for n in self.body_names]

    def _task_vectors(self, j: int) -> List[torch.Tensor]:
        shape = self.pre[j].shape
        n = self.pre[j].numel()
        return [torch.sub(self.finetuned[i][j], self.pre[j], out=self._scratch[i][:n].view(shape)) if
                self._scratch[i].dtype == self.pre[j].dtype else self.finetuned[i][j] - self.pre[j]
                for i in range(self.M)]

    def combine(self, lambdas: Sequence[float], fishers: Optional[List[List[torch.Tensor]]]) -> None:
        """Writes the merged body into the working model: eq. 8 with `fishers`, or GTA when fishers is None."""
        lambdas = [float(v) for v in lambdas]
        with torch.no_grad():
            for j, p in enumerate(self._params):
                if fishers is None:
                    ops.weighted_sum([ft[j] for ft in self.finetuned] + [self.pre[j]],
                                     lambdas + [1.0 - sum(lambdas)], out=p.data)
                else:
                    ops.dfmerge_combine(self.pre[j], self._task_vectors(j), [f[j] for f in fishers], lambdas,
                                        eps=self.eps, out=p.data)

    def score(self, split: str = "validation") -> Dict[str, float]:
        out = {}
        for i, task in enumerate(self.tasks):
            self.use_head(i)
            out[task.name] = evaluate(self.model, task, split, self.batch_size)
        return out

    def objective_of(self, metrics: Dict[str, float]) -> float:
        if self.user_objective is not None:
            return float(self.user_objective(dict(metrics)))
        return sum(metrics.values()) / len(metrics)

    def evaluate_fixed(self, lambdas: Sequence[float], fisher_at: Optional[Sequence[float]] = None
                       ) -> Tuple[Dict[str, float], float, Dict[str, float]]:
        """One evaluation: Fishers at θ_i(fisher_at_i) (default: at λ_i), combined with `lambdas`."""
        lambdas = [float(v) for v in lambdas]
        if len(lambdas) != self.M:
            raise ValueError(f"lambdas: expected {self.M} values (one per task), got {len(lambdas)}")
        fisher_at = lambdas if fisher_at is None else [float(v) for v in fisher_at]
        t0 = time.perf_counter()
        fishers = ([self.fisher_at(i, fisher_at[i], reuse_buffers=True) for i in range(self.M)]
                   if self.use_fisher else None)
        self._sync()
        t1 = time.perf_counter()
        self.combine(lambdas, fishers)
        self._sync()
        t2 = time.perf_counter()
        metrics = self.score("validation")
        t3 = time.perf_counter()
        self.last_fishers = fishers
        return metrics, self.objective_of(metrics), {"fisher": t1 - t0, "combine": t2 - t1, "evaluate": t3 - t2}

    def __call__(self, lambdas: Sequence[float]):
        return self.evaluate_fixed(lambdas)

    def __getstate__(self):
        # sent to a torch.multiprocessing worker, every tensor would be moved into shared memory: the workers would
        # then write their points into one working body (and scratch) at once and score each other's merges
        raise TypeError("DFMergeObjective is not picklable: it owns a working model that it overwrites in place; "
                        "a worker process builds its own (pymerge.search.workers.make_pool / worker_evaluate)")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def merged_state(self) -> Dict[str, torch.Tensor]:
        """The working model's body as it is now (after an evaluation: the merged body), on CPU."""
        return {n: p.detach().cpu().clone() for n, p in zip(self.body_names, self._params)}
