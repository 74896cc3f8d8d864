"""The compressed tied-embedding gradient all-reduce against megatron-core's fp32 all-reduce, side by side.

Usage:
    python benchmarks/bench_tied_embedding.py [--millions 1,4] [--steps 5]

Two gloo ranks (the first and last pipeline stage of a tied GPT) on loopback. For each gradient size and codec
(distlion_ds.megatron.tied.TiedEmbeddingCompressor: none, 8-bit and 4-bit block quantization with error feedback,
TopK 10 % / 1 % with error feedback) it times the median all-reduce and counts the bytes each rank sends, and prints
both as ratios against ``torch.distributed.all_reduce`` of the fp32 gradient measured in the same run. Loopback makes
the wire nearly free, so the time ratio here is the codec's CPU cost; the byte ratio is what a slow link sees.
"""

from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dp import init_gloo, median_step

CASES = [
    ("none (our transport, fp32)", {"method": "none"}),
    ("quantize 8-bit/256 + EF", {"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}),
    ("quantize 4-bit/256 + EF", {"method": "quantize", "bits": 4, "block_size": 256, "feedback": "ef"}),
    ("topk 10 % + EF", {"method": "topk", "ratio": 0.1, "feedback": "ef"}),
    ("topk 1 % + EF", {"method": "topk", "ratio": 0.01, "feedback": "ef"}),
]


def _worker(rank: int, world: int, port: int, millions: list[float], steps: int) -> None:
    from distlion_ds.megatron.tied import TiedEmbeddingCompressor

    init_gloo(rank, world, port)
    for m in millions:
        numel = int(m * 1e6)
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        x = grad.clone()

        def fp32(x=x, grad=grad) -> None:
            x.copy_(grad)
            dist.all_reduce(x)

        base_t, base_b = median_step(fp32, steps), 4 * numel
        rows = [("fp32 all_reduce (megatron-core)", base_t, base_b)]
        for name, cfg in CASES:
            comp = TiedEmbeddingCompressor(cfg)

            def compressed(comp=comp, x=x, grad=grad) -> None:
                x.copy_(grad)
                comp.all_reduce_(x, None)

            t = median_step(compressed, steps)
            stats = comp.comm_stats()["word_embeddings"]
            rows.append((name, t, stats["bytes_sent"] // stats["transfers"]))
        if rank == 0:
            print(f"\n{numel:,} fp32 elements, {world} ranks, median of {steps}")
            print("| channel | ms | x fp32 time | MB sent/rank | x fp32 bytes |")
            print("|---|---|---|---|---|")
            for name, t, b in rows:
                print(f"| {name} | {t * 1e3:.1f} | {t / base_t:.2f} | {b / 1e6:.2f} | {b / base_b:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", default="1,4", help="gradient sizes in millions of elements")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    millions = [float(v) for v in args.millions.split(",")]
    mp.start_processes(_worker, args=(2, port, millions, args.steps), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
