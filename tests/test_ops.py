"""The fused merge ops (CPU kernels) against their pure-torch references, properties, opcheck, bad input."""
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel and reference both accumulate in fp32 in the same order; outputs may differ by an fp32 rounding, which
# in fp16 / bf16 can flip the last bit of the output.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
# (shape, M): sizes 0, 1, odd, several blocks, large (several parallel chunks) and M = 1, 2, 3, 16; M = 3 uses
# non-contiguous views. Large tensors with many models only cost test time, so they are not crossed fully.
SHAPE_M = [((0,), 1), ((0,), 16), ((1,), 1), ((1,), 2), ((7, 13), 1), ((7, 13), 2), ((7, 13), 3), ((7, 13), 16),
           ((5001,), 16), ((100_003,), 2), ((100_003,), 3)]
settings.register_profile("ops", max_examples=15, deadline=None)
settings.load_profile("ops")


def seed_of(*args):
    return zlib.crc32(repr(args).encode())  # stable across processes (unlike hash())


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[want.dtype])


def rand(shape, dtype, gen, *, positive=False, noncontig=False):
    """A random tensor; noncontig gives a strided view (a transposed or a step-2 slice) of the same shape."""
    if noncontig and len(shape) == 2:
        t = torch.randn(shape[::-1], generator=gen).t()
    elif noncontig:
        t = torch.randn((shape[0] * 2,) + tuple(shape[1:]), generator=gen)[::2]
    else:
        t = torch.randn(shape, generator=gen)
    if positive:
        t = t.abs()
    t = t.to(dtype)
    assert t.shape == tuple(shape) and (t.is_contiguous() or noncontig)
    return t


def zero_region(fishers):
    """Zero all Fishers on the first third of the elements: there Σ λ F = 0 and the fallback applies."""
    for f in fishers:
        flat = f.view(-1) if f.is_contiguous() else None
        if flat is not None:
            flat[: f.numel() // 3] = 0
        else:
            f[: max(1, f.shape[0] // 3)] = 0


def test_compiled_kernels_are_used():
    t = torch.zeros(3)
    for name in ("weighted_sum", "fisher_merge", "dfmerge_combine", "ties_merge", "dare"):
        assert ops._use_kernel(name, t), name


# ------------------------------------------------------------------------------------------------
# each op against its reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
@pytest.mark.parametrize("fallback", ["target", "average"])
def test_fisher_merge_matches_reference(dtype, shape, m, fallback):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), shape, m, fallback))
    nc = m == 3  # one M takes non-contiguous views
    params = [rand(shape, dtype, gen, noncontig=nc) for _ in range(m)]
    fishers = [rand(shape, dtype, gen, positive=True, noncontig=nc) for _ in range(m)]
    zero_region(fishers)
    weights = torch.rand(m, generator=gen).add(0.1).tolist()
    got = ops.fisher_merge(params, fishers, weights, fallback=fallback)
    close(got, ops.fisher_merge_reference(params, fishers, weights, 1e-8, fallback))
    assert got.is_contiguous()


def test_fisher_merge_fallbacks_pick_the_documented_value():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    f = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])]
    # element 0: zero Fisher -> params[0] or the λ-weighted mean; element 1: (0.5*2 + 0.5*3*6) / (0.5 + 1.5)
    assert ops.fisher_merge(p, f).tolist() == [1.0, 5.0]
    got = ops.fisher_merge(p, f, weights=[1.0, 3.0], fallback="average")
    torch.testing.assert_close(got, torch.tensor([(1 + 9) / 4, (2 + 54) / (1 + 9)]))
    # eps is inclusive: Σ λ F <= eps falls back
    assert ops.fisher_merge(p, f, eps=1.0).tolist() == [1.0, 5.0]
    assert ops.fisher_merge(p, f, eps=2.0).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16])
def test_fisher_merge_fp32_fishers_with_half_params(pdtype):
    gen = torch.Generator().manual_seed(1)
    params = [rand((257,), pdtype, gen) for _ in range(3)]
    fishers = [rand((257,), torch.float32, gen, positive=True) * 1e-9 for _ in range(3)]  # would underflow fp16
    got = ops.fisher_merge(params, fishers, eps=0.0)
    assert got.dtype == pdtype
    close(got, ops.fisher_merge_reference(params, fishers, None, 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
def test_dfmerge_combine_matches_reference(dtype, shape, m):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), shape, m))
    nc = m == 2
    pre = rand(shape, dtype, gen, noncontig=nc)
    taus = [rand(shape, dtype, gen, noncontig=nc) for _ in range(m)]
    fishers = [rand(shape, dtype, gen, positive=True, noncontig=nc) for _ in range(m)]
    zero_region(fishers)
    lambdas = torch.rand(m, generator=gen).tolist()
    close(ops.dfmerge_combine(pre, taus, fishers, lambdas), ops.dfmerge_combine_reference(pre, taus, fishers, lambdas))


