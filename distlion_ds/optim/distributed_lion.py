"""DistributedLion: Lion with 1-bit votes across data-parallel ranks (arXiv 2404.00438; DESIGN 3.1-3.3).

A thin class over the kernels (vote, count, apply) and the comm layer (bucketed vote exchange). The semantics are
those of :func:`distlion_ds.optim.lion.dlion_update_ref`, which the tests hold it to.

Layout: parameters are placed in buckets of at most ``bucket_numel`` elements, each parameter starting at a multiple
of 8 elements. That keeps every parameter's votes byte-aligned inside the bucket (so the vote and apply kernels run
on each parameter in place, with no flat copy of gradients or parameters), and it keeps the parity of a bucket
offset equal to the parity of the element's index inside its parameter, which is what the zero rule needs when the
vote count runs on a shard of the bucket. Each bucket is padded to a multiple of ``8*N`` elements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from distlion_ds.comm import VoteExchange, replica_checksum
from distlion_ds.kernels.lion import AGGREGATIONS, lion_apply, lion_votes

logger = logging.getLogger(__name__)

# 2**25 elements -> 4 MiB of packed votes per bucket: large enough that per-collective latency (ms on a slow
# link) is amortised over MBs, small enough that buckets still pipeline on large models.
DEFAULT_BUCKET_NUMEL = 1 << 25


@dataclass
class _Bucket:
    device: torch.device
    params: list[tuple[torch.Tensor, dict, int]] = field(default_factory=list)  # (param, group, elem offset)
    numel: int = 0
    votes: torch.Tensor | None = None


class DistributedLion(torch.optim.Optimizer):
    """Distributed Lion: each rank keeps its own momentum and sends one bit per parameter per step.

    Args:
        params: iterable of parameters or of param-group dicts (as any torch optimizer).
        lr: learning rate (> 0). Read from ``param_groups`` every step, so LR schedulers work.
        betas: ``(beta1, beta2)`` in [0, 1): beta1 mixes the vote, beta2 the momentum.
        weight_decay: decoupled weight decay (>= 0), applied locally.
        aggregation: ``"mavo"`` (majority vote, 1 bit back) or ``"avg"`` (average, ceil(log2(N+1)) bits back).
        process_group: the data-parallel group; None means the default group (or one process when
            torch.distributed is not initialized).
        raise_on_nonfinite: raise ``FloatingPointError`` on every rank instead of skipping the step when any rank
            has a non-finite gradient.
        check_replicas_every: every K applied steps, compare a bit-level checksum of the parameters across the
            group (one 8-byte all_gather) and raise ``RuntimeError`` if replicas diverged; 0 disables.
        bucket_numel: maximum elements per bucket (a larger parameter gets a bucket of its own).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, aggregation: str = "mavo", process_group=None, *,
                 raise_on_nonfinite: bool = False, check_replicas_every: int = 0,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        if not lr > 0.0:
            raise ValueError(f"Invalid lr: {lr} (must be > 0)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Invalid aggregation: {aggregation!r} (allowed: {', '.join(AGGREGATIONS)})")
        if check_replicas_every < 0:
            raise ValueError(f"Invalid check_replicas_every: {check_replicas_every} (must be >= 0)")
        if bucket_numel < 8:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel} (must be >= 8)")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.aggregation = aggregation
        self.raise_on_nonfinite = raise_on_nonfinite
        self.check_replicas_every = check_replicas_every
        self.bucket_numel = bucket_numel
        self.exchange = VoteExchange(process_group, aggregation)
        self.process_group = process_group
        self._buckets: list[_Bucket] | None = None
        self._steps = 0
        self._skipped = 0

    # ------------------------------------------------------------------------------------------ layout
    def _build_buckets(self) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        open_by_device: dict[torch.device, _Bucket] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError("DistributedLion does not support sparse parameters")
                n = p.numel()
                b = open_by_device.get(p.device)
                if b is None or (b.numel and b.numel + n > self.bucket_numel):
                    b = open_by_device[p.device] = _Bucket(p.device)
                    buckets.append(b)
                b.params.append((p, group, b.numel))
                b.numel += -(-n // 8) * 8
        for b in buckets:
            b.numel = self.exchange.padded_numel(b.numel)
            # Zero-initialised once: the alignment gaps are never written, so they stay 0 on every rank.
            b.votes = torch.zeros(b.numel // 8, dtype=torch.uint8, device=b.device)
        return buckets

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state["exp_avg"]

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One D-Lion step; a collective over the process group, so every rank must call it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._buckets = self._build_buckets()
        t = self.param_groups[0]["step"] + 1
        flags = {b.device: torch.zeros(1, dtype=torch.int32, device=b.device) for b in self._buckets}

        # 1. every vote first, so the non-finite flag that rides on the first exchange covers all gradients.
        for b in self._buckets:
            for p, group, off in b.params:
                out = b.votes[off // 8: off // 8 + -(-p.numel() // 8)]
                lion_votes(p.grad, self._momentum(p), group["betas"][0], t, out=out, nonfinite=flags[b.device])

        # 2. exchange and apply bucket by bucket.
        n_ranks = self.exchange.world_size
        for i, b in enumerate(self._buckets):
            agg = self.exchange.exchange(b.votes, flags[b.device], t)
            if agg is None:
                assert i == 0, "the non-finite flag travels with the first bucket"
                return self._skip(t, loss)
            for p, group, off in b.params:
                lo = off // 8
                lion_apply(p, self.state[p]["exp_avg"], p.grad, agg[:, lo: lo + -(-p.numel() // 8)], n_ranks,
                           group["lr"], group["weight_decay"], group["betas"][1], self.aggregation)

        for group in self.param_groups:
            group["step"] = t
        self._steps += 1
        if self.check_replicas_every and t % self.check_replicas_every == 0:
            self.check_replicas()
        return loss

    def _skip(self, t: int, loss):
        self._skipped += 1
        msg = (f"DistributedLion: a non-finite gradient on at least one rank at step {t}; "
               f"the step is skipped on every rank ({self._skipped} skipped so far)")
        if self.raise_on_nonfinite:
            raise FloatingPointError(msg)
        logger.warning(msg)
        return loss

    # ------------------------------------------------------------------------------------------ checks & stats
    def check_replicas(self) -> None:
        """Raise ``RuntimeError`` if the parameters differ (bit-wise) between the ranks of the group."""
        sums = replica_checksum([p for g in self.param_groups for p in g["params"]], self.process_group)
        if len(set(sums)) > 1:
            raise RuntimeError(
                f"DistributedLion: data-parallel replicas diverged at step {self.param_groups[0]['step']} "
                f"(parameter checksums per rank: {sums}). Every rank must call step() with the same parameters "
                f"in the same order; something outside the optimizer modified a replica.")

    def comm_stats(self) -> dict:
        """Cumulative statistics of this rank.

        Returns:
            ``{"steps", "params", "bytes_sent", "bytes_received", "skipped_steps", "world_size",
            "aggregation", "bits_per_param_step"}``; bytes are payload bytes this rank hands to / receives from
            other ranks in collectives; ``steps`` counts applied and skipped steps.
        """
        n_params = sum(p.numel() for g in self.param_groups for p in g["params"])
        steps = self._steps + self._skipped
        sent = self.exchange.bytes_sent
        return {
            "steps": steps,
            "params": n_params,
            "bytes_sent": sent,
            "bytes_received": self.exchange.bytes_received,
            "skipped_steps": self._skipped,
            "world_size": self.exchange.world_size,
            "aggregation": self.aggregation,
            "bits_per_param_step": 8.0 * sent / (n_params * steps) if n_params and steps else 0.0,
        }

    # ------------------------------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        """Standard loading, except that momentum stays fp32 whatever the parameter dtype.

        (``torch.optim.Optimizer`` casts floating-point state to the parameter's dtype; for bf16 parameters that
        would round the momentum, and the votes depend on it.)
        """
        saved = {k: v["exp_avg"].clone() for k, v in state_dict["state"].items() if "exp_avg" in v}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, m in saved.items():
            p = params[int(k)]
            self.state[p]["exp_avg"] = m.to(device=p.device, dtype=torch.float32).contiguous()
        self._buckets = None
