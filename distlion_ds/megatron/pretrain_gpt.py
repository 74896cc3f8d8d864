"""GPT pretraining on megatron-core: tensor x pipeline x data parallelism, D-Lion or AdamW, compressed pipeline p2p.

    torchrun --nproc_per_node 8 -m distlion_ds.megatron.pretrain_gpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --micro-batch-size 2 --global-batch-size 8 --train-iters 50 --lr 3e-4 \\
        --optimizer distlion --p2p-compression configs/compression/topk10_q8.json --out runs/3d

(``launch/megatron_gpt.sh`` and ``launch/3d_gpt.sh`` are this command.) Megatron-LM argument names; the data-parallel
size is ``world / (tp * pp)``. The pieces are megatron-core's own: ``initialize_model_parallel``, ``GPTModel`` (local
layer spec on CPU, Transformer Engine spec when ``transformer_engine`` imports and CUDA is present), its pipeline
schedules (1F1B, interleaved with ``--num-layers-per-virtual-pipeline-stage``), ``OptimizerParamScheduler`` and
``GPTDataset`` over the SentencePiece corpus of :mod:`distlion_ds.data` (rank 0 prepares it when missing).

What replaces Megatron-LM's DDP wrapper and optimizer (one function each, below):

- ``--optimizer distlion``: :class:`distlion_ds.DistributedLion` on this rank's data-parallel group (so a TP shard
  votes with the same shard of the other replicas), and no gradient all-reduce at all: the 1-bit votes are the DP
  traffic (arXiv 2404.00438).
- ``--optimizer adam``: ``torch.optim.AdamW`` after an explicit fp32 gradient all-reduce over the DP group: all
  gradients flattened into buckets of <= 2**25 elements, one SUM all-reduce per bucket, divided by the DP size
  (what Megatron-LM's DDP does, without its overlap with backward).
- Tied word embeddings (first and last pipeline stage each hold a copy): their gradients are summed over
  megatron-core's embedding group before the optimizer, as ``finalize_model_grads`` does. Both copies then see the
  same gradient on every DP rank, so the two DP groups (stage 0's and stage N-1's) cast identical votes and apply
  identical updates; the run checks the copies bit for bit at the end (``tied_embeddings_identical``). That
  all-reduce is fp32 (vocab x hidden / tp elements per rank and step) and crosses the pipeline cut: in small-model
  runs it is the largest channel of ``wire`` (~15x the votes and p2p frames together in ``launch/3d_gpt.sh``);
  ``--untie-embeddings-and-output-weights`` removes it.
- Gradient clipping (``--clip-grad``): the global norm over the model-parallel group (tensor-parallel duplicates
  and the tied copy counted once). With AdamW it runs after the DP all-reduce (global clipping, as Megatron-LM);
  with D-Lion on each replica's local gradients (it scales the gradient's weight in the momentum, Lion sign-votes
  the rest). A non-finite norm on any replica skips the step on every rank (one 4-byte all-reduce over the DP group).

Checkpoints (``--save``/``--load``): one ``torch.save`` file per rank (D-Lion momentum is per rank: replicas share
parameters, not momentum), holding model, optimizer, LR scheduler, iteration, RNG states (CPU, CUDA, megatron's
tracker) and the p2p compression state (EF / EF21 / AQ-SGD buffers, byte counts). Resuming is exact: k iterations +
save + load + k iterations equals 2k iterations bit for bit (tested). Every file is written through
:mod:`distlion_ds.checkpoint_io` (temporary name, fsync, rename, SHA-256 sidecar) and verified at load; the tracker
``latest_checkpointed_iteration.txt`` is written last, by rank 0, after a barrier that follows every rank's file, so a
run killed during a save resumes from the previous complete iteration (tested with kill -9), and a corrupted or
truncated file is refused with an error naming it.

``--distributed-timeout-minutes`` (Megatron-LM's name, default 10) is the process-group timeout: a stalled or dead
peer makes every other rank's collective fail after that long instead of hanging for torch's default 30 minutes.

Writes ``<out>/summary.json``: ``{"tp", "pp", "dp", "steps", "losses", "dp_replicas_identical", "wire", ...}``;
replicas and tied copies are compared with :func:`distlion_ds.comm.replica_checksum` across ranks, not assumed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import math
import os
import pathlib
import random
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distlion_ds.checkpoint_io import (
    atomic_save,
    atomic_write_text,
    load_verified,
    makedirs_durable,
    read_verified_text,
)
from distlion_ds.comm import raise_together, run_collective, set_timeout_everywhere

logger = logging.getLogger(__name__)

# Megatron-LM's --make-vocab-size-divisible-by default: the padded vocab splits evenly over TP ranks.
VOCAB_DIVISOR = 128
# Gradient all-reduce buckets for AdamW: 2**25 fp32 elements = 128 MiB, one collective each (no per-tensor
# collectives; a single flat buffer would double gradient memory on large models).
ALLREDUCE_BUCKET_NUMEL = 1 << 25
TRACKER_FILE = "latest_checkpointed_iteration.txt"


# --------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Megatron-LM-style arguments; checks that need no world size (the rest: :func:`validate_args`)."""
    ap = argparse.ArgumentParser(prog="python -m distlion_ds.megatron.pretrain_gpt",
                                 description=__doc__.splitlines()[0])
    g = ap.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per model chunk (num-layers / pp / this = chunks per rank)")
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
    g.add_argument("--optimizer", choices=("distlion", "adam"), default="distlion")
    g.add_argument("--aggregation", choices=("mavo", "avg"), default="mavo", help="D-Lion vote aggregation")
    g.add_argument("--dlion-intra-node-size", type=int, default=1,
                   help="hierarchical D-Lion: data-parallel ranks per node (consecutive DP ranks); gradients are "
                        "reduce-scattered in fp32 inside a node, momentum is sharded across its ranks, only nodes "
                        "vote. 1 (default): flat D-Lion. Must divide the data-parallel size")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default train-iters")
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01, help="not applied to biases and norms")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip; 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--lion-beta1", type=float, default=0.9)
    g.add_argument("--lion-beta2", type=float, default=0.99)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="process-group timeout: a stalled peer fails every rank after this long (torch's default "
                        "is 30 minutes)")
    g.add_argument("--p2p-compression", default=None,
                   help="compression JSON (configs/compression/*.json) for pipeline p2p; default: megatron-core's "
                        "own uncompressed communicator")
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", default="data_cache/stdlib",
                   help="folder written by `python -m distlion_ds.data prepare` (rank 0 prepares the stdlib corpus "
                        "there when it is missing)")
    g.add_argument("--tokenizer-model", default=None, help="default <data-path>/tokenizer.model")
    g.add_argument("--epoch-samples", type=int, default=None,
                   help="cycle over the first N training samples (multi-epoch runs; AQ-SGD keeps one buffer per "
                        "sample and sends deltas from the second epoch on); a multiple of the global batch")
    g = ap.add_argument_group("checkpointing, evaluation, logging")
    g.add_argument("--save", default=None, help="checkpoint folder")
    g.add_argument("--load", default=None, help="checkpoint folder to resume from (its latest iteration)")
    g.add_argument("--save-interval", type=int, default=None, help="also save every N iterations")
    g.add_argument("--eval-interval", type=int, default=1000, help="evaluate every N iterations and at the end")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per evaluation; 0 disables")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--out", default="runs/megatron_gpt", help="folder for summary.json")
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
    if args.dlion_intra_node_size < 1:
        ap.error(f"--dlion-intra-node-size must be >= 1, got {args.dlion_intra_node_size}")
    if args.dlion_intra_node_size > 1 and args.optimizer != "distlion":
        ap.error(f"--dlion-intra-node-size {args.dlion_intra_node_size} applies to --optimizer distlion only")
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
    if args.save_interval and not args.save:
        ap.error("--save-interval needs --save")
    if args.p2p_compression is not None:
        # Read here, before any process group exists: a bad file is one line on every rank, not a failure after
        # the ranks have started talking.
        from distlion_ds.compress.config import CompressionConfig

        try:
            CompressionConfig.from_json(args.p2p_compression)
        except ValueError as e:
            ap.error(f"--p2p-compression: {e}")
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
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    intra = getattr(args, "dlion_intra_node_size", 1)
    if dp % intra:
        raise ValueError(f"--dlion-intra-node-size {intra} does not divide the data-parallel "
                         f"size {dp} (world {world_size} / tp {tp} / pp {pp}); every node must hold the same number "
                         "of data-parallel ranks")
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
    if args.p2p_compression is not None and pp < 2:
        raise ValueError("--p2p-compression compresses traffic between pipeline stages: it needs "
                         "--pipeline-model-parallel-size >= 2")
    if args.epoch_samples is not None and args.epoch_samples % gbs:
        raise ValueError(f"--epoch-samples {args.epoch_samples} is not a multiple of the global batch {gbs}")
    if args.exit_interval is not None and args.exit_interval > args.train_iters:
        raise ValueError(f"--exit-interval {args.exit_interval} exceeds --train-iters {args.train_iters}")
    return Layout(world=world_size, tp=tp, pp=pp, dp=dp, vp=vp, num_micro=num_micro, global_batch=gbs)


