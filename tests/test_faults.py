"""Fault injection (issue 9): every entry point fed malformed inputs and their neighbours, disks that fill up,
processes killed at random points. Every failure is checked in one place (`check_failure`): non-zero exit, a
one-line message naming the culprit, no traceback, nothing left beside the output, every input byte-identical.
"""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import engine_models as em
from pymerge.cli import main
from pymerge.io import writer

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("merge", "inspect", "fisher")


# --------------------------------------------------------------------------------------------------
# the inputs (built once) and the invariants (checked in one place)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    z = em.build_zoo(root)
    z["root"] = root
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 3} w{i + 7}", "label": i % 2}) + "\n" for i in range(6)))
    z["data"] = data
    # Fishers written by the real command, so the fingerprint checks meet what the estimator stores
    for name in ("sst", "rte"):
        z[f"{name}_real_fisher"] = root / f"{name}.real.fisher.safetensors"
        assert main(["fisher", str(z[name]), "--data", str(data), "-o", str(z[f"{name}_real_fisher"]),
                     "--device", "cpu"]) == 0
    z["sst_masks"] = em.fisher_for(em.load_dir(z["sst"]), 7, root / "sst.masks.safetensors", mode="masks")
    z["rte_masks"] = em.fisher_for(em.load_dir(z["rte"]), 8, root / "rte.masks.safetensors", mode="masks")
    return z


