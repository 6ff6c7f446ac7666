"""pymerge.fisher.estimate against slow references written plainly here: one unpadded example and one
outcome at a time with autograd, squaring each per-example gradient."""
import math

import pytest
import torch

import pymerge.fisher as pf
import fisher_models as fm

LABELS = torch.tensor([0, 2, 1, 1])
LENGTHS = [7, 4, 9, 2]


# ---------------------------------------------------------------- slow reference
def slow_fisher(model, num_examples, log_probs_of, outcomes_of):
    """(1/N) Σ_n Σ_(w, y) w (∇ Σ_f log p_f(y_f | x_n))², one example and one outcome per autograd call.

    log_probs_of(n) -> log-probs [F, C] of example n alone (no padding); outcomes_of(n, p) -> [(w, y [F])]."""
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for n in range(num_examples):
        lp = log_probs_of(n)
        for w, y in outcomes_of(n, lp.detach().exp()):
            score = sum(lp[f, int(y[f])] for f in range(lp.shape[0]))
            grads = torch.autograd.grad(score, list(params.values()), retain_graph=True, allow_unused=True)
            for k, g in zip(params, grads):
                if g is not None:
                    acc[k] += w * g.double() ** 2
    return {k: v / num_examples for k, v in acc.items()}


def exact_outcomes(n, p):
    return [(float(p[0, c]), [c]) for c in range(p.shape[1])]


def empirical_outcomes(labels):
    return lambda n, p: [(1.0, labels[n].reshape(-1).tolist())]


