"""Fisher file round trip and the `pymerge fisher` subcommand on a tiny saved BERT with its own tokenizer."""
import json

import pytest
import torch
import transformers

import fisher_models as fm
import pymerge.fisher as pf
from pymerge.fisher import command

WORDS = [f"w{i}" for i in range(fm.VOCAB - 5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    model = fm.bert(num_labels=2, dtype=torch.float32)
    model.config.label2id, model.config.id2label = {"neg": 0, "pos": 1}, {0: "neg", 1: "pos"}
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path


def _data(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"text": "w1 w2 w3", "label": "pos"}, {"text": "w4 w5", "label": "neg"},
        {"text": "w7 w8 w9 w10 w11", "label": 1}]


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
    data, out = _data(tmp_path, ROWS), tmp_path / "fisher.safetensors"
    argv = [str(model_dir), "--data", str(data), "-o", str(out), "--mode", "empirical", "--batch-size", "2"]
    assert command.main(argv) == 0
    got = pf.load(out)
    assert got.metadata["mode"] == "empirical" and got.metadata["num_examples"] == "3"
    # The same numbers from Python on the same tokenised batches.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = []
    for rows in (ROWS[:2], ROWS[2:]):
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        batches.append(dict(enc, labels=torch.tensor([1 if r["label"] in ("pos", 1) else 0 for r in rows])))
    ref = pf.estimate(model, batches, mode="empirical")
    for k in ref.keys():
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-9)
    assert got.metadata["structure"] == pf.structure_fingerprint(model)
    mtime = out.stat().st_mtime_ns
    assert command.main(argv) == 2 and out.stat().st_mtime_ns == mtime  # refused, untouched
    assert command.main(argv + ["--force"]) == 0


def test_cli_bad_inputs(model_dir, tmp_path):
    out = tmp_path / "f.safetensors"
    no_labels = _data(tmp_path, [{"text": "w1 w2"}])
    with pytest.raises(ValueError, match="label column 'label'"):
        command.main([str(model_dir), "--data", str(no_labels), "-o", str(out), "--mode", "empirical"])
    empty = _data(tmp_path, [], name="empty.jsonl")
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
    data, out = _data(tmp_path, ROWS), tmp_path / "masks.safetensors"
    argv = [str(model_dir), "--data", str(data), "-o", str(out), "--mode", "masks", "--mask-mode", mask_mode,
            "--batch-size", "3"]
    assert command.main(argv) == 0
    got = pf.load(out)
    assert got.metadata["mode"] == "masks" and got.metadata["mask_mode"] == mask_mode
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok([r["text"] for r in ROWS], padding=True, return_tensors="pt")
    batch = dict(enc, labels=torch.tensor([1 if r["label"] in ("pos", 1) else 0 for r in ROWS]))
    ref = pf.estimate(model, [batch], mode="masks", mask_mode=mask_mode)
    for k in ref.keys():
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-9)
