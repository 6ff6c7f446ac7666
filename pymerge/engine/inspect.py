"""`pymerge inspect`: can these models be merged? Names, shapes, dtypes, missing tensors, heads, base mapping.

Reads headers only. The rules are the engine's (`survey_tensors`, which plan_merge enforces); this module
reports every difference instead of stopping at the first.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence, Tuple

from pymerge.config import DEFAULT_HEAD_PATTERNS
from pymerge.io.errors import IncompatibleModelsError
from pymerge.io.reader import open_source
from pymerge.engine.plan import check_architectures, survey_tensors


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
        check_architectures(srcs + ([base_src] if base_src else []))
    except IncompatibleModelsError as exc:
        ok = False
        lines.append(f"ARCHITECTURE: {exc}")

    sv = survey_tensors(srcs, base_src, patterns, dtype=None)
    heads = [f"{n} (" + ", ".join(f"{s.label}: {tuple(s.shape(n))}" for s in srcs if n in s) + ")" for n in sv.heads]
    missing, shapes, dtypes = sv.missing, sv.shapes, sv.mixed_dtypes
    # shared by every model with one shape (whatever the base says): merged, copied, or needing `dtype:`
    in_base = sum(e.kind != "head" for e in sv.entries) + len(dtypes)
    shared = in_base + len(sv.base_missing) + len(sv.base_shapes)

    def listing(title, items):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {i}" for i in items[:max_listed])
            if len(items) > max_listed:
                lines.append(f"  ... and {len(items) - max_listed} more")

    lines.append(f"shared tensors: {shared} (merged)")
    listing("task heads kept per task (head_patterns " + ", ".join(patterns) + ")", heads)
    listing("MISSING in some models (not heads)", missing)
    listing("SHAPES differ (not heads)", shapes)
    listing("DTYPES differ (merging needs an explicit `dtype:`)", dtypes)
    if missing or shapes or not shared:
        ok = False
    if base_src is not None:
        strip, add = sv.prefix
        note = f" (model names map to base names by removing {strip!r} / adding {add!r})" if strip or add else ""
        lines.append(f"base model: {in_base} of {shared} shared tensors found{note}")
        listing("MISSING in the base model", sv.base_missing)
        listing("SHAPES differ from the base model", sv.base_shapes)
        if sv.base_missing or sv.base_shapes:
            ok = False
        listing("not floating point in the base (copied, not merged)",
                [e.name for e in sv.entries if e.kind == "copy"])
    lines.append("mergeable: yes" if ok else "mergeable: NO (see the differences above)")
    return "\n".join(lines), ok
