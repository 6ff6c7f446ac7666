"""Plots of a coefficient search, as in DF-Merge (Lee et al. 2025), written as PNG with matplotlib.

- trajectory (Fig. 4): from a trial log (JSONL, SEAMS.md), the objective of every evaluation and the best so
  far (top), and the coefficients of the best-so-far point (bottom), against the trial number; the random
  initial evaluations shaded.
- landscape (Fig. 6): for two fine-tuned models, the mean validation metric over a grid of (λ1, λ2) for
  general task arithmetic (θ_pre + λ1 τ1 + λ2 τ2) beside DF-Merge (eq. 8, Fishers at θ_i(λ_i)).
  `landscape_grid` computes it (pymerge.search's objective); `plot_landscape` draws a computed grid.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


class PlotError(ValueError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError("plots need matplotlib: pip install 'pymerge[plot]'") from exc
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True (--force) to replace it")


def _save(fig, path: PathLike, overwrite: bool) -> Path:
    """Write the figure atomically (temporary file beside it, then rename)."""
    path = Path(path)
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ------------------------------------------------------------------------------------------ trajectory
def read_trials(log: PathLike) -> Tuple[Optional[dict], List[dict]]:
    """(header or None, trial records sorted by trial number) of a trial log, read by pymerge.search.log (the
    one reader of the format): a last line without its newline (a run killed mid-write) is ignored; any other
    bad line is an error naming the file and line. A plot needs only trial, lambdas and objective."""
    from pymerge.search.log import TrialLogError, trials_in_order

    try:
        header, trials = trials_in_order(log, required=("trial", "lambdas", "objective"))
    except TrialLogError as exc:
        raise PlotError(str(exc)) from exc
    if not trials:
        raise PlotError(f"{log}: no finished trials to plot")
    return header, trials


def trajectory_series(trials: Sequence[dict]) -> Dict[str, list]:
    """What the trajectory plot draws: per trial its objective, the best so far (running max), the λ of the
    best-so-far trial, and whether it was a random (initial) evaluation."""
    trial, objective, best, best_lambdas, random_phase = [], [], [], [], []
    top, top_lambdas = None, None
    for rec in trials:
        value = float(rec["objective"])
        if top is None or value > top:
            top, top_lambdas = value, [float(v) for v in rec["lambdas"]]
        trial.append(int(rec["trial"]))
        objective.append(value)
        best.append(top)
        best_lambdas.append(top_lambdas)
        random_phase.append(rec.get("phase") == "random")
    return {"trial": trial, "objective": objective, "best": best, "best_lambdas": best_lambdas,
            "random": random_phase}


def trajectory_figure(trials: Sequence[dict], names: Optional[Sequence[str]] = None, title: Optional[str] = None):
    plt = _pyplot()
    s = trajectory_series(trials)
    m = len(s["best_lambdas"][0])
    names = list(names) if names is not None and len(names) == m else [f"λ{i + 1}" for i in range(m)]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5), gridspec_kw={"height_ratios": [1, 1]})
    x = s["trial"]
    top.plot(x, s["objective"], "o", color="0.55", markersize=3.5, label="evaluation")
    top.plot(x, s["best"], "-", color="tab:blue", drawstyle="steps-post", linewidth=2, label="best so far")
    top.set_ylabel("objective (validation)")
    for i in range(m):
        bottom.plot(x, [lam[i] for lam in s["best_lambdas"]], drawstyle="steps-post", linewidth=1.8,
                    label=names[i])
    bottom.set_ylabel("λ of the best so far")
    bottom.set_xlabel("trial")
    random_trials = [t for t, r in zip(x, s["random"]) if r]
    if random_trials:
        for ax in (top, bottom):
            ax.axvspan(min(random_trials) - 0.5, max(random_trials) + 0.5, color="tab:red", alpha=0.12,
                       label="random initial points" if ax is top else None)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    best_at = x[s["objective"].index(s["best"][-1])]
    fig.suptitle((title + "\n" if title else "") + f"best {s['best'][-1]:.4f} at trial {best_at}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_trajectory(log: PathLike, out: PathLike, *, title: Optional[str] = None, overwrite: bool = False) -> Path:
    """Fig. 4 from a trial log into `out` (PNG). Returns the path written."""
    _check_target(Path(out), overwrite)
    header, trials = read_trials(log)
    names = (header or {}).get("tasks")
    fig = trajectory_figure(trials, names, title)
    try:
        return _save(fig, out, overwrite)
    finally:
        _pyplot().close(fig)


# ------------------------------------------------------------------------------------------ landscape
def landscape_grid(pretrained, finetuned: Sequence, tasks: Sequence, *, resolution: int = 11,
                   bounds: Tuple[float, float] = (0.0, 1.0), fisher_examples: int = 30, progress: bool = True,
                   device=None) -> dict:
    """Mean validation metric over a resolution x resolution grid of (λ1, λ2) for general task arithmetic and
    for DF-Merge, for exactly two fine-tuned models with their tasks. Each Fisher is estimated once per
    (model, λ) (2 x resolution estimates), not once per grid point."""
    from tqdm.auto import tqdm

    from pymerge.search.objective import DFMergeObjective

    if len(finetuned) != 2 or len(tasks) != 2:
        raise ValueError(f"landscape: expected exactly 2 fine-tuned models and 2 tasks, got {len(finetuned)} and "
                         f"{len(tasks)}")
    if not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution: expected an integer >= 2, got {resolution!r}")
    lo, hi = (float(v) for v in bounds)
    if not lo < hi:
        raise ValueError(f"bounds: expected lo < hi, got {bounds}")
    axis = [lo + (hi - lo) * k / (resolution - 1) for k in range(resolution)]
    obj = DFMergeObjective(pretrained, list(finetuned), list(tasks), fisher_examples=fisher_examples, device=device)
    gta = [[0.0] * resolution for _ in axis]
    dfm = [[0.0] * resolution for _ in axis]
    bar = tqdm(total=2 * resolution * resolution + 2 * resolution, desc="landscape", unit="eval",
               disable=not progress, dynamic_ncols=True)
    second = []
    for lam in axis:
        second.append(obj.fisher_at(1, lam))
        bar.update(1)
    for r, l1 in enumerate(axis):          # rows: λ2 index below; gta[j][i] = value at (λ1 = axis[i], λ2 = axis[j])
        first = obj.fisher_at(0, l1)
        bar.update(1)
        for c, l2 in enumerate(axis):
            obj.combine([l1, l2], None)
            gta[c][r] = obj.objective_of(obj.score("validation"))
            bar.update(1)
            obj.combine([l1, l2], [first, second[c]])
            dfm[c][r] = obj.objective_of(obj.score("validation"))
            bar.update(1)
    bar.close()
    return {"axis": axis, "tasks": [t.name for t in tasks], "fisher_examples": fisher_examples,
            "general_task_arithmetic": gta, "dfmerge": dfm}


def save_landscape_grid(grid: dict, path: PathLike, overwrite: bool = False) -> Path:
    path = Path(path)
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(grid, f, indent=1)
    os.replace(tmp, path)
    return path


def load_landscape_grid(path: PathLike) -> dict:
    path = Path(path)
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}: not a landscape grid (invalid JSON: {exc.msg})") from exc
    _check_grid(grid, str(path))
    return grid


def _check_grid(grid: dict, where: str) -> None:
    keys = ("axis", "tasks", "general_task_arithmetic", "dfmerge")
    if not isinstance(grid, dict) or any(k not in grid for k in keys):
        raise PlotError(f"{where}: a landscape grid needs keys {keys}")
    n = len(grid["axis"])
    for k in ("general_task_arithmetic", "dfmerge"):
        if len(grid[k]) != n or any(len(row) != n for row in grid[k]):
            raise PlotError(f"{where}: {k} must be a {n} x {n} grid (one value per (λ1, λ2))")


def landscape_figure(grid: dict):
    import numpy as np

    plt = _pyplot()
    _check_grid(grid, "landscape grid")
    axis = np.asarray(grid["axis"], dtype=float)
    panels = (("General Task Arithmetic", np.asarray(grid["general_task_arithmetic"], dtype=float)),
              ("DF-Merge", np.asarray(grid["dfmerge"], dtype=float)))
    vmin = min(float(v.min()) for _, v in panels)
    vmax = max(float(v.max()) for _, v in panels)
    step = (axis[1] - axis[0]) / 2
    extent = (axis[0] - step, axis[-1] + step, axis[0] - step, axis[-1] + step)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    a, b = grid["tasks"]
    for ax, (name, values) in zip(axes, panels):
        im = ax.imshow(values, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap="viridis",
                       interpolation="nearest", aspect="equal")
        j, i = np.unravel_index(int(values.argmax()), values.shape)
        ax.plot(axis[i], axis[j], marker="*", color="white", markeredgecolor="black", markersize=14)
        ax.set_title(f"{name}\nbest {values.max():.3f} at λ = ({axis[i]:.2f}, {axis[j]:.2f})", fontsize=10)
        ax.set_xlabel(f"λ1 ({a})")
    axes[0].set_ylabel(f"λ2 ({b})")
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="mean validation metric")
    return fig


def plot_landscape(grid: Union[dict, PathLike], out: PathLike, *, overwrite: bool = False) -> Path:
    """Fig. 6 from a computed grid (dict or its JSON file) into `out` (PNG). Returns the path written."""
    _check_target(Path(out), overwrite)
    if not isinstance(grid, dict):
        grid = load_landscape_grid(grid)
    fig = landscape_figure(grid)
    try:
        return _save(fig, out, overwrite)
    finally:
        _pyplot().close(fig)
