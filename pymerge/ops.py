"""Python face of the compiled merge ops: argument checks, fake (meta) kernels, pure-torch references.

Every public op here dispatches to torch.ops.pymerge.<name> (csrc/) when a compiled kernel exists for the
inputs' device type, and otherwise to the `<name>_reference` beside it, written plainly in torch, which the
tests compare against. All ops take fp32 / fp16 / bf16 inputs, accumulate in fp32 and return the params'
dtype, contiguous, with the params' shape; non-contiguous inputs are accepted. M (models) is 1..16.
"""
from __future__ import annotations

import math
import re
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from pymerge import _extension

_HAS_EXT = _extension.load()

MAX_MODELS = 16
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


# ----------------------------------------------------------------------------------------------
# argument checks (shared by the ops)
# ----------------------------------------------------------------------------------------------
def _fmt_shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t, ref: Optional[torch.Tensor] = None, ref_name: str = "",
                  *, dtypes: Sequence[torch.dtype] = ()) -> None:
    """t must be a float tensor; with ref, of ref's shape and device (and dtype unless dtypes allows more)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected float32, float16 or bfloat16)")
    if ref is None:
        return
    if t.shape != ref.shape:
        raise ValueError(f"{name}: shape {_fmt_shape(t)} does not match {ref_name} shape {_fmt_shape(ref)}")
    if t.device != ref.device:
        raise ValueError(f"{name}: device {t.device} does not match {ref_name} device {ref.device}")
    allowed = tuple(dtypes) or (ref.dtype,)
    if t.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{name}: dtype {t.dtype} does not match {ref_name} dtype {ref.dtype} (expected {want})")


def _check_list(name: str, tensors, *, n: Optional[int] = None, n_name: str = "",
                ref: Optional[torch.Tensor] = None, ref_name: str = "", max_len: int = MAX_MODELS) -> None:
    """A non-empty list of at most max_len tensors of one shape, dtype and device (those of ref if given)."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name}: expected a non-empty list of tensors, got an empty list")
    if n is not None and len(tensors) != n:
        raise ValueError(f"{name}: expected {n} tensors (one per {n_name}), got {len(tensors)}")
    if len(tensors) > max_len:
        raise ValueError(f"{name}: at most {max_len} models are supported, got {len(tensors)}")
    _check_tensor(f"{name}[0]", tensors[0])
    if ref is not None:
        _check_tensor(f"{name}[0]", tensors[0], ref, ref_name)
    for i, t in enumerate(tensors[1:], start=1):
        _check_tensor(f"{name}[{i}]", t, tensors[0], f"{name}[0]")


def _check_fishers(fishers, params_name: str, params0: torch.Tensor, n: int) -> None:
    """Fishers: one per model, params' shape and device; all one dtype, the params' dtype or float32
    (fp32 Fisher beside fp16 / bf16 params keeps small Fisher values from underflowing)."""
    if not isinstance(fishers, (list, tuple)):
        raise TypeError(f"fishers: expected a list of tensors, got {type(fishers).__name__}")
    if len(fishers) == 0:
        raise ValueError("fishers: expected a non-empty list of tensors, got an empty list")
    if len(fishers) != n:
        raise ValueError(f"fishers: expected {n} tensors (one per {params_name}), got {len(fishers)}")
    _check_tensor("fishers[0]", fishers[0], params0, f"{params_name}[0]",
                  dtypes=(params0.dtype, torch.float32))
    for i, f in enumerate(fishers[1:], start=1):
        _check_tensor(f"fishers[{i}]", f, fishers[0], "fishers[0]")


def _check_numbers(name: str, values, n: int, n_name: str) -> list[float]:
    if not isinstance(values, (list, tuple)) and not (isinstance(values, torch.Tensor) and values.dim() == 1):
        raise TypeError(f"{name}: expected a list of {n} numbers, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per {n_name}), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{i}]: expected a number, got {type(v).__name__}") from None
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}]: expected a finite number, got {v}")
        out.append(v)
    return out


def _check_eps(eps) -> float:
    eps = float(eps)
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    return eps


