"""A faster CPU path for D-Lion's three kernels and for TopK selection: a measured proposal, not package code.

The package's CPU path is the pure-torch reference of each kernel (DESIGN 2, STYLE 1). On a 2-core VM those
references cost ~95 ns per parameter per D-Lion step at N=4 (lion_votes ~31, lion_apply ~60 for MaVo / ~104 for
Avg, vote_count ~11 per element of a rank's 1/N shard; AdamW's foreach step costs ~10) and TopK-10 % selection
~37 ns per element (torch.topk on int32 keys). This path: ~2 + 3 + 0.3 ns (MaVo), ~12 (Avg), TopK ~3-7. The time
goes to temporaries: every ``a * b + c`` allocates fresh 4 B/element tensors (page faults on first touch), and
bit packing multiplies/sums uint8 tensors 8 elements at a time. The functions below compute the *same bits*
(tests/test_slownet.py checks them against the references, ties and zero rule included) with:
- ``numpy.packbits`` / ``unpackbits`` (``bitorder="little"`` = the LSB-first layout of DESIGN 3.3) for bits,
- per-size reusable fp32 workspaces and in-place ops, with the references' fp32 rounding order kept,
- a sum-based non-finite screen (exact check only when the sum is not finite),
- ``numpy.partition`` (introselect, O(n)) to find the TopK threshold instead of ``torch.topk``.
Anything outside the fast path's preconditions (non-fp32 parameters, non-finite values) falls back to the
reference, so results are identical in every case.

``install()`` swaps them into the names the optimizer, the vote exchange and the codecs call; ``uninstall()``
restores the originals. run.py's ``*_fastcpu`` methods use it to show what the fix buys on the slow links.
"""

from __future__ import annotations

import numpy as np
import torch

from distlion_ds.kernels import lion as _lion
from distlion_ds.kernels import topk as _topk
from distlion_ds.kernels.lion import aggregate_bits, f32

_WS: dict[tuple[str, int], torch.Tensor] = {}


def _ws(name: str, n: int) -> torch.Tensor:
    buf = _WS.get((name, n))
    if buf is None:
        buf = _WS[(name, n)] = torch.empty(n, dtype=torch.float32)
    return buf


def _tie_byte(parity_even: bool) -> int:
    # bit i of a byte that starts at an even flat index j0: element j0+i votes +1 on a tie iff (j0+i+step) is even
    return 0b01010101 if parity_even else 0b10101010


def lion_votes_fast(grad, exp_avg, beta1, step, out=None, nonfinite=None):
    if grad is None or grad.dtype != torch.float32 or not grad.is_contiguous() or exp_avg.device.type != "cpu":
        return _lion.lion_votes(grad, exp_avg, beta1, step, out, nonfinite)
    n = exp_avg.numel()
    g, m = grad.reshape(-1), exp_avg.reshape(-1)
    c, gb = _ws("c", n), _ws("gb", n)
    torch.mul(m, f32(beta1), out=c)
    torch.mul(g, f32(1.0 - beta1), out=gb)  # |g*b| <= |g|: finite g never overflows here
    if not bool(torch.isfinite(gb.sum())) and not bool(torch.isfinite(g).all()):
        return _lion.lion_votes_ref(grad, exp_avg, beta1, step, out, nonfinite)
    c.add_(gb)
    if not bool(torch.isfinite(c.sum())):  # a NaN c is a tie in the reference: let it decide
        return _lion.lion_votes_ref(grad, exp_avg, beta1, step, out, nonfinite)
    cn = c.numpy()
    packed = np.packbits(cn > 0, bitorder="little")
    packed |= np.packbits(cn == 0, bitorder="little") & _tie_byte(step % 2 == 0)
    res = torch.from_numpy(packed)
    if out is None:
        return res, nonfinite
    out.copy_(res)
    return out, nonfinite