# --------------------------------------------------------------------------------------------------- set-up


def _init_distributed(timeout_minutes: float) -> bool:
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


def _use_transformer_engine(impl: str) -> bool:
    if impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if impl == "transformer_engine":
            raise
        return False
    return torch.cuda.is_available()


def _build_model(args, layout: Layout, vocab_size: int):
    """megatron-core GPTModel chunks of this rank and their TransformerConfig."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp if layout.vp > 1 else None,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        # On CPU the weights must be initialised there; it also makes a TP-sharded weight a slice of the same
        # full matrix on every TP rank (megatron's _initialize_affine_weight_cpu draws the master weight).
        use_cpu_initialization=not cuda,
        # Megatron-LM's default for both schedules (--overlap-p2p-communication makes batch_p2p_comm False), and
        # pp=2 + interleaving + batched p2p gives silently wrong results (DESIGN section 4).
        batch_p2p_comm=False,
        # Overlapped p2p is an interleaved-schedule optimisation; on gloo megatron-core's own communicator races
        # with output deallocation (measured in tests/test_megatron_p2p.py), so it is only used on GPUs.
        overlap_p2p_comm=cuda and layout.vp > 1,
        deallocate_pipeline_outputs=True,
    )
    te = _use_transformer_engine(args.transformer_impl)
    spec = get_gpt_layer_with_transformer_engine_spec() if te else get_gpt_layer_local_spec()
    chunks = []
    for v in range(layout.vp):
        vp_stage = v if layout.vp > 1 else None
        chunks.append(GPTModel(
            config, spec, vocab_size=vocab_size,
            max_sequence_length=args.max_position_embeddings or args.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, vp_stage=vp_stage,
        ))
    if cuda:
        chunks = [c.cuda() for c in chunks]
    logger.info("model: %s spec, %d chunk(s) per rank, %d parameters on this rank",
                "Transformer Engine" if te else "local", len(chunks),
                sum(p.numel() for c in chunks for p in c.parameters()))
    return config, chunks


def _param_groups(chunks) -> list[dict]:
    """Megatron-LM's grouping: no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for c in chunks:
        for p in c.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]


