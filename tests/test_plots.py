"""Plots from synthetic trial logs and landscape grids: what is drawn equals what the data says."""
import itertools
import json
import random

import pytest

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_log(path, n=14, n_random=5, m=3, seed=0, truncated_tail=True):
    rng = random.Random(seed)
    records = []
    for k in range(n):
        records.append({"trial": k, "lambdas": [rng.random() for _ in range(m)],
                        "metrics": {"a": rng.random()}, "objective": rng.random(),
                        "phase": "random" if k < n_random else "search",
                        "seconds": {"fisher": 0.1, "combine": 0.01, "evaluate": 0.2}})
    lines = [json.dumps({"header": {"tasks": ["sent", "topic", "lang"][:m]}})]
    shuffled = records[:]
    rng.shuffle(shuffled)  # parallel workers finish out of order: readers key by trial
    lines += [json.dumps(r) for r in shuffled]
    text = "\n".join(lines) + "\n"
    if truncated_tail:  # a run killed mid-write leaves half a line
        text += '{"trial": 99, "lambdas": [0.5'
    path.write_text(text)
    return records


def test_read_trials_sorts_by_trial_and_drops_an_unfinished_last_line(tmp_path):
    from pymerge.plots import read_trials

    records = _write_log(tmp_path / "log.jsonl")
    header, trials = read_trials(tmp_path / "log.jsonl")
    assert header == {"tasks": ["sent", "topic", "lang"]}
    assert [t["trial"] for t in trials] == list(range(len(records)))
    assert trials == records


def test_trajectory_series_is_the_running_max_with_its_coefficients(tmp_path):
    from pymerge.plots import read_trials, trajectory_series

    records = _write_log(tmp_path / "log.jsonl", n=20)
    _, trials = read_trials(tmp_path / "log.jsonl")
    s = trajectory_series(trials)
    objectives = [r["objective"] for r in records]
    assert s["objective"] == objectives
    assert s["best"] == list(itertools.accumulate(objectives, max))
    for k in range(len(records)):
        arg = max(range(k + 1), key=lambda j: (objectives[j], -j))  # first trial reaching the max so far
        assert s["best_lambdas"][k] == records[arg]["lambdas"]
    assert s["random"] == [r["phase"] == "random" for r in records]


def test_trajectory_figure_draws_the_series_and_shades_the_random_phase(tmp_path):
    from pymerge.plots import read_trials, trajectory_figure, trajectory_series

    _write_log(tmp_path / "log.jsonl", n=12, n_random=4)
    header, trials = read_trials(tmp_path / "log.jsonl")
    s = trajectory_series(trials)
    fig = trajectory_figure(trials, header["tasks"])
    top, bottom = fig.axes[:2]
    lines = {line.get_label(): line for line in top.lines}
    assert list(lines["best so far"].get_ydata()) == s["best"]
    assert list(lines["evaluation"].get_ydata()) == s["objective"]
    lam_lines = {line.get_label(): line for line in bottom.lines}
    assert set(lam_lines) == {"sent", "topic", "lang"}
    for i, name in enumerate(["sent", "topic", "lang"]):
        assert list(lam_lines[name].get_ydata()) == [lam[i] for lam in s["best_lambdas"]]
    spans = [p for p in top.patches if p.get_label() == "random initial points"]
    assert len(spans) == 1
    x0, x1 = spans[0].get_x(), spans[0].get_x() + spans[0].get_width()
    assert (x0, x1) == (pytest.approx(-0.5), pytest.approx(3.5))  # trials 0..3


