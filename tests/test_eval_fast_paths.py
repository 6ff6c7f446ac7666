"""The fast paths of the DF-Merge loop give the slow paths' results: length-sorted cached evaluation batches give
the unsorted path's (and one-at-a-time) predictions; the exact Fisher's C - 1 compact rounds give the C-round
Fisher; `estimate(out=)` equals a fresh estimate bit for bit; the objective reuses its Fisher buffers."""
import pytest
import torch

from pymerge.eval import metrics
from pymerge.eval.tasks import Task, evaluate, fisher_batches, predict
from pymerge.fisher import estimate
from pymerge.stats import logprobs
from tests import fisher_models as fm
from tests.eval_fixtures import choice_examples, classification_examples


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ sorted evaluation batches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_sorted_classification_predictions_equal_the_unsorted_path(dtype, batch_size):
    model = fm.bert(num_labels=3, dtype=dtype)
    examples = classification_examples(23, 3, seed=5, length=(2, 12))
    task = Task("cls", examples, num_labels=3, metric="macro_f1", batch_size=batch_size)
    fast, labels = predict(model, task)
    plain, labels_plain = predict(model, task, sort_by_length=False)
    slow = [int(model(input_ids=torch.tensor([ex["input_ids"]])).logits.argmax()) for ex in examples]
    assert fast == plain == slow
    assert labels == labels_plain == [ex["label"] for ex in examples]
    batches, order = task.sorted_batches(model, "validation")
    assert sorted(order) == list(range(len(examples)))  # a permutation: every example scored once
    lengths = [len(examples[k]["input_ids"]) for k in order]
    assert lengths == sorted(lengths)
    if 1 < batch_size < len(examples):  # sorting really saves padding on these mixed lengths
        assert sum(b["input_ids"].numel() for b in batches) < sum(
            b["input_ids"].numel() for b in task.batches(model, "validation"))
    assert task.sorted_batches(model, "validation")[0] is batches  # collated once
    assert evaluate(model, task) == pytest.approx(metrics.macro_f1(plain, labels_plain))


