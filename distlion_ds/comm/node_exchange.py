"""Node topology and the intra-node collectives of hierarchical D-Lion (issue 12; the optimizer is in
:mod:`distlion_ds.optim.hierarchical`).

A data-parallel group of ``N = L * M`` ranks is split into ``M`` nodes of ``L`` ranks each: by default consecutive
ranks of the group (``node n`` = group ranks ``n*L .. n*L + L-1``, what launchers do on clusters with L GPUs per
host), or explicit lists of group ranks. Local rank ``i`` of a node is its ``i``-th smallest rank (a process group
orders its members by rank, and the all_to_all sends chunk ``i`` to the member of group rank ``i``). Each
rank belongs to two sub-groups: its node (the intra-node group, size L) and the inter-node group of every node's
local rank ``i`` (size M), over which the existing :class:`~distlion_ds.comm.VoteExchange` runs.

The intra-node gradient reduce-scatter is an ``all_to_all_single`` of fp32 shards followed by a local sum in a
fixed order (local rank 0, 1, ..., L-1; see :func:`ordered_node_mean`), not the backend's reduce-scatter: the
wire cost is the same ((L-1)/L of the bucket per rank), and the result does not depend on the backend's ring or
tree order, so it is reproducible across gloo and NCCL and can be written down as an oracle.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .vote_exchange import _all_gather_single, _group_size_rank, gather_fingerprints, gather_objects, run_collective

# (id of the default group, global ranks) -> process group. Groups are made once per set of ranks and reused by
# every optimizer of the process (a NCCL communicator costs seconds and memory; a hashed group name made twice
# would collide).
_GROUP_CACHE: dict[tuple, object] = {}


class NodeTopology:
    """Which ranks form a node, and this rank's two sub-groups.

    Args:
        process_group: the data-parallel group (None = the default group, or one process when torch.distributed is
            not initialized).
        intra_node_size: L, ranks per node; nodes are consecutive group ranks. Ignored when ``nodes`` is given.
        nodes: explicit nodes, a list of lists of ranks of ``process_group`` (not global ranks): disjoint, all of
            the same size, covering every rank of the group.

    Raises:
        ValueError: naming the setting, when L does not divide N, or the explicit nodes overlap, miss a rank, name
            a rank outside the group or differ in size.
    """

    def __init__(self, process_group=None, intra_node_size: int = 1, nodes: list[list[int]] | None = None):
        world, rank = _group_size_rank(process_group)
        if nodes is None:
            if isinstance(intra_node_size, bool) or not isinstance(intra_node_size, int) or intra_node_size < 1:
                raise ValueError(f"intra_node_size={intra_node_size!r}: expected an int >= 1 (GPUs per node)")
            if world % intra_node_size:
                raise ValueError(
                    f"intra_node_size={intra_node_size} does not divide the data-parallel size {world}: every node "
                    f"must hold the same number of ranks; use a divisor of {world} or pass node_groups")
            nodes = [list(range(s, s + intra_node_size)) for s in range(0, world, intra_node_size)]
        else:
            nodes = _check_nodes(nodes, world)
            if intra_node_size not in (1, len(nodes[0])):
                raise ValueError(f"intra_node_size={intra_node_size} contradicts node_groups (nodes of "
                                 f"{len(nodes[0])} ranks); pass one of them")
        self.nodes = nodes
        self.intra_size = len(nodes[0])
        self.num_nodes = len(nodes)
        self.world_size = world
        self.node, self.local_rank = next((n, g.index(rank)) for n, g in enumerate(nodes) if rank in g)
        self.intra_group = self.inter_group = None
        if dist.is_available() and dist.is_initialized():
            _agree(nodes, process_group, world)
            to_global = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            # Every rank makes its node's group first, then its inter-node group: with group-local synchronisation
            # that order cannot deadlock (a rank waits only for ranks that make the same group at the same point).
            self.intra_group = _group([to_global[r] for r in nodes[self.node]])
            self.inter_group = _group([to_global[g[self.local_rank]] for g in nodes])

    def describe(self) -> str:
        return f"{self.num_nodes} node(s) x {self.intra_size} rank(s): {self.nodes}"


def _agree(nodes: list[list[int]], process_group, world: int) -> None:
    """Every rank of the group must name the same nodes, checked before any sub-group is made: ranks that make
    different groups would wait in the group-local barriers until the process group's timeout, naming nothing."""
    if world == 1:
        return
    digest = int.from_bytes(hashlib.blake2b(repr(nodes).encode(), digest_size=8).digest(), "little", signed=True)
    table = gather_fingerprints({"nodes": digest}, process_group)
    if len(set(table["nodes"])) == 1:
        return
    shown = gather_objects(nodes, process_group)  # every rank saw the mismatch: every rank takes this branch
    by_value: dict[str, list[int]] = {}
    for r, v in enumerate(shown):
        by_value.setdefault(repr(v), []).append(r)
    raise ValueError("DistributedLion: the data-parallel ranks disagree on the nodes (intra_node_size / "
                     "node_groups): " + "; ".join(f"ranks {r} have nodes {v}" for v, r in by_value.items())
                     + ". Pass the same intra_node_size (or node_groups) on every rank")


