"""The D-Lion step policy, written once for every integration (issue 11 item 6).

What a training step does around the vote exchange, independent of the engine that calls it:

1. **Local clipping by a replica's norm.** D-Lion never averages gradients across data parallelism, so the norm that
   clipping uses is the norm of *this replica's* gradient: the squares of the gradients of every parameter this rank
   holds (tensor-parallel duplicates and the second copy of a tied weight excluded by the caller), summed over the
   model-parallel group (tensor x pipeline), never over the data-parallel group. One dtype: per-tensor norms and
   their sum are fp32, on the device. fp32 because that is what megatron-core's ``get_grad_norm_fp32`` accumulates
   in (its multi-tensor l2norm returns fp32), so a D-Lion run and an AdamW run report comparable norms; the norm
   only scales the gradient's weight in the momentum (Lion's update is a sign), so the ~1e-7 relative rounding of
   an fp32 sum changes nothing measurable; and an fp64 accumulator is not supported by every accelerator at speed.
   (The DeepSpeed seam summed fp32 per-tensor norms in fp64 before this module; it is to switch to this one.)
   The coefficient ``max_norm / (norm + 1e-6)`` (megatron-core's and DeepSpeed's epsilon) is applied only when the
   norm is finite and above ``max_norm``; it stays a device tensor: no host synchronisation.
2. **Non-finite agreement.** A rank whose gradient holds NaN/Inf raises a device flag; the flag is agreed over the
   model-parallel group on the device by the seam (it is part of the norm all-reduce when clipping is on, else a
   4-byte MAX all-reduce) and over the data-parallel group by riding on the vote exchange (one byte per all_to_all
   chunk, :mod:`distlion_ds.comm.vote_exchange`). Reading the agreed flag is the step's one host synchronisation.
   Every rank then skips (parameters and momentum untouched, step counter not advanced) and counts it
   (:class:`SkipCounter`), or raises ``FloatingPointError`` when asked to.
3. **Replica check cadence.** Every ``check_replicas_every`` applied steps the data-parallel replicas compare a
   bit-level checksum of their parameters (:func:`replica_check_due`; the cost is measured in
   benchmarks/RESULTS.md: every 100 steps costs <= 0.06 % of the optimizer step).
4. **Momentum checkpoint rules.** Each data-parallel rank's momentum differs (it is never communicated), so every
   rank's momentum is saved, keyed by its data-parallel rank, together with the step counter (identical on every
   rank). Parameters (and fp32 master weights) are identical across data parallelism and are saved once.
   Loading into another data-parallel size (a preempted node not coming back, a node added): rank ``r`` of the new
   run loads the momentum saved by rank ``r % N_saved`` (:func:`momentum_source_rank`), with a warning; the step
   counter is kept. Why: each saved momentum is an EMA of one worker's local gradients; with data sharded i.i.d.
   across workers any of them is a valid state for a worker, so every new rank starts from a real, warmed-up worker
   momentum. Resetting to zero would make the next ~1/(1-beta2) steps (100 at beta2=0.99) vote on the sign of single
   noisy gradients (a cold restart); averaging the saved momenta would give every rank the same momentum, so the
   first votes would be perfectly correlated, removing the per-worker diversity majority voting relies on. Growing,
   ranks ``r`` and ``r + N_saved`` start equal and decorrelate as their own gradients enter; shrinking, the momenta
   of the dropped ranks are not used. (Hierarchical D-Lion, where each rank holds one shard of its node's momentum,
   refuses another layout instead.) Used by the DeepSpeed seam and the megatron-core optimizer alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

# megatron-core's clip_grad_by_total_norm_fp32 and DeepSpeed's clip_grad_norm_ add the same epsilon.
CLIP_EPS = 1.0e-6

# Every K applied steps the replicas compare parameter checksums (see distributed_lion.DEFAULT_CHECK_REPLICAS_EVERY).
DEFAULT_CHECK_REPLICAS_EVERY = 100


def replica_sq_norm(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """This rank's share of the replica's squared L2 norm: ``sum_p ||g_p||_2^2`` in fp32, on ``device``.

    Per-tensor norms are fp32 (``torch.linalg.vector_norm(dtype=float32)``: bf16 gradients are upcast first), squared
    and summed in fp32 in the order given (the callers pass a fixed parameter order, so replicas agree bit for bit).

    Args:
        grads: the gradients that count (the caller excludes duplicates).
        device: where the result lives (the gradients' device).
    Returns:
        A 0-d fp32 tensor (no host synchronisation).
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device).square()
    return total


