"""Sign packing and the fused D-Lion kernels: Triton (interpreted on CPU) == torch reference, bit for bit."""

import math

import pytest
import torch

from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.lion import (
    aggregate_bits,
    lion_apply,
    lion_apply_ref,
    lion_votes,
    lion_votes_ref,
    vote_count,
    vote_count_ref,
)
from distlion_ds.kernels.signs import (
    pack_bits_ref,
    pack_signs,
    pack_signs_ref,
    unpack_bits_ref,
    unpack_signs,
    unpack_signs_ref,
)
from distlion_ds.optim.lion import dlion_update_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 8, 9, 1000, 8191, 8193, 20001]


@pytest.fixture(autouse=True)
def _small_ref_chunks(monkeypatch):
    # The references walk their inputs in chunks (the CPU path's speed); 296 elements, not a power of two, puts
    # chunk boundaries inside every tensor below and across the Triton kernels' 8192-element tiles.
    monkeypatch.setattr(_dispatch, "REF_CHUNK", 296)


def test_suite_runs_the_triton_kernels():
    # Without the interpreter every comparison below would compare the reference with itself.
    assert _dispatch.INTERPRET


def _with_zeros(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    x[torch.rand(n, generator=g) < 0.2] = 0.0
    return x


def _votes_by_loop(x, step):
    out = []
    for j, v in enumerate(x.float().tolist()):
        out.append(1 if v > 0 else -1 if v < 0 else (1 if (j + step) % 2 == 0 else -1))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_pack_signs_matches_reference_and_layout(n, dtype):
    x = _with_zeros(n, dtype, seed=n)
    for step in (1, 2):
        packed = pack_signs(x, step=step)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
        torch.testing.assert_close(packed, pack_signs_ref(x, step), atol=0, rtol=0)
        # Layout from first principles: bit i (LSB first) of byte k is element 8k+i; padding bits are 0.
        expected = _votes_by_loop(x, step)
        bits = [(int(packed[k // 8]) >> (k % 8)) & 1 for k in range(len(packed) * 8)]
        assert bits[:n] == [1 if v > 0 else 0 for v in expected]
        assert not any(bits[n:])
        votes = unpack_signs(packed, n)
        torch.testing.assert_close(votes, unpack_signs_ref(packed, n), atol=0, rtol=0)
        assert votes.dtype == torch.int8 and votes.tolist() == expected


def test_zero_rule_alternates_and_never_drifts():
    z = torch.zeros(9)
    v1, v2 = unpack_signs(pack_signs(z, step=1), 9), unpack_signs(pack_signs(z, step=2), 9)
    assert v1.tolist() == [-1, 1, -1, 1, -1, 1, -1, 1, -1]
    assert (v1 + v2).abs().sum() == 0


def test_pack_bits_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1001):
        b = torch.rand(n, generator=g) < 0.3
        p = pack_bits_ref(b)
        assert p.dtype == torch.uint8 and p.numel() == -(-n // 8)
        assert torch.equal(unpack_bits_ref(p, n), b.to(torch.uint8))
    assert pack_bits_ref(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist() == [1, 1]
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_bits_ref(unpack_bits_ref(every_byte, 2048)), every_byte)


def test_pack_signs_nan_inf_and_noncontiguous():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -1.0])
    # NaN votes like an exact zero (zero rule), +-inf by sign; nothing else is affected.
    assert unpack_signs(pack_signs(x, step=1), 6).tolist() == [-1, 1, -1, 1, 1, -1]
    m = torch.randn(64, 48)[:, ::3]
    assert not m.is_contiguous()
    torch.testing.assert_close(pack_signs(m, 3), pack_signs_ref(m.contiguous(), 3), atol=0, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dtype"):
        pack_signs(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="numel"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_bits("median", 4)


def test_dispatch_uses_reference_without_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    x = _with_zeros(100, torch.float32)
    assert not _dispatch.use_triton(x)
    torch.testing.assert_close(pack_signs(x, 1), pack_signs_ref(x, 1), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 13, 8192, 9001])
def test_lion_votes_matches_reference(n, dtype):
    g = _with_zeros(n, dtype, seed=1)
    m = _with_zeros(n, torch.float32, seed=2)
    m[g == 0] = 0.0  # exact zeros of c exercise the zero rule
    for grad in (g, None):
        f_k, f_r = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        out_k, _ = lion_votes(grad, m, 0.9, 5, nonfinite=f_k)
        out_r, _ = lion_votes_ref(grad, m, 0.9, 5, nonfinite=f_r)
        torch.testing.assert_close(out_k, out_r, atol=0, rtol=0)
        assert int(f_k) == int(f_r) == 0
    bad = g.clone()
    bad[n // 2] = float("nan")
    f_k, f_r = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    lion_votes(bad, m, 0.9, 5, nonfinite=f_k)
    lion_votes_ref(bad, m, 0.9, 5, nonfinite=f_r)
    assert int(f_k) == int(f_r) == 1
    # m is only read by the vote pass (the skip rule needs it untouched until the apply).
    m0 = m.clone()
    lion_votes(g, m, 0.9, 5)
    torch.testing.assert_close(m, m0, atol=0, rtol=0)


def test_lion_votes_into_bucket_slice_and_inf_flag():
    bucket = torch.zeros(10, dtype=torch.uint8)
    g, m = torch.randn(30), torch.zeros(30)
    g[3] = float("inf")
    flag = torch.zeros(1, dtype=torch.int32)
    lion_votes(g, m, 0.5, 1, out=bucket[2:6], nonfinite=flag)
    assert int(flag) == 1
    torch.testing.assert_close(bucket[2:6], lion_votes_ref(g, m, 0.5, 1)[0], atol=0, rtol=0)
    assert bucket[:2].tolist() == [0, 0] and bucket[6:].tolist() == [0] * 4


@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 5, 8, 16, 31])
def test_vote_count_matches_reference_and_sum_of_votes(n_ranks, aggregation):
    n_bytes = 1500
    gen = torch.Generator().manual_seed(n_ranks)
    recv_full = torch.randint(0, 256, (n_ranks, n_bytes + 3), dtype=torch.uint8, generator=gen)
    recv = recv_full[:, 1: n_bytes + 1]  # strided rows, as the exchange hands them over
    for offset in (0, 8 * 1500, 3):
        out_k = vote_count(recv, n_ranks, aggregation, step=4, elem_offset=offset)
        out_r = vote_count_ref(recv, n_ranks, aggregation, step=4, elem_offset=offset)
        torch.testing.assert_close(out_k, out_r, atol=0, rtol=0)
    # Independent oracle: integer sum of +-1 votes.
    votes = torch.stack([unpack_signs_ref(recv[r].contiguous(), n_bytes * 8) for r in range(n_ranks)]).int()
    s = votes.sum(0)
    nbits = aggregate_bits(aggregation, n_ranks)
    assert out_k.shape == (nbits, n_bytes)
    if aggregation == "mavo":
        j = torch.arange(3, 3 + s.numel())
        want = torch.where(s == 0, torch.where((j + 4) % 2 == 0, 1, -1), s.sign())
        assert unpack_signs_ref(out_k[0], s.numel()).int().tolist() == want.tolist()
    else:
        q = sum(unpack_signs_ref(out_k[k], s.numel()).add(1).div(2).int() << k for k in range(nbits))
        assert (2 * q - n_ranks).tolist() == s.tolist()


@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
@pytest.mark.parametrize("n_ranks", [64, 127, 256, 1030, 4096])
def test_vote_count_large_groups_reach_every_plane(n_ranks, aggregation):
    """Counts of 0, N, N/2, N/2 + 1 and random: every plane of the bit-sliced counter carries, up to N = 4095 in
    the kernel, and 4096 ranks count with the reference. Oracle: the integer sum of the unpacked votes."""
    n = 8 * 40
    gen = torch.Generator().manual_seed(n_ranks)
    votes = torch.zeros(n_ranks, n, dtype=torch.bool)
    kind = torch.arange(n) % 5
    votes[:, kind == 1] = True
    for j in torch.nonzero(kind == 2).flatten().tolist() + torch.nonzero(kind == 4).flatten().tolist():
        ones = n_ranks // 2 + int(kind[j] == 4)
        votes[torch.randperm(n_ranks, generator=gen)[:ones], j] = True
    votes[:, kind == 3] = torch.rand(n_ranks, int((kind == 3).sum()), generator=gen) < 0.5
    recv = torch.stack([pack_bits_ref(votes[r]) for r in range(n_ranks)])
    out = vote_count(recv, n_ranks, aggregation, step=3, elem_offset=1)
    s = 2 * votes.int().sum(0) - n_ranks
    if aggregation == "mavo":
        j = torch.arange(1, 1 + n)
        want = torch.where(s == 0, torch.where((j + 3) % 2 == 0, 1, -1), s.sign())
        assert unpack_signs_ref(out[0], n).int().tolist() == want.tolist()
    else:
        nbits = aggregate_bits(aggregation, n_ranks)
        q = sum(unpack_signs_ref(out[k], n).add(1).div(2).int() << k for k in range(nbits))
        assert (2 * q - n_ranks).tolist() == s.tolist()


@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lion_apply_matches_reference(dtype, aggregation):
    n, n_ranks = 9003, 3
    nbits = aggregate_bits(aggregation, n_ranks)
    gen = torch.Generator().manual_seed(7)
    agg_full = torch.randint(0, 256, (nbits, 1200), dtype=torch.uint8, generator=gen)
    agg = agg_full[:, 10: 10 + math.ceil(n / 8)]
    for grad in (torch.randn(n, generator=gen).to(dtype), None):
        p0 = torch.randn(n, generator=gen).to(dtype)
        m0 = torch.randn(n, generator=gen)
        pk, mk, pr, mr = p0.clone(), m0.clone(), p0.clone(), m0.clone()
        lion_apply(pk, mk, grad, agg, n_ranks, 0.01, 0.1, 0.99, aggregation)
        lion_apply_ref(pr, mr, grad, agg, n_ranks, 0.01, 0.1, 0.99, aggregation)
        torch.testing.assert_close(pk, pr, atol=0, rtol=0)
        torch.testing.assert_close(mk, mr, atol=0, rtol=0)
        assert not torch.equal(pk, p0)


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4])
def test_kernel_pipeline_equals_dlion_reference(n_ranks, aggregation, path):
    """Votes of N simulated ranks -> count -> apply == the sum-of-votes reference update (DESIGN 3.1).

    Both the kernels and the torch references (the CPU path, here in 296-element chunks) against the independent
    oracle of optim/lion.py.
    """
    votes_fn, count_fn, apply_fn = {"triton": (lion_votes, vote_count, lion_apply),
                                    "torch": (lion_votes_ref, vote_count_ref, lion_apply_ref)}[path]
    n, step, lr, betas, wd = 1003, 6, 0.003, (0.9, 0.99), 0.01
    gen = torch.Generator().manual_seed(11 * n_ranks)
    p = torch.randn(n, generator=gen)
    grads = [_with_zeros(n, torch.float32, seed=r) for r in range(n_ranks)]
    grads[0] = None  # a rank without a gradient votes on zeros
    moms = [torch.where(torch.rand(n, generator=gen) < 0.3, 0.0, torch.randn(n, generator=gen))
            for _ in range(n_ranks)]
    if n_ranks > 1:
        moms[1] = torch.zeros(n)
    want_p, want_m = dlion_update_ref(p, grads, moms, lr, betas, wd, step, aggregation)

    n_bytes = math.ceil(n / 8)
    recv = torch.stack([votes_fn(g, m, betas[0], step)[0] for g, m in zip(grads, moms, strict=True)])
    agg = count_fn(recv.view(n_ranks, n_bytes), n_ranks, aggregation, step)
    for r in range(n_ranks):
        pr, mr = p.clone(), moms[r].clone()
        apply_fn(pr, mr, grads[r], agg, n_ranks, lr, wd, betas[1], aggregation)
        torch.testing.assert_close(pr, want_p, atol=0, rtol=0)
        torch.testing.assert_close(mr, want_m[r], atol=0, rtol=0)


def test_empty_tensors():
    m = torch.zeros(0)
    packed, flag = lion_votes(torch.zeros(0), m, 0.9, 1, nonfinite=torch.zeros(1, dtype=torch.int32))
    assert packed.numel() == 0 and int(flag) == 0
    agg = torch.zeros(1, 0, dtype=torch.uint8)
    p = torch.zeros(0)
    lion_apply(p, m, None, agg, 2, 0.1, 0.0, 0.99, "mavo")
    assert vote_count(torch.zeros(3, 0, dtype=torch.uint8), 3, "avg", 1).shape == (2, 0)
    assert unpack_signs(pack_signs(p), 0).numel() == 0


# --------------------------------------------------------------------------------------------- stochastic rounding
def _lowbias32_by_python(seed: int, j: int) -> int:
    """The hash of kernels/_hash.py written with Python ints (an oracle independent of both implementations)."""
    h = ((j * 0x9E3779B9) & 0xFFFFFFFF) ^ seed
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _bf16_neighbours(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below-or-equal and just above-or-equal each finite fp32 value (fp64 compare)."""
    toward_zero = (v.view(torch.int32) & ~0xFFFF).view(torch.float32)  # bf16 is fp32's top 16 bits
    exact = toward_zero == v
    away = (v.view(torch.int32) & ~0xFFFF) + 0x10000
    away = torch.where(exact, v.view(torch.int32), away).view(torch.float32)
    lo = torch.where(v >= 0, toward_zero, away)
    hi = torch.where(v >= 0, away, toward_zero)
    return lo.double(), hi.double()


@pytest.mark.parametrize("aggregation", ["mavo", "avg"])
def test_lion_apply_stochastic_rounding_matches_reference(aggregation):
    from distlion_ds.kernels._hash import hash32_ref

    n, n_ranks = 9003, 3  # crosses the kernel's 8192-element tile and the reference's 296-element chunks
    nbits = aggregate_bits(aggregation, n_ranks)
    gen = torch.Generator().manual_seed(11)
    agg = torch.randint(0, 256, (nbits, 1200), dtype=torch.uint8, generator=gen)[:, 7: 7 + math.ceil(n / 8)]
    p0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    p0[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    m0 = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    lr = 3e-3  # about 1/3 of the bf16 ulp at 1: most results fall between two bf16 values
    results = {}
    # elem_offset 2**32 - 5000 wraps the hash's 32-bit index inside the tensor
    for seed, elem_offset in ((0, 0), (1, 1), (2**31 - 1, 123456), (77, 2**32 - 5000)):
        pk, mk, pr, mr = p0.clone(), m0.clone(), p0.clone(), m0.clone()
        lion_apply(pk, mk, grad, agg, n_ranks, lr, 0.1, 0.99, aggregation, rounding_seed=seed, elem_offset=elem_offset)
        lion_apply_ref(pr, mr, grad, agg, n_ranks, lr, 0.1, 0.99, aggregation, rounding_seed=seed,
                       elem_offset=elem_offset)
        assert torch.equal(pk.view(torch.int16), pr.view(torch.int16))
        assert torch.equal(mk, mr)
        results[seed] = pk
        # Independent check of the rounding: the fp32 result (round-to-nearest path, fp32 parameter) lies between
        # two bf16 values and the stochastic result is one of them.
        p32, m32 = p0.float(), m0.clone()
        lion_apply_ref(p32, m32, grad, agg, n_ranks, lr, 0.1, 0.99, aggregation)
        lo, hi = _bf16_neighbours(p32[3:])
        out = pk[3:].double()
        assert bool(((out == lo) | (out == hi)).all())
        assert torch.isnan(pk[0]) and pk[1] == float("inf") and pk[2] == -float("inf")
        # ... and it rounds up in magnitude exactly when the hash's top 16 bits carry past the dropped bits.
        rand16 = hash32_ref(seed, torch.arange(elem_offset + 3, elem_offset + n)) >> 16
        dropped = p32[3:].view(torch.int32).to(torch.int64) & 0xFFFF
        away = (out.abs() > p32[3:].double().abs())
        assert torch.equal(away, (dropped + rand16 >= 0x10000) & (dropped > 0))
    assert not torch.equal(results[0], results[1])
    # The hash itself, against Python ints.
    for seed, j in ((0, 0), (1, 5), (2**31 - 1, 2**32 - 1), (12345, 2**32 + 7)):
        assert int(hash32_ref(seed, torch.tensor([j]))) == _lowbias32_by_python(seed, j % 2**32)


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.5, 0.77])
def test_stochastic_rounding_is_unbiased(frac):
    # p = 1.5 in bf16 (ulp 2**-7), Delta = +1 everywhere (MaVo all ones), no decay: the fp32 result r = 1.5 - lr
    # sits `frac` of an ulp below 1.5; each element rounds to 1.5 - ulp with probability frac. The mean over n
    # elements has standard deviation ulp * sqrt(frac * (1 - frac) / n): 5 of them is the bound.
    n, ulp = 1 << 15, 2.0**-7
    lr = frac * ulp
    r = float(torch.tensor(1.5) - torch.tensor(lr))  # the fp32 value to be rounded
    p = torch.full((n,), 1.5, dtype=torch.bfloat16)
    agg = torch.full((1, n // 8), 0xFF, dtype=torch.uint8)
    lion_apply(p, torch.zeros(n), None, agg, 1, lr, 0.0, 0.99, "mavo", rounding_seed=2024)
    values = p.double()
    assert set(values.unique().tolist()) == {1.5 - ulp, 1.5}
    sigma = ulp * math.sqrt(frac * (1 - frac) / n)
    assert abs(values.mean().item() - r) <= 5 * sigma


def test_stochastic_rounding_unstalls_small_updates():
    # lr = 1/10 of half an ulp: round to nearest never moves a bf16 parameter; stochastic rounding moves it by lr
    # per step in expectation. After T steps each element's error is a sum of T roundings of variance <= ulp^2/4.
    n, ulp, steps = 1 << 14, 2.0**-7, 40
    lr = 0.1 * ulp / 2
    agg = torch.full((1, n // 8), 0xFF, dtype=torch.uint8)
    stalled = torch.full((n,), 1.5, dtype=torch.bfloat16)
    moving = stalled.clone()
    m = torch.zeros(n)
    for t in range(1, steps + 1):
        lion_apply(stalled, m, None, agg, 1, lr, 0.0, 0.99, "mavo")
        lion_apply(moving, m, None, agg, 1, lr, 0.0, 0.99, "mavo", rounding_seed=1000 + t)
    assert bool((stalled == 1.5).all())
    moved = 1.5 - moving.double().mean().item()
    bound = 5 * ulp / 2 * math.sqrt(steps / n) + steps * 2.0**-24  # + fp32 rounding of 1.5 - lr per step
    assert abs(moved - steps * lr) <= bound, (moved, steps * lr, bound)
    assert moved > steps * lr / 2


def test_stochastic_rounding_arguments():
    n = 64
    agg = torch.zeros(1, n // 8, dtype=torch.uint8)
    p32 = torch.randn(n)
    a, b = p32.clone(), p32.clone()
    lion_apply(a, torch.zeros(n), None, agg, 2, 1e-3, 0.0, 0.99, "mavo", rounding_seed=5)
    lion_apply(b, torch.zeros(n), None, agg, 2, 1e-3, 0.0, 0.99, "mavo")
    assert torch.equal(a, b)  # fp32 parameters have nothing to round: the seed changes nothing
    with pytest.raises(ValueError, match="float16"):
        lion_apply(torch.zeros(n, dtype=torch.float16), torch.zeros(n), None, agg, 2, 1e-3, 0.0, 0.99, "mavo",
                   rounding_seed=5)
    for fn in (lion_apply, lion_apply_ref):
        for bad in (-1, 2**31, 1.5, True):
            with pytest.raises(ValueError, match="rounding_seed"):
                fn(torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n), None, agg, 2, 1e-3, 0.0, 0.99, "mavo",
                   rounding_seed=bad)
        with pytest.raises(ValueError, match="elem_offset"):
            fn(torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n), None, agg, 2, 1e-3, 0.0, 0.99, "mavo",
               rounding_seed=1, elem_offset=-1)


def test_f32_rounds_like_torch():
    from distlion_ds.kernels.lion import f32

    gen = torch.Generator().manual_seed(3)
    values = (torch.rand(2000, generator=gen, dtype=torch.float64) - 0.5) * torch.logspace(-46, 39, 2000,
                                                                                           dtype=torch.float64)
    specials = [0.0, -0.0, 1e-46, 1.5e-45, 3.4028235e38, 3.4028236e38, 3.40282357e38, 1e39, -1e39, math.inf,
                0.1, 1 - 0.9, 0.99]
    for v in values.tolist() + specials:
        want = torch.tensor(v, dtype=torch.float32)
        got = torch.tensor(f32(v), dtype=torch.float64).float()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), v
    assert math.isnan(f32(math.nan))