def test_dfmerge_combine_follows_eq8_and_its_fallback():
    pre = torch.tensor([10.0, 10.0])
    taus = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    fishers = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    got = ops.dfmerge_combine(pre, taus, fishers, [0.5, 0.25])
    # element 0: 10 + 2 * (1*0.5*1 + 3*0.25*3) / 4; element 1 (ΣF = 0): 10 + 0.5*2 + 0.25*4
    torch.testing.assert_close(got, torch.tensor([10 + 2 * (0.5 + 2.25) / 4, 12.0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
def test_weighted_sum_matches_reference(dtype, shape, m):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), shape, m))
    ts = [rand(shape, dtype, gen, noncontig=(m == 3)) for _ in range(m)]
    base = rand(shape, dtype, gen) if m != 2 else None
    w = (torch.randn(m, generator=gen)).tolist()
    close(ops.weighted_sum(ts, w, base), ops.weighted_sum_reference(ts, w, base))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_ties_merge_matches_reference(dtype, shape, m, density):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), shape, m, density))
    nc = m == 3
    pre = rand(shape, dtype, gen, noncontig=nc)
    taus = [rand(shape, dtype, gen, noncontig=nc) for _ in range(m)]
    close(ops.ties_merge(pre, taus, density, 0.7), ops.ties_merge_reference(pre, taus, density, 0.7))


def naive_ties(pre, taus, density, lam):
    """TIES written out element by element with a full sort, to check the reference's semantics."""
    n = pre.numel()
    k = max(1, math.ceil(density * n))
    trimmed = []
    for t in taus:
        t = t.flatten().tolist()
        thr = sorted((abs(x) for x in t), reverse=True)[k - 1]
        trimmed.append([x if abs(x) >= thr else 0.0 for x in t])
    out = []
    for e in range(n):
        vals = [tr[e] for tr in trimmed]
        s = sum(vals)
        agree = [v for v in vals if v != 0 and (v > 0) == (s > 0) and s != 0]
        out.append(pre.flatten()[e].item() + lam * (sum(agree) / len(agree) if agree else 0.0))
    return torch.tensor(out).reshape(pre.shape)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_ties_merge_matches_a_naive_sorting_implementation(density):
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(41, generator=gen)
    # small integers: many equal magnitudes, so ties at the threshold are exercised (all kept)
    taus = [torch.randint(-3, 4, (41,), generator=gen).float() for _ in range(3)]
    want = naive_ties(pre, taus, density, 0.9)
    torch.testing.assert_close(ops.ties_merge_reference(pre, taus, density, 0.9), want)
    torch.testing.assert_close(ops.ties_merge(pre, taus, density, 0.9), want)


def test_ties_merge_keeps_top_k_and_drops_conflicting_signs():
    pre = torch.zeros(4)
    taus = [torch.tensor([4.0, -3.0, 0.5, 1.0]), torch.tensor([-1.0, 2.0, 0.1, 5.0])]
    # density 0.5 -> k = 2: model 0 keeps {4, -3}, model 1 keeps {2, 5}.
    # e0: 4 alone; e1: -3 + 2 -> sign -, mean -3; e2: nothing kept; e3: 5 alone.
    assert ops.ties_merge(pre, taus, 0.5, 1.0).tolist() == [4.0, -3.0, 0.0, 5.0]
    assert ops.ties_merge(pre, taus, 0.5, 0.5).tolist() == [2.0, -1.5, 0.0, 2.5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (100_003,)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dare_matches_reference_exactly(dtype, shape, p):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), shape, p))
    t = rand(shape, dtype, gen, noncontig=(p == 0.3))
    got = ops.dare(t, p, seed=1234)
    assert torch.equal(got, ops.dare_reference(t, p, 1234))


