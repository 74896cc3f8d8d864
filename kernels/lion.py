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
the torch reference do the same fp32 operations in the same order; in the CPU interpreter their outputs are equal bit
for bit. (On a GPU the compiler may contract ``a*b + c*d`` into an FMA: the float outputs may then differ from the
reference by an ulp; the packed votes differ only where ``c`` rounds to within an ulp of zero.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import check_contiguous, check_float, ref_chunks, use_triton
from ._triton_utils import _cast_rne
from .signs import _pack_bits, _vote_bits, byte_bits_table, pack_votes_ref, tie_byte_ref, unpack_bits_ref

# Same tile as the sign kernels: 1024 packed bytes = 8192 elements per program (see signs.py).
_BLOCK_BYTES = 1024

AGGREGATIONS = ("mavo", "avg")


def f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (what a Triton scalar argument holds)."""
    return float(torch.tensor(x, dtype=torch.float32))


def aggregate_bits(aggregation: str, n_ranks: int) -> int:
    """Bits per element of the aggregate: 1 for MaVo, ceil(log2(N+1)) for Avg (DESIGN 3.2)."""
    if aggregation == "mavo":
        return 1
    if aggregation == "avg":
        return max(1, math.ceil(math.log2(n_ranks + 1)))
    raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------- worker vote
@triton.jit
def _lion_votes_kernel(g_ptr, m_ptr, out_ptr, flag_ptr, n, n_bytes, a, b, step,
                       HAS_GRAD: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit_pos[None, :]
    mask = idx < n
    m = tl.load(m_ptr + idx, mask=mask, other=0.0)
    if HAS_GRAD:
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        c = m * a + g * b
        bad = (g != g) | (tl.abs(g) == float("inf"))
        tl.atomic_max(flag_ptr, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))
    else:
        c = m * a
    bits = _vote_bits(c, idx, step) & mask
    tl.store(out_ptr + byte, _pack_bits(bits, bit_pos), mask=byte < n_bytes)


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
    _lion_votes_kernel[grid](g, exp_avg, out, flag, n, out.numel(), f32(beta1), f32(1.0 - beta1), step,
                             HAS_GRAD=grad is not None, BLOCK_BYTES=_BLOCK_BYTES)
    return out, nonfinite


# --------------------------------------------------------------------------------------------- vote count
@triton.jit
def _vote_count_kernel(recv_ptr, recv_stride, out_ptr, out_stride, n_bytes, step, elem_offset, N_RANKS: tl.constexpr,
                       AVG: tl.constexpr, NBITS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    # N is a compile-time constant: it is fixed for a run (one compilation per group size), and a runtime loop
    # bound breaks the interpreter of Triton 3.6 (a scalar argument there is a 1-element array, not an int).
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bmask = byte < n_bytes
    bit_pos = tl.arange(0, 8)
    ones = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
    for r in range(N_RANKS):
        b = tl.load(recv_ptr + r * recv_stride + byte, mask=bmask, other=0).to(tl.int32)
        ones += (b[:, None] >> bit_pos[None, :]) & 1
    if AVG:
        # q = (S + N) / 2 is just the number of +1 votes, in [0, N]: NBITS bit-planes.
        for k in tl.static_range(NBITS):
            plane = _pack_bits(((ones >> k) & 1) != 0, bit_pos)
            tl.store(out_ptr + k * out_stride + byte, plane, mask=bmask)
    else:
        s = 2 * ones - N_RANKS
        idx = elem_offset + byte[:, None] * 8 + bit_pos[None, :]
        tl.store(out_ptr + byte, _pack_bits(_vote_bits(s, idx, step), bit_pos), mask=bmask)


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
    if not use_triton(recv, out):
        return vote_count_ref(recv, n_ranks, aggregation, step, elem_offset, out)
    if n_bytes:
        grid = (triton.cdiv(n_bytes, _BLOCK_BYTES),)
        _vote_count_kernel[grid](recv, recv.stride(0), out, out.stride(0), n_bytes, step, elem_offset,
                                 N_RANKS=n_ranks, AVG=aggregation == "avg", NBITS=nbits, BLOCK_BYTES=_BLOCK_BYTES)
    return out


# --------------------------------------------------------------------------------------------- apply
@triton.jit
def _lion_apply_kernel(p_ptr, m_ptr, g_ptr, agg_ptr, agg_stride, n, n_ranks, decay, lr, c2, d2,
                       HAS_GRAD: tl.constexpr, AVG: tl.constexpr, NBITS: tl.constexpr,
                       BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit_pos = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit_pos[None, :]
    mask = idx < n
    bmask = byte * 8 < n
    if AVG:
        q = tl.zeros((BLOCK_BYTES, 8), dtype=tl.int32)
        for k in tl.static_range(NBITS):
            plane = tl.load(agg_ptr + k * agg_stride + byte, mask=bmask, other=0).to(tl.int32)
            q += ((plane[:, None] >> bit_pos[None, :]) & 1) << k
        delta = (2 * q - n_ranks).to(tl.float32) / n_ranks.to(tl.float32)
    else:
        plane = tl.load(agg_ptr + byte, mask=bmask, other=0).to(tl.int32)
        delta = (2 * ((plane[:, None] >> bit_pos[None, :]) & 1) - 1).to(tl.float32)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    p_new = p.to(tl.float32) * decay - delta * lr
    tl.store(p_ptr + idx, _cast_rne(p_new, p.dtype), mask=mask)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0)
    if HAS_GRAD:
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = m * c2 + g * d2
    else:
        m = m * c2
    tl.store(m_ptr + idx, m, mask=mask)


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


def lion_apply_ref(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor | None, agg: torch.Tensor,
                   n_ranks: int, lr: float, weight_decay: float, beta2: float, aggregation: str) -> None:
    """Torch reference of :func:`lion_apply` (in place on ``param`` and ``exp_avg``)."""
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
        if flat.dtype != torch.float32:
            flat[s:e] = p  # rounded to the parameter's dtype (round to nearest even)
        mc = m[s:e]
        mc.mul_(c2)
        if g is not None:
            mc.add_(g[s:e].float() * d2)
    if flat.data_ptr() != data.data_ptr():
        data.copy_(flat.view_as(data))


def lion_apply(param: torch.Tensor, exp_avg: torch.Tensor, grad: torch.Tensor | None, agg: torch.Tensor,
               n_ranks: int, lr: float, weight_decay: float, beta2: float, aggregation: str) -> None:
    """Apply the aggregated update in place: ``p <- p*(1-lr*wd) - lr*Delta``, then ``m <- b2*m + (1-b2)*g``.

    Args:
        param: the parameter (fp32/bf16/fp16; math in fp32, result rounded to its dtype).
        exp_avg: its fp32 momentum (contiguous).
        grad: its local gradient, or None for zeros.
        agg: uint8 ``[nbits, ceil(n/8)]`` packed aggregate (rows may be strided views of a bucket).
        n_ranks: N. lr, weight_decay, beta2: the group's hyper-parameters. aggregation: ``"mavo"`` or ``"avg"``.
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
    if not use_triton(param, exp_avg, grad, agg):
        return lion_apply_ref(param, exp_avg, grad, agg, n_ranks, lr, weight_decay, beta2, aggregation)
    if n == 0:
        return None
    data = param.detach()
    target = data if data.is_contiguous() else data.contiguous()
    g = check_contiguous("grad", grad).reshape(-1) if grad is not None else exp_avg
    grid = (triton.cdiv(-(-n // 8), _BLOCK_BYTES),)
    _lion_apply_kernel[grid](target, exp_avg, g, agg, agg.stride(0), n, n_ranks, f32(1.0 - lr * weight_decay),
                             f32(lr), f32(beta2), f32(1.0 - beta2), HAS_GRAD=grad is not None,
                             AVG=aggregation == "avg", NBITS=nbits, BLOCK_BYTES=_BLOCK_BYTES)
    if target is not data:
        data.copy_(target)
    return None
