"""Fisher file round trip and the `pymerge fisher` subcommand on a tiny saved BERT with its own tokenizer."""
import pytest
import torch
import transformers

import fisher_models as fm
import pymerge.fisher as pf
from command_fixtures import ROWS, model_dir, python_batches, write_rows  # noqa: F401 (model_dir: a fixture)
from pymerge.fisher import command


def test_save_load_round_trip(tmp_path):
    ids, mask = fm.padded_ids([3, 5], 5)
    fisher = pf.estimate(fm.bert(dtype=torch.float32), [dict(input_ids=ids, attention_mask=mask)], mode="exact")
    path = pf.save(tmp_path / "f.safetensors", fisher)
    back = pf.load(path)
    assert back.metadata == fisher.metadata
    assert set(back.keys()) == set(fisher.keys())
    for k in fisher.keys():
        torch.testing.assert_close(back[k], fisher[k], rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        pf.save(path, fisher)


def test_cli_matches_python_and_refuses_to_clobber(model_dir, tmp_path):
    data, out = write_rows(tmp_path, ROWS), tmp_path / "fisher.safetensors"
    argv = [str(model_dir), "--data", str(data), "-o", str(out), "--mode", "empirical", "--batch-size", "2"]
    assert command.main(argv) == 0
    got = pf.load(out)
    assert got.metadata["mode"] == "empirical" and got.metadata["num_examples"] == "3"
    # The same numbers from Python on the same tokenised batches.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    ref = pf.estimate(model, python_batches(model_dir), mode="empirical")
    for k in ref.keys():
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-9)
    assert got.metadata["structure"] == pf.structure_fingerprint(model)
    mtime = out.stat().st_mtime_ns
    assert command.main(argv) == 2 and out.stat().st_mtime_ns == mtime  # refused, untouched
    assert command.main(argv + ["--force"]) == 0


def test_cli_bad_inputs(model_dir, tmp_path):
    out = tmp_path / "f.safetensors"
    no_labels = write_rows(tmp_path, [{"text": "w1 w2"}])
    with pytest.raises(ValueError, match="label column 'label'"):
        command.main([str(model_dir), "--data", str(no_labels), "-o", str(out), "--mode", "empirical"])
    empty = write_rows(tmp_path, [], name="empty.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        command.main([str(model_dir), "--data", str(empty), "-o", str(out)])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        command.main([str(pickled), "--data", str(no_labels), "-o", str(out)])
    assert not out.exists()


def test_weights_fingerprint_of_a_tensor_over_2_pow_24_elements():
    big = {"embeddings": torch.zeros(30522 * 768)}  # float32 linspace rounded its last index out of range
    assert len(pf.weights_fingerprint(big)) == 16


@pytest.mark.parametrize("mask_mode", ["exact", "empirical"])
def test_cli_mask_fisher_modes_match_python(model_dir, tmp_path, mask_mode):
    pytest.importorskip("pymerge.fisher.masks")
    data, out = write_rows(tmp_path, ROWS), tmp_path / "masks.safetensors"
    argv = [str(model_dir), "--data", str(data), "-o", str(out), "--mode", "masks", "--mask-mode", mask_mode,
            "--batch-size", "3"]
    assert command.main(argv) == 0
    got = pf.load(out)
    assert got.metadata["mode"] == "masks" and got.metadata["mask_mode"] == mask_mode
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    ref = pf.estimate(model, python_batches(model_dir, [ROWS]), mode="masks", mask_mode=mask_mode)
    for k in ref.keys():
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fisher_args,stats_args", [(["--mode", "sampled", "--num-samples", "2", "--seed", "3"],
                                                      ["--kind", "fisher", "--mode", "sampled", "--num-samples", "2",
                                                       "--seed", "3"]),
                                                     (["--mode", "masks", "--mask-mode", "exact"],
                                                      ["--kind", "masks", "--mode", "exact"])])
def test_fisher_command_is_the_diagonal_case_of_stats(model_dir, tmp_path, fisher_args, stats_args):
    """`pymerge fisher` runs `pymerge stats`' code: the same file (tensors and metadata) for the same options."""
    from pymerge.commands import stats

    data = write_rows(tmp_path, ROWS)
    common = [str(model_dir), "--data", str(data), "--batch-size", "2"]
    assert command.main(common + ["-o", str(tmp_path / "f.safetensors")] + fisher_args) == 0
    assert stats.main(common + ["-o", str(tmp_path / "s.safetensors")] + stats_args) == 0
    f, s = pf.load(tmp_path / "f.safetensors"), pf.load(tmp_path / "s.safetensors")
    assert f.metadata == s.metadata and set(f.keys()) == set(s.keys())
    for k in f.keys():
        assert torch.equal(f[k], s[k]), k
