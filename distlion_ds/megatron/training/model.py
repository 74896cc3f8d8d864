"""megatron-core ``GPTModel`` chunks of this rank, each in megatron-core's ``DistributedDataParallel``.

D-Lion gets :func:`distlion_ds.megatron.ddp_config_for_dlion` (aligned contiguous buffers; its optimizer replaces the
bucket groups' gradient reduction by the vote exchange), AdamW a plain ``DistributedDataParallelConfig`` (fp32
all-reduce of the gradient buckets, megatron-core's own). The schedules call ``config.finalize_model_grads_func``
(megatron-core's ``finalize_model_grads``, or the compressed tied-embedding one) and the DDP's ``no_sync`` /
``start_grad_sync`` hooks, as Megatron-LM's ``train()`` sets them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Megatron-LM's --make-vocab-size-divisible-by default: the padded vocab splits evenly over TP ranks.
VOCAB_DIVISOR = 128


def padded_vocab(pieces: int, tp: int) -> int:
    """Megatron-LM's vocab padding: a multiple of 128 x tp."""
    divisor = VOCAB_DIVISOR * tp
    return -(-pieces // divisor) * divisor


def seed_everything(seed: int, pp_rank: int) -> None:
    """Megatron-LM's ``_set_random_seed``: one seed per pipeline stage, shared by TP and DP ranks (identical initial
    replicas; TP shards are slices of one master weight), plus megatron's RNG tracker (CPU-backed under
    ``enable_cpu``) for dropout inside tensor-parallel regions."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


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


def transformer_config(args, layout) -> Any:
    """The ``TransformerConfig`` of the run (fp32 parameters)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    return TransformerConfig(
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


def ddp_config(args) -> Any:
    """D-Lion's DDP config, or megatron-core's default one (fp32 gradient all-reduce) for AdamW and for the inner
    AdamW of local steps (whose reduction :mod:`.local_steps` switches off)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from distlion_ds.megatron import ddp_config_for_dlion

    bucket = {} if args.ddp_bucket_size is None else {"bucket_size": args.ddp_bucket_size}
    if args.distlion and args.dlion_local_steps == 1:
        return ddp_config_for_dlion(overlap_grad_reduce=args.overlap_grad_reduce, **bucket)
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                         use_distributed_optimizer=False, **bucket)


def build_model(args, layout, vocab_size: int, finalize_model_grads) -> tuple[Any, list]:
    """This rank's DDP-wrapped ``GPTModel`` chunks and their ``TransformerConfig``.

    Args:
        args: the parsed arguments.
        layout: the :class:`~distlion_ds.megatron.training.arguments.Layout`.
        vocab_size: the padded vocabulary.
        finalize_model_grads: what the schedules call after the last backward (megatron-core's
            ``finalize_model_grads`` or :class:`~distlion_ds.megatron.CompressedFinalizeModelGrads`).
    Returns:
        ``(config, chunks)``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(args, layout)
    te = _use_transformer_engine(args.transformer_impl)
    spec = get_gpt_layer_with_transformer_engine_spec() if te else get_gpt_layer_local_spec()
    modules = []
    for v in range(layout.vp):
        vp_stage = v if layout.vp > 1 else None
        modules.append(GPTModel(
            config, spec, vocab_size=vocab_size,
            max_sequence_length=args.max_position_embeddings or args.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type, vp_stage=vp_stage,
        ))
    if torch.cuda.is_available():
        modules = [m.cuda() for m in modules]
    ddp_cfg = ddp_config(args)
    # As Megatron-LM's get_model: one bucket set per chunk, only the first chunk bucketed (the others' gradients
    # are ready together at the end of the backward anyway).
    chunks = [DistributedDataParallel(config, ddp_cfg, m, disable_bucketing=i > 0) for i, m in enumerate(modules)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    if args.overlap_grad_reduce:
        config.grad_sync_func = [c.start_grad_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync
    logger.info("model: %s spec, %d chunk(s) per rank in megatron-core DDP (%s), %d parameters on this rank",
                "Transformer Engine" if te else "local", len(chunks), "D-Lion buffers" if args.distlion else
                "fp32 gradient all-reduce", sum(p.numel() for c in chunks for p in c.parameters()))
    return config, chunks
