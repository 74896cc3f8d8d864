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
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distlion_ds import DistributedLion
from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.lion import aggregate_bits


def _median_step(fn, steps):
    fn()  # warm-up: buckets, buffers, groups
    dist.barrier()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, port, numel, steps, provider, intra, aggregation, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _dispatch.INTERPRET = provider == "triton"
    sizes = [numel // 8] * 7 + [numel - 7 * (numel // 8)]
    # Replicas start identical (DistributedLion checks it); gradients differ per rank, as in data parallelism.
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(sizes)]
    gen = torch.Generator().manual_seed(rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    results = {}
    moms = [torch.zeros_like(p) for p in params]

    def allreduce_fp32():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat.div_(world)
        off = 0
        with torch.no_grad():
            for p, m in zip(params, moms, strict=True):
                g = flat[off: off + p.numel()].view_as(p)
                off += p.numel()
                p.add_(m.mul(0.9).add_(g, alpha=0.1).sign_(), alpha=-1e-4)
                m.mul_(0.99).add_(g, alpha=0.01)

    ring = 64 * (world - 1) / world
    results["allreduce_fp32"] = (_median_step(allreduce_fp32, steps), ring, 0.0, 4 * numel)
    for name, kwargs in (("dlion_flat", {}), (f"dlion_hier L={intra}", {"intra_node_size": intra})):
        opt = DistributedLion(params, lr=1e-4, aggregation=aggregation, **kwargs)
        t = _median_step(opt.step, steps)
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