def _build_optimizer(args, chunks, dp_group):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    import distlion_ds

    groups = _param_groups(chunks)
    if args.optimizer == "distlion":
        opt = distlion_ds.DistributedLion(groups, lr=args.lr, betas=(args.lion_beta1, args.lion_beta2),
                                          weight_decay=args.weight_decay, aggregation=args.aggregation,
                                          process_group=dp_group, intra_node_size=args.dlion_intra_node_size)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                weight_decay=args.weight_decay)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters or args.train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return opt, sched


def _seed(seed: int, pp_rank: int) -> None:
    """Megatron-LM's ``_set_random_seed``: one seed per pipeline stage, shared by TP and DP ranks (identical initial
    replicas; TP shards are slices of one master weight), plus megatron's RNG tracker (CPU-backed under
    ``enable_cpu``) for dropout inside tensor-parallel regions."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# --------------------------------------------------------------------------------------------------- data


def _prepare_data(args) -> dict:
    from distlion_ds.data import prepare

    root = pathlib.Path(args.data_path)
    if dist.get_rank() == 0 and not (root / "meta.json").exists():
        logger.info("%s has no prepared data: preparing the stdlib corpus there", root)
        prepare(corpus="stdlib", out=str(root))
    dist.barrier()
    meta = json.loads((root / "meta.json").read_text())
    tok = args.tokenizer_model or str(root / "tokenizer.model")
    if not os.path.exists(tok):
        raise FileNotFoundError(f"--tokenizer-model {tok} does not exist")
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=tok).get_piece_size()
    if n < meta["vocab_size_actual"]:
        raise ValueError(f"--tokenizer-model {tok} has {n} pieces, but {root} was tokenised with "
                         f"{meta['vocab_size_actual']}: not the tokenizer of this data")
    meta["tokenizer_pieces"] = n
    return meta


class _Batches:
    """Micro-batches of one DP rank, by global sample index (Megatron-LM's ``MegatronPretrainingSampler`` order:
    micro-batch m of iteration i holds samples ``i*G + m*mbs*dp + rank*mbs + [0, mbs)``). Stateless, so a resumed
    run reads exactly what an uninterrupted one would."""

    def __init__(self, dataset, layout: Layout, micro: int, dp_rank: int, epoch_len: int, device):
        self.ds, self.layout, self.micro, self.dp_rank = dataset, layout, micro, dp_rank
        self.epoch_len, self.device = epoch_len, device

    def first_sample(self, iteration: int) -> int:
        return iteration * self.layout.global_batch

    def iterator(self, iteration: int, needed: bool):
        lay = self.layout
        for m in range(lay.num_micro):
            if not needed:  # a middle pipeline stage reads no data
                yield None
                continue
            first = iteration * lay.global_batch + (m * lay.dp + self.dp_rank) * self.micro
            ids = [(first + j) % self.epoch_len for j in range(self.micro)]
            samples = [self.ds[i] for i in ids]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(self.device)
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            batch["ids"] = torch.tensor(ids)
            yield batch


def _forward_step(data_iterator, model, *, aqsgd: bool):
    from distlion_ds.megatron import set_sample_ids

    batch = next(data_iterator)
    if batch is None:
        return model(None, None, None), _loss_func_unreachable
    if aqsgd and model.pre_process:
        set_sample_ids(batch["ids"])  # AQ-SGD keys its per-sample buffers by dataset index
    output = model(batch["tokens"], batch["position_ids"], None,
                   labels=batch["labels"] if model.post_process else None)
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """Masked mean over the micro-batch (megatron-core divides by the number of micro-batches)."""
    mask = loss_mask.float()
    loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # A copy: megatron-core divides the returned loss in place by the number of micro-batches, and a detached view
    # would share that storage (the logged loss came out halved at 2 micro-batches).
    return loss, {"lm loss": loss.detach().clone()}


def _loss_func_unreachable(_):
    raise RuntimeError("a middle pipeline stage computed a loss: the data iterator gave it no labels")


# --------------------------------------------------------------------------------------------------- one step


def _shared_embedding(chunks, pp_first: bool):
    """The word-embedding weight this rank shares with the other end of the pipeline (None when not tied)."""
    chunk = chunks[0] if pp_first else chunks[-1]
    if not chunk.share_embeddings_and_output_weights:
        return None
    return chunk.shared_embedding_or_output_weight()


class _Wire:
    """Bytes this rank sent per channel; the counted channels come from the senders' own counters, the fp32
    all-reduces are ring estimates (2 (N-1)/N x payload per rank)."""

    def __init__(self):
        self.embedding_allreduce = 0
        self.dp_allreduce = 0

    @staticmethod
    def ring(numel: int, n: int, elem: int = 4) -> int:
        return 2 * (n - 1) * numel * elem // n if n > 1 else 0


def _allreduce_tied_embedding_grad(weight, group, wire: _Wire) -> None:
    """Sum the tied word-embedding gradients of the first and last stage (megatron-core's
    ``_allreduce_word_embedding_grads``; it is not called because that needs the DDP wrapper)."""
    if weight is None or group is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=group)
    wire.embedding_allreduce += _Wire.ring(weight.numel(), dist.get_world_size(group), weight.element_size())


def _allreduce_dp_grads(params, group, dp: int, wire: _Wire) -> None:
    """AdamW only: fp32 gradient average over the DP group, bucketed (see ALLREDUCE_BUCKET_NUMEL)."""
    if dp == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:  # every rank must contribute the same layout
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    numel = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        numel += g.numel()
        if numel >= ALLREDUCE_BUCKET_NUMEL or i == len(grads) - 1:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.div_(dp)
            for g_, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                g_.copy_(synced)
            wire.dp_allreduce += _Wire.ring(flat.numel(), dp)
            bucket, numel = [], 0


def _grad_norm(params, mp_group) -> torch.Tensor:
    """Global L2 norm over the model-parallel group; TP duplicates and the tied copy of the last stage counted once."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.float().pow(2).sum()
    dist.all_reduce(sq, group=mp_group)
    return sq.sqrt()


