"""Blockwise k-bit quantization: Triton (interpreted on CPU) == torch reference, bit for bit; error, SQNR, bias."""

import math

import pytest
import torch
from _exact import assert_same as _assert_same

from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.quantize import (
    MAX_BLOCK_SIZE,
    _uniform_ref,
    dequantize,
    dequantize_ref,
    payload_sizes,
    quantize,
    quantize_ref,
)

BITS = [2, 4, 8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 8, 1000, 4099, 20001]


@pytest.fixture(autouse=True)
def _small_ref_chunks(monkeypatch):
    # The references walk their inputs in chunks of whole blocks (the CPU path's speed); 296 elements make every
    # multi-block test tensor cross chunk boundaries (one block per chunk for blocks of 296 and more).
    monkeypatch.setattr(_dispatch, "REF_CHUNK", 296)


def test_suite_runs_the_triton_kernels():
    # Without the interpreter every comparison below would compare the reference with itself.
    assert _dispatch.INTERPRET


def _randn(n, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


def _unpack(codes, bits, numel):
    shifts = torch.arange(8 // bits, dtype=torch.int32) * bits
    return ((codes.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)).view(-1)[:numel]


def _both(x, bits, block_size, **kw):
    """Run the kernel and the reference, assert identical payloads, return it."""
    codes, scales = quantize(x, bits, block_size, **kw)
    codes_ref, scales_ref = quantize_ref(x, bits, block_size, **kw)
    n_bytes, n_blocks = payload_sizes(x.numel(), bits, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (n_bytes,)
    assert scales.dtype == torch.float32 and scales.shape == (n_blocks,)
    assert torch.equal(codes, codes_ref)
    assert torch.equal(scales, scales_ref)
    return codes, scales


def _dequant_both(codes, scales, bits, block_size, numel, dtype):
    out = dequantize(codes, scales, bits, block_size, numel, dtype)
    _assert_same(out, dequantize_ref(codes, scales, bits, block_size, numel, dtype))
    assert out.shape == (numel,)
    return out


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits, dtype, stochastic):
    for n in SIZES:
        x = _randn(n, dtype, seed=n)
        codes, scales = _both(x, bits, 256, stochastic=stochastic, seed=1234 + n)
        _dequant_both(codes, scales, bits, 256, n, dtype)


@pytest.mark.parametrize("block_size", [8, 24, 64, 1000, 4096, MAX_BLOCK_SIZE])
def test_block_sizes(block_size):
    # Non-power-of-two blocks (24, 1000) run in padded tiles; 16384 is one block per program.
    for bits in BITS:
        for n in (5, 4099, 20001):
            x = _randn(n, seed=bits)
            codes, scales = _both(x, bits, block_size, stochastic=bits == 4, seed=7)
            _dequant_both(codes, scales, bits, block_size, n, torch.float32)


def test_payload_size_is_a_pure_function():
    for numel, bits, block_size, expected in [
        (0, 8, 256, (0, 0)), (1, 2, 8, (1, 1)), (7, 4, 8, (4, 1)), (1000, 2, 256, (250, 4)),
        (4099, 4, 256, (2050, 17)), (4099, 8, 4096, (4099, 2)),
    ]:
        assert payload_sizes(numel, bits, block_size) == expected
        for data in (torch.zeros(numel), torch.full((numel,), math.nan), _randn(numel)):
            codes, scales = quantize(data, bits, block_size)
            assert (codes.numel(), scales.numel()) == expected


def test_packing_is_lsb_first_with_zero_padding():
    # 4-bit, block 8, absmax 7 -> scale 1 and code = round_half_up(x) + 7. Nine elements: 5 bytes, the last
    # byte's high nibble is padding (0).
    x = torch.tensor([-7.0, -6, 0.5, -0.5, 7, 2, -1, 3, 2])
    codes, scales = _both(x, 4, 8)
    assert torch.equal(scales, torch.tensor([1.0, 2.0 / 7.0]))  # fp32 quotients
    assert codes.tolist() == [0x10, 0x78, 0x9E, 0xA6, 0x0E]  # (+-0.5 round up to 1 and 0: codes 8 and 7)
    codes2, _ = _both(torch.tensor([1.0, -1.0, 0.0]), 2, 8)  # 2-bit: codes 2, 0, 1 at bits 0, 2, 4
    assert codes2.tolist() == [2 | 0 << 2 | 1 << 4]


def test_non_contiguous_input_reads_row_major():
    x = _randn(64 * 70).view(64, 70)
    for view in (x.t(), x[:, ::2], x[::3]):
        assert not view.is_contiguous()
        codes, scales = _both(view, 4, 64, stochastic=True, seed=3)
        codes_c, scales_c = _both(view.contiguous(), 4, 64, stochastic=True, seed=3)
        assert torch.equal(codes, codes_c) and torch.equal(scales, scales_c)


@pytest.mark.parametrize("bits", BITS)
def test_all_zero_blocks_decode_to_exact_zeros(bits):
    qmax = 2 ** (bits - 1) - 1
    x = _randn(4 * 256 + 100)
    x[256:512] = 0.0
    x[768:1024] = -0.0
    x[1024:] = 0.0  # the partial last block
    for stochastic in (False, True):
        codes, scales = _both(x, bits, 256, stochastic=stochastic, seed=11)
        assert scales[1].item() == scales[3].item() == scales[4].item() == 0.0
        zero = x == 0
        assert (_unpack(codes, bits, x.numel())[zero] == qmax).all()
        out = _dequant_both(codes, scales, bits, 256, x.numel(), torch.float32)
        assert (out[zero] == 0).all()
    assert torch.equal(_dequant_both(*_both(torch.zeros(10), bits, 8), bits, 8, 10, torch.bfloat16),
                       torch.zeros(10, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_nonfinite_values_are_kept_and_isolated(bits, dtype):
    n = 1000
    x = _randn(n, dtype, seed=bits)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[0, 3, 255, 256, 700, 999]] = True
    x[[0, 255, 999]] = math.nan
    x[3] = math.inf
    x[[256, 700]] = -math.inf
    x[512:768] = math.nan  # a block with nothing finite: scale 0
    bad[512:768] = True
    for stochastic in (False, True):
        codes, scales = _both(x, bits, 256, stochastic=stochastic, seed=5)
        # The non-finite entries get the reserved code and leave every other code and scale as if they were 0.
        clean_codes, clean_scales = _both(torch.where(bad, 0.0, x), bits, 256, stochastic=stochastic, seed=5)
        assert torch.equal(scales, clean_scales) and scales[2].item() == 0.0
        got, clean = _unpack(codes, bits, n), _unpack(clean_codes, bits, n)
        assert (got[bad] == 2**bits - 1).all()
        assert torch.equal(got[~bad], clean[~bad])
        out = _dequant_both(codes, scales, bits, 256, n, dtype)
        assert torch.equal(torch.isnan(out), bad)


def _check_error_bound(x, bits, block_size, **kw):
    codes, scales = _both(x, bits, block_size, **kw)
    out = _dequant_both(codes, scales, bits, block_size, x.numel(), torch.float32)
    xf = x.float()
    step = scales.repeat_interleave(block_size)[: x.numel()]
    absmax = step * (2 ** (bits - 1) - 1)
    # Half a step (a full step when stochastic) plus fp32 rounding of x/scale and q*scale: 2 ulp of absmax
    # (2**-22 relative) would do; 2**-21 leaves margin and still fails on any off-by-one code.
    half = 1.0 if kw.get("stochastic") else 0.5
    assert ((out - xf).abs() <= half * step + 2.0**-21 * absmax).all()
    return out


@pytest.mark.parametrize("bits", BITS)
def test_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    heavy = torch.randn(20000, generator=g) ** 3  # heavy tails: a few large values per block
    ramp = torch.linspace(-1, 1, 4096)  # every rounding boundary region
    wide = torch.randn(4096, generator=g) * torch.logspace(-30, 30, 4096)  # blocks from 1e-30 to 1e30
    for x in (heavy, ramp, wide, _randn(4099, torch.bfloat16), _randn(4099, torch.float16, scale=100.0)):
        _check_error_bound(x, bits, 256)
        _check_error_bound(x, bits, 64, stochastic=True, seed=9)
    # The output dtype is the fp32 result rounded once (round to nearest even).
    x = _randn(4099)
    codes, scales = _both(x, bits, 256)
    out32 = _dequant_both(codes, scales, bits, 256, x.numel(), torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        _assert_same(_dequant_both(codes, scales, bits, 256, x.numel(), dtype), out32.to(dtype))


# Measured on this Gaussian sample (block 256): 2-bit 1.86 / -1.59 dB, 4-bit 17.99 / 14.97 dB, 8-bit
# 43.16 / 40.14 dB (deterministic / stochastic; theory for uniform steps: 6.02 dB per bit). Floors sit
# 0.4-0.7 dB below: an off-by-one code or a scale from the wrong block costs more than that.
@pytest.mark.parametrize(
    "bits,stochastic,floor_db",
    [(2, False, 1.5), (2, True, -2.0), (4, False, 17.5), (4, True, 14.5), (8, False, 42.5), (8, True, 39.5)],
)
def test_sqnr_floor(bits, stochastic, floor_db):
    x = _randn(65536)
    codes, scales = _both(x, bits, 256, stochastic=stochastic, seed=1)
    out = _dequant_both(codes, scales, bits, 256, x.numel(), torch.float32)
    sqnr = 10 * math.log10(x.pow(2).sum().item() / (x - out).pow(2).sum().item())
    assert sqnr >= floor_db


def test_stochastic_seeds():
    x = _randn(5000)
    a, _ = _both(x, 4, 256, stochastic=True, seed=42)
    b, _ = _both(x, 4, 256, stochastic=True, seed=43)
    c, _ = _both(x, 4, 256, stochastic=True, seed=42 + 2**32)  # seeds are used modulo 2**32
    assert not torch.equal(a, b) and torch.equal(a, c)
    # seed=None draws from torch's default generator: reproducible under torch.manual_seed.
    torch.manual_seed(0)
    d, _ = quantize(x, 4, 256, stochastic=True)
    torch.manual_seed(0)
    e, _ = quantize(x, 4, 256, stochastic=True)
    torch.manual_seed(0)
    f, _ = quantize_ref(x, 4, 256, stochastic=True)
    assert torch.equal(d, e) and torch.equal(d, f)
    # Deterministic rounding ignores the seed.
    assert torch.equal(quantize(x, 4, 256, seed=1)[0], quantize(x, 4, 256, seed=2)[0])


def test_hash_is_uniform():
    u = _uniform_ref(12345, torch.arange(1 << 20))
    assert u.min() >= 0 and u.max() < 1
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    expected = u.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 255 degrees of freedom: mean 255, sd 22.6; 400 is p < 1e-8 for a uniform source.
    assert chi2 < 400
    # Neighbouring indices and neighbouring seeds are uncorrelated.
    v = _uniform_ref(12346, torch.arange(1 << 20))
    for a, b in ((u[:-1], u[1:]), (u, v)):
        corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(u.numel())  # 5 standard errors


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    # Blocks of 72 (a multiple of 8): absmax 1.0 first, so every block has the same step, then 8 test values
    # at fractional step positions, each repeated 8 times, then 7 zeros (which round exactly). Each copy sits at
    # another index, so it gets an independent hash draw: E[dequant] must equal the value.
    qmax = 2 ** (bits - 1) - 1
    fracs = [0.1, 0.25, -0.5, 0.7, -0.9, 0.3, 1.6, -2.35] if qmax > 2 else [0.1, 0.25, -0.5, 0.7, -0.9, 0.3,
                                                                              -0.65, 0.45]
    step = (torch.tensor(1.0) / qmax).item()
    vals = [f * step for f in fracs]
    block = 72
    x = torch.cat([torch.ones(1), torch.tensor(vals).repeat(8), torch.zeros(block - 65)]).repeat(900)  # 64800
    # Kernel: 2 seeds x 7200 copies per value; reference: 20 seeds. Fixed seeds, so the test is not flaky.
    for fn_q, fn_dq, seeds in ((quantize, dequantize, [1, 2]), (quantize_ref, dequantize_ref, range(100, 120))):
        sums = torch.zeros(len(vals), dtype=torch.float64)
        count = 0
        for seed in seeds:
            codes, scales = fn_q(x, bits, block, stochastic=True, seed=seed)
            assert (scales == step).all()
            out = fn_dq(codes, scales, bits, block, x.numel(), torch.float32).view(-1, block)[:, 1:65]
            sums += out.double().reshape(-1, len(vals)).sum(dim=0)
            count += out.numel() // len(vals)
        for s, v in zip(sums.tolist(), vals, strict=True):
            p = v / step - math.floor(v / step)
            se = math.sqrt(p * (1 - p) / count)  # standard error of the mean, in steps
            bias = (s / count - v) / step
            assert abs(bias) <= 5 * se + 1e-6, (v, bias, se)
            # The same bound rejects round-to-nearest, whose bias here is min(p, 1 - p) >= 0.1 steps.
            assert min(p, 1 - p) > 5 * se + 1e-6


def test_bad_arguments_name_the_argument():
    x = _randn(64)
    for fn in (quantize, quantize_ref):
        for bits in (1, 3, 16, True, 8.0, None):
            with pytest.raises(ValueError, match="bits"):
                fn(x, bits, 64)
        for block_size in (0, -8, 12, 4, MAX_BLOCK_SIZE + 8, 64.0, None):
            with pytest.raises(ValueError, match="block_size"):
                fn(x, 4, block_size)
        with pytest.raises(ValueError, match="seed"):
            fn(x, 4, 64, stochastic=True, seed="1")
        with pytest.raises(ValueError, match="x has dtype"):
            fn(torch.arange(64), 4, 64)
    codes, scales = quantize(x, 4, 64)
    for fn in (dequantize, dequantize_ref):
        with pytest.raises(ValueError, match="codes"):
            fn(codes[1:], scales, 4, 64, 64, torch.float32)
        with pytest.raises(ValueError, match="codes"):
            fn(codes.to(torch.int8), scales, 4, 64, 64, torch.float32)
        with pytest.raises(ValueError, match="scales"):
            fn(codes, scales.double(), 4, 64, 64, torch.float32)
        with pytest.raises(ValueError, match="numel"):
            fn(codes, scales, 4, 64, -1, torch.float32)
        with pytest.raises(ValueError, match="dtype"):
            fn(codes, scales, 4, 64, 64, torch.int32)
        with pytest.raises(ValueError, match="bits"):
            fn(codes, scales, 3, 64, 64, torch.float32)
        with pytest.raises(ValueError, match="block_size"):
            fn(codes, scales, 4, 60, 64, torch.float32)


@pytest.mark.parametrize("stochastic", [False, True])
def test_subnormal_block_whose_scale_underflows(stochastic):
    # absmax / qmax rounds to 0 for a block of the smallest subnormals: the block must encode like a zero block
    # (the reference skips its NaN/zero masks when a chunk is all finite and every scale is nonzero, not here).
    # Seed 0 draws u = 0 at index 0, where -1e-45 + u would floor to -1 if the block were not zeroed first.
    tiny = torch.tensor([-1e-45, 1e-45] * 32)
    x = torch.cat([tiny, torch.randn(64, generator=torch.Generator().manual_seed(3))])
    assert _uniform_ref(0, torch.zeros(1, dtype=torch.int64)).item() == 0.0
    for bits in (4, 8):  # qmax >= 7 (2-bit's qmax of 1 keeps the subnormal scale)
        codes, scales = _both(x, bits, 64, stochastic=stochastic, seed=0 if stochastic else None)
        assert scales[0] == 0 and scales[1] > 0
        assert _unpack(codes, bits, 64).tolist() == [2 ** (bits - 1) - 1] * 64