def replica_grad_norm(grads: Iterable[torch.Tensor], device: torch.device,
                      model_parallel_sum: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The replica's gradient norm: :func:`replica_sq_norm` summed over the model-parallel group, square-rooted.

    Non-finite on every rank of the model-parallel group as soon as one rank's gradient is (a NaN/Inf square
    propagates through the sum), which makes the norm the model-parallel half of the non-finite agreement.

    Args:
        grads: this rank's gradients that count.
        device: the gradients' device.
        model_parallel_sum: in-place SUM all-reduce of a tensor over the rest of this replica (the integration seam
            supplies it: this layer does not use torch.distributed); None when the replica is this rank alone.
    Returns:
        A 0-d fp32 tensor on ``device``.
    """
    sq = replica_sq_norm(grads, device)
    if model_parallel_sum is not None:
        model_parallel_sum(sq)
    return sq.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``max_norm / (norm + 1e-6)`` where ``norm`` is finite and above ``max_norm``, else exactly 1 (fp32, device).

    A coefficient of exactly 1.0 leaves every gradient bit unchanged when multiplied in, so the caller can always
    multiply instead of asking the host whether to.
    """
    if not max_norm > 0.0:
        raise ValueError(f"max_norm={max_norm!r}: clipping needs a positive norm (0 disables clipping upstream)")
    max_t = torch.tensor(max_norm, dtype=torch.float32, device=norm.device)
    coef = max_t / (norm + CLIP_EPS)
    return torch.where(torch.isfinite(norm) & (norm > max_t), coef, torch.ones_like(coef))


def clip_grads_(grads: Iterable[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient by the device scalar ``coef`` in place (fp32 math, result in the gradient's dtype)."""
    for g in grads:
        if g.dtype == torch.float32:
            g.mul_(coef)
        else:
            g.copy_(g.float() * coef)


def nonfinite_flag(norm: torch.Tensor | None, local_flag: torch.Tensor | None) -> torch.Tensor:
    """int32 ``[1]`` device flag: 1 when the replica's norm is non-finite or this rank flagged a non-finite gradient."""
    parts = []
    if norm is not None:
        parts.append((~torch.isfinite(norm)).to(torch.int32).reshape(1))
    if local_flag is not None:
        parts.append((local_flag != 0).to(torch.int32).reshape(1))
    if not parts:
        raise ValueError("nonfinite_flag needs a norm or a local flag")
    flag = parts[0]
    for p in parts[1:]:
        flag = torch.maximum(flag, p.to(flag.device))
    return flag


def replica_check_due(step: int, every: int) -> bool:
    """Whether applied step ``step`` (from 1) compares the replicas (``every`` = 0 disables)."""
    return every > 0 and step % every == 0


class SkipCounter:
    """Counts skipped steps and logs (or raises) once per skip with the same wording in every integration.

    Args:
        owner: the name in the message (``"DistributedLionOptimizer"``).
        raise_on_nonfinite: raise ``FloatingPointError`` on every rank instead of skipping.
    """

    def __init__(self, owner: str, raise_on_nonfinite: bool = False):
        self.owner = owner
        self.raise_on_nonfinite = raise_on_nonfinite
        self.skipped = 0

    def record(self, step: int) -> None:
        """A skip at step ``step`` (the step that was not applied)."""
        self.skipped += 1
        msg = (f"{self.owner}: a non-finite gradient on at least one rank at step {step}; the step is skipped on "
               f"every rank ({self.skipped} skipped so far)")
        if self.raise_on_nonfinite:
            raise FloatingPointError(msg)
        logger.warning(msg)


def momentum_source_rank(saved: int, current: int, rank: int, *, what: str = "checkpoint") -> int:
    """The data-parallel rank whose saved momentum rank ``rank`` of this run loads (module docstring, rule 4).

    Args:
        saved: the data-parallel size the momentum was saved with.
        current: this run's data-parallel size.
        rank: this rank's data-parallel rank.
        what: the checkpoint, for the warning.
    Returns:
        ``rank % saved``; logs a warning (from data-parallel rank 0) when the sizes differ.
    """
    if saved < 1 or current < 1 or not 0 <= rank < current:
        raise ValueError(f"momentum_source_rank: saved={saved}, current={current}, rank={rank}")
    if saved != current and rank == 0:
        logger.warning("D-Lion %s: momentum saved by %d data-parallel ranks, loading into %d: rank r loads the "
                       "momentum of saved rank r %% %d (step counter kept; see distlion_ds.optim.policy)",
                       what, saved, current, saved)
    return rank % saved