# --------------------------------------------------------------------------------------------------- checkpoints


def _rank_file(root: str, iteration: int, ranks: dict) -> pathlib.Path:
    # Megatron-LM's iter_XXXXXXX/mp_rank_TT_PPP naming, plus the DP rank: D-Lion momentum differs per DP rank.
    return (pathlib.Path(root) / f"iter_{iteration:07d}" /
            f"mp_rank_{ranks['tp']:02d}_{ranks['pp']:03d}_dp{ranks['dp']:03d}.pt")


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _layout_key(args, layout: Layout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vp": layout.vp, "optimizer": args.optimizer,
            "num_layers": args.num_layers, "hidden_size": args.hidden_size}


def save_checkpoint(args, layout, ranks, iteration, chunks, opt, sched, comm, skipped) -> None:
    """Every rank writes its own file (atomic, checksummed); rank 0 then records the iteration in the tracker file,
    atomically too, after a barrier: the tracker only ever names an iteration whose files are all complete."""
    path = _rank_file(args.save, iteration, ranks)
    makedirs_durable(path.parent)
    atomic_save({"iteration": iteration, "layout": _layout_key(args, layout),
                 "model": [c.state_dict() for c in chunks], "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": _rng_state(),
                 "p2p": comm.state_dict() if comm is not None else None, "skipped_steps": skipped}, path)
    dist.barrier()  # the tracker may only name an iteration every rank has written
    if dist.get_rank() == 0:
        atomic_write_text(pathlib.Path(args.save) / TRACKER_FILE, f"{iteration}\n")
        logger.info("saved checkpoint of iteration %d to %s", iteration, args.save)
    dist.barrier()