def test_dare_random_bits_are_splitmix64():
    # splitmix64 written out with Python ints, element 0 and 5 of seed 42
    mask = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix(42)
    bits = ops.dare_random_bits(42, 6)
    for e in (0, 5):
        assert bits[e] == mix((key + (e + 1) * 0x9E3779B97F4A7C15) & mask) >> 40


def test_dare_mask_independent_of_threads_and_layout():
    t = torch.randn(300, 401)
    want = ops.dare(t, 0.5, 9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.dare(t, 0.5, 9), want)
    finally:
        torch.set_num_threads(old)
    tt = t.t().contiguous().t()  # same values, column-major storage
    assert torch.equal(ops.dare(tt, 0.5, 9), want)


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------
dtype_st = st.sampled_from(DTYPES)
m_st = st.integers(1, 6)
n_st = st.integers(1, 300)


@given(dtype=dtype_st, m=m_st, n=n_st, seed=st.integers(0, 2**31 - 1))
def test_equal_fishers_give_the_weighted_mean(dtype, m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [rand((n,), dtype, gen) for _ in range(m)]
    f = rand((n,), dtype, gen, positive=True).float().add(0.5).to(dtype)
    w = torch.rand(m, generator=gen).add(0.1).tolist()
    got = ops.fisher_merge(params, [f] * m, w)
    close(got, ops.weighted_sum(params, [x / sum(w) for x in w]))


@given(dtype=dtype_st, n=n_st, seed=st.integers(0, 2**31 - 1))
def test_one_model_returns_its_input(dtype, n, seed):
    gen = torch.Generator().manual_seed(seed)
    p = rand((n,), dtype, gen)
    f = rand((n,), dtype, gen, positive=True)
    tau = rand((n,), dtype, gen)
    close(ops.fisher_merge([p], [f]), p)
    close(ops.weighted_sum([p], [1.0]), p)
    close(ops.dfmerge_combine(p, [tau], [f], [1.0]), ops.weighted_sum([tau], [1.0], p))
    close(ops.ties_merge(p, [tau], 1.0, 1.0), ops.weighted_sum([tau], [1.0], p))


@given(dtype=dtype_st, m=st.integers(2, 6), n=n_st, seed=st.integers(0, 2**31 - 1),
       density=st.floats(0.05, 1.0))
def test_permuting_models_leaves_the_result_unchanged(dtype, m, n, seed, density):
    gen = torch.Generator().manual_seed(seed)
    params = [rand((n,), dtype, gen) for _ in range(m)]
    fishers = [rand((n,), dtype, gen, positive=True) for _ in range(m)]
    zero_region(fishers)
    w = torch.rand(m, generator=gen).add(0.1).tolist()
    pre = rand((n,), dtype, gen)
    perm = torch.randperm(m, generator=gen).tolist()
    pp, fp, wp = [params[i] for i in perm], [fishers[i] for i in perm], [w[i] for i in perm]
    # the "average" fallback is symmetric in the models ("target" picks params[0] by design)
    close(ops.fisher_merge(pp, fp, wp, fallback="average"), ops.fisher_merge(params, fishers, w, fallback="average"))
    close(ops.dfmerge_combine(pre, pp, fp, wp), ops.dfmerge_combine(pre, params, fishers, w))
    close(ops.weighted_sum(pp, wp, pre), ops.weighted_sum(params, w, pre))
    if dtype == torch.float32:  # TIES elects a sign from a sum, which fp rounding can make order dependent at 0
        close(ops.ties_merge(pre, pp, density, 0.8), ops.ties_merge(pre, params, density, 0.8))


@given(dtype=dtype_st, n=st.integers(0, 500), seed=st.integers(-(2**63), 2**63 - 1))
def test_dare_with_p0_is_identity(dtype, n, seed):
    t = torch.randn(n).to(dtype)
    assert torch.equal(ops.dare(t, 0.0, seed), t)


@given(seed=st.integers(-(2**63), 2**63 - 1), p=st.floats(0.05, 0.95))
def test_dare_seed_decides_the_mask_and_drops_about_p(seed, p):
    t = torch.randn(20_000).abs().add(0.1)  # no zeros: a zero output means dropped
    a = ops.dare(t, p, seed)
    assert torch.equal(a, ops.dare(t, p, seed))
    other = seed + 1 if seed < 2**63 - 1 else seed - 1
    assert not torch.equal(a == 0, ops.dare(t, p, other) == 0)
    frac = (a == 0).float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / t.numel())
    kept = a != 0
    torch.testing.assert_close(a[kept], t[kept] / (1 - p))


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernels, autograd registration, AOT dispatch) and meta tensors
# ------------------------------------------------------------------------------------------------
def opcheck_cases():
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    fs = [torch.rand(5, 7, generator=gen) for _ in range(3)]
    return [
        (torch.ops.pymerge.weighted_sum.default, (ps, [0.1, 0.2, 0.3], ps[0])),
        (torch.ops.pymerge.weighted_sum.default, (ps, [0.1, 0.2, 0.3], None)),
        (torch.ops.pymerge.fisher_merge.default, (ps, fs, [0.2, 0.3, 0.5], 1e-8, "target")),
        (torch.ops.pymerge.fisher_merge.default, (ps, fs, [0.2, 0.3, 0.5], 1e-8, "average")),
        (torch.ops.pymerge.dfmerge_combine.default, (ps[0], ps[1:], fs[1:], [0.4, 0.6], 1e-8)),
        (torch.ops.pymerge.ties_merge.default, (ps[0], ps[1:], 0.3, 1.0)),
        (torch.ops.pymerge.dare.default, (ps[0], 0.4, 17)),
        (torch.ops.pymerge.weighted_sum_out.default, (ps, [0.1, 0.2, 0.3], ps[0], torch.empty(5, 7))),
        (torch.ops.pymerge.fisher_merge_out.default, (ps, fs, [0.2, 0.3, 0.5], 1e-8, "average", torch.empty(5, 7))),
        (torch.ops.pymerge.dfmerge_combine_out.default, (ps[0], ps[1:], fs[1:], [0.4, 0.6], 1e-8, torch.empty(5, 7))),
        (torch.ops.pymerge.fisher_merge.default, (ps, fs, None, 1e-8, "target")),
        (torch.ops.pymerge.weighted_sum.default, (ps, None, ps[0])),
        (torch.ops.pymerge.fisher_merge_out.default, (ps, fs, None, 1e-8, "average", torch.empty(5, 7))),
        (torch.ops.pymerge.weighted_sum_out.default, (ps, None, None, torch.empty(5, 7))),
    ]


