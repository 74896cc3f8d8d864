"""Fused D-Lion kernels: the worker vote, the vote count, and the apply (DESIGN 3.1 and 3.2).

One optimizer step, per parameter tensor ``p`` with fp32 momentum ``m`` and gradient ``g`` (None = zeros):

1. :func:`lion_votes` reads ``g`` and ``m`` once and writes the packed votes of ``c = b1*m + (1-b1)*g``; it also
   raises a device flag when any ``g`` is non-finite, in the same pass (no second read of the gradients).
2. The comm layer exchanges the packed votes; :func:`vote_count` turns the N ranks' bits of one shard into the
   packed aggregate: MaVo ``sign(S)`` (zero rule on ties) or Avg ``q = (S+N)/2`` in ``ceil(log2(N+1))`` bit-planes.
3. :func:`lion_apply` reads the aggregate and applies ``p <- p*(1 - lr*wd) - lr*Delta`` in place, and only then
   updates ``m <- b2*m + (1-b2)*g``.

Why the momentum update sits in the apply and not in the vote pass: the skip rule (3.1 step 7) wants ``p`` *and*
``m`` untouched on every rank when any rank's gradient is non-finite, and that is known only after the exchange.
Updating ``m`` during the vote pass would need a backup copy (8 B/param of extra traffic every step) or an inexact
rollback. The price is one more read of ``g`` and ``m`` in the apply (28 instead of 20 B/param of memory traffic for
fp32), which is far below the cost of the network on the slow links this package exists for.

Scalar coefficients are rounded to fp32 once on the host (:func:`f32`) and passed to both paths, so the kernel and
the torch reference do the same fp32 operations in the same order, and their outputs are equal bit for bit: in the
CPU interpreter (tested), and on a GPU by the GPU-bits policy of kernels/_dispatch.py: no FMA contraction (the
references round ``m*a``, ``g*b`` and their sum separately; a contracted FMA would flip votes where ``c`` is within
an ulp of zero), Avg's ``(2q - N) / N`` by IEEE division (``div_rn``), 64-bit offsets (row strides are added to
pointers, never multiplied in 32 bits). tests/test_gpu_compile.py checks the PTX for sm_80 and sm_90.

Stochastic rounding (``lion_apply(..., rounding_seed=...)``): a bf16 parameter without fp32 master weights stalls
when ``lr`` is below half an ulp (round to nearest returns the old value every step). With a seed, the fp32 result
is rounded to bf16 up or down with probabilities proportional to its distance to each (unbiased), the random bits
drawn from ``hash32(seed, elem_offset + flat index)`` (kernels/_hash.py), so kernel and reference agree bit for bit.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ._dispatch import check_contiguous, check_float, launch, ref_chunks, use_triton
from ._hash import MASK32, _hash32, hash32_ref
from ._triton_utils import _cast_bf16_stochastic, _cast_rne
from .signs import _pack_bits, _vote_bits, byte_bits_table, pack_votes_ref, tie_byte_ref, unpack_bits_ref

# Same tile as the sign kernels: 1024 packed bytes = 8192 elements per program (see signs.py).
_BLOCK_BYTES = 1024
# 16 warps: 16 elements per thread. Measured with ptxas -v (tests/test_gpu_compile.py): at 4 warps vote_count Avg
# spilled at N >= 32 and lion_apply bf16 on unaligned slices spilled 6 KB (Triton 3.6, sm_80); at 8 warps
# vote_count Avg N = 64 sat at 255 registers and lion_apply bf16 unaligned still spilled 28 B; at 16 warps the
# worst case is ~130 registers. Left to itself, ptxas then still spilled 4-8 B in a few specialisations to reach
# 64 or 80 registers (a higher occupancy); a register cap of one CTA's share (65536 / 512 threads = 128) stops
# that: no spills on Triton 3.6 and 3.9, sm_80 and sm_90. One CTA of 512 threads with 16 elements each keeps
# ~100 KB of loads in flight per SM, enough for these streaming kernels (issue 10; registers per kernel:
# benchmarks/RESULTS.md).
_NUM_WARPS = 16
_MAX_REGISTERS = 65536 // (32 * _NUM_WARPS)

AGGREGATIONS = ("mavo", "avg")


def f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (what a Triton scalar argument holds).

    ``struct`` rounds as C's double -> float cast (to nearest even, the conversion torch uses) without building a
    tensor: the optimizer calls this several times per parameter per step. Beyond fp32's range it gives +-Inf.
    """
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # |x| rounds past fp32's largest finite value
        return math.copysign(math.inf, x)


def round_bf16_stochastic_ref(v: torch.Tensor, rand16: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``_cast_bf16_stochastic``: fp32 ``v``, int64 ``rand16`` in [0, 2**16) -> bf16."""
    b = v.view(torch.int32).to(torch.int64) & MASK32
    r = (b + rand16) >> 16
    r = torch.where(torch.isnan(v), 0x7FC0, r)
    return (r - ((r & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)  # the 16 bits as a signed int16


def aggregate_bits(aggregation: str, n_ranks: int) -> int:
    """Bits per element of the aggregate: 1 for MaVo, ceil(log2(N+1)) for Avg (DESIGN 3.2)."""
    if aggregation == "mavo":
        return 1
    if aggregation == "avg":
        return max(1, math.ceil(math.log2(n_ranks + 1)))
    raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------- worker vote
@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _votes_tile(g_ptr, m_ptr, out_ptr, flag_ptr, tile, n, n_bytes, a, b, step,
                HAS_GRAD: tl.constexpr, MASKED: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Tile ``tile`` (int64) of one tensor's votes: pointers at the tensor's first element / byte. ``MASKED=False``
    only for a tile wholly inside the tensor (unmasked accesses vectorise whatever ``n`` is)."""
    byte = tile * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit_pos[None, :]
    mask = idx < n
    m = _load(m_ptr + idx, mask, MASKED)
    if HAS_GRAD:
        g = _load(g_ptr + idx, mask, MASKED).to(tl.float32)
        c = m * a + g * b
        bad = (g != g) | (tl.abs(g) == float("inf"))
        tl.atomic_max(flag_ptr, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))
    else:
        c = m * a
    bits = _vote_bits(c, idx, step)
    if MASKED:
        bits = bits & mask
    _store(out_ptr + byte, _pack_bits(bits, bit_pos), byte < n_bytes, MASKED)


