"""Blockwise k-bit absmax quantization (bits 2, 4, 8) with a reserved non-finite code.

The compressed-p2p codec (DESIGN.md 1, 3.3) sends activations / activation-gradients as one fp32 scale per block
plus ``bits`` per element. Both the Triton kernels and the torch reference implement exactly this, bit for bit:

- ``qmax = 2**(bits-1) - 1``. Per block of ``block_size`` consecutive elements of the flattened input:
  ``absmax`` over the block's *finite* values (fp32), ``scale = absmax / qmax`` (IEEE-rounded fp32 division).
- ``q = floor(x / scale + 0.5)`` (round half up), or ``floor(x / scale + u)`` with ``u`` in [0, 1) when
  ``stochastic`` (unbiased: E[q] = x / scale); clamped to [-qmax, qmax]; ``code = q + qmax`` in [0, 2*qmax].
  A block whose finite values are all zero has ``scale = 0``: its codes are ``qmax`` and decode to exact zeros.
- Non-finite policy: NaN and +-Inf encode to the spare code ``2**bits - 1`` and decode to NaN at the same position.
  They are left out of the block's absmax, so one bad value neither poisons nor coarsens its neighbours, and it
  is never silently turned into a finite number (a NaN in an activation stays visible downstream).
- Packing: ``8 // bits`` codes per byte, LSB first (element ``i`` of a byte at bits ``i*bits``); padding bits 0.
  Payload sizes are a pure function of ``(numel, bits, block_size)``: ``ceil(numel * bits / 8)`` code bytes and
  ``ceil(numel / block_size)`` fp32 scales, which is what lets a receiver allocate its buffer before data arrives.

``block_size`` must be a positive multiple of 8: then every block starts on a byte boundary for every ``bits``,
so a block's codes are whole bytes and each kernel program packs and stores its blocks independently.

Stochastic rounding draws ``u`` from a counter-based hash of ``(seed, flat element index)`` (kernels/_hash.py),
computed in uint32 in Triton and in int64 masked to 32 bits in torch, so both paths give identical codes for the
same seed and no RNG state is carried. The index enters modulo 2**32, so the draws of one call repeat only past 4G
elements.

GPU bits (the policy of kernels/_dispatch.py): both divisions are ``div_rn`` (IEEE-rounded, as torch divides), no
FMA contraction, 64-bit program bases with 32-bit in-tile offsets.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import check_contiguous, check_float, launch, ref_chunks, use_triton
from ._hash import MASK32, _hash32, hash32_ref
from ._triton_utils import _cast_rne

SUPPORTED_BITS = (2, 4, 8)
# One kernel program keeps a whole block in registers (absmax and quantization from one read of x). At 16384
# elements and 32 warps that is 16 per thread, at the 64-register cap (sm_90 ptxas: no spill, 32 bytes for 4-bit
# stochastic); larger blocks would spill more and buy nothing for the codec, whose scales then already cost
# 0.002 bits per element.
MAX_BLOCK_SIZE = 16384
# Elements per quantize / dequantize program (whole blocks; one block if block_size is larger). 4096 at 8 warps,
# 16 elements per thread: sm_90 ptxas gives 66-124 registers, no spills, for every bits / stochastic / dtype
# (32 per thread at 4 warps needed up to 255 and spilled), i.e. 2+ CTAs per SM, and a 64K-element test is 16
# program instances in the interpreter (~2-3 ms each).
_TILE = 4096
_ELEMS_PER_THREAD = 16

_U24 = 2.0**-24  # u = (h >> 8) * 2**-24: 24 random bits, exact in fp32, u in [0, 1)


# --------------------------------------------------------------------------------------------------- Triton


@triton.jit
def _block_tile(numel, block_size, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's [ROWS, BLOCK] tile of whole blocks: first block, element base, row/col ranges, offsets, mask.

    Offsets inside the tile are 32-bit from a 64-bit base (fewer registers than 64-bit offsets everywhere).
    """
    block0 = tl.program_id(0).to(tl.int64) * ROWS
    base = block0 * block_size
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * block_size + cols[None, :]
    mask = (cols[None, :] < block_size) & (offs < tl.minimum(numel - base, ROWS * block_size).to(tl.int32))
    return block0, base, rows, cols, offs, mask


@triton.jit
def _uniform_hash(idx, seed):
    """u in [0, 1) from (seed, idx), both uint32. Must match _uniform_ref bit for bit."""
    h = _hash32(idx, seed)
    # 24 bits times 2**-24 is exact, so contracting the caller's `y + u` into an FMA changes nothing.
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