def _read_checkpoint(args, ranks) -> tuple[int, dict]:
    """This rank's (iteration, state) as the tracker names it, both verified against their checksums."""
    tracker = pathlib.Path(args.load) / TRACKER_FILE
    if not tracker.exists():
        raise FileNotFoundError(f"--load {args.load}: no {TRACKER_FILE} (nothing saved there)")
    iteration = int(read_verified_text(tracker).strip())
    path = _rank_file(args.load, iteration, ranks)
    if not path.exists():
        raise FileNotFoundError(f"--load {args.load}: {path.name} of iteration {iteration} is missing; "
                                f"was it saved with another parallel layout?")
    # weights_only=False: the RNG states hold Python and NumPy objects. The file passed its checksum, so it is the
    # file this entry wrote.
    return iteration, load_verified(path, map_location="cpu", weights_only=False)


def load_checkpoint(args, layout, ranks, chunks, opt, sched, comm) -> tuple[int, int]:
    """Restore this rank's state; returns (iteration, skipped steps). RNG last: building the model consumed it.

    The tracker and this rank's file are verified against their checksums first (CheckpointCorruptError, naming
    the file, when they fail).
    """
    try:
        iteration, state = _read_checkpoint(args, ranks)
        error = None
    except Exception as e:  # missing, corrupt, unreadable: re-raised below, after the other ranks are told
        iteration, state, error = None, None, e
    raise_together(error, lambda bad: f"--load {args.load}: rank(s) {bad} could not read their checkpoint files "
                   "(their errors name the files); load the previous checkpoint or fix those files")
    if state["layout"] != _layout_key(args, layout):
        raise ValueError(f"--load {args.load}: saved with {state['layout']}, this run is "
                         f"{_layout_key(args, layout)}")
    for c, sd in zip(chunks, state["model"], strict=True):
        c.load_state_dict(sd)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # p2p compression may be switched on or off across a restart: its state is restored when both sides have one
    # (CompressionState refuses a different config), otherwise it starts fresh / is dropped.
    if comm is not None and state["p2p"] is not None:
        comm.load_state_dict(state["p2p"])
    elif comm is not None:
        logger.info("the checkpoint holds no p2p compression state: it starts fresh")
    elif state["p2p"] is not None:
        logger.info("p2p compression is off in this run: the checkpoint's compression state is not used")
    _set_rng_state(state["rng"])
    logger.info("resumed from iteration %d of %s", iteration, args.load)
    return iteration, state["skipped_steps"]


