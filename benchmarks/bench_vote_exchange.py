"""D-Lion's vote exchange against the fp32 all-reduce and a naive per-tensor all_gather, in one run.

Usage:
    python benchmarks/bench_vote_exchange.py [--sizes 10,100] [--ranks 2,4] [--steps 3] [--provider torch|triton]

For each model size (millions of parameters, split into 8 tensors) and world size N, spawns N gloo processes on
this machine and times one optimizer step (median over --steps) of:
  allreduce_fp32  flatten the gradients, all_reduce (sum) in fp32, average, local Lion update: what DeepSpeed's
                  engine does by default before the optimizer (wire: ring all-reduce, 64(N-1)/N bits/param)
  naive_gather    per tensor: pack sign votes, all_gather everyone's bits, vote locally, apply (the approach of
                  the unofficial reference implementation; wire: (N-1) bits/param up, none down)
  dlion_mavo      DistributedLion, majority vote (measured wire from comm_stats)
  dlion_avg       DistributedLion, average
Bits per parameter per step for D-Lion are counted by the optimizer; for the two baselines they are the payload
each rank hands to the collectives as those algorithms define it. Ratios are against allreduce_fp32 in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dp import fp32_allreduce_lion, init_gloo, median_step, synthetic_params

from distlion_ds import DistributedLion
from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.signs import pack_signs, unpack_signs


def _worker(rank, world, port, numel, steps, provider, queue):
    init_gloo(rank, world, port)
    _dispatch.INTERPRET = provider == "triton"
    params = synthetic_params(numel, rank)
    results = {}
    results["allreduce_fp32"] = (median_step(fp32_allreduce_lion(params, world), steps), 64 * (world - 1) / world)
    moms = [torch.zeros_like(p) for p in params]

    def naive_gather():
        with torch.no_grad():
            for p, m in zip(params, moms, strict=True):
                mine = pack_signs(m.mul(0.9).add_(p.grad, alpha=0.1))
                bufs = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(bufs, mine)
                total = sum(unpack_signs(b, p.numel()).to(torch.int32) for b in bufs)
                p.add_(total.sign().to(p.dtype).view_as(p), alpha=-1e-4)
                m.mul_(0.99).add_(p.grad, alpha=0.01)

    results["naive_gather"] = (median_step(naive_gather, steps), float(world - 1))

    for agg in ("mavo", "avg"):
        opt = DistributedLion(params, lr=1e-4, aggregation=agg)
        t = median_step(opt.step, steps)
        results[f"dlion_{agg}"] = (t, opt.comm_stats()["bits_per_param_step"])
        del opt
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100", help="model sizes in millions of parameters")
    ap.add_argument("--ranks", default="2,4", help="world sizes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--provider", choices=["torch", "triton"], default="torch",
                    help="torch: reference kernels on CPU (triton here means the interpreter: very slow)")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    print(f"# {time.strftime('%Y-%m-%d')}  host: {socket.gethostname()}  cores: {os.cpu_count()}  "
          f"provider: {args.provider}  backend: gloo (loopback)")
    print(f"{'params':>8} {'N':>2} {'method':<15} {'ms/step':>9} {'bits/param':>10} {'wire vs fp32':>12} "
          f"{'speed vs fp32':>13}")
    for size in [float(s) for s in args.sizes.split(",")]:
        for world in [int(r) for r in args.ranks.split(",")]:
            queue = ctx.SimpleQueue()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_worker, args=(world, port, int(size * 1e6), args.steps, args.provider, queue),
                               nprocs=world, start_method="spawn")
            res = queue.get()
            base_t, base_bits = res["allreduce_fp32"]
            for name, (t, bits) in res.items():
                print(f"{size:>7g}M {world:>2} {name:<15} {1e3 * t:9.1f} {bits:10.3f} {base_bits / bits:11.1f}x "
                      f"{base_t / t:12.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
