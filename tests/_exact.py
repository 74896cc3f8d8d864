"""Exact comparison for the kernel tests."""

import torch


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exact equality, NaN == NaN at the same positions (torch's own fp32 -> bf16 NaN bits vary by CPU path)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        a, b = a[~torch.isnan(a)], b[~torch.isnan(b)]
    assert torch.equal(a, b)