def test_plot_trajectory_writes_a_png_and_never_clobbers(tmp_path):
    from PIL import Image

    from pymerge.plots import plot_trajectory

    _write_log(tmp_path / "log.jsonl")
    out = plot_trajectory(tmp_path / "log.jsonl", tmp_path / "t.png", title="x")
    assert out.read_bytes()[:8] == PNG_MAGIC
    w, h = Image.open(out).size
    assert w > 400 and h > 300
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="t.png"):
        plot_trajectory(tmp_path / "log.jsonl", out)
    assert out.read_bytes() == before
    plot_trajectory(tmp_path / "log.jsonl", out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_bad_logs_get_errors_naming_the_file_and_line(tmp_path):
    from pymerge.plots import PlotError, read_trials

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"trial": 0, "lambdas": [0.1], "objective": 0.5}\nnot json\n')
    with pytest.raises(PlotError, match=r"bad.jsonl:2"):
        read_trials(bad)
    bad.write_text('{"trial": 0, "objective": 0.5}\n')
    with pytest.raises(PlotError, match=r"bad.jsonl:1.*lambdas"):
        read_trials(bad)
    bad.write_text('{"header": {}}\n')
    with pytest.raises(PlotError, match="no finished trials"):
        read_trials(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_trials(tmp_path / "missing.jsonl")


def test_the_plots_read_the_log_through_the_search_reader(tmp_path):
    """One reader of the trial log: a damaged log gets the search's own message from the plots, and a log the
    search writes (records out of order, a cut last line) reads the same both ways."""
    from pymerge.plots import PlotError, read_trials
    from pymerge.search import log as trial_log

    records = _write_log(tmp_path / "log.jsonl")
    header, trials, _ = trial_log.read(tmp_path / "log.jsonl")
    assert read_trials(tmp_path / "log.jsonl") == (header, [trials[k] for k in sorted(trials)])
    assert [trials[k] for k in sorted(trials)] == records
    bad = tmp_path / "bad.jsonl"
    for text in ('{"header": {}}\n{"trial": 0, "lambdas": [0.1], "objective": 0.5}\nnot json\n',
                 '{"trial": "x", "lambdas": [0.1], "objective": 0.5}\n', '\xff\n'):
        bad.write_bytes(text.encode("latin-1"))
        with pytest.raises(trial_log.TrialLogError) as search_error:
            trial_log.read(bad, required=("trial", "lambdas", "objective"))
        with pytest.raises(PlotError) as plot_error:
            read_trials(bad)
        assert str(plot_error.value) == str(search_error.value) and str(bad) in str(plot_error.value)


def _grid(n=4):
    axis = [k / (n - 1) for k in range(n)]
    rng = random.Random(1)
    gta = [[rng.random() for _ in axis] for _ in axis]
    dfm = [[rng.random() for _ in axis] for _ in axis]
    return {"axis": axis, "tasks": ["sent", "topic"], "general_task_arithmetic": gta, "dfmerge": dfm}


def test_landscape_figure_shows_both_grids_on_one_colour_scale():
    import numpy as np

    from pymerge.plots import landscape_figure

    grid = _grid()
    fig = landscape_figure(grid)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    for ax, key in zip(panels, ("general_task_arithmetic", "dfmerge")):
        im = ax.images[0]
        assert np.array_equal(np.asarray(im.get_array()), np.asarray(grid[key]))
        lo, hi = im.get_clim()
        assert lo == min(min(map(min, grid[k])) for k in ("general_task_arithmetic", "dfmerge"))
        assert hi == max(max(map(max, grid[k])) for k in ("general_task_arithmetic", "dfmerge"))
        star = ax.lines[0]
        values = np.asarray(grid[key])
        j, i = np.unravel_index(values.argmax(), values.shape)  # rows are λ2, columns λ1
        assert (star.get_xdata()[0], star.get_ydata()[0]) == (grid["axis"][i], grid["axis"][j])
    assert "λ1 (sent)" in panels[0].get_xlabel() and "λ2 (topic)" in panels[0].get_ylabel()


def test_landscape_grid_files_round_trip_and_bad_grids_are_refused(tmp_path):
    from pymerge.plots import PlotError, load_landscape_grid, plot_landscape, save_landscape_grid

    grid = _grid()
    path = save_landscape_grid(grid, tmp_path / "g.json")
    assert load_landscape_grid(path) == grid
    assert plot_landscape(path, tmp_path / "l.png").read_bytes()[:8] == PNG_MAGIC
    broken = dict(grid, dfmerge=grid["dfmerge"][:-1])
    (tmp_path / "b.json").write_text(json.dumps(broken))
    with pytest.raises(PlotError, match=r"b.json: dfmerge must be a 4 x 4 grid"):
        load_landscape_grid(tmp_path / "b.json")


def test_plot_command(tmp_path, capsys):
    from pymerge import cli

    _write_log(tmp_path / "log.jsonl")
    assert cli.main(["plot", "trajectory", str(tmp_path / "log.jsonl"), "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["plot", "trajectory", str(tmp_path / "log.jsonl"), "-o", str(tmp_path / "t.png")]) == 1
    assert "exists" in capsys.readouterr().err
    (tmp_path / "g.json").write_text(json.dumps(_grid()))
    assert cli.main(["plot", "landscape", str(tmp_path / "g.json"), "-o", str(tmp_path / "l.png")]) == 0
    assert (tmp_path / "l.png").read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["plot", "trajectory", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.png")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def _tiny_models():
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32)
    base = BertModel(BertConfig(**cfg)).eval()
    fts = []
    for labels in (2, 3):
        ft = BertForSequenceClassification(BertConfig(**cfg, num_labels=labels)).eval()
        with torch.no_grad():
            for name, p in ft.bert.named_parameters():
                p.copy_(base.state_dict()[name] + 0.05 * torch.randn_like(p))
        fts.append(ft)
    return base, fts


@pytest.mark.slow
def test_landscape_grid_equals_an_independent_evaluation():
    pytest.importorskip("pymerge.search", reason="the landscape's evaluation comes from pymerge.search")
    import copy

    import torch

    import pymerge.fisher as pf
    from pymerge import ops
    from pymerge.eval.tasks import Task, evaluate, fisher_batches
    from pymerge.plots import landscape_grid

    base, fts = _tiny_models()
    rng = random.Random(0)
    tasks = [Task(name, validation=[{"input_ids": [rng.randrange(1, 50) for _ in range(6)], "label": rng.randrange(c)}
                                    for _ in range(10)], num_labels=c)
             for name, c in (("two", 2), ("three", 3))]
    grid = landscape_grid(base, fts, tasks, resolution=2, bounds=(0.2, 1.0), fisher_examples=4, progress=False)
    assert grid["axis"] == pytest.approx([0.2, 1.0]) and grid["tasks"] == ["two", "three"]
    for key in ("general_task_arithmetic", "dfmerge"):  # not constant, so a transposed grid would be caught
        assert len({v for row in grid[key] for v in row}) > 1
    pre = {n: p.detach() for n, p in base.named_parameters()}
    bodies = [{n: p.detach() for n, p in ft.bert.named_parameters()} for ft in fts]

    def with_body(i, body):
        m = copy.deepcopy(fts[i])
        with torch.no_grad():
            for n, p in m.bert.named_parameters():
                p.copy_(body[n])
        return m

    def mean_score(body):
        return sum(evaluate(with_body(i, body), tasks[i]) for i in range(2)) / 2

    for (i, l1), (j, l2) in [((0, 0.2), (1, 1.0)), ((1, 1.0), (0, 0.2)), ((1, 1.0), (1, 1.0))]:
        lams = (l1, l2)
        gta = {n: pre[n] + l1 * (bodies[0][n] - pre[n]) + l2 * (bodies[1][n] - pre[n]) for n in pre}
        assert grid["general_task_arithmetic"][j][i] == pytest.approx(mean_score(gta), abs=1e-12)
        fishers = []
        for k in range(2):  # exact Fisher of model k at θ_k(λ_k), on its task's first 4 unlabelled inputs
            at = with_body(k, {n: pre[n] + lams[k] * (bodies[k][n] - pre[n]) for n in pre})
            fisher = pf.estimate(at, fisher_batches(at, tasks[k], 4), mode="exact")
            fishers.append({n: fisher.tensors["bert." + n] for n in pre})
        dfm = {n: ops.dfmerge_combine_reference(pre[n], [bodies[0][n] - pre[n], bodies[1][n] - pre[n]],
                                                [fishers[0][n], fishers[1][n]], list(lams)) for n in pre}
        assert grid["dfmerge"][j][i] == pytest.approx(mean_score(dfm), abs=1e-12)


@pytest.mark.slow
def test_plot_landscape_from_a_search_config(tmp_path, capsys):
    """`pymerge plot landscape search.yml`: the same YAML as `pymerge search` (two models), computed and drawn."""
    pytest.importorskip("pymerge.search")
    from pymerge import cli
    from tests import engine_models as em
    from tests.test_search_cli import _config

    cfg = _config(tmp_path, em.build_zoo(tmp_path / "zoo"))
    png, grid_file = tmp_path / "l.png", tmp_path / "g.json"
    assert cli.main(["plot", "landscape", str(cfg), "-o", str(png), "--resolution", "2", "--range", "0.5", "1",
                     "--fisher-examples", "3", "--save-grid", str(grid_file)]) == 0
    grid = json.loads(grid_file.read_text())
    assert grid["axis"] == [0.5, 1.0] and grid["tasks"] == ["sst", "topic"] and grid["fisher_examples"] == 3
    for key in ("general_task_arithmetic", "dfmerge"):
        assert all(0.0 <= v <= 1.0 for row in grid[key] for v in row)
    assert png.read_bytes()[:8] == PNG_MAGIC
