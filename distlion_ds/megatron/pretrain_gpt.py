"""GPT pretraining on megatron-core's own machinery: tensor x pipeline x data parallelism, D-Lion or AdamW.

    torchrun --nproc_per_node 8 -m distlion_ds.megatron.pretrain_gpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --micro-batch-size 2 --global-batch-size 8 --train-iters 50 --lr 3e-4 \\
        --optimizer distlion --p2p-compression configs/compression/topk10_q8.json --out runs/3d

(``launch/megatron_gpt.sh`` and ``launch/3d_gpt.sh`` are this command.) Megatron-LM argument names plus the
plugin's flags (``--distlion`` = ``--optimizer distlion``, ``--dlion-aggregation``, ``--dlion-beta1/2``,
``--p2p-compression``, ``--tied-embedding-compression``); the data-parallel size is ``world / (tp * pp)``.

The loop is Megatron-LM's ``train_step`` over megatron-core's pieces, nothing re-written: ``GPTModel`` chunks in
megatron-core's ``DistributedDataParallel`` (:mod:`.training.model`), its pipeline schedules (1F1B, interleaved with
``--num-layers-per-virtual-pipeline-stage``) with :class:`~distlion_ds.megatron.CompressedP2PCommunicator` or the
timed uncompressed one, ``finalize_model_grads`` (DP step, tied-embedding all-reduce across the first and last
stage, compressed with ``--tied-embedding-compression``), the optimizer (:mod:`.training.optimizer`: D-Lion through
``distlion_ds.megatron.get_optimizer``, whose votes replace the DDP's gradient all-reduce; AdamW through
megatron-core's ``get_megatron_optimizer``), ``OptimizerParamScheduler`` (advanced on applied steps only) and
``dist_checkpointing`` (:mod:`.training.checkpointing`: ``--save``, ``--load``, ``--save-interval``; resume is bit
for bit, a kill during a save resumes from the previous checkpoint, a corrupt file is refused naming it).

``--distributed-timeout-minutes`` (default 10) is every process group's timeout: a stalled or dead peer makes every
other rank fail with one line naming the iteration and the phase, instead of hanging for torch's 30 minutes.

Writes ``<out>/summary.json`` (:mod:`.training.summary`): ``{"tp", "pp", "dp", "steps", "losses",
"dp_replicas_identical", "tied_embeddings_identical", "wire": {per channel}, "eval", ...}``; replicas and tied copies
are compared by checksum across ranks at the end, not assumed.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
import warnings

import torch
import torch.distributed as dist

from distlion_ds.comm import run_collective, set_timeout_everywhere
from distlion_ds.megatron.training import arguments as A

logger = logging.getLogger(__name__)

parse_args = functools.partial(A.parse_args, description=__doc__.splitlines()[0])
validate_args = A.validate_args
Layout = A.Layout
_init_distributed = A.init_distributed


def main(argv: list[str] | None = None) -> int:
    """Run the entry; returns the exit status (0: trained, replicas identical, losses finite)."""
    args = parse_args(argv)
    created = _init_distributed(args.distributed_timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:  # megatron-core repeats its missing-Apex / Transformer Engine warnings per layer spec built
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"[rank {rank}] %(message)s")
    # Rank 0 reports set-up, the last rank (last pipeline stage: it has the loss) reports training.
    logger.setLevel(logging.INFO if rank in (0, world - 1) else logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines repeat on every rank
    try:
        layout = validate_args(args, world)
        return _run(args, layout)
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _run(args, layout: A.Layout) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    from distlion_ds.compress import CompressionConfig, CompressionState
    from distlion_ds.data import gpt_datasets
    from distlion_ds.megatron import CompressedP2PCommunicator, TiedEmbeddingState, enable_cpu
    from distlion_ds.megatron import finalize_model_grads_with as finalize_with
    from distlion_ds.megatron.communicator import TimedP2PCommunicator
    from distlion_ds.megatron.training import checkpointing as ckpt
    from distlion_ds.megatron.training import summary as S
    from distlion_ds.megatron.training.data import Batches, forward_step, prepare_data
    from distlion_ds.megatron.training.model import build_model, padded_vocab, seed_everything
    from distlion_ds.megatron.training.optimizer import build_optimizer

    enable_cpu()  # no-op with CUDA
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = prepare_data(args)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp if layout.vp > 1 else None,
        # Only megatron's distributed optimizer uses the extra gloo groups; on CPU they would duplicate every group
        # (start-up time on 8 processes sharing 2 cores).
        create_gloo_process_groups=False)
    # megatron-core's groups get its own timeout (whole minutes) or torch's default: give all of them ours.
    set_timeout_everywhere(datetime.timedelta(minutes=args.distributed_timeout_minutes))
    ranks = {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
             "dp": ps.get_data_parallel_rank()}
    pp_first = ps.is_pipeline_first_stage(ignore_virtual=True)
    pp_last = ps.is_pipeline_last_stage(ignore_virtual=True)
    dp_group, tp_group = ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group()
    embd_group = ps.get_embedding_group() if layout.pp > 1 and ps.is_rank_in_embedding_group() else None
    if rank == 0:
        logger.info("layout: world %d = tp %d x pp %d x dp %d; %d model chunk(s) per rank; %d micro-batches of %d "
                    "per iteration and DP rank; global batch %d", world, layout.tp, layout.pp, layout.dp,
                    layout.vp, layout.num_micro, args.micro_batch_size, layout.global_batch)

    seed_everything(args.seed, ranks["pp"])
    tied_state = TiedEmbeddingState() if args.tied_embedding_compression is not None else None
    finalize = finalize_with(args.tied_embedding_compression, state=tied_state)
    config, chunks = build_model(args, layout, padded_vocab(meta["tokenizer_pieces"], layout.tp), finalize)
    opt, sched = build_optimizer(args, chunks)
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    local = args.distlion and args.dlion_local_steps > 1

    comm = compression = None
    comm_kw: dict = {}
    if layout.pp > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        if args.p2p_compression is not None:
            compression = CompressionConfig.from_json(args.p2p_compression, key="--p2p-compression")
            # A state of this run's own: the process-wide default would carry EF / AQ-SGD state and byte counts
            # over from an earlier run in the same process (tests run several).
            comm = CompressedP2PCommunicator(pp_group, config, compression=compression,
                                             state=CompressionState(compression))
        comm_kw = {"p2p_communicator": comm if comm is not None else TimedP2PCommunicator(pp_group, config),
                   "pg_collection": ProcessGroupCollection.use_mpu_process_groups()}

    start = skipped = 0
    if args.load:
        start, common, side = ckpt.load_checkpoint(args.load, chunks=chunks, opt=opt, sched=sched,
                                                   layout=A.layout_key(args, layout), ranks=ranks,
                                                   distlion=args.distlion)
        skipped = common["skipped_steps"]
        # Compression may be switched on or off across a restart: its state is restored when both sides have one
        # (CompressionState refuses a different config), otherwise it starts fresh / is dropped.
        if comm is not None and side["p2p"] is not None:
            comm.load_state_dict(side["p2p"])
        if tied_state is not None and side["tied"] is not None:
            tied_state.load_state_dict(side["tied"])
        if local:  # mid-round every DP rank's weights and optimizer state are its own
            for c, sd in zip(chunks, side["local"]["model"], strict=True):
                c.module.load_state_dict(sd)
            opt.load_state_dict(side["local"]["optimizer"])
        ckpt.set_rng_state(side["rng"])  # last: building the model consumed the generators
    # Collective: megatron-core's builder builds the sample index on rank 0 first; all ranks open it.
    epoch_len = args.epoch_samples or args.train_iters * layout.global_batch
    train_ds, valid_ds = gpt_datasets(args.data_path, args.seq_length, epoch_len,
                                      max(args.eval_iters, 1) * layout.global_batch, seed=args.seed)
    train = Batches(train_ds, layout, args.micro_batch_size, ranks["dp"], epoch_len, device)
    valid = Batches(valid_ds, layout, args.micro_batch_size, ranks["dp"], 1 << 62, device)

    fwd_bwd = get_forward_backward_func()
    step_fn = functools.partial(forward_step, aqsgd=compression is not None and compression.uses_aqsgd)
    needs_data = [c.module.pre_process or c.module.post_process for c in chunks]
    tied = S.shared_embedding(chunks, pp_first) if embd_group is not None else None
    p2p_start = comm.comm_stats() if comm is not None else None  # resumed counters include the earlier run
    emb_ring = S.ring_bytes(tied.numel(), dist.get_world_size(embd_group)) if tied is not None else 0
    dp_ring = 0 if args.distlion else S.dp_grad_bucket_bytes(chunks, layout.dp)
    wire = {"embedding_allreduce": 0, "dp_allreduce": 0}

    def run_schedule(batches, iteration: int, forward_only: bool):
        iters = [batches.iterator(iteration, need) for need in needs_data]
        return fwd_bwd(forward_step_func=step_fn, data_iterator=iters if layout.vp > 1 else iters[0],
                       model=chunks, num_microbatches=layout.num_micro, seq_length=args.seq_length,
                       micro_batch_size=args.micro_batch_size, forward_only=forward_only, **comm_kw)

    def dp_mean(losses) -> float | None:
        """Mean loss of the iteration over micro-batches and DP ranks (last stage only; logging)."""
        if not pp_last:
            return None
        t = torch.stack([x["lm loss"] for x in losses]).mean().reshape(1)
        dist.all_reduce(t, group=dp_group)
        return float(t) / layout.dp

    def evaluate(iteration: int) -> dict:
        for c in chunks:
            c.eval()
        with torch.no_grad():
            total = [dp_mean(run_schedule(valid, e, forward_only=True)) for e in range(args.eval_iters)]
        for c in chunks:
            c.train()
        value = sum(total) / len(total) if pp_last else None
        if pp_last:
            logger.info("iteration %6d | validation loss %.4f", iteration, value)
        return {"iteration": iteration, "val_loss": value}

    def save(iteration: int) -> None:
        side = {"rng": ckpt.rng_state(), "p2p": comm.state_dict() if comm is not None else None,
                "tied": tied_state.state_dict() if tied_state is not None else None,
                "local": {"model": [c.module.state_dict() for c in chunks], "optimizer": opt.state_dict()}
                if local else None}
        ckpt.save_checkpoint(args.save, iteration, chunks=chunks, opt=opt, sched=sched, rank_state=side,
                             ranks=ranks, common={"skipped_steps": skipped, "layout": A.layout_key(args, layout)})

    end = args.exit_interval or args.train_iters
    losses: list[float | None] = []
    evals: list[dict] = []
    t0 = time.perf_counter()
    for it in range(start, end):
        n = it + 1
        if comm is not None:
            comm.set_epoch(train.first_sample(it) // epoch_len)  # AQ-SGD: warm-up epochs are sent in full
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        # A dead or stalled peer fails each phase with one line naming the iteration and the phase.
        out = run_collective("the pipeline schedule and finalize_model_grads (p2p send/recv, TP collectives, "
                             "tied-embedding and DP gradient all-reduces)",
                             functools.partial(run_schedule, train, it, forward_only=False), step=n,
                             unit="iteration")
        wire["embedding_allreduce"] += emb_ring if tied_state is None else 0
        wire["dp_allreduce"] += dp_ring
        applied, norm, _ = run_collective("the optimizer step (D-Lion vote exchange / gradient-norm all-reduce)",
                                          opt.step, step=n, unit="iteration")
        if applied:
            sched.step(increment=1)  # as Megatron-LM: the schedule advances only on applied steps
        else:
            skipped += 1
            logger.warning("iteration %d: non-finite gradients on some replica; step skipped on every rank "
                           "(%d so far)", n, skipped)
        losses.append(dp_mean(out))
        if pp_last and (n % args.log_interval == 0 or n == end):
            logger.info("iteration %6d/%d | loss %.4f | grad norm %s | lr %.3e | %.2f s/iter", n, args.train_iters,
                        losses[-1], "n/a" if norm is None else f"{norm:.3f}", opt.param_groups[0]["lr"],
                        (time.perf_counter() - t0) / (n - start))
        if args.eval_iters and (n % args.eval_interval == 0 or n == args.train_iters):
            evals.append(evaluate(n))
        if args.save_interval and n % args.save_interval == 0 and n != end:
            save(n)
    wall = time.perf_counter() - t0
    if args.save and end > start:
        save(end)

    stats = opt.comm_stats() if args.distlion else None
    record = {
        "rank": rank, **ranks, "pp_last": pp_last, "losses": losses, "evals": evals,
        # local steps: replicas are identical after an outer step only
        "dp_ok": S.identical(params, dp_group) if not local or end % args.dlion_local_steps == 0 else None,
        "tp_ok": S.identical([p for p in params if not getattr(p, "tensor_model_parallel", False)], tp_group),
        "tied_ok": S.identical([tied], embd_group) if tied is not None else None,
        "params": sum(p.numel() for p in params if not getattr(p, "shared", False)
                      and (getattr(p, "tensor_model_parallel", False) or ranks["tp"] == 0)) if ranks["dp"] == 0 else 0,
        "dlion": stats["bytes_sent"] if stats else None, "dlion_bits": stats["bits_per_param_step"] if stats else None,
        "early_buckets": stats.get("early_buckets", 0) if stats else None,
        "p2p": S.p2p_delta(comm.comm_stats(), p2p_start) if comm is not None else None,
        "embedding_allreduce": (finalize.comm_stats()["bytes_sent"] if tied_state is not None
                                else wire["embedding_allreduce"]),
        "dp_allreduce": stats.get("dp_grad_bytes_sent", 0) if stats else wire["dp_allreduce"],
    }
    records = S.gather_records(record)
    if rank == 0:
        S.write_summary(args, layout, records, start, end, skipped, wall)
    return 0 if S.all_ok(records) else 1


if __name__ == "__main__":  # finished and torn down: no interpreter finalization for gloo to abort in
    from distlion_ds.comm import exit_after_teardown

    exit_after_teardown(main())
