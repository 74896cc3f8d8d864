"""The main demo: the same tiny GPT trained by 4 data-parallel workers with AdamW, global Lion, D-Lion MaVo, D-Lion
Avg and local-step D-Lion for the same token budget, on a real corpus (the Python standard library,
SentencePiece-tokenised).

    python -m distlion_ds.demo [--workers 4] [--steps 300] [--out runs/demo]

AdamW and global Lion all-reduce fp32 gradients every step (torch DDP); D-Lion sends one bit per parameter up and
1 (MaVo) or ceil(log2(N+1)) (Avg) bits back; local-step D-Lion does that once per 10 steps. Prints a table (final
validation loss, wire bits per parameter per step, wall time; the same Markdown table as the README's), writes
``<out>/summary.json``, ``<out>/table.md`` and ``<out>/loss.png``. Two runs on the same machine print the same losses
to the last digit (the wall times differ).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import socket
import sys
import time

import torch

from distlion_ds.data import gpt_datasets, prepare
from distlion_ds.gpt import GPT, GPTConfig

logger = logging.getLogger(__name__)

# Learning rates and weight decays: the best of the demo-scale lr x weight-decay sweep (benchmarks/study, suite
# "demo": this exact model, data and schedule, 4 workers, 300 steps, seed 0; table and commands in docs/RESULTS.md).
# One seed: differences below ~0.1 in validation loss decide nothing. Lion-family lrs are ~3-10x below AdamW's
# (Chen et al. 2023, sec. 5).
METHODS = {
    "adamw": dict(optimizer="adamw", lr=2e-3, weight_decay=0.0),
    "lion": dict(optimizer="lion", lr=8e-4, weight_decay=0.1),
    "dlion_mavo": dict(optimizer="dlion", aggregation="mavo", lr=4e-4, weight_decay=0.1),
    "dlion_avg": dict(optimizer="dlion", aggregation="avg", lr=8e-4, weight_decay=0.1),
    # Local-step D-Lion (issue 13): 10 AdamW steps per worker alone (lr 2e-3, wd 0.1, the schedule below), then one
    # 1-bit D-Lion outer step on the pseudo-gradient (outer lr 4e-3 on the same schedule, no outer weight decay).
    # Outer betas (0.0, 0.99): the vote is the sign of the round's pseudo-gradient alone; the demo-scale ablation
    # (benchmarks/study/results/demo/betas/) gave 5.3667 against 5.4325 with beta1 0.5 and 5.6550 with LocalStepsLion's
    # default 0.9. 10 divides the 300 steps, so the run ends on an outer step (identical replicas).
    "dlion_local": dict(optimizer="local", aggregation="mavo", local_steps=10, lr=4e-3, weight_decay=0.0,
                        betas=(0.0, 0.99), inner_lr=2e-3, inner_weight_decay=0.1),
    # Hierarchical D-Lion (issue 12): the 4 workers as 2 nodes x 2, one voter per node. Not in the default run.
    "dlion_mavo_hier": dict(optimizer="dlion", aggregation="mavo", intra_node_size=2, lr=4e-4, weight_decay=0.1),
}
DEFAULT_METHODS = ("adamw", "lion", "dlion_mavo", "dlion_avg", "dlion_local")


def _lr_lambda(steps: int):
    warmup = max(1, steps // 10)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _batch(dataset, indices):
    samples = [dataset[i] for i in indices]
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def _worker(rank: int, world: int, port: int, name: str, args, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    from distlion_ds import DistributedLion, LocalStepsLion
    from distlion_ds.comm import exit_after_teardown, replica_checksum
    from distlion_ds.kernels import _dispatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One intra-op thread per worker on every machine: CPU reductions split work per thread, so the thread count
    # changes the last bits of losses and gradients, and the demo's numbers would depend on the core count.
    torch.set_num_threads(1)
    _dispatch.INTERPRET = False  # the demo times real work: CPU tensors take the torch reference path
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = METHODS[name]
    cfg = GPTConfig(vocab_size=args.vocab_size, seq_length=args.seq_length)
    train, valid = gpt_datasets(args.data, args.seq_length, args.steps * args.micro_batch * world, args.valid_samples)
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    params = list(model.parameters())
    singleton = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"], betas=(0.9, 0.95))
    elif spec["optimizer"] == "lion":  # global Lion: averaged fp32 gradients, then a one-rank Lion step
        opt = DistributedLion(params, lr=spec["lr"], weight_decay=spec["weight_decay"],
                              process_group=singleton[rank])
    elif spec["optimizer"] == "local":  # the schedule below drives the inner lr, the loop the outer one
        inner = torch.optim.AdamW(params, lr=spec["inner_lr"], weight_decay=spec["inner_weight_decay"],
                                  betas=(0.9, 0.95))
        opt = LocalStepsLion(params, inner, spec["local_steps"], lr=spec["lr"], betas=spec["betas"],
                             weight_decay=spec["weight_decay"], aggregation=spec["aggregation"])
    else:
        opt = DistributedLion(params, lr=spec["lr"], weight_decay=spec["weight_decay"],
                              aggregation=spec["aggregation"], intra_node_size=spec.get("intra_node_size", 1))
    net = DDP(model) if spec["optimizer"] in ("adamw", "lion") else model
    lr_factor = _lr_lambda(args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)  # local steps: it drives the inner lr
    losses = []
    dist.barrier()
    t0 = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{name:<10}", disable=rank != 0, mininterval=1.0):
        base = (step * world + rank) * args.micro_batch
        b = _batch(train, range(base, base + args.micro_batch))
        loss = net(b["tokens"], b["labels"], b["loss_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if spec["optimizer"] == "local":  # the outer lr follows the same warm-up + cosine (read at the next round)
            for g in opt.outer.param_groups:
                g["lr"] = spec["lr"] * lr_factor(step + 1)
        losses.append(loss.item())
    dist.barrier()
    wall = time.perf_counter() - t0
    sums = replica_checksum(params)
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            vl = []
            for i in range(0, args.valid_samples, 16):
                b = _batch(valid, range(i, min(i + 16, args.valid_samples)))
                vl.append(float(model(b["tokens"], b["labels"], b["loss_mask"])) * len(b["tokens"]))
        if spec["optimizer"] in ("dlion", "local"):
            bits = opt.comm_stats()["bits_per_param_step"]
        else:  # DDP all-reduces fp32 gradient buckets: a ring all-reduce sends 2(N-1)/N * 32 bits per parameter
            bits = 64 * (world - 1) / world
        queue.put(dict(name=name, final_val_loss=sum(vl) / args.valid_samples, bits_per_param_step=bits,
                       wall_s=wall, train_loss=[sum(v) / world for v in zip(*all_losses, strict=True)],
                       dp_replicas_identical=len(set(sums)) == 1, params=sum(p.numel() for p in params)))
    dist.destroy_process_group()
    # The result is in the queue (a SimpleQueue writes synchronously): leave without the interpreter finalization
    # in which torch 2.13's gloo can abort a finished worker (start_processes would then fail the demo).
    exit_after_teardown(0)


# Row labels of the printed table; the README's demo table is that output, pasted.
LABELS = {"adamw": "adamw (DDP fp32 all-reduce)", "lion": "lion (global: DDP all-reduce + Lion)",
          "dlion_mavo": "dlion_mavo (1-bit votes, majority)", "dlion_avg": "dlion_avg (1-bit votes, averaged)",
          "dlion_local": "dlion_local (10 AdamW steps, then a 1-bit vote)",
          "dlion_mavo_hier": "dlion_mavo_hier (2 nodes x 2, one voter per node)"}


def markdown_table(runs: list[dict]) -> str:
    """The results as a Markdown table: the final validation loss (4 decimals), wire bits, wall time, replicas.

    Args:
        runs: dicts with ``name``, ``final_val_loss``, ``bits_per_param_step``, ``wall_s``, ``dp_replicas_identical``.
    Returns:
        The table, one row per run, no trailing newline.
    """
    rows = ["| method | final val loss | wire bits/param/step | wall s | replicas |", "|---|---|---|---|---|"]
    for r in runs:
        # D-Lion counts its own payload bytes; DDP's all-reduce is not instrumented, so its cost is the ring model.
        source = "measured" if METHODS[r["name"]]["optimizer"] in ("dlion", "local") else "ring model: 64(N−1)/N"
        replicas = "identical" if r["dp_replicas_identical"] else "DIVERGED"
        rows.append(f"| {LABELS[r['name']]} | {r['final_val_loss']:.4f} | {r['bits_per_param_step']:.3f} ({source}) "
                    f"| {r['wall_s']:.1f} | {replicas} |")
    return "\n".join(rows)


def comparison(runs: list[dict]) -> str | None:
    """One line: each other method's final validation loss relative to global Lion's (None without a Lion run)."""
    by_name = {r["name"]: r for r in runs}
    if "lion" not in by_name or len(by_name) < 2:
        return None
    ref = by_name["lion"]["final_val_loss"]
    parts = [f"{r['name']} {100 * (r['final_val_loss'] / ref - 1):+.1f} %" for r in runs if r["name"] != "lion"]
    return "final validation loss relative to global Lion: " + ", ".join(parts)


def _plot(runs: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        y = r["train_loss"]
        k = max(1, len(y) // 30)  # moving average over ~3 % of the run
        smooth = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
        ax1.plot(smooth, label=f"{r['name']} (val {r['final_val_loss']:.3f})")
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (mean over workers, smoothed)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = [r["name"] for r in runs]
    ax2.bar(names, [r["bits_per_param_step"] for r in runs], color="tab:gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("wire bits per parameter per step (per worker)")
    for i, r in enumerate(runs):
        ax2.text(i, r["bits_per_param_step"], f"{r['bits_per_param_step']:.2f}", ha="center", va="bottom")
    fig.suptitle(f"tiny GPT, {runs[0]['workers']} data-parallel workers, same token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    # Our own progress at INFO; other libraries' INFO chatter (megatron-core's dataset builder, matplotlib's font
    # cache) stays below the threshold, their warnings do not.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("distlion_ds", __name__):  # __name__ is "__main__" under `python -m`
        logging.getLogger(name).setLevel(logging.INFO)
    ap = argparse.ArgumentParser(prog="python -m distlion_ds.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--valid-samples", type=int, default=256)
    ap.add_argument("--data", default="data_cache/stdlib", help="prepared dataset folder (made when missing)")
    ap.add_argument("--corpus", default="stdlib", help="what to prepare there: 'stdlib', a folder, or a .jsonl")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--valid-every", type=int, default=50, help="every k-th corpus file goes to validation")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation seed (the data order is fixed)")
    args = ap.parse_args(argv)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    ragged = [n for n in names if args.steps % METHODS[n].get("local_steps", 1)]
    if ragged:
        ap.error(f"--steps {args.steps}: {ragged[0]} ends on an outer step only when --steps is a multiple of its "
                 f"{METHODS[ragged[0]]['local_steps']} local steps (else the replicas differ at the end)")
    meta = prepare(corpus=args.corpus, out=args.data, vocab_size=args.vocab_size, valid_every=args.valid_every)
    args.vocab_size = meta["vocab_size_actual"]
    gpt_datasets(args.data, args.seq_length, args.steps * args.micro_batch * args.workers, args.valid_samples)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ctx = torch.multiprocessing.get_context("spawn")
    runs = []
    for name in names:
        queue = ctx.SimpleQueue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(_worker, args=(args.workers, port, name, args, queue),
                                              nprocs=args.workers, start_method="spawn")
        runs.append(dict(queue.get(), workers=args.workers))

    table = markdown_table(runs)
    logger.info("\n%s\n", table)
    if (line := comparison(runs)) is not None:
        logger.info("%s", line)
    _plot(runs, out / "loss.png")
    summary = {"workers": args.workers, "tokenizer_sha256": meta["tokenizer_sha256"],
               "runs": [{k: r[k] for k in ("name", "final_val_loss", "bits_per_param_step", "wall_s",
                                           "dp_replicas_identical")}
                        for r in runs],
               "plot": str(out / "loss.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "curves.json").write_text(json.dumps({r["name"]: r["train_loss"] for r in runs}) + "\n")
    (out / "table.md").write_text(table + "\n")
    logger.info("demo took %.1f minutes; wrote %s, %s and %s", (time.perf_counter() - t_start) / 60,
                out / "summary.json", out / "table.md", out / "loss.png")
    return 0 if all(r["dp_replicas_identical"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