def sampled_outcomes(p_all, k, seed=0, index=0):
    """The draws pymerge makes (its documented seeding: seed * 1_000_003 + batch index), from p [N, F, C]."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    n, f, c = p_all.shape
    draws = torch.multinomial(p_all.reshape(-1, c), k, replacement=True, generator=gen).T.reshape(k, n, f)
    return lambda n_, p: [(1.0 / k, draws[s, n_].tolist()) for s in range(k)]


def assert_fisher_close(got, ref, rtol=1e-4):
    assert set(got.keys()) == set(ref)
    scale = max(v.abs().max().item() for v in ref.values())
    for k, v in ref.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), v, rtol=rtol, atol=1e-7 * scale, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- sequence classification
def _cls_batch():
    ids, mask = fm.padded_ids(LENGTHS, 9)
    return dict(input_ids=ids, attention_mask=mask, labels=LABELS)


def _cls_log_probs(model, batch):
    def log_probs_of(n):
        ids = batch["input_ids"][n:n + 1, :LENGTHS[n]]
        return model(input_ids=ids).logits.log_softmax(-1)
    return log_probs_of


@pytest.mark.parametrize("make", [fm.bert, fm.gpt2_classifier], ids=["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["exact", "empirical", "sampled"])
def test_sequence_classification_matches_slow_reference(make, mode):
    model, batch = make(), _cls_batch()
    # Two batches: the second one's sampled draws use batch index 1.
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    got = pf.estimate(model, halves, mode=mode, num_samples=3)
    lp_of = _cls_log_probs(model, batch)
    if mode == "exact":
        outcomes = exact_outcomes
    elif mode == "empirical":
        outcomes = empirical_outcomes(LABELS)
    else:
        p = torch.stack([lp_of(n).detach().exp() for n in range(4)])  # [N, 1, C]
        first, second = sampled_outcomes(p[:2], 3, index=0), sampled_outcomes(p[2:], 3, index=1)
        outcomes = lambda n, p_: first(n, p_) if n < 2 else second(n - 2, p_)  # noqa: E731
    assert_fisher_close(got, slow_fisher(model, 4, lp_of, outcomes))
    assert got.metadata["mode"] == mode and got.metadata["num_examples"] == "4"
    assert got.metadata["model_kind"] == "sequence_classification"


def test_not_the_square_of_a_batch_summed_gradient():
    # FusionBench / pruning code: square the gradient of the batch's summed log-likelihood. Not a Fisher.
    model, batch = fm.bert(), _cls_batch()
    ours = pf.estimate(model, [batch], mode="empirical")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lp = model(**inputs).logits.log_softmax(-1)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(lp.gather(1, LABELS[:, None]).sum(), list(params.values()))
    peers = {k: (g.double() ** 2) / 4 for k, g in zip(params, grads)}
    w = "classifier.weight"
    assert not torch.allclose(ours[w].double(), peers[w], rtol=0.05)


def test_sampled_approaches_exact():
    model, batch = fm.bert(num_labels=4, dtype=torch.float32), _cls_batch()
    exact = pf.estimate(model, [batch], mode="exact")

    def rel_error(k):
        f = pf.estimate(model, [batch], mode="sampled", num_samples=k, seed=1)
        num = sum(((f[n] - exact[n]) ** 2).sum() for n in exact.keys())
        return math.sqrt(num / sum((exact[n] ** 2).sum() for n in exact.keys()))

    few, many = rel_error(1), rel_error(48)  # Monte Carlo error shrinks like 1/√k (here ~0.5-0.8 -> ~0.07)
    assert many < 0.2 and many < few / 3


# ---------------------------------------------------------------- causal LM tokens
def test_causal_lm_empirical_with_padding_matches_slow_reference():
    model = fm.gpt2_lm()
    ids, mask = fm.padded_ids(LENGTHS, 9)
    got = pf.estimate(model, [dict(input_ids=ids, attention_mask=mask)], mode="empirical")

    def lp_of(n):
        x = ids[n:n + 1, :LENGTHS[n]]
        return model(input_ids=x).logits[0, :-1].log_softmax(-1)

    outcomes = lambda n, p: [(1.0, ids[n, 1:LENGTHS[n]].tolist())]  # noqa: E731
    assert_fisher_close(got, slow_fisher(model, 4, lp_of, outcomes))
    assert got.metadata["model_kind"] == "causal_lm"


def test_causal_lm_sampled_matches_slow_reference():
    model = fm.gpt2_lm()
    ids, _ = fm.padded_ids([6, 6, 6], 6, seed=4)
    got = pf.estimate(model, [dict(input_ids=ids)], mode="sampled", num_samples=2)
    lp_of = lambda n: model(input_ids=ids[n:n + 1]).logits[0, :-1].log_softmax(-1)  # noqa: E731
    p = torch.stack([lp_of(n).detach().exp() for n in range(3)])
    assert_fisher_close(got, slow_fisher(model, 3, lp_of, sampled_outcomes(p, 2)))


def test_causal_lm_exact_is_refused():
    ids, mask = fm.padded_ids(LENGTHS, 9)
    with pytest.raises(ValueError, match="exact"):
        pf.estimate(fm.gpt2_lm(), [dict(input_ids=ids, attention_mask=mask)], mode="exact")


# ---------------------------------------------------------------- multiple choice
def _mc_causal():
    """2 examples x 3 choices: a shared 4-token context, answers of 1-3 tokens, right-padded to 7."""
    gen = torch.Generator().manual_seed(5)
    answer_lengths = [[1, 3, 2], [2, 2, 3]]
    ids = torch.zeros(2, 3, 7, dtype=torch.long)
    am, cm = torch.zeros_like(ids), torch.zeros_like(ids)
    for n in range(2):
        context = torch.randint(1, fm.VOCAB, (4,), generator=gen)
        for c, a in enumerate(answer_lengths[n]):
            ids[n, c, :4] = context
            ids[n, c, 4:4 + a] = torch.randint(1, fm.VOCAB, (a,), generator=gen)
            am[n, c, :4 + a] = 1
            cm[n, c, 4:4 + a] = 1
    return dict(input_ids=ids, attention_mask=am, choice_mask=cm, labels=torch.tensor([2, 0])), answer_lengths


@pytest.mark.parametrize("mode", ["exact", "empirical"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_multiple_choice_causal_lm_matches_slow_reference(mode, length_normalize):
    model = fm.gpt2_lm()
    batch, answer_lengths = _mc_causal()
    got = pf.estimate(model, [batch], mode=mode, length_normalize=length_normalize)

    def lp_of(n):
        scores = []
        for c, a in enumerate(answer_lengths[n]):
            x = batch["input_ids"][n, c, :4 + a][None]
            token_lp = model(input_ids=x).logits[0].log_softmax(-1)
            s = sum(token_lp[t - 1, x[0, t]] for t in range(4, 4 + a))
            scores.append(s / a if length_normalize else s)
        return torch.stack(scores).log_softmax(-1)[None]

    outcomes = exact_outcomes if mode == "exact" else empirical_outcomes(batch["labels"])
    assert_fisher_close(got, slow_fisher(model, 2, lp_of, outcomes))
    assert got.metadata["model_kind"] == "multiple_choice_causal"


def _mc_t5():
    ids, am = fm.padded_ids([5, 3], 6, seed=6)
    gen = torch.Generator().manual_seed(7)
    answer_lengths = [[2, 3], [1, 3]]
    choice = torch.zeros(2, 2, 3, dtype=torch.long)
    cam = torch.zeros_like(choice)
    for n in range(2):
        for c, a in enumerate(answer_lengths[n]):
            choice[n, c, :a] = torch.randint(1, fm.VOCAB, (a,), generator=gen)
            cam[n, c, :a] = 1
    batch = dict(input_ids=ids, attention_mask=am, choice_ids=choice, choice_attention_mask=cam,
                 labels=torch.tensor([1, 0]))
    return batch, answer_lengths


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_multiple_choice_t5_matches_slow_reference(mode):
    model = fm.t5()
    batch, answer_lengths = _mc_t5()
    got = pf.estimate(model, [batch], mode=mode)
    lengths = batch["attention_mask"].sum(1)

    def lp_of(n):
        x = batch["input_ids"][n:n + 1, :lengths[n]]
        scores = []
        for c, a in enumerate(answer_lengths[n]):
            y = batch["choice_ids"][n, c, :a][None]
            logits = model(input_ids=x, labels=y).logits[0].log_softmax(-1)  # plain HF path, encoder per choice
            scores.append(sum(logits[t, y[0, t]] for t in range(a)))
        return torch.stack(scores).log_softmax(-1)[None]

    outcomes = exact_outcomes if mode == "exact" else empirical_outcomes(batch["labels"])
    assert_fisher_close(got, slow_fisher(model, 2, lp_of, outcomes))
    assert got.metadata["model_kind"] == "multiple_choice_seq2seq"


# ---------------------------------------------------------------- any model via log_prob_fn; generic paths
class _Custom(torch.nn.Module):
    """Linear + RMSNorm (no layer rule: per-module VJP) + a raw parameter (no module: per-example autograd)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.inp = torch.nn.Linear(5, 6)
        self.norm = torch.nn.RMSNorm(6, eps=1e-6)
        self.offset = torch.nn.Parameter(torch.randn(6))
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)) + self.offset).mean(1))


