"""``--dlion-local-steps H`` (H > 1; issue 13, the Megatron surface): H local steps of megatron-core's own AdamW per
data-parallel rank, then one 1-bit D-Lion outer step on the pseudo-gradient (:class:`distlion_ds.LocalStepsLion`).

The inner optimizer is megatron-core's ``get_megatron_optimizer`` on megatron-core's DDP whose data-parallel gradient
reduction is switched off the way D-Lion switches it off (:mod:`distlion_ds.megatron.optimizer`: no DDP knob does it,
so each bucket group's ``start_grad_sync`` / ``finish_grad_sync`` become no-ops on the instance); everything else in
``finalize_model_grads`` (the tied-embedding all-reduce between the first and last stage, layernorm grads) still runs,
so a replica's tied copies stay identical. ``--lr`` and its schedule drive the inner AdamW; ``--dlion-outer-lr``
(default: ``--lr``) is the outer D-Lion step, ``--dlion-beta1/2`` its betas, ``--dlion-outer-weight-decay`` its
decoupled weight decay. fp32 parameters only.

Between outer steps every DP rank's weights are its own, so checkpoints keep each rank's model and optimizer state
(inner AdamW, ``theta_out``, outer momentum, the position in the round) in its side file; resume mid-round is exact.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_MARK = "_distlion_local_steps_no_dp_reduction"


def _no_grad_sync(force_all_reduce: bool | None = False) -> None:
    """Local steps: no DP gradient reduction (each rank steps on its own gradient; the outer step votes)."""


def disable_dp_grad_reduction(chunks: list) -> None:
    """Make the DDP chunks' bucket groups skip their gradient all-reduce (idempotent, marked per bucket group)."""
    for chunk in chunks:
        for bg in chunk.bucket_groups + getattr(chunk, "expert_parallel_bucket_groups", []):
            if getattr(bg, _MARK, False):
                continue
            bg.start_grad_sync = _no_grad_sync
            bg.finish_grad_sync = _no_grad_sync
            setattr(bg, _MARK, True)


def build_local_steps_optimizer(args, chunks: list, config: Any, dp_group) -> tuple[Any, Any]:
    """``(LocalStepsLion over megatron-core's AdamW, the AdamW it wraps)`` for the DDP-wrapped chunks.

    Args:
        args: the parsed arguments (``dlion_local_steps`` > 1).
        chunks: megatron-core ``DistributedDataParallel`` chunks (built with the AdamW DDP config).
        config: megatron-core ``OptimizerConfig`` of the inner AdamW.
        dp_group: the data-parallel group the outer step votes over.
    Returns:
        The outer optimizer (what the loop steps) and the inner one (what the LR schedule drives).
    """
    from megatron.core.optimizer import get_megatron_optimizer

    from distlion_ds.optim.local_steps import LocalStepsLion

    disable_dp_grad_reduction(chunks)
    inner = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    params = [p for g in inner.param_groups for p in g["params"]]
    outer = LocalStepsLion(params, inner, args.dlion_local_steps,
                           lr=args.dlion_outer_lr if args.dlion_outer_lr is not None else args.lr,
                           betas=(args.dlion_beta1, args.dlion_beta2), weight_decay=args.dlion_outer_weight_decay,
                           aggregation=args.dlion_aggregation, process_group=dp_group)
    logger.info("local-step D-Lion: %d local AdamW steps per 1-bit outer step (aggregation %s)",
                args.dlion_local_steps, args.dlion_aggregation)
    return outer, inner