# --------------------------------------------------------------------------------------------------- the run


def _replicas_identical(params, group) -> bool:
    from distlion_ds.comm import replica_checksum

    return len(set(replica_checksum(params, group))) == 1


def main(argv: list[str] | None = None) -> int:
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


def _run(args, layout: Layout) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    from distlion_ds.compress import CompressionConfig, CompressionState
    from distlion_ds.data import gpt_datasets
    from distlion_ds.megatron import CompressedP2PCommunicator, enable_cpu
    from distlion_ds.megatron.communicator import TimedP2PCommunicator

    cuda = torch.cuda.is_available()
    enable_cpu()  # no-op with CUDA
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    meta = _prepare_data(args)
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

    _seed(args.seed, ranks["pp"])
    divisor = VOCAB_DIVISOR * layout.tp
    vocab = -(-meta["tokenizer_pieces"] // divisor) * divisor
    config, chunks = _build_model(args, layout, vocab)
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    opt, sched = _build_optimizer(args, chunks, dp_group)

    comm = comm_kw = None
    compression = None
    if args.p2p_compression is not None:
        compression = CompressionConfig.from_json(args.p2p_compression)
        # A state of this run's own: the process-wide default would carry EF / AQ-SGD state and byte counts over
        # from an earlier run in the same process (tests run several).
        comm = CompressedP2PCommunicator(ps.get_pipeline_model_parallel_group(), config, compression=compression,
                                         state=CompressionState(compression))
        comm_kw = {"p2p_communicator": comm, "pg_collection": ProcessGroupCollection.use_mpu_process_groups()}
    elif layout.pp > 1:  # megatron-core's own p2p, with waits bounded by --distributed-timeout-minutes on gloo
        comm_kw = {"p2p_communicator": TimedP2PCommunicator(ps.get_pipeline_model_parallel_group(), config),
                   "pg_collection": ProcessGroupCollection.use_mpu_process_groups()}

    start, skipped = 0, 0
    if args.load:
        start, skipped = load_checkpoint(args, layout, ranks, chunks, opt, sched, comm)
    # Collective: megatron-core's builder builds the sample index on rank 0 first; all ranks open it.
    epoch_len = args.epoch_samples or args.train_iters * layout.global_batch
    train_ds, valid_ds = gpt_datasets(args.data_path, args.seq_length, epoch_len,
                                      max(args.eval_iters, 1) * layout.global_batch, seed=args.seed)
    train = _Batches(train_ds, layout, args.micro_batch_size, ranks["dp"], epoch_len, device)
    valid = _Batches(valid_ds, layout, args.micro_batch_size, ranks["dp"], 1 << 62, device)

    fwd_bwd = get_forward_backward_func()
    step_fn = partial(_forward_step, aqsgd=compression is not None and compression.uses_aqsgd)
    needs_data = [c.pre_process or c.post_process for c in chunks]
    tied = _shared_embedding(chunks, pp_first) if embd_group is not None else None
    mp_group = ps.get_model_parallel_group()
    wire = _Wire()
    p2p_start = comm.comm_stats() if comm is not None else None  # resumed counters include the earlier run

    def run_schedule(batches, iteration: int, forward_only: bool):
        iters = [batches.iterator(iteration, need) for need in needs_data]
        return fwd_bwd(forward_step_func=step_fn, data_iterator=iters if layout.vp > 1 else iters[0],
                       model=chunks if layout.vp > 1 else chunks[0], num_microbatches=layout.num_micro,
                       seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                       forward_only=forward_only, **(comm_kw or {}))

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
        total = []
        with torch.no_grad():
            for e in range(args.eval_iters):
                total.append(dp_mean(run_schedule(valid, e, forward_only=True)))
        for c in chunks:
            c.train()
        value = sum(total) / len(total) if pp_last else None
        if pp_last:
            logger.info("iteration %6d | validation loss %.4f", iteration, value)
        return {"iteration": iteration, "val_loss": value}

    end = args.exit_interval or args.train_iters
    losses: list[float | None] = []
    evals: list[dict] = []
    t0 = time.perf_counter()
    for it in range(start, end):
        if comm is not None:
            comm.set_epoch(train.first_sample(it) // epoch_len)  # AQ-SGD: warm-up epochs are sent in full
        for c in chunks:
            c.zero_grad(set_to_none=True)
        # A dead or stalled peer fails each phase with one line naming the iteration and the phase.
        out = run_collective("the pipeline schedule (p2p send/recv, TP collectives)",
                             functools.partial(run_schedule, train, it, forward_only=False), step=it + 1,
                             unit="iteration")
        run_collective("the tied-embedding all-reduce", lambda: _allreduce_tied_embedding_grad(tied, embd_group, wire),
                       step=it + 1, group=embd_group, unit="iteration")
        if args.optimizer == "adam":
            run_collective("the DP gradient all-reduce",
                           lambda: _allreduce_dp_grads(params, dp_group, layout.dp, wire),
                           step=it + 1, group=dp_group, unit="iteration")
        norm = run_collective("the gradient-norm all-reduce", lambda: _grad_norm(params, mp_group), step=it + 1,
                              group=mp_group, unit="iteration")
        # Every rank must agree on skipping: D-Lion's step is a collective over the DP group.
        bad = (~torch.isfinite(norm)).float().reshape(1)
        run_collective("the non-finite agreement all-reduce",
                       functools.partial(dist.all_reduce, bad, op=dist.ReduceOp.MAX, group=dp_group), step=it + 1,
                       group=dp_group, unit="iteration")
        if bad.item():
            skipped += 1
            logger.warning("iteration %d: non-finite gradient norm on some replica; step skipped on every rank "
                           "(%d so far)", it + 1, skipped)
        else:
            if args.clip_grad > 0 and float(norm) > args.clip_grad:
                scale = args.clip_grad / (float(norm) + 1e-6)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            opt.step()
            sched.step(1)  # as Megatron-LM: the schedule advances only on applied steps
        losses.append(dp_mean(out))
        n = it + 1
        if pp_last and (n % args.log_interval == 0 or n == end):
            logger.info("iteration %6d/%d | loss %.4f | grad norm %.3f | lr %.3e | %.2f s/iter", n,
                        args.train_iters, losses[-1], float(norm), opt.param_groups[0]["lr"],
                        (time.perf_counter() - t0) / (n - start))
        if args.eval_iters and (n % args.eval_interval == 0 or n == args.train_iters):
            evals.append(evaluate(n))
        if args.save_interval and n % args.save_interval == 0 and n != end:
            save_checkpoint(args, layout, ranks, n, chunks, opt, sched, comm, skipped)
    wall = time.perf_counter() - t0
    if args.save and end > start:
        save_checkpoint(args, layout, ranks, end, chunks, opt, sched, comm, skipped)

    # Checked across ranks (one 8-byte all_gather per group), never assumed.
    dp_ok = _replicas_identical(params, dp_group)
    tp_ok = _replicas_identical([p for p in params if not getattr(p, "tensor_model_parallel", False)], tp_group)
    tied_ok = _replicas_identical([tied], embd_group) if tied is not None else None
    record = {
        "rank": rank, **ranks, "pp_last": pp_last, "losses": losses, "evals": evals,
        "dp_ok": dp_ok, "tp_ok": tp_ok, "tied_ok": tied_ok,
        "params": sum(p.numel() for p in params if not getattr(p, "shared", False)
                      and (getattr(p, "tensor_model_parallel", False) or ranks["tp"] == 0)) if ranks["dp"] == 0 else 0,
        "dlion": opt.comm_stats()["bytes_sent"] if args.optimizer == "distlion" else None,
        "dlion_bits": opt.comm_stats()["bits_per_param_step"] if args.optimizer == "distlion" else None,
        "p2p": _p2p_delta(comm.comm_stats(), p2p_start) if comm is not None else None,
        "embedding_allreduce": wire.embedding_allreduce, "dp_allreduce": wire.dp_allreduce,
    }
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        _write_summary(args, layout, records, start, end, skipped, wall)
    ok = all(r["dp_ok"] and r["tp_ok"] and r["tied_ok"] is not False for r in records)
    finite = all(math.isfinite(x) for r in records if r["pp_last"] for x in r["losses"])
    return 0 if ok and finite else 1


def _p2p_delta(now: dict, start: dict) -> dict:
    return {d: {k: now[d][k] - start[d][k] for k in ("bytes_sent", "elements_sent")}
            for d in ("activations", "gradients")}


def _write_summary(args, layout: Layout, records: list[dict], start: int, end: int, skipped: int, wall: float):
    last = next(r for r in records if r["pp_last"] and r["tp"] == 0 and r["dp"] == 0)

    def total(key):
        values = [r[key] for r in records if r[key] is not None]
        return sum(values) if values else None

    def p2p(direction):
        if records[0]["p2p"] is None:
            return None  # megatron-core's own communicator: uncompressed, not counted
        sent = sum(r["p2p"][direction]["bytes_sent"] for r in records)
        elems = sum(r["p2p"][direction]["elements_sent"] for r in records)
        return {"bytes_sent": sent, "elements_sent": elems, "bytes_per_element": sent / elems if elems else None}

    dlion = None
    if args.optimizer == "distlion":
        bits = [r["dlion_bits"] for r in records]
        dlion = {"bytes_sent": total("dlion"), "bits_per_param_step": sum(bits) / len(bits)}
    summary = {
        "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "steps": end - start, "losses": last["losses"],
        "dp_replicas_identical": all(r["dp_ok"] for r in records),
        "tp_replicated_params_identical": all(r["tp_ok"] for r in records),
        "tied_embeddings_identical": (all(r["tied_ok"] for r in records if r["tied_ok"] is not None)
                                      if any(r["tied_ok"] is not None for r in records) else None),
        "wire": {
            "unit": "bytes sent, summed over all ranks, this invocation",
            "dlion": dlion,
            "p2p_activations": p2p("activations"),
            "p2p_gradients": p2p("gradients"),
            "embedding_allreduce": total("embedding_allreduce") if layout.pp > 1 else None,
            "dp_allreduce": total("dp_allreduce") if args.optimizer == "adam" else None,
            "not_counted": "tensor-parallel all-reduces inside layers; loss, norm and check collectives",
        },
        "vp": layout.vp, "world_size": layout.world, "optimizer": args.optimizer,
        "aggregation": args.aggregation if args.optimizer == "distlion" else None,
        "p2p_compression": args.p2p_compression, "start_iteration": start, "end_iteration": end,
        "train_iters": args.train_iters, "global_batch_size": layout.global_batch,
        "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
        "params": sum(r["params"] for r in records), "eval": last["evals"], "skipped_steps": skipped,
        "wall_s": wall,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s: dp_replicas_identical=%s tied_embeddings_identical=%s", out / "summary.json",
                summary["dp_replicas_identical"], summary["tied_embeddings_identical"])


if __name__ == "__main__":
    sys.exit(main())
