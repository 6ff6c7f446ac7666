"""The batched conjugate-gradient solver and the merging objectives' matvecs, against dense references."""
import pytest
import torch

from pymerge import ops
from pymerge.solvers import (AverageObjective, DiagonalFisherObjective, GramObjective, KFACObjective,
                             conjugate_gradient, regmean_solve, scale_off_diagonal)
from pymerge.solvers.closed_form import StatisticsError, check_spd_factors


def spd(n, batch=(), cond=10.0, dtype=torch.float64, g=None):
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=dtype, generator=g))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=dtype)
    return q @ torch.diag_embed(ev.expand(*batch, n)) @ q.transpose(-1, -2)


def gram(n_rows, d, bias=True, g=None, dtype=torch.float64):
    z = torch.randn(n_rows, d, generator=g, dtype=dtype)
    if bias:
        z = torch.cat([z, torch.ones(n_rows, 1, dtype=dtype)], 1)
    return z.T @ z / n_rows


def test_cg_matches_linalg_solve_on_a_batch_of_random_spd_systems():
    g = torch.Generator().manual_seed(0)
    a = spd(12, (5,), cond=50.0, g=g)
    b = torch.randn(5, 12, dtype=torch.float64, generator=g)
    res = conjugate_gradient(lambda x: (a @ x.unsqueeze(-1)).squeeze(-1), b, iterations=200, tolerance=1e-12)
    ref = torch.linalg.solve(a, b)
    torch.testing.assert_close(res.x, ref, rtol=1e-9, atol=1e-9)
    assert bool(res.converged.all())
    assert res.residuals.shape == (res.iterations + 1, 5)
    assert res.iterations <= 30  # exact arithmetic needs <= 12 steps; rounding may add a few


def test_cg_stops_each_system_at_its_tolerance_and_respects_the_budget():
    g = torch.Generator().manual_seed(1)
    a = torch.stack([torch.eye(6, dtype=torch.float64) * 3, spd(6, cond=1e4, g=g)])
    b = torch.randn(2, 6, dtype=torch.float64, generator=g)
    res = conjugate_gradient(lambda x: (a @ x.unsqueeze(-1)).squeeze(-1), b, iterations=3, tolerance=1e-10)
    assert res.iterations == 3
    assert bool(res.converged[0]) and not bool(res.converged[1])
    torch.testing.assert_close(res.x[0], b[0] / 3)
    # the identity system froze after one step: its residual history stays flat
    assert torch.all(res.residuals[1:, 0] == res.residuals[1, 0])


def test_cg_from_the_solution_takes_no_step_and_zero_rhs_returns_zero():
    a = spd(4, (2,), g=torch.Generator().manual_seed(2))
    b = torch.randn(2, 4, dtype=torch.float64)
    b[1] = 0
    mv = lambda x: (a @ x.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    x_star = torch.linalg.solve(a, b)
    res = conjugate_gradient(mv, b, x0=x_star, iterations=10, tolerance=1e-8)
    assert res.iterations == 0
    torch.testing.assert_close(res.x, x_star)
    assert torch.all(conjugate_gradient(mv, b, iterations=10).x[1] == 0)


def test_cg_rejects_bad_arguments():
    b = torch.ones(2, 3)
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(lambda x: x, b, x0=torch.ones(3))
    with pytest.raises(ValueError, match="batch"):
        conjugate_gradient(lambda x: x, torch.ones(3))
    with pytest.raises(ValueError, match="iterations"):
        conjugate_gradient(lambda x: x, b, iterations=-1)


def models(m, shape, g, dtype=torch.float64):
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(m)]


def test_averaging_objective_returns_the_weighted_average():
    g = torch.Generator().manual_seed(3)
    th = models(3, (4, 5, 6), g)
    w = [1.0, 2.0, 0.5]
    obj = AverageObjective(th, w, dtype=torch.float64)
    res = conjugate_gradient(obj.matvec, obj.b, th[0], iterations=5, constant=obj.constant)
    ref = sum(wi * t for wi, t in zip(w, th)) / sum(w)
    torch.testing.assert_close(res.x, ref)
    assert res.iterations == 1  # A is a multiple of I: one step