def snapshot(*roots):
    """sha256 of every file (and the target of every symlink) under the roots."""
    out = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(out: Path):
    """Entries beside `out` that a run against it may have made (temporary or set-aside directories)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run_cli(capsys, argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def check_failure(capsys, argv, culprits, *, inputs, out=None, code=None):
    """Run one failing command and check every invariant of a clean failure."""
    before = snapshot(*inputs)
    existed = out is not None and out.exists()
    out_before = snapshot(out) if existed else None
    rc, stdout, err = run_cli(capsys, argv)
    assert rc not in (0, None), f"{argv}: succeeded, expected a failure\n{stdout}"
    if code is not None:
        assert rc == code, (rc, err)
    assert "Traceback" not in err and "Traceback" not in stdout, err
    message_lines = [line for line in err.splitlines() if line.startswith(f"pymerge {argv[0]}: ")]
    assert len(message_lines) == 1, err  # one line
    assert len(err) < 3000, f"error output of {len(err)} characters"
    for c in [culprits] if isinstance(culprits, str) else culprits:
        assert str(c) in err, f"{c!r} not named in: {err}"
    assert snapshot(*inputs) == before, "an input changed"
    if out is not None:
        assert leftovers(out) == []
        if existed:
            assert snapshot(out) == out_before, "the existing output changed"
        else:
            assert not os.path.lexists(out)
    return err


def merge_yaml(path: Path, models, *, method="fisher", base=None, extra=""):
    """models: (model path, name or None, fisher or None)."""
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for model, name, fisher in models:
        lines.append(f"  - model: {model}")
        if name is not None:
            lines.append(f"    name: {json.dumps(name)}")
        if fisher is not None:
            lines.append(f"    parameters: {{fisher: {fisher}}}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


# --------------------------------------------------------------------------------------------------
# merge: clobbering, collisions, foreign statistics
# --------------------------------------------------------------------------------------------------
def test_head_file_collisions_are_refused_before_work(zoo, tmp_path, capsys):
    for a, b in (("a/b", "a_b"), ("Task", "task"), ("x y", "x_y")):
        cfg = merge_yaml(tmp_path / "c.yml", [(zoo["sst"], a, None), (zoo["topic"], b, None)], method="average")
        check_failure(capsys, ["merge", cfg, "-o", tmp_path / "out", "--no-progress"], [repr(a), repr(b), "heads/"],
                      inputs=[zoo["root"], cfg], out=tmp_path / "out")
    # heads dropped: no head files, so the same names are fine
    cfg = merge_yaml(tmp_path / "c.yml", [(zoo["sst"], "a/b", None), (zoo["topic"], "a_b", None)], method="average",
                     extra="heads: drop\n")
    assert run_cli(capsys, ["merge", cfg, "-o", tmp_path / "ok", "--no-progress"])[0] == 0


def test_output_that_is_contains_or_lies_inside_an_input(zoo, tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    cfg = merge_yaml(tmp_path / "cfg" / "c.yml",
                     [(zoo["sst"], None, zoo["sst_fisher"]), (zoo["rte"], None, zoo["rte_fisher"])],
                     base=zoo["bert_base"])
    link = tmp_path / "link-to-sst"
    link.symlink_to(zoo["sst"], target_is_directory=True)
    cases = [(zoo["sst"], "is the model sst"), (zoo["bert_base"], "is the base model"),
             (zoo["sst"] / "merged", "lies inside the model sst"), (zoo["root"], "contains the model"),
             (zoo["sst_fisher"], "is the fisher file of sst"), (cfg, "is the config file"),
             (cfg.parent, "contains the config file"), (link, "is the model sst"),
             (link / "sub", "lies inside the model sst")]
    for out, what in cases:
        for force in ([], ["--force"]):
            check_failure(capsys, ["merge", cfg, "-o", out, "--no-progress", *force], [what, str(out)],
                          inputs=[zoo["root"], cfg], code=1)
            assert leftovers(Path(out)) == []


def test_statistics_of_another_model_are_refused(zoo, tmp_path, capsys):
    sst, rte, base = zoo["sst"], zoo["rte"], zoo["bert_base"]
    out = tmp_path / "out"
    inputs = [zoo["root"]]
    real_sst, real_rte = zoo["sst_real_fisher"], zoo["rte_real_fisher"]
    # the real command's files, correctly paired: merges
    good = merge_yaml(tmp_path / "good.yml", [(sst, None, real_sst), (rte, None, real_rte)])
    assert run_cli(capsys, ["merge", good, "-o", out, "--no-progress"])[0] == 0
    shutil.rmtree(out)
    cases = {
        # swapped (same architecture: only the weights fingerprint tells them apart)
        "swapped": ([(sst, None, real_rte), (rte, None, real_sst)], "fisher",
                    ["was computed on other weights than model sst", str(real_rte), "matches model rte"]),
        # a third model's Fisher (not in the merge)
        "third": ([(sst, None, zoo["rte_fisher"]), (zoo["topic"], None, zoo["topic_fisher"])], "fisher",
                  ["other weights than model sst", "matches no model"]),
        # another structure (3 labels instead of 2): the names and merged shapes agree, the head does not
        "structure": ([(sst, None, zoo["topic_fisher"]), (rte, None, zoo["rte_fisher"])], "fisher",
                      ["another structure than sst", str(zoo["topic_fisher"])]),
        # kinds: a mask Fisher where a parameter Fisher is expected, and the reverse
        "masks_for_fisher": ([(sst, None, zoo["sst_masks"]), (rte, None, zoo["rte_masks"])], "fisher",
                             ["is a masks statistics file", "takes a fisher file", str(zoo["sst_masks"])]),
        "fisher_for_masks": ([(sst, None, zoo["sst_fisher"]), (rte, None, zoo["rte_fisher"])], "mask_fisher",
                             ["is a fisher statistics file", "takes a masks file"]),
        # not a statistics file at all: a model checkpoint
        "checkpoint": ([(sst, None, sst / "model.safetensors"), (rte, None, zoo["rte_fisher"])], "fisher",
                       ["no pymerge Fisher metadata", str(sst / "model.safetensors")]),
    }
    for name, (models, method, culprits) in cases.items():
        cfg = merge_yaml(tmp_path / f"{name}.yml", models, method=method, base=base)
        err = check_failure(capsys, ["merge", cfg, "-o", out, "--no-progress"], culprits, inputs=inputs + [cfg],
                            out=out)
        assert err.count(str(models[0][2])) <= 1 or name == "checkpoint", "path repeated: " + err
    # the explicit override: CLI flag or config key (fingerprints only; a wrong kind stays wrong)
    swapped = tmp_path / "swapped.yml"
    assert run_cli(capsys, ["merge", swapped, "-o", out, "--no-progress", "--allow-foreign-stats"])[0] == 0
    cfg = merge_yaml(tmp_path / "k.yml", cases["structure"][0], base=base, extra="allow_foreign_stats: true\n")
    assert run_cli(capsys, ["merge", cfg, "-o", out, "--force", "--no-progress"])[0] == 0
    check_failure(capsys, ["merge", tmp_path / "masks_for_fisher.yml", "-o", tmp_path / "o2", "--no-progress",
                           "--allow-foreign-stats"], "is a masks statistics file", inputs=inputs, out=tmp_path / "o2")
    # DF-Merge's Fishers come from other points than the fine-tuned weights: only the structure is checked
    cfg = merge_yaml(tmp_path / "df.yml", [(sst, None, real_rte), (rte, None, real_sst)], method="dfmerge",
                     base=base)
    cfg.write_text(cfg.read_text().replace("{fisher:", "{lambda: 0.5, fisher:"))
    assert run_cli(capsys, ["merge", cfg, "-o", tmp_path / "df", "--no-progress"])[0] == 0


def test_fingerprints_from_headers_equal_the_stores(zoo):
    from pymerge.fisher import store
    from pymerge.io.fingerprint import ModelFingerprints
    from pymerge.io.reader import CheckpointDir

    for name in ("sst", "gpt2_ft0"):  # one file; sharded
        state = em.load_dir(zoo[name])
        src = CheckpointDir(zoo[name])
        fp = ModelFingerprints(src)
        assert fp.structure(src.keys()) == store.structure_fingerprint(state)
        assert fp.weights(src.keys()) == store.weights_fingerprint(state)
        assert fp.has_weights(store.weights_fingerprint(state)) and not fp.has_weights("0" * 16)
    other = CheckpointDir(zoo["rte"])
    assert ModelFingerprints(other).weights(other.keys()) != store.weights_fingerprint(em.load_dir(zoo["sst"]))
    # an in-memory module: its state dict repeats tied weights (GPT-2's lm_head), named_parameters does not
    from transformers import GPT2LMHeadModel

    from pymerge.io.reader import StateDictSource

    model = GPT2LMHeadModel(em.gpt2_config())
    assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in dict(model.named_parameters())
    fp = ModelFingerprints(StateDictSource(model))
    assert fp.has_structure(store.structure_fingerprint(model)) and fp.has_weights(store.weights_fingerprint(model))


# --------------------------------------------------------------------------------------------------
# malformed inputs, for every entry point
# --------------------------------------------------------------------------------------------------
def _bad_models(root: Path, zoo):
    """Model directories that are broken in one way each: (path, what the message must name)."""
    out = {}

    def copy(name):
        d = root / name
        shutil.copytree(zoo["sst"], d)
        return d

    d = copy("config_int")
    (d / "config.json").write_text("5")
    out["config_int"] = (d, [str(d / "config.json"), "JSON object"])
    d = copy("config_list")
    (d / "config.json").write_text("[1, 2]")
    out["config_list"] = (d, [str(d / "config.json"), "JSON object"])
    d = copy("config_bad_json")
    (d / "config.json").write_text("{not json")
    out["config_bad_json"] = (d, [str(d / "config.json")])
    d = copy("truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out["truncated"] = (d, [str(w)])
    d = copy("pickle_only")
    (d / "model.safetensors").unlink()
    torch.save(em.load_dir(zoo["sst"]), d / "pytorch_model.bin")
    out["pickle_only"] = (d, [str(d / "pytorch_model.bin"), "pickle"])
    d = root / "empty"
    d.mkdir()
    out["empty"] = (d, [str(d), "no model weights"])
    out["missing"] = (root / "missing", [str(root / "missing"), "not found"])
    f = root / "not_safetensors.safetensors"
    f.write_text("hello, I am not a checkpoint")
    out["not_safetensors"] = (f, [str(f)])
    d = copy("bad_index")
    (d / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    out["bad_index"] = (d, [str(d / "model.safetensors.index.json")])
    return out


def test_malformed_models_in_merge_and_inspect(zoo, tmp_path, capsys):
    bad = _bad_models(tmp_path / "bad", zoo)
    inputs = [zoo["root"], tmp_path / "bad"]
    for name, (model, culprits) in bad.items():
        cfg = merge_yaml(tmp_path / f"{name}.yml", [(zoo["sst"], None, None), (model, "bad", None)],
                         method="average")
        check_failure(capsys, ["merge", cfg, "-o", tmp_path / "out", "--no-progress"], culprits,
                      inputs=inputs + [cfg], out=tmp_path / "out")
        check_failure(capsys, ["inspect", zoo["sst"], model], culprits, inputs=inputs)
        check_failure(capsys, ["inspect", zoo["sst"], "--base", model], culprits, inputs=inputs)


@pytest.mark.parametrize("command", ["fisher", "stats"])
def test_malformed_inputs_of_fisher_and_stats(zoo, tmp_path, capsys, command):
    bad = _bad_models(tmp_path / "bad", zoo)
    inputs = [zoo["root"], tmp_path / "bad"]
    out = tmp_path / "f.safetensors"
    kind = ["--kind", "gram"] if command == "stats" else []

    def argv(model, data, output, *more):
        return [command, model, "--data", data, "-o", output, "--device", "cpu", *kind, *more]

    for name in ("config_int", "config_list", "pickle_only", "empty", "missing"):
        model, culprits = bad[name]
        check_failure(capsys, argv(model, zoo["data"], out),
                      [str(model)] + (["JSON object"] if name.startswith("config") else []), inputs=inputs, out=out)
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad_line.jsonl").write_text('{"text": "w1", "label": 0}\n{oops\n')
    (data / "not_object.jsonl").write_text("[1, 2]\n")
    (data / "no_text.jsonl").write_text('{"txt": "w1", "label": 0}\n')
    (data / "unknown.txt").write_text("w1 w2\n")
    (data / "empty.jsonl").write_text("")
    cases = [(data / "missing.jsonl", "not found"), (data / "bad_line.jsonl", "bad_line.jsonl:2"),
             (data / "not_object.jsonl", "JSON object"), (data / "no_text.jsonl", "'text'"),
             (data / "unknown.txt", ".jsonl or .csv"), (data / "empty.jsonl", "no examples")]
    for path, culprit in cases:
        check_failure(capsys, argv(zoo["sst"], path, out), [culprit], inputs=inputs + [data], out=out)
    # the output may not be an input, nor lie inside one
    for target, what in ((zoo["sst"] / "model.safetensors", "lies inside the model"),
                         (zoo["data"], "is the --data file")):
        check_failure(capsys, argv(zoo["sst"], zoo["data"], target, "--force"), [what], inputs=inputs, code=1)
    # an existing output is kept without --force
    out.write_bytes(b"keep me")
    check_failure(capsys, argv(zoo["sst"], zoo["data"], out), ["--force"], inputs=inputs, out=out)
    out.unlink()
    # usage errors: exit status 2
    check_failure(capsys, [command, zoo["sst"], "-o", out], "--data", inputs=inputs, out=out, code=2)
    if command == "fisher":
        check_failure(capsys, argv(zoo["sst"], zoo["data"], out, "--mode", "bogus"), "--mode", inputs=inputs,
                      out=out, code=2)
    else:
        check_failure(capsys, [command, zoo["sst"], "--data", zoo["data"], "-o", out, "--kind", "bogus"], "bogus",
                      inputs=inputs, out=out)


def test_gram_statistics_of_another_model_or_kind_are_refused(zoo, tmp_path, capsys):
    grams = {}
    for name in ("sst", "rte"):
        grams[name] = zoo["root"].parent / f"{zoo['root'].name}-{name}.gram.safetensors"
        if not grams[name].exists():
            assert main(["stats", str(zoo[name]), "--data", str(zoo["data"]), "-o", str(grams[name]), "--kind", "gram",
                         "--device", "cpu"]) == 0
    capsys.readouterr()
    sst, rte, out = zoo["sst"], zoo["rte"], tmp_path / "out"
    inputs = [zoo["root"], *grams.values()]

    def cfg(name, a, b, method="regmean"):
        path = tmp_path / f"{name}.yml"
        path.write_text(f"merge_method: {method}\nmodels:\n  - {{model: {sst}, parameters: {{stats: {a}}}}}\n"
                        f"  - {{model: {rte}, parameters: {{stats: {b}}}}}\n")
        return path

    assert run_cli(capsys, ["merge", cfg("good", grams["sst"], grams["rte"]), "-o", out, "--no-progress"])[0] == 0
    shutil.rmtree(out)
    check_failure(capsys, ["merge", cfg("swapped", grams["rte"], grams["sst"]), "-o", out, "--no-progress"],
                  ["other weights than model sst", str(grams["rte"]), "matches model rte"], inputs=inputs, out=out)
    check_failure(capsys, ["merge", cfg("fisher_for_gram", zoo["sst_real_fisher"], zoo["rte_real_fisher"]), "-o", out,
                           "--no-progress"], [str(zoo["sst_real_fisher"]), "gram"], inputs=inputs, out=out)
    check_failure(capsys, ["merge", merge_yaml(tmp_path / "g.yml", [(sst, None, grams["sst"]), (rte, None, grams["rte"])]),
                           "-o", out, "--no-progress"], [str(grams["sst"]), "is a gram statistics file"],
                  inputs=inputs, out=out)


def _yaml_cases(d: Path, zoo):
    d.mkdir()
    bomb = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):  # 9**10 nodes once expanded
        bomb.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i > 1 else "*a"] * 9) + "]")
    small = ['s: &s ["' + "x" * 2000 + '"]', "t: &t [" + ", ".join(["*s"] * 40) + "]",
             "u: &u [" + ", ".join(["*t"] * 40) + "]"]  # 3.2 MB of text once expanded
    models = f"models: [{zoo['sst']}, {zoo['rte']}]\n"
    cases = {
        "bomb.yml": ("\n".join(bomb) + "\nmerge_method: *a9\n" + models, "expands to more than"),
        "small_bomb.yml": ("\n".join(small) + "\nmerge_method: average\nparameters: {weight: *u}\n" + models,
                           "expands to more than"),
        "bomb_in_model.yml": ("\n".join(bomb) + f"\nmerge_method: average\nmodels:\n  - model: {zoo['sst']}\n"
                              f"    name: *a9\n  - {zoo['rte']}\n", "expands to more than"),
        "recursive.yml": ("merge_method: average\nmodels: &m [*m]\n", "refers to itself"),
        "deep.yml": ("merge_method: average\nmodels: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
        "duplicate_key.yml": ("merge_method: average\n" + models + models, "twice"),
        "python_tag.yml": ("merge_method: !!python/object/apply:os.system ['echo owned']\n" + models,
                           "could not determine a constructor"),
        "binary.yml": (b"\x00\xff\xfe binary garbage", "not UTF-8"),
        "empty.yml": ("", "expected a mapping"),
        "list.yml": ("- a\n- b\n", "expected a mapping"),
        "models_int.yml": ("merge_method: average\nmodels: 5\n", "models"),
        "huge_key.yml": ("merge_method: average\n" + "k" * 1000 + ": 1\n" + models, "unknown key"),
        "huge_value.yml": ("merge_method: average\nheads: " + "v" * 100000 + "\n" + models, "heads must be"),
        "long_method.yml": ("merge_method: " + "m" * 100000 + "\n" + models, "unknown merge_method"),
        "bad_syntax.yml": ("merge_method: [average\n" + models, "invalid YAML"),
        "two_docs.yml": ("merge_method: average\n---\nmerge_method: ties\n", "invalid YAML"),
        "too_big.yml": ("# " + "x" * (2 << 20) + "\n", "bytes"),
    }
    out = {}
    for name, (text, culprit) in cases.items():
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        out[name] = (p, culprit)
    out["missing.yml"] = (d / "missing.yml", "not found")
    out["directory"] = (d, "directory")
    return out


def test_malformed_configs(zoo, tmp_path, capsys):
    cases = _yaml_cases(tmp_path / "cfgs", zoo)
    for name, (path, culprit) in cases.items():
        t = time.monotonic()
        check_failure(capsys, ["merge", path, "-o", tmp_path / "out", "--no-progress"], [str(path), culprit],
                      inputs=[zoo["root"], tmp_path / "cfgs"], out=tmp_path / "out")
        assert time.monotonic() - t < 30, f"{name} took {time.monotonic() - t:.0f} s"  # a hang guard, not a timing


def test_usage_errors_exit_2_and_debug_shows_the_traceback(zoo, tmp_path, capsys):
    for argv in (["merge"], ["inspect"], ["merge", "c.yml"], ["bogus"], ["merge", "c.yml", "a", "-o", "b"]):
        rc, _, err = run_cli(capsys, argv)
        assert rc == 2 and "Traceback" not in err, (argv, rc, err)
    missing = tmp_path / "missing.yml"
    with pytest.raises(ValueError, match="config file not found"):
        main(["merge", str(missing), "-o", str(tmp_path / "o"), "--debug"])
    with pytest.raises(ValueError, match="config file not found"):
        main(["--debug", "merge", str(missing), "-o", str(tmp_path / "o")])


def test_unexpected_errors_are_one_line(zoo, tmp_path, capsys, monkeypatch):
    import pymerge.commands.inspect as cmd

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cmd, "run", boom)
    rc, _, err = run_cli(capsys, ["inspect", zoo["sst"]])
    assert rc == 1 and "Traceback" not in err and "internal error: RuntimeError: a bug" in err and "--debug" in err

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "run", ctrl_c)
    rc, _, err = run_cli(capsys, ["inspect", zoo["sst"]])
    assert rc == 130 and err.strip() == "pymerge inspect: interrupted"


# --------------------------------------------------------------------------------------------------
# the output directory: disk full, umask, stale temporary directories
# --------------------------------------------------------------------------------------------------
def _fisher_cfg(tmp_path, zoo):
    return merge_yaml(tmp_path / "m.yml", [(zoo["sst"], None, zoo["sst_fisher"]), (zoo["rte"], None, zoo["rte_fisher"])],
                      base=zoo["bert_base"])


def test_disk_full_names_the_file_and_keeps_the_existing_output(zoo, tmp_path, capsys, monkeypatch):
    cfg = _fisher_cfg(tmp_path, zoo)
    out = tmp_path / "out"
    assert run_cli(capsys, ["merge", cfg, "-o", out, "--no-progress"])[0] == 0
    from pymerge.io import safetensors_file

    real_write = safetensors_file.SafetensorsStreamWriter.write
    for fail_at in (0, 5, 30):
        calls = []

        def write(self, name, tensor):
            calls.append(name)
            if len(calls) > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, name, tensor)

        monkeypatch.setattr(safetensors_file.SafetensorsStreamWriter, "write", write)
        err = check_failure(capsys, ["merge", cfg, "-o", out, "--no-progress", "--force"],
                            ["no space left on device", str(out), "needs", "bytes", "existing output was left"],
                            inputs=[zoo["root"], cfg], out=out)
        assert ".safetensors" in err  # the file being written
    monkeypatch.setattr(safetensors_file.SafetensorsStreamWriter, "write", real_write)
    # known too small before any byte is written
    monkeypatch.setattr(writer, "free_bytes", lambda path: 1000)
    check_failure(capsys, ["merge", cfg, "-o", tmp_path / "new", "--no-progress"],
                  ["not enough space", "needs at least", "1,000 bytes) are free"], inputs=[zoo["root"], cfg],
                  out=tmp_path / "new")


def test_output_directory_follows_the_umask(zoo, tmp_path, capsys):
    cfg = _fisher_cfg(tmp_path, zoo)
    for mask in (0o022, 0o027, 0o002):
        old = os.umask(mask)
        try:
            out = tmp_path / f"out{mask:o}"
            assert run_cli(capsys, ["merge", cfg, "-o", out, "--no-progress"])[0] == 0
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == 0o777 & ~mask
        assert (out / "heads").stat().st_mode & 0o777 == 0o777 & ~mask
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_leftover(out: Path, kind: str, owner):
    d = out.parent / f".{out.name}.{kind}-{random.Random(str(owner)).randrange(10**8):08d}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"partial")
    if owner is not None:
        rec = writer.owner_record()
        rec.update(owner)
        rec["target"] = str(out.absolute())
        (d / writer.OWNER_FILE).write_text(json.dumps(rec))
    return d


def test_stale_temporary_directories(zoo, tmp_path, capsys):
    cfg = _fisher_cfg(tmp_path, zoo)
    out = tmp_path / "out"
    dead = _fake_leftover(out, "tmp", {"pid": _dead_pid()})
    reused = _fake_leftover(out, "tmp", {"pid": os.getpid(), "start": "1"})  # our PID, another start time
    rebooted = _fake_leftover(out, "tmp", {"pid": os.getpid(), "boot": "another-boot"})
    live = _fake_leftover(out, "tmp", {})  # this process: alive
    other_host = _fake_leftover(out, "tmp", {"pid": _dead_pid(), "host": "elsewhere"})
    unowned = _fake_leftover(out, "tmp", None)
    os.utime(unowned, (0, 0))
    other_target = tmp_path / ".out2.tmp-00000000"
    other_target.mkdir()
    rc, _, err = run_cli(capsys, ["merge", cfg, "-o", out, "--no-progress"])
    assert rc == 0, err
    for d in (dead, reused, rebooted):
        assert not d.exists() and f"removed {d}" in err
    for d in (live, other_host, unowned):
        assert d.exists()
    assert f"rm -rf '{unowned}'" in err and f"rm -rf '{other_host}'" in err and str(live) not in err
    assert other_target.exists()
    # a kill between setting the old output aside and renaming the new one in: the next run puts it back
    shutil.rmtree(live)
    aside = _fake_leftover(out, "old", {"pid": _dead_pid()})
    os.rename(out, aside / "old")
    writer.remove_stale(out)
    assert out.is_dir() and (out / "model.safetensors").stat().st_size > 100 and not aside.exists()


# --------------------------------------------------------------------------------------------------
# kill tests: SIGTERM and SIGKILL at random points of a merge, then the invariants on the next run
# --------------------------------------------------------------------------------------------------
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pymerge.io import safetensors_file
    write = safetensors_file.SafetensorsStreamWriter.write
    def slow(self, name, tensor):  # stretch the writing phase so that random kill times land inside it
        time.sleep(0.01)
        return write(self, name, tensor)
    safetensors_file.SafetensorsStreamWriter.write = slow
    from pymerge.cli import main
    print("ready", flush=True)
    sys.exit(main(sys.argv[1:]))
""")


