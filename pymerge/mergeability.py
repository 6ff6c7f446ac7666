"""`pymerge inspect`: can these models be merged? Names, shapes, dtypes, missing tensors, heads, base mapping.

Reads headers only. The rules are the engine's (pymerge.merge.plan_merge); this module reports every
difference instead of stopping at the first kind.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence, Tuple

from pymerge.config import DEFAULT_HEAD_PATTERNS
from pymerge.io.errors import IncompatibleModelsError
from pymerge.io.reader import open_source
from pymerge.merge import FLOAT_DTYPES, _base_prefix, _check_architectures
from pymerge.methods.base import pattern_matches


def _dtype(d) -> str:
    return str(d).replace("torch.", "")


def inspect_models(models: Sequence[str], base: Optional[str] = None, head_patterns=None,
                   allow_pickle: bool = False, max_listed: int = 10) -> Tuple[str, bool]:
    """Returns (report text, mergeable)."""
    patterns = list(DEFAULT_HEAD_PATTERNS if head_patterns is None else head_patterns)
    srcs = [open_source(m, allow_pickle=allow_pickle) for m in models]
    base_src = open_source(base, allow_pickle=allow_pickle) if base else None
    lines: List[str] = []
    ok = True
    for s in srcs + ([base_src] if base_src else []):
        cfg = s.config or {}
        dt = Counter(_dtype(s.dtype(k)) for k in s.keys())
        role = " (base)" if s is base_src else ""
        lines.append(f"{s.label}{role}: {cfg.get('model_type', '?')} {cfg.get('architectures') or ''} "
                     f"{len(s.keys())} tensors, {s.num_params():,} parameters, dtypes {dict(dt)}")
    try:
        _check_architectures(srcs + ([base_src] if base_src else []))
    except IncompatibleModelsError as exc:
        ok = False
        lines.append(f"ARCHITECTURE: {exc}")

    names, seen = [], set()
    for s in srcs:
        for k in s.keys():
            if k not in seen:
                seen.add(k)
                names.append(k)
    heads, missing, shapes, dtypes, shared = [], [], [], [], []
    for n in names:
        have = [s for s in srcs if n in s]
        if any(pattern_matches(p, n) for p in patterns):
            heads.append(f"{n} (" + ", ".join(f"{s.label}: {tuple(s.shape(n))}" for s in have) + ")")
            continue
        if len(have) < len(srcs):
            missing.append(f"{n}: missing in " + ", ".join(s.label for s in srcs if n not in s))
            continue
        if len({tuple(s.shape(n)) for s in srcs}) > 1:
            shapes.append(f"{n}: " + ", ".join(f"{tuple(s.shape(n))} in {s.label}" for s in srcs))
            continue
        if len({s.dtype(n) for s in srcs}) > 1:
            dtypes.append(f"{n}: " + ", ".join(f"{_dtype(s.dtype(n))} in {s.label}" for s in srcs))
        shared.append(n)

    def listing(title, items):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {i}" for i in items[:max_listed])
            if len(items) > max_listed:
                lines.append(f"  ... and {len(items) - max_listed} more")

    lines.append(f"shared tensors: {len(shared)} (merged)")
    listing("task heads kept per task (head_patterns " + ", ".join(patterns) + ")", heads)
    listing("MISSING in some models (not heads)", missing)
    listing("SHAPES differ (not heads)", shapes)
    listing("DTYPES differ (merging needs an explicit `dtype:`)", dtypes)
    if missing or shapes or not shared:
        ok = False
    if base_src is not None:
        strip, add = _base_prefix(srcs, base_src, shared)
        base_keys = set(base_src.keys())
        mapped = [n for n in shared if n.startswith(strip) and add + n[len(strip):] in base_keys]
        absent = [n for n in shared if n not in mapped]
        bad_shape = [n for n in mapped if tuple(base_src.shape(add + n[len(strip):])) != tuple(srcs[0].shape(n))]
        note = f" (model names map to base names by removing {strip!r} / adding {add!r})" if strip or add else ""
        lines.append(f"base model: {len(mapped)} of {len(shared)} shared tensors found{note}")
        listing("MISSING in the base model", absent)
        listing("SHAPES differ from the base model", [f"{n}" for n in bad_shape])
        if absent or bad_shape:
            ok = False
        nonfloat = [n for n in mapped if base_src.dtype(add + n[len(strip):]) not in FLOAT_DTYPES]
        listing("not floating point in the base (copied, not merged)", nonfloat)
    lines.append("mergeable: yes" if ok else "mergeable: NO (see the differences above)")
    return "\n".join(lines), ok
