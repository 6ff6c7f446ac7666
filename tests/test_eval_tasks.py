"""pymerge.eval: batched scoring equals one-example / one-choice-at-a-time references; metrics; bad tasks."""
import pytest
import torch

from pymerge.eval import metrics
from pymerge.eval.tasks import Task, TaskError, evaluate, fisher_batches, predict
from tests import fisher_models as fm
from tests.eval_fixtures import choice_examples, classification_examples


pytestmark = pytest.mark.usefixtures("one_thread")


def _slow_choice_scores(model, ex, length_normalize):
    """One example, one choice at a time, no padding: the answer's (mean) token log-likelihood."""
    scores = []
    for answer in ex["choices"]:
        ctx = torch.tensor([ex["input_ids"]])
        ans = torch.tensor([answer])
        if model.config.is_encoder_decoder:
            logits = model(input_ids=ctx, labels=ans).logits[0]
            lp = logits.log_softmax(-1).gather(-1, ans[0][:, None])[:, 0]
        else:
            full = torch.cat([ctx, ans], 1)
            logits = model(input_ids=full).logits[0, :-1]
            lp = logits.log_softmax(-1).gather(-1, full[0, 1:, None])[:, 0][-ans.shape[1]:]
        scores.append(lp.mean() if length_normalize else lp.sum())
    return torch.stack(scores).log_softmax(-1)


@pytest.mark.parametrize("builder", [fm.gpt2_lm, fm.t5])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_multiple_choice_scorer_equals_one_choice_at_a_time(builder, length_normalize):
    from pymerge.eval import scoring

    model = builder()
    examples = choice_examples(7, 3, seed=4)
    task = Task("mc", examples, kind="multiple_choice", length_normalize=length_normalize, batch_size=3)
    fast = torch.cat([scoring.choice_log_probs(model, {k: v for k, v in b.items() if k != "labels"},
                                               length_normalize) for b in task.batches(model)])
    slow = torch.stack([_slow_choice_scores(model, ex, length_normalize) for ex in examples])
    torch.testing.assert_close(fast, slow.float(), rtol=1e-5, atol=1e-6)  # the objectives score in fp32
    preds, labels = predict(model, task)
    assert preds == slow.argmax(-1).tolist()
    assert labels == [ex["label"] for ex in examples]
    assert evaluate(model, task) == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))


def test_classification_evaluate_equals_one_at_a_time():
    model = fm.bert(num_labels=3)
    examples = classification_examples(11, 3, seed=1)
    task = Task("cls", examples, test=examples[:5], metric="macro_f1", batch_size=4)
    slow = [int(model(input_ids=torch.tensor([ex["input_ids"]])).logits.argmax()) for ex in examples]
    preds, labels = predict(model, task)
    assert preds == slow
    assert evaluate(model, task) == pytest.approx(metrics.macro_f1(slow, labels))
    assert evaluate(model, task, "test") == pytest.approx(metrics.macro_f1(slow[:5], labels[:5]))


def test_metrics_against_hand_counts():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    # class 0: tp1 fp0 fn0 -> 1; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    assert metrics.macro_f1([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics.get_metric(lambda p, y: 0.5)([0], [0]) == 0.5
    with pytest.raises(ValueError, match="metric"):
        metrics.get_metric("f2")


def test_fisher_batches_are_unlabelled_and_feed_the_exact_fisher():
    from pymerge.fisher import estimate

    model = fm.gpt2_lm()
    task = Task("mc", choice_examples(9, 2, seed=2), kind="multiple_choice", batch_size=4)
    batches = fisher_batches(model, task, n=5)
    assert sum(b["input_ids"].shape[0] for b in batches) == 5 and all("labels" not in b for b in batches)
    fisher = estimate(model, batches, mode="exact", length_normalize=True)
    assert fisher.metadata["num_examples"] == "5" and fisher.metadata["model_kind"] == "multiple_choice_causal"


def test_bad_tasks_get_clear_errors():
    ok = classification_examples(3, 2, seed=0)
    with pytest.raises(TaskError, match="validation set is empty"):
        Task("t", [])
    with pytest.raises(TaskError, match="test set is empty"):
        Task("t", ok, test=[])
    with pytest.raises(TaskError, match="label 5 out of range"):
        Task("t", ok + [{"input_ids": [1, 2], "label": 5}], num_labels=2)
    with pytest.raises(TaskError, match="label must be an integer"):
        Task("t", [{"input_ids": [1], "label": 0.5}])
    with pytest.raises(TaskError, match="no tokenizer"):
        Task("t", [("some text", 0)])
    with pytest.raises(TaskError, match="at least 2 choices"):
        Task("t", [{"input_ids": [1], "label": 0, "choices": [[3]]}], kind="multiple_choice")
    with pytest.raises(TaskError, match="kind must be"):
        Task("t", ok, kind="regression")
    with pytest.raises(ValueError, match="metric"):
        Task("t", ok, metric="bleu")
    # against a model: a head with too few outputs, a model without a head, choices without an LM head
    with pytest.raises(TaskError, match="label 2 out of range for a head with 2 outputs"):
        Task("t", classification_examples(8, 3, seed=0)).check_model(fm.bert(num_labels=2))
    with pytest.raises(TaskError, match="num_labels=3"):
        Task("t", ok, num_labels=3).check_model(fm.bert(num_labels=2))
    with pytest.raises(TaskError, match="language model"):
        Task("t", ok).check_model(fm.gpt2_lm())
    with pytest.raises(TaskError, match="language-model head"):
        Task("t", choice_examples(2, 2, seed=0), kind="multiple_choice").check_model(fm.bert())
    Task("t", classification_examples(8, 3, seed=0)).check_model(fm.bert(num_labels=3))  # fits: no error
