"""Multi-tensor D-Lion launches: one launch per kind of tensor over a whole bucket == the single-tensor references
on each tensor's slices, bit for bit (Triton interpreted on CPU), and the launch count actually drops."""

import pytest
import torch

from distlion_ds.kernels import _dispatch, lion
from distlion_ds.kernels.lion import (
    aggregate_bits,
    lion_apply_multi,
    lion_apply_ref,
    lion_votes_multi,
    lion_votes_ref,
)

SIZES = [13, 8192, 1, 9001, 0, 8, 20001, 7]


@pytest.fixture(autouse=True)
def _interpreter():
    assert _dispatch.INTERPRET, "the suite runs with TRITON_INTERPRET=1 (tests/conftest.py)"


@pytest.fixture
def launches(monkeypatch):
    names = []
    real = lion.launch

    def counting(kernel, grid, *args, **options):
        names.append(kernel.fn.__name__)
        return real(kernel, grid, *args, **options)

    monkeypatch.setattr(lion, "launch", counting)
    return names


def _layout(sizes):
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += -(-n // 8) * 8 + 8  # 8 elements of gap after each tensor: nothing may write there
    return offsets, off


def _tensor(n, dtype, gen, *, unaligned=False, strided=False):
    if strided:
        return torch.randn(n, 2, generator=gen).to(dtype)[:, 0]
    if unaligned:
        return torch.randn(n + 1, generator=gen).to(dtype)[1:]
    return torch.randn(n, generator=gen).to(dtype)


def _grads(gen, dtype):
    """One gradient per SIZES entry: mostly ``dtype``; one None, one of another dtype, one unaligned, one strided,
    and exact zeros (the zero rule) in the first."""
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    grads = [_tensor(n, dtype, gen) for n in SIZES]
    grads[0][::3] = 0
    grads[2] = None
    grads[3] = _tensor(SIZES[3], dtype, gen, unaligned=True)
    grads[5] = _tensor(SIZES[5], other, gen)
    grads[6] = _tensor(SIZES[6], dtype, gen, strided=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [1, 2])
def test_votes_multi_matches_single_references(dtype, step, launches):
    gen = torch.Generator().manual_seed(step)
    offsets, total = _layout(SIZES)
    grads = _grads(gen, dtype)
    grads[1][77] = float("nan")
    exp_avg = torch.randn(total, generator=gen)
    exp_avg[offsets[0]: offsets[0] + 13: 2] = 0
    out = torch.full((total // 8,), 0xA5, dtype=torch.uint8)
    want = out.clone()
    flag = torch.zeros(1, dtype=torch.int32)
    lion_votes_multi(grads, SIZES, offsets, exp_avg, 0.9, step, out, nonfinite=flag)
    for g, n, off in zip(grads, SIZES, offsets, strict=True):
        lion_votes_ref(g, exp_avg[off: off + n], 0.9, step, out=want[off // 8: off // 8 + -(-n // 8)])
    assert torch.equal(out, want)
    assert flag.item() == 1
    # The aligned contiguous gradients of the main dtype share one launch; the rest (None, another dtype,
    # unaligned, strided) go by kind or one by one.
    assert launches.count("_lion_votes_multi_kernel") >= 1
    assert len(launches) < sum(n > 0 for n in SIZES)


def test_votes_multi_flag_stays_clear_on_finite_grads():
    gen = torch.Generator().manual_seed(5)
    offsets, total = _layout(SIZES)
    grads = [_tensor(n, torch.float32, gen) for n in SIZES]
    flag = torch.zeros(1, dtype=torch.int32)
    lion_votes_multi(grads, SIZES, offsets, torch.randn(total, generator=gen), 0.9, 3,
                     torch.zeros(total // 8, dtype=torch.uint8), nonfinite=flag)
    assert flag.item() == 0


@pytest.mark.parametrize("aggregation,n_ranks", [("mavo", 4), ("avg", 3), ("avg", 1)])
@pytest.mark.parametrize("dtype,seed", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 12345),
                                        (torch.float16, None)])
def test_apply_multi_matches_single_references(aggregation, n_ranks, dtype, seed, launches):
    gen = torch.Generator().manual_seed(n_ranks)
    offsets, total = _layout(SIZES)
    params = [_tensor(n, dtype, gen) for n in SIZES]
    params[4] = _tensor(SIZES[3], dtype, gen, unaligned=True)  # a parameter off 16-byte alignment
    grads = _grads(gen, dtype)
    grads[4] = _tensor(SIZES[3], dtype, gen)
    sizes = [p.numel() for p in params]
    offsets, total = _layout(sizes)
    nbits = aggregate_bits(aggregation, n_ranks)
    agg = torch.randint(0, 256, (nbits, total // 8 + 16), dtype=torch.uint8, generator=gen)[:, 3: 3 + total // 8]
    if aggregation == "avg":  # counts of +1 votes in [0, N]
        q = torch.randint(0, n_ranks + 1, (total,), generator=gen)
        for k in range(nbits):
            bits = ((q >> k) & 1).to(torch.uint8).view(-1, 8)
            agg[k] = (bits << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
    exp_avg = torch.randn(total, generator=gen)
    want_p = [p.clone() for p in params]
    want_m = exp_avg.clone()
    base = 0 if seed is None else 1000  # the stochastic-rounding index of tensor i starts at base + offsets[i]
    lion_apply_multi(params, grads, offsets, exp_avg, agg, n_ranks, 3e-3, 0.1, 0.99, aggregation,
                     rounding_seed=seed, elem_offset_base=base)
    for p, g, off in zip(want_p, grads, offsets, strict=True):
        n = p.numel()
        lion_apply_ref(p, want_m[off: off + n], g, agg[:, off // 8: off // 8 + -(-n // 8)], n_ranks, 3e-3, 0.1,
                       0.99, aggregation, rounding_seed=seed, elem_offset=base + off)
    for got, want in zip(params, want_p, strict=True):
        assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if want.element_size() == 2 else torch.int32))
    assert torch.equal(exp_avg, want_m)
    assert launches.count("_lion_apply_multi_kernel") >= 1
    assert len(launches) < sum(n > 0 for n in sizes)


def test_multi_refuses_bad_layouts():
    m = torch.zeros(64)
    out = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        lion_votes_multi([torch.zeros(8)], [8], [4], m, 0.9, 1, out)
    with pytest.raises(ValueError, match="inside the bucket"):
        lion_votes_multi([torch.zeros(8)], [8], [64], m, 0.9, 1, out)
    with pytest.raises(ValueError, match="2 tensors but 1 offsets"):
        lion_votes_multi([torch.zeros(8), None], [8, 8], [0], m, 0.9, 1, out)
    with pytest.raises(ValueError, match="a tensor is on meta, the bucket on cpu"):
        lion_votes_multi([torch.zeros(8), torch.zeros(8, device="meta")], [8, 8], [0, 8], m, 0.9, 1, out)
    with pytest.raises(ValueError, match="a gradient has 4 elements, its param 8"):
        lion_apply_multi([torch.zeros(8)], [torch.zeros(4)], [0], m, torch.zeros(1, 8, dtype=torch.uint8), 4, 1e-3,
                         0.0, 0.99, "mavo")
    with pytest.raises(ValueError, match="agg must be uint8"):
        lion_apply_multi([torch.zeros(8)], [None], [0], m, torch.zeros(2, 8, dtype=torch.uint8), 4, 1e-3, 0.0,
                         0.99, "mavo")


def test_optimizer_step_is_three_launches_and_same_bits_as_per_tensor(launches, monkeypatch):
    """DistributedLion over separately allocated tensors of two param groups: one votes launch and one apply launch
    per (group, kind of tensor) instead of one per tensor, and the same parameters and momenta as per-tensor
    launches (``MULTI_TENSOR`` off) after three steps (bf16, stochastic rounding, a parameter without gradient)."""
    import distlion_ds

    shapes = [(96, 16), (16,), (48, 16), (48,), (16, 16), (16,), (7,), (64, 16), (16, 64), (1,)] * 2
    results = {}
    for multi in (True, False):
        monkeypatch.setattr(lion, "MULTI_TENSOR", multi)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in shapes]
        groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
        opt = distlion_ds.DistributedLion(groups, lr=1e-3, weight_decay=0.1, aggregation="mavo", rounding_seed=3)
        for _ in range(3):
            for i, p in enumerate(params):
                p.grad = None if i == 5 else torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            launches.clear()
            opt.step()
        results[multi] = ([p.detach().clone() for p in params], [opt.state[p]["exp_avg"].clone() for p in params],
                          list(launches))
    (p_multi, m_multi, l_multi), (p_single, m_single, l_single) = results[True], results[False]
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(p_multi, p_single, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(m_multi, m_single, strict=True))
    assert len(l_single) == 2 * len(shapes) + 1  # votes and apply per tensor, one count
    # per group: one multi launch each for votes and apply, plus the gradient-less parameter's single launches
    assert sorted(l_multi) == sorted(["_lion_votes_multi_kernel"] * 2 + ["_lion_apply_multi_kernel"] * 2
                                     + ["_lion_votes_kernel", "_lion_apply_kernel", "_vote_count_kernel"])