def test_diagonal_fisher_objective_converges_to_fisher_merge():
    g = torch.Generator().manual_seed(4)
    th = models(3, (2, 7, 5), g, torch.float32)
    fi = [torch.rand(2, 7, 5, generator=g) + 0.05 for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    obj = DiagonalFisherObjective(th, fi, w)
    res = conjugate_gradient(obj.matvec, obj.b, iterations=100, tolerance=1e-7)
    ref = torch.stack([ops.fisher_merge([t[i] for t in th], [f[i] for f in fi], w) for i in range(2)])
    torch.testing.assert_close(res.x, ref, rtol=1e-5, atol=1e-5)


def test_objective_value_is_the_merging_loss_and_cg_reports_it():
    g = torch.Generator().manual_seed(5)
    th = models(2, (3, 4, 6), g)
    grams = [torch.stack([gram(20, 5, g=g) for _ in range(3)]) for _ in range(2)]
    obj = GramObjective(th, grams, [1.0, 2.0], dtype=torch.float64)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    loss = sum(0.5 * wi * ((x - t) @ gm * (x - t)).flatten(1).sum(1) for wi, t, gm in zip([1.0, 2.0], th, grams))
    torch.testing.assert_close(obj.value(x), loss)
    res = conjugate_gradient(obj.matvec, obj.b, x, iterations=4, constant=obj.constant)
    for k in range(res.iterations + 1):
        assert torch.all(res.objectives[k] >= -1e-9)
    torch.testing.assert_close(res.objectives[-1], obj.value(res.x))
    assert torch.all(res.objectives[1:] <= res.objectives[:-1] + 1e-12)  # CG decreases the quadratic


def test_regmean_objective_cg_reaches_at_most_the_closed_forms_objective():
    g = torch.Generator().manual_seed(6)
    th = models(3, (2, 8, 11), g)
    grams = [torch.stack([gram(30, 10, g=g) for _ in range(2)]) for _ in range(3)]
    for alpha in (0.9, 1.0):
        closed = regmean_solve(th, grams, alpha=0.9)
        obj = GramObjective(th, [scale_off_diagonal(gm, alpha) for gm in grams], dtype=torch.float64)
        init = sum(th) / 3
        res = conjugate_gradient(obj.matvec, obj.b, init, iterations=100, tolerance=1e-12, constant=obj.constant)
        assert torch.all(res.objectives[-1] <= obj.value(closed) + 1e-9)
        if alpha == 0.9:  # same objective: CG finds the closed form
            torch.testing.assert_close(res.x, closed, rtol=1e-6, atol=1e-6)
        else:  # the unscaled objective (MaTS' choice): strictly better than RegMean's α = 0.9 solution
            assert torch.all(res.objectives[-1] < obj.value(closed))


def test_kfac_matvec_equals_the_explicit_kronecker_product():
    g = torch.Generator().manual_seed(7)
    k, d, m = 3, 5, 2
    th = models(m, (1, k, d), g)
    a_in = [gram(20, d - 1, g=g).unsqueeze(0) for _ in range(m)]
    g_out = [gram(20, k, bias=False, g=g).unsqueeze(0) for _ in range(m)]
    w = [0.7, 1.3]
    obj = KFACObjective(th, a_in, g_out, w, dtype=torch.float64)
    dense = sum(wi * torch.kron(go[0], ai[0]) for wi, go, ai in zip(w, g_out, a_in))  # row-major vec(X)
    x = torch.randn(1, k, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(obj.matvec(x).reshape(-1), dense @ x.reshape(-1))
    b = sum(wi * torch.kron(go[0], ai[0]) @ t.reshape(-1) for wi, go, ai, t in zip(w, g_out, a_in, th))
    torch.testing.assert_close(obj.b.reshape(-1), b)
    res = conjugate_gradient(obj.matvec, obj.b, iterations=200, tolerance=1e-12)
    torch.testing.assert_close(res.x.reshape(-1), torch.linalg.solve(dense, b), rtol=1e-7, atol=1e-7)


def regmean_reference(thetas, grams, alpha):
    """float64, one layer, straight from the paper (explicit inverse is fine for a reference)."""
    gt = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    return sum(t @ g for t, g in zip(thetas, gt)) @ torch.linalg.inv(sum(gt))


def test_regmean_solve_equals_a_float64_reference_for_fp32_inputs():
    g = torch.Generator().manual_seed(8)
    th = models(4, (6, 9), g, torch.float32)
    grams = [gram(40, 8, g=g).float() for _ in range(4)]
    out = regmean_solve(th, grams, alpha=0.9)
    assert out.dtype == torch.float64
    ref = regmean_reference([t.double() for t in th], [x.double() for x in grams], 0.9)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_statistics_get_errors_naming_the_layer():
    g = torch.Generator().manual_seed(9)
    th = models(2, (3, 4), g)
    good = gram(10, 3, g=g)
    bad = good.clone()
    bad[0, 1] = bad[1, 0] = 10 * float(bad[0, 0].abs() + bad[1, 1].abs())  # symmetric, not PSD
    with pytest.raises(StatisticsError, match=r"encoder\.layer\.0\.dense \(model 1\).*positive semi-definite"):
        regmean_solve(th, [good, bad], label="encoder.layer.0.dense")
    nan = good.clone()
    nan[2, 2] = float("nan")
    with pytest.raises(StatisticsError, match="fc1 .*NaN"):
        regmean_solve(th, [nan, good], label="fc1")
    with pytest.raises(StatisticsError, match="fc1.*shape"):
        regmean_solve(th, [good[:3, :3], good], label="fc1")
    with pytest.raises(StatisticsError, match="symmetric"):
        check_spd_factors(good + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1), "x")
    zero = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(StatisticsError, match="singular.*ridge"):
        regmean_solve(th, [zero, zero], label="fc1")


def test_gram_objective_in_its_eigenbasis_takes_the_same_cg_steps():
    g = torch.Generator().manual_seed(10)
    th = models(3, (4, 7, 9), g)
    grams = [torch.stack([gram(12, 8, g=g) for _ in range(4)]) for _ in range(3)]
    obj = GramObjective(th, grams, [1.0, 0.5, 2.0], dtype=torch.float64)
    x0 = sum(th) / 3
    plain = conjugate_gradient(obj.matvec, obj.b, x0, iterations=15, tolerance=0.0, constant=obj.constant)
    rot = obj.in_eigenbasis()
    fast = conjugate_gradient(rot.matvec, rot.b, rot.to_basis(x0), iterations=15, tolerance=0.0,
                              constant=rot.constant)
    torch.testing.assert_close(rot.from_basis(fast.x), plain.x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fast.residuals, plain.residuals, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(fast.objectives, plain.objectives, rtol=1e-9, atol=1e-12)


def test_fp32_rounding_of_a_low_rank_psd_factor_is_not_an_error():
    """An fp32 average of outer products with a concentrated spectrum (nearly equal columns, like real K-FAC G
    factors) has rounding eigenvalues below -1e-6 · max diag; it is PSD and must pass. A clearly negative
    eigenvalue of the same size still fails."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 1, generator=g) * torch.ones(1, 384) + 0.01 * torch.randn(40, 384, generator=g)
    m = (z.T @ z / 40).float()
    e = torch.linalg.eigvalsh(m.double())
    assert e.min() < -1e-6 * m.diagonal().max()  # the case the old max-diagonal tolerance refused
    check_spd_factors(m, "layer.5.output.dense", "kfac_out matrix")
    v = torch.randn(384, 1, generator=g, dtype=torch.float64)
    v /= v.norm()
    bad = m.double() - 1e-2 * float(e.max()) * (v @ v.T)  # an eigenvalue of about -1e-2 λ_max
    with pytest.raises(StatisticsError, match="layer.5.output.dense: kfac_out matrix is not positive"):
        check_spd_factors(bad, "layer.5.output.dense", "kfac_out matrix")
