"""pymerge.stats: Gram and K-FAC statistics against slow references written plainly here (one unpadded example
and one outcome at a time; classification, causal-LM tokens, multiple choice for causal LMs and T5), the one file
format with its metadata, older Fisher files, bad input."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fisher_models as fm
import pymerge.fisher as pf
import pymerge.stats as ps

LABELS = torch.tensor([0, 2, 1, 1])
LENGTHS = [7, 4, 9, 2]


def _batches():
    ids, mask = fm.padded_ids(LENGTHS, 9)
    batch = dict(input_ids=ids, attention_mask=mask, labels=LABELS)
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


def _is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# ---------------------------------------------------------------- slow references
def plain_log_probs(model, ids):
    """log p [F, C] of one unpadded example input_ids [1, L]: a classifier's classes (F = 1) or a causal LM's
    next tokens (F = L - 1, position t predicts token t + 1)."""
    lp = model(input_ids=ids).logits.log_softmax(-1)
    return lp[0, :-1] if lp.dim() == 3 else lp


def slow_layer_statistics(model, examples, outcomes_of, forward=plain_log_probs):
    """Per linear layer: A = (1/N) Σ_rows z' z'ᵀ (z' = [z, 1] with a bias) and G = (1/N) Σ_rows Σ_(w, y) w g gᵀ,
    g = ∂ score_y / ∂(layer output row), N = the token rows of every call of the layer; one unpadded example
    and one outcome at a time (no padding, no masks, no batching to get wrong). forward(model, example) -> log p [F, C] of one example (default: input_ids
    [1, L] of a classifier or causal LM); outcomes_of(probs) -> [(w, y)] (score = Σ_f log p_f(y_f))."""
    layers = {n: m for n, m in model.named_modules() if _is_linear(m)}
    seen = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: seen.setdefault(n, []).append((a[0], out)))
               for n, m in layers.items()]
    A = {n: 0 for n in layers}
    G = {n: 0 for n in layers}
    rows = {n: 0 for n in layers}
    try:
        for ids in examples:
            seen.clear()
            lp = forward(model, ids)
            calls = [(n, z, out) for n, cs in seen.items() for z, out in cs]
            for n, z, _ in calls:
                z = z.reshape(-1, z.shape[-1]).double()
                if layers[n].bias is not None:
                    z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
                A[n] = A[n] + z.T @ z  # Σ_rows z' z'ᵀ
                rows[n] += z.shape[0]
            for w, y in outcomes_of(lp.detach().exp()):
                score = sum(lp[f, int(y[f])] for f in range(lp.shape[0]))
                grads = torch.autograd.grad(score, [out for _, _, out in calls], retain_graph=True, allow_unused=True)
                for (n, _, out), g in zip(calls, grads):
                    if g is None:
                        continue
                    g = g.reshape(-1, g.shape[-1]).double()
                    G[n] = G[n] + w * (g.T @ g)  # Σ_rows g gᵀ
    finally:
        for h in handles:
            h.remove()
    return {n: A[n] / rows[n] for n in layers}, {n: G[n] / rows[n] for n in layers}, rows


def _examples(batches):
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            out.append(ids[mask > 0][None])
    return out


def _labels_of(batches):
    return [l for b in batches for l in b["labels"].tolist()]


def _close(got, ref, what):
    scale = ref.abs().max().item() or 1.0
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def _check_layers(stats, model, rows):
    layers = stats.layers
    assert set(layers) == {n for n, m in model.named_modules() if _is_linear(m)}
    for n, info in layers.items():
        module = model.get_submodule(n)
        assert info["weight"] == n + ".weight"
        assert info["bias"] == (n + ".bias" if module.bias is not None else None)
        assert info["transposed"] == (type(module).__name__ == "Conv1D")
        assert info["tokens"] == rows[n]


MODELS = {"bert": fm.bert, "gpt2": fm.gpt2_classifier}


@pytest.mark.parametrize("name", MODELS)
def test_gram_matches_one_row_at_a_time(name):
    model, batches = MODELS[name](), _batches()
    got = ps.collect(model, batches, kind="gram")
    ref, _, rows = slow_layer_statistics(model, _examples(batches), lambda p: [])
    assert got.kind == "gram" and got.metadata["num_examples"] == "4" and got.metadata["mode"] == "forward"
    _check_layers(got, model, rows)
    for n in ref:
        _close(got[n + ".gram"], ref[n], n)
    if name == "gpt2":  # Conv1D: in_features is the first weight dimension
        info = got.layers["transformer.h.0.mlp.c_fc"]
        assert (info["in_features"], info["out_features"], info["transposed"]) == (16, 64, True)
        assert got["transformer.h.0.mlp.c_fc.gram"].shape == (17, 17)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_kfac_matches_one_example_at_a_time(name, mode):
    model, batches = MODELS[name](), _batches()
    got = ps.collect(model, batches, kind="kfac", mode=mode)
    labels = _labels_of(batches)
    it = iter(range(len(labels)))
    if mode == "empirical":
        outcomes = lambda p: [(1.0, [labels[next(it)]])]  # noqa: E731
    else:
        outcomes = lambda p: [(float(p[0, c]), [c]) for c in range(p.shape[1])]  # noqa: E731
    ref_a, ref_g, rows = slow_layer_statistics(model, _examples(batches), outcomes)
    assert got.kind == "kfac" and got.metadata["mode"] == mode
    _check_layers(got, model, rows)
    for n in ref_a:
        _close(got[n + ".kfac_in"], ref_a[n], n + ".kfac_in")
        _close(got[n + ".kfac_out"], ref_g[n], n + ".kfac_out")


def test_kfac_default_mode_is_empirical_and_causal_lm_tokens():
    model = fm.gpt2_lm()
    ids, mask = fm.padded_ids([6, 3, 5], 6, seed=4)
    batches = [dict(input_ids=ids, attention_mask=mask)]
    got = ps.collect(model, batches, kind="kfac")
    assert got.metadata["mode"] == "empirical"
    examples = _examples([dict(batches[0], labels=torch.zeros(3))])
    it = iter(examples)
    ref_a, ref_g, rows = slow_layer_statistics(model, examples, lambda p: [(1.0, next(it)[0, 1:].tolist())])
    for n in ref_a:
        _close(got[n + ".kfac_in"], ref_a[n], n)
        _close(got[n + ".kfac_out"], ref_g[n], n)


# ---------------------------------------------------------------- multiple choice: causal LM and T5 (seq2seq)
# Each example: (context / question token ids, answers as token ids, label); answers of several lengths.
MC_EXAMPLES = [([11, 12, 13], [[21, 22], [23], [24, 25, 26]], 2),
               ([14, 15], [[27], [28, 29], [30, 31]], 0),
               ([16, 17, 18, 19, 20], [[32, 33, 34], [35], [36, 37]], 1),
               ([41], [[42, 43], [44, 45, 46], [47]], 1)]


def _choice_log_probs(scores, lengths, length_normalize):
    scores = torch.stack([s / n for s, n in zip(scores, lengths)] if length_normalize else scores)
    return scores.log_softmax(-1)[None]  # one factor, C outcomes


def mc_causal_log_probs(length_normalize=False):
    """log p(c | context) [1, C] of one example, one unpadded context + answer sequence at a time."""
    def forward(model, example):
        context, answers, _ = example
        scores = []
        for answer in answers:
            seq = context + answer
            lp = model(input_ids=torch.tensor([seq])).logits[0].log_softmax(-1)
            scores.append(sum(lp[t - 1, seq[t]] for t in range(len(context), len(seq))))
        return _choice_log_probs(scores, [len(a) for a in answers], length_normalize)
    return forward


def mc_seq2seq_log_probs(length_normalize=False):
    """log p(c | question) [1, C] of one example: the encoder once on the unpadded question, the decoder once per
    answer (teacher forcing from the start token)."""
    from transformers.modeling_outputs import BaseModelOutput

    def forward(model, example):
        question, answers, _ = example
        encoded = model.get_encoder()(input_ids=torch.tensor([question])).last_hidden_state
        scores = []
        for answer in answers:
            dec = torch.tensor([[model.config.decoder_start_token_id] + answer[:-1]])
            lp = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                       decoder_input_ids=dec).logits[0].log_softmax(-1)
            scores.append(sum(lp[t, a] for t, a in enumerate(answer)))
        return _choice_log_probs(scores, [len(a) for a in answers], length_normalize)
    return forward


def mc_causal_batches():
    """input_ids [N, C, T] (context + answer, right-padded), attention_mask, choice_mask on the answer tokens."""
    out = []
    for chunk in (MC_EXAMPLES[:2], MC_EXAMPLES[2:]):
        width = max(len(ctx) + len(a) for ctx, answers, _ in chunk for a in answers) + 1  # one pad column at least
        ids = torch.full((len(chunk), 3, width), fm.PAD)
        mask, choice = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (ctx, answers, _) in enumerate(chunk):
            for c, a in enumerate(answers):
                ids[i, c, :len(ctx) + len(a)] = torch.tensor(ctx + a)
                mask[i, c, :len(ctx) + len(a)] = 1
                choice[i, c, len(ctx):len(ctx) + len(a)] = 1
        out.append(dict(input_ids=ids, attention_mask=mask, choice_mask=choice,
                        labels=torch.tensor([label for _, _, label in chunk])))
    return out


def mc_seq2seq_batches():
    """input_ids [N, T] (question, right-padded), choice_ids [N, C, L]: padded with -100 in the first batch, with
    pad_token_id and a choice_attention_mask in the second (T != L: the masks tell encoder and decoder rows apart)."""
    out = []
    for b, chunk in enumerate((MC_EXAMPLES[:2], MC_EXAMPLES[2:])):
        t = max(len(q) for q, _, _ in chunk) + 1
        length = max(len(a) for _, answers, _ in chunk for a in answers)
        assert t != length
        ids, am = torch.full((len(chunk), t), fm.PAD), torch.zeros(len(chunk), t, dtype=torch.long)
        choices = torch.full((len(chunk), 3, length), -100 if b == 0 else fm.PAD)
        cam = torch.zeros_like(choices)
        for i, (q, answers, _) in enumerate(chunk):
            ids[i, :len(q)], am[i, :len(q)] = torch.tensor(q), 1
            for c, a in enumerate(answers):
                choices[i, c, :len(a)], cam[i, c, :len(a)] = torch.tensor(a), 1
        batch = dict(input_ids=ids, attention_mask=am, choice_ids=choices,
                     labels=torch.tensor([label for _, _, label in chunk]))
        if b == 1:
            batch["choice_attention_mask"] = cam
        out.append(batch)
    return out


MULTIPLE_CHOICE = {"causal": (fm.gpt2_lm, mc_causal_batches, mc_causal_log_probs),
                   "seq2seq": (fm.t5, mc_seq2seq_batches, mc_seq2seq_log_probs)}


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_gram_of_multiple_choice_matches_one_example_at_a_time(name):
    make_model, make_batches, log_probs = MULTIPLE_CHOICE[name]
    model = make_model()
    got = ps.collect(model, make_batches(), kind="gram")
    ref, _, rows = slow_layer_statistics(model, MC_EXAMPLES, lambda p: [], forward=log_probs())
    assert got.metadata["num_examples"] == str(len(MC_EXAMPLES))
    _check_layers(got, model, rows)
    for n in ref:
        _close(got[n + ".gram"], ref[n], n)
    if name == "seq2seq":  # the encoder runs once per example; cross-attention reads its rows once per answer
        enc_rows = sum(len(q) for q, _, _ in MC_EXAMPLES)
        assert rows["encoder.block.0.layer.0.SelfAttention.q"] == enc_rows
        assert rows["decoder.block.0.layer.1.EncDecAttention.k"] == 3 * enc_rows
        assert rows["decoder.block.0.layer.1.EncDecAttention.q"] == sum(len(a) for _, ans, _ in MC_EXAMPLES
                                                                      for a in ans)


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
@pytest.mark.parametrize("mode,length_normalize", [("empirical", False), ("exact", False), ("empirical", True)])
def test_kfac_of_multiple_choice_matches_one_example_at_a_time(name, mode, length_normalize):
    make_model, make_batches, log_probs = MULTIPLE_CHOICE[name]
    model = make_model()
    got = ps.collect(model, make_batches(), kind="kfac", mode=mode, length_normalize=length_normalize)
    labels = iter([label for _, _, label in MC_EXAMPLES])
    if mode == "empirical":
        outcomes = lambda p: [(1.0, [next(labels)])]  # noqa: E731
    else:
        outcomes = lambda p: [(float(p[0, c]), [c]) for c in range(p.shape[1])]  # noqa: E731
    ref_a, ref_g, rows = slow_layer_statistics(model, MC_EXAMPLES, outcomes, forward=log_probs(length_normalize))
    assert got.metadata["mode"] == mode and got.metadata["length_normalize"] == str(length_normalize)
    _check_layers(got, model, rows)
    for n in ref_a:
        _close(got[n + ".kfac_in"], ref_a[n], n + ".kfac_in")
        _close(got[n + ".kfac_out"], ref_g[n], n + ".kfac_out")
    assert any(float(ref_g[n].abs().max()) > 0 for n in ref_g)  # the gradients reached the layers


def test_low_precision_model_accumulates_in_fp32():
    model, batches = fm.bert(dtype=torch.float64), _batches()
    ref = ps.collect(model, batches, kind="gram")
    low = ps.collect(fm.bert(dtype=torch.bfloat16), batches, kind="gram")
    for k in ref.keys():
        assert low[k].dtype == torch.float32
        torch.testing.assert_close(low[k], ref[k], rtol=0.05, atol=0.05 * ref[k].abs().max().item())


def test_exclude_and_memory_refusal():
    model, batches = fm.bert(), _batches()
    got = ps.collect(model, batches, kind="gram", exclude=["*.attention.*", "classifier"])
    assert not any(".attention." in n or n == "classifier" for n in got.layers)
    assert "bert.pooler.dense" in got.layers
    with pytest.raises(MemoryError, match=r"kfac statistics of \d+ linear layers need .* largest layers: .*x") as e:
        ps.collect(model, batches, kind="kfac", max_memory_bytes=10_000)
    assert "exclude" in str(e.value)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ps.collect(model, batches, kind="gram", exclude=["*"])


# ---------------------------------------------------------------- the store
@pytest.mark.parametrize("kind", ["gram", "kfac", "fisher"])
def test_round_trip_with_metadata(tmp_path, kind):
    model, batches = fm.bert(dtype=torch.float32), _batches()
    stats = ps.collect(model, batches, kind=kind)
    meta = stats.metadata
    for key in ("pymerge_stats", "kind", "mode", "num_examples", "structure", "weights"):
        assert key in meta, key
    assert meta["kind"] == kind and meta["structure"] == ps.structure_fingerprint(model)
    assert meta["weights"] == ps.weights_fingerprint(model)
    path = ps.save(tmp_path / f"{kind}.safetensors", stats)
    back = ps.load(path)
    assert back.kind == kind and back.metadata == meta
    assert set(back.keys()) == set(stats.keys())
    for k in stats.keys():
        assert torch.equal(back[k], stats[k])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ps.save(path, stats)
    ps.save(path, stats, overwrite=True)
    if kind == "fisher":  # the Fisher API reads it unchanged
        assert set(pf.load(path).keys()) == set(stats.keys())


@pytest.mark.parametrize("mode,kind", [("exact", "fisher"), ("masks", "masks")])
def test_older_fisher_files_still_load(tmp_path, mode, kind):
    meta = {"pymerge_fisher": "1", "mode": mode, "num_examples": "3", "structure": "abc", "weights": "def"}
    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(path), metadata=meta)
    for load in (ps.load, pf.load):
        got = load(path)
        assert got.kind == kind and got.metadata == meta and torch.equal(got["w"], torch.ones(2, 3))


def test_bad_input(tmp_path):
    model, batches = fm.bert(), _batches()
    with pytest.raises(ValueError, match=r"unknown statistics kind 'hessian'.*'fisher', 'masks', 'gram', 'kfac'"):
        ps.collect(model, batches, kind="hessian")
    with pytest.raises(ValueError, match=r"mode: gram statistics take one of \('forward',\)"):
        ps.collect(model, batches, kind="gram", mode="exact")
    with pytest.raises(ValueError, match="mode: kfac statistics take one of"):
        ps.collect(model, batches, kind="kfac", mode="masks")
    with pytest.raises(ValueError, match="needs 'labels'"):
        ps.collect(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches], kind="kfac")
    with pytest.raises(ValueError, match="no examples"):
        ps.collect(model, [], kind="gram")
    gram = ps.collect(model, batches, kind="gram")
    path = ps.save(tmp_path / "g.safetensors", gram)
    with pytest.raises(ValueError, match=r"holds 'gram' statistics, expected 'kfac'"):
        ps.load(path, kind="kfac")
    # wrong kind in the metadata, a tensor of the wrong shape, a missing layer tensor: named
    bad = {"w": torch.ones(2)}
    save_file(bad, str(tmp_path / "k.safetensors"), metadata=dict(gram.metadata, kind="hessian"))
    with pytest.raises(ValueError, match=r"k.safetensors: unknown statistics kind 'hessian'"):
        ps.load(tmp_path / "k.safetensors")
    tensors = dict(gram.tensors)
    tensors["classifier.gram"] = torch.zeros(16, 16)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=gram.metadata)
    with pytest.raises(ValueError, match=r"'classifier.gram' has shape \(16, 16\), expected \(17, 17\)"):
        ps.load(tmp_path / "s.safetensors")
    del tensors["classifier.gram"]
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=gram.metadata)
    with pytest.raises(ValueError, match="layer 'classifier' has no tensor 'classifier.gram'"):
        ps.load(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no pymerge statistics metadata"):
        ps.load(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="float32"):
        ps.save(tmp_path / "d.safetensors", ps.Statistics({"w": torch.ones(2, dtype=torch.float64)}, gram.metadata))


def test_registry_lists_each_kind_once():
    assert ps.kinds() == ("fisher", "masks", "gram", "kfac")
    assert ps.get("kfac").modes == ps.get("fisher").modes == ("exact", "sampled", "empirical")
    assert ps.get("kfac").default_mode == "empirical"


def _bad_layer_files(gram):
    """(what is wrong, metadata, tensors, the message both readers must give) for a small gram file."""
    import json

    layers = json.loads(gram.metadata["layers"])
    t = dict(gram.tensors)
    info = layers["classifier"]
    yield "no layers", {k: v for k, v in gram.metadata.items() if k != "layers"}, t, \
        r"gram statistics need a `layers` metadata entry"
    yield "not JSON", dict(gram.metadata, layers="{oops"), t, r"`layers` metadata is not valid JSON"
    yield "not an object", dict(gram.metadata, layers="[1, 2]"), t, \
        r"`layers` metadata must be a JSON object of module name -> layer, got list"
    for field, value in (("in_features", "many"), ("transposed", "yes"), ("weight", None)):
        entry = {k: v for k, v in info.items() if k != field} if value is None else dict(info, **{field: value})
        yield f"bad {field}", dict(gram.metadata, layers=json.dumps(dict(layers, classifier=entry))), t, \
            r"layer 'classifier': `layers` entry needs weight, bias, transposed, in_features, out_features, tokens"
    yield "wrong shape", gram.metadata, dict(t, **{"classifier.gram": torch.zeros(16, 16)}), \
        r"layer 'classifier': tensor 'classifier.gram' has shape \(16, 16\), expected \(17, 17\) for a layer with " \
        r"16 inputs \+ 1 for the bias and 3 outputs"
    yield "missing tensor", gram.metadata, {k: v for k, v in t.items() if k != "classifier.gram"}, \
        r"layer 'classifier' has no tensor 'classifier.gram'"
    yield "extra tensor", gram.metadata, dict(t, **{"pooler.dense.weight": torch.zeros(2)}), \
        r"tensors \['pooler.dense.weight'\] belong to no layer of the `layers` metadata \(expected only <module>.gram\)"


def test_layers_metadata_one_parser_for_files_and_merges(tmp_path):
    """The store (ps.load) and the merge side (LayerStatistics) read `layers` with one parser: the same error,
    naming the file and the layer, for every kind of bad entry."""
    from pymerge.io.errors import CheckpointError
    from pymerge.methods.layers import LayerStatistics

    gram = ps.collect(fm.bert(), _batches(), kind="gram")
    for i, (what, meta, tensors, message) in enumerate(_bad_layer_files(gram)):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match=rf"bad{i}.safetensors: {message}"):
            ps.load(path)
        with pytest.raises(CheckpointError, match=rf"stats of m0 \(.*bad{i}.safetensors\): {message}"):
            LayerStatistics(path, "stats of m0")
    good = LayerStatistics(ps.save(tmp_path / "good.safetensors", gram), "stats of m0")
    info = good.layers["classifier"]
    assert (info.weight, info.bias, info.transposed, info.d_aug, info.tokens) == \
        ("classifier.weight", "classifier.bias", False, 17, float(len(LENGTHS)))  # pooled: a row per example
    assert set(good.layers) == set(gram.layers)