@pytest.mark.parametrize("case", range(14))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_meta_tensors_give_shapes():
    ps = [torch.empty(3, 4, device="meta", dtype=torch.bfloat16) for _ in range(2)]
    out = ops.fisher_merge(ps, ps)
    assert out.device.type == "meta" and out.shape == (3, 4) and out.dtype == torch.bfloat16
    assert ops.dare(ps[0], 0.5, 1).shape == (3, 4)


# ------------------------------------------------------------------------------------------------
# bad input: each error names the argument (and index) at fault
# ------------------------------------------------------------------------------------------------
x = torch.zeros(4)
y = torch.zeros(5)
BAD = [
    (lambda: ops.fisher_merge([], []), ValueError, r"params: expected a non-empty list"),
    (lambda: ops.fisher_merge([x, x], [x]), ValueError, r"fishers: expected 2 tensors \(one per params\), got 1"),
    (lambda: ops.fisher_merge([x, y], [x, x]), ValueError, r"params\[1\]: shape \(5,\) does not match params\[0\]"),
    (lambda: ops.fisher_merge([x, x], [x, y]), ValueError, r"fishers\[1\]: shape \(5,\)"),
    (lambda: ops.fisher_merge([x, x.half()], [x, x]), ValueError, r"params\[1\]: dtype torch.float16 does not match"),
    (lambda: ops.fisher_merge([x.half()], [x.bfloat16()]), ValueError, r"fishers\[0\]: dtype torch.bfloat16"),
    (lambda: ops.fisher_merge([x], [x.double()]), TypeError, r"fishers\[0\]: dtype torch.float64 is not supported"),
    (lambda: ops.fisher_merge([x.to(torch.int32)], [x]), TypeError, r"params\[0\]: dtype torch.int32"),
    (lambda: ops.fisher_merge([x, x.to("meta")], [x, x]), ValueError, r"params\[1\]: device meta does not match"),
    (lambda: ops.fisher_merge([x] * 17, [x] * 17), ValueError, r"params: at most 16 models"),
    (lambda: ops.fisher_merge([x, x], [x, x], [1.0]), ValueError, r"weights: expected 2 values"),
    (lambda: ops.fisher_merge([x, x], [x, x], [1.0, float("nan")]), ValueError, r"weights\[1\]: expected a finite"),
    (lambda: ops.fisher_merge([x], [x], eps=-1e-3), ValueError, r"eps: expected a finite number >= 0"),
    (lambda: ops.fisher_merge([x], [x], fallback="mean"), ValueError, r"fallback: expected 'target' or 'average'"),
    (lambda: ops.fisher_merge([x, x], [x, x], [1.0, -1.0], fallback="average"), ValueError, r"weights: .*sum"),
    (lambda: ops.fisher_merge([x, x.clone().fill_(float("nan"))], [x, x], check_finite=True), ValueError,
     r"params\[1\]: contains NaN or Inf"),
    (lambda: ops.fisher_merge([x, x], [x, x.clone().fill_(float("inf"))], check_finite=True), ValueError,
     r"fishers\[1\]: contains NaN or Inf"),
    (lambda: ops.dfmerge_combine(x, [], [], []), ValueError, r"task_vectors: expected a non-empty list"),
    (lambda: ops.dfmerge_combine(x, [y], [y], [1.0]), ValueError, r"task_vectors\[0\]: shape \(5,\) does not match pretrained"),
    (lambda: ops.dfmerge_combine(x, [x], [x], [1.0, 2.0]), ValueError, r"lambdas: expected 1 values"),
    (lambda: ops.dfmerge_combine(x, [x, x], [x], [1.0, 2.0]), ValueError, r"fishers: expected 2 tensors"),
    (lambda: ops.dfmerge_combine(x.half(), [x], [x], [1.0]), ValueError, r"task_vectors\[0\]: dtype torch.float32"),
    (lambda: ops.dfmerge_combine(x, [x], [x], [1.0], eps=-1), ValueError, r"eps: expected"),
    (lambda: ops.dfmerge_combine(x.clone().fill_(float("nan")), [x], [x], [1.0], check_finite=True), ValueError,
     r"pretrained: contains NaN"),
    (lambda: ops.dfmerge_combine(x, [x, x.clone().fill_(float("nan"))], [x, x], [1.0, 1.0], check_finite=True),
     ValueError, r"task_vectors\[1\]: contains NaN"),
    (lambda: ops.weighted_sum([], []), ValueError, r"tensors: expected a non-empty list"),
    (lambda: ops.weighted_sum([x, x], [1.0]), ValueError, r"weights: expected 2 values"),
    (lambda: ops.weighted_sum([x], [1.0], base=y), ValueError, r"base: shape \(5,\) does not match tensors\[0\]"),
    (lambda: ops.weighted_sum([x], [1.0], base=x.half()), ValueError, r"base: dtype torch.float16"),
    (lambda: ops.weighted_sum(x, [1.0]), TypeError, r"tensors: expected a list of tensors"),
    (lambda: ops.ties_merge(x, [x], 0.0, 1.0), ValueError, r"density: expected a value in \(0, 1\]"),
    (lambda: ops.ties_merge(x, [x], 1.5, 1.0), ValueError, r"density: expected a value in \(0, 1\]"),
    (lambda: ops.ties_merge(x, [x, y], 0.5, 1.0), ValueError, r"task_vectors\[1\]: shape \(5,\)"),
    (lambda: ops.ties_merge(x, [x] * 17, 0.5, 1.0), ValueError, r"task_vectors: at most 16"),
    (lambda: ops.ties_merge(x, [x], 0.5, float("inf")), ValueError, r"lam: expected a finite number"),
    (lambda: ops.dare(x, 1.0, 0), ValueError, r"p: expected a drop probability in \[0, 1\)"),
    (lambda: ops.dare(x, -0.1, 0), ValueError, r"p: expected a drop probability in \[0, 1\)"),
    (lambda: ops.dare(x, 0.5, 1.5), TypeError, r"seed: expected an int"),
    (lambda: ops.dare(x, 0.5, 2**64), ValueError, r"seed: expected a 64-bit"),
    (lambda: ops.dare([x], 0.5, 0), TypeError, r"task_vector: expected a tensor"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_the_argument(case):
    fn, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fn()


def test_compiled_op_checks_its_arguments_too():
    # C++ / LibTorch callers skip the Python checks; the kernels check again.
    with pytest.raises(RuntimeError, match=r"fisher_merge: fishers\[1\]: shape"):
        torch.ops.pymerge.fisher_merge([x, x], [x, y], [0.5, 0.5], 1e-8, "target")
    with pytest.raises(RuntimeError, match=r"fallback must be 'target' or 'average'"):
        torch.ops.pymerge.fisher_merge([x], [x], [1.0], 1e-8, "median")
    with pytest.raises(RuntimeError, match=r"ties_merge: density must be in \(0, 1\]"):
        torch.ops.pymerge.ties_merge(x, [x], 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"dare: p must be in \[0, 1\)"):
        torch.ops.pymerge.dare(x, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"weighted_sum: tensors: at most 16"):
        torch.ops.pymerge.weighted_sum([x] * 17, [1.0] * 17, None)


def test_wrappers_compile_with_fullgraph():
    ps = [torch.randn(33) for _ in range(2)]
    fs = [torch.rand(33) for _ in range(2)]
    compiled = torch.compile(lambda a, b, c, d: ops.fisher_merge([a * 2, b], [c, d], fallback="average") + 1,
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*ps, *fs), ops.fisher_merge([ps[0] * 2, ps[1]], fs, fallback="average") + 1)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512", "avx512bf16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_are_exact_for_every_bit_pattern(dtype, isa, monkeypatch):
    # The CPU kernels convert fp16 / bf16 <-> fp32 with their own code (branch-free scalar code the compiler
    # vectorises; F16C / AVX-512 conversions for fp16 in the wider builds): every one of the 65536 values must
    # round-trip (NaN stays NaN), and fp32 results must round to nearest even exactly as torch does, including
    # overflow to inf and subnormal results. Every compiled instruction set, every element-wise op and dare.
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)

    def same_bits(got, want):
        assert torch.equal(got.isnan(), want.isnan())
        fin = ~want.isnan()
        assert torch.equal(got[fin].view(torch.int16), want[fin].view(torch.int16))

    same_bits(ops.weighted_sum([allbits], [1.0]), ops.weighted_sum_reference([allbits], [1.0]))
    same_bits(ops.weighted_sum([allbits], [1.0], allbits), ops.weighted_sum_reference([allbits], [1.0], allbits))
    ok = ~allbits.isnan()
    gen = torch.Generator().manual_seed(5)
    a = allbits[ok][torch.randperm(int(ok.sum()), generator=gen)]
    b = allbits[ok][torch.randperm(int(ok.sum()), generator=gen)]
    for w in (1.0, 0.3, 1e-3, 7.0):
        same_bits(ops.weighted_sum([a, b], [w, 1.0]), ops.weighted_sum_reference([a, b], [w, 1.0]))
    ones = torch.ones_like(allbits)  # single roundings only (several products could differ by an FMA contraction)
    same_bits(ops.fisher_merge([allbits], [ones]), ops.fisher_merge_reference([allbits], [ones]))
    same_bits(ops.dfmerge_combine(a, [b], [ones[ok]], [0.5]), ops.dfmerge_combine_reference(a, [b], [ones[ok]], [0.5]))
    for p in (0.0, 0.3):
        same_bits(ops.dare(allbits, p, 3), ops.dare_reference(allbits, p, 3))


