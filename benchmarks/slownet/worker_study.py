"""One rank of the ``study`` scenario: the loss-versus-bytes study's training step, timed on a shaped link.

Usage (run.py does this):  ip netns exec NS python -m benchmarks.slownet.worker_study SPEC.json RANK OUT.json

4 hosts, one rank each (N = 4, as benchmarks/study). Every method runs the study's exact inner step
(benchmarks/study/run.py ``_worker``): a fresh GPT of ``SUITES["study"]`` (seed 0), the rank's ``micro_batch``
sequences at ``base = (step*N + rank)*micro_batch``, forward/backward under bf16 autocast when the suite says so,
``opt.zero_grad`` / ``backward`` / ``opt.step`` with the optimizer that ``benchmarks.study.run.make_optimizer`` builds
(lr: the method's ``lr_grid(method)[0]``, wd: ``default_wd``); no lr schedule (it does not change the time).

What is timed, per method (every rank runs the same steps, so the collectives stay in lock-step):
- per-step methods (adamw, lion, dlion_mavo, dlion_avg): 2 warm-up steps, then ``steps`` timed steps;
- local methods with H inner steps per round: H warm-up steps (one whole round, its outer step included), then
  ``R*H`` timed steps with ``R = max(1, ceil(16/H))``: the outer step fires at the call that completes a round, so
  the timed window ends with one and its cost is amortised over exactly H inner steps per round.
The window is bracketed by barriers (the wall of a rank = its last barrier's end - its first one's); run.py takes the
max over ranks. Inside it: forward+backward seconds (DDP's backward includes its overlapped gradient all-reduce, so
for adamw / lion the compute-only time comes from as many extra forward+backward passes under ``no_sync()`` after the
window), the payload bytes (``comm_stats()["bytes_sent"]`` delta, or the ring model for DDP) and the host's veth
bytes (``/proc/net/dev``: TCP/IP headers, acks and the barriers included).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from . import worker
from .worker import _barrier, netdev

PER_STEP = ("adamw", "lion", "dlion_mavo", "dlion_avg")
ROUND_STEPS = 16  # time at least this many inner steps of a local method (whole rounds)


def schedule(method: str, steps: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) of ``method``: see the module docstring."""
    from benchmarks.study.common import parse_method

    spec = parse_method(method)
    if spec["kind"] in PER_STEP:
        return 2, steps
    return spec["H"], max(1, math.ceil(ROUND_STEPS / spec["H"])) * spec["H"]


def run_study(spec: dict, rank: int, world: int, dev: str) -> list[dict]:
    from benchmarks.study.common import SUITES, default_wd, lr_grid, parse_method
    from benchmarks.study.run import forward_backward, make_optimizer
    from distlion_ds.data import gpt_datasets
    from distlion_ds.gpt import GPT, GPTConfig

    p = spec["params"]
    suite = SUITES["study"]
    if world != suite.workers:
        raise ValueError(f"the study scenario runs N = {suite.workers} ranks (one per host), got {world}")
    cfg = GPTConfig(vocab_size=p["vocab_size"], seq_length=suite.seq_length, hidden_size=suite.hidden_size,
                    num_layers=suite.num_layers, num_heads=suite.num_heads)
    # the study's own sample count, so the index cache run.py built (and the study uses) is only memory-mapped
    train, _ = gpt_datasets(p["data"], suite.seq_length, suite.steps * suite.micro_batch * world,
                            suite.valid_samples)
    singleton = [dist.new_group([r]) for r in range(world)]  # global Lion's one-rank groups (make_optimizer)
    out = []
    for method in p["methods"]:
        kind = parse_method(method)["kind"]
        warmup, timed = schedule(method, p["steps"])
        if warmup + 2 * timed > suite.steps:  # DDP's compute-only passes read the next ``timed`` steps' samples
            raise ValueError(f"{method}: {warmup + 2 * timed} steps read past the study's {suite.steps} steps of data")
        torch.manual_seed(0)
        model = GPT(cfg)
        n_params = sum(q.numel() for q in model.parameters())
        opt, net = make_optimizer(method, lr_grid(method)[0], default_wd(method, suite), model, rank, singleton,
                                  suite.local_betas)
        ddp = kind in ("adamw", "lion")

        def fwd_bwd(step: int, net=net, opt=opt) -> float:
            t0 = time.perf_counter()
            forward_backward(net, opt, train, suite, step, world, rank)
            return time.perf_counter() - t0

        for step in range(warmup):
            fwd_bwd(step)
            opt.step()
        _barrier()
        rx0, tx0 = netdev(dev)
        sent0 = 0 if ddp else opt.comm_stats()["bytes_sent"]
        compute, step_s = 0.0, []
        t0 = last = time.perf_counter()
        for step in range(warmup, warmup + timed):
            compute += fwd_bwd(step)
            opt.step()
            now = time.perf_counter()
            step_s.append(now - last)
            last = now
        _barrier()
        wall = time.perf_counter() - t0
        rx1, tx1 = netdev(dev)
        sent = None if ddp else opt.comm_stats()["bytes_sent"] - sent0
        fwd_bwd_s = compute
        if ddp:  # compute only: the same passes without DDP's all-reduce (the GPT has no buffers to broadcast)
            compute = 0.0
            with net.no_sync():
                for step in range(warmup + timed, warmup + 2 * timed):
                    compute += fwd_bwd(step)
            opt.zero_grad(set_to_none=True)
            _barrier()
        out.append(dict(method=method, kind=kind, H=parse_method(method)["H"], n_params=n_params,
                        warmup_steps=warmup, steps_timed=timed, wall_s=wall, compute_s=compute, fwd_bwd_s=fwd_bwd_s,
                        step_s=step_s, payload_bytes=sent,
                        host_tx_bytes=tx1 - tx0, host_rx_bytes=rx1 - rx0))
        del opt, net, model
    return out


if __name__ == "__main__":  # the result file is written: no interpreter finalization for gloo to abort in
    from distlion_ds.comm import exit_after_teardown  # imported late: see the collective wrapping above

    worker.SCENARIOS["study"] = run_study
    exit_after_teardown(worker.main())
