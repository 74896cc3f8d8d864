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
