"""DistributedLion: Lion with 1-bit votes across data-parallel ranks (arXiv 2404.00438; DESIGN 3.1-3.3).

A thin class over the kernels (vote, count, apply) and the comm layer (bucketed, asynchronous vote exchange). The
semantics are those of :func:`distlion_ds.optim.lion.dlion_update_ref`, which the tests hold it to.

Layout. Trainable parameters (``requires_grad=True``; frozen ones are never voted, decayed or moved) are placed in
buckets of at most ``bucket_numel`` elements, per device, each parameter starting at a multiple of 8 elements. That
keeps every parameter's votes byte-aligned inside the bucket, and it keeps the parity of a bucket offset equal to
the parity of the element's index inside its parameter, which is what the zero rule needs when the vote count runs
on a shard of the bucket. Each bucket is padded to a multiple of ``8*N`` elements. The momentum of a bucket is one
fp32 tensor in the same layout (``state[p]["exp_avg"]`` is a view of it).

Runs. Consecutive parameters of a bucket whose storage is adjacent (a flat parameter buffer, as megatron-core's
DDP keeps) and whose sizes are multiples of 8 have the same layout in memory as in the bucket; so do their
momentum views. When their gradients are adjacent too, such a run is voted and applied by one kernel launch each
instead of one per parameter. The result is the same bits either way (every element's index parity is the same).
Whatever the layout, a bucket's runs and parameters are voted and applied with the multi-tensor launchers
(``lion_votes_multi`` / ``lion_apply_multi``): one kernel launch per param group and kind of tensor (dtype, with or
without a gradient, 16-byte aligned or not) rather than one per parameter, since a step over a GPT's ~150
separately allocated tensors was bound by host launch time on a GPU (benchmarks/RESULTS.md, "First GPU run").

A step, with at most one host synchronisation (the skip decision):

1. votes bucket by bucket; each bucket's all_to_all is issued asynchronously as soon as its votes are packed,
   carrying this rank's non-finite flag as it stands then (so the last bucket's flag covers every gradient);
2. every bucket is counted and its all_gather issued asynchronously (nothing is modified yet);
3. the skip decision reads every rank's flag from the last bucket (one host sync): skip -> drain and return with
   parameters and momentum untouched on every rank, on every device;
4. each bucket is applied as soon as its all_gather lands, while later ones are still in flight.

Agreement. Before the first step (and after any change of the parameter layout) the ranks compare a fingerprint of
everything that must match (aggregation, bucket size, betas, lr, weight decay, parameter shapes, dtypes and order,
the initial parameter values, the rounding seed, the check cadence): a mismatch is a ``ValueError`` naming the
setting and which ranks hold which value, before any vote is exchanged (a mismatched bucket size would otherwise
end in a backend abort that names nothing). Every ``check_replicas_every`` steps the parameters' bit checksum and
the hyper-parameters are compared again (default: on; its cost is measured in benchmarks/RESULTS.md).

Hierarchical D-Lion. ``intra_node_size=L > 1`` (or explicit ``node_groups``) makes each node of L ranks one voter with
its ranks' exact mean gradient, momentum sharded across the node's ranks and 1-bit votes only between nodes: the
step, layout and state are then those of :mod:`distlion_ds.optim.hierarchical` (this class dispatches to it; the
flat path below is unchanged).

16-bit parameters without fp32 master weights. Lion moves a weight by ``lr``; in bf16 an update below half an ulp of
the weight rounds away and training silently stalls. bf16 parameters are therefore rounded stochastically (unbiased,
seeded by ``rounding_seed`` and the step, identical on every rank so replicas stay bit-identical). fp16 parameters are
refused unless ``rounding_seed=None``: keep fp32 master weights (DeepSpeed's fp16 section, megatron-core's mixed
precision) instead.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from distlion_ds.comm import VoteExchange, gather_fingerprints, gather_objects, local_checksum
from distlion_ds.kernels.lion import AGGREGATIONS, lion_apply_multi, lion_votes_multi

from . import policy
from .lion import check_lion_hyperparameters

logger = logging.getLogger(__name__)

# 2**25 elements -> 4 MiB of packed votes per bucket: large enough that per-collective latency (ms on a slow
# link) is amortised over MBs, small enough that buckets still pipeline on large models.
DEFAULT_BUCKET_NUMEL = 1 << 25

# Replica check cadence: the checksum reads every parameter once as 64-bit words plus one all_gather of a few int64,
# against a step's ~28 B/param of kernel traffic plus the exchange. benchmarks/bench_replica_check.py measured a check
# at 5.2-5.7 % of a D-Lion optimizer step (10M and 50M parameters, N=2, CPU): every 100 steps costs <= 0.06 % of the
# optimizer step alone (less of a training step), and a divergence is caught within 100 steps.
DEFAULT_CHECK_REPLICAS_EVERY = 100

def _hash64(value) -> int:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _step_seed(seed: int, step: int) -> int:
    """The per-step stochastic-rounding seed: a 31-bit hash of (seed, step), the same on every rank."""
    return _hash64(("dlion-sr", seed, step)) & 0x7FFFFFFF


@dataclass
class _Run:
    """Consecutive parameters of a bucket laid out in memory as in the bucket (a run of one in general)."""

    params: list[torch.Tensor]
    groups: list[dict]
    offset: int  # element offset of the first parameter in the bucket
    numel: int  # elements covered (the last parameter's end)
    flat: torch.Tensor | None = None  # one flat view of the run's parameters (runs of two or more)


@dataclass
class _Bucket:
    device: torch.device
    params: list[tuple[torch.Tensor, dict, int]] = field(default_factory=list)  # (param, group, elem offset)
    numel: int = 0
    votes: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    runs: list[_Run] = field(default_factory=list)


def _flat_view(t: torch.Tensor, numel: int) -> torch.Tensor:
    """A 1-D view of ``numel`` elements of ``t``'s storage starting at ``t``'s first element."""
    return t.detach().as_strided((numel,), (1,), t.storage_offset())


def _adjacent(tensors: list[torch.Tensor]) -> bool:
    """Whether the contiguous ``tensors`` follow each other in memory, same dtype, same storage."""
    first = tensors[0]
    for a, b in zip(tensors, tensors[1:], strict=False):
        if (b.dtype != first.dtype or not b.is_contiguous() or not a.is_contiguous()
                or b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
                or b.storage_offset() != a.storage_offset() + a.numel()):
            return False
    return True


class DistributedLion(torch.optim.Optimizer):
    """Distributed Lion: each rank keeps its own momentum and sends one bit per parameter per step.

    Args:
        params: iterable of parameters or of param-group dicts (as any torch optimizer). Parameters with
            ``requires_grad=False`` are not optimized (never voted, decayed or moved).
        lr: learning rate (> 0). Read from ``param_groups`` every step, so LR schedulers work.
        betas: ``(beta1, beta2)`` in [0, 1): beta1 mixes the vote, beta2 the momentum.
        weight_decay: decoupled weight decay (>= 0), applied locally.
        aggregation: ``"mavo"`` (majority vote, 1 bit back) or ``"avg"`` (average, ceil(log2(N+1)) bits back).
        process_group: the data-parallel group; None means the default group (or one process when
            torch.distributed is not initialized).
        raise_on_nonfinite: raise ``FloatingPointError`` on every rank instead of skipping the step when any rank
            has a non-finite gradient.
        check_replicas_every: every K applied steps, compare a bit-level checksum of the parameters and the
            hyper-parameters across the group (one small all_gather) and raise ``RuntimeError`` if replicas
            diverged; 0 disables. None (default) means ``DEFAULT_CHECK_REPLICAS_EVERY``.
        bucket_numel: maximum elements per bucket (a larger parameter gets a bucket of its own).
        rounding_seed: seed of the stochastic rounding of bf16 parameters (must be the same on every rank);
            None rounds to nearest (and a bf16 weight stalls once ``lr`` is below half its ulp).
        intra_node_size: L, data-parallel ranks per node (nodes are consecutive ranks of ``process_group``).
            1 (default): flat D-Lion, every rank a voter. L > 1: hierarchical D-Lion
            (:mod:`distlion_ds.optim.hierarchical`); L must divide the data-parallel size.
        node_groups: explicit nodes instead, a list of lists of ``process_group`` ranks (disjoint, equal sizes,
            covering the group); local rank i of a node is its i-th smallest rank.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, aggregation: str = "mavo", process_group=None, *,
                 raise_on_nonfinite: bool = False, check_replicas_every: int | None = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, rounding_seed: int | None = 0,
                 intra_node_size: int = 1, node_groups: list[list[int]] | None = None):
        check_lion_hyperparameters(lr, betas, weight_decay)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Invalid aggregation: {aggregation!r} (allowed: {', '.join(AGGREGATIONS)})")
        if check_replicas_every is None:
            check_replicas_every = DEFAULT_CHECK_REPLICAS_EVERY
        if isinstance(check_replicas_every, bool) or check_replicas_every < 0:
            raise ValueError(f"Invalid check_replicas_every: {check_replicas_every} (must be >= 0)")
        if bucket_numel < 8:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel} (must be >= 8)")
        if rounding_seed is not None and not (isinstance(rounding_seed, int) and 0 <= rounding_seed < 2**31):
            raise ValueError(f"Invalid rounding_seed: {rounding_seed!r} (an int in [0, 2**31) or None)")
        if isinstance(intra_node_size, bool) or not isinstance(intra_node_size, int) or intra_node_size < 1:
            raise ValueError(f"Invalid intra_node_size: {intra_node_size!r} (an int >= 1: ranks per node)")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.aggregation = aggregation
        self.raise_on_nonfinite = raise_on_nonfinite
        self.check_replicas_every = check_replicas_every
        self.bucket_numel = bucket_numel
        self.rounding_seed = rounding_seed
        self.exchange = VoteExchange(process_group, aggregation)
        self.process_group = process_group
        self._buckets: list[_Bucket] | None = None
        self._layout_key: tuple | None = None
        self._flags: dict[torch.device, torch.Tensor] = {}
        self._steps = 0
        self._skips = policy.SkipCounter("DistributedLion", raise_on_nonfinite)
        self.intra_node_size = intra_node_size
        self._hier = None
        if intra_node_size > 1 or node_groups is not None:
            from .hierarchical import HierarchicalEngine

            self._hier = HierarchicalEngine(self, process_group, intra_node_size, node_groups)
            self.intra_node_size = self._hier.L

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the next step re-buckets (and re-checks agreement)."""
        super().add_param_group(param_group)
        self._buckets = None

    # ------------------------------------------------------------------------------------------ layout
    def _trainable(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _current_layout_key(self) -> tuple:
        return tuple((id(p), p.requires_grad) for g in self.param_groups for p in g["params"])

    def _check_param(self, p: torch.Tensor) -> None:
        if p.is_sparse:
            raise ValueError("DistributedLion does not support sparse parameters")
        if p.dtype == torch.float16 and self.rounding_seed is not None:
            raise ValueError(
                f"DistributedLion: a float16 parameter of shape {tuple(p.shape)}: without fp32 master weights a "
                "Lion update below half an ulp rounds away and training stalls, and stochastic rounding is "
                "implemented for bfloat16 only. Keep fp32 master weights (DeepSpeed's fp16 section, megatron-core's "
                "mixed precision), use bfloat16, or pass rounding_seed=None to accept round-to-nearest")

    def _build_buckets(self) -> list[_Bucket]:
        if self._hier is not None:
            return self._hier.build_buckets()
        old_momentum = {p: self.state[p]["exp_avg"].clone() for p in self.state if "exp_avg" in self.state[p]}
        buckets = self.plan_buckets(_Bucket)
        self.exchange.release_buffers()
        for b in buckets:
            b.numel = self.exchange.padded_numel(b.numel)
            # Zero-initialised once: the alignment gaps are never written, so they stay 0 on every rank.
            b.votes = torch.zeros(b.numel // 8, dtype=torch.uint8, device=b.device)
            b.exp_avg = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
            for p, _, off in b.params:
                view = b.exp_avg[off: off + p.numel()].view(p.shape)
                if p in old_momentum:
                    view.copy_(old_momentum[p].reshape(p.shape))
                self.state[p]["exp_avg"] = view
            b.runs = self._runs(b)
        self._flags = {b.device: torch.zeros(1, dtype=torch.int32, device=b.device) for b in buckets}
        return buckets

    def plan_buckets(self, make_bucket):
        """Trainable parameters in buckets of at most ``bucket_numel`` elements per device, each parameter at an
        8-aligned offset (``bucket.params`` of ``(param, group, offset)``, ``bucket.numel`` before padding).

        Args:
            make_bucket: the bucket class, called with the device (flat and hierarchical buckets share the layout).
        """
        buckets = []
        open_by_device: dict = {}
        for p, group in self._trainable():
            self._check_param(p)
            n = p.numel()
            b = open_by_device.get(p.device)
            if b is None or (b.numel and b.numel + n > self.bucket_numel):
                b = open_by_device[p.device] = make_bucket(p.device)
                buckets.append(b)
            b.params.append((p, group, b.numel))
            b.numel += -(-n // 8) * 8
        return buckets

    @staticmethod
    def _runs(b: _Bucket) -> list[_Run]:
        runs: list[_Run] = []
        for p, group, off in b.params:
            last = runs[-1] if runs else None
            if (last is not None and last.numel % 8 == 0 and last.offset + last.numel == off
                    and group is last.groups[-1] and p.device.type != "meta" and _adjacent([last.params[-1], p])):
                last.params.append(p)
                last.groups.append(group)
                last.numel += p.numel()
            else:
                runs.append(_Run([p], [group], off, p.numel()))
        for r in runs:
            if len(r.params) > 1:
                r.flat = _flat_view(r.params[0], r.numel)
        return runs

    def _ensure_layout(self) -> None:
        key = self._current_layout_key()
        if self._buckets is None or key != self._layout_key:
            self._buckets = self._build_buckets()
            self._layout_key = key
            self._check_agreement()

    # ------------------------------------------------------------------------------------------ agreement
    def _settings(self) -> dict[str, object]:
        """What must match on every rank, by name (the names appear in the mismatch error)."""
        trainable = self._trainable()
        return {
            "aggregation": self.aggregation,
            "bucket_numel": self.bucket_numel,
            "check_replicas_every": self.check_replicas_every,
            "raise_on_nonfinite": self.raise_on_nonfinite,
            "rounding_seed": self.rounding_seed,
            "intra_node_size": self.intra_node_size,
            **(self._hier.settings() if self._hier is not None else {}),
            "parameter shapes, dtypes and order": [(tuple(p.shape), str(p.dtype)) for p, _ in trainable],
            "frozen parameters (requires_grad=False)": [
                i for i, p in enumerate(q for g in self.param_groups for q in g["params"]) if not p.requires_grad],
            **self._hyper_settings(),
        }

    def _hyper_settings(self) -> dict[str, object]:
        return {
            "lr (per param group)": [g["lr"] for g in self.param_groups],
            "betas (per param group)": [tuple(g["betas"]) for g in self.param_groups],
            "weight_decay (per param group)": [g["weight_decay"] for g in self.param_groups],
        }

    def _param_checksum(self) -> torch.Tensor | None:
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.device.type == "meta" for p in params):
            return None
        return local_checksum(params)

    def _compare(self, settings: dict[str, object], what: str) -> None:
        """All-gather fingerprints of ``settings`` (+ the parameters' checksum); raise naming any mismatch."""
        values: dict[str, object] = {name: _hash64(v) for name, v in settings.items()}
        checksum = self._param_checksum()
        if checksum is not None:
            values["parameter values"] = checksum
        step = self.param_groups[0]["step"] if self.param_groups else 0
        table = gather_fingerprints(values, self.process_group, step=step)
        bad = [name for name, per_rank in table.items() if len(set(per_rank)) > 1]
        if not bad:
            return
        # Every rank saw the same table, so every rank takes this branch: the explaining gather cannot hang.
        shown = gather_objects({k: repr(v)[:200] for k, v in settings.items()}, self.process_group, step=step)
        lines = []
        for name in bad:
            by_value: dict[object, list[int]] = {}
            for r, v in enumerate(table[name]):
                key = shown[r].get(name, f"checksum {v}") if name in settings else f"checksum {v}"
                by_value.setdefault(key, []).append(r)
            lines.append(f"{name}: " + "; ".join(f"ranks {ranks} have {v}" for v, ranks in by_value.items()))
        fix = ("Every data-parallel rank must build the same model from the same seed and the same optimizer "
               "settings, with parameters in the same order")
        if what == "replicas":
            raise RuntimeError(f"DistributedLion: data-parallel replicas diverged at step {step}: "
                               + " | ".join(lines) + f". {fix}; something outside the optimizer modified a replica.")
        raise ValueError(f"DistributedLion: the data-parallel ranks disagree before step {step + 1}: "
                         + " | ".join(lines) + f". {fix}.")

    def _check_agreement(self) -> None:
        if self.exchange.world_size > 1:
            self._compare(self._settings(), "start")

    def check_replicas(self) -> None:
        """Raise ``RuntimeError`` if the parameters (bit-wise) or the hyper-parameters differ between the ranks."""
        if self.exchange.world_size > 1:
            self._compare(self._hyper_settings(), "replicas")

    # ------------------------------------------------------------------------------------------ step
    def _run_grads(self, run: _Run) -> tuple[bool, torch.Tensor | None]:
        """(whether the run can be launched as one, its flat gradient view)."""
        if run.flat is None:
            return False, None
        grads = [p.grad for p in run.params]
        if any(g is None for g in grads) or not _adjacent(grads):
            return False, None
        if run.flat.data_ptr() != run.params[0].data_ptr():  # a parameter's .data was replaced since bucketing
            return False, None
        return True, _flat_view(grads[0], run.numel)

    def step_rounding_seed(self, t: int) -> int | None:
        """Step ``t``'s stochastic-rounding seed of bf16 parameters (None: round to nearest); an element's random
        bits come from it and the element's bucket offset."""
        return _step_seed(self.rounding_seed, t) if self.rounding_seed is not None else None

    @torch.no_grad()
    def step(self, closure=None):
        """One D-Lion step; a collective over the process group, so every rank must call it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        t = self.param_groups[0]["step"] + 1
        buckets = self._buckets
        if not buckets:
            self._finish_step(t)
            return loss
        if self._hier is not None:
            if not self._hier.step(t):
                return self._skip(t, loss)
            self._finish_step(t)
            return loss
        for f in self._flags.values():
            f.zero_()
        beta1_of = {id(g): g["betas"][0] for g in self.param_groups}

        # 1. votes, bucket by bucket; each bucket leaves as soon as it is packed.
        flights, plans = [], []
        last_device = buckets[-1].device
        for i, b in enumerate(buckets):
            flag = self._flags[b.device]
            plans.append(self._bucket_launches(b, t))
            for group, _, items in plans[-1]:
                lion_votes_multi([grad for _, grad, _ in items], [p.numel() for p, _, _ in items],
                                 [off for _, _, off in items], b.exp_avg, beta1_of[id(group)], t, b.votes,
                                 nonfinite=flag)
            if i == len(buckets) - 1 and len(self._flags) > 1:
                for dev, f in self._flags.items():  # the last bucket carries every device's flag
                    if dev != last_device:
                        flag = torch.maximum(flag, f.to(last_device))
            flights.append(self.exchange.start(b.votes, flag, t, key=i))

        # 2. counts and all_gathers, all issued before anything is modified.
        for flight in flights:
            self.exchange.reduce(flight)

        # 3. the skip decision: every rank's flag as of its last bucket (one host sync per step).
        if self.exchange.any_nonfinite(flights[-1]):
            self.exchange.drain(flights)
            return self._skip(t, loss)

        # 4. apply each bucket as its aggregate lands.
        n_ranks = self.exchange.world_size
        for b, flight, plan in zip(buckets, flights, plans, strict=True):
            agg = self.exchange.finish(flight)
            for group, seed, items in plan:
                lion_apply_multi([p for p, _, _ in items], [grad for _, grad, _ in items], [off for _, _, off in items],
                                 b.exp_avg, agg, n_ranks, group["lr"], group["weight_decay"], group["betas"][1],
                                 self.aggregation, rounding_seed=seed)
        self._finish_step(t)
        return loss

    def _bucket_launches(self, b: _Bucket, t: int) -> list[tuple[dict, int | None, list[tuple]]]:
        """The bucket's :meth:`_launches` as ``[(group, rounding seed or None, [(tensor, grad, offset)])]``: each
        entry is one call of the multi-tensor launchers (one kernel launch per kind of tensor in it)."""
        keyed: dict[tuple[int, int | None], tuple[dict, int | None, list[tuple]]] = {}
        step_seed = self.step_rounding_seed(t)
        for run in b.runs:
            for p, grad, off, group in self._launches(run):
                seed = step_seed if p.dtype == torch.bfloat16 else None
                keyed.setdefault((id(group), seed), (group, seed, []))[2].append((p, grad, off))
        return list(keyed.values())

    def _launches(self, run: _Run) -> list[tuple[torch.Tensor, torch.Tensor | None, int, dict]]:
        """``(tensor, grad, bucket offset, group)`` per kernel launch: the whole run at once when its gradients are
        adjacent in memory too, else one per parameter (same bits either way)."""
        if len(run.params) == 1:  # the common case, without the run machinery (host time per step counts)
            return [(run.params[0], run.params[0].grad, run.offset, run.groups[0])]
        whole, g = self._run_grads(run)
        if whole:
            return [(run.flat, g, run.offset, run.groups[0])]
        return [(p, p.grad, off, group) for p, group, off in
                zip(run.params, run.groups, self._offsets(run), strict=True)]

    @staticmethod
    def _offsets(run: _Run) -> list[int]:
        offs, off = [], run.offset
        for p in run.params:
            offs.append(off)
            off += -(-p.numel() // 8) * 8
        return offs

    def _finish_step(self, t: int) -> None:
        for group in self.param_groups:
            group["step"] = t
        self._steps += 1
        if self.check_replicas_every and t % self.check_replicas_every == 0:
            self.check_replicas()

    @property
    def _skipped(self) -> int:
        return self._skips.skipped

    def _skip(self, t: int, loss):
        self._skips.raise_on_nonfinite = self.raise_on_nonfinite  # a public attribute: may change between steps
        self._skips.record(t)  # the step policy's count and message (shared with the megatron-core optimizer)
        return loss

    # ------------------------------------------------------------------------------------------ stats
    def comm_stats(self) -> dict:
        """Cumulative statistics of this rank.

        Returns:
            ``{"steps", "params", "bytes_sent", "bytes_received", "skipped_steps", "world_size",
            "aggregation", "bits_per_param_step", "intra_node_size", "num_nodes", "inter_node_bytes_sent",
            "intra_node_bytes_sent", "control_bytes_sent"}``; bytes are payload bytes this rank hands to / receives
            from other ranks in collectives (the vote exchange; the small agreement checks are not counted);
            ``control_bytes_sent`` are the non-finite flag bytes that ride with the votes between nodes (one per
            peer and bucket, included in ``bytes_sent``); ``bits_per_param_step`` is the rest, the vote wire, per
            parameter and step (``(1 + b)(N-1)/N`` for flat D-Lion on buckets a multiple of ``8N`` long);
            ``bytes_sent`` is the total, split into ``inter_node_bytes_sent`` (votes between nodes) and
            ``intra_node_bytes_sent`` (fp32 gradients and aggregate bits inside a node; 0 for flat D-Lion, where
            every rank is its own node); ``params`` counts trainable parameters' elements; ``steps`` counts
            applied and skipped steps.
        """
        n_params = sum(p.numel() for p, _ in self._trainable())
        steps = self._steps + self._skipped
        stats = {
            "bytes_sent": self.exchange.bytes_sent,
            "bytes_received": self.exchange.bytes_received,
            "inter_node_bytes_sent": self.exchange.bytes_sent,
            "intra_node_bytes_sent": 0,
            "intra_node_size": 1,
            "num_nodes": self.exchange.world_size,
        }
        if self._hier is not None:
            stats.update(self._hier.comm_stats())
        control = self.exchange.control_bytes_sent
        sent = stats["bytes_sent"] - control
        return {
            "steps": steps,
            "params": n_params,
            "skipped_steps": self._skipped,
            "world_size": self.exchange.world_size,
            "aggregation": self.aggregation,
            "bits_per_param_step": 8.0 * sent / (n_params * steps) if n_params and steps else 0.0,
            "control_bytes_sent": control,
            **stats,
        }

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict``; hierarchical: only this rank's momentum shard, plus its layout."""
        state = super().state_dict()
        if self._hier is not None:
            from .hierarchical import STATE_KEY

            state[STATE_KEY] = self._hier.layout_record()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Standard loading, except that momentum stays fp32 whatever the parameter dtype.

        (``torch.optim.Optimizer`` casts floating-point state to the parameter's dtype; for bf16 parameters that
        would round the momentum, and the votes depend on it.) The next step re-buckets: the loaded momentum is
        copied into the bucket layout.
        """
        if self._hier is not None:
            if not self._hier.check_loaded(state_dict):  # another rank's shard: hyper-parameters and steps only
                state_dict = {**state_dict, "state": {}}
                for p in self.state:
                    self.state[p].pop("exp_avg", None)
        elif "hierarchical" in state_dict:
            raise ValueError(
                "DistributedLion: this checkpoint holds one rank's momentum shard of hierarchical D-Lion (layout "
                f"intra_node_size={state_dict['hierarchical'].get('intra_node_size')} x "
                f"{state_dict['hierarchical'].get('num_nodes')} node(s)), and this optimizer is flat "
                "(intra_node_size=1); resume with the layout it was saved with")
        saved = {k: v["exp_avg"].clone() for k, v in state_dict["state"].items() if "exp_avg" in v}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, m in saved.items():
            p = params[int(k)]
            self.state[p]["exp_avg"] = m.to(device=p.device, dtype=torch.float32).contiguous()
        self._buckets = None