def _check_finite(name: str, tensors) -> None:
    """NaN / Inf check of one tensor (named name) or a list (named name[i])."""
    named = [(name, tensors)] if isinstance(tensors, torch.Tensor) else [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]
    for label, t in named:
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{label}: contains NaN or Inf (check_finite=True)")


_KERNEL_CACHE: dict = {}  # a plain dict, not lru_cache: torch.compile traces through it without warnings


def _kernel_for(name: str, device_type: str) -> bool:
    found = _KERNEL_CACHE.get((name, device_type))
    if found is None:
        if not _HAS_EXT:
            found = False
        elif device_type == "meta":  # the register_fake kernels below serve meta tensors
            found = True
        else:
            key = _DEVICE_KEYS.get(device_type)
            found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pymerge::{name}", key)
        _KERNEL_CACHE[(name, device_type)] = found
    return found


def _use_kernel(name: str, t: torch.Tensor) -> bool:
    """Whether torch.ops.pymerge.<name> has a compiled kernel for t's device; else the reference runs.
    (A missing extension was already reported once, by pymerge._extension.)"""
    return _kernel_for(name, t.device.type)


def _check_out(out, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
    for what, got, want in (("shape", tuple(out.shape), tuple(like.shape)), ("dtype", out.dtype, like.dtype),
                            ("device", out.device, like.device)):
        if got != want:
            raise ValueError(f"out: {what} {got} does not match {like_name} {what} {want}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)  # the kernels return a fresh contiguous tensor of the params' shape and dtype


# ----------------------------------------------------------------------------------------------
# weighted_sum
# ----------------------------------------------------------------------------------------------
def weighted_sum_reference(tensors, weights=None, base=None):
    weights = [1.0 / len(tensors)] * len(tensors) if weights is None else weights
    if base is not None:
        acc = base.float().clone()  # starts at base (not 0 + base): keeps the sign of a -0.0 base, as the kernels do
    else:
        acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for w, t in zip(weights, tensors):
        acc += float(w) * t.float()
    return acc.to(tensors[0].dtype)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None,
                 base: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None):
    """base + Σ_i w_i t_i in one pass (averaging, task arithmetic, general task arithmetic). weights default to
    1/M each (the average).

    out: a contiguous tensor to write into and return (reusing one buffer spares a fresh allocation per call).
    """
    _check_list("tensors", tensors)
    weights = [1.0 / len(tensors)] * len(tensors) if weights is None else _check_numbers("weights", weights, len(tensors), "tensor")
    if base is not None:
        _check_tensor("base", base, tensors[0], "tensors[0]")
    if out is not None:
        _check_out(out, tensors[0], "tensors[0]")
        if _use_kernel("weighted_sum_out", out):
            torch.ops.pymerge.weighted_sum_out(list(tensors), weights, base, out)
            return out
        return out.copy_(weighted_sum(tensors, weights, base))
    if _use_kernel("weighted_sum", tensors[0]):
        return torch.ops.pymerge.weighted_sum(list(tensors), weights, base)
    return weighted_sum_reference(tensors, weights, base)


# ----------------------------------------------------------------------------------------------
# fisher_merge (Matena & Raffel eq. 4)
# ----------------------------------------------------------------------------------------------
def fisher_merge_reference(params, fishers, weights=None, eps=1e-8, fallback="target"):
    m = len(params)
    weights = [1.0 / m] * m if weights is None else [float(w) for w in weights]
    num = torch.zeros(params[0].shape, dtype=torch.float32, device=params[0].device)
    den = torch.zeros_like(num)
    for w, p, f in zip(weights, params, fishers):
        wf = w * f.float()
        num += wf * p.float()
        den += wf
    if fallback == "target":
        fb = params[0].float()
    else:
        wp = torch.zeros_like(num)
        for w, p in zip(weights, params):
            wp += w * p.float()
        fb = wp / sum(weights)
    keep = den > eps
    out = torch.where(keep, num / torch.where(keep, den, torch.ones_like(den)), fb)
    return out.to(params[0].dtype)


def fisher_merge(params: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                 weights: Optional[Sequence[float]] = None, eps: float = 1e-8,
                 fallback: Literal["target", "average"] = "target", check_finite: bool = False, *,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fisher-weighted average θ* = Σ λ_i F_i θ_i / Σ λ_i F_i, per element, in one pass.

    Where Σ λ_i F_i <= eps the element falls back to params[0] ("target") or to the λ-weighted mean
    Σ λ_i θ_i / Σ λ_i ("average"). weights (λ) default to 1/M. fishers may be float32 beside fp16 / bf16
    params. A NaN Fisher makes its element fall back silently: pass check_finite=True to reject NaN / Inf.
    out: a contiguous tensor to write into and return (reusing one buffer spares a fresh allocation per call).
    """
    _check_list("params", params)
    _check_fishers(fishers, "params", params[0], len(params))
    m = len(params)
    weights = [1.0 / m] * m if weights is None else _check_numbers("weights", weights, m, "model")
    eps = _check_eps(eps)
    if fallback not in ("target", "average"):
        raise ValueError(f"fallback: expected 'target' or 'average', got {fallback!r}")
    if fallback == "average" and sum(weights) == 0.0:
        raise ValueError("weights: fallback='average' divides by the sum of the weights, which is 0")
    if check_finite:
        _check_finite("params", params)
        _check_finite("fishers", fishers)
    if out is not None:
        _check_out(out, params[0], "params[0]")
        if _use_kernel("fisher_merge_out", out):
            torch.ops.pymerge.fisher_merge_out(list(params), list(fishers), weights, eps, fallback, out)
            return out
        return out.copy_(fisher_merge(params, fishers, weights, eps, fallback))
    if _use_kernel("fisher_merge", params[0]):
        return torch.ops.pymerge.fisher_merge(list(params), list(fishers), weights, eps, fallback)
    return fisher_merge_reference(params, fishers, weights, eps, fallback)


# ----------------------------------------------------------------------------------------------
# dfmerge_combine (DF-Merge eq. 8)
# ----------------------------------------------------------------------------------------------
def dfmerge_combine_reference(pretrained, task_vectors, fishers, lambdas, eps=1e-8):
    m = len(task_vectors)
    num = torch.zeros(pretrained.shape, dtype=torch.float32, device=pretrained.device)
    den = torch.zeros_like(num)
    plain = torch.zeros_like(num)
    for lam, t, f in zip(lambdas, task_vectors, fishers):
        lt = float(lam) * t.float()
        ff = f.float()
        num += ff * lt
        den += ff
        plain += lt
    keep = den > eps
    delta = torch.where(keep, m * num / torch.where(keep, den, torch.ones_like(den)), plain)
    return (pretrained.float() + delta).to(pretrained.dtype)


def dfmerge_combine(pretrained: torch.Tensor, task_vectors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                    lambdas: Sequence[float], eps: float = 1e-8, check_finite: bool = False, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DF-Merge eq. 8: θ_pre + M Σ_i F_i λ_i τ_i / Σ_i F_i, per element, in one pass.

    fishers[i] is the Fisher estimated at θ_pre + λ_i τ_i. Where Σ F_i <= eps the element falls back to
    θ_pre + Σ λ_i τ_i (general task arithmetic). out: as in fisher_merge.
    """
    _check_tensor("pretrained", pretrained)
    _check_list("task_vectors", task_vectors, ref=pretrained, ref_name="pretrained")
    _check_fishers(fishers, "task_vectors", pretrained, len(task_vectors))
    lambdas = _check_numbers("lambdas", lambdas, len(task_vectors), "task vector")
    eps = _check_eps(eps)
    if check_finite:
        _check_finite("pretrained", pretrained)
        _check_finite("task_vectors", task_vectors)
        _check_finite("fishers", fishers)
    if out is not None:
        _check_out(out, pretrained, "pretrained")
        if _use_kernel("dfmerge_combine_out", out):
            torch.ops.pymerge.dfmerge_combine_out(pretrained, list(task_vectors), list(fishers), lambdas, eps, out)
            return out
        return out.copy_(dfmerge_combine(pretrained, task_vectors, fishers, lambdas, eps))
    if _use_kernel("dfmerge_combine", pretrained):
        return torch.ops.pymerge.dfmerge_combine(pretrained, list(task_vectors), list(fishers), lambdas, eps)
    return dfmerge_combine_reference(pretrained, task_vectors, fishers, lambdas, eps)


# ----------------------------------------------------------------------------------------------
# ties_merge (TIES: trim, elect sign, disjoint merge)
# ----------------------------------------------------------------------------------------------
def ties_keep_count(n: int, density: float) -> int:
    """How many magnitudes a tensor of n elements keeps: k = max(1, ceil(density * n))."""
    return max(1, math.ceil(density * n))


class NonFiniteInputError(ValueError):
    """An op's input holds NaN or Inf (check_finite=True): `arg` names the argument ("models", "task_vectors",
    "pretrained") and `index` the position in a list argument (None for a single tensor)."""

    def __init__(self, arg: str, index: Optional[int] = None):
        self.arg, self.index = arg, index
        label = arg if index is None else f"{arg}[{index}]"
        super().__init__(f"{label}: contains NaN or Inf (check_finite=True)")


_NONFINITE_MESSAGE = re.compile(r"ties_merge: (models|task_vectors|pretrained)(?:\[(\d+)\])? contains NaN or Inf")


def check_inputs_finite(pretrained, tensors, list_name: str = "models") -> None:
    """Raise NonFiniteInputError for the first of tensors[0..M-1], then pretrained, holding a NaN or Inf (one
    reduction per tensor, no temporaries). The same order and naming as the compiled ties_merge's check."""
    for i, t in enumerate(tensors):
        if not _all_finite(t):
            raise NonFiniteInputError(list_name, i)
    if pretrained is not None and not _all_finite(pretrained):
        raise NonFiniteInputError("pretrained")


def _all_finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return float(lo) > -math.inf and float(hi) < math.inf  # NaN fails both comparisons


def ties_merge_reference(pretrained, task_vectors, density, lam, models=False, check_finite=False):
    if check_finite:
        check_inputs_finite(pretrained, task_vectors, "models" if models else "task_vectors")
    if models:  # τ_i = θ_i - θ_pre in the storage dtype (torch rounds the difference as the kernels do)
        task_vectors = [t - pretrained for t in task_vectors]
    n = pretrained.numel()
    if n == 0:
        return pretrained.clone()
    k = ties_keep_count(n, density)
    trimmed = []
    for t in task_vectors:
        tf = t.float()
        mag = tf.abs().flatten()
        mag = torch.where(torch.isnan(mag), torch.full_like(mag, math.inf), mag)  # NaN counts as largest
        thr = torch.kthvalue(mag, n - k + 1).values  # k-th largest |τ|
        keep = (tf.abs() >= thr) | torch.isnan(tf)
        trimmed.append(torch.where(keep, tf, torch.zeros_like(tf)))
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total += t
    acc = torch.zeros_like(total)
    cnt = torch.zeros_like(total)
    for t in trimmed:
        # non-zero with the sign of total; a NaN total elects no sign (torch.sign(nan) would be 0: NaN agreed)
        agree = ((total > 0) & (t > 0)) | ((total < 0) & (t < 0))
        acc += torch.where(agree, t, torch.zeros_like(t))
        cnt += agree.float()
    mean = torch.where(cnt > 0, acc / cnt.clamp(min=1), torch.zeros_like(acc))
    return (pretrained.float() + float(lam) * mean).to(pretrained.dtype)


def ties_merge(pretrained: torch.Tensor, task_vectors: Sequence[torch.Tensor], density: float,
               lam: float, *, models: bool = False, check_finite: bool = False) -> torch.Tensor:
    """TIES-merging of one tensor: θ_pre + lam · disjoint_mean(trim(τ_i)).

    Trim: keep the entries of τ_i with |τ_i| >= its k-th largest magnitude, k = max(1, ceil(density · n))
    (found by selection, not a sort; ties at the threshold are all kept). Elect: s = sign(Σ_i trimmed τ_i).
    Disjoint mean: mean over the models whose trimmed entry is non-zero with sign s (0 where there is none).

    models=True: the list holds the fine-tuned tensors θ_i and τ_i = θ_i - pretrained is formed inside the op
    (rounded to the dtype as torch's subtraction rounds: the same result as passing the task vectors, without
    the M temporaries). check_finite=True: NonFiniteInputError names the first input holding NaN or Inf (the
    list in order, then pretrained); the compiled op finds them in passes it makes anyway.
    """
    list_name = "models" if models else "task_vectors"
    _check_tensor("pretrained", pretrained)
    _check_list(list_name, task_vectors, ref=pretrained, ref_name="pretrained")
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density: expected a value in (0, 1], got {density}")
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam: expected a finite number, got {lam}")
    models, check_finite = bool(models), bool(check_finite)
    if _use_kernel("ties_merge", pretrained):
        try:
            return torch.ops.pymerge.ties_merge(pretrained, list(task_vectors), density, lam, models, check_finite)
        except ValueError as err:
            found = _NONFINITE_MESSAGE.search(str(err)) if check_finite else None
            if found is None:
                raise
            index = found.group(2)
            raise NonFiniteInputError(found.group(1), None if index is None else int(index)) from None
    return ties_merge_reference(pretrained, task_vectors, density, lam, models, check_finite)


# ----------------------------------------------------------------------------------------------
# dare (drop and rescale, counter-based RNG)
# ----------------------------------------------------------------------------------------------
_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (same as pymerge::mix64 in csrc/include/pymerge/merge_math.h)."""
    z &= _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def dare_random_bits(seed: int, n: int) -> np.ndarray:
    """The 24-bit uniform integers r_e (e = flat row-major index) that decide DARE's mask: drop iff r_e < p·2^24.

    r_e = mix64(mix64(seed) + (e + 1) · golden) >> 40, the same hash as csrc/include/pymerge/merge_math.h.
    """
    key = np.uint64(_mix64_int(int(seed) & _U64))
    with np.errstate(over="ignore"):
        z = key + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.int64)


def dare_drop_threshold(p: float) -> int:
    """Integer threshold t = ceil(p · 2^24): element e is dropped iff r_e < t (exactly r_e / 2^24 < p)."""
    return math.ceil(p * 16777216.0)


def dare_reference(task_vector, p, seed):
    n = task_vector.numel()
    r = torch.from_numpy(dare_random_bits(seed, n)).reshape(task_vector.shape).to(task_vector.device)
    keep = r >= dare_drop_threshold(p)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)  # rounded to fp32 once, as in the kernels
    out = torch.where(keep, task_vector.float() * scale.to(task_vector.device), torch.zeros((), device=task_vector.device))
    return out.to(task_vector.dtype)


def dare(task_vector: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """DARE: drop each element with probability p and rescale the survivors by 1 / (1 - p).

    The mask is a counter-based hash of (seed, flat element index), so one seed gives one mask on every
    device, thread count and memory layout (see dare_random_bits).
    """
    _check_tensor("task_vector", task_vector)
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    seed = int(seed)
    if not (-(1 << 63) <= seed < (1 << 63)):
        raise ValueError(f"seed: expected a 64-bit signed integer, got {seed}")
    if _use_kernel("dare", task_vector):
        return torch.ops.pymerge.dare(task_vector, p, seed)
    return dare_reference(task_vector, p, seed)


# ----------------------------------------------------------------------------------------------
# fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor / meta tensors
# ----------------------------------------------------------------------------------------------
if _HAS_EXT:
    @torch.library.register_fake("pymerge::weighted_sum")
    def _weighted_sum_fake(tensors, weights, base):
        return _fake_like(tensors[0])

    @torch.library.register_fake("pymerge::fisher_merge")
    def _fisher_merge_fake(params, fishers, weights, eps, fallback):
        return _fake_like(params[0])

    @torch.library.register_fake("pymerge::dfmerge_combine")
    def _dfmerge_combine_fake(pretrained, task_vectors, fishers, lambdas, eps):
        return _fake_like(pretrained)

    @torch.library.register_fake("pymerge::weighted_sum_out")
    def _weighted_sum_out_fake(tensors, weights, base, out):
        return None

    @torch.library.register_fake("pymerge::fisher_merge_out")
    def _fisher_merge_out_fake(params, fishers, weights, eps, fallback, out):
        return None

    @torch.library.register_fake("pymerge::dfmerge_combine_out")
    def _dfmerge_combine_out_fake(pretrained, task_vectors, fishers, lambdas, eps, out):
        return None

    @torch.library.register_fake("pymerge::ties_merge")
    def _ties_merge_fake(pretrained, task_vectors, density, lam, models=False, check_finite=False):
        return _fake_like(pretrained)

    @torch.library.register_fake("pymerge::dare")
    def _dare_fake(task_vector, p, seed):
        return _fake_like(task_vector)

# Resolve the kernel lookups now, so torch.compile (fullgraph) traces the wrappers without calling into them.
for _name in ("weighted_sum", "fisher_merge", "dfmerge_combine", "ties_merge", "dare",
              "weighted_sum_out", "fisher_merge_out", "dfmerge_combine_out"):
    for _dev in ("cpu", "cuda", "meta"):
        _kernel_for(_name, _dev)

# ----------------------------------------------------------------------------------------------
# sq_grad_accumulate (owned by the Fisher engine)
# ----------------------------------------------------------------------------------------------
def _sq_grad_as_3d(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [N, T, features] or [N, features], got shape {tuple(t.shape)}")
    return t


def _check_sq_grad(fisher, inputs, grad_outputs, weights):
    if not isinstance(fisher, torch.Tensor) or fisher.dim() != 2 or fisher.dtype != torch.float32:
        raise ValueError("fisher: expected a float32 [d, k] tensor, got "
                         + (f"{fisher.dtype} of shape {tuple(fisher.shape)}" if isinstance(fisher, torch.Tensor)
                            else type(fisher).__name__))
    if not fisher.is_contiguous():
        raise ValueError("fisher: expected a contiguous tensor (it is updated in place)")
    z = _sq_grad_as_3d("inputs", inputs)
    g = _sq_grad_as_3d("grad_outputs", grad_outputs)
    if z.shape[:2] != g.shape[:2]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} disagree on N/T")
    if (z.shape[2], g.shape[2]) != tuple(fisher.shape):
        raise ValueError(f"fisher: shape {tuple(fisher.shape)} does not match inputs features {z.shape[2]} x "
                         f"grad_outputs features {g.shape[2]}")
    for name, t in (("inputs", z), ("grad_outputs", g)):
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != fisher.device:
            raise ValueError(f"{name}: device {t.device} does not match fisher device {fisher.device}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (z.shape[0],):
            raise ValueError(f"weights: expected a [N] = [{z.shape[0]}] tensor, got "
                             f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
        if weights.device != fisher.device:
            raise ValueError(f"weights: device {weights.device} does not match fisher device {fisher.device}")
    return z, g


def sq_grad_accumulate_reference(fisher, inputs, grad_outputs, weights=None):
    """Plain torch: materialise every per-example gradient Z_n^T G_n in fp32, square, weight, sum."""
    z = _sq_grad_as_3d("inputs", inputs).float()
    g = _sq_grad_as_3d("grad_outputs", grad_outputs).float()
    per_example = torch.bmm(z.transpose(1, 2), g)  # [N, d, k]
    w = torch.ones(z.shape[0], device=z.device) if weights is None else weights.float()
    fisher += (w[:, None, None] * per_example.square()).sum(0)


def _has_kernel(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return _HAS_EXT and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pymerge::{op}", key)


def sq_grad_accumulate(fisher: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> None:
    """In place: fisher [d, k] (fp32) += Σ_n w_n (Z_nᵀ G_n)² for Z = inputs [N, T, d], G = grad_outputs [N, T, k].

    [N, d] / [N, k] mean T = 1 (one GEMM on the squares). fp16/bf16 inputs accumulate in fp32; per-example
    gradients are only ever formed a memory-bounded chunk at a time (PYMERGE_SQ_GRAD_BUDGET_MB, default 32).
    """
    z, g = _check_sq_grad(fisher, inputs, grad_outputs, weights)
    if _has_kernel("sq_grad_accumulate", fisher.device):
        torch.ops.pymerge.sq_grad_accumulate(fisher, z, g, weights)
    else:
        sq_grad_accumulate_reference(fisher, z, g, weights)


if _HAS_EXT:
    @torch.library.register_fake("pymerge::sq_grad_accumulate")
    def _sq_grad_accumulate_fake(fisher, inputs, grad_outputs, weights):
        return None
