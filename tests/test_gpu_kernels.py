"""The Triton kernels on a CUDA GPU against the torch references on CPU, bit for bit (issue 10, STYLE 2 and 16).

GPU-marked: skipped without a CUDA device, and skipped when ``TRITON_INTERPRET=1`` (the suite's default, which would
run the kernels interpreted on host copies instead of on the GPU). ``make gpu-check`` runs this file with
``TRITON_INTERPRET=0``. Sizes cross several programs (8192-element tiles, 4096-element blocks) and use
unaligned slices; the references are the CPU path, so equality here is the GPU-bits policy of
kernels/_dispatch.py holding on real hardware.
"""

from __future__ import annotations

import math

import pytest
import torch
from _exact import assert_same

from distlion_ds.kernels import _dispatch, dequantize, dequantize_ref, lion, quantize, quantize_ref, signs, topk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_dispatch.INTERPRET, reason="TRITON_INTERPRET=1 would interpret the kernels on host copies; "
                                                   "run with TRITON_INTERPRET=0 (make gpu-check does)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N = 3 * 8192 * 8 + 1001  # several programs of every kernel, a ragged tail


def _data(n, dtype, seed, zeros=0.1, specials=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    x[torch.rand(n, generator=g) < zeros] = 0.0
    if specials:
        x[5], x[17], x[n // 2] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


def _cuda_slice(x, offset):
    """``x`` on the GPU starting ``offset`` elements into a buffer: unaligned when offset is not 0."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device="cuda")
    view = buf[offset:]
    view.copy_(x)
    return view


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_signs_on_gpu(dtype, offset):
    x = _data(N, dtype, 1)
    for step in (1, 2):
        packed = signs.pack_signs(_cuda_slice(x, offset), step=step)
        assert_same(packed.cpu(), signs.pack_signs_ref(x, step))
        assert_same(signs.unpack_signs(packed, N).cpu(), signs.unpack_signs_ref(packed.cpu(), N))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lion_votes_on_gpu(dtype):
    m = _data(N, torch.float32, 2, specials=False)
    g = _data(N, dtype, 3, specials=False)
    for grad in (g, None):
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        out, _ = lion.lion_votes(grad.cuda() if grad is not None else None, m.cuda(), 0.9, 3, nonfinite=flag)
        ref_flag = torch.zeros(1, dtype=torch.int32)
        ref, _ = lion.lion_votes_ref(grad, m, 0.9, 3, nonfinite=ref_flag)
        assert_same(out.cpu(), ref)
        assert int(flag) == int(ref_flag) == 0
    bad = g.clone()
    bad[N - 3] = float("nan")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    lion.lion_votes(bad.cuda(), m.cuda(), 0.9, 1, nonfinite=flag)
    assert int(flag) == 1


@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 8, 16, 17, 64, 127])
def test_vote_count_and_apply_on_gpu(n_ranks, aggregation):
    n = 4 * 8192 + 333
    n_bytes = math.ceil(n / 8)
    g = torch.Generator().manual_seed(n_ranks)
    votes = torch.randint(0, 256, (n_ranks, n_bytes + 16), dtype=torch.uint8, generator=g)
    recv = votes[:, 3:3 + n_bytes]  # strided rows, unaligned
    for elem_offset, step in ((0, 1), (8, 2)):
        agg = lion.vote_count(recv.cuda(), n_ranks, aggregation, step, elem_offset)
        agg_ref = lion.vote_count_ref(recv, n_ranks, aggregation, step, elem_offset)
        assert_same(agg.cpu(), agg_ref)
    for dtype in DTYPES:
        p0 = _data(n, dtype, 10 + n_ranks, specials=False)
        m0 = _data(n, torch.float32, 20 + n_ranks, specials=False)
        grad = _data(n, dtype, 30 + n_ranks, specials=False)
        seeds = [None, 7] if dtype == torch.bfloat16 else [None]
        for rounding_seed in seeds:
            for gr in (grad, None):
                pk, mk = _cuda_slice(p0, 1), m0.cuda()
                lion.lion_apply(pk, mk, gr.cuda() if gr is not None else None, agg_ref.cuda(), n_ranks, 3e-3, 0.1,
                                0.99, aggregation, rounding_seed=rounding_seed, elem_offset=16)
                pr, mr = p0.clone(), m0.clone()
                lion.lion_apply_ref(pr, mr, gr, agg_ref, n_ranks, 3e-3, 0.1, 0.99, aggregation,
                                    rounding_seed=rounding_seed, elem_offset=16)
                assert_same(pk.cpu(), pr)
                assert_same(mk.cpu(), mr)


@pytest.mark.parametrize("aggregation,n_ranks", [("mavo", 4), ("avg", 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_votes_and_apply_on_gpu(dtype, aggregation, n_ranks):
    """One launch per kind over a bucket of separately allocated tensors (full tiles unmasked and vectorised,
    ragged tails, one unaligned tensor, one without a gradient) == the CPU references per tensor."""
    sizes = [3 * 8192 * 8 + 1001, 8192 * 8, 1001, 13, 8, 0, 8192 * 8 + 5]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 8) * 8
    params = [_data(n, dtype, 40 + i, specials=False) for i, n in enumerate(sizes)]
    grads = [_data(n, dtype, 50 + i, specials=False) for i, n in enumerate(sizes)]
    grads[3] = None
    m0 = _data(total, torch.float32, 60, specials=False)
    g = torch.Generator().manual_seed(n_ranks)
    agg = torch.randint(0, 256, (lion.aggregate_bits(aggregation, n_ranks), total // 8), dtype=torch.uint8,
                        generator=g)  # Avg at N = 3: two planes, every count 0-3 valid
    grads_gpu = [_cuda_slice(gr, 1 if i == 2 else 0) if gr is not None else None for i, gr in enumerate(grads)]
    for step in (1, 2):
        out = torch.zeros(total // 8, dtype=torch.uint8, device="cuda")
        lion.lion_votes_multi(grads_gpu, sizes, offsets, m0.cuda(), 0.9, step, out)
        want = torch.zeros(total // 8, dtype=torch.uint8)
        for gr, n, off in zip(grads, sizes, offsets, strict=True):
            lion.lion_votes_ref(gr, m0[off: off + n], 0.9, step, out=want[off // 8: off // 8 + -(-n // 8)])
        assert_same(out.cpu(), want)
    for rounding_seed in ([None, 7] if dtype == torch.bfloat16 else [None]):
        pk, mk = [_cuda_slice(p, 1 if i == 2 else 0) for i, p in enumerate(params)], m0.cuda()
        lion.lion_apply_multi(pk, grads_gpu, offsets, mk, agg.cuda(), n_ranks, 3e-3, 0.1, 0.99, aggregation,
                              rounding_seed=rounding_seed)
        pr, mr = [p.clone() for p in params], m0.clone()
        for p, gr, off in zip(pr, grads, offsets, strict=True):
            n = p.numel()
            lion.lion_apply_ref(p, mr[off: off + n], gr, agg[:, off // 8: off // 8 + -(-n // 8)], n_ranks, 3e-3,
                                0.1, 0.99, aggregation, rounding_seed=rounding_seed, elem_offset=off)
        for got, ref in zip(pk, pr, strict=True):
            assert_same(got.cpu(), ref)
        assert_same(mk.cpu(), mr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_on_gpu(bits, dtype):
    x = _data(N, dtype, 40 + bits)
    for block_size, stochastic in ((256, False), (256, True), (8, True), (16384, False)):
        codes, scales = quantize(_cuda_slice(x, 1), bits, block_size, stochastic, seed=1234)
        codes_ref, scales_ref = quantize_ref(x, bits, block_size, stochastic, seed=1234)
        assert_same(codes.cpu(), codes_ref)
        assert_same(scales.cpu(), scales_ref)
        out = dequantize(codes, scales, bits, block_size, N, dtype)
        assert_same(out.cpu(), dequantize_ref(codes_ref, scales_ref, bits, block_size, N, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_on_gpu(dtype):
    x = _data(N, dtype, 50)
    x[100:140] = 2.5  # ties at the threshold for small k
    for k in (1, 40, N // 10, N - 1, N):
        values, indices = topk.topk_select(_cuda_slice(x, 1), k)
        values_ref, indices_ref = topk.topk_select_ref(x, k)
        assert_same(indices.cpu(), indices_ref)
        assert_same(values.cpu(), values_ref)
        dense = topk.topk_scatter(values, indices, N, dtype)
        assert_same(dense.cpu(), topk.topk_scatter_ref(values_ref, indices_ref, N, dtype))
