"""Triton helpers shared by the kernel modules."""

import triton
import triton.language as tl


@triton.jit
def _cast_rne(v, dtype: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even, as torch casts.

    The interpreter truncates fp32 -> bf16 (GPUs round to nearest even), so bf16 is rounded by hand from the
    fp32 bits; NaN becomes the quiet NaN 0x7FC0 as in torch. Costs a few integer ops on the GPU path.
    """
    if v.dtype == dtype:
        return v
    if dtype == tl.bfloat16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _cast_bf16_stochastic(v, rand16):
    """fp32 ``v`` -> bf16, rounded up in magnitude with probability (dropped 16 bits) / 2**16: unbiased.

    ``rand16``: uint32 random values in [0, 2**16). Adding them to the fp32 bit pattern carries into bit 16 exactly
    when they reach past the dropped bits, and bf16 is fp32 truncated to its top 16 bits, so the truncation is a
    stochastic rounding of the magnitude (sign-magnitude format: unbiased on both sides of zero; a carry out of the
    mantissa correctly moves to the next binade; the largest finite values may round to Inf). NaN becomes the quiet
    NaN 0x7FC0 (a carry could otherwise turn a NaN into a zero). Must match ``round_bf16_stochastic_ref``.
    """
    b = v.to(tl.uint32, bitcast=True)
    r = (b + rand16) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