def _check_nodes(nodes, world: int) -> list[list[int]]:
    if not isinstance(nodes, list | tuple) or not nodes or not all(isinstance(g, list | tuple) for g in nodes):
        raise ValueError(f"node_groups={nodes!r}: expected a list of lists of data-parallel ranks")
    nodes = [list(g) for g in nodes]
    seen: dict[int, int] = {}
    for n, g in enumerate(nodes):
        for r in g:
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
                raise ValueError(f"node_groups: group {n} names rank {r!r}, not a rank of the data-parallel group "
                                 f"of {world} ranks (0..{world - 1})")
            if r in seen:
                raise ValueError(f"node_groups: rank {r} is in group {seen[r]} and in group {n}; the nodes must "
                                 "not overlap")
            seen[r] = n
    missing = sorted(set(range(world)) - set(seen))
    if missing:
        raise ValueError(f"node_groups: ranks {missing} of the data-parallel group of {world} ranks are in no "
                         "group; every rank must be in exactly one node")
    sizes = sorted({len(g) for g in nodes})
    if len(sizes) > 1:
        raise ValueError(f"node_groups: nodes of different sizes {sizes}; every node must hold the same number of "
                         "ranks (the votes of shard i are exchanged between local ranks i)")
    return [sorted(g) for g in nodes]


def _group(global_ranks: list[int]):
    global_ranks = sorted(global_ranks)  # a group's members are ordered by rank whatever order they are named in
    key = (id(dist.group.WORLD), tuple(global_ranks))
    group = _GROUP_CACHE.get(key)
    if group is None:
        group = _GROUP_CACHE[key] = dist.new_group(global_ranks, use_local_synchronization=True)
    return group


def ordered_node_mean(chunks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The node's mean gradient of one shard, in the documented order: ``(((c0 + c1) + c2) + ...) / L`` in fp32.

    Args:
        chunks: fp32 ``[L, S]``; row r is local rank r's gradient of the shard.
        out: fp32 ``[S]``.
    """
    out.copy_(chunks[0])
    for r in range(1, chunks.shape[0]):
        out.add_(chunks[r])
    return out.div_(chunks.shape[0])


class IntraNodeExchange:
    """The collectives inside one node, with byte accounting (payload bytes this rank sends / receives)."""

    def __init__(self, topology: NodeTopology):
        self.group = topology.intra_group
        self.size = topology.intra_size
        self.bytes_sent = 0
        self.bytes_received = 0

    def scatter_gradients(self, send: torch.Tensor, recv: torch.Tensor, step: int, key: int):
        """Issue the fp32 ``all_to_all_single`` of a bucket: ``recv[r]`` gets local rank r's chunk ``local_rank``.

        Args:
            send: fp32 ``[L * S]``, this rank's gradients of the bucket (chunk i goes to local rank i).
            recv: fp32 ``[L, S]``.
        Returns:
            The work to :meth:`wait` for (None when L = 1: ``recv`` is then filled at once).
        """
        if self.size == 1:
            recv.view(-1).copy_(send)
            return None
        n_bytes = send.numel() * send.element_size()
        work = run_collective(
            f"all_to_all_single of the fp32 gradients of bucket {key} ({n_bytes} B, intra-node)",
            lambda: dist.all_to_all_single(recv.view(-1), send, group=self.group, async_op=True),
            step=step, group=self.group)
        moved = n_bytes // self.size * (self.size - 1)
        self.bytes_sent += moved
        self.bytes_received += moved
        return work

    def gather_bits(self, payload: torch.Tensor, out: torch.Tensor, step: int, key: int):
        """Issue the intra-node ``all_gather`` of a uint8 ``payload`` into ``out`` ``[L, payload.numel()]``."""
        if self.size == 1:
            out.view(-1).copy_(payload)
            return None
        work = run_collective(
            f"all_gather of the aggregate of bucket {key} ({payload.numel()} B, intra-node)",
            lambda: _all_gather_single(out.view(-1), payload, group=self.group, async_op=True),
            step=step, group=self.group)
        self.bytes_sent += (self.size - 1) * payload.numel()
        self.bytes_received += (self.size - 1) * payload.numel()
        return work

    def wait(self, work, what: str, step: int, key: int) -> None:
        if work is not None:
            run_collective(f"{what} of bucket {key} (intra-node)", work.wait, step=step, group=self.group)


def received_flag(flight) -> torch.Tensor:
    """uint8 ``[1]`` on the bucket's device: whether any rank's non-finite flag rode on this bucket's all_to_all.

    Call after :meth:`VoteExchange.reduce` (which waited for the all_to_all). No host synchronisation: the byte
    travels on in the intra-node all_gather, so that every rank of every node learns it.
    """
    if flight.flag is not None:  # a group of one: the flag itself
        return (flight.flag.reshape(1) != 0).to(torch.uint8)
    return flight.recv[:, flight.shard].amax().reshape(1)