def _start_merge(tmp_path, cfg, out, *extra):
    script = tmp_path / "slow_merge.py"
    script.write_text(SLOW_MERGE.format(root=str(ROOT)))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, str(script), "merge", str(cfg), "-o", str(out), "--no-progress", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_killed_merges_leave_nothing_behind(zoo, tmp_path, capsys):
    cfg = _fisher_cfg(tmp_path, zoo)
    ref = tmp_path / "reference"
    assert run_cli(capsys, ["merge", cfg, "-o", ref, "--no-progress"])[0] == 0
    want = {p.relative_to(ref): h for p, h in ((Path(k), v) for k, v in snapshot(ref).items())}
    inputs = snapshot(zoo["root"], cfg)
    rng = random.Random(9)

    def same_as_reference(out):
        got = {Path(k).relative_to(out): v for k, v in snapshot(out).items()}
        assert got.keys() == want.keys()
        for k in got:  # pymerge_merge.json names the output-independent config; every tensor file is identical
            if k.suffix == ".safetensors":
                assert got[k] == want[k], k

    # when: "any" = a random time after start (planning, writing or done); "writing" = a random time after the
    # temporary directory appeared (the writing phase lasts ~0.5 s here)
    trials = [(signal.SIGTERM, False, "any"), (signal.SIGKILL, True, "writing"), (signal.SIGTERM, True, "writing")]
    for trial, (sig, force, when) in enumerate(trials):
        out = tmp_path / f"out{trial}"
        if force:  # an existing output being replaced must survive any kill
            shutil.copytree(ref, out)
        p = _start_merge(tmp_path, cfg, out, *(["--force"] if force else []))
        if when == "writing":
            deadline = time.monotonic() + 60
            while not leftovers(out) and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            if sig == signal.SIGKILL and p.poll() is None:  # a live writer's directory is never removed
                live = leftovers(out)
                assert writer.remove_stale(out) == [] and leftovers(out) == live
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        if sig == signal.SIGTERM:
            codes = (128 + signal.SIGTERM,) if when == "writing" else (128 + signal.SIGTERM, -signal.SIGTERM, 0)
            assert p.returncode in codes, (p.returncode, err)
            assert "Traceback" not in err, err
            if p.returncode == 128 + signal.SIGTERM:
                assert "interrupted (SIGTERM)" in err and len(err.strip().splitlines()) == 1, err
            assert leftovers(out) == []  # cleaned up like Ctrl-C
        else:
            assert p.returncode == -signal.SIGKILL
            assert leftovers(out), "killed mid-write: the temporary directory is there for the next run"
        writer.remove_stale(out)  # what any next run against `out` does first
        if force:
            same_as_reference(out)  # old or new, but whole
        else:
            assert not out.exists() or same_as_reference(out) is None
        assert leftovers(out) == []
        # the next run succeeds and leaves only the output
        rc, _, err = run_cli(capsys, ["merge", cfg, "-o", out, "--no-progress", "--force"])
        assert rc == 0, err
        same_as_reference(out)
        assert leftovers(out) == []
        assert snapshot(zoo["root"], cfg) == inputs


