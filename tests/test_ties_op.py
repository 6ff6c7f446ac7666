"""ties_merge's model form (the op forms τ_i = θ_i - θ_pre) and its folded NaN / Inf check, on every compiled
instruction set and dtype, against the pure-torch reference and the task-vector form; the engine's use of both."""
import zlib

import pytest
import torch

from pymerge import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = ["base", "avx2", "avx512"]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
# Sizes: the all-keys selection (n <= 131072) and the sampled band (above); M: the per-element kernel (1..8) and
# the block kernel (9..16).
CASES = [(5001, 1), (5001, 4), (5001, 8), (5001, 9), (140_003, 3), (140_003, 4), (140_003, 10)]


def seed_of(*args):
    return zlib.crc32(repr(args).encode())


def close(got, want, equal_nan=False):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=equal_nan, **TOL[want.dtype])


def finetunes(n, m, dtype, gen, scale=0.02):
    """A base and m fine-tuned models θ_i = base + small deltas, rounded to dtype (as checkpoints are)."""
    base = torch.randn(n, generator=gen)
    models = [(base + scale * torch.randn(n, generator=gen) ** 3).to(dtype) for _ in range(m)]
    return base.to(dtype), models


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_form_equals_the_task_vector_form(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    for n, m in CASES:
        gen = torch.Generator().manual_seed(seed_of(isa, str(dtype), n, m))
        pre, models = finetunes(n, m, dtype, gen)
        taus = [t - pre for t in models]  # torch rounds the difference to dtype; the op must round the same way
        for density in (0.2, 0.9):
            got = ops.ties_merge(pre, models, density, 0.8, models=True)
            assert torch.equal(got, ops.ties_merge(pre, taus, density, 0.8)), (n, m, density)
            if n < 10_000:  # (the large task-vector form is checked against the reference in test_ops.py)
                close(got, ops.ties_merge_reference(pre, models, density, 0.8, models=True))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_vector_form_matches_the_reference_for_every_model_count(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16):
        gen = torch.Generator().manual_seed(seed_of(isa, str(dtype), m))
        pre = torch.randn(3001, generator=gen).to(dtype)
        taus = [torch.randn(3001, generator=gen).to(dtype) for _ in range(m)]
        close(ops.ties_merge(pre, taus, 0.3, 0.7), ops.ties_merge_reference(pre, taus, 0.3, 0.7))


def test_model_form_reference_is_ties_of_the_differences():
    gen = torch.Generator().manual_seed(5)
    pre, models = finetunes(1000, 3, torch.float32, gen)
    want = ops.ties_merge_reference(pre, [t - pre for t in models], 0.4, 1.0)
    assert torch.equal(ops.ties_merge_reference(pre, models, 0.4, 1.0, models=True), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [777, 140_003])
def test_check_finite_names_the_first_bad_input(isa, dtype, n, monkeypatch):
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(seed_of(isa, str(dtype), n))
    for models in (False, True):
        list_name = "models" if models else "task_vectors"
        for bad, value in ((0, float("nan")), (2, float("inf")), (3, -float("inf")), ("pretrained", float("nan"))):
            pre, xs = finetunes(n, 4, dtype, gen)
            where = int(torch.randint(0, n, (1,), generator=gen))
            if bad == "pretrained":
                pre[where] = value
            else:
                xs[bad][where] = value
            want_arg, want_index = ("pretrained", None) if bad == "pretrained" else (list_name, bad)
            for fn in (ops.ties_merge, ops.ties_merge_reference):
                with pytest.raises(ops.NonFiniteInputError) as info:
                    fn(pre, xs, 0.2, 1.0, models=models, check_finite=True)
                assert (info.value.arg, info.value.index) == (want_arg, want_index), (fn, bad, models)
                label = want_arg if want_index is None else f"{want_arg}[{want_index}]"
                assert str(info.value) == f"{label}: contains NaN or Inf (check_finite=True)"
            # without the check, NaN / Inf are merged as documented (NaN counts as the largest magnitude)
            if n < 10_000:
                close(ops.ties_merge(pre, xs, 0.2, 1.0, models=models),
                      ops.ties_merge_reference(pre, xs, 0.2, 1.0, models=models), equal_nan=True)
        # a bad model before a bad base: the model is named (the list first, in order, as the engine reads)
        pre, xs = finetunes(n, 4, dtype, gen)
        pre[1] = float("nan")
        xs[1][n - 1] = float("inf")
        with pytest.raises(ops.NonFiniteInputError) as info:
            ops.ties_merge(pre, xs, 0.2, 1.0, models=models, check_finite=True)
        assert (info.value.arg, info.value.index) == (list_name, 1)


def test_check_finite_passes_finite_inputs_whose_difference_overflows():
    # fp16: 60000 - (-60000) overflows to inf in the difference; the inputs are finite, so no error, and the
    # result equals the task-vector form of torch's own (overflowing) difference
    pre = torch.full((1000,), -60000.0).to(torch.float16)
    models = [torch.full((1000,), 60000.0).to(torch.float16), torch.zeros(1000, dtype=torch.float16)]
    got = ops.ties_merge(pre, models, 0.5, 1.0, models=True, check_finite=True)
    assert torch.equal(got, ops.ties_merge(pre, [t - pre for t in models], 0.5, 1.0))


def test_raw_op_defaults_and_message():
    x = torch.randn(100)
    y = x.clone()
    y[3] = float("nan")
    # the old four-argument call is unchanged: task vectors, no check
    assert torch.equal(torch.ops.pymerge.ties_merge(x, [x, y], 0.5, 1.0),
                       torch.ops.pymerge.ties_merge(x, [x, y], 0.5, 1.0, False, False))
    with pytest.raises(ValueError, match=r"ties_merge: models\[1\] contains NaN or Inf"):
        torch.ops.pymerge.ties_merge(x, [x, y], 0.5, 1.0, models=True, check_finite=True)
    with pytest.raises(ValueError, match=r"ties_merge: pretrained contains NaN or Inf"):
        torch.ops.pymerge.ties_merge(y, [x, x], 0.5, 1.0, check_finite=True)


@pytest.mark.parametrize("kwargs", [dict(models=True), dict(check_finite=True), dict(models=True, check_finite=True)])
def test_opcheck_new_arguments(kwargs):
    gen = torch.Generator().manual_seed(3)
    pre, models = finetunes(333, 3, torch.float32, gen)
    torch.library.opcheck(torch.ops.pymerge.ties_merge.default, (pre, models, 0.3, 1.0), kwargs)


def test_bad_model_list_is_named():
    x = torch.randn(5)
    with pytest.raises(ValueError, match=r"models\[1\]: shape \(4,\)"):
        ops.ties_merge(x, [x, torch.randn(4)], 0.5, 1.0, models=True)


# ------------------------------------------------------------------------------------------------
# the engine: TIES feeds the fine-tuned tensors to the op, which checks them; the engine names model and tensor
# ------------------------------------------------------------------------------------------------
QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import engine_models as em

    return em.build_zoo(tmp_path_factory.mktemp("zoo"))


def _ties_cfg(zoo, rte=None, base=None, **params):
    models = [{"model": str(zoo["sst"])}, {"model": str(rte or zoo["rte"])}]
    return {"merge_method": "ties", "models": models, "base_model": str(base or zoo["bert_base"]),
            "parameters": dict({"density": 0.3, "lambda": 1.0}, **params)}


def _with_nan(src, dst, name):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd[name][0, 1] = float("nan")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("params", [{}, {"consensus": "count"}], ids=["fused", "generalized"])
def test_engine_names_the_model_or_base_with_nan(zoo, tmp_path, params):
    import pymerge
    from pymerge.io import CheckpointError

    bad_model = _with_nan(zoo["rte"], tmp_path / "rte_nan", "bert." + QUERY)
    with pytest.raises(CheckpointError) as info:
        pymerge.merge(_ties_cfg(zoo, rte=bad_model, **params), tmp_path / "o1", progress=False)
    assert str(info.value) == f"{bad_model}: weights tensor 'bert.{QUERY}' contains NaN or Inf"
    bad_base = _with_nan(zoo["bert_base"], tmp_path / "base_nan", QUERY)
    with pytest.raises(CheckpointError) as info:
        pymerge.merge(_ties_cfg(zoo, base=bad_base, **params), tmp_path / "o2", progress=False)
    assert str(info.value) == f"{bad_base}: weights tensor '{QUERY}' contains NaN or Inf"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # check_finite: false merges anyway (NaN propagates as the op documents)
    cfg = _ties_cfg(zoo, rte=bad_model, **params)
    cfg["check_finite"] = False
    pymerge.merge(cfg, tmp_path / "o3", progress=False)
    assert (tmp_path / "o3" / "model.safetensors").exists()


def test_engine_leaves_the_check_to_ties_and_keeps_it_for_other_methods(zoo, tmp_path, monkeypatch):
    import pymerge
    from pymerge.engine import run

    checked = []
    real = run._check_values
    monkeypatch.setattr(run, "_check_values", lambda t, label, name, fisher=False: (checked.append(name),
                                                                                      real(t, label, name, fisher)))
    pymerge.merge(_ties_cfg(zoo), tmp_path / "ties", progress=False)
    assert not any(QUERY in n for n in checked)  # the op checked them
    checked.clear()
    cfg = _ties_cfg(zoo)
    cfg["merge_method"] = "task_arithmetic"
    cfg["parameters"] = {"lambda": 0.5}
    pymerge.merge(cfg, tmp_path / "ta", progress=False)
    assert sum(QUERY in n for n in checked) == 3  # two models and the base, as before


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantised_task_vectors_select_exactly(isa, dtype, monkeypatch):
    # θ_i - θ_pre of checkpoints rounded to bf16 / fp16 takes few distinct magnitudes, so the sampled band holds far
    # more keys than the sample predicts (each value many times): they are counted, not sorted, and must still give
    # the exact k-th largest
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(seed_of(isa, str(dtype), "quantised"))
    base = torch.randn(150_001, generator=gen)
    pre = base.to(dtype)
    models = [(base + 0.02 * torch.randn(150_001, generator=gen)).to(dtype) for _ in range(3)]
    for density in (0.05, 0.3):
        # lam 100: a wrongly trimmed entry moves the output by ~2, far outside the bf16 / fp16 tolerance
        got = ops.ties_merge(pre, models, density, 100.0, models=True)
        close(got, ops.ties_merge_reference(pre, models, density, 100.0, models=True))
        assert torch.equal(got, ops.ties_merge(pre, [t - pre for t in models], density, 100.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_model_form_and_check_match_the_cpu(dtype):
    gen = torch.Generator().manual_seed(seed_of("cuda", str(dtype)))
    pre, models = finetunes(70_001, 4, dtype, gen)
    want = ops.ties_merge(pre, models, 0.3, 0.9, models=True)
    got = ops.ties_merge(pre.cuda(), [t.cuda() for t in models], 0.3, 0.9, models=True, check_finite=True)
    close(got.cpu(), want)
    models[2][5] = float("nan")
    with pytest.raises(ops.NonFiniteInputError) as info:
        ops.ties_merge(pre.cuda(), [t.cuda() for t in models], 0.3, 0.9, models=True, check_finite=True)
    assert (info.value.arg, info.value.index) == ("models", 2)
