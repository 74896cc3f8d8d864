"""Counter-based random bits shared by the kernels and their torch references (no RNG state is carried).

``hash32(seed, idx)`` is a multiply-xorshift ``lowbias32`` finalizer (https://nullprogram.com/blog/2018/07/31/,
measured bias 0.17: a near-ideal avalanche) of ``idx * 2**32/phi`` xor ``seed``, all mod 2**32. Triton computes it
in uint32 (multiplications wrap, shifts are logical); torch in int64 masked to 32 bits with the multiplications
split so that nothing overflows. Both give the same bits for the same (seed, idx), which is what lets stochastic
rounding in a kernel equal its reference bit for bit. Users: quantize (stochastic codes), lion_apply (stochastic
rounding of 16-bit parameters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter requires tl in a jit function's globals)

MASK32 = 0xFFFFFFFF
_C0 = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive indices before the finalizer
_C1 = 0x7FEB352D  # lowbias32 multipliers
_C2 = 0x846CA68B


@triton.jit
def _hash32(idx, seed):
    """uint32 hash of (seed, idx), both uint32. Must match :func:`hash32_ref` bit for bit."""
    h = idx * 0x9E3779B9
    h = h ^ seed
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32 without int64 overflow: split c into 16-bit halves."""
    lo = h * (c & 0xFFFF)  # < 2**48
    hi = ((h * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits survive the shift mod 2**32
    return (lo + hi) & MASK32


def hash32_ref(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``_hash32``: ``idx`` int64 (used mod 2**32), ``seed`` in [0, 2**32); int64 in [0, 2**32)."""
    h = _mul32(idx & MASK32, _C0) ^ seed
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 15)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)
