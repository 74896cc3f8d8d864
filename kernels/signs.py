"""1-bit sign packing: the vote encoding of D-Lion (DESIGN 3.1 step 2, layout of 3.3).

Bit ``i`` (LSB first) of byte ``k`` is the vote of element ``8k + i``: 1 means +1, 0 means -1; the padding bits of
the last byte are 0. One bit cannot say 0, so an exact zero votes by the zero rule: +1 when ``(j + step)`` is even,
else -1 (``j`` = flat index). A value that is never nonzero therefore alternates its vote and never drifts, where a
fixed tie-to--1 rule would push it down by lr every step. NaN compares neither > 0 nor < 0 and follows the same
rule; the optimizer never votes on NaN because a non-finite gradient skips the whole step (DESIGN 3.1 step 7).

GPU bits: comparisons only (no rounding), launched under the policy of kernels/_dispatch.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_contiguous, check_float, launch, ref_chunks, use_triton

# 1024 bytes = 8192 elements per program: a 32 KiB fp32 read per program keeps a GPU SM's loads coalesced,
# and in the CPU interpreter (~2-3 ms per program instance) a 64K-element test is only 8 programs.
_BLOCK_BYTES = 1024


@triton.jit
def _vote_bits(c, idx, step):
    """+1 (True) where c > 0; the zero rule where c is 0 or NaN. Shared by every kernel that votes."""
    tie = (c == 0) | (c != c)
    return (c > 0) | (tie & (((idx + step) & 1) == 0))


@triton.jit
def _pack_bits(bits, bit_pos):
    """[B, 8] booleans -> [B] uint8, bit i of a byte from column i."""
    return tl.sum(bits.to(tl.int32) << bit_pos[None, :], axis=1).to(tl.uint8)


@triton.jit
def _pack_signs_kernel(x_ptr, out_ptr, n, n_bytes, step, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit_pos[None, :]
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    bits = _vote_bits(x, idx, step) & mask
    tl.store(out_ptr + byte, _pack_bits(bits, bit_pos), mask=byte < n_bytes)


@triton.jit
def _unpack_signs_kernel(packed_ptr, out_ptr, n, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit_pos[None, :]
    mask = idx < n
    b = tl.load(packed_ptr + byte, mask=byte * 8 < n, other=0).to(tl.int32)
    bits = (b[:, None] >> bit_pos[None, :]) & 1
    tl.store(out_ptr + idx, (2 * bits - 1).to(tl.int8), mask=mask)


def tie_byte_ref(step: int, offset: int = 0) -> int:
    """The zero rule's votes for the 8 elements of one packed byte, as a byte (bit i = element ``j0 + i``).

    +1 where ``(j + step)`` is even. Every byte of a tensor whose first element has flat index ``offset`` starts at
    an index ``j0`` of the parity of ``offset``, so one byte describes them all.
    """
    return 0x55 if (offset + step) % 2 == 0 else 0xAA


def pack_votes_ref(c: torch.Tensor, step: int, offset: int = 0) -> torch.Tensor:
    """Packed votes (bit 1 = +1) of a flat float tensor whose first element has flat index ``offset``."""
    # "not < 0" is "> 0, == 0 or NaN": where the zero rule says +1, only a negative value votes -1.
    return pack_bits_ref(c > 0) | (pack_bits_ref(~(c < 0)) & tie_byte_ref(step, offset))


# Byte i of a little-endian int64 whose 8 bytes are each 0 or 1 lands, multiplied by this constant, on bit 56+i of
# the product with no carries: one multiply and one shift pack 8 votes (the CPU path runs on 100M-element buckets,
# where an 8-way weighted sum costs ~5x more).
_PACK_MAGIC = 0x0102040810204080


def pack_bits_ref(bits: torch.Tensor) -> torch.Tensor:
    """Flat booleans (or 0/1 integers) -> uint8[ceil(n/8)], LSB first, padding bits 0."""
    n = bits.numel()
    n_bytes = -(-n // 8)
    padded = torch.zeros(n_bytes * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.reshape(-1)
    return ((padded.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def byte_bits_table(device: torch.device) -> torch.Tensor:
    """uint8 [256, 8]: row ``v`` holds the bits of byte value ``v``, LSB first."""
    table = _BYTE_BITS.get(device)
    if table is None:
        table = (torch.arange(256, device=device).reshape(-1, 1) >> torch.arange(8, device=device)) & 1
        table = _BYTE_BITS[device] = table.to(torch.uint8)
    return table


def unpack_bits_ref(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> the first ``numel`` bits as uint8 0/1 (one table row per byte: 2x faster than shifts)."""
    rows = byte_bits_table(packed.device).index_select(0, packed.reshape(-1).long())
    return rows.view(-1)[:numel]


def pack_signs_ref(x: torch.Tensor, step: int = 1) -> torch.Tensor:
    """Torch reference of :func:`pack_signs`."""
    flat = x.reshape(-1)
    out = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=x.device)
    for s, e in ref_chunks(flat.numel()):
        out[s // 8:-(-e // 8)] = pack_votes_ref(flat[s:e].float(), step, s)
    return out


def unpack_signs_ref(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Torch reference of :func:`unpack_signs`."""
    return unpack_bits_ref(packed, numel).to(torch.int8) * 2 - 1


def _check_packed(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed has dtype {packed.dtype}; expected torch.uint8")
    if numel < 0 or packed.numel() * 8 < numel:
        raise ValueError(f"numel={numel} needs {-(-numel // 8)} packed bytes; got {packed.numel()}")
    return check_contiguous("packed", packed.reshape(-1))


def pack_signs(x: torch.Tensor, step: int = 1) -> torch.Tensor:
    """Pack the sign votes of ``x`` (flattened, row-major) into bits.

    Args:
        x: float32/bfloat16/float16 tensor of any shape; non-contiguous input is copied.
        step: optimizer step ``t`` (from 1), used only by the zero rule.
    Returns:
        uint8 tensor of ``ceil(x.numel() / 8)`` bytes on ``x``'s device.
    """
    check_float("x", x)
    if not use_triton(x):
        return pack_signs_ref(x, step)
    x = check_contiguous("x", x).reshape(-1)
    n = x.numel()
    out = torch.empty(-(-n // 8), dtype=torch.uint8, device=x.device)
    if n:
        grid = (triton.cdiv(out.numel(), _BLOCK_BYTES),)
        launch(_pack_signs_kernel, grid, x, out, n, out.numel(), step, BLOCK_BYTES=_BLOCK_BYTES)
    return out


def unpack_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: int8 tensor of ``numel`` votes, each +1 or -1."""
    packed = _check_packed(packed, numel)
    if not use_triton(packed):
        return unpack_signs_ref(packed, numel)
    out = torch.empty(numel, dtype=torch.int8, device=packed.device)
    if numel:
        grid = (triton.cdiv(-(-numel // 8), _BLOCK_BYTES),)
        launch(_unpack_signs_kernel, grid, packed, out, numel, BLOCK_BYTES=_BLOCK_BYTES)
    return out
