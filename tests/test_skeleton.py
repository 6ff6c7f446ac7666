import torch

from pymerge import ops


def test_weighted_sum_matches_reference():
    torch.manual_seed(0)
    ts = [torch.randn(17, 5) for _ in range(3)]
    base = torch.randn(17, 5)
    got = ops.weighted_sum(ts, [0.2, -1.0, 3.0], base)
    torch.testing.assert_close(got, ops.weighted_sum_reference(ts, [0.2, -1.0, 3.0], base))
