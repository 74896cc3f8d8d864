"""Cost of DistributedLion's replica check against its step, measured side by side, to set the default cadence.

Usage:
    python benchmarks/bench_replica_check.py [--millions 10,50] [--ranks 2] [--steps 5]

For each model size, spawns N gloo processes and times (median over --steps) one ``DistributedLion.step()`` and one
``check_replicas()`` (a bit checksum of every parameter plus the hyper-parameters, one all_gather of a few int64).
Prints the check's cost as a fraction of a step and the smallest cadence K (check every K steps) that keeps the
amortised cost at or below 0.1 % of the optimizer step alone (the whole training step is larger still).
"""

from __future__ import annotations

import argparse
import math
import socket

import torch.distributed as dist
import torch.multiprocessing as mp
from _dp import init_gloo, median_step, synthetic_params

from distlion_ds import DistributedLion
from distlion_ds.optim.distributed_lion import DEFAULT_CHECK_REPLICAS_EVERY


def _worker(rank, world, port, numel, steps, queue):
    init_gloo(rank, world, port)
    params = synthetic_params(numel, rank)
    opt = DistributedLion(params, lr=1e-4, check_replicas_every=0)
    step = median_step(opt.step, steps)
    check = median_step(opt.check_replicas, steps)
    if rank == 0:
        queue.put((step, check))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", default="10,50")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    default = DEFAULT_CHECK_REPLICAS_EVERY
    print(f"| params | N | step ms | check ms | check / step | cadence for <= 0.1 % | cost at default {default} |")
    print("|---|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for millions in (float(m) for m in args.millions.split(",")):
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(args.ranks, port, int(millions * 1e6), args.steps, queue),
                           nprocs=args.ranks, start_method="spawn")
        step, check = queue.get()
        ratio = check / step
        print(f"| {millions:g}M | {args.ranks} | {step * 1e3:.1f} | {check * 1e3:.2f} | {ratio:.3f} | "
              f"{math.ceil(ratio / 1e-3)} | {100 * ratio / DEFAULT_CHECK_REPLICAS_EVERY:.3f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