# Both kernels tile whole blocks: a program owns ROWS consecutive blocks as a [ROWS, BLOCK] tile with
# BLOCK = next_pow2(block_size) (columns past block_size are masked), i.e. one contiguous, coalesced span of
# ROWS * block_size elements and ROWS * block_size * bits / 8 code bytes. Each scale is one row's reduction
# (quantize) or one load per row (dequantize): no per-element integer division. Offsets are a 64-bit scalar
# base per program plus 32-bit in-tile offsets: 64-bit offset tensors cost two registers per element, and at
# 16 elements per thread register pressure decides occupancy here (div_rn alone is a ~15-instruction sequence).


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 would otherwise become a constexpr and recompile
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr,
    numel, n_bytes, n_blocks, block_size, bytes_per_block, seed,
    BITS: tl.constexpr, CODES_PER_BYTE: tl.constexpr, QMAX: tl.constexpr, NONFINITE_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    block0, base, rows, cols, offs, mask = _block_tile(numel, block_size, ROWS, BLOCK)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    finite = ax < float("inf")  # False for NaN and +-Inf
    absmax = tl.max(tl.where(finite, ax, 0.0), axis=1)
    # div_rn: Triton's `/` on fp32 is an approximate (2-ulp) division on NVIDIA GPUs; torch's is IEEE-rounded.
    scale = tl.math.div_rn(absmax, tl.full([ROWS], QMAX, tl.float32))
    # An all-zero block has scale 0: divide by 1 instead of 0/0 and map everything to q = 0.
    nonzero = scale > 0.0
    safe_scale = tl.where(nonzero, scale, 1.0)
    y = tl.math.div_rn(x, tl.broadcast_to(safe_scale[:, None], [ROWS, BLOCK]))
    y = tl.where(finite & nonzero[:, None], y, 0.0)
    if STOCHASTIC:
        # The flat index modulo 2**32, as in the reference: uint32 additions wrap.
        idx = base.to(tl.uint32) + offs.to(tl.uint32)
        q = tl.floor(y + _uniform_hash(idx, seed.to(tl.uint32)))
    else:
        q = tl.floor(y + 0.5)
    # Clamp in float (tl.clamp on integers fails before Triton 3.9); |y| can exceed qmax by an ulp from rounding.
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    code = (q + QMAX).to(tl.int32)
    code = tl.where(finite, code, NONFINITE_CODE)
    code = tl.where(mask, code, 0)  # padding codes are 0, so the last byte's unused bits are 0
    if CODES_PER_BYTE > 1:
        # LSB first: the code in column c goes to bits (c % CODES_PER_BYTE) * BITS of byte c // CODES_PER_BYTE.
        # The fields are disjoint, so summing over a byte's codes is OR.
        code = code << ((cols % CODES_PER_BYTE) * BITS)[None, :]
        packed = tl.sum(tl.reshape(code, [ROWS, BLOCK // CODES_PER_BYTE, CODES_PER_BYTE]), axis=2)
    else:
        packed = code
    bcols = tl.arange(0, BLOCK // CODES_PER_BYTE)
    boffs = rows[:, None] * bytes_per_block + bcols[None, :]
    byte_base = block0 * bytes_per_block
    bmask = (bcols[None, :] < bytes_per_block) & (
        boffs < tl.minimum(n_bytes - byte_base, ROWS * bytes_per_block).to(tl.int32)
    )
    tl.store(codes_ptr + byte_base + boffs, packed.to(tl.uint8), mask=bmask)
    tl.store(scales_ptr + block0 + rows, scale, mask=rows < n_blocks - block0)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr,
    numel, n_blocks, block_size, bytes_per_block,
    BITS: tl.constexpr, CODES_PER_BYTE: tl.constexpr, QMAX: tl.constexpr, NONFINITE_CODE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    block0, base, rows, cols, offs, mask = _block_tile(numel, block_size, ROWS, BLOCK)
    byte_offs = rows[:, None] * bytes_per_block + (cols // CODES_PER_BYTE)[None, :]
    byte = tl.load(codes_ptr + block0 * bytes_per_block + byte_offs, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((cols % CODES_PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
    scale = tl.load(scales_ptr + block0 + rows, mask=rows < n_blocks - block0, other=0.0)
    val = (code - QMAX).to(tl.float32) * scale[:, None]
    val = tl.where(code == NONFINITE_CODE, float("nan"), val)
    tl.store(out_ptr + base + offs, _cast_rne(val, out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------- helpers


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_block_size(block_size: int) -> None:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or not 0 < block_size <= MAX_BLOCK_SIZE
        or block_size % 8
    ):
        raise ValueError(
            f"block_size must be a positive multiple of 8 and at most {MAX_BLOCK_SIZE} "
            f"(every block then starts on a byte boundary for any bits), got {block_size!r}"
        )


def _resolve_seed(stochastic: bool, seed: int | None) -> int:
    """The 32-bit seed the hash uses; 0 (unused) for deterministic rounding."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if not stochastic:
        return 0
    if seed is None:
        # One draw from torch's default CPU generator: torch.manual_seed(...) makes the call reproducible.
        return int(torch.randint(0, 2**32, (1,), dtype=torch.int64).item())
    return seed & MASK32


def payload_sizes(numel: int, bits: int, block_size: int) -> tuple[int, int]:
    """(code bytes, number of fp32 scales) for ``numel`` elements: a pure function of the arguments."""
    return (numel * bits + 7) // 8, -(-numel // block_size)


def _tiling(block_size: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): whole blocks per program, padded to powers of two for tl.arange."""
    block = max(8, triton.next_power_of_2(block_size))
    rows = max(1, _TILE // block)
    num_warps = max(4, min(32, rows * block // (32 * _ELEMS_PER_THREAD)))
    return rows, block, num_warps


# --------------------------------------------------------------------------------------------------- launchers


def quantize(
    x: torch.Tensor, bits: int, block_size: int, stochastic: bool = False, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax k-bit quantization of ``x`` (any shape, read flat in row-major order).

    Args:
        x: float32 / bfloat16 / float16 tensor; non-contiguous input is copied.
        bits: 2, 4 or 8 bits per element.
        block_size: elements per scale; a positive multiple of 8, at most ``MAX_BLOCK_SIZE``.
        stochastic: round stochastically (unbiased) instead of to nearest (half up).
        seed: stochastic rounding seed, used modulo 2**32; the same seed gives the same codes on every path.
            ``None`` draws one seed from torch's default generator. Ignored when ``stochastic`` is False.

    Returns:
        ``(codes, scales)``: ``codes`` uint8 of ``ceil(numel * bits / 8)`` bytes (packed LSB first),
        ``scales`` float32 of ``ceil(numel / block_size)``, both on ``x``'s device.
    """
    check_float("x", x)
    _check_bits(bits)
    _check_block_size(block_size)
    seed32 = _resolve_seed(stochastic, seed)
    if not use_triton(x):
        return quantize_ref(x, bits, block_size, stochastic=stochastic, seed=seed32)

    x = check_contiguous("x", x)
    numel = x.numel()
    n_bytes, n_blocks = payload_sizes(numel, bits, block_size)
    codes = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    if numel == 0:
        return codes, scales
    qmax = 2 ** (bits - 1) - 1
    rows, block, num_warps = _tiling(block_size)
    grid = (triton.cdiv(n_blocks, rows),)
    launch(
        _quantize_kernel, grid, x, codes, scales,
        numel, n_bytes, n_blocks, block_size, block_size * bits // 8,
        # passed as a signed int32 with the same bits, so the argument type does not depend on the value
        seed32 - 2**32 if seed32 >= 2**31 else seed32,
        BITS=bits, CODES_PER_BYTE=8 // bits, QMAX=qmax, NONFINITE_CODE=2**bits - 1,
        STOCHASTIC=stochastic, ROWS=rows, BLOCK=block, num_warps=num_warps,
    )
    return codes, scales


def _check_payload(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, numel: int,
                   dtype: torch.dtype) -> None:
    _check_bits(bits)
    _check_block_size(block_size)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype is {dtype}; supported: float32, bfloat16, float16")
    n_bytes, n_blocks = payload_sizes(numel, bits, block_size)
    if codes.dtype != torch.uint8 or codes.numel() != n_bytes:
        raise ValueError(f"codes must be uint8 with {n_bytes} elements, got {codes.dtype} with {codes.numel()}")
    if scales.dtype != torch.float32 or scales.numel() != n_blocks:
        raise ValueError(
            f"scales must be float32 with {n_blocks} elements, got {scales.dtype} with {scales.numel()}"
        )


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, numel: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(code - qmax) * scale`` in fp32, cast to ``dtype``; non-finite code -> NaN.

    Args:
        codes, scales: as returned by :func:`quantize` (any shape, read flat).
        bits, block_size: the values given to :func:`quantize`.
        numel: number of elements encoded.
        dtype: output dtype (float32 / bfloat16 / float16).

    Returns:
        1-D tensor of ``numel`` elements (the caller reshapes). For finite inputs the error is at most half a
        step, ``scale / 2`` (a whole step if rounded stochastically), plus fp32 rounding (a few ulp of the
        block's absmax) and the cast to ``dtype``.
    """
    _check_payload(codes, scales, bits, block_size, numel, dtype)
    if not use_triton(codes, scales):
        return dequantize_ref(codes, scales, bits, block_size, numel, dtype)
    codes = check_contiguous("codes", codes)
    scales = check_contiguous("scales", scales)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel == 0:
        return out
    rows, block, num_warps = _tiling(block_size)
    grid = (triton.cdiv(-(-numel // block_size), rows),)
    launch(
        _dequantize_kernel, grid, codes, scales, out,
        numel, scales.numel(), block_size, block_size * bits // 8,
        BITS=bits, CODES_PER_BYTE=8 // bits, QMAX=2 ** (bits - 1) - 1, NONFINITE_CODE=2**bits - 1,
        ROWS=rows, BLOCK=block, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------- references


def _uniform_ref(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """Torch twin of the Triton ``_uniform_hash``: idx int64, returns fp32 u in [0, 1)."""
    return (hash32_ref(seed, idx) >> 8).to(torch.float32) * _U24


def quantize_ref(
    x: torch.Tensor, bits: int, block_size: int, stochastic: bool = False, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch :func:`quantize`: the test oracle and the CPU path. Same arguments and results."""
    check_float("x", x)
    _check_bits(bits)
    _check_block_size(block_size)
    seed32 = _resolve_seed(stochastic, seed)
    numel = x.numel()
    n_bytes, n_blocks = payload_sizes(numel, bits, block_size)
    qmax = 2 ** (bits - 1) - 1
    per_byte = 8 // bits
    flat = x.reshape(-1)
    codes = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    shifts = torch.arange(per_byte, device=x.device, dtype=torch.int32) * bits
    # Whole blocks per chunk; a block's codes start on a byte (block_size is a multiple of 8).
    for s, e in ref_chunks(numel, multiple=block_size):
        b0, b1 = s // block_size, -(-e // block_size)
        xf = torch.nn.functional.pad(flat[s:e].float(), (0, (b1 - b0) * block_size - (e - s)))
        xb = xf.view(b1 - b0, block_size)
        # A sum is finite only if every element is: one reduction tells whether the NaN/Inf masks can be skipped.
        finite = None if bool(torch.isfinite(xf.sum())) else torch.isfinite(xb)
        absmax = (xb.abs() if finite is None else torch.where(finite, xb.abs(), 0.0)).amax(dim=1)
        # Tensor / tensor, never tensor / scalar: CUDA turns division by a scalar into multiplication by its
        # reciprocal, which is not the IEEE-rounded quotient the kernel computes.
        scale = absmax / torch.full_like(absmax, qmax)
        nonzero = (scale > 0)[:, None]
        y = xb / torch.where(nonzero, scale[:, None], 1.0)
        if finite is not None:
            y = torch.where(finite & nonzero, y, 0.0)
        elif not bool(nonzero.all()):  # a zero scale (all zeros, or a subnormal absmax / qmax): y must be exactly 0
            y = torch.where(nonzero, y, 0.0)
        if stochastic:
            idx = torch.arange(s, s + xf.numel(), device=x.device, dtype=torch.int64).view(b1 - b0, block_size)
            q = torch.floor(y + _uniform_ref(seed32, idx))
        else:
            q = torch.floor(y + 0.5)
        code = (q.clamp(-qmax, qmax) + qmax).to(torch.int32)
        if finite is not None:
            code = torch.where(finite, code, 2**bits - 1)
        code = code.view(-1)
        code[e - s:] = 0  # padding codes
        packed = (code.view(-1, per_byte) << shifts).sum(dim=1)  # disjoint bit fields: sum == OR
        codes[s * bits // 8: -(-e * bits // 8)] = packed[: -(-(e - s) * bits // 8)].to(torch.uint8)
        scales[b0:b1] = scale
    return codes, scales


def dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, numel: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Pure-torch :func:`dequantize`: the test oracle and the CPU path. Same arguments and result."""
    _check_payload(codes, scales, bits, block_size, numel, dtype)
    qmax = 2 ** (bits - 1) - 1
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    flat_codes, flat_scales = codes.reshape(-1), scales.reshape(-1)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    for s, e in ref_chunks(numel, multiple=block_size):
        b0, b1 = s // block_size, -(-e // block_size)
        chunk = flat_codes[s * bits // 8: -(-e * bits // 8)].to(torch.int32)
        code = ((chunk[:, None] >> shifts) & (2**bits - 1)).view(-1)
        code = torch.nn.functional.pad(code, (0, (b1 - b0) * block_size - code.numel()))
        val = (code - qmax).to(torch.float32).view(b1 - b0, block_size) * flat_scales[b0:b1, None]
        val = torch.where(code.view(b1 - b0, block_size) == 2**bits - 1, math.nan, val)
        out[s:e] = val.view(-1)[: e - s]  # rounded to dtype (round to nearest even)
    return out