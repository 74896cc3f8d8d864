"""Bandwidth-optimal, asynchronous exchange of 1-bit votes (DESIGN 3.2).

Per bucket of ``n`` vote bits (``n`` a multiple of ``8*N``, so each of the N shards is whole bytes):

1. ``all_to_all_single``: rank r receives every rank's bits of shard r (``(N-1)/N * n`` bits leave each rank).
   One extra byte rides on each chunk: the sender's non-finite-gradient flag as it stood when the bucket was sent,
   so the skip decision of DESIGN 3.1 step 7 costs no extra collective (and no extra latency on a slow link).
2. Rank r counts the votes of its shard (:func:`distlion_ds.kernels.vote_count`): MaVo -> 1 bit,
   Avg -> ``ceil(log2(N+1))`` bit-planes of ``(S+N)/2``.
3. ``all_gather_single`` (``all_gather_into_tensor``) of the counted shards: every rank holds the whole aggregate.

Wire per rank per step ~ ``(1 + b)(N-1)/N`` bits per parameter, against ``64(N-1)/N`` for an fp32 ring all-reduce.
Packed bytes are never all-reduced: a sum would carry from one bit lane into the next.

Asynchrony. A bucket in flight is an :class:`InFlight`: :meth:`VoteExchange.start` issues its all_to_all
(``async_op=True``) as soon as its votes are packed, :meth:`~VoteExchange.reduce` waits for it, counts and issues the
all_gather, :meth:`~VoteExchange.finish` waits for that. The optimizer starts every bucket before reducing the first,
and reduces every bucket before finishing the first, so the network is never idle while the host counts. Every
bucket owns its buffers (keyed by the bucket's index), so buckets in flight never share memory. The only host
synchronisation of a step is :meth:`~VoteExchange.any_nonfinite` (the skip decision).

Failures. A collective that fails (a peer died: connection reset; a peer stalled: the process group's timeout,
which the entry points set, see ``distributed_timeout_minutes``) raises :class:`CollectiveError`, whose message is
one line naming the step, the collective, the bucket, the group and what gloo/NCCL said about the peer.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlion_ds.kernels.lion import aggregate_bits, vote_count

logger = logging.getLogger(__name__)

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments); older releases have only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective of the package failed or timed out (a peer died or stalled); the message names where.

    ``detail`` is the message without its location; ``located`` says whether the step/iteration is in it (an
    enclosing :func:`run_collective` that knows it adds it).
    """

    def __init__(self, msg: str, *, detail: str = "", located: bool = True):
        super().__init__(msg)
        self.detail = detail or msg
        self.located = located


def _group_size_rank(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process_group was given but torch.distributed is not initialized")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


_PEER_PATTERNS = (
    re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)"),  # gloo: "closed by peer [127.0.0.1]:17316", "Read error [::1]:80"
    re.compile(r"\b(?:from|to) rank (\d+)", re.IGNORECASE),  # NCCL / gloo p2p
)


def _peer_hint(reason: str) -> str:
    """What the backend's message says about the peer, if anything (gloo names an address, NCCL sometimes a rank)."""
    for pattern in _PEER_PATTERNS:
        found = pattern.search(reason)
        if found:
            return "; peer: " + ":".join(found.groups())
    return "; peer: not named by the backend (a stalled peer shows as a timeout)"


# What gloo / NCCL / the c10d store say when a peer died or stalled (other RuntimeErrors pass through unchanged).
_BACKEND_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection|pair closure|peer|socket|store|broken pipe",
                              re.IGNORECASE)


def run_collective(what: str, fn, *, step: int | None, group=None, unit: str = "step"):
    """Run ``fn()`` (collectives or a wait on one); re-raise a backend failure as a one-line :class:`CollectiveError`.

    Args:
        what: the collective and its payload, e.g. ``"all_to_all_single of bucket 0 (1024 B)"``.
        fn: a zero-argument callable.
        step: the optimizer step or training iteration (None outside one).
        group: the process group (for the message).
        unit: what ``step`` counts (``"step"``, ``"iteration"``).
    """
    start = time.monotonic()
    try:
        return fn()
    except CollectiveError as exc:
        if exc.located or step is None:
            raise
        msg = f"distlion_ds: {unit} {step}: {what}: {exc.detail}"
        logger.error(msg)
        raise CollectiveError(msg, detail=f"{what}: {exc.detail}") from exc
    except RuntimeError as exc:  # gloo/NCCL report timeouts and resets as RuntimeError (or DistBackendError)
        reason = " ".join(str(exc).split())[:400]
        if not (isinstance(exc, dist.DistError) or _BACKEND_FAILURE.search(reason)):
            raise
        world, rank = _group_size_rank(group)
        where = f"{unit} {step}" if step is not None else f"outside a {unit}"
        detail = (f"{what} on a group of {world} ranks (this rank {rank}) failed after "
                  f"{time.monotonic() - start:.1f} s{_peer_hint(reason)}; a peer died or stalled (the process "
                  f"group's timeout bounds the wait). Backend: {reason}")
        msg = f"distlion_ds: {where}: {detail}"
        if step is not None:  # else an enclosing run_collective adds the step and logs
            logger.error(msg)
        raise CollectiveError(msg, detail=detail, located=step is not None) from exc


