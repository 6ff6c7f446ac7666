"""The CUDA merge ops against the CPU kernels and the references (skipped without a GPU)."""
import pytest
import torch

from pymerge import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# GPU division / rounding may differ from the CPU by an fp32 ulp, which can flip the last fp16 / bf16 bit.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
SHAPE_M = [((0,), 2), ((1,), 1), ((7, 13), 3), ((7, 13), 16), ((100_003,), 4)]


def close(got, want):
    assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want.cpu(), **TOL[want.dtype])


def rand(shape, dtype, seed, positive=False, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    full = (shape[0] * 2,) + tuple(shape[1:]) if noncontig else shape
    t = torch.randn(full, generator=g)
    t = (t.abs() if positive else t).to(dtype).cuda()
    return t[::2] if noncontig else t  # sliced on the GPU: a strided view


def test_cuda_kernels_are_used():
    assert ops._extension.has_cuda_kernels()
    for name in ("weighted_sum", "fisher_merge", "dfmerge_combine", "ties_merge", "dare"):
        assert ops._use_kernel(name, torch.zeros(1, device="cuda")), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
@pytest.mark.parametrize("fallback", ["target", "average"])
def test_fisher_merge_cuda_matches_cpu(dtype, shape, m, fallback):
    params = [rand(shape, dtype, i, noncontig=(m == 3)) for i in range(m)]
    fishers = [rand(shape, dtype, 100 + i, positive=True) for i in range(m)]
    for f in fishers:
        f.view(-1)[: f.numel() // 3] = 0  # zero-Fisher region: the fallback
    w = [0.1 * (i + 1) for i in range(m)]
    got = ops.fisher_merge(params, fishers, w, fallback=fallback)
    close(got, ops.fisher_merge([p.cpu() for p in params], [f.cpu() for f in fishers], w, fallback=fallback))
    close(got, ops.fisher_merge_reference(params, fishers, w, 1e-8, fallback))


@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16])
def test_fisher_merge_cuda_fp32_fishers(pdtype):
    params = [rand((513,), pdtype, i) for i in range(3)]
    fishers = [rand((513,), torch.float32, 10 + i, positive=True) * 1e-9 for i in range(3)]
    close(ops.fisher_merge(params, fishers, eps=0.0), ops.fisher_merge_reference(params, fishers, None, 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
def test_dfmerge_and_weighted_sum_cuda_match_cpu(dtype, shape, m):
    pre = rand(shape, dtype, 0)
    taus = [rand(shape, dtype, 1 + i, noncontig=(m == 3)) for i in range(m)]
    fishers = [rand(shape, dtype, 50 + i, positive=True) for i in range(m)]
    for f in fishers:
        f.view(-1)[: f.numel() // 3] = 0
    lam = [0.2 * (i + 1) for i in range(m)]
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
    close(ops.dfmerge_combine(pre, taus, fishers, lam), ops.dfmerge_combine(pre.cpu(), cpu(taus), cpu(fishers), lam))
    close(ops.weighted_sum(taus, lam, pre), ops.weighted_sum(cpu(taus), lam, pre.cpu()))
    close(ops.weighted_sum(taus, lam), ops.weighted_sum_reference(taus, lam))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", SHAPE_M)
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_ties_merge_cuda_matches_cpu(dtype, shape, m, density):
    pre = rand(shape, dtype, 0)
    taus = [rand(shape, dtype, 1 + i, noncontig=(m == 3)) for i in range(m)]
    got = ops.ties_merge(pre, taus, density, 0.7)
    close(got, ops.ties_merge(pre.cpu(), [t.cpu() for t in taus], density, 0.7))
    close(got, ops.ties_merge_reference(pre, taus, density, 0.7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (100_003,)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dare_mask_identical_on_cpu_and_cuda(dtype, shape, p):
    t = rand(shape, dtype, 3, noncontig=(p == 0.3))
    got = ops.dare(t, p, seed=-77)
    assert torch.equal(got.cpu(), ops.dare(t.cpu(), p, seed=-77))
    assert torch.equal(got.cpu(), ops.dare_reference(t.cpu(), p, -77))


def test_cuda_ops_run_on_the_current_stream_and_device():
    s = torch.cuda.Stream()
    p = [torch.randn(4096, device="cuda") for _ in range(2)]
    f = [torch.rand(4096, device="cuda") for _ in range(2)]
    with torch.cuda.stream(s):
        out = ops.fisher_merge(p, f)
    s.synchronize()
    close(out, ops.fisher_merge_reference(p, f))


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match=r"params\[1\]: device cpu does not match params\[0\] device cuda"):
        ops.fisher_merge([torch.zeros(3, device="cuda"), torch.zeros(3)], [torch.zeros(3)] * 2)


def test_opcheck_cuda():
    ps = [torch.randn(5, 7, device="cuda") for _ in range(3)]
    fs = [torch.rand(5, 7, device="cuda") for _ in range(3)]
    torch.library.opcheck(torch.ops.pymerge.fisher_merge.default, (ps, fs, [0.2, 0.3, 0.5], 1e-8, "average"))
    torch.library.opcheck(torch.ops.pymerge.ties_merge.default, (ps[0], ps[1:], 0.3, 1.0))
    torch.library.opcheck(torch.ops.pymerge.dare.default, (ps[0], 0.4, 17))
