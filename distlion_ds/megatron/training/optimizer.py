"""The optimizer and LR schedule of the entry: D-Lion through :func:`distlion_ds.megatron.get_optimizer` (via the
plugin's ``build_distlion_optimizer``, so the flags mean what they mean in Megatron-LM), or megatron-core's own
``get_megatron_optimizer`` (AdamW, the baseline Megatron users know); megatron-core's ``OptimizerParamScheduler``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CPU_CLIP_MARK = "_distlion_cpu_clip_original"


def optimizer_config(args) -> Any:
    """megatron-core's ``OptimizerConfig`` from the arguments (fp32 parameters)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                           adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                           clip_grad=args.clip_grad, bf16=False, fp16=False, params_dtype=torch.float32)


def _clip_on_cpu(original):
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """megatron-core's clip (``max_norm / (total_norm + 1e-6)`` when below 1, fp32 multiply in place), for CPU
        gradients, which its implementation refuses with an assert; CUDA gradients go to the original."""
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr, None) for p in params]
        grads = [g.detach() for g in grads if g is not None]
        if any(g.is_cuda for g in grads):
            return original(params, max_norm, total_norm, use_decoupled_grad)
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)
    return clip_grad_by_total_norm_fp32


def enable_cpu_clip() -> None:
    """Opt-in, idempotent: let megatron-core's optimizers clip CPU gradients (``clip_grad > 0`` asserts CUDA
    tensors in ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32``; DESIGN section 4). Rebinds the
    name ``megatron.core.optimizer.optimizer`` calls it by; the original is kept on the module."""
    from megatron.core.optimizer import optimizer as mco

    if getattr(mco, _CPU_CLIP_MARK, None) is not None:
        return
    setattr(mco, _CPU_CLIP_MARK, mco.clip_grad_by_total_norm_fp32)
    mco.clip_grad_by_total_norm_fp32 = _clip_on_cpu(mco.clip_grad_by_total_norm_fp32)
    logger.info("megatron-core's clip_grad_by_total_norm_fp32 accepts CPU gradients (distlion_ds CPU shim)")


def build_optimizer(args, chunks: list) -> tuple[Any, Any]:
    """``(optimizer, scheduler)`` for the DDP-wrapped chunks.

    Args:
        args: the parsed arguments (``args.distlion`` selects D-Lion).
        chunks: megatron-core ``DistributedDataParallel`` chunks of this rank.
    Returns:
        A ``MegatronOptimizer`` (local steps: a :class:`~distlion_ds.LocalStepsLion` over one) and its
        ``OptimizerParamScheduler``.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = optimizer_config(args)
    inner = None
    if args.clip_grad > 0 and not torch.cuda.is_available() and not (args.distlion and args.dlion_local_steps == 1):
        enable_cpu_clip()  # megatron-core's own optimizer clips (AdamW, and the inner AdamW of local steps)
    if args.distlion and args.dlion_local_steps > 1:
        from megatron.core import parallel_state as ps

        from .local_steps import build_local_steps_optimizer

        opt, inner = build_local_steps_optimizer(args, chunks, config, ps.get_data_parallel_group())
    elif args.distlion:  # (--dlion-intra-node-size > 1 is refused by the parser: this optimizer votes flat)
        from distlion_ds.megatron.plugin import build_distlion_optimizer

        opt = build_distlion_optimizer(args, config, chunks)
    else:
        from megatron.core.optimizer import get_megatron_optimizer

        # No gloo side groups: only megatron's distributed optimizer uses them, and this entry does not create them.
        opt = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    sched = OptimizerParamScheduler(  # local steps: the schedule drives the inner AdamW's lr
        inner if inner is not None else opt, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters or args.train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return opt, sched
