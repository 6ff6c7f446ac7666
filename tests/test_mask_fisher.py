"""Mask Fisher (pymerge.fisher.masks) against a slow, plainly written reference on tiny random HF models."""
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from pymerge.fisher import store  # noqa: E402
from pymerge.fisher.masks import MaskFisher, MaskMapping, estimate_masks, mask_fisher_to_parameters  # noqa: E402
from pymerge.fisher.masks_structure import find_mask_structure  # noqa: E402

H, DH, D, LAYERS, C, VOCAB = 4, 8, 37, 2, 3, 40


def make_model(kind, seed=0):
    torch.manual_seed(seed)
    common = dict(num_labels=C, pad_token_id=0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=H * DH, num_hidden_layers=LAYERS,
                                      num_attention_heads=H, intermediate_size=D, initializer_range=0.2, **common)
        model = transformers.BertForSequenceClassification(cfg)
    elif kind == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=H * DH, num_hidden_layers=LAYERS,
                                         num_attention_heads=H, intermediate_size=D, initializer_range=0.2,
                                         max_position_embeddings=40, **{**common, "pad_token_id": 1})
        model = transformers.RobertaForSequenceClassification(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H * DH, n_layer=LAYERS, n_head=H, n_inner=D,
                                      n_positions=32, initializer_range=0.2, bos_token_id=1, eos_token_id=1, **common)
        model = transformers.GPT2ForSequenceClassification(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=H * DH, num_hidden_layers=LAYERS,
                                       num_attention_heads=H, num_key_value_heads=2, intermediate_size=D,
                                       max_position_embeddings=32, initializer_range=0.2, **common)
        model = transformers.LlamaForSequenceClassification(cfg)
    elif kind == "opt":  # flattens activations to [N*T, F] around its FFN
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=H * DH, num_hidden_layers=LAYERS,
                                     num_attention_heads=H, ffn_dim=D, word_embed_proj_dim=H * DH,
                                     max_position_embeddings=32, init_std=0.2, **common)
        model = transformers.OPTForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # HF initialises biases to 0: random ones make bias handling matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    return model.double().eval()


