"""Train one run of the loss-versus-bytes study (issue 13) on N gloo workers and write its result file.

    python -m benchmarks.study.run --method M --lr X --seed S [--wd W] [--suite study|demo] [--steps K]
                                   [--deadline-minutes T] [--data data_cache/stdlib] [--out-dir DIR]

Writes ``benchmarks/study/results[/demo]/<method>_lr<X>[_wd<W>]_s<S>.json``: training loss per step (mean over the
workers), the validation curve (step, loss, bytes sent per worker so far), bits per parameter per step, wall time,
the configuration, the git revision and the machine. Skips when that file exists.

Resumable: every ``ckpt_every`` steps each worker saves its model, optimizer, scheduler and loss history under
``runs/study_ckpt/<suite>/<run>/``; a run that was killed (or stopped at ``--deadline-minutes``, checked at those
steps) resumes from the last complete checkpoint bit-exactly (the data is a pure function of the step, and nothing
draws random numbers during training). Exit status: 0 done (or skipped), 3 paused at the deadline, 1 failed.

Bytes sent per worker: D-Lion, local-step D-Lion and DiLoCo count the payload bytes they hand to collectives
(``comm_stats()["bytes_sent"]``, flag bytes included); DDP's fp32 all-reduce (adamw, lion) is not instrumented and is
counted as a ring all-reduce, ``2(N-1)/N * 4`` bytes per parameter per step (``bytes_source`` says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import time

import torch

from benchmarks.study.common import (
    CKPT_ROOT,
    INNER_LR,
    SUITES,
    Suite,
    default_wd,
    fmt,
    parse_method,
    result_path,
    run_name,
)

logger = logging.getLogger("benchmarks.study.run")
PAUSED = 3


def git_rev(*paths: str) -> str:
    """HEAD, with ``+dirty`` when ``paths`` (repository-relative pathspecs) have uncommitted changes."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                               cwd=root).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_data(suite: Suite, steps: int, data: str) -> dict:
    """Make (or reuse) the tokenizer, the dataset and its sample-index cache for ``steps`` steps of ``suite``, in one
    process before the workers memory-map them; returns the tokenizer's meta."""
    from distlion_ds.data import gpt_datasets, prepare

    meta = prepare(corpus="stdlib", out=data, vocab_size=suite.vocab_size)
    gpt_datasets(data, suite.seq_length, steps * suite.micro_batch * suite.workers, suite.valid_samples)
    return meta


