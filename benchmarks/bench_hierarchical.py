"""Hierarchical D-Lion (issue 12) against flat D-Lion and the fp32 all-reduce, in one run: step time, bytes, momentum.

Usage:
    python benchmarks/bench_hierarchical.py [--sizes 4,16] [--ranks 4] [--intra-node-size 2] [--steps 3]
                                            [--aggregation mavo|avg] [--provider torch|triton]

For each model size (millions of parameters, split into 8 tensors), spawns N gloo processes on this machine
(loopback: "intra-node" and "inter-node" links are the same here, so this measures the algorithm's overhead and its
byte counts, not the win on a slow inter-node link) and times one optimizer step (median over --steps) of:
  allreduce_fp32  flatten the gradients, all_reduce (sum) in fp32, average, local Lion update (wire 64(N-1)/N
                  bits/param, all of it across nodes)
  dlion_flat      DistributedLion, every rank a voter (all of its wire crosses nodes)
  dlion_hier      DistributedLion(intra_node_size=L): N/L nodes of L consecutive ranks
Columns: bits per parameter per step that each rank sends in total, across nodes (``inter_node_bytes_sent``) and
inside a node (``intra_node_bytes_sent``), as counted by the optimizer (the all-reduce as a ring defines it, all
counted as crossing nodes); the formula (1 + b)(M-1)/M / L for the hierarchical inter-node bits; the momentum
each rank holds (MB); step time and its ratio to dlion_flat measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp
from _dp import fp32_allreduce_lion, init_gloo, median_step, synthetic_params

from distlion_ds import DistributedLion
from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.lion import aggregate_bits


def _worker(rank, world, port, numel, steps, provider, intra, aggregation, queue):
    init_gloo(rank, world, port)
    _dispatch.INTERPRET = provider == "triton"
    params = synthetic_params(numel, rank)
    results = {}
    ring = 64 * (world - 1) / world
    results["allreduce_fp32"] = (median_step(fp32_allreduce_lion(params, world), steps), ring, 0.0, 4 * numel)
    for name, kwargs in (("dlion_flat", {}), (f"dlion_hier L={intra}", {"intra_node_size": intra})):
        opt = DistributedLion(params, lr=1e-4, aggregation=aggregation, **kwargs)
        t = median_step(opt.step, steps)
        s = opt.comm_stats()
        per = 8.0 / (s["params"] * s["steps"])
        momentum = sum(v["exp_avg"].numel() * 4 for v in opt.state.values() if "exp_avg" in v)
        results[name] = (t, s["inter_node_bytes_sent"] * per, s["intra_node_bytes_sent"] * per, momentum)
        del opt
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,16", help="model sizes in millions of parameters")
    ap.add_argument("--ranks", type=int, default=4, help="data-parallel size N")
    ap.add_argument("--intra-node-size", type=int, default=2, help="L, ranks per node (must divide N)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--aggregation", choices=["mavo", "avg"], default="mavo")
    ap.add_argument("--provider", choices=["torch", "triton"], default="torch",
                    help="torch: reference kernels on CPU (triton here means the interpreter: very slow)")
    args = ap.parse_args(argv)
    world, intra = args.ranks, args.intra_node_size
    if world % intra:
        ap.error(f"--intra-node-size {intra} does not divide --ranks {world}")
    nodes = world // intra
    formula = (1 + aggregate_bits(args.aggregation, nodes)) * (nodes - 1) / nodes / intra
    ctx = mp.get_context("spawn")
    print(f"# {time.strftime('%Y-%m-%d')}  host: {socket.gethostname()}  cores: {os.cpu_count()}  "
          f"provider: {args.provider}  backend: gloo (loopback)  N={world} = {nodes} nodes x {intra}  "
          f"aggregation: {args.aggregation}  hierarchical inter-node formula: {formula:.4f} bits/param")
    print(f"{'params':>8} {'method':<16} {'ms/step':>9} {'inter b/p':>10} {'intra b/p':>10} {'inter/formula':>13} "
          f"{'momentum MB':>11} {'time vs flat':>12}")
    for size in [float(s) for s in args.sizes.split(",")]:
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(world, port, int(size * 1e6), args.steps, args.provider, intra,
                                          args.aggregation, queue), nprocs=world, start_method="spawn")
        res = queue.get()
        flat_t = res["dlion_flat"][0]
        for name, (t, inter, intra_bits, momentum) in res.items():
            vs_formula = f"{inter / formula:13.4f}" if name.startswith("dlion_hier") else f"{'':>13}"
            print(f"{size:>7g}M {name:<16} {1e3 * t:9.1f} {inter:10.4f} {intra_bits:10.4f} {vs_formula} "
                  f"{momentum / 2**20:11.2f} {t / flat_t:11.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
