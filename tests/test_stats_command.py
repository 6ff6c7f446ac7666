"""`pymerge stats` on a tiny saved BERT with its own tokenizer: every kind matches Python on the same batches,
wrong kinds / modes / flags are refused before any work, outputs are never clobbered silently."""
import pytest
import torch
import transformers

import pymerge.stats as ps
from command_fixtures import ROWS, model_dir, python_batches, write_rows  # noqa: F401 (model_dir: a fixture)
from pymerge.cli import main as cli_main
from pymerge.commands import stats as command


@pytest.fixture()
def data(tmp_path):
    return write_rows(tmp_path, ROWS)


@pytest.mark.parametrize("kind,mode", [("gram", None), ("kfac", None), ("kfac", "exact"), ("fisher", "empirical")])
def test_each_kind_matches_python(model_dir, data, tmp_path, kind, mode):
    out = tmp_path / f"{kind}.safetensors"
    argv = ["stats", str(model_dir), "--data", str(data), "--kind", kind, "-o", str(out), "--batch-size", "2"]
    assert cli_main(argv + (["--mode", mode] if mode else [])) == 0
    got = ps.load(out, kind=kind)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    ref = ps.collect(model, python_batches(model_dir), kind=kind, mode=mode)
    assert got.metadata["mode"] == ref.metadata["mode"] and got.metadata["num_examples"] == "3"
    assert got.metadata["structure"] == ps.structure_fingerprint(model)
    assert set(got.keys()) == set(ref.keys())
    for k in ref.keys():
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
    mtime = out.stat().st_mtime_ns
    assert cli_main(argv) == 2 and out.stat().st_mtime_ns == mtime  # refused, untouched
    assert cli_main(argv + ["--force"]) == 0


def test_exclude(model_dir, data, tmp_path):
    out = tmp_path / "g.safetensors"
    assert command.main([str(model_dir), "--data", str(data), "--kind", "gram", "-o", str(out),
                         "--exclude", "bert.encoder.*", "--exclude", "classifier"]) == 0
    assert set(ps.load(out).layers) == {"bert.pooler.dense"}


def test_bad_input_is_one_clear_line(model_dir, data, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    base = ["stats", str(model_dir), "--data", str(data), "-o", str(out)]
    cases = [(["--kind", "hessian"], "unknown statistics kind 'hessian'"),
             (["--kind", "gram", "--mode", "exact"], "--mode: gram statistics take one of ('forward',)"),
             (["--kind", "fisher", "--exclude", "x"], "--exclude: only for --kind gram or kfac"),
             (["--kind", "kfac", "--label-column", "y"], "no label column 'y' (needed by --kind kfac --mode empirical)")]
    for extra, message in cases:
        assert cli_main(base + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not out.exists()