def test_log_prob_fn_and_generic_paths_match_slow_reference():
    model = _Custom().double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    fn = lambda m, b: m(b["x"]).log_softmax(-1)  # noqa: E731
    got = pf.estimate(model, [dict(x=x, labels=LABELS)], mode="exact", log_prob_fn=fn)
    lp_of = lambda n: model(x[n:n + 1]).log_softmax(-1)  # noqa: E731
    assert_fisher_close(got, slow_fisher(model, 4, lp_of, exact_outcomes))
    assert got.metadata["model_kind"] == "custom"


def test_log_prob_fn_must_return_log_probabilities():
    model = _Custom()
    with pytest.raises(ValueError, match="not normalised"):
        pf.estimate(model, [dict(x=torch.randn(2, 3, 5))], log_prob_fn=lambda m, b: m(b["x"]))


# ---------------------------------------------------------------- dtypes, frozen state
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_accumulate_in_fp32(dtype):
    batch = _cls_batch()
    ref = pf.estimate(fm.bert(dtype=torch.float32), [batch], mode="exact")
    got = pf.estimate(fm.bert(dtype=dtype), [batch], mode="exact")
    for k in ref.keys():
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k]).all()
    num = sum(((got[k] - ref[k]) ** 2).sum() for k in ref.keys())
    assert math.sqrt(num / sum((ref[k] ** 2).sum() for k in ref.keys())) < 0.1


def test_model_state_is_restored_and_no_grad_is_written():
    model = fm.bert(dtype=torch.float32).train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen: gets no Fisher
    before = {k: p.requires_grad for k, p in model.named_parameters()}
    f = pf.estimate(model, [_cls_batch()], mode="empirical")
    assert "bert.embeddings.word_embeddings.weight" not in f
    assert set(f.keys()) == {k for k, r in before.items() if r}
    assert all(p.grad is None for p in model.parameters())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before
    assert model.training and all(m.training for m in model.modules())


# ---------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors():
    model, batch = fm.bert(dtype=torch.float32), _cls_batch()
    with pytest.raises(ValueError, match="no examples"):
        pf.estimate(model, [], mode="exact")
    with pytest.raises(ValueError, match="labels"):
        pf.estimate(model, [{k: v for k, v in batch.items() if k != "labels"}], mode="empirical")
    with pytest.raises(ValueError, match="attention_mask"):
        pf.estimate(model, [dict(batch, attention_mask=batch["attention_mask"][:, :5])])
    with pytest.raises(ValueError, match="first dimension"):
        pf.estimate(model, [dict(batch, labels=LABELS[:3])])
    with pytest.raises(ValueError, match="mode"):
        pf.estimate(model, [batch], mode="fisherish")
    frozen = fm.bert(dtype=torch.float32).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        pf.estimate(frozen, [batch])


def test_masks_mode_delegates_to_the_mask_fisher(monkeypatch):
    import pymerge.stats.masks as masks

    seen = {}

    def fake(model, batches, **kwargs):
        seen.update(model=model, batches=batches, kwargs=kwargs)
        return "mask fisher"

    monkeypatch.setattr(masks, "estimate_masks", fake)
    model, batches = fm.bert(), [_cls_batch()]
    assert pf.estimate(model, batches, mode="masks", mapping="paper") == "mask fisher"
    assert seen == dict(model=model, batches=batches, kwargs=dict(mapping="paper"))


def test_streamed_rounds_equal_the_batched_backward():
    model, batch = fm.bert(), _cls_batch()
    batched = pf.estimate(model, [batch], mode="sampled", num_samples=3)
    streamed = pf.estimate(model, [batch], mode="sampled", num_samples=3, batched_backward=False)
    for k in batched.keys():
        torch.testing.assert_close(streamed[k], batched[k], rtol=1e-5, atol=1e-12)
