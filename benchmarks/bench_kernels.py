"""Kernel throughput against the physical limit measured in the same run.

Usage:
    python benchmarks/bench_kernels.py [--provider triton|torch] [--numel 67108864] [--csv out.csv]

On a GPU (provider triton, the default there) every kernel's achieved bandwidth is reported as a fraction of a
device-to-device copy of the same bytes, measured in the same run, and topk_select is timed against torch.topk.
On a CPU (provider torch: the torch reference path, which is the CPU implementation) the references are reported
against a torch memory copy, and pack_signs against numpy.packbits on the same data.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import numpy as np
import torch
from _timing import resolve_provider, timeit

from distlion_ds import kernels as K


def copy_bandwidth(n: int, device: torch.device) -> tuple[float, float]:
    """(seconds, bytes/s) of an fp32 copy of ``n`` elements, bytes read + written: the limit the kernels face."""
    gen = torch.Generator(device=device).manual_seed(1)
    # Written memory on both sides: never-touched CPU pages all map the kernel's zero page, which turns the "copy"
    # into a cache-resident read and its bandwidth into fiction (172 GB/s measured on the 2-core VM).
    copy_src = torch.randn(n, device=device, generator=gen)
    copy_dst = torch.zeros_like(copy_src)
    t_copy = timeit(lambda: copy_dst.copy_(copy_src), device)
    return t_copy, 2 * 4 * n / t_copy


def kernel_cases(n: int, ranks: int, device: torch.device, extended: bool = False):
    """``((t_copy, copy_bw), [(name, fn, bytes moved)], x, k)`` for every launcher on ``n``-element inputs.

    ``extended`` adds the Avg, bf16 and stochastic-rounding variants (benchmarks/gpu_check.py).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=gen)
    m = torch.randn(n, device=device, generator=gen)
    p = torch.randn(n, device=device, generator=gen)
    recv = torch.randint(0, 256, (ranks, n // 8), dtype=torch.uint8, device=device, generator=gen)
    agg = K.vote_count(recv, ranks, "mavo", 1)
    k = n // 10
    codes8, scales8 = K.quantize(x, 8, 256)
    vals, idx = K.topk_select(x, k)
    t_copy, copy_bw = copy_bandwidth(n, device)
    cases = [
        ("pack_signs", lambda: K.pack_signs(x), 4 * n + n / 8),
        ("lion_votes", lambda: K.lion_votes(x, m, 0.9, 1), 8 * n + n / 8),
        (f"vote_count[N={ranks}]", lambda: K.vote_count(recv, ranks, "mavo", 1), ranks * n / 8 + n / 8),
        ("lion_apply", lambda: K.lion_apply(p, m, x, agg, ranks, 1e-6, 0.0, 0.99, "mavo"), 20 * n + n / 8),
        ("quantize[8b]", lambda: K.quantize(x, 8, 256), 4 * n + n + n / 64),
        ("quantize[4b]", lambda: K.quantize(x, 4, 256), 4 * n + n / 2 + n / 64),
        ("dequantize[8b]", lambda: K.dequantize(codes8, scales8, 8, 256, n, torch.float32), n + n / 64 + 4 * n),
        ("topk_select[10%]", lambda: K.topk_select(x, k), 4 * n + 12 * k),
        ("topk_scatter[10%]", lambda: K.topk_scatter(vals, idx, n, torch.float32), 12 * k + 4 * n),
    ]
    if extended:
        nbits = K.lion.aggregate_bits("avg", ranks)
        agg_avg = K.vote_count(recv, ranks, "avg", 1)
        xb, pb = x.to(torch.bfloat16), p.to(torch.bfloat16)
        cases += [
            ("pack_signs[bf16]", lambda: K.pack_signs(xb), 2 * n + n / 8),
            ("lion_votes[bf16 grad]", lambda: K.lion_votes(xb, m, 0.9, 1), 6 * n + n / 8),
            (f"vote_count[avg N={ranks}]", lambda: K.vote_count(recv, ranks, "avg", 1),
             ranks * n / 8 + nbits * n / 8),
            (f"lion_apply[avg N={ranks}]", lambda: K.lion_apply(p, m, x, agg_avg, ranks, 1e-6, 0.0, 0.99, "avg"),
             20 * n + nbits * n / 8),
            ("lion_apply[bf16]", lambda: K.lion_apply(pb, m, xb, agg, ranks, 1e-6, 0.0, 0.99, "mavo"),
             14 * n + n / 8),
            ("lion_apply[bf16 stochastic]", lambda: K.lion_apply(pb, m, xb, agg, ranks, 1e-6, 0.0, 0.99, "mavo",
                                                                 rounding_seed=5), 14 * n + n / 8),
            ("quantize[2b stochastic]", lambda: K.quantize(x, 2, 256, True, seed=3), 4 * n + n / 4 + n / 64),
        ]
    return (t_copy, copy_bw), cases, x, k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=["triton", "torch"], default=None,
                    help="triton: the Triton kernels (needs CUDA); torch: the torch references")
    ap.add_argument("--numel", type=int, default=None, help="elements per tensor (default: 64M GPU, 8M CPU)")
    ap.add_argument("--ranks", type=int, default=4, help="voters in vote_count")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    provider, device = resolve_provider(ap, args.provider)
    n = args.numel or ((64 << 20) if device.type == "cuda" else (8 << 20))
    (t_copy, copy_bw), cases, x, k = kernel_cases(n, args.ranks, device)
    rows = [{"kernel": "copy (limit)", "provider": provider, "device": str(device), "numel": n,
             "ms": 1e3 * t_copy, "GB/s": copy_bw / 1e9, "frac_of_copy": 1.0, "vs_baseline": ""}]
    for name, fn, nbytes in cases:
        t = timeit(fn, device)
        rows.append({"kernel": name, "provider": provider, "device": str(device), "numel": n, "ms": 1e3 * t,
                     "GB/s": nbytes / t / 1e9, "frac_of_copy": nbytes / t / copy_bw, "vs_baseline": ""})
        if name.startswith("pack_signs") and device.type == "cpu":
            xn = x.numpy()
            t_np = timeit(lambda xn=xn: np.packbits(xn > 0, bitorder="little"), device)
            rows[-1]["vs_baseline"] = f"{t_np / t:.2f}x numpy.packbits ({1e3 * t_np:.1f} ms)"
        if name.startswith("topk_select"):
            t_ref = timeit(lambda: torch.topk(x.abs(), k, sorted=False), device)
            rows[-1]["vs_baseline"] = f"{t_ref / t:.2f}x torch.topk ({1e3 * t_ref:.1f} ms)"

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {time.strftime('%Y-%m-%d')}  device: {name}  provider: {provider}  numel: {n}")
    print(f"{'kernel':<20} {'ms':>9} {'GB/s':>8} {'of copy':>8}  vs baseline")
    for r in rows:
        print(f"{r['kernel']:<20} {r['ms']:9.3f} {r['GB/s']:8.2f} {r['frac_of_copy']:8.2f}  {r['vs_baseline']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
