"""`pymerge plot trajectory|landscape`: the DF-Merge paper's Fig. 4 and Fig. 6 as PNG files."""
from __future__ import annotations

HELP = "plot a search trajectory (Fig. 4) or a two-model coefficient landscape (Fig. 6) as PNG"
DESCRIPTION = """\
trajectory: from a search's trial log (JSONL), the objective of every evaluation and the best so far (top) and
the coefficients of the best-so-far point (bottom) against the trial number, the random initial points shaded.

  pymerge plot trajectory search/trials.jsonl -o trajectory.png

landscape: the mean validation metric over a grid of (λ1, λ2) for general task arithmetic beside DF-Merge, for
two fine-tuned models. SOURCE is a landscape grid JSON (written by `pymerge demo` to OUT/plots/landscape.json or
by pymerge.plots.save_landscape_grid), or a `pymerge search` config YAML with two models, computed at
--resolution.

  pymerge plot landscape demo-out/plots/landscape.json -o landscape.png
  pymerge plot landscape search.yml -o landscape.png --resolution 11 --save-grid grid.json"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="plot", required=True, metavar="PLOT")
    t = sub.add_parser("trajectory", help="search trajectory from a trial log (Fig. 4)")
    t.add_argument("log", help="trial log (JSONL) of a search")
    t.add_argument("-o", "--out", required=True, help="PNG file to write")
    t.add_argument("--title", help="title above the plot")
    t.add_argument("--force", action="store_true", help="replace OUT if it exists")
    land = sub.add_parser("landscape", help="(λ1, λ2) landscape of GTA beside DF-Merge (Fig. 6)")
    land.add_argument("source", help="landscape grid JSON, or a search config YAML with two models")
    land.add_argument("-o", "--out", required=True, help="PNG file to write")
    land.add_argument("--resolution", type=int, default=11, help="grid points per axis when computing (default 11)")
    land.add_argument("--range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LO", "HI"),
                      help="coefficient range of both axes when computing (default 0 1)")
    land.add_argument("--fisher-examples", type=int, default=30, help="unlabelled inputs per Fisher (default 30)")
    land.add_argument("--save-grid", help="also write the computed grid as JSON (re-plot without recomputing)")
    land.add_argument("--force", action="store_true", help="replace existing output files")


def run(args) -> int:
    from pymerge import plots
    from pymerge.errors import UsageError

    if args.plot == "trajectory":
        path = plots.plot_trajectory(args.log, args.out, title=args.title, overwrite=args.force)
        print(f"wrote {path}")
        return 0
    if args.resolution < 2:
        raise UsageError(f"--resolution: expected an integer >= 2, got {args.resolution}")
    if str(args.source).endswith(".json"):
        grid = plots.load_landscape_grid(args.source)
    else:
        grid = _compute_from_config(args, plots)
    path = plots.plot_landscape(grid, args.out, overwrite=args.force)
    print(f"wrote {path}")
    return 0


def _compute_from_config(args, plots) -> dict:
    """The landscape of a `pymerge search` config's two models (same YAML: base model, models, per-task data)."""
    from pymerge.search.config import build_tasks, load_config
    from pymerge.errors import UsageError

    base, entries, search = load_config(args.source)
    if len(entries) != 2:
        raise UsageError(f"{args.source}: a landscape needs exactly 2 fine-tuned models, the config has "
                         f"{len(entries)}")
    tasks = build_tasks(entries)
    grid = plots.landscape_grid(base, [m for m, _, _ in entries], tasks, resolution=args.resolution,
                                bounds=tuple(args.range), fisher_examples=args.fisher_examples)
    if args.save_grid:
        print(f"wrote {plots.save_landscape_grid(grid, args.save_grid, overwrite=args.force)}")
    return grid