def test_sorted_logits_equal_the_unsorted_logits_row_by_row():
    """Regrouping examples does not change any example's scores (padding is masked), to fp32 rounding."""
    from pymerge.eval import scoring

    model = fm.bert(num_labels=4, dtype=torch.float32)
    examples = classification_examples(17, 4, seed=9, length=(1, 14))
    task = Task("cls", examples, batch_size=5)
    plain = torch.cat([scoring.class_logits(model, b) for b in task.batches(model, labels=False)])
    batches, order = task.sorted_batches(model, "validation")
    fast = torch.cat([scoring.class_logits(model, b) for b in batches])
    torch.testing.assert_close(fast, plain[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("builder", [fm.gpt2_lm, fm.t5])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_sorted_multiple_choice_predictions_equal_the_unsorted_path(builder, length_normalize):
    model = builder()
    examples = choice_examples(13, 3, seed=6)
    task = Task("mc", examples, test=examples[:6], kind="multiple_choice", length_normalize=length_normalize,
                batch_size=4, max_length=8)
    for split in ("validation", "test"):
        fast, labels = predict(model, task, split)
        plain, labels_plain = predict(model, task, split, sort_by_length=False)
        assert fast == plain and labels == labels_plain


# ------------------------------------------------------------------------------ compact exact rounds
@pytest.mark.parametrize("c", [1, 2, 3, 7])
def test_compact_rounds_factor_the_one_hot_covariance(c):
    g = torch.Generator().manual_seed(c)
    p = (torch.randn(11, c, generator=g, dtype=torch.float64) * 4).softmax(-1)
    p[0] = 0.0
    p[0, 0] = 1.0  # one-hot: all rounds zero
    if c > 2:
        p[1] = torch.tensor([0.5, 0.5] + [0.0] * (c - 2), dtype=torch.float64)  # zero tail: no 0/0
    a = logprobs.compact_exact_rounds(p)
    assert a.shape == (11, max(c - 1, 1), c) and torch.isfinite(a).all()
    cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(a.transpose(1, 2) @ a, cov, rtol=0, atol=1e-15)
    torch.testing.assert_close(a.sum(-1), torch.zeros(a.shape[:2], dtype=torch.float64), rtol=0, atol=1e-15)


def _full_rounds(monkeypatch):
    real = logprobs.cotangents
    monkeypatch.setattr(logprobs, "cotangents", lambda *a, compact=False, **k: real(*a, **k))


@pytest.mark.parametrize("case", ["bert", "gpt2_classifier", "gpt2_choices", "t5_choices"])
def test_compact_exact_fisher_equals_the_c_round_fisher(case, monkeypatch):
    if case in ("bert", "gpt2_classifier"):
        model = fm.bert(num_labels=4) if case == "bert" else fm.gpt2_classifier(num_labels=4)
        task = Task("cls", classification_examples(9, 4, seed=3, length=(2, 8)), batch_size=4)
    else:
        model = fm.gpt2_lm() if case == "gpt2_choices" else fm.t5()
        task = Task("mc", choice_examples(7, 3, seed=2), kind="multiple_choice", batch_size=3)
    batches = fisher_batches(model, task, n=7)
    fast = estimate(model, batches, mode="exact", length_normalize=True)
    with monkeypatch.context() as m:
        _full_rounds(m)
        full = estimate(model, batches, mode="exact", length_normalize=True)
    assert set(fast.tensors) == set(full.tensors)
    scale = max(float(v.abs().max()) for v in full.tensors.values())
    for k, v in full.tensors.items():  # the Fisher accumulates in fp32 (and scores in fp32): fp32 rounding
        torch.testing.assert_close(fast.tensors[k], v, rtol=1e-5, atol=1e-7 * scale)


def test_compact_rounds_are_fewer_backwards(monkeypatch):
    """Binary classification: one backward per batch instead of two (what makes the exact Fisher faster)."""
    model = fm.bert(num_labels=2)
    batches = fisher_batches(model, Task("cls", classification_examples(6, 2, seed=1), batch_size=3), n=6)
    calls = {"n": 0}
    real = torch.autograd.grad

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    estimate(model, batches, mode="exact", batched_backward=False)
    compact = calls["n"]
    calls["n"] = 0
    _full_rounds(monkeypatch)
    estimate(model, batches, mode="exact", batched_backward=False)
    assert compact == 2 and calls["n"] == 4


# ------------------------------------------------------------------------------ estimate(out=)
def test_estimate_into_out_equals_a_fresh_estimate_bit_for_bit():
    model = fm.bert(num_labels=3, dtype=torch.float32)
    task = Task("cls", classification_examples(8, 3, seed=4), batch_size=3)
    batches = fisher_batches(model, task, n=8)
    fresh = estimate(model, batches, mode="exact")
    out = {k: torch.full_like(v, 7.0) for k, v in fresh.tensors.items()}  # stale values must not leak in
    got = estimate(model, batches, mode="exact", out=out)
    for k, v in fresh.tensors.items():
        assert got.tensors[k] is out[k] and torch.equal(got.tensors[k], v), k
    assert got.metadata == fresh.metadata
    name = next(iter(out))
    with pytest.raises(ValueError, match=f"out\\['{name}'\\]: expected float32"):
        estimate(model, batches, out={**out, name: out[name].double()})
    with pytest.raises(ValueError, match="no tensor for trainable parameter"):
        estimate(model, batches, out={k: v for k, v in out.items() if k != name})


def test_objective_reuses_its_fisher_buffers_and_equals_fresh_estimates():
    from pymerge.search.objective import DFMergeObjective
    from tests.search_models import bert_zoo

    base, fts, tasks = bert_zoo()
    obj = DFMergeObjective(base, fts, tasks, fisher_examples=3, device="cpu")
    obj([0.3, 0.8])
    first = [f.tensors for f in obj.fisher_objects]
    ptrs = [{k: t.data_ptr() for k, t in f.items()} for f in first]
    scores, _, _ = obj([0.6, 0.4])
    for i, f in enumerate(obj.fisher_objects):
        assert {k: t.data_ptr() for k, t in f.tensors.items()} == ptrs[i]
    for i, lam in enumerate([0.6, 0.4]):  # a fresh estimate at the same point, without buffers
        obj._set_point(i, lam)
        obj.use_head(i)
        ref = estimate(obj.model, fisher_batches(obj.model, tasks[i], 3), mode="exact",
                       length_normalize=tasks[i].length_normalize, **obj.fisher_options)
        for k, v in ref.tensors.items():
            assert torch.equal(obj.fisher_objects[i].tensors[k], v), k
    obj.combine([0.6, 0.4], [[f.tensors[n] for n in obj.body_names] for f in obj.fisher_objects])
    assert obj.score() == scores


def test_public_fisher_at_returns_fresh_tensors_a_caller_can_keep():
    """The landscape grid keeps Fishers at several λ and combines them later: fisher_at() must not hand out the
    buffers that evaluations overwrite (only evaluate_fixed, which combines at once, reuses them)."""
    from pymerge.search.objective import DFMergeObjective
    from tests.search_models import bert_zoo

    base, fts, tasks = bert_zoo()
    obj = DFMergeObjective(base, fts, tasks, fisher_examples=3, device="cpu")
    kept = [obj.fisher_at(1, lam) for lam in (0.2, 1.0)]
    snapshot = [[t.clone() for t in f] for f in kept]
    obj([0.5, 0.5])
    obj([0.9, 0.1])
    buffers = {t.data_ptr() for f in obj.fisher_objects for t in f.tensors.values()}
    for f, snap in zip(kept, snapshot):
        assert not buffers & {t.data_ptr() for t in f}
        assert all(torch.equal(a, b) for a, b in zip(f, snap))
    assert any(not torch.equal(a, b) for a, b in zip(*kept))  # two points, two Fishers
