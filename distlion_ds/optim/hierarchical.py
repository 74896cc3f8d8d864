"""Hierarchical D-Lion: fp32 reduce-scatter inside a node, momentum sharded across the node's ranks, 1-bit votes
only across nodes (issue 12). :class:`~distlion_ds.optim.DistributedLion` dispatches here when it is built with
``intra_node_size=L > 1`` or ``node_groups=[...]``; the flat path does not run this code.

With ``N = L * M`` data-parallel ranks in ``M`` nodes of ``L`` ranks (:class:`~distlion_ds.comm.node_exchange.
NodeTopology`: consecutive group ranks by default), per bucket, local rank ``i`` of node ``n``:

1. writes its gradients into the bucket layout in fp32 (the flat layout: parameters 8-aligned, the bucket padded to
   a multiple of ``8*N``, so shard ``i`` = elements ``[i*S, (i+1)*S)`` with ``S = numel/L`` a multiple of ``8*M``)
   and exchanges them inside the node with one ``all_to_all_single``; it then sums the L chunks of shard ``i`` in
   local-rank order and divides by L, in fp32: ``g = (((g_0 + g_1) + g_2) + ... + g_{L-1}) / L``
   (:func:`~distlion_ds.comm.node_exchange.ordered_node_mean`; the same bits on every backend);
2. votes on shard ``i`` with its momentum of shard ``i`` only (DESIGN 3.1 with ``g`` = the node's mean gradient;
   the zero rule's ``j`` is the index inside the parameter: every shard boundary is a multiple of 8 elements from
   the parameter's start, so the parity is the flat one);
3. exchanges the packed votes of shard ``i`` with local rank ``i`` of the other nodes (the flat
   :class:`~distlion_ds.comm.VoteExchange` over the inter-node group of size M: MaVo or Avg over M voters);
4. all-gathers the packed aggregate of every shard inside the node (``nbits * S/8`` bytes plus one flag byte), and
   applies the update to its full parameters; the momentum update ``m <- b2*m + (1-b2)*g`` runs on shard ``i``
   only. Every rank applies the same aggregate to the same parameters: replicas stay bit-identical on all N ranks.

A node is one voter with the exact mean gradient of its ranks. With L = 1 each rank is a node with its own
gradient, and the result is flat D-Lion bit for bit (tested).

Skip agreement. A non-finite gradient on one rank makes its node's mean non-finite (NaN and Inf survive the sum) in
some shard; the local rank holding that shard raises its flag while voting; the flag rides on the inter-node
all_to_all (so every node's rank ``i`` learns it) and then on the intra-node all_gather (so every rank of every
node learns every shard's flag). The decision is read from the last bucket, before anything is modified: every
one of the N ranks skips. (An fp32 sum that overflows to Inf is non-finite too, and skipped, where flat D-Lion would
have voted on each rank's finite gradient.)

Memory per rank: momentum ``4 * numel / L`` bytes (the rank's shard of every bucket) and the node-mean gradient of
the shard (``4 * numel / L``, rewritten every step); two fp32 scratch buffers of the largest bucket per device
(``8 * bucket_numel`` bytes, reused by every bucket: the intra-node gradient exchange of a bucket completes before
the next bucket is written), against ``4 * numel`` of momentum for flat D-Lion.

Wire per rank per step: inter-node ``(1 + b)(M-1)/M / L`` bits per parameter (b = 1 for MaVo, ceil(log2(M+1)) for
Avg), intra-node ``32 (L-1)/L + b (L-1)/L`` bits per parameter (fp32 gradient chunks out, aggregate bits in).

Checkpoints. ``state_dict()`` holds the rank's shard of the momentum (``exp_avg`` of a parameter is the 1-D slice
of it that lies in the shard; parameters outside the shard have no state) and a ``"hierarchical"`` record of the
layout (L, M, the node lists, this rank's local rank, the slice of every parameter). Policy at load: the layout
must be the same (same L, same M, same local rank, same slices); anything else is refused with a ``ValueError``
naming both layouts, because a shard's momentum is the EMA of a node mean that no other layout has. A flat
checkpoint loaded into a hierarchical optimizer, and the reverse, are refused the same way. A checkpoint of another
local rank of the same layout loads the step counters only, and the optimizer refuses to step until this rank's own
state is loaded (DeepSpeed loads DP rank 0's optimizer state into every rank, then the checkpoint hook of
:mod:`distlion_ds.deepspeed.checkpoint` loads each rank's own file; a rank left with another's shard would otherwise
vote with a momentum that is not its own). Re-bucketing within a
run (``add_param_group``) keeps the momentum of every element that stays in this rank's shard and starts the
others from zero (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from distlion_ds.comm import VoteExchange, host_flag
from distlion_ds.comm.node_exchange import IntraNodeExchange, NodeTopology, ordered_node_mean, received_flag
from distlion_ds.kernels.lion import aggregate_bits, lion_apply_multi, lion_votes

logger = logging.getLogger(__name__)

STATE_KEY = "hierarchical"


@dataclass
class _Piece:
    """A contiguous slice ``[lo, hi)`` of a parameter's flat elements; ``inside`` when it lies in this rank's shard."""

    lo: int
    hi: int
    inside: bool


@dataclass
class _HBucket:
    device: torch.device
    params: list[tuple[torch.Tensor, dict, int]] = field(default_factory=list)  # (param, group, elem offset)
    numel: int = 0
    shard_lo: int = 0  # this rank's shard: bucket elements [shard_lo, shard_lo + shard)
    shard: int = 0
    pieces: list[list[_Piece]] = field(default_factory=list)  # per parameter
    gaps: list[tuple[int, int]] = field(default_factory=list)  # bucket elements no parameter covers
    segments: list[tuple[dict, int, int]] = field(default_factory=list)  # (group, lo, hi) vote launches, shard coords
    exp_avg: torch.Tensor | None = None  # fp32 [shard]
    grad: torch.Tensor | None = None  # fp32 [shard], the node's mean gradient of the shard
    votes: torch.Tensor | None = None  # uint8 [shard/8]
    payload: torch.Tensor | None = None  # uint8 [nbits*shard/8 + 1]: the shard's aggregate and the skip flag
    gathered: torch.Tensor | None = None  # uint8 [L, nbits*shard/8 + 1]


class HierarchicalEngine:
    """The hierarchical step, layout and state of one :class:`DistributedLion` (which owns the parameters).

    Args:
        opt: the optimizer (its ``param_groups``, ``state``, hyper-parameters and agreement checks are used).
        process_group: the data-parallel group.
        intra_node_size: L (nodes of consecutive group ranks), when ``node_groups`` is None.
        node_groups: explicit nodes, lists of ranks of ``process_group``.
    """

    def __init__(self, opt, process_group, intra_node_size: int, node_groups: list[list[int]] | None):
        self.opt = opt
        self.topology = NodeTopology(process_group, intra_node_size, node_groups)
        self.L = self.topology.intra_size
        self.M = self.topology.num_nodes
        self.exchange = VoteExchange(self.topology.inter_group, opt.aggregation)
        self.intra = IntraNodeExchange(self.topology)
        self.nbits = aggregate_bits(opt.aggregation, self.M)
        self._scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranges: dict[torch.Tensor, tuple[int, int]] = {}  # param -> slice of it whose momentum this rank has
        self.pending: str | None = None  # why this rank may not step (another rank's shard was loaded)

    # ------------------------------------------------------------------------------------------ layout
    def _plan(self) -> list[_HBucket]:
        """Buckets as flat D-Lion makes them (same grouping, 8-aligned offsets), padded to ``8*L*M``."""
        buckets: list[_HBucket] = self.opt.plan_buckets(_HBucket)
        unit = 8 * self.L * self.M
        local = self.topology.local_rank
        for b in buckets:
            used = b.numel
            b.numel = -(-b.numel // unit) * unit
            b.shard = b.numel // self.L
            b.shard_lo = local * b.shard
            lo, hi = b.shard_lo, b.shard_lo + b.shard
            end = 0
            for p, group, off in b.params:
                n = p.numel()
                if off > end:
                    b.gaps.append((end, off))
                end = off + n
                a, e = max(off, lo) - off, min(off + n, hi) - off
                pieces = []
                if a < e:
                    if a > 0:
                        pieces.append(_Piece(0, a, False))
                    pieces.append(_Piece(a, e, True))
                    if e < n:
                        pieces.append(_Piece(e, n, False))
                    s_lo, s_hi = off + a - lo, off + e - lo
                    last = b.segments[-1] if b.segments else None
                    if last is not None and last[0] is group:  # one launch across the 8-alignment gap (zeros)
                        b.segments[-1] = (group, last[1], s_hi)
                    else:
                        b.segments.append((group, s_lo, s_hi))
                else:
                    pieces.append(_Piece(0, n, False))
                b.pieces.append(pieces)
            if b.numel > end:
                b.gaps.append((end, b.numel))
            assert end <= used <= b.numel
        return buckets

    def ranges(self, buckets: list[_HBucket] | None = None) -> dict[torch.Tensor, tuple[int, int]]:
        """Per parameter with momentum on this rank, the slice ``(lo, hi)`` of its flat elements in the shard."""
        out = {}
        for b in buckets if buckets is not None else self._plan():
            for (p, _, _), pieces in zip(b.params, b.pieces, strict=True):
                for piece in pieces:
                    if piece.inside:
                        out[p] = (piece.lo, piece.hi)
        return out

    def build_buckets(self) -> list[_HBucket]:
        opt = self.opt
        old = {p: (self._ranges.get(p), opt.state[p]["exp_avg"].detach().reshape(-1).clone())
               for p in opt.state if "exp_avg" in opt.state[p]}
        buckets = self._plan()
        self.exchange.release_buffers()
        reset = 0
        sizes: dict[torch.device, int] = {}
        for b in buckets:
            dev, sb = b.device, b.shard // 8
            b.exp_avg = torch.zeros(b.shard, dtype=torch.float32, device=dev)  # gaps stay 0: never written
            b.grad = torch.zeros(b.shard, dtype=torch.float32, device=dev)
            b.votes = torch.zeros(sb, dtype=torch.uint8, device=dev)
            b.payload = torch.zeros(self.nbits * sb + 1, dtype=torch.uint8, device=dev)
            b.gathered = torch.zeros(self.L, self.nbits * sb + 1, dtype=torch.uint8, device=dev)
            sizes[dev] = max(sizes.get(dev, 0), b.numel)
            for (p, _, off), pieces in zip(b.params, b.pieces, strict=True):
                opt.state[p].pop("exp_avg", None)
                for piece in pieces:
                    if not piece.inside:
                        continue
                    s = off + piece.lo - b.shard_lo
                    view = b.exp_avg[s: s + piece.hi - piece.lo]
                    reset += view.numel()
                    if p in old and old[p][0] is not None:
                        (o_lo, o_hi), m = old[p]
                        a, e = max(o_lo, piece.lo), min(o_hi, piece.hi)
                        if a < e:
                            view[a - piece.lo: e - piece.lo].copy_(m[a - o_lo: e - o_lo])
                            reset -= e - a
                    opt.state[p]["exp_avg"] = view
            for p, _, _ in b.params:
                if not opt.state[p]:
                    del opt.state[p]
        if old and reset:
            logger.warning("DistributedLion (hierarchical): the parameter layout changed; the momentum of %d "
                           "element(s) new to this rank's shard starts from zero", reset)
        self._ranges = self.ranges(buckets)
        self._scratch = {dev: (torch.zeros(n, dtype=torch.float32, device=dev),
                               torch.zeros(n, dtype=torch.float32, device=dev)) for dev, n in sizes.items()}
        opt._flags = {b.device: torch.zeros(1, dtype=torch.int32, device=b.device) for b in buckets}
        return buckets

    # ------------------------------------------------------------------------------------------ step
    def step(self, t: int) -> bool:
        """One hierarchical D-Lion step; False when it was skipped (a non-finite gradient on any of the N ranks)."""
        opt = self.opt
        if self.pending is not None:  # on every rank: the agreement check before this step compared it
            raise RuntimeError(self.pending)
        buckets: list[_HBucket] = opt._buckets
        flags = opt._flags
        for f in flags.values():
            f.zero_()
        beta1_of = {id(g): g["betas"][0] for g in opt.param_groups}

        # 1-3. per bucket: node mean of the shard (synchronous: the scratch is shared), votes, inter-node start.
        flights = []
        last_device = buckets[-1].device
        for k, b in enumerate(buckets):
            send_all, recv_all = self._scratch[b.device]
            send, recv = send_all[: b.numel], recv_all[: b.numel].view(self.L, b.shard)
            for p, _, off in b.params:
                dst = send[off: off + p.numel()]
                if p.grad is None:
                    dst.zero_()
                else:
                    dst.view(p.shape).copy_(p.grad)
            for a, e in b.gaps:
                send[a:e].zero_()
            work = self.intra.scatter_gradients(send, recv, t, k)
            self.intra.wait(work, "all_to_all_single of the fp32 gradients", t, k)
            ordered_node_mean(recv, b.grad)
            flag = flags[b.device]
            for group, lo, hi in b.segments:
                lion_votes(b.grad[lo:hi], b.exp_avg[lo:hi], beta1_of[id(group)], t,
                           out=b.votes[lo // 8: -(-hi // 8)], nonfinite=flag)
            if k == len(buckets) - 1 and len(flags) > 1:
                for dev, f in flags.items():  # the last bucket carries every device's flag
                    if dev != last_device:
                        flag = torch.maximum(flag, f.to(last_device))
            flights.append(self.exchange.start(b.votes, flag, t, key=k))

        # 4a. inter-node counts and all_gathers, then the intra-node all_gather of each shard's aggregate + flag.
        for flight in flights:
            self.exchange.reduce(flight)
        gathers = []
        for k, (b, flight) in enumerate(zip(buckets, flights, strict=True)):
            agg = self.exchange.finish(flight)
            b.payload[:-1].view(self.nbits, b.shard // 8).copy_(agg)
            b.payload[-1:].copy_(received_flag(flight))
            gathers.append(self.intra.gather_bits(b.payload, b.gathered, t, k))

        # The skip decision: every shard's flag of the last bucket, on every rank of every node (one host sync).
        last = len(buckets) - 1
        self.intra.wait(gathers[last], "all_gather of the aggregate", t, last)
        gathers[last] = None
        if host_flag(buckets[last].gathered[:, -1]):
            for k, work in enumerate(gathers):
                self.intra.wait(work, "all_gather of the aggregate", t, k)
            return False

        # 4b. apply: full parameters from the full aggregate; momentum of the shard's slices only.
        step_seed = opt.step_rounding_seed(t)
        for k, b in enumerate(buckets):
            self.intra.wait(gathers[k], "all_gather of the aggregate", t, k)
            sb = b.shard // 8
            # [L, nbits, S/8] -> [nbits, L*S/8]: each bit-plane in bucket order.
            agg = b.gathered[:, :-1].reshape(self.L, self.nbits, sb).transpose(0, 1).reshape(self.nbits, self.L * sb)
            throwaway = self._scratch[b.device][0][: b.numel]  # free now; momentum of slices outside the shard
            calls: dict[tuple, tuple] = {}  # one multi-tensor apply per (group, seed, inside the shard or not)
            copies = []  # (parameter, its flat copy): non-contiguous parameters, written back after the apply
            for (p, group, off), pieces in zip(b.params, b.pieces, strict=True):
                data = p.detach()
                flat = data.view(-1) if data.is_contiguous() else data.reshape(-1)
                if flat.data_ptr() != data.data_ptr():
                    copies.append((data, flat))
                seed = step_seed if p.dtype == torch.bfloat16 else None
                for piece in pieces:
                    lo, hi = piece.lo, piece.hi
                    entry = calls.setdefault((id(group), seed, piece.inside), (group, seed, piece.inside, []))
                    if piece.inside:  # offsets in shard coordinates (momentum, gradient, aggregate shifted)
                        s = off + lo - b.shard_lo
                        entry[3].append((flat[lo:hi], b.grad[s: s + hi - lo], s))
                    else:
                        entry[3].append((flat[lo:hi], None, off + lo))
            shard_agg = agg[:, b.shard_lo // 8:]
            for group, seed, inside, items in calls.values():
                lion_apply_multi([x for x, _, _ in items], [g for _, g, _ in items], [o for _, _, o in items],
                                 b.exp_avg if inside else throwaway, shard_agg if inside else agg, self.M,
                                 group["lr"], group["weight_decay"], group["betas"][1], opt.aggregation,
                                 rounding_seed=seed, elem_offset_base=b.shard_lo if inside else 0)
            for data, flat in copies:
                data.copy_(flat.view_as(data))
        return True

    # ------------------------------------------------------------------------------------------ stats and state
    def comm_stats(self) -> dict:
        inter, intra = self.exchange, self.intra
        return {
            "bytes_sent": inter.bytes_sent + intra.bytes_sent,
            "bytes_received": inter.bytes_received + intra.bytes_received,
            "inter_node_bytes_sent": inter.bytes_sent,
            "intra_node_bytes_sent": intra.bytes_sent,
            "intra_node_size": self.L,
            "num_nodes": self.M,
        }

    def layout_record(self) -> dict:
        index = {id(p): i for i, p in enumerate(q for g in self.opt.param_groups for q in g["params"])}
        return {
            "intra_node_size": self.L,
            "num_nodes": self.M,
            "nodes": self.topology.nodes,
            "local_rank": self.topology.local_rank,
            "ranges": sorted((index[id(p)], lo, hi) for p, (lo, hi) in self.ranges().items()),
        }

    def check_loaded(self, state_dict: dict) -> bool:
        """Refuse a checkpoint of another layout (the policy is in the module docstring); adopt its slices.

        Returns:
            True: the momentum is this rank's and is loaded. False: the checkpoint is another local rank's shard
            of the same layout (DeepSpeed loads DP rank 0's optimizer state into every rank before our checkpoint
            hook loads each rank's own file): its momentum is not loaded and the optimizer refuses to step until
            this rank's own state is loaded (every rank learns it in the agreement check before the next step).
        """
        mine = self.layout_record()
        theirs = state_dict.get(STATE_KEY)

        def show(r: dict) -> str:
            return (f"intra_node_size={r['intra_node_size']} x {r['num_nodes']} node(s), local rank "
                    f"{r['local_rank']}")

        if theirs is None:
            raise ValueError(
                "DistributedLion: this checkpoint was saved by flat D-Lion (intra_node_size=1: full momentum per "
                f"rank), and this optimizer is hierarchical ({show(mine)}); hierarchical momentum is the EMA of "
                "a node's mean gradient and cannot be made from it. Resume with the layout it was saved with")
        same_layout = all(theirs.get(k) == mine[k] for k in ("intra_node_size", "num_nodes", "nodes"))
        if same_layout and theirs.get("local_rank") != mine["local_rank"]:
            self.pending = (
                f"DistributedLion: the state loaded on this rank is the momentum shard of local rank "
                f"{theirs.get('local_rank')}, and this rank is local rank {mine['local_rank']} ({show(mine)}); load "
                "this rank's own optimizer state before stepping")
            logger.info("DistributedLion (hierarchical): loaded the step counters of another rank's state; waiting "
                        "for this rank's own momentum shard")
            return False
        same = same_layout and theirs.get("local_rank") == mine["local_rank"] \
            and [tuple(r) for r in theirs.get("ranges", [])] == [tuple(r) for r in mine["ranges"]]
        if not same:
            raise ValueError(
                f"DistributedLion: this checkpoint holds the momentum shard of layout {show(theirs)}, and this "
                f"optimizer has layout {show(mine)} (or other parameter slices); a shard's momentum cannot be moved "
                "to another layout. Resume with the same intra_node_size, number of nodes and rank order")
        params = [q for g in self.opt.param_groups for q in g["params"]]
        self._ranges = {params[i]: (lo, hi) for i, lo, hi in mine["ranges"]}
        self.pending = None
        return True

    def settings(self) -> dict[str, object]:
        """Agreement-fingerprint entries (see ``DistributedLion._settings``)."""
        return {"node groups": self.topology.nodes,
                "momentum shard loaded is this rank's own (not another rank's)": self.pending is None}
