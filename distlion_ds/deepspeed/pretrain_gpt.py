"""GPT pretraining under DeepSpeed with any config of ``configs/deepspeed/`` (AdamW baseline, D-Lion MaVo/Avg, ...).

    deepspeed --num_gpus 2 --module distlion_ds.deepspeed.pretrain_gpt \\
        --deepspeed_config configs/deepspeed/dlion_mavo.json [--train-iters 200] [--data data_cache/stdlib]

(``launch/deepspeed_gpt.sh`` is that command.) The model is :class:`distlion_ds.gpt.GPT`, the data megatron-core's
GPTDataset over the SentencePiece-tokenised corpus of :mod:`distlion_ds.data` (rank 0 prepares the stdlib corpus
there when the folder has no dataset yet).
Each data-parallel rank reads its own micro-batches. On CPU the run uses gloo, on GPUs nccl, unchanged.
Writes ``<out>/summary.json``: config, steps, per-step train loss (mean over ranks), validation losses, wire bits
per parameter per step of the optimizer exchange, wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pathlib
import time

import torch

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m distlion_ds.deepspeed.pretrain_gpt",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (configs/deepspeed/*.json)")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                    help="set by the deepspeed launcher")
    ap.add_argument("--data", default="data_cache/stdlib", help="output folder of `python -m distlion_ds.data prepare`")
    ap.add_argument("--train-iters", type=int, default=200)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--num-attention-heads", type=int, default=4)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--eval-iters", type=int, default=8, help="validation micro-batches per evaluation")
    ap.add_argument("--save", default=None, help="checkpoint folder (saved at the end)")
    ap.add_argument("--load", default=None, help="checkpoint folder to resume from")
    ap.add_argument("--out", default="runs/deepspeed_gpt")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    for name in ("train_iters", "seq_length", "hidden_size", "num_layers", "num_attention_heads", "eval_interval"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    # One line, before any process group work (argparse's usage block would bury it, once per worker).
    if not os.path.isfile(args.deepspeed_config):
        ap.exit(2, f"{ap.prog}: --deepspeed_config {args.deepspeed_config}: no such file (relative to "
                   f"{os.getcwd()}; the shipped configs are in configs/deepspeed/)\n")
    return args


class _DropRecords(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``; every other record passes."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def _without(logger_name: str, *prefixes: str):
    """Within the block, ``logger_name`` drops records starting with ``prefixes`` (exact, known texts only)."""
    drop = _DropRecords(*prefixes)
    target = logging.getLogger(logger_name)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


# DeepSpeed 0.19.8 warnings that do not apply here, dropped by their exact text (its other records still show):
# accelerator auto-detection falls back to CPU with a warning; where torch sees no CUDA device that is the expected
# outcome, and this entry logs the accelerator it runs on instead.
_CPU_FALLBACK = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
# WarmupLR and WarmupCosineLR call their own get_lr() from the constructor, at iteration -1, which warns.
_SCHEDULER_CONSTRUCTION = "Attempting to get learning rate from scheduler before it has started"


def main(argv=None) -> int:
    # Our own progress at INFO; other libraries' INFO chatter (megatron-core's dataset builder) stays below the
    # threshold, their warnings do not. DeepSpeed's logger has its own handler and level.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("distlion_ds", __name__):  # __name__ is "__main__" under `python -m`
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    with _without("DeepSpeed", *(() if cuda else (_CPU_FALLBACK,))):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
    import torch.distributed as dist

    import distlion_ds
    from distlion_ds.data import gpt_datasets, prepare
    from distlion_ds.deepspeed.config import load_deepspeed_config
    from distlion_ds.deepspeed.engine import get_distributed_lion
    from distlion_ds.gpt import GPT, GPTConfig

    if not cuda:
        # CPU runs: skip the JIT build of DeepSpeed's shared-memory comm op (30-45 s on 2 cores); gloo is used.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        logger.info("DeepSpeed accelerator %s, %s backend, %d ranks", accelerator, dist.get_backend(), world)
    if rank == 0 and not (pathlib.Path(args.data) / "meta.json").exists():
        prepare(out=args.data)  # the default corpus; prepare other corpora with `python -m distlion_ds.data`
    dist.barrier()
    meta = json.loads((pathlib.Path(args.data) / "meta.json").read_text())
    ds_config = load_deepspeed_config(args.deepspeed_config)  # hjson, as DeepSpeed reads it
    micro = ds_config.get("train_micro_batch_size_per_gpu", 1)
    gas = ds_config.get("gradient_accumulation_steps", 1)
    samples_per_step = micro * gas * world
    # Collective: megatron-core's builder builds the index cache on rank 0, then barriers, then the others load it.
    train, valid = gpt_datasets(args.data, args.seq_length, args.train_iters * samples_per_step,
                                args.eval_iters * micro * world)

    torch.manual_seed(args.seed)  # identical initial replicas on every rank
    model = GPT(GPTConfig(vocab_size=meta["vocab_size_actual"], seq_length=args.seq_length,
                          hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_attention_heads))
    with _without("DeepSpeed", _SCHEDULER_CONSTRUCTION):
        engine, optimizer, _, scheduler = distlion_ds.initialize(args=args, model=model,
                                                                 model_parameters=model.parameters())
    start = 0
    if args.load:
        _, client = engine.load_checkpoint(args.load)
        start = (client or {}).get("iteration", 0)
    device = engine.device

    def batch(ds, first):
        samples = [ds[i] for i in range(first, first + micro)]
        return {k: torch.stack([s[k] for s in samples]).to(device) for k in ("tokens", "labels", "loss_mask")}

    def evaluate():
        engine.eval()
        total = torch.zeros(2, device=device)
        with torch.no_grad():
            for it in range(args.eval_iters):
                b = batch(valid, (it * world + rank) * micro)
                total += torch.stack([engine(b["tokens"], b["labels"], b["loss_mask"]).float().detach(),
                                      torch.ones((), device=device)])
        dist.all_reduce(total)  # evaluation only: not part of the training step's wire cost
        engine.train()
        return float(total[0] / total[1])

    losses, evals = [], []
    t0 = time.perf_counter()
    for it in range(start, args.train_iters):
        step_loss = 0.0
        for micro_step in range(gas):
            b = batch(train, ((it * gas + micro_step) * world + rank) * micro)
            loss = engine(b["tokens"], b["labels"], b["loss_mask"])
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / gas
        mean = torch.tensor([step_loss], device=device)
        dist.all_reduce(mean)  # logging only
        losses.append(float(mean) / world)
        if rank == 0 and (it + 1) % max(1, args.train_iters // 20) == 0:
            logger.info("iter %5d/%d  loss %.4f  lr %.3e", it + 1, args.train_iters, losses[-1],
                        scheduler.get_lr()[0] if scheduler is not None else float("nan"))
        if (it + 1) % args.eval_interval == 0 or it + 1 == args.train_iters:
            evals.append({"iteration": it + 1, "val_loss": evaluate()})
            if rank == 0:
                logger.info("iter %5d  validation loss %.4f", it + 1, evals[-1]["val_loss"])
    wall = time.perf_counter() - t0
    if args.save:
        engine.save_checkpoint(args.save, client_state={"iteration": args.train_iters})
    try:
        bits = get_distributed_lion(engine).comm_stats()["bits_per_param_step"]
    except ValueError:  # not a D-Lion config
        bits = 64 * (world - 1) / world  # DeepSpeed's fp32 gradient all-reduce (ring): 2(N-1)/N * 32 bits
    if rank == 0:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"config": args.deepspeed_config, "world_size": world, "iterations": args.train_iters,
                   "start_iteration": start, "train_loss": losses, "eval": evals,
                   "bits_per_param_step": bits, "wall_s": wall,
                   "params": sum(p.numel() for p in model.parameters())}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("wrote %s", out / "summary.json")
    # Tear gloo/NCCL down while the interpreter is whole: a backend left to interpreter finalization can abort a
    # process (SIGABRT) after a successful run, and the launcher would report the run as failed.
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all(math.isfinite(x) for x in losses) else 1


if __name__ == "__main__":  # finished and torn down: no interpreter finalization for gloo to abort in
    from distlion_ds.comm import exit_after_teardown

    exit_after_teardown(main())