# ------------------------------------------------------------------------------------------------
# out=: the result is written into the caller's buffer, equal to the functional op
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fallback", ["target", "average"])
def test_out_variants_write_the_functional_result(dtype, fallback):
    gen = torch.Generator().manual_seed(11)
    ps = [torch.randn(33, 65, generator=gen).to(dtype) for _ in range(3)]
    fs = [torch.rand(33, 65, generator=gen).to(dtype) for _ in range(3)]
    fs[0][:4] = 0
    fs[1][:4] = 0
    fs[2][:4] = 0  # a zero-Fisher region: the fallback runs there too
    cases = [
        (lambda **kw: ops.weighted_sum(ps, [0.2, -1.0, 0.7], ps[0], **kw)),
        (lambda **kw: ops.fisher_merge(ps, fs, [0.2, 0.3, 0.5], fallback=fallback, **kw)),
        (lambda **kw: ops.dfmerge_combine(ps[0], ps[1:], fs[1:], [0.4, 0.6], **kw)),
    ]
    for fn in cases:
        buf = torch.full((33, 65), float("nan"), dtype=dtype)
        got = fn(out=buf)
        assert got is buf
        torch.testing.assert_close(buf, fn(), rtol=0, atol=0)


def test_out_must_match_and_be_contiguous():
    ps = [torch.randn(4, 6) for _ in range(2)]
    with pytest.raises(ValueError, match=r"out: shape \(6, 4\) does not match params\[0\] shape \(4, 6\)"):
        ops.fisher_merge(ps, ps, out=torch.empty(6, 4))
    with pytest.raises(ValueError, match="out: dtype torch.bfloat16 does not match tensors"):
        ops.weighted_sum(ps, [1.0, 1.0], out=torch.empty(4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out: must be contiguous"):
        ops.dfmerge_combine(ps[0], ps, ps, [1.0, 1.0], out=torch.empty(6, 4).t())
    with pytest.raises(RuntimeError, match="fisher_merge: out: shape"):  # the C++ check, for LibTorch callers
        torch.ops.pymerge.fisher_merge_out(ps, ps, [0.5, 0.5], 1e-8, "target", torch.empty(3))


# ------------------------------------------------------------------------------------------------
# every compiled instruction set (base / AVX2 / AVX-512 kernels, capped by PYMERGE_CPU_ISA) against the references
# ------------------------------------------------------------------------------------------------
ISAS = ["base", "avx2", "avx512", "avx512bf16"]  # a cap above what the CPU has runs the best it has: still a valid check


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_matches_the_references(isa, dtype, monkeypatch):
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(seed_of(isa, str(dtype)))
    for shape, m in [((5001,), 1), ((5001,), 3), ((70_001,), 4), ((3, 1111), 6), ((1000,), 16)]:
        pre = rand(shape, dtype, gen)
        ts = [rand(shape, dtype, gen) for _ in range(m)]
        fs = [rand(shape, dtype, gen, positive=True) for _ in range(m)]
        zero_region(fs)
        w = torch.rand(m, generator=gen).tolist()
        close(ops.weighted_sum(ts, w, pre), ops.weighted_sum_reference(ts, w, pre))
        close(ops.weighted_sum(ts, w), ops.weighted_sum_reference(ts, w))
        for fb in ("target", "average"):
            close(ops.fisher_merge(ts, fs, w, fallback=fb), ops.fisher_merge_reference(ts, fs, w, fallback=fb))
        if dtype != torch.float32:
            fs32 = [f.float() for f in fs]
            close(ops.fisher_merge(ts, fs32, w), ops.fisher_merge_reference(ts, fs32, w))
            close(ops.dfmerge_combine(pre, ts, fs32, w), ops.dfmerge_combine_reference(pre, ts, fs32, w))
        close(ops.dfmerge_combine(pre, ts, fs, w), ops.dfmerge_combine_reference(pre, ts, fs, w))
        close(ops.ties_merge(pre, ts, 0.3, 0.8), ops.ties_merge_reference(pre, ts, 0.3, 0.8))
        assert torch.equal(ops.dare(ts[0], 0.4, 99), ops.dare_reference(ts[0], 0.4, 99))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_on_tails_strides_and_out(isa, dtype, monkeypatch):
    # Lengths around the vector widths (8 / 16), the fp16 staging sub-block (256) and the block (1024), odd
    # parallel chunk boundaries (100_003 on two threads), non-contiguous inputs, out=, fp32 Fishers, M <= 4 (one
    # group, written straight to the output) and M > 4.
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(seed_of("tails", isa, str(dtype)))
    for n, m in [(1, 1), (15, 2), (17, 4), (255, 3), (257, 5), (1029, 4), (3 * 1024 + 7, 9), (100_003, 4)]:
        noncontig = n % 2 == 1 and m % 2 == 1
        pre = rand((n,), dtype, gen, noncontig=noncontig)
        ts = [rand((n,), dtype, gen, noncontig=noncontig) for _ in range(m)]
        fs = [rand((n,), dtype, gen, positive=True) for _ in range(m)]
        zero_region(fs)
        w = (torch.rand(m, generator=gen) - 0.3).tolist()
        buf = torch.full((n,), float("nan"), dtype=dtype)
        close(ops.weighted_sum(ts, w, pre), ops.weighted_sum_reference(ts, w, pre))
        close(ops.weighted_sum(ts, w, out=buf), ops.weighted_sum_reference(ts, w))
        for fb in ("target", "average"):
            wf = [abs(x) + 0.1 for x in w]
            close(ops.fisher_merge(ts, fs, wf, fallback=fb, out=buf), ops.fisher_merge_reference(ts, fs, wf, fallback=fb))
            fs32 = [f.float() for f in fs]
            close(ops.fisher_merge(ts, fs32, wf, fallback=fb), ops.fisher_merge_reference(ts, fs32, wf, fallback=fb))
        close(ops.dfmerge_combine(pre, ts, fs, w, out=buf), ops.dfmerge_combine_reference(pre, ts, fs, w))
        close(ops.dfmerge_combine(pre, ts, [f.float() for f in fs], w),
              ops.dfmerge_combine_reference(pre, ts, [f.float() for f in fs], w))
        for p in (0.0, 0.5, 0.9, 1 - 2**-30):  # the last: threshold 2^24, every element dropped
            assert torch.equal(ops.dare(ts[0], p, n), ops.dare_reference(ts[0], p, n)), (n, p)


@pytest.mark.parametrize("isa", ISAS)
def test_dare_mask_is_the_same_on_every_instruction_set(isa, monkeypatch):
    # The mask depends only on (seed, index): every build, every thread count, odd chunk starts.
    t = torch.randn(100_003)
    want = ops.dare_reference(t, 0.7, -5)
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(ops.dare(t, 0.7, -5), want)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "heavy_tail", "few_values", "extremes"])
def test_ties_sampled_selection_is_exact(isa, dtype, kind, monkeypatch):
    # Above 131072 elements the k-th largest magnitude is bracketed by a sample and selected among the keys in
    # that band; few_values puts most keys in one band (the band overflows: exact radix fallback).
    monkeypatch.setenv("PYMERGE_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(seed_of(isa, str(dtype), kind))
    n = 300_007
    def make():
        if kind == "normal":
            return torch.randn(n, generator=gen)
        if kind == "heavy_tail":
            return torch.randn(n, generator=gen) ** 5
        if kind == "few_values":
            return torch.randint(-3, 4, (n,), generator=gen).float()
        t = torch.randn(n, generator=gen)  # large magnitudes, zeros and fp16 subnormals
        t[torch.randint(0, n, (50,), generator=gen)] = -6e4
        t[torch.randint(0, n, (5000,), generator=gen)] = 0.0
        t[torch.randint(0, n, (5000,), generator=gen)] = 3e-7
        return t
    pre = torch.randn(n, generator=gen).to(dtype)
    ts = [make().to(dtype) for _ in range(3)]
    for density in (0.0001, 0.2, 0.9, 1.0):
        close(ops.ties_merge(pre, ts, density, 1.0), ops.ties_merge_reference(pre, ts, density, 1.0))


def test_bad_instruction_set_cap_is_named(monkeypatch):
    monkeypatch.setenv("PYMERGE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="PYMERGE_CPU_ISA"):
        ops.weighted_sum([torch.ones(3)], [1.0])


# ------------------------------------------------------------------------------------------------
# None weights at the raw op level (schema float[]?): 1/M each, as the Python wrappers' default
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_ops_take_none_weights_as_uniform(dtype):
    gen = torch.Generator().manual_seed(21)
    ps = [rand((3, 50), dtype, gen) for _ in range(3)]
    fs = [rand((3, 50), dtype, gen, positive=True) for _ in range(3)]
    uniform = [1 / 3] * 3
    for fb in ("target", "average"):
        got = torch.ops.pymerge.fisher_merge(ps, fs, None, 1e-8, fb)
        close(got, ops.fisher_merge_reference(ps, fs, uniform, 1e-8, fb))
        buf = torch.empty_like(ps[0])
        torch.ops.pymerge.fisher_merge_out(ps, fs, None, 1e-8, fb, buf)
        assert torch.equal(buf, got)
    got = torch.ops.pymerge.weighted_sum(ps, None, ps[0])
    close(got, ops.weighted_sum_reference(ps, uniform, ps[0]))
    buf = torch.empty_like(ps[0])
    torch.ops.pymerge.weighted_sum_out(ps, None, None, buf)
    close(buf, ops.weighted_sum_reference(ps, uniform))
    close(ops.weighted_sum(ps), ops.weighted_sum_reference(ps, uniform))
    metas = [p.to("meta") for p in ps]
    assert torch.ops.pymerge.fisher_merge(metas, metas, None, 1e-8, "target").shape == (3, 50)
    # given weights are still counted against the models
    with pytest.raises(RuntimeError, match="weights: expected 3 values"):
        torch.ops.pymerge.fisher_merge(ps, fs, [0.5, 0.5], 1e-8, "target")