def forward_backward(net, opt, train, suite: Suite, step: int, world: int, rank: int) -> torch.Tensor:
    """One inner step's forward and backward on worker ``rank``'s sequences of ``step`` (every method the same
    tokens), under bf16 autocast when the suite says so; returns the loss (``opt.step()`` is the caller's)."""
    from distlion_ds.demo import _batch

    base = (step * world + rank) * suite.micro_batch
    b = _batch(train, range(base, base + suite.micro_batch))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=suite.autocast == "bf16"):
        loss = net(b["tokens"], b["labels"], b["loss_mask"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def _machine() -> dict:
    return {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def make_optimizer(method: str, lr: float, wd: float, model, rank: int, singleton_groups,
                   outer_betas: tuple[float, float] = (0.9, 0.99)):
    """``(optimizer, net)``: the method's optimizer on ``model``'s parameters and the module the loop calls (DDP for
    the all-reduce baselines, the model itself where the optimizer communicates)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distlion_ds import DistributedLion
    from distlion_ds.optim.diloco import DiLoCo
    from distlion_ds.optim.local_steps import LocalStepsLion

    spec = parse_method(method)
    params = list(model.parameters())
    kind = spec["kind"]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.95)), DDP(model)
    if kind == "lion":  # global Lion: averaged fp32 gradients, then a one-rank Lion step (as the demo)
        return DistributedLion(params, lr=lr, weight_decay=wd, process_group=singleton_groups[rank]), DDP(model)
    if kind in ("dlion_mavo", "dlion_avg"):
        return DistributedLion(params, lr=lr, weight_decay=wd, aggregation=kind.split("_")[1]), model
    inner = torch.optim.AdamW(params, lr=INNER_LR, weight_decay=wd, betas=(0.9, 0.95))
    if kind == "local_dlion":
        return LocalStepsLion(params, inner, local_steps=spec["H"], lr=lr, betas=outer_betas), model
    return DiLoCo(params, inner, local_steps=spec["H"], lr=lr, momentum=0.9, nesterov=True,
                  quantization=spec["quantization"]), model


def _bytes_sent(opt, kind: str, n_params: int, world: int, steps: int) -> int:
    if kind in ("adamw", "lion"):
        return round(steps * n_params * 4 * 2 * (world - 1) / world)
    return int(opt.comm_stats()["bytes_sent"])


def _evaluate(model, valid, suite: Suite, rank: int, world: int) -> float:
    """Mean validation loss over ``valid_samples`` sequences, split over the workers (one all_reduce)."""
    import torch.distributed as dist

    from distlion_ds.demo import _batch

    idx = list(range(rank, suite.valid_samples, world))
    total = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(idx), 16):
            chunk = idx[i: i + 16]
            b = _batch(valid, chunk)
            total[0] += float(model(b["tokens"], b["labels"], b["loss_mask"])) * len(chunk)
            total[1] += len(chunk)
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _worker(rank: int, world: int, port: int, job: dict, queue) -> None:
    import torch.distributed as dist

    from distlion_ds.comm import exit_after_teardown, replica_checksum
    from distlion_ds.data import gpt_datasets
    from distlion_ds.demo import _lr_lambda
    from distlion_ds.gpt import GPT, GPTConfig
    from distlion_ds.kernels import _dispatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one intra-op thread per worker: results independent of the core count (as the demo)
    _dispatch.INTERPRET = False
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    suite = Suite(**job["suite"])
    steps, method, lr, wd, seed = job["steps"], job["method"], job["lr"], job["wd"], job["seed"]
    kind = parse_method(method)["kind"]
    cfg = GPTConfig(vocab_size=job["vocab_size"], seq_length=suite.seq_length, hidden_size=suite.hidden_size,
                    num_layers=suite.num_layers, num_heads=suite.num_heads)
    train, valid = gpt_datasets(job["data"], suite.seq_length, steps * suite.micro_batch * world, suite.valid_samples)
    torch.manual_seed(seed)
    model = GPT(cfg)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    singleton = [dist.new_group([r]) for r in range(world)]
    opt, net = make_optimizer(method, lr, wd, model, rank, singleton, tuple(job["outer_betas"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    lr_factor = _lr_lambda(steps)
    ckpt_dir = pathlib.Path(job["ckpt_dir"])

    # Resume from the last complete checkpoint (rank 0 writes LATEST after every rank has saved).
    start, losses, curve, wall_before, bytes_base = 0, [], [], 0.0, 0
    latest = ckpt_dir / "LATEST"
    if latest.exists():
        start = int(latest.read_text())
        state = torch.load(ckpt_dir / f"step{start}_rank{rank}.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        losses, curve, wall_before, bytes_base = state["losses"], state["curve"], state["wall_s"], state["bytes"]
        if rank == 0:
            logger.info("%s: resuming at step %d", job["name"], start)
    # Counters that survive a resume: bytes = saved + what this process adds (DiLoCo restores its own counter).
    bytes_at_start = _bytes_sent(opt, kind, n_params, world, start) if kind not in ("adamw", "lion") else 0

    def bytes_now(step: int) -> int:
        if kind in ("adamw", "lion"):
            return _bytes_sent(opt, kind, n_params, world, step)
        return bytes_base + _bytes_sent(opt, kind, n_params, world, step) - bytes_at_start

    if start == 0:
        curve.append([0, _evaluate(model, valid, suite, rank, world), 0])
    deadline = job["deadline"]
    dist.barrier()
    t0 = time.perf_counter()
    status = "done"
    for step in range(start, steps):
        loss = forward_backward(net, opt, train, suite, step, world, rank)
        opt.step()
        sched.step()
        if kind == "local_dlion" and opt.outer is not None:
            # The outer lr follows the same warm-up + cosine as the inner one (read at the next round's outer step),
            # as per-step Lion's lr is scheduled; DiLoCo keeps the paper's constant outer lr.
            for g in opt.outer.param_groups:
                g["lr"] = lr * lr_factor(step + 1)
        losses.append(loss.item())
        done = step + 1
        if done % suite.valid_every == 0 or done == steps:
            curve.append([done, _evaluate(model, valid, suite, rank, world), bytes_now(done)])
            if rank == 0:
                logger.info("%s: step %d/%d val %.4f (%.0f s)", job["name"], done, steps, curve[-1][1],
                            wall_before + time.perf_counter() - t0)
        if done % suite.ckpt_every == 0 and done < steps:
            wall = wall_before + time.perf_counter() - t0
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "losses": losses, "curve": curve, "wall_s": wall, "bytes": bytes_now(done)}
            tmp = ckpt_dir / f"step{done}_rank{rank}.pt.tmp"
            torch.save(state, tmp)
            os.replace(tmp, ckpt_dir / f"step{done}_rank{rank}.pt")
            dist.barrier()
            if rank == 0:
                (ckpt_dir / "LATEST.tmp").write_text(str(done))
                os.replace(ckpt_dir / "LATEST.tmp", latest)
                for old in ckpt_dir.glob("step*_rank*.pt"):
                    if not old.name.startswith(f"step{done}_"):
                        old.unlink()
            stop = torch.tensor([int(rank == 0 and deadline is not None and time.time() > deadline)])
            dist.broadcast(stop, 0)
            if int(stop):
                status = "paused"
                break
    dist.barrier()
    wall = wall_before + time.perf_counter() - t0
    if status == "paused":
        if rank == 0:
            queue.put({"status": "paused", "step": done})
        dist.destroy_process_group()
        exit_after_teardown(0)
    sums = replica_checksum(params)
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        stats = opt.comm_stats() if hasattr(opt, "comm_stats") and kind not in ("adamw", "lion") else {}
        total_bytes = bytes_now(steps)
        queue.put({
            "status": "done",
            "train_loss": [sum(v) / world for v in zip(*all_losses, strict=True)],
            "valid_curve": [{"step": s, "val_loss": v, "bytes_sent_per_worker": bts} for s, v, bts in curve],
            "final_val_loss": curve[-1][1],
            "bytes_sent_per_worker": total_bytes,
            "bits_per_param_step": 8.0 * total_bytes / (n_params * steps),
            "bytes_source": "ring model 2(N-1)/N*4 B/param/step" if kind in ("adamw", "lion")
            else "measured (comm_stats bytes_sent)",
            "comm_stats": {k: v for k, v in stats.items() if isinstance(v, int | float | str | type(None))},
            "params": n_params,
            "wall_s": wall,
            "replicas_identical": len(set(sums)) == 1,
        })
    dist.destroy_process_group()
    # The result is in the queue (a SimpleQueue writes synchronously). Leave without interpreter finalization: torch
    # 2.13's gloo may abort the process at exit after a successful run.
    exit_after_teardown(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(method: str, lr: float, seed: int, suite: Suite, wd: float | None = None, steps: int | None = None,
        deadline: float | None = None, data: str = "data_cache/stdlib", out: pathlib.Path | None = None,
        outer_betas: tuple[float, float] | None = None) -> int:
    """Train one run (or resume it) and write its result file; returns 0 done/skipped, 3 paused.

    Args:
        method, lr, seed: the run (see benchmarks/study/common.py).
        suite: the scale.
        wd: weight decay (None: the method's default).
        steps: override the suite's number of steps (smoke runs: the result goes to ``results/smoke/``).
        deadline: a ``time.time()`` after which the run pauses at its next checkpoint.
        data: the prepared dataset folder (made when missing).
        out: the result file (default: the suite's results folder).
        outer_betas: local D-Lion's outer betas when not the suite's ``local_betas``: an ablation, written to
            ``results[/demo]/betas/<run>_b<b1>-<b2>.json`` (the report's tables read only the suite's).
    """
    spec = parse_method(method)
    wd = default_wd(method, suite) if wd is None else wd
    steps = steps or suite.steps
    if suite.valid_every % spec["H"] or suite.ckpt_every % spec["H"]:
        raise ValueError(f"--method {method}: H={spec['H']} must divide the suite's valid_every={suite.valid_every} "
                         f"and ckpt_every={suite.ckpt_every} (replicas are identical only between rounds)")
    name = run_name(method, lr, seed, wd, suite)
    if outer_betas is not None and tuple(outer_betas) == tuple(suite.local_betas):
        outer_betas = None
    if outer_betas is not None:
        if spec["kind"] != "local_dlion":
            raise ValueError(f"--outer-betas is local D-Lion's (--method local_dlion_H<h>), not {method}'s")
        name += f"_b{fmt(outer_betas[0])}-{fmt(outer_betas[1])}"
    if out is None and outer_betas is not None:
        out = suite.results / "betas" / (f"{name}.json" if steps == suite.steps else f"{name}_steps{steps}.json")
    if out is None:  # a shortened run never takes the full run's file name (the plan would count it as done)
        out = result_path(suite, method, lr, seed, wd) if steps == suite.steps else \
            suite.results / "smoke" / f"{name}_steps{steps}.json"
    if out.exists():
        logger.info("%s exists: skipped", out)
        return 0
    ckpt_dir = CKPT_ROOT / suite.name / (name + ("" if steps == suite.steps else f"_steps{steps}"))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta = prepare_data(suite, steps, data)
    job = dict(suite={f.name: getattr(suite, f.name) for f in dataclasses.fields(suite) if f.name != "results"},
               steps=steps, method=method, lr=lr, wd=wd, seed=seed, data=data, name=name,
               vocab_size=meta["vocab_size_actual"], ckpt_dir=str(ckpt_dir), deadline=deadline,
               outer_betas=list(outer_betas if outer_betas is not None else suite.local_betas))
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_worker, args=(suite.workers, _free_port(), job, queue),
                                          nprocs=suite.workers, start_method="spawn")
    res = queue.get()
    if res["status"] == "paused":
        logger.info("%s: paused at step %d (checkpoint kept in %s)", name, res["step"], ckpt_dir)
        return PAUSED
    res.pop("status")
    record = {
        "suite": suite.name, "method": method, "lr": lr, "wd": wd, "seed": seed, "steps": steps,
        "workers": suite.workers, **res,
        "config": {**job["suite"], "steps": steps, "inner_lr": INNER_LR if spec["kind"] in ("local_dlion", "diloco")
                   else None, "H": spec["H"], "quantization": spec["quantization"],
                   "schedule": "linear warm-up over 10 % of the steps, cosine to 0.1x (distlion_ds.demo)",
                   "autocast": suite.autocast,
                   "outer_betas": job["outer_betas"] if spec["kind"] == "local_dlion" else None,
                   "tokenizer_sha256": meta["tokenizer_sha256"]},
        "git_rev": git_rev("distlion_ds", "kernels", "benchmarks/study/*.py"), "machine": _machine(),
        "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    logger.info("%s: final val %.4f, %.3f bits/param/step, %.0f s -> %s", name, record["final_val_loss"],
                record["bits_per_param_step"], record["wall_s"], out)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study.run", description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wd", type=float, default=None, help="weight decay (default: the method's)")
    ap.add_argument("--suite", choices=sorted(SUITES), default="study")
    ap.add_argument("--steps", type=int, default=None, help="override the suite's steps (smoke runs)")
    ap.add_argument("--deadline-minutes", type=float, default=None, help="pause at the first checkpoint after this")
    ap.add_argument("--data", default="data_cache/stdlib")
    ap.add_argument("--out", default=None, help="result file (default: the suite's results folder)")
    ap.add_argument("--outer-betas", default=None, metavar="B1,B2",
                    help="local D-Lion's outer betas (default: the suite's); an ablation, results under results/betas/")
    args = ap.parse_args(argv)
    try:
        parse_method(args.method)
    except ValueError as exc:
        ap.error(str(exc))
    deadline = time.time() + 60 * args.deadline_minutes if args.deadline_minutes is not None else None
    betas = None
    if args.outer_betas is not None:
        try:
            betas = tuple(float(x) for x in args.outer_betas.split(","))
        except ValueError:
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            ap.error(f"--outer-betas {args.outer_betas!r}: expected two numbers in [0, 1), e.g. 0.9,0.95")
    return run(args.method, args.lr, args.seed, SUITES[args.suite], args.wd, args.steps, deadline, args.data,
               pathlib.Path(args.out) if args.out else None, betas)


if __name__ == "__main__":
    sys.exit(main())