# --------------------------------------------------------------------------------------------------
# one atomic file (statistics files written by `pymerge fisher` / `pymerge stats` / pymerge.stats.save)
# --------------------------------------------------------------------------------------------------
SLOW_FILE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pymerge.io.writer import atomic_file
    with atomic_file(sys.argv[1]) as tmp:
        tmp.write_bytes(b"partial")
        print("ready", flush=True)
        time.sleep(60)
""")


def _stats_for_file():
    from pymerge.stats import store

    t = {"w": torch.ones(3, 2)}
    return store.Statistics(t, {"pymerge_stats": "1", "kind": "fisher", "pymerge_fisher": "1", "mode": "exact",
                                "num_examples": "1", "structure": store.structure_fingerprint(t),
                                "weights": store.weights_fingerprint(t)})


def test_statistics_files_are_atomic_and_cleaned_after_kills(tmp_path, monkeypatch):
    from pymerge.stats import store

    target = tmp_path / "a.stats.safetensors"
    script = tmp_path / "slow_file.py"
    script.write_text(SLOW_FILE.format(root=str(ROOT)))

    def beside(t=target):
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{t.name}."))

    # two writers at once (each start costs a torch import): one gets SIGTERM, the other SIGKILL
    termed = tmp_path / "b.stats.safetensors"
    procs = {sig: subprocess.Popen([sys.executable, str(script), str(t)], stdout=subprocess.PIPE, text=True,
                                   stderr=subprocess.DEVNULL)
             for sig, t in ((signal.SIGTERM, termed), (signal.SIGKILL, target))}
    for sig, p in procs.items():
        assert p.stdout.readline().strip() == "ready"
    assert len(beside()) == 1 and len(beside(termed)) == 1
    assert writer.remove_stale_files(target) == [] and len(beside()) == 1  # its writer lives: kept
    for sig, p in procs.items():
        p.send_signal(sig)
        p.wait(timeout=60)
    assert not target.exists() and not termed.exists()
    assert beside(termed) == []  # SIGTERM: cleaned on the way out
    assert len(beside()) == 1  # SIGKILL: left for the next write
    store.save(target, _stats_for_file())  # the next write removes what the SIGKILL left
    assert beside() == [] and store.load(target).tensors["w"].shape == (3, 2)
    old = os.umask(0o027)
    try:
        store.save(target, _stats_for_file(), overwrite=True)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o640
    # disk full while writing: named, nothing partial, the existing file kept
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"no space left on device while writing {target}: the file needs 24 bytes"):
        store.save(target, _stats_for_file(), overwrite=True)
    assert target.read_bytes() == before and beside() == []


def test_outputs_never_touch_inputs_reached_through_lora_slices_or_tokenizer_source(zoo, tmp_path, capsys):
    """The inputs come from the opened sources (each knows the paths it reads), not from a list of config keys."""
    sst, rte, base = zoo["sst"], zoo["rte"], zoo["bert_base"]
    inputs = [zoo["root"]]
    cases = {}
    slices = tmp_path / "slices.yml"
    slices.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {sst}\n"
                      f"        layer_range: [0, 1]\n  - sources:\n      - model: {rte}\n"
                      "        layer_range: [1, 2]\n")
    cases["slices"] = (slices, rte / "out", "lies inside the model")
    tok = tmp_path / "tok.yml"
    tok.write_text(f"merge_method: average\nmodels: [{sst}, {rte}]\ntokenizer_source: {zoo['topic']}\n")
    cases["tokenizer_source"] = (tok, zoo["topic"], "is the tokenizer_source")
    try:
        import peft

        from transformers import AutoModel

        lora = peft.get_peft_model(AutoModel.from_pretrained(str(base)),
                                   peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
        adapter = tmp_path / "adapter"
        lora.save_pretrained(str(adapter))
        inputs.append(adapter)
        cfg = tmp_path / "lora.yml"
        cfg.write_text(f"merge_method: average\nmodels: [{base}+{adapter}, {base}]\n")
        cases["lora"] = (cfg, adapter / "merged", "lies inside the model")
    except ImportError:  # peft is optional
        pass
    for name, (cfg, out, what) in cases.items():
        for force in ([], ["--force"]):
            check_failure(capsys, ["merge", cfg, "-o", out, "--no-progress", *force], [what, str(out)],
                          inputs=inputs + [cfg], code=1)
    # the same configs into a separate directory merge
    for name, (cfg, _, _) in cases.items():
        rc, _, err = run_cli(capsys, ["merge", cfg, "-o", tmp_path / f"ok-{name}", "--no-progress"])
        assert rc == 0, (name, err)


# --------------------------------------------------------------------------------------------------
# search: the same refusals before any work
# --------------------------------------------------------------------------------------------------
def test_malformed_inputs_of_search(zoo, tmp_path, capsys):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": f"w{i} w3", "label": i % 2}) + "\n" for i in range(4)))

    def search_yaml(name, model=None, validation=None, extra=""):
        path = tmp_path / name
        path.write_text(f"base_model: {zoo['bert_base']}\nmodels:\n"
                        f"  - {{model: {model or zoo['sst']}, name: sst, parameters: {{validation: {validation or val}}}}}\n"
                        f"  - {{model: {zoo['rte']}, name: rte, parameters: {{validation: {val}}}}}\n"
                        f"parameters: {{n_init: 1, n_iter: 0, fisher_examples: 2}}\n{extra}")
        return path

    inputs = [zoo["root"], val]
    out = tmp_path / "out"
    good = search_yaml("good.yml")
    # outputs (OUT and its trial log) never an input, checked before any work
    for argv, what in (([good, "-o", zoo["sst"], "--force"], "is the model sst"),
                       ([good, "-o", zoo["sst"] / "merged"], "lies inside the model sst"),
                       ([good, "-o", out, "--log", val, "--force"], "is the validation file of sst"),
                       ([good, "-o", out, "--log", good], "is the config file")):
        check_failure(capsys, ["search", *argv, "--no-progress"], [what], inputs=inputs + [good], code=1)
        assert leftovers(out) == [] and not out.exists()
    bad = _bad_models(tmp_path / "bad", zoo)
    cases = {"config_int": (search_yaml("m1.yml", model=bad["config_int"][0]), bad["config_int"][1]),
             "missing_model": (search_yaml("m2.yml", model=bad["missing"][0]), [str(bad["missing"][0])]),
             "missing_validation": (search_yaml("m3.yml", validation=tmp_path / "nope.jsonl"),
                                    [str(tmp_path / "nope.jsonl"), "not found"]),
             "duplicate_key": (search_yaml("m4.yml", extra="base_model: x\n"), ["twice"])}
    for name, (path, stem) in _yaml_cases(tmp_path / "cfgs", zoo).items():
        if name in ("bomb.yml", "recursive.yml", "deep.yml", "python_tag.yml", "binary.yml", "too_big.yml",
                    "huge_key.yml", "missing.yml", "directory"):
            cases[name] = (path, [str(path), stem if name != "huge_key.yml" else "unknown key"])
    for name, (cfg, culprits) in cases.items():
        check_failure(capsys, ["search", cfg, "-o", out, "--no-progress"], culprits,
                      inputs=inputs + [tmp_path / "bad", tmp_path / "cfgs"], out=out)
        assert not (tmp_path / "out.trials.jsonl").exists()


def test_plot_never_writes_over_its_input(tmp_path, capsys):
    log = tmp_path / "trials.jsonl"
    log.write_text("".join(json.dumps({"trial": k, "lambdas": [0.1 * k, 0.2], "metrics": {"a": 0.5}, "objective": 0.5,
                                       "phase": "random", "seconds": {"fisher": 0, "combine": 0, "evaluate": 0}})
                           + "\n" for k in range(3)))
    for force in ([], ["--force"]):
        check_failure(capsys, ["plot", "trajectory", log, "-o", log, *force], ["is the trial log", str(log)],
                      inputs=[log], code=1)
    rc, _, err = run_cli(capsys, ["plot", "trajectory", log, "-o", tmp_path / "t.png"])
    assert rc == 0 and (tmp_path / "t.png").stat().st_size > 0, err