def make_batches(kind, sizes=((3, 7), (2, 5)), seed=1):
    """Right-padded batches with labels; pad id 0 (1 for RoBERTa), real tokens never the pad id."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if kind == "roberta" else 0
    batches = []
    for n, t in sizes:
        ids = torch.randint(2, VOCAB, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        for i in range(n):
            length = max(t - 2 * i, 2)  # example i has 2i pad tokens at the end (at least 2 real ones)
            ids[i, length:] = pad
            mask[i, length:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (n,), generator=g)})
    return batches


def mask_sites(model, kind):
    """Hard-coded (module, number of masks) of every mask site: attention-output and FFN-out projection inputs."""
    if kind in ("bert", "roberta"):
        layers = getattr(model, kind).encoder.layer
        return ([(l.attention.output.dense, H) for l in layers], [(l.output.dense, D) for l in layers])
    if kind == "gpt2":
        return ([(b.attn.c_proj, H) for b in model.transformer.h], [(b.mlp.c_proj, D) for b in model.transformer.h])
    if kind == "opt":
        layers = model.model.decoder.layers
        return ([(l.self_attn.out_proj, H) for l in layers], [(l.fc2, D) for l in layers])
    layers = model.model.layers
    return ([(l.self_attn.o_proj, H) for l in layers], [(l.mlp.down_proj, D) for l in layers])


def ffn_in_modules(model, kind):
    """Hard-coded FFN-in projections per layer (LLaMA: gate and up share one neuron mask)."""
    if kind in ("bert", "roberta"):
        return [[l.intermediate.dense] for l in getattr(model, kind).encoder.layer]
    if kind == "gpt2":
        return [[b.mlp.c_fc] for b in model.transformer.h]
    if kind == "opt":
        return [[l.fc1] for l in model.model.decoder.layers]
    return [[l.mlp.gate_proj, l.mlp.up_proj] for l in model.model.layers]


def default_log_probs(model, inputs):
    return torch.log_softmax(model(**inputs).logits, -1)


def reference_mask_fisher(model, kind, batches, mode, log_probs=default_log_probs, neuron_site="activation"):
    """Slow reference: real mask tensors (requires_grad), one example (without its padding) and one class at a
    time, one forward + autograd.grad each, gradient squared, weighted by p_c (exact) or at the label.
    neuron_site="pre_activation": the neuron mask multiplies W1 x inside act(W1 x + b1) (eq. 2 of the paper)."""
    attn_sites, ffn_sites = mask_sites(model, kind)
    sites = attn_sites + ffn_sites
    ffn_in = ffn_in_modules(model, kind)
    total = [torch.zeros(k, dtype=torch.float64) for _, k in sites]
    count = 0
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][n] == 1
            ids = batch["input_ids"][n][keep][None]
            classes = range(C) if mode == "exact" else [int(batch["labels"][n])]
            for c in classes:
                masks = [torch.ones(k, dtype=torch.float64, requires_grad=True) for _, k in sites]
                handles = []
                for i, ((module, k), m) in enumerate(zip(sites, masks)):
                    def hook(mod, args, m=m):
                        x = args[0]
                        return (x * m.repeat_interleave(x.shape[-1] // m.numel()),)

                    def pre_activation_hook(mod, args, out, m=m):
                        bias = mod.bias if mod.bias is not None else 0.0
                        return bias + (out - bias) * m
                    if i >= len(attn_sites) and neuron_site == "pre_activation":
                        for linear in ffn_in[i - len(attn_sites)]:
                            handles.append(linear.register_forward_hook(pre_activation_hook))
                    else:
                        handles.append(module.register_forward_pre_hook(hook))
                try:
                    logp = log_probs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
                    grads = torch.autograd.grad(logp[c], masks)
                finally:
                    for h in handles:
                        h.remove()
                weight = logp[c].exp().item() if mode == "exact" else 1.0
                for t, g in zip(total, grads):
                    t += weight * g.detach() ** 2
            count += 1
    total = [t / count for t in total]
    return total[:len(attn_sites)], total[len(attn_sites):]


def assert_close(actual, expected):
    scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("kind,mode", [(k, m) for k in ("bert", "roberta", "gpt2", "llama")
                                       for m in ("empirical", "exact")] + [("opt", "empirical")])
def test_matches_slow_reference(kind, mode):
    model = make_model(kind)
    batches = make_batches(kind, sizes=((2, 7), (2, 5)))
    fisher, mf = estimate_masks(model, batches, mode=mode, return_mask_fisher=True)
    ref_heads, ref_neurons = reference_mask_fisher(model, kind, batches, mode)
    heads, neurons = list(mf.heads.values()), list(mf.neurons.values())
    assert len(heads) == len(ref_heads) == LAYERS and len(neurons) == len(ref_neurons) == LAYERS
    assert all(float(r.max()) > 0 for r in ref_heads + ref_neurons)  # the check is not vacuous
    for a, r in zip(heads + neurons, ref_heads + ref_neurons):
        assert_close(a, r)
    assert mf.num_examples == 4 and fisher.metadata["num_examples"] == "4"
    assert fisher.metadata["mode"] == "masks" and fisher.metadata["mask_mode"] == mode


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "opt"])
def test_pre_activation_neuron_site_matches_reference(kind):
    model = make_model(kind)
    batches = make_batches(kind, sizes=((3, 6),))
    fisher, mf = estimate_masks(model, batches, neuron_site="pre_activation", return_mask_fisher=True)
    ref_heads, ref_neurons = reference_mask_fisher(model, kind, batches, "empirical", neuron_site="pre_activation")
    _, act = reference_mask_fisher(model, kind, batches, "empirical")
    for a, r, other in zip(mf.neurons.values(), ref_neurons, act):
        assert_close(a, r)
        assert not torch.allclose(a.double(), other, rtol=1e-2)  # a different quantity from the activation site
    for a, r in zip(mf.heads.values(), ref_heads):
        assert_close(a, r)
    assert fisher.metadata["mask_neuron_site"] == "pre_activation"


def test_low_precision_model_accumulates_in_fp32():
    ref_model = make_model("bert")
    batches = make_batches("bert")
    _, ref = estimate_masks(ref_model, batches, return_mask_fisher=True)
    fisher, low = estimate_masks(make_model("bert").to(torch.bfloat16), batches, return_mask_fisher=True)
    assert all(t.dtype == torch.float32 for t in fisher.tensors.values())
    for k in ref.heads:
        assert low.heads[k].dtype == torch.float32
        rel = (low.heads[k].double() - ref.heads[k].double()).abs().max() / ref.heads[k].double().abs().max()
        assert rel < 0.15, (k, rel)


def test_batching_does_not_change_the_result():
    model = make_model("bert")
    one = make_batches("bert", sizes=((5, 7),))
    split = [{k: v[i:i + 2] for k, v in one[0].items()} for i in (0, 2, 4)]
    _, a = estimate_masks(model, one, return_mask_fisher=True)
    _, b = estimate_masks(model, split, return_mask_fisher=True)
    for k in a.heads:
        assert_close(b.heads[k], a.heads[k])
    for k in a.neurons:
        assert_close(b.neurons[k], a.neurons[k])


def test_custom_log_prob_fn():
    def two_class_log_probs(model, batch):  # any scoring: here the first two logits only
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.log_softmax(model(**inputs).logits[:, :2], -1)

    model = make_model("bert")
    batches = make_batches("bert")
    for b in batches:
        b["labels"] = b["labels"] % 2
    _, mf = estimate_masks(model, batches, mode="exact", log_prob_fn=two_class_log_probs, return_mask_fisher=True)
    global C
    saved, C = C, 2  # the reference loops over the 2 classes the function returns
    try:
        ref_heads, ref_neurons = reference_mask_fisher(model, "bert", batches, "exact", log_probs=two_class_log_probs)
    finally:
        C = saved
    for a, r in zip(list(mf.heads.values()) + list(mf.neurons.values()), ref_heads + ref_neurons):
        assert_close(a, r)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exact_with_all_class_backwards_matches_reference(kind):
    model = make_model(kind)
    batches = make_batches(kind, sizes=((3, 6),))
    _, auto = estimate_masks(model, batches, mode="exact", return_mask_fisher=True)  # C - 1 = 2 backwards
    _, every = estimate_masks(model, batches, mode="exact", exact_backwards="all", return_mask_fisher=True)
    ref_heads, ref_neurons = reference_mask_fisher(model, kind, batches, "exact")
    for name, ref in zip(list(auto.heads) + list(auto.neurons), ref_heads + ref_neurons):
        got_auto = auto.heads.get(name, auto.neurons.get(name))
        got_every = every.heads.get(name, every.neurons.get(name))
        assert_close(got_auto, ref)
        assert_close(got_every, ref)


def test_exact_with_unnormalised_scores_uses_every_class():
    def scores(model, batch):  # e.g. length-normalised choice scores: exp does not sum to 1
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.log_softmax(model(**inputs).logits, -1) - 0.3

    model = make_model("bert")
    batches = make_batches("bert", sizes=((3, 6),))
    _, mf = estimate_masks(model, batches, mode="exact", log_prob_fn=scores, return_mask_fisher=True)
    ref_heads, ref_neurons = reference_mask_fisher(model, "bert", batches, "exact", log_probs=scores)
    for a, r in zip(list(mf.heads.values()) + list(mf.neurons.values()), ref_heads + ref_neurons):
        assert_close(a, r)


def synthetic_mask_fisher(model):
    """Distinct values per head / neuron (block index * 1000 + position + 1) to catch misplaced slices."""
    s = find_mask_structure(model)
    heads = {b.name: torch.arange(b.num_heads, dtype=torch.float32) + 1 + 1000 * i for i, b in enumerate(s.attention)}
    neurons = {f.name: torch.arange(f.width, dtype=torch.float32) + 1 + 1000 * (i + 10) for i, f in enumerate(s.ffn)}
    return MaskFisher(heads, neurons, num_examples=3, mode="empirical")


def expected_bert(model, mf, mapping):
    """Expected full Fisher for BERT by explicit per-row / per-column loops."""
    exp = {n: torch.ones(p.shape) for n, p in model.named_parameters()}
    for i in range(LAYERS):
        pre = f"bert.encoder.layer.{i}."
        heads = mf.heads[pre + "attention.self"]
        neurons = mf.neurons[f"bert.encoder.layer.{i}"]
        for h in range(H):
            rows = slice(h * DH, (h + 1) * DH)
            for t, proj in (("q", "query"), ("k", "key"), ("v", "value")):
                if t in mapping.attention:
                    exp[pre + f"attention.self.{proj}.weight"][rows, :] = heads[h]
                    exp[pre + f"attention.self.{proj}.bias"][rows] = heads[h]
            if "o" in mapping.attention:
                exp[pre + "attention.output.dense.weight"][:, rows] = heads[h]
        for j in range(D):
            if "in" in mapping.ffn:
                exp[pre + "intermediate.dense.weight"][j, :] = neurons[j]
                exp[pre + "intermediate.dense.bias"][j] = neurons[j]
            if "out" in mapping.ffn:
                exp[pre + "output.dense.weight"][:, j] = neurons[j]
    return exp


@pytest.mark.parametrize("mapping", ["paper", "qkv", "all", {"attention": ["q", "k", "v", "o"], "ffn": ["out"]}])
def test_mapping_bert_blocks(mapping):
    model = make_model("bert")
    mf = synthetic_mask_fisher(model)
    resolved = MaskMapping.resolve(mapping)
    fisher = mask_fisher_to_parameters(model, mf, mapping=mapping)
    expected = expected_bert(model, mf, resolved)
    assert set(fisher.keys()) == set(expected)
    for name, t in expected.items():
        assert fisher[name].dtype == torch.float32
        assert torch.equal(fisher[name], t), name


def test_mapping_default_value_elsewhere():
    model = make_model("bert")
    fisher = mask_fisher_to_parameters(model, synthetic_mask_fisher(model), mapping={"default": 0.5})
    assert torch.all(fisher["bert.embeddings.word_embeddings.weight"] == 0.5)
    assert torch.all(fisher["bert.encoder.layer.0.attention.self.value.weight"] == 0.5)
    assert torch.all(fisher["classifier.weight"] == 0.5)


@pytest.mark.parametrize("mapping", ["paper", "all"])
def test_mapping_gpt2_packed_c_attn(mapping):
    model = make_model("gpt2")
    mf = synthetic_mask_fisher(model)
    m = MaskMapping.resolve(mapping)
    fisher = mask_fisher_to_parameters(model, mf, mapping=mapping)
    e = H * DH
    for i in range(LAYERS):
        pre = f"transformer.h.{i}."
        heads, neurons = mf.heads[pre + "attn"], mf.neurons[f"transformer.h.{i}"]
        w, b = fisher[pre + "attn.c_attn.weight"], fisher[pre + "attn.c_attn.bias"]  # Conv1D: [in, 3E]
        assert w.shape == (e, 3 * e)
        for h in range(H):
            for part, on in ((0, True), (1, True), (2, "v" in m.attention)):  # [Q | K | V] column blocks
                cols = slice(part * e + h * DH, part * e + (h + 1) * DH)
                want = heads[h] if on else 1.0
                assert torch.all(w[:, cols] == want) and torch.all(b[cols] == want)
            out_rows = fisher[pre + "attn.c_proj.weight"][h * DH:(h + 1) * DH, :]  # Conv1D: inputs are rows
            assert torch.all(out_rows == (heads[h] if "o" in m.attention else 1.0))
        assert torch.all(fisher[pre + "attn.c_proj.bias"] == 1.0)
        for j in range(D):
            assert torch.all(fisher[pre + "mlp.c_fc.weight"][:, j] == neurons[j])
            assert fisher[pre + "mlp.c_fc.bias"][j] == neurons[j]
            assert torch.all(fisher[pre + "mlp.c_proj.weight"][j, :] == (neurons[j] if "out" in m.ffn else 1.0))
    assert torch.all(fisher["transformer.wte.weight"] == 1.0)


def test_mapping_llama_gqa_and_gated_mlp():
    model = make_model("llama")
    mf = synthetic_mask_fisher(model)
    fisher = mask_fisher_to_parameters(model, mf, mapping="all")
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        heads, neurons = mf.heads[pre + "self_attn"], mf.neurons[f"model.layers.{i}"]
        for h in range(H):
            rows = slice(h * DH, (h + 1) * DH)
            assert torch.all(fisher[pre + "self_attn.q_proj.weight"][rows] == heads[h])
            assert torch.all(fisher[pre + "self_attn.o_proj.weight"][:, rows] == heads[h])
        for g in range(2):  # 2 kv heads, each shared by query heads 2g, 2g+1: their mean
            rows = slice(g * DH, (g + 1) * DH)
            want = (heads[2 * g] + heads[2 * g + 1]) / 2
            assert torch.all(fisher[pre + "self_attn.k_proj.weight"][rows] == want)
            assert torch.all(fisher[pre + "self_attn.v_proj.weight"][rows] == want)
        for j in range(D):
            assert torch.all(fisher[pre + "mlp.gate_proj.weight"][j] == neurons[j])
            assert torch.all(fisher[pre + "mlp.up_proj.weight"][j] == neurons[j])
            assert torch.all(fisher[pre + "mlp.down_proj.weight"][:, j] == neurons[j])
        assert torch.all(fisher[pre + "input_layernorm.weight"] == 1.0)


def test_structure_found_by_module_structure():
    s = find_mask_structure(make_model("llama"))
    assert [b.name for b in s.attention] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    b = s.attention[0]
    assert (b.num_heads, b.head_dim, b.num_kv_heads) == (H, DH, 2)
    assert b.out.name == "model.layers.0.self_attn.o_proj"
    f = s.ffn[0]
    assert f.width == D and [p.name for p in f.inputs] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert f.out.name == "model.layers.0.mlp.down_proj"
    # The same finder on a model whose names it has never seen, wrapped in a container.
    wrapped = nn.ModuleDict({"backbone": make_model("bert")})
    s = find_mask_structure(wrapped)
    assert s.attention[1].out.name == "backbone.bert.encoder.layer.1.attention.output.dense"
    assert s.ffn[1].out.name == "backbone.bert.encoder.layer.1.output.dense"


def test_gpt2_cross_attention_structure():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H * DH, n_layer=1, n_head=H, n_inner=D,
                                  add_cross_attention=True)
    s = find_mask_structure(transformers.GPT2Model(cfg))
    cross = [b for b in s.attention if b.name.endswith("crossattention")][0]
    assert cross.q.name.endswith("q_attn") and (cross.k.offset, cross.v.offset) == (0, H * DH)
    assert len(s.ffn) == 1


def test_state_restored_and_no_grad():
    model = make_model("gpt2")
    model.train()
    model.transformer.wte.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = make_batches("gpt2")
    model.eval()
    out_before = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    model.train()
    estimate_masks(model, batches, mode="exact")
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n], n
    model.eval()
    out_after = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    assert torch.equal(out_before, out_after)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_save_load_roundtrip(tmp_path):
    model = make_model("bert")
    fisher = estimate_masks(model, make_batches("bert"))
    assert fisher.metadata["structure"] == store.structure_fingerprint(model)
    assert fisher.metadata["weights"] == store.weights_fingerprint(model)
    path = store.save(tmp_path / "f.safetensors", fisher)
    loaded = store.load(path)
    assert loaded.metadata == fisher.metadata
    for k in fisher.keys():
        assert torch.equal(loaded[k], fisher[k])


def test_bad_input():
    model = make_model("bert")
    batches = make_batches("bert")
    with pytest.raises(ValueError, match="no examples"):
        estimate_masks(model, [])
    with pytest.raises(ValueError, match="no examples"):
        estimate_masks(model, [{k: v[:0] for k, v in batches[0].items()}])
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="needs labels"):
        estimate_masks(model, no_labels, mode="empirical")
    estimate_masks(model, no_labels, mode="exact")  # exact mode needs no labels
    bad_labels = [dict(batches[0], labels=torch.tensor([0, 1, C]))]
    with pytest.raises(ValueError, match="outside"):
        estimate_masks(model, bad_labels)
    with pytest.raises(ValueError, match="no attention layers"):
        estimate_masks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [{"x": torch.ones(2, 4)}])
    with pytest.raises(ValueError, match="mode="):
        estimate_masks(model, batches, mode="sampled")
    with pytest.raises(ValueError, match="unknown preset"):
        estimate_masks(model, batches, mapping="everything")
    with pytest.raises(ValueError, match="unknown targets"):
        MaskMapping(attention=("q", "x"))
    with pytest.raises(ValueError, match="neuron_site"):
        estimate_masks(model, batches, neuron_site="inside")
    with pytest.raises(TypeError, match="unexpected"):
        estimate_masks(model, batches, samples=3)
    for p in model.parameters():  # errors also restore the model
        assert p.requires_grad and p.grad is None


def test_weights_fingerprint_of_a_tensor_over_2_pow_24_elements():
    # BERT-base's word embedding (30522 x 768) has more elements than float32 counts exactly.
    big = {"w": torch.zeros(30522 * 768)}
    assert len(store.weights_fingerprint(big)) == 16


def test_estimate_mode_masks_delegates_here():
    estimate = pytest.importorskip("pymerge.fisher.estimate").estimate
    model = make_model("bert")
    batches = make_batches("bert", sizes=((3, 6),))
    for mode in ("empirical", "exact"):
        via = estimate(model, batches, mode="masks", mask_mode=mode)
        direct = estimate_masks(model, batches, mode=mode)
        assert via.metadata["mask_mode"] == mode
        for k in direct.keys():
            assert torch.equal(via[k], direct[k]), k


def test_estimate_mode_masks_passes_log_prob_fn_on():
    estimate = pytest.importorskip("pymerge.fisher.estimate").estimate

    def first_two(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.log_softmax(model(**inputs).logits[:, :2], -1)

    model = make_model("bert")
    batches = make_batches("bert", sizes=((3, 6),))
    via = estimate(model, batches, mode="masks", mask_mode="exact", log_prob_fn=first_two)
    direct = estimate_masks(model, batches, mode="exact", log_prob_fn=first_two)
    without = estimate_masks(model, batches, mode="exact")
    assert any(not torch.equal(direct[k], without[k]) for k in direct.keys())  # the function matters
    for k in direct.keys():
        assert torch.equal(via[k], direct[k]), k
