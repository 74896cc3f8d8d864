"""TopK by magnitude: Triton radix select (interpreted on CPU) == torch reference == a stable-sort oracle."""

import math

import pytest
import torch
from _exact import assert_same as _assert_same

from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.topk import topk_scatter, topk_scatter_ref, topk_select, topk_select_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_suite_runs_the_triton_kernels():
    # Without the interpreter every comparison below would compare the reference with itself.
    assert _dispatch.INTERPRET


def _oracle(x, k):
    """Independent of both implementations: a stable descending sort keeps equal magnitudes in index order,
    and torch sorts NaN above every number."""
    flat = x.reshape(-1)
    idx = torch.sort(flat.abs().float(), descending=True, stable=True).indices[:k]
    idx = idx.sort().values
    return flat[idx], idx


def _check(x, k):
    values, indices = topk_select(x, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.shape == indices.shape == (k,)
    for other in (topk_select_ref(x, k), _oracle(x, k)):
        assert torch.equal(indices, other[1])
        _assert_same(values, other[0])
    # The same set as torch.topk: identical multiset of magnitudes.
    if k:
        top = torch.topk(x.reshape(-1).abs().float(), k).values
        _assert_same(values.abs().float().sort().values, top.sort().values)
    return values, indices


def _data(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    if n > 64:  # magnitudes spanning the whole exponent range, subnormals of every dtype included
        x[:64] = torch.randn(64, generator=g) * torch.logspace(-44, 4, 64)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_and_oracle(dtype):
    # Sizes around the 4096-element tile; k from 1 to all, including k not dividing anything.
    for n in (1, 7, 1000, 4095, 4097, 20001):
        x = _data(n, dtype, seed=n)
        for k in sorted({1, 3, n // 10, n // 2 + 1, n - 1, n}):
            if 0 < k <= n:
                _check(x, k)


def test_large_input():
    x = _data(65536, torch.float32, seed=1)
    for k in (1, 6553, 65535):
        _check(x, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lower_index(dtype):
    g = torch.Generator().manual_seed(0)
    few = torch.randint(-3, 4, (20001,), generator=g).to(dtype)  # 7 values: huge tie groups, +-v tie
    for k in (1, 5, 2900, 5000, 8600, 14000, 20000):
        values, indices = _check(few, k)
    ones = torch.ones(9000, dtype=dtype)
    ones[1::2] = -1
    values, indices = _check(ones, 4500)
    assert torch.equal(indices, torch.arange(4500))  # all tie: the first k
    zeros = torch.zeros(9000, dtype=dtype)
    zeros[::3] = -0.0  # -0.0 ties with 0.0
    values, indices = _check(zeros, 17)
    assert torch.equal(indices, torch.arange(17))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_ranks_first_and_inf_next(dtype):
    x = _data(10000, dtype, seed=3)
    nan_at, inf_at = [17, 4096, 9999], [0, 5000]
    x[nan_at] = math.nan
    x[0] = -math.inf
    x[5000] = math.inf
    _, indices = _check(x, 3)
    assert indices.tolist() == nan_at  # NaN is never silently dropped
    values, indices = _check(x, 5)
    assert indices.tolist() == sorted(nan_at + inf_at)
    assert values[0].item() == -math.inf  # signs are kept
    _check(x, 4000)
    all_nan = torch.full((5000,), math.nan, dtype=dtype)
    _, indices = _check(all_nan, 10)
    assert torch.equal(indices, torch.arange(10))


def test_k_zero_and_empty_input():
    for x in (torch.randn(100), torch.randn(0), torch.randn(0, 3).bfloat16()):
        for fn in (topk_select, topk_select_ref):
            values, indices = fn(x, 0)
            assert values.shape == indices.shape == (0,)
            assert values.dtype == x.dtype and indices.dtype == torch.int64
        out = topk_scatter(values, indices, x.numel(), x.dtype)
        assert torch.equal(out, torch.zeros(x.numel(), dtype=x.dtype))


def test_non_contiguous_input_reads_row_major():
    x = _data(60 * 70, torch.float32, seed=5).view(60, 70)
    for view in (x.t(), x[:, ::2]):
        assert not view.is_contiguous()
        values, indices = _check(view, 333)
        assert torch.equal(values, view.reshape(-1)[indices])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_round_trip_keeps_exactly_the_selected_entries(dtype):
    x = _data(20001, dtype, seed=7)
    x[[5, 6000]] = math.nan
    for k in (1, 2000, 20001):
        values, indices = topk_select(x, k)
        dense = topk_scatter(values, indices, x.numel(), dtype)
        _assert_same(dense, topk_scatter_ref(values, indices, x.numel(), dtype))
        kept = torch.zeros(x.numel(), dtype=torch.bool)
        kept[indices] = True
        expected = torch.where(kept, x, torch.zeros((), dtype=dtype))
        _assert_same(dense, expected)
    # Casting on the way out rounds to nearest even on both paths (fp32 sources have bits to round off).
    values, indices = topk_select(x, 2000)
    for source in (values, values.float() * 1.1):
        for out_dtype in DTYPES:
            _assert_same(topk_scatter(source, indices, x.numel(), out_dtype),
                         topk_scatter_ref(source, indices, x.numel(), out_dtype))


def test_bad_arguments_name_the_argument():
    x = torch.randn(10)
    for fn in (topk_select, topk_select_ref):
        for k in (11, -1, True, 2.0, None):
            with pytest.raises(ValueError, match="k must be"):
                fn(x, k)
        with pytest.raises(ValueError, match="x has dtype"):
            fn(torch.arange(10), 3)
    values, indices = topk_select(x, 3)
    for fn in (topk_scatter, topk_scatter_ref):
        with pytest.raises(ValueError, match="indices"):
            fn(values, indices.int(), 10, torch.float32)
        with pytest.raises(ValueError, match="indices"):
            fn(values, indices[:2], 10, torch.float32)
        with pytest.raises(ValueError, match="numel"):
            fn(values, indices, 2, torch.float32)
        with pytest.raises(ValueError, match="values has dtype"):
            fn(indices, indices, 10, torch.float32)
        with pytest.raises(ValueError, match="dtype"):
            fn(values, indices, 10, torch.int64)