@triton.jit
def _lion_votes_kernel(g_ptr, m_ptr, out_ptr, flag_ptr, n, n_bytes, a, b, step,
                       HAS_GRAD: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    _votes_tile(g_ptr, m_ptr, out_ptr, flag_ptr, tl.program_id(0).to(tl.int64), n, n_bytes, a, b, step,
                HAS_GRAD, True, BLOCK_BYTES)


@triton.jit
def _lion_votes_multi_kernel(g_base, g_deltas, tiles_ptr, spans_ptr, m_ptr, out_ptr, flag_ptr, a, b, step,
                             HAS_GRAD: tl.constexpr, DELTA_MULTIPLE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # One program per tile of one tensor (tiles_ptr: [tiles, 2] int64 of (tensor, tile within it)); the tensor's
    # bucket offset and numel from spans_ptr ([tensors, 2] int64); its gradient at g_base + g_deltas[tensor]
    # elements. Offsets from a pointer argument (rather than raw addresses cast to pointers) keep the alignment
    # the compiler needs to vectorise: a multiple of DELTA_MULTIPLE elements from a 16-byte aligned base.
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(tiles_ptr + 2 * pid)
    tile = tl.load(tiles_ptr + 2 * pid + 1)
    off = tl.multiple_of(tl.load(spans_ptr + 2 * ti), 8)  # the optimizer's 8-element alignment
    n = tl.load(spans_ptr + 2 * ti + 1)
    g_ptr = g_base
    if HAS_GRAD:
        g_ptr = g_base + tl.multiple_of(tl.load(g_deltas + ti), DELTA_MULTIPLE)
    if (tile + 1) * (BLOCK_BYTES * 8) <= n:
        _votes_tile(g_ptr, m_ptr + off, out_ptr + off // 8, flag_ptr, tile, n, (n + 7) // 8, a, b, step,
                    HAS_GRAD, False, BLOCK_BYTES)
    else:
        _votes_tile(g_ptr, m_ptr + off, out_ptr + off // 8, flag_ptr, tile, n, (n + 7) // 8, a, b, step,
                    HAS_GRAD, True, BLOCK_BYTES)


def lion_votes_ref(grad: torch.Tensor | None, exp_avg: torch.Tensor, beta1: float, step: int,
                   out: torch.Tensor | None = None, nonfinite: torch.Tensor | None = None):
    """Torch reference of :func:`lion_votes` (same arguments and returns)."""
    m = exp_avg.reshape(-1)
    g = grad.reshape(-1) if grad is not None else None
    a, b = f32(beta1), f32(1.0 - beta1)
    if out is None:
        out = torch.empty(-(-m.numel() // 8), dtype=torch.uint8, device=m.device)
    for s, e in ref_chunks(m.numel()):
        c = m[s:e] * a
        if g is not None:
            gb = g[s:e].float() * b
            c += gb  # same rounding as ``m*a + g*b``
            # g*b is finite exactly where g is (0 < b < 1), and a sum is finite only if every term is: one cheap
            # reduction screens the chunk, the exact test runs only when the sum is not finite (NaN/Inf or overflow).
            if nonfinite is not None and not bool(torch.isfinite(gb.sum())) and not bool(torch.isfinite(gb).all()):
                nonfinite.fill_(1)
        out[s // 8:-(-e // 8)] = pack_votes_ref(c, step, s)
    return out, nonfinite


def lion_votes(grad: torch.Tensor | None, exp_avg: torch.Tensor, beta1: float, step: int,
               out: torch.Tensor | None = None, nonfinite: torch.Tensor | None = None):
    """Packed D-Lion votes of one parameter's ``c = b1*m + (1-b1)*g``; ``m`` is only read.

    Args:
        grad: the local gradient (fp32/bf16/fp16, numel of ``exp_avg``), or None for zeros.
        exp_avg: the fp32 momentum ``m`` (contiguous).
        beta1: Lion's interpolation coefficient.
        step: optimizer step ``t`` from 1 (zero rule).
        out: optional contiguous uint8 buffer of ``ceil(n/8)`` bytes (e.g. a slice of a bucket) to write into.
        nonfinite: optional int32 tensor of one element; set to 1 when any gradient value is NaN/Inf
            (never cleared, so one flag can collect a whole bucket).
    Returns:
        ``(packed, nonfinite)``.
    """
    if exp_avg.dtype != torch.float32 or not exp_avg.is_contiguous():
        raise ValueError(f"exp_avg must be contiguous float32; got {exp_avg.dtype}, "
                         f"contiguous={exp_avg.is_contiguous()}")
    n = exp_avg.numel()
    if grad is not None:
        check_float("grad", grad)
        if grad.numel() != n:
            raise ValueError(f"grad has {grad.numel()} elements, exp_avg {n}")
    if out is None:
        out = torch.empty(-(-n // 8), dtype=torch.uint8, device=exp_avg.device)
    elif out.dtype != torch.uint8 or out.numel() != -(-n // 8) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of {-(-n // 8)} bytes")
    if nonfinite is not None and (nonfinite.dtype != torch.int32 or nonfinite.numel() != 1):
        raise ValueError("nonfinite must be an int32 tensor of one element")
    if not use_triton(grad, exp_avg):
        return lion_votes_ref(grad, exp_avg, beta1, step, out, nonfinite)
    if n == 0:
        return out, nonfinite
    flag = nonfinite if nonfinite is not None else torch.zeros(1, dtype=torch.int32, device=exp_avg.device)
    g = check_contiguous("grad", grad).reshape(-1) if grad is not None else exp_avg
    grid = (triton.cdiv(out.numel(), _BLOCK_BYTES),)
    launch(_lion_votes_kernel, grid, g, exp_avg, out, flag, n, out.numel(), f32(beta1), f32(1.0 - beta1), step,
           HAS_GRAD=grad is not None, BLOCK_BYTES=_BLOCK_BYTES, num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
    return out, nonfinite


# --------------------------------------------------------------------------------------------- vote count
# The count is bit-sliced, as in the reference: plane k holds bit k of every element's number of +1 votes, 8
# elements per byte, and a rank's packed byte is added with a carry chain of bitwise ops. No vote is ever unpacked
# (the first kernel unpacked every byte into 8 int32 lanes and packed them back through a [bytes, 8] tile: 0.07 of a
# device-to-device copy's bandwidth on an H200, benchmarks/RESULTS.md). Up to _COUNT_PLANES planes: N < 2**12;
# larger groups count with the torch reference on the GPU.
_COUNT_PLANES = 12
_COUNT_UNROLL = 16  # ranks unrolled in the count (every group of <= 16 is counted with no loop at all)


def _count_block_bytes(n_ranks: int) -> int:
    """8 bytes per thread at 16 warps (one 8-byte load per rank where rows are aligned) up to 16 ranks; 2 above
    (chosen when every rank was unrolled: 32 ranks spilled at 8 on sm_90; the looped count above 16 ranks, measured
    on an H200 at 2, was not retried at 8)."""
    return 4096 if n_ranks <= _COUNT_UNROLL else 1024


@triton.jit
def _half_add(plane, carry):
    """One bit of the bit-sliced counter: (new plane, carry out)."""
    return plane ^ carry, plane & carry


@triton.jit
def _compare_bit(above, equal, plane, HALF_BIT: tl.constexpr):
    """One bit, from the top down, of ``count > N // 2`` on the planes (the reference's MaVo comparison)."""
    if HALF_BIT:
        equal = equal & plane
    else:
        above = above | (equal & plane)
        equal = equal & ~plane
    return above, equal


@triton.jit
def _count_rank(row, bmask, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, TOP: tl.constexpr):
    """Add one rank's packed byte to the bit-sliced counter; planes above ``TOP`` cannot carry and are left alone."""
    c = tl.load(row, mask=bmask, other=0).to(tl.int32)
    p0, c = _half_add(p0, c)
    if TOP >= 1:
        p1, c = _half_add(p1, c)
    if TOP >= 2:
        p2, c = _half_add(p2, c)
    if TOP >= 3:
        p3, c = _half_add(p3, c)
    if TOP >= 4:
        p4, c = _half_add(p4, c)
    if TOP >= 5:
        p5, c = _half_add(p5, c)
    if TOP >= 6:
        p6, c = _half_add(p6, c)
    if TOP >= 7:
        p7, c = _half_add(p7, c)
    if TOP >= 8:
        p8, c = _half_add(p8, c)
    if TOP >= 9:
        p9, c = _half_add(p9, c)
    if TOP >= 10:
        p10, c = _half_add(p10, c)
    if TOP >= 11:
        p11, c = _half_add(p11, c)
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11


@triton.jit
def _vote_count_kernel(recv_ptr, recv_stride, out_ptr, out_stride, n_bytes, step, elem_offset, N_RANKS: tl.constexpr,
                       AVG: tl.constexpr, NBITS: tl.constexpr, COUNT_BITS: tl.constexpr, UNROLL: tl.constexpr,
                       BLOCK_BYTES: tl.constexpr):
    # N is a compile-time constant: it is fixed for a run (one compilation per group size). The first UNROLL ranks
    # are unrolled, rank r (0-based) touching only planes k with 2**k <= r + 1 (a count of r + 1 needs no higher
    # plane); the rest run in a loop over every plane the count can reach (COUNT_BITS), so a large group compiles
    # one loop body rather than N copies.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bmask = byte < n_bytes
    p0 = tl.zeros((BLOCK_BYTES,), dtype=tl.int32)
    p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11 = p0, p0, p0, p0, p0, p0, p0, p0, p0, p0, p0
    # Row r starts r * recv_stride bytes in: the stride is added to a 64-bit pointer per row, since r * recv_stride
    # in 32 bits overflows for large shards (64 ranks x 32 MiB).
    row = recv_ptr + byte
    for r in tl.static_range(UNROLL):
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11 = _count_rank(
            row, bmask, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11,
            0 if r < 1 else 1 if r < 3 else 2 if r < 7 else 3 if r < 15 else 4)
        row += recv_stride
    for _ in range(UNROLL, N_RANKS):
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11 = _count_rank(
            row, bmask, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, COUNT_BITS - 1)
        row += recv_stride
    if AVG:
        # The count (S + N) / 2 is the number of +1 votes, in [0, N]: its NBITS planes are the aggregate.
        plane_out = out_ptr + byte
        for k in tl.static_range(NBITS):
            plane = (p0 if k == 0 else p1 if k == 1 else p2 if k == 2 else p3 if k == 3 else p4 if k == 4 else
                     p5 if k == 5 else p6 if k == 6 else p7 if k == 7 else p8 if k == 8 else p9 if k == 9 else
                     p10 if k == 10 else p11)
            tl.store(plane_out, plane.to(tl.uint8), mask=bmask)
            plane_out += out_stride
    else:
        # S > 0 <=> count > N // 2; a tie (even N) <=> count == N / 2, then the zero rule's byte.
        HALF: tl.constexpr = N_RANKS // 2
        above = tl.zeros((BLOCK_BYTES,), dtype=tl.int32)
        equal = above + 0xFF
        above, equal = _compare_bit(above, equal, p11, (HALF >> 11) & 1)
        above, equal = _compare_bit(above, equal, p10, (HALF >> 10) & 1)
        above, equal = _compare_bit(above, equal, p9, (HALF >> 9) & 1)
        above, equal = _compare_bit(above, equal, p8, (HALF >> 8) & 1)
        above, equal = _compare_bit(above, equal, p7, (HALF >> 7) & 1)
        above, equal = _compare_bit(above, equal, p6, (HALF >> 6) & 1)
        above, equal = _compare_bit(above, equal, p5, (HALF >> 5) & 1)
        above, equal = _compare_bit(above, equal, p4, (HALF >> 4) & 1)
        above, equal = _compare_bit(above, equal, p3, (HALF >> 3) & 1)
        above, equal = _compare_bit(above, equal, p2, (HALF >> 2) & 1)
        above, equal = _compare_bit(above, equal, p1, (HALF >> 1) & 1)
        above, equal = _compare_bit(above, equal, p0, HALF & 1)
        if N_RANKS % 2 == 0:
            # Element j0 + i of a byte votes +1 on a tie where (j0 + i + step) is even; j0 = elem_offset + 8 * byte.
            tie = tl.where(((elem_offset + step) & 1) == 0, 0x55, 0xAA)
            above = above | (equal & tie)
        tl.store(out_ptr + byte, above.to(tl.uint8), mask=bmask)


def vote_count_ref(recv: torch.Tensor, n_ranks: int, aggregation: str, step: int, elem_offset: int = 0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`vote_count`."""
    nbits = aggregate_bits(aggregation, n_ranks)
    n_bytes = recv.shape[1]
    if out is None:
        out = torch.empty(nbits, n_bytes, dtype=torch.uint8, device=recv.device)
    count_bits, half = aggregate_bits("avg", n_ranks), n_ranks // 2  # a count of 0..N needs ceil(log2(N+1)) bits
    for s, e in ref_chunks(n_bytes * 8):
        # A bit-sliced counter: plane k holds bit k of every element's number of +1 votes, (S+N)/2, 8 elements
        # per byte, so the votes are added with bitwise ops on the packed bytes (never unpacked).
        planes = [torch.zeros(-(-(e - s) // 8), dtype=torch.uint8, device=recv.device) for _ in range(count_bits)]
        for r in range(n_ranks):
            carry = recv[r, s // 8:-(-e // 8)]
            for k in range(count_bits):
                planes[k], carry = planes[k] ^ carry, planes[k] & carry
        if aggregation == "avg":
            for k in range(nbits):
                out[k, s // 8:-(-e // 8)] = planes[k]
            continue
        # MaVo: S > 0 <=> count > N//2; a tie S == 0 (even N) <=> count == N/2. Compare the planes with N//2 from
        # the top bit down: ``above`` once a higher bit decided, ``equal`` while every bit so far matched.
        above = torch.zeros_like(planes[0])
        equal = torch.full_like(planes[0], 0xFF)
        for k in reversed(range(count_bits)):
            if (half >> k) & 1:
                equal &= planes[k]
            else:
                above |= equal & planes[k]
                equal &= ~planes[k]
        if n_ranks % 2 == 0:
            above |= equal & tie_byte_ref(step, elem_offset + s)
        out[0, s // 8:-(-e // 8)] = above
    return out


def vote_count(recv: torch.Tensor, n_ranks: int, aggregation: str, step: int, elem_offset: int = 0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Count the votes of one shard: ``recv[r]`` holds rank ``r``'s packed votes for the shard.

    Args:
        recv: uint8 ``[n_ranks, shard_bytes]`` (rows may be strided, columns contiguous).
        n_ranks: N, the number of voters.
        aggregation: ``"mavo"`` or ``"avg"``.
        step: optimizer step ``t`` (zero rule on MaVo ties, for even N).
        elem_offset: flat index of the shard's first element inside its parameter (its parity is what the zero
            rule needs; the optimizer aligns every parameter to 8 elements, so the bucket offset works).
        out: optional uint8 ``[nbits, shard_bytes]`` with contiguous rows.
    Returns:
        uint8 ``[nbits, shard_bytes]``: MaVo the packed sign (nbits = 1); Avg the bit-planes of ``(S+N)/2``.
    """
    nbits = aggregate_bits(aggregation, n_ranks)
    if recv.dtype != torch.uint8 or recv.dim() != 2 or recv.shape[0] < n_ranks or recv.stride(1) != 1:
        raise ValueError(f"recv must be uint8 [n_ranks, shard_bytes] with contiguous rows; got {recv.dtype} "
                         f"{tuple(recv.shape)} stride {recv.stride()}")
    n_bytes = recv.shape[1]
    if out is None:
        out = torch.empty(nbits, n_bytes, dtype=torch.uint8, device=recv.device)
    elif out.shape != (nbits, n_bytes) or out.dtype != torch.uint8 or out.stride(1) != 1:
        raise ValueError(f"out must be uint8 [{nbits}, {n_bytes}] with contiguous rows")
    if not use_triton(recv, out) or n_ranks >= 2**_COUNT_PLANES:
        return vote_count_ref(recv, n_ranks, aggregation, step, elem_offset, out)
    if n_bytes:
        block = _count_block_bytes(n_ranks)
        launch(_vote_count_kernel, (triton.cdiv(n_bytes, block),), recv, recv.stride(0), out, out.stride(0),
               n_bytes, step, elem_offset, N_RANKS=n_ranks, AVG=aggregation == "avg", NBITS=nbits,
               COUNT_BITS=aggregate_bits("avg", n_ranks), UNROLL=min(n_ranks, _COUNT_UNROLL), BLOCK_BYTES=block,
               num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
    return out


# --------------------------------------------------------------------------------------------- apply
# N is a compile-time constant as in vote_count: a runtime int argument equal to 1 would become a constexpr in a
# real launch anyway (and a constexpr has no ``.to``: the Avg path failed to compile at N = 1 that way). The seed is
# not specialised: a seed of 1 would otherwise compile a kernel of its own.
@triton.jit
def _apply_tile(p_ptr, m_ptr, g_ptr, agg_ptr, agg_stride, tile, n, decay, lr, c2, d2, seed, elem_offset,
                N_RANKS: tl.constexpr, HAS_GRAD: tl.constexpr, AVG: tl.constexpr, NBITS: tl.constexpr,
                STOCHASTIC: tl.constexpr, MASKED: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Tile ``tile`` (int64) of one tensor's apply: pointers at the tensor's first element / aggregate byte.
    ``MASKED=False`` only for a tile wholly inside the tensor."""
    # A 64-bit scalar base per program and 32-bit offsets inside the tile: with 64-bit offset tensors the 16-bit
    # parameter paths on unaligned slices (scalar loads, one address per element) spilled at 128 registers on
    # Triton 3.6 (ptxas -v, sm_80 and sm_90).
    base = tile * (BLOCK_BYTES * 8)
    lbyte = tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    local = lbyte[:, None] * 8 + bit_pos[None, :]
    rem = tl.minimum(n - base, BLOCK_BYTES * 8).to(tl.int32)
    mask = local < rem
    bmask = lbyte * 8 < rem
    if AVG:
        q = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
        plane_ptr = agg_ptr + tile * BLOCK_BYTES + lbyte  # plane k at k * agg_stride: added, never a 32-bit product
        for k in tl.static_range(NBITS):
            plane = _load(plane_ptr, bmask, MASKED).to(tl.int32)
            q += ((plane[:, None] >> bit_pos[None, :]) & 1) << k
            plane_ptr += agg_stride
        # IEEE division, as the reference's table: `/` would be div.full.f32 (2 ulp) on the GPU.
        delta = tl.math.div_rn((2 * q - N_RANKS).to(tl.float32), tl.full((BLOCK_BYTES, 8), N_RANKS, tl.float32))
    else:
        plane = _load(agg_ptr + tile * BLOCK_BYTES + lbyte, bmask, MASKED).to(tl.int32)
        delta = (2 * ((plane[:, None] >> bit_pos[None, :]) & 1) - 1).to(tl.float32)
    p_ptr += base
    p = _load(p_ptr + local, mask, MASKED)
    p_new = p.to(tl.float32) * decay - delta * lr
    if STOCHASTIC:  # bf16 only (the launcher checks): 16 random bits per element from (seed, elem_offset + idx)
        hidx = (base + elem_offset).to(tl.uint32) + local.to(tl.uint32)  # (elem_offset + idx) mod 2**32
        rand16 = _hash32(hidx, seed.to(tl.uint32)) >> 16
        _store(p_ptr + local, _cast_bf16_stochastic(p_new, rand16), mask, MASKED)
    else:
        _store(p_ptr + local, _cast_rne(p_new, p.dtype), mask, MASKED)
    m_ptr += base
    m = _load(m_ptr + local, mask, MASKED)
    if HAS_GRAD:
        g = _load(g_ptr + base + local, mask, MASKED).to(tl.float32)
        m = m * c2 + g * d2
    else:
        m = m * c2
    _store(m_ptr + local, m, mask, MASKED)


# N is a compile-time constant as in vote_count: a runtime int argument equal to 1 would become a constexpr in a
# real launch anyway (and a constexpr has no ``.to``: the Avg path failed to compile at N = 1 that way). The seed is
# not specialised: a seed of 1 would otherwise compile a kernel of its own.
@triton.jit(do_not_specialize=["seed"])
def _lion_apply_kernel(p_ptr, m_ptr, g_ptr, agg_ptr, agg_stride, n, decay, lr, c2, d2, seed, elem_offset,
                       N_RANKS: tl.constexpr, HAS_GRAD: tl.constexpr, AVG: tl.constexpr, NBITS: tl.constexpr,
                       STOCHASTIC: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    _apply_tile(p_ptr, m_ptr, g_ptr, agg_ptr, agg_stride, tl.program_id(0).to(tl.int64), n, decay, lr, c2, d2, seed,
                elem_offset, N_RANKS, HAS_GRAD, AVG, NBITS, STOCHASTIC, True, BLOCK_BYTES)


@triton.jit(do_not_specialize=["seed"])
def _lion_apply_multi_kernel(p_base, p_deltas, g_base, g_deltas, tiles_ptr, spans_ptr, m_ptr, agg_ptr, agg_stride,
                             decay, lr, c2, d2, seed, elem_base, N_RANKS: tl.constexpr, HAS_GRAD: tl.constexpr,
                             AVG: tl.constexpr, NBITS: tl.constexpr, STOCHASTIC: tl.constexpr,
                             DELTA_MULTIPLE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # The tables as in _lion_votes_multi_kernel; a tensor's bucket offset plus elem_base is its stochastic-rounding
    # offset.
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(tiles_ptr + 2 * pid)
    tile = tl.load(tiles_ptr + 2 * pid + 1)
    off = tl.multiple_of(tl.load(spans_ptr + 2 * ti), 8)
    n = tl.load(spans_ptr + 2 * ti + 1)
    p_ptr = p_base + tl.multiple_of(tl.load(p_deltas + ti), DELTA_MULTIPLE)
    g_ptr = g_base
    if HAS_GRAD:
        g_ptr = g_base + tl.multiple_of(tl.load(g_deltas + ti), DELTA_MULTIPLE)
    if (tile + 1) * (BLOCK_BYTES * 8) <= n:
        _apply_tile(p_ptr, m_ptr + off, g_ptr, agg_ptr + off // 8, agg_stride, tile, n, decay, lr, c2, d2, seed,
                    off + elem_base, N_RANKS, HAS_GRAD, AVG, NBITS, STOCHASTIC, False, BLOCK_BYTES)
    else:
        _apply_tile(p_ptr, m_ptr + off, g_ptr, agg_ptr + off // 8, agg_stride, tile, n, decay, lr, c2, d2, seed,
                    off + elem_base, N_RANKS, HAS_GRAD, AVG, NBITS, STOCHASTIC, True, BLOCK_BYTES)


def _lr_delta_table_ref(n_ranks: int, aggregation: str, lr: float, device) -> torch.Tensor:
    """``Delta * lr`` for every aggregate value, in fp32, rounded exactly as the kernel rounds ``delta * lr``.

    MaVo: [256, 8], row ``v`` the 8 values of packed byte ``v`` (Delta = +-1 exactly). Avg: [N+1], entry ``q`` the
    value of ``(2q - N) / N`` (computed once in the kernel's fp32 operations, then looked up).
    """
    if aggregation == "mavo":
        return (byte_bits_table(device).float() * 2 - 1) * f32(lr)
    values = torch.arange(n_ranks + 1, dtype=torch.int32, device=device)
    return (2 * values - n_ranks).float() / float(n_ranks) * f32(lr)


def _lr_delta_ref(table: torch.Tensor, agg: torch.Tensor, n: int, n_ranks: int, aggregation: str) -> torch.Tensor:
    """``Delta * lr`` of ``n`` elements from their packed aggregate, looked up in :func:`_lr_delta_table_ref`."""
    if aggregation == "mavo":
        return table.index_select(0, agg[0].long()).view(-1)[:n]
    q = torch.zeros(n, dtype=torch.uint8, device=agg.device)
    for k in range(aggregate_bits(aggregation, n_ranks)):
        q |= unpack_bits_ref(agg[k], n) << k
    return table.index_select(0, q.long())


def _check_rounding(param: torch.Tensor, rounding_seed: int | None, elem_offset: int) -> bool:
    """Validate the stochastic-rounding arguments; True when ``param`` is to be rounded stochastically."""
    if rounding_seed is not None and (isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int)
                                      or not 0 <= rounding_seed < 2**31):
        raise ValueError(f"rounding_seed={rounding_seed!r}; expected None or an int in [0, 2**31)")
    if isinstance(elem_offset, bool) or not isinstance(elem_offset, int) or elem_offset < 0:
        raise ValueError(f"elem_offset={elem_offset!r}; expected a non-negative int")
    if rounding_seed is None or param.dtype == torch.float32:  # fp32: the result is already the fp32 value
        return False
    if param.dtype != torch.bfloat16:
        raise ValueError(f"rounding_seed is supported for bfloat16 and float32 parameters, got {param.dtype}; "
                         "pass rounding_seed=None for float16 (or keep fp32 master weights)")
    return True


def lion_apply_ref(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor | None, agg: torch.Tensor,
                   n_ranks: int, lr: float, weight_decay: float, beta2: float, aggregation: str, *,
                   rounding_seed: int | None = None, elem_offset: int = 0) -> None:
    """Torch reference of :func:`lion_apply` (in place on ``param`` and ``exp_avg``)."""
    stochastic = _check_rounding(param, rounding_seed, elem_offset)
    data = param.detach()
    flat = data.reshape(-1)  # a view when contiguous; otherwise a copy, written back below
    m = exp_avg.view(-1)
    g = grad.reshape(-1) if grad is not None else None
    decay, c2, d2 = f32(1.0 - lr * weight_decay), f32(beta2), f32(1.0 - beta2)
    table = _lr_delta_table_ref(n_ranks, aggregation, lr, agg.device)
    for s, e in ref_chunks(flat.numel()):
        lr_delta = _lr_delta_ref(table, agg[:, s // 8:-(-e // 8)], e - s, n_ranks, aggregation)
        p = flat[s:e] if flat.dtype == torch.float32 else flat[s:e].float()  # fp32: in place
        if weight_decay:
            p.mul_(decay)
        p.sub_(lr_delta)
        if stochastic:
            idx = torch.arange(elem_offset + s, elem_offset + e, dtype=torch.int64, device=p.device)
            flat[s:e] = round_bf16_stochastic_ref(p, hash32_ref(rounding_seed, idx) >> 16)
        elif flat.dtype != torch.float32:
            flat[s:e] = p  # rounded to the parameter's dtype (round to nearest even)
        mc = m[s:e]
        mc.mul_(c2)
        if g is not None:
            mc.add_(g[s:e].float() * d2)
    if flat.data_ptr() != data.data_ptr():
        data.copy_(flat.view_as(data))


def lion_apply(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor | None, agg: torch.Tensor,
               n_ranks: int, lr: float, weight_decay: float, beta2: float, aggregation: str, *,
               rounding_seed: int | None = None, elem_offset: int = 0) -> None:
    """Apply the aggregated update in place: ``p <- p*(1-lr*wd) - lr*Delta``, then ``m <- b2*m + (1-b2)*g``.

    Args:
        param: the parameter (fp32/bf16/fp16; math in fp32, result rounded to its dtype).
        exp_avg: its fp32 momentum (contiguous).
        grad: its local gradient, or None for zeros.
        agg: uint8 ``[nbits, ceil(n/8)]`` packed aggregate (rows may be strided views of a bucket).
        n_ranks: N. lr, weight_decay, beta2: the group's hyper-parameters. aggregation: ``"mavo"`` or ``"avg"``.
        rounding_seed: None (round to nearest even), or an int in [0, 2**31): a bfloat16 ``param`` is then rounded
            stochastically (unbiased) with random bits from ``hash32(rounding_seed, elem_offset + flat index)``;
            the caller derives a fresh seed per step. Ignored for float32 (nothing to round); float16 raises.
        elem_offset: added to the flat index in the hash, so that a parameter's random stream does not depend on
            how parameters are grouped into launches (e.g. its offset in the flat parameter space).
    """
    nbits = aggregate_bits(aggregation, n_ranks)
    n = param.numel()
    check_float("param", param)
    if exp_avg.dtype != torch.float32 or exp_avg.numel() != n or not exp_avg.is_contiguous():
        raise ValueError("exp_avg must be a contiguous float32 tensor with param's numel")
    if agg.dtype != torch.uint8 or agg.dim() != 2 or agg.shape[0] != nbits or agg.shape[1] * 8 < n \
            or agg.stride(1) != 1:
        raise ValueError(f"agg must be uint8 [{nbits}, >= {-(-n // 8)}] with contiguous rows; "
                         f"got {agg.dtype} {tuple(agg.shape)}")
    if grad is not None:
        check_float("grad", grad)
        if grad.numel() != n:
            raise ValueError(f"grad has {grad.numel()} elements, param {n}")
    stochastic = _check_rounding(param, rounding_seed, elem_offset)
    if not use_triton(param, exp_avg, grad, agg):
        return lion_apply_ref(param, exp_avg, grad, agg, n_ranks, lr, weight_decay, beta2, aggregation,
                              rounding_seed=rounding_seed, elem_offset=elem_offset)
    if n == 0:
        return None
    data = param.detach()
    target = data if data.is_contiguous() else data.contiguous()
    g = check_contiguous("grad", grad).reshape(-1) if grad is not None else exp_avg
    grid = (triton.cdiv(-(-n // 8), _BLOCK_BYTES),)
    launch(_lion_apply_kernel, grid, target, exp_avg, g, agg, agg.stride(0), n, f32(1.0 - lr * weight_decay),
           f32(lr), f32(beta2), f32(1.0 - beta2), rounding_seed if stochastic else 0, elem_offset,
           # MaVo never reads N: one compilation serves every group size
           N_RANKS=n_ranks if aggregation == "avg" else 0, HAS_GRAD=grad is not None, AVG=aggregation == "avg",
           NBITS=nbits,
           STOCHASTIC=stochastic, BLOCK_BYTES=_BLOCK_BYTES, num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
    if target is not data:
        data.copy_(target)
    return None


# --------------------------------------------------------------------------------------------- multi-tensor
# The optimizer's step over a bucket of T separately allocated tensors is 2T launches (votes, apply); at ~5-10 us
# of host time per Triton launch a GPT's ~150 tensors keep the GPU waiting (benchmarks/RESULTS.md, "First GPU
# run": 0.45 ms of GPU time in a 1.5 ms step). The multi-tensor launchers run one program per tile of any tensor
# of a bucket, in one launch per kind of tensor (dtypes, gradient or not, 16-byte aligned or not, address modulo
# the element size): each tensor's address goes to the device as an int64 offset in elements from the first
# tensor of its kind, which is a pointer argument (cached tables: the allocator hands the same gradient addresses
# out step after step, so steady state uploads nothing). Raw addresses cast to pointers would lose the alignment
# the compiler needs to vectorise; an offset from a 16-byte aligned argument, hinted as a multiple of 16 bytes,
# keeps it, and full tiles run unmasked: their PTX has the single-tensor kernels' 16-byte accesses
# (tests/test_gpu_compile.py). Each tensor's momentum, votes and aggregate sit at its offset in the bucket's flat
# buffers. Same tile code as the single-tensor kernels, hence the same bits; the references are the single-tensor
# references over each tensor's slices.
MULTI_TENSOR = True  # False: the multi-tensor launchers launch once per tensor (benchmarks/gpu_check.py compares)
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 256


def _cached(key, build):
    value = _TABLE_CACHE.get(key)
    if value is None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.clear()
        value = _TABLE_CACHE[key] = build()
    return value


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host sync (the host allocator keeps it alive)
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _tile_tables(device: torch.device, numels: tuple[int, ...], offsets: tuple[int, ...]):
    """(tiles ``[n_tiles, 2]``: (tensor, tile within it), spans ``[tensors, 2]``: (bucket offset, numel)), cached."""
    def build():
        tiles = []
        for i, n in enumerate(numels):
            tiles.extend(v for t in range(triton.cdiv(triton.cdiv(n, 8), _BLOCK_BYTES)) for v in (i, t))
        spans = [v for off, n in zip(offsets, numels, strict=True) for v in (off, n)]
        return _to_device(tiles, device).view(-1, 2), _to_device(spans, device).view(-1, 2)
    return _cached(("tiles", device, numels, offsets), build)


def _deltas(device: torch.device, addrs: tuple[int, ...], size: int) -> torch.Tensor:
    """Each address's offset in elements of ``size`` bytes from the first one (the caller groups tensors whose
    addresses differ by whole elements), as a device table, cached by the addresses."""
    return _cached(("deltas", device, size, addrs), lambda: _to_device([(a - addrs[0]) // size for a in addrs],
                                                                       device))


def _describe(t: torch.Tensor | None, device_type: str) -> tuple | None:
    """``(dtype, address, 16-byte aligned, address modulo the element size)`` of a float tensor that can join a
    multi-tensor launch, or None (non-contiguous: it goes alone, through the single-tensor launcher)."""
    if t is None:
        return None
    check_float("tensor", t)
    if t.device.type != device_type:
        raise ValueError(f"a tensor is on {t.device}, the bucket on {device_type}; move them to one device")
    if not t.is_contiguous():
        return None
    addr = t.data_ptr()
    return t.dtype, addr, addr % 16 == 0, addr % t.element_size()


def _check_multi(what: str, numels: list[int], offsets: list[int], exp_avg: torch.Tensor) -> None:
    if len(numels) != len(offsets):
        raise ValueError(f"{what}: {len(numels)} tensors but {len(offsets)} offsets")
    if exp_avg.dtype != torch.float32 or exp_avg.dim() != 1 or not exp_avg.is_contiguous():
        raise ValueError(f"{what}: exp_avg must be the bucket's flat contiguous float32 momentum")
    for n, off in zip(numels, offsets, strict=True):
        if off % 8 or off < 0 or off + n > exp_avg.numel():
            raise ValueError(f"{what}: offset {off} (numel {n}) must be a multiple of 8 inside the bucket's "
                             f"{exp_avg.numel()} elements")


def _kinds(keys: list[tuple]) -> dict[tuple, list[int]]:
    """Indices of the tensors per launch kind, in order of first appearance."""
    kinds: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        kinds.setdefault(key, []).append(i)
    return kinds


def lion_votes_multi(grads: list[torch.Tensor | None], numels: list[int], offsets: list[int], exp_avg: torch.Tensor,
                     beta1: float, step: int, out: torch.Tensor, nonfinite: torch.Tensor | None = None):
    """:func:`lion_votes` of several tensors of one bucket, one launch per kind of tensor (same bits).

    Args:
        grads: each tensor's gradient (None for zeros); ``numels``: their element counts.
        offsets: each tensor's element offset in the bucket (a multiple of 8): its momentum is
            ``exp_avg[off:off + n]``, its votes ``out[off // 8:]``.
        exp_avg: the bucket's flat fp32 momentum. out: the bucket's packed votes (uint8). nonfinite: as lion_votes.
    """
    _check_multi("lion_votes_multi", numels, offsets, exp_avg)
    if len(grads) != len(numels):
        raise ValueError(f"lion_votes_multi: {len(grads)} gradients but {len(numels)} numels")
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() * 8 < exp_avg.numel():
        raise ValueError("lion_votes_multi: out must be the bucket's contiguous uint8 votes")

    def one(i):
        n, off = numels[i], offsets[i]
        lion_votes(grads[i], exp_avg[off: off + n], beta1, step, out=out[off // 8: off // 8 + -(-n // 8)],
                   nonfinite=nonfinite)

    if not use_triton(exp_avg, out) or not MULTI_TENSOR:  # each tensor's device is checked below or by one()
        for i in range(len(grads)):
            one(i)
        return out, nonfinite
    dev = exp_avg.device.type
    keys, addrs = [], []
    for g, n in zip(grads, numels, strict=True):
        d = _describe(g, dev)
        if g is not None and g.numel() != n:
            raise ValueError(f"lion_votes_multi: a gradient has {g.numel()} elements, its numel says {n}")
        addrs.append(d[1] if d is not None else 0)
        keys.append(None if n == 0 or (g is not None and d is None)
                    else (None, True, 0) if g is None else (d[0], d[2], d[3]))
    flag = nonfinite if nonfinite is not None else torch.zeros(1, dtype=torch.int32, device=exp_avg.device)
    for key, idx in _kinds(keys).items():
        if key is None or len(idx) == 1:
            for i in idx:
                one(i)
            continue
        g_dtype, aligned, _ = key
        tiles, spans = _tile_tables(exp_avg.device, tuple(numels[i] for i in idx), tuple(offsets[i] for i in idx))
        if g_dtype is not None:
            g_base = grads[idx[0]]
            g_deltas = _deltas(exp_avg.device, tuple(addrs[i] for i in idx), g_base.element_size())
        else:
            g_base, g_deltas = exp_avg, spans
        launch(_lion_votes_multi_kernel, (tiles.shape[0],), g_base, g_deltas, tiles, spans, exp_avg, out, flag,
               f32(beta1), f32(1.0 - beta1), step, HAS_GRAD=g_dtype is not None,
               DELTA_MULTIPLE=16 // g_base.element_size() if aligned else 1, BLOCK_BYTES=_BLOCK_BYTES,
               num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
    return out, nonfinite


def lion_apply_multi(params: list[torch.Tensor], grads: list[torch.Tensor | None], offsets: list[int],
                     exp_avg: torch.Tensor, agg: torch.Tensor, n_ranks: int, lr: float, weight_decay: float,
                     beta2: float, aggregation: str, *, rounding_seed: int | None = None,
                     elem_offset_base: int = 0) -> None:
    """:func:`lion_apply` of several tensors of one bucket (one param group), one launch per kind (same bits).

    Args:
        params, grads: the tensors and their gradients (None for zeros).
        offsets: each tensor's element offset in the bucket (a multiple of 8): its momentum is
            ``exp_avg[off:off + n]``, its aggregate ``agg[:, off // 8:]``; ``elem_offset_base + off`` is its
            ``elem_offset`` for stochastic rounding (a base lets slices of a shard keep their bucket coordinates).
        exp_avg: the bucket's flat fp32 momentum. agg: the bucket's aggregate ``[nbits, bucket_bytes]``.
        The rest as :func:`lion_apply`.
    """
    numels = [p.numel() for p in params]
    _check_multi("lion_apply_multi", numels, offsets, exp_avg)
    if isinstance(elem_offset_base, bool) or not isinstance(elem_offset_base, int) or elem_offset_base < 0:
        raise ValueError(f"lion_apply_multi: elem_offset_base={elem_offset_base!r}; expected a non-negative int")
    nbits = aggregate_bits(aggregation, n_ranks)
    if len(grads) != len(params):
        raise ValueError(f"lion_apply_multi: {len(grads)} gradients for {len(params)} params")
    if agg.dtype != torch.uint8 or agg.dim() != 2 or agg.shape[0] != nbits or agg.stride(1) != 1 \
            or agg.shape[1] * 8 < exp_avg.numel():
        raise ValueError(f"lion_apply_multi: agg must be uint8 [{nbits}, bucket bytes] with contiguous rows; "
                         f"got {agg.dtype} {tuple(agg.shape)}")

    def one(i):
        n, off = numels[i], offsets[i]
        lion_apply(params[i], exp_avg[off: off + n], grads[i], agg[:, off // 8: off // 8 + -(-n // 8)], n_ranks, lr,
                   weight_decay, beta2, aggregation, rounding_seed=rounding_seed, elem_offset=elem_offset_base + off)

    if not use_triton(exp_avg, agg) or not MULTI_TENSOR:  # each tensor's device is checked below or by one()
        for i in range(len(params)):
            one(i)
        return None
    dev = exp_avg.device.type
    keys, p_addrs, g_addrs = [], [], []
    for p, g, n in zip(params, grads, numels, strict=True):
        dp, dg = _describe(p, dev), _describe(g, dev)
        if g is not None and g.numel() != n:
            raise ValueError(f"lion_apply_multi: a gradient has {g.numel()} elements, its param {n}")
        stochastic = _check_rounding(p, rounding_seed, 0)
        p_addrs.append(dp[1] if dp is not None else 0)
        g_addrs.append(dg[1] if dg is not None else 0)
        if n == 0 or dp is None or (g is not None and dg is None):
            keys.append(None)
        elif g is None:
            keys.append((dp[0], None, stochastic, dp[2], dp[3], 0))
        else:
            keys.append((dp[0], dg[0], stochastic, dp[2] and dg[2], dp[3], dg[3]))
    for key, idx in _kinds(keys).items():
        if key is None or len(idx) == 1:
            for i in idx:
                one(i)
            continue
        g_dtype, stochastic, aligned = key[1], key[2], key[3]
        tiles, spans = _tile_tables(exp_avg.device, tuple(numels[i] for i in idx), tuple(offsets[i] for i in idx))
        p_base = params[idx[0]].detach()
        p_deltas = _deltas(exp_avg.device, tuple(p_addrs[i] for i in idx), p_base.element_size())
        if g_dtype is not None:
            g_base = grads[idx[0]]
            g_deltas = _deltas(exp_avg.device, tuple(g_addrs[i] for i in idx), g_base.element_size())
        else:
            g_base, g_deltas = exp_avg, p_deltas
        # 16 bytes in elements of the wider dtype read (a weaker but true hint for the narrower one)
        widest = max(p_base.element_size(), g_base.element_size() if g_dtype is not None else 0)
        multiple = 16 // widest if aligned else 1
        launch(_lion_apply_multi_kernel, (tiles.shape[0],), p_base, p_deltas, g_base, g_deltas, tiles, spans,
               exp_avg, agg, agg.stride(0), f32(1.0 - lr * weight_decay), f32(lr), f32(beta2), f32(1.0 - beta2),
               rounding_seed if stochastic else 0, elem_offset_base, N_RANKS=n_ranks if aggregation == "avg" else 0,
               HAS_GRAD=g_dtype is not None, AVG=aggregation == "avg", NBITS=nbits, STOCHASTIC=stochastic,
               DELTA_MULTIPLE=multiple, BLOCK_BYTES=_BLOCK_BYTES, num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
    return None
