"""Megatron-LM-style arguments of the pretraining entry, and the parallel layout they give with a world size.

The distlion_ds flags are the Megatron-LM plugin's (:func:`distlion_ds.megatron.add_arguments`: ``--distlion``,
``--dlion-aggregation``, ``--dlion-beta1/2``, ``--dlion-local-steps``, ``--p2p-compression``,
``--tied-embedding-compression``); ``--optimizer distlion`` is this entry's spelling of ``--optimizer adam
--distlion`` (the launch scripts use it), ``--aggregation`` an alias of ``--dlion-aggregation``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PROG = "python -m distlion_ds.megatron.pretrain_gpt"


def build_parser(description: str) -> argparse.ArgumentParser:
    """The entry's parser: Megatron-LM names plus the plugin's flags."""
    from distlion_ds.megatron.plugin import add_arguments

    ap = argparse.ArgumentParser(prog=PROG, description=description)
    g = ap.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per model chunk (num-layers / pp / this = chunks per rank)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="megatron-core DDP: start each bucket's DP exchange (all-reduce, or D-Lion's vote "
                        "all_to_all) during the last micro-batch's backward")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="megatron-core DDP: elements per gradient bucket (default: megatron-core's); D-Lion votes "
                        "per bucket, so with --overlap-grad-reduce smaller buckets leave earlier")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="process-group timeout: a stalled peer fails every rank after this long (torch's default "
                        "is 30 minutes)")
    g = ap.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden-size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default seq-length")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"), default="auto",
                   help="auto: Transformer Engine when it imports and CUDA is present, else the local spec")
    g = ap.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch-size * dp")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (and save, with --save) after this many iterations of the --train-iters schedule")
    g.add_argument("--optimizer", choices=("adam", "distlion"), default="distlion",
                   help="distlion (default; Megatron-LM's spelling: --optimizer adam --distlion): D-Lion votes "
                        "instead of the DDP gradient all-reduce; adam: megatron-core's own get_megatron_optimizer "
                        "(AdamW) after its DDP gradient all-reduce")
    g.add_argument("--aggregation", dest="dlion_aggregation", choices=("mavo", "avg"), default=argparse.SUPPRESS,
                   help="alias of --dlion-aggregation")
    g.add_argument("--dlion-intra-node-size", type=int, default=1,
                   help="hierarchical D-Lion (plain PyTorch / DeepSpeed); the megatron-core optimizer votes flat: "
                        "only 1 runs here")
    g.add_argument("--dlion-outer-lr", type=float, default=None,
                   help="--dlion-local-steps > 1: the outer D-Lion learning rate (default: --lr, which drives the "
                        "inner AdamW)")
    g.add_argument("--dlion-outer-weight-decay", type=float, default=0.0,
                   help="--dlion-local-steps > 1: the outer step's decoupled weight decay")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default train-iters")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01, help="not applied to biases and 1-D parameters")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="gradient-norm clip (AdamW: global norm after the all-reduce; D-Lion: each replica's "
                        "local norm); 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", default="data_cache/stdlib",
                   help="folder written by `python -m distlion_ds.data prepare` (rank 0 prepares the stdlib corpus "
                        "there when it is missing)")
    g.add_argument("--tokenizer-model", default=None, help="default <data-path>/tokenizer.model")
    g.add_argument("--epoch-samples", type=int, default=None,
                   help="cycle over the first N training samples (multi-epoch runs; AQ-SGD keeps one buffer per "
                        "sample and sends deltas from the second epoch on); a multiple of the global batch")
    g = ap.add_argument_group("checkpointing, evaluation, logging")
    g.add_argument("--save", default=None, help="checkpoint folder (megatron-core dist_checkpointing)")
    g.add_argument("--load", default=None, help="checkpoint folder to resume from (its latest iteration)")
    g.add_argument("--save-interval", type=int, default=None, help="also save every N iterations")
    g.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist",
                   help="dist_checkpointing backend (Megatron-LM's name; torch_dist is the one supported here)")
    g.add_argument("--eval-interval", type=int, default=1000, help="evaluate every N iterations and at the end")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per evaluation; 0 disables")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--out", default="runs/megatron_gpt", help="folder for summary.json")
    add_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None, description: str = "GPT pretraining on megatron-core"):
    """Parse and check what needs no world size (the rest: :func:`validate_args`); errors name the flag.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        description: the ``--help`` headline.
    Returns:
        The namespace; ``args.distlion`` is True for ``--distlion`` or ``--optimizer distlion``.
    """
    ap = build_parser(description)
    args = ap.parse_args(argv)
    positive = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size",
                "num_attention_heads", "seq_length", "micro_batch_size", "train_iters", "eval_interval",
                "log_interval")
    for name in positive:
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("num_layers_per_virtual_pipeline_stage", "global_batch_size", "exit_interval", "save_interval",
                 "lr_decay_iters", "epoch_samples", "ffn_hidden_size", "max_position_embeddings"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("eval_iters", "lr_warmup_iters", "weight_decay", "clip_grad", "min_lr", "hidden_dropout",
                 "attention_dropout"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    args.distlion = args.distlion or args.optimizer == "distlion"
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        ap.error(f"--ddp-bucket-size must be >= 1, got {args.ddp_bucket_size}")
    if args.dlion_intra_node_size < 1:
        ap.error(f"--dlion-intra-node-size must be >= 1, got {args.dlion_intra_node_size}")
    if args.dlion_intra_node_size > 1 and not args.distlion:
        ap.error(f"--dlion-intra-node-size {args.dlion_intra_node_size} applies to --optimizer distlion only")
    if args.dlion_intra_node_size > 1:
        ap.error(f"--dlion-intra-node-size {args.dlion_intra_node_size}: the megatron-core D-Lion optimizer votes "
                 "flat over the data-parallel group (hierarchical voting on megatron-core's DDP buckets is not "
                 "built yet); use 1 here, or hierarchical D-Lion through distlion_ds.DistributedLion or the "
                 "DeepSpeed config (optimizer.params.intra_node_size)")
    if not (args.distributed_timeout_minutes > 0 and math.isfinite(args.distributed_timeout_minutes)):
        ap.error(f"--distributed-timeout-minutes must be a finite number > 0, got {args.distributed_timeout_minutes}")
    if args.min_lr > args.lr:
        ap.error(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.hidden_size % args.num_attention_heads:
        ap.error(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                 f"{args.num_attention_heads}")
    if args.lr_warmup_iters >= (args.lr_decay_iters or args.train_iters):
        ap.error(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay iterations "
                 f"({args.lr_decay_iters or args.train_iters})")
    if args.dlion_outer_lr is not None and not args.dlion_outer_lr > 0:
        ap.error(f"--dlion-outer-lr must be > 0, got {args.dlion_outer_lr}")
    if not args.dlion_outer_weight_decay >= 0:
        ap.error(f"--dlion-outer-weight-decay must be >= 0, got {args.dlion_outer_weight_decay}")
    if args.save_interval and not args.save:
        ap.error("--save-interval needs --save")
    return args


@dataclass(frozen=True)
class Layout:
    """The parallel layout a run derives from its arguments and world size."""

    world: int
    tp: int
    pp: int
    dp: int
    vp: int  # model chunks per pipeline rank (1: plain 1F1B)
    num_micro: int  # micro-batches per iteration and DP rank
    global_batch: int


def validate_args(args: argparse.Namespace, world_size: int) -> Layout:
    """Check the combination of arguments and world size; raise ``ValueError`` naming the arguments at fault.

    Args:
        args: from :func:`parse_args`.
        world_size: number of processes.
    Returns:
        The derived :class:`Layout`.
    """
    from distlion_ds.megatron import plugin

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if args.num_layers % pp:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    vp = 1
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // pp
        if pp < 2:
            raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}"
                             f" does not divide the {per_stage} layers of each pipeline stage")
        vp = per_stage // args.num_layers_per_virtual_pipeline_stage
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    if ffn % tp:
        raise ValueError(f"ffn hidden size {ffn} is not divisible by --tensor-model-parallel-size {tp}")
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp} (world {world_size} / tp {tp} / pp {pp})")
    num_micro = gbs // (args.micro_batch_size * dp)
    if vp > 1 and num_micro % pp:
        # megatron-core's interleaved schedule runs micro-batches in groups of pp per model chunk
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_micro} = global batch "
                         f"{gbs} / (micro {args.micro_batch_size} x dp {dp})) to be a multiple of "
                         f"--pipeline-model-parallel-size {pp}")
    if args.epoch_samples is not None and args.epoch_samples % gbs:
        raise ValueError(f"--epoch-samples {args.epoch_samples} is not a multiple of the global batch {gbs}")
    if args.exit_interval is not None and args.exit_interval > args.train_iters:
        raise ValueError(f"--exit-interval {args.exit_interval} exceeds --train-iters {args.train_iters}")
    # The plugin's checks (flag combinations), with this entry's --optimizer distlion read as Megatron-LM's
    # --optimizer adam --distlion.
    plugin.validate_args(argparse.Namespace(**{**vars(args), "optimizer": "adam"}))
    return Layout(world=world_size, tp=tp, pp=pp, dp=dp, vp=vp, num_micro=num_micro, global_batch=gbs)


def init_distributed(timeout_minutes: float) -> bool:
    """Join (or reuse) the default process group; True when this call created it.

    ``timeout_minutes`` bounds every collective of the group (gloo and NCCL alike); a reused group keeps the timeout
    its creator gave it.
    """
    if dist.is_initialized():
        return False
    timeout = datetime.timedelta(minutes=timeout_minutes)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return True


def layout_key(args: argparse.Namespace, layout: Layout) -> dict:
    """What a checkpoint must match to be resumed by this run (compared exactly at load)."""
    return {**{k: v for k, v in dataclasses.asdict(layout).items() if k in ("tp", "pp", "dp", "vp")},
            "optimizer": "distlion" if args.distlion else "adam", "local_steps": args.dlion_local_steps,
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size}
