"""sq_grad_accumulate (compiled) against its plain reference and against per-example gradients built by hand."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge import ops


def _by_hand(z, g, w):
    """Σ_n w_n (Z_nᵀ G_n)², one example at a time, in float64."""
    out = torch.zeros(z.shape[-1], g.shape[-1], dtype=torch.float64)
    for n in range(z.shape[0]):
        zn = z[n].double().reshape(-1, z.shape[-1])
        gn = g[n].double().reshape(-1, g.shape[-1])
        out += (1.0 if w is None else float(w[n])) * (zn.T @ gn) ** 2
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), t=st.integers(1, 5), d=st.integers(1, 9), k=st.integers(1, 9),
       weighted=st.booleans(), two_d=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference_and_by_hand(n, t, d, k, weighted, two_d, seed):
    gen = torch.Generator().manual_seed(seed)
    shape_z, shape_g = ((n, d), (n, k)) if (two_d and t == 1) else ((n, t, d), (n, t, k))
    z, g = torch.randn(shape_z, generator=gen), torch.randn(shape_g, generator=gen)
    w = torch.rand(n, generator=gen) if weighted else None
    start = torch.rand(d, k, generator=gen)
    got, ref = start.clone(), start.clone()
    ops.sq_grad_accumulate(got, z, g, w)
    ops.sq_grad_accumulate_reference(ref, z, g, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), start.double() + _by_hand(z, g, w), rtol=1e-5, atol=1e-5)


def test_not_the_square_of_the_batch_gradient():
    # The peers' bug: (Σ_n Z_nᵀ G_n)² has cross terms between examples and is not the per-example Fisher.
    torch.manual_seed(0)
    z, g = torch.randn(8, 3, 5), torch.randn(8, 3, 4)
    ours = torch.zeros(5, 4)
    ops.sq_grad_accumulate(ours, z, g)
    batch_summed = (torch.einsum("ntd,ntk->dk", z, g)) ** 2
    assert not torch.allclose(ours, batch_summed, rtol=1e-2)
    torch.testing.assert_close(ours.double(), _by_hand(z, g, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 4])
def test_half_inputs_accumulate_in_fp32(dtype, t):
    torch.manual_seed(1)
    z, g = torch.randn(5, t, 7).to(dtype), torch.randn(5, t, 3).to(dtype)
    w = torch.rand(5)
    got = torch.zeros(7, 3)
    ops.sq_grad_accumulate(got, z, g, w)
    assert got.dtype == torch.float32
    # Exact products of the (rounded) half inputs, summed in float64: fp32 accumulation is that close.
    torch.testing.assert_close(got.double(), _by_hand(z.double(), g.double(), w), rtol=1e-5, atol=1e-5)


def test_chunking_under_a_small_memory_budget(monkeypatch):
    # 1 MiB budget and 300 x 300 fp32 per-example gradients: chunks of 2 examples, a ragged last chunk.
    monkeypatch.setenv("PYMERGE_SQ_GRAD_BUDGET_MB", "1")
    torch.manual_seed(2)
    z, g, w = torch.randn(5, 3, 300), torch.randn(5, 3, 300), torch.rand(5)
    got, ref = torch.zeros(300, 300), torch.zeros(300, 300)
    ops.sq_grad_accumulate(got, z, g, w)
    ops.sq_grad_accumulate_reference(ref, z, g, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_uses_the_compiled_kernel_and_passes_opcheck():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pymerge::sq_grad_accumulate", "CPU")
    z, g, w = torch.randn(3, 2, 4), torch.randn(3, 2, 5), torch.rand(3)
    torch.library.opcheck(torch.ops.pymerge.sq_grad_accumulate, (torch.zeros(4, 5), z, g, w))
    torch.library.opcheck(torch.ops.pymerge.sq_grad_accumulate, (torch.zeros(4, 5), z[:, :1], g[:, :1], None))


@pytest.mark.parametrize("bad, match", [
    (dict(fisher=torch.zeros(4, 5, dtype=torch.float64)), "fisher: expected a float32"),
    (dict(fisher=torch.zeros(5, 4)), "fisher: shape"),
    (dict(grad_outputs=torch.randn(3, 1, 5)), "disagree"),
    (dict(inputs=torch.randn(3, 2, 2, 4)), "inputs: expected"),
    (dict(weights=torch.rand(2)), "weights: expected"),
    (dict(inputs=torch.ones(3, 2, 4, dtype=torch.long)), "inputs: expected a floating-point"),
])
def test_bad_arguments_are_named(bad, match):
    args = dict(fisher=torch.zeros(4, 5), inputs=torch.randn(3, 2, 4), grad_outputs=torch.randn(3, 2, 5),
                weights=torch.rand(3))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.sq_grad_accumulate(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("t", [1, 6])
def test_cuda_matches_reference(t):
    torch.manual_seed(3)
    z, g, w = torch.randn(9, t, 33, device="cuda"), torch.randn(9, t, 17, device="cuda"), torch.rand(9, device="cuda")
    got, ref = torch.zeros(33, 17, device="cuda"), torch.zeros(33, 17, device="cuda")
    ops.sq_grad_accumulate(got, z.half(), g.half(), w)
    ops.sq_grad_accumulate_reference(ref, z.half(), g.half(), w)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
