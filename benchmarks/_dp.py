"""What the data-parallel benchmarks share: a gloo worker's set-up, a synthetic model, a barriered median step, and
the fp32 all-reduce + Lion baseline (DeepSpeed's default DP path, written with torch)."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on loopback; intra-op threads split the cores between the ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def synthetic_params(numel: int, rank: int) -> list[torch.nn.Parameter]:
    """``numel`` parameters in 8 tensors with gradients. Replicas start identical (DistributedLion checks it);
    gradients differ per rank, as in data parallelism."""
    sizes = [numel // 8] * 7 + [numel - 7 * (numel // 8)]
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(sizes)]
    gen = torch.Generator().manual_seed(rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def median_step(fn, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls, each between barriers, after one warm-up call."""
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


def fp32_allreduce_lion(params: list[torch.nn.Parameter], world: int):
    """The baseline step: flatten the gradients, all-reduce (sum) in fp32, average, local Lion update.
    Wire: a ring all-reduce, 64(N-1)/N bits per parameter."""
    moms = [torch.zeros_like(p) for p in params]

    def step() -> None:
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

    return step