def vote_count_fast(recv, n_ranks, aggregation, step, elem_offset=0, out=None):
    if recv.device.type != "cpu" or elem_offset % 8 or n_ranks > 255:
        return _lion.vote_count(recv, n_ranks, aggregation, step, elem_offset, out)
    nbits = aggregate_bits(aggregation, n_ranks)
    r = np.ascontiguousarray(recv[:n_ranks].numpy())
    ones = np.unpackbits(r, axis=1, bitorder="little").sum(axis=0, dtype=np.uint8)  # +1 votes per element
    if aggregation == "avg":
        res = np.stack([np.packbits((ones >> k) & 1, bitorder="little") for k in range(nbits)])
    else:
        twice = ones.astype(np.int16) * 2
        packed = np.packbits(twice > n_ranks, bitorder="little")
        packed |= np.packbits(twice == n_ranks, bitorder="little") & _tie_byte((elem_offset + step) % 2 == 0)
        res = packed[None]
    res = torch.from_numpy(res)
    if out is None:
        return res
    out.copy_(res)
    return out


def lion_apply_fast(param, exp_avg, grad, agg, n_ranks, lr, weight_decay, beta2, aggregation):
    if (param.dtype != torch.float32 or not param.is_contiguous() or grad is None or grad.dtype != torch.float32
            or param.device.type != "cpu"):
        return _lion.lion_apply(param, exp_avg, grad, agg, n_ranks, lr, weight_decay, beta2, aggregation)
    n = param.numel()
    p = param.detach().view(-1)
    upd = _ws("upd", n)
    if aggregation == "mavo":
        bits = np.unpackbits(agg[0].numpy(), count=n, bitorder="little")
        # reference: p*decay - delta*lr with delta = +-1, i.e. p*decay -+ lr. Here upd = b*(-2lr) + lr, which is
        # exactly -lr (b = 1) or +lr (b = 0): scaling by a power of two and -2lr + lr are exact in fp32.
        upd.copy_(torch.from_numpy(bits)).mul_(-2 * f32(lr)).add_(f32(lr))
    else:
        q = np.zeros(n, dtype=np.uint8)
        for k in range(aggregate_bits(aggregation, n_ranks)):
            q |= np.unpackbits(agg[k].numpy(), count=n, bitorder="little") << k
        # the reference's per-element fp32 values of -delta*lr for q = 0..N, computed with its operations
        qs = torch.arange(n_ranks + 1, dtype=torch.int32)
        lut = -(((2 * qs - n_ranks).float() / float(n_ranks)) * f32(lr))
        np.take(lut.numpy(), q, out=upd.numpy())
    decay = f32(1.0 - lr * weight_decay)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(upd)
    m = exp_avg.view(-1)
    m.mul_(f32(beta2))
    m.add_(torch.mul(grad.reshape(-1), f32(1.0 - beta2), out=upd))
    return None


def topk_select_fast(x, k):
    flat = x.reshape(-1)
    n = flat.numel()
    if x.device.type != "cpu" or k == 0 or k == n:
        return _topk.topk_select(x, k)
    a = flat.float().abs()
    if not bool(torch.isfinite(a.sum())) and bool(torch.isnan(a).any()):
        return _topk.topk_select_ref(x, k)
    key = a.view(torch.int32).numpy()  # non-negative floats order like their bit patterns
    threshold = np.partition(key, n - k)[n - k]  # the k-th largest key
    take = key > threshold
    need = k - int(np.count_nonzero(take))
    take[np.flatnonzero(key == threshold)[:need]] = True  # ties: the lower indices
    idx = torch.from_numpy(np.flatnonzero(take))
    return flat[idx], idx


_ORIGINALS: dict[tuple[object, str], object] = {}


def _targets():
    import distlion_ds.comm.vote_exchange as vx
    import distlion_ds.kernels as kernels
    import distlion_ds.optim.distributed_lion as dl

    return [(dl, "lion_votes", lion_votes_fast), (dl, "lion_apply", lion_apply_fast),
            (vx, "vote_count", vote_count_fast), (kernels, "topk_select", topk_select_fast)]


def install() -> None:
    """Route the optimizer's, the vote exchange's and the codecs' kernel calls through this module."""
    for mod, name, fn in _targets():
        _ORIGINALS.setdefault((mod, name), getattr(mod, name))
        setattr(mod, name, fn)


def uninstall() -> None:
    for (mod, name), fn in _ORIGINALS.items():
        setattr(mod, name, fn)
    _ORIGINALS.clear()
    _WS.clear()