def set_timeout_everywhere(timeout: datetime.timedelta) -> int:
    """Give every process group of this process (the world and every sub-group) ``timeout``; returns how many.

    Sub-groups made by ``new_group`` without a timeout (DeepSpeed's data-parallel and pipeline groups, for instance)
    get torch's default of 30 minutes whatever the world's timeout is, so a stalled peer would still hang the vote
    exchange that long. ``torch.distributed.distributed_c10d._set_pg_timeout`` is private; tests pin it.
    """
    from torch.distributed import distributed_c10d as c10d

    count = 0
    for group in list(c10d._world.pg_map):
        if group is not None and not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)
            count += 1
    return count


def _backend_device(group) -> torch.device:
    """Where a small control tensor must live for a collective on ``group``: the current CUDA device under NCCL,
    else the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_together(error: BaseException | None, explain) -> None:
    """Every rank learns which ranks failed a local step (one all_reduce of N int32 over the world); then each
    failed rank raises its own ``error`` and every other rank a ``RuntimeError(explain(failed_ranks))``.

    A local failure (one rank's corrupt checkpoint file) would otherwise leave the other ranks waiting in their next
    collective until the process-group timeout.
    """
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    failed[dist.get_rank()] = error is not None
    on_backend = failed.to(_backend_device(None))  # NCCL reduces device tensors only
    dist.all_reduce(on_backend)
    failed = on_backend.cpu()
    if error is not None:
        raise error
    if failed.any():
        raise RuntimeError(explain([r for r in range(len(failed)) if failed[r]]))


def group_timeout(group=None) -> datetime.timedelta | None:
    """The process group's timeout when it is a gloo group (its p2p waits need it passed explicitly), else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    pg = group if group is not None else dist.group.WORLD
    try:
        backend = pg._get_backend(torch.device("cpu"))
    except (RuntimeError, ValueError):  # no CPU backend in this group (NCCL only)
        return None
    if type(backend).__name__ != "ProcessGroupGloo":
        return None
    return backend.options._timeout


def wait_work(work, what: str, *, group=None, step: int | None = None, unit: str = "step") -> None:
    """``work.wait()``, bounded by the group's timeout on gloo, failures as one-line :class:`CollectiveError`.

    gloo bounds its collectives by the process group's timeout but waits on a point-to-point ``irecv``/``isend``
    forever unless a timeout is passed to ``wait`` (measured: a SIGSTOPped pipeline stage hung its neighbour for
    good). NCCL works are waited plainly: its watchdog enforces the timeout, and a timed ``wait`` would block the host.
    """
    timeout = group_timeout(group)
    run_collective(what, (lambda: work.wait(timeout)) if timeout is not None else work.wait, step=step, group=group,
                   unit=unit)


def host_flag(t: torch.Tensor) -> bool:
    """``bool(t.any())``, the step's one host synchronisation; a ``meta`` tensor (compile-only runs) reads False."""
    if t.device.type == "meta":
        return False
    return bool(t.any())


@dataclass
class InFlight:
    """One bucket between :meth:`VoteExchange.start` and :meth:`VoteExchange.finish`."""

    key: int
    step: int
    n_bytes: int
    shard: int
    votes: torch.Tensor
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    flag: torch.Tensor | None = None  # world size 1: the flag itself
    a2a: object | None = None
    gathered: torch.Tensor | None = None
    gather: object | None = None
    agg: torch.Tensor | None = None


class VoteExchange:
    """Aggregates packed votes across the ranks of ``group`` and counts the bytes it moves.

    Args:
        group: the data-parallel process group (None = the default group, or a single process when
            torch.distributed is not initialized).
        aggregation: ``"mavo"`` or ``"avg"``.
    """

    def __init__(self, group=None, aggregation: str = "mavo"):
        self.group = group
        self.world_size, self.rank = _group_size_rank(group)
        self.aggregation = aggregation
        self.nbits = aggregate_bits(aggregation, self.world_size)
        self.bytes_sent = 0
        self.bytes_received = 0
        # Of those, the non-finite flag bytes (one per shard and peer): control, not votes. Counted in bytes_sent;
        # kept apart so that the vote wire per parameter can be reported exactly as (1 + b)(N-1)/N.
        self.control_bytes_sent = 0
        self._buffers: dict[tuple, torch.Tensor] = {}

    def padded_numel(self, numel: int) -> int:
        """Bucket length in elements: a multiple of ``8*N`` so every shard is a whole number of bytes."""
        unit = 8 * self.world_size
        return -(-numel // unit) * unit

    def _buffer(self, name: str, key: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        full = (name, key, shape, device)
        buf = self._buffers.get(full)
        if buf is None:
            buf = self._buffers[full] = torch.empty(shape, dtype=torch.uint8, device=device)
        return buf

    def release_buffers(self) -> None:
        """Drop the per-bucket buffers (after a re-bucketing; they are re-made on demand)."""
        self._buffers.clear()

    # ------------------------------------------------------------------------------------------ async protocol
    def start(self, votes: torch.Tensor, nonfinite: torch.Tensor, step: int, key: int = 0) -> InFlight:
        """Issue one bucket's all_to_all (asynchronously).

        Args:
            votes: uint8 ``[padded_numel/8]``, this rank's packed votes of the bucket (read before this returns).
            nonfinite: int32 ``[1]``, nonzero when this rank saw a non-finite gradient so far (copied now).
            step: optimizer step ``t`` (zero rule on MaVo ties; error messages).
            key: the bucket's index: buckets with different keys never share buffers.
        """
        n_ranks = self.world_size
        n_bytes = votes.numel()
        if n_bytes % n_ranks:
            raise ValueError(f"bucket of {n_bytes} bytes does not split into {n_ranks} shards; use padded_numel()")
        shard = n_bytes // n_ranks
        flight = InFlight(key, step, n_bytes, shard, votes)
        if n_ranks == 1:
            flight.flag = nonfinite
            return flight
        send = flight.send = self._buffer("send", key, (n_ranks, shard + 1), votes.device)
        recv = flight.recv = self._buffer("recv", key, (n_ranks, shard + 1), votes.device)
        send[:, :shard].copy_(votes.view(n_ranks, shard))
        send[:, shard].copy_((nonfinite != 0).to(torch.uint8).expand(n_ranks))
        flight.a2a = run_collective(
            f"all_to_all_single of bucket {key} ({send.numel()} B)",
            lambda: dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group, async_op=True),
            step=step, group=self.group)
        self.bytes_sent += (n_ranks - 1) * (shard + 1)
        self.bytes_received += (n_ranks - 1) * (shard + 1)
        self.control_bytes_sent += n_ranks - 1
        return flight

    def _wait(self, flight: InFlight, attr: str, what: str) -> None:
        work = getattr(flight, attr)
        if work is not None:
            run_collective(f"{what} of bucket {flight.key}", work.wait, step=flight.step, group=self.group)
            setattr(flight, attr, None)

    def any_nonfinite(self, flight: InFlight) -> bool:
        """Whether any rank's flag rode on this bucket as nonzero (waits for its all_to_all; one host sync).

        Every rank receives every rank's flag, so all of them get the same answer: no rank can go on alone.
        """
        if self.world_size == 1:
            return host_flag(flight.flag)
        self._wait(flight, "a2a", "all_to_all_single")
        return host_flag(flight.recv[:, flight.shard])

    def reduce(self, flight: InFlight) -> None:
        """Wait for the bucket's all_to_all, count this rank's shard and issue the all_gather (asynchronously)."""
        n_ranks, shard = self.world_size, flight.shard
        if n_ranks == 1:
            flight.agg = vote_count(flight.votes.view(1, shard), 1, self.aggregation, flight.step)
            return
        self._wait(flight, "a2a", "all_to_all_single")
        mine = self._buffer("mine", flight.key, (self.nbits, shard), flight.votes.device)
        vote_count(flight.recv[:, :shard], n_ranks, self.aggregation, flight.step,
                   elem_offset=self.rank * shard * 8, out=mine)
        gathered = flight.gathered = self._buffer("gathered", flight.key, (n_ranks, self.nbits, shard),
                                                  flight.votes.device)
        flight.gather = run_collective(
            f"all_gather of bucket {flight.key} ({mine.numel()} B)",
            lambda: _all_gather_single(gathered.view(-1), mine.view(-1), group=self.group, async_op=True),
            step=flight.step, group=self.group)
        self.bytes_sent += (n_ranks - 1) * self.nbits * shard
        self.bytes_received += (n_ranks - 1) * self.nbits * shard

    def finish(self, flight: InFlight) -> torch.Tensor:
        """The bucket's aggregate, uint8 ``[nbits, padded_numel/8]`` (row k = bit-plane k)."""
        if flight.agg is not None:
            return flight.agg
        self._wait(flight, "gather", "all_gather")
        if self.nbits == 1:
            return flight.gathered.view(1, flight.n_bytes)
        # [N, planes, shard] -> [planes, N*shard]: each plane in bucket order (a copy of nbits/8 B per element).
        return flight.gathered.transpose(0, 1).reshape(self.nbits, flight.n_bytes)

    def drain(self, flights: list[InFlight]) -> None:
        """Wait for every collective still in flight (a skipped step must not leave work behind)."""
        for flight in flights:
            self._wait(flight, "a2a", "all_to_all_single")
            self._wait(flight, "gather", "all_gather")

    # ------------------------------------------------------------------------------------------ one bucket, in sequence
    def exchange(self, votes: torch.Tensor, nonfinite: torch.Tensor, step: int, key: int = 0) -> torch.Tensor | None:
        """Exchange one bucket of packed votes, start to finish.

        Returns:
            The aggregate, uint8 ``[nbits, padded_numel/8]``, or None when any rank reported a non-finite
            gradient: then every rank returns None, and the caller skips the step.
        """
        flight = self.start(votes, nonfinite, step, key)
        if self.any_nonfinite(flight):
            return None
        self.reduce(flight)
        return self.finish(flight)


def _bit_sum(t: torch.Tensor) -> torch.Tensor:
    """Wrap-around int64 sum of ``t``'s raw bytes read as 64-bit words (a 4-byte tail as its own word)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    head = raw.numel() // 8 * 8
    if raw.data_ptr() % 8:  # a view into a flat buffer at an odd 4-byte offset: an aligned copy, same value
        raw = raw.clone()
    # Summing the bytes as int64 words reads memory once at full speed (measured 22x faster than widening int32 bit
    # patterns to int64 on CPU: 10 ms against 220 ms for 50M fp32 elements).
    total = raw[:head].view(torch.int64).sum()
    if head < raw.numel():
        total = total + raw[head:].to(torch.int64).sum() * 0x1_0000_0001
    return total


def local_checksum(tensors) -> torch.Tensor:
    """Bit-level checksum of ``tensors`` on this rank (an int64 scalar tensor on the first tensor's device).

    Per tensor, the wrap-around int64 sum of its raw bytes read as 64-bit words; the sums are combined with odd
    position weights, so swapping two tensors (a different parameter order) changes the checksum too. Any bit
    difference between replicas changes it unless differences cancel exactly, which divergence does not do.
    """
    total = None
    for i, t in enumerate(tensors):
        s = _bit_sum(t) * (2 * i + 1)
        total = s if total is None else total + s.to(total.device)
    if total is None:
        total = torch.zeros((), dtype=torch.int64)
    return total


def replica_checksum(tensors, group=None) -> list[int]:
    """Bit-level checksum of ``tensors`` on every rank of ``group`` (one all_gather of 8 bytes).

    See :func:`local_checksum`: any bit difference between replicas changes it with overwhelming probability.
    """
    total = local_checksum(list(tensors))
    world, _ = _group_size_rank(group)
    if world == 1:
        return [int(total)]
    out = torch.empty(world, dtype=torch.int64, device=total.device)
    run_collective("all_gather of the replica checksum",
                   lambda: _all_gather_single(out, total.reshape(1), group=group), step=None, group=group)
    return [int(v) for v in out.tolist()]


def gather_fingerprints(values: dict[str, torch.Tensor | int], group=None, *, step: int | None = None
                        ) -> dict[str, list[int]]:
    """All-gather a dict of int64 fingerprints (same keys, same order on every rank): ``name -> value per rank``.

    One all_gather of ``8 * len(values)`` bytes.
    """
    names = list(values)
    world, _ = _group_size_rank(group)
    local = torch.stack([v.to(torch.int64).reshape(()).cpu() if isinstance(v, torch.Tensor)
                         else torch.tensor(v, dtype=torch.int64) for v in values.values()]) if names \
        else torch.zeros(0, dtype=torch.int64)
    if world == 1:
        return {n: [int(local[i])] for i, n in enumerate(names)}
    backend_device = _backend_device(group)
    local = local.to(backend_device)
    out = torch.empty(world, len(names), dtype=torch.int64, device=backend_device)
    run_collective(f"all_gather of {len(names)} fingerprints",
                   lambda: _all_gather_single(out.view(-1), local, group=group), step=step, group=group)
    table = out.cpu()
    return {n: [int(v) for v in table[:, i].tolist()] for i, n in enumerate(names)}


def gather_objects(obj, group=None, *, step: int | None = None) -> list:
    """``all_gather_object`` (used only to explain a mismatch already detected on every rank)."""
    world, _ = _group_size_rank(group)
    if world == 1:
        return [obj]
    out = [None] * world
    run_collective("all_gather_object of settings", lambda: dist.all_gather_object(out, obj, group=group),
                   step=step, group=group)
    return out
