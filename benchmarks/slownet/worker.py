"""One rank of a slow-network scenario; started by run.py inside a host's network namespace.

Usage (run.py does this):  ip netns exec NS python -m benchmarks.slownet.worker SPEC.json RANK OUT.json

SPEC holds the scenario and its parameters, the rendezvous address (host 0's namespace address) and port. The rank
writes one JSON file of raw per-step records; run.py aggregates across ranks (max over ranks per step, then the
median over steps).

Timing rules (all clocks are ``time.perf_counter``, i.e. CLOCK_MONOTONIC, shared by every namespace on the machine):
- ``comm`` = wall time inside torch.distributed collectives / p2p calls (wrapped below, before distlion_ds is
  imported, so the optimizer's own all_to_all / all_gather are timed too); barriers are not counted.
- ``wire`` = bytes the host's veth sent and received during the phase (/proc/net/dev: IP+TCP headers included).
- Data parallel: an untimed barrier separates forward/backward from the optimizer phase, so the optimizer's
  collectives do not absorb compute skew from 4 ranks sharing 2 cores.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------- instrumentation


class CommTimer:
    """Accumulates wall time spent inside the wrapped torch.distributed functions."""

    NAMES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "all_gather_single", "all_gather",
             "reduce_scatter_tensor", "broadcast", "send", "recv")

    def __init__(self):
        self.total = 0.0
        self.calls = 0
        self.by_op: dict[str, float] = {}

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0
        self.by_op = {}

    def install(self) -> None:
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "_slownet_timed", False):
                setattr(dist, name, self._wrap(fn))

    def add(self, name: str, dt: float) -> None:
        self.total += dt
        self.calls += 1
        self.by_op[name] = self.by_op.get(name, 0.0) + dt

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.add(fn.__name__, time.perf_counter() - t0)
            # An asynchronous collective returns at once: its cost is the time its wait() blocks the caller.
            return _TimedWork(out, self, fn.__name__) if kwargs.get("async_op") and out is not None else out

        timed._slownet_timed = True
        return timed


class _TimedWork:
    """A torch.distributed Work whose ``wait()`` is timed into the timer (async collectives)."""

    def __init__(self, work, timer: CommTimer, name: str):
        self._work, self._timer, self._name = work, timer, name

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.add(self._name, time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._work, name)


TIMER = CommTimer()
TIMER.install()
_barrier = dist.barrier


def netdev(dev: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of ``dev`` in this network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == dev:
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError(f"no device {dev!r} in /proc/net/dev")


def _agree(value: float, src: int = 0, group=None) -> float:
    """Rank ``src``'s value on every rank (untimed)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=src, group=group)
    return float(t.item())


def _n_steps(p: dict, estimate_s: float) -> int:
    """Timed steps within the method's time budget (rank 0 decides, every rank follows)."""
    n = p["steps"] if estimate_s <= 0 else int(p["budget_s"] / estimate_s)
    return int(_agree(max(p["min_steps"], min(p["steps"], n))))


# ---------------------------------------------------------------------------------------------- data parallel
def _fp32_allreduce(params, world: int, adamw: torch.optim.Optimizer):
    """DeepSpeed's default DP path (ZeRO-0, fp32): flatten the gradients into one bucket (reduce_bucket_size is
    5e8 elements, larger than these models), all-reduce it, divide by N, copy back, then the optimizer step."""
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)
    adamw.step()


def _isolated_exchange(method: str, opt, n_params: int, repeats: int) -> list[dict]:
    """The optimizer's collectives alone, after a barrier and with no computation on any rank: what the network
    and gloo cost, without the skew of 4 ranks computing on 2 cores. fp32: one all-reduce of all gradients;
    D-Lion: the vote exchange of every bucket (all_to_all + vote count + all_gather; only the collectives timed);
    hierarchical D-Lion: per bucket the intra-node fp32 all_to_all, the inter-node vote exchange and the intra-node
    all_gather of the aggregate, one after the other (the step overlaps the inter-node exchanges of the buckets)."""
    out = []
    flat = torch.zeros(n_params) if opt is None else None
    flag = torch.zeros(1, dtype=torch.int32)
    hier = getattr(opt, "_hier", None)
    for _ in range(repeats):
        _barrier()
        TIMER.reset()
        t0 = time.perf_counter()
        if opt is None:
            dist.all_reduce(flat)
        elif hier is None:
            for b in opt._buckets:
                opt.exchange.exchange(b.votes, flag, 1)
        else:
            for k, b in enumerate(opt._buckets):
                send, recv = (x[: b.numel] for x in hier._scratch[b.device])
                hier.intra.wait(hier.intra.scatter_gradients(send, recv.view(hier.L, b.shard), 1, k), "iso", 1, k)
                hier.exchange.exchange(b.votes, flag, 1)
                hier.intra.wait(hier.intra.gather_bits(b.payload, b.gathered, 1, k), "iso", 1, k)
        out.append(dict(wall_s=time.perf_counter() - t0, comm_s=TIMER.total, by_op=dict(TIMER.by_op)))
    return out


def _host_nodes(spec: dict) -> list[list[int]]:
    """The ranks of each host, in host order (run.py places rank r on host ``rank_hosts[r]``)."""
    hosts = spec.get("rank_hosts") or list(range(spec["world"]))
    return [[r for r, h in enumerate(hosts) if h == host] for host in sorted(set(hosts))]


def _dlion(method: str, params, p: dict, spec: dict):
    """``dlion_<mavo|avg>[_bucketK]`` (flat: every rank a voter) or ``dlion_hier[_<mavo|avg>][_bucketK]``
    (hierarchical, ``intra_node_size`` = the spec's ``intra_node_size``; nodes = consecutive ranks, checked to be
    the ranks of one host). ``_bucketK`` sets bucket_numel = 2**K (default 2**25)."""
    from distlion_ds import DistributedLion

    name, _, bucket = method.partition("_bucket")
    agg = name.removeprefix("dlion_")
    kw = {"bucket_numel": 1 << int(bucket)} if bucket else {}
    if agg.startswith("hier"):
        agg = agg.removeprefix("hier").removeprefix("_") or "mavo"
        if not p.get("intra_node_size"):
            raise ValueError(f"{method}: the spec's params have no intra_node_size (run it in the 'hier' scenario)")
        kw["intra_node_size"] = int(p["intra_node_size"])
    opt = DistributedLion(params, lr=1e-4, aggregation=agg, **kw)
    hier = getattr(opt, "_hier", None)
    if hier is not None and hier.topology.nodes != _host_nodes(spec):
        raise RuntimeError(f"{method}: the optimizer's nodes {hier.topology.nodes} are not the hosts' ranks "
                           f"{_host_nodes(spec)} (rank_hosts {spec.get('rank_hosts')}): intra-node traffic would "
                           "cross the shaped link; place consecutive ranks on one host")
    return opt


def run_dp(spec: dict, rank: int, world: int, dev: str) -> list[dict]:
    from .models import MODELS, GPTStage, token_batch

    p = spec["params"]
    out = []
    for model_name in p["models"]:
        cfg = MODELS[model_name]
        torch.manual_seed(0)
        model = GPTStage(cfg)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        n_params = sum(q.numel() for q in params)
        x, y = token_batch(cfg, p["batch"], seed=1000 + rank)
        for method in p["methods"]:
            model.load_state_dict(init)
            if method == "fp32_allreduce":
                adamw = torch.optim.AdamW(params, lr=1e-4)
                opt_step = functools.partial(_fp32_allreduce, params, world, adamw)
                ring = 2 * (world - 1) / world * 4 * n_params  # ring all-reduce: bytes each rank sends
                payload = lambda ring=ring: ring  # noqa: E731
            else:
                opt = _dlion(method, params, p, spec)
                opt_step = opt.step
                payload = lambda opt=opt: opt.comm_stats()["bytes_sent"]  # noqa: E731  cumulative
            records: list[dict] = []
            total = p["warmup"] + p["steps"]
            i = 0
            while i < total:
                _barrier()
                t0 = time.perf_counter()
                loss = model(x, y)
                loss.backward()
                t1 = time.perf_counter()
                _barrier()
                rx0, tx0 = netdev(dev)
                before = payload()
                split0 = _node_bytes(opt) if method != "fp32_allreduce" else None
                TIMER.reset()
                t2 = time.perf_counter()
                opt_step()
                t3 = time.perf_counter()
                rx1, tx1 = netdev(dev)
                sent = payload() - before if method != "fp32_allreduce" else payload()
                split = None if split0 is None else [b - a for a, b in zip(split0, _node_bytes(opt), strict=True)]
                records.append(dict(warmup=i < p["warmup"], compute_s=t1 - t0, opt_s=t3 - t2, comm_s=TIMER.total,
                                    comm_calls=TIMER.calls, comm_by_op=dict(TIMER.by_op), payload_bytes=sent,
                                    inter_node_bytes=None if split is None else split[0],
                                    intra_node_bytes=None if split is None else split[1],
                                    wire_tx=tx1 - tx0, wire_rx=rx1 - rx0, loss=loss.item()))
                for q in params:
                    q.grad = None
                i += 1
                if i == p["warmup"]:
                    total = p["warmup"] + _n_steps(p, t3 - t0)
            # 3 isolated repeats, 1 when the exchange takes > 5 s (fp32 at 100 Mbit/s: ~28 s each)
            comm_est = statistics.median(r["comm_s"] for r in records[p["warmup"]:])
            repeats = int(_agree(p["isolated_repeats"] if comm_est < 5 else 1))
            isolated = _isolated_exchange(method, opt if method != "fp32_allreduce" else None, n_params, repeats)
            res = dict(model=model_name, method=method, n_params=n_params, records=records, isolated=isolated)
            if method != "fp32_allreduce":
                cs = opt.comm_stats()
                res.update({k: cs[k] for k in ("aggregation", "intra_node_size", "num_nodes")})
            out.append(res)
            del opt_step
    return out


def _node_bytes(opt) -> tuple[int, int]:
    """Cumulative (inter-node, intra-node) payload bytes this rank sent (flat D-Lion: all inter-node)."""
    cs = opt.comm_stats()
    return cs["inter_node_bytes_sent"], cs["intra_node_bytes_sent"]


# ---------------------------------------------------------------------------------------------- pipeline
PP_METHODS = {
    "uncompressed": {},
    "topk10": {"activations": {"method": "topk", "ratio": 0.1}, "gradients": {"method": "topk", "ratio": 0.1}},
    "q4": {"activations": {"method": "quantize", "bits": 4, "block_size": 256},
           "gradients": {"method": "quantize", "bits": 4, "block_size": 256}},
    # AQ-SGD (arXiv 2206.01299): 4-bit deltas of per-sample activation buffers forward, 8-bit gradients backward
    # (the paper's fw4/bw8 setting); measured after the warm-up epoch, i.e. in the steady state.
    "aqsgd": {"activations": {"method": "quantize", "bits": 4, "block_size": 256, "feedback": "aqsgd"},
              "gradients": {"method": "quantize", "bits": 8, "block_size": 256},
              "aqsgd": {"warmup_epochs": 1, "store": "cpu"}},
}


def run_pp(spec: dict, rank: int, world: int, dev: str) -> list[dict]:
    from distlion_ds.compress import CompressionConfig, CompressionState, PipeCompressor

    from .models import MODELS, GPTStage, token_batch

    if world != 2:
        raise ValueError("the pipeline scenario runs pp=2 (2 hosts)")
    p = spec["params"]
    cfg = MODELS[p["model"]]
    half = cfg.n_layers // 2
    peer = 1 - rank
    torch.manual_seed(rank)
    stage = GPTStage(cfg, 0, half) if rank == 0 else GPTStage(cfg, half, cfg.n_layers)
    init = {k: v.clone() for k, v in stage.state_dict().items()}
    mb, n_micro = p["micro_batch"], p["n_micro"]
    data = [token_batch(cfg, mb, seed=m) for m in range(n_micro)]
    act_shape = (cfg.seq_len, mb, cfg.d_model)
    dtype = torch.float32
    out = []
    for method in p["methods"]:
        stage.load_state_dict(init)
        adamw = torch.optim.AdamW(stage.parameters(), lr=1e-4)
        state = CompressionState(CompressionConfig.from_json(PP_METHODS[method]))
        pc = PipeCompressor(state, sample_dim=1)
        timers = {"encode_s": 0.0, "decode_s": 0.0}

        def encode(direction, t, ids, timers=timers, pc=pc):
            t0 = time.perf_counter()
            f = pc.encode(direction, t, stage=0, chunk=0, mode=pc.mode(direction, True), sample_ids=ids)
            timers["encode_s"] += time.perf_counter() - t0
            return f

        def receive(direction, src, timers=timers, pc=pc):
            mode = pc.mode(direction, True)
            frame = torch.empty(pc.frame_nbytes(direction, act_shape, dtype, mode), dtype=torch.uint8)
            dist.recv(frame, src)
            t0 = time.perf_counter()
            t, _ = pc.decode(direction, frame, act_shape, dtype, mode)
            timers["decode_s"] += time.perf_counter() - t0
            return t

        records = []
        total, i = p["warmup"] + p["steps"], 0
        last_act = last_grad = None
        while i < total:
            state.set_epoch(i)  # one step = one epoch over the n_micro micro-batches (AQ-SGD warm-up: epoch 0)
            for k in timers:
                timers[k] = 0.0
            _barrier()
            rx0, tx0 = netdev(dev)
            TIMER.reset()
            t0 = time.perf_counter()
            kept = []
            for m, (x, y) in enumerate(data):  # GPipe: every forward, then every backward
                ids = list(range(m * mb, (m + 1) * mb))
                if rank == 0:
                    a = stage(x)
                    dist.send(encode("activations", a, ids), peer)
                    kept.append(a)
                    last_act = a.detach()
                else:
                    h = receive("activations", peer).detach().requires_grad_(True)
                    kept.append((h, stage(h, y) / n_micro))
            for m in reversed(range(n_micro)):
                if rank == 0:
                    kept[m].backward(receive("gradients", peer))
                else:
                    h, loss = kept[m]
                    loss.backward()
                    dist.send(encode("gradients", h.grad, None), peer)
                    last_grad = h.grad.detach()
            adamw.step()
            adamw.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            rx1, tx1 = netdev(dev)
            st = state.stats
            records.append(dict(warmup=i < p["warmup"], step_s=t1 - t0, p2p_s=TIMER.total, **dict(timers),
                                wire_tx=tx1 - tx0, wire_rx=rx1 - rx0, frames_sent=st["bytes_sent"]))
            st["bytes_sent"] = st["bytes_received"] = 0
            i += 1
            if i == p["warmup"]:
                total = p["warmup"] + _n_steps(p, t1 - t0)

        # Isolated stage-to-stage transfers of the last step's real tensors: encode -> send -> recv -> decode,
        # timed from the sender's first instruction to the receiver's decoded tensor (shared monotonic clock).
        transfers = []
        for direction, src in (("activations", 0), ("gradients", 1)):
            tensor = last_act if rank == 0 else last_grad
            for _ in range(p["transfer_repeats"]):
                for k in timers:
                    timers[k] = 0.0
                _barrier()
                rx0, tx0 = netdev(dev)
                t0 = time.perf_counter()
                if rank == src:
                    ids = list(range(mb)) if direction == "activations" else None
                    frame = encode(direction, tensor, ids)
                    dist.send(frame, peer)
                    rec = dict(start=t0, nbytes=frame.numel())
                else:
                    receive(direction, peer)
                    rec = dict(end=time.perf_counter())
                rx1, tx1 = netdev(dev)
                transfers.append(dict(direction=direction, role="send" if rank == src else "recv",
                                      wire_tx=tx1 - tx0, wire_rx=rx1 - rx0, **dict(timers), **rec))
        out.append(dict(method=method, act_shape=list(act_shape), dtype=str(dtype), records=records,
                        transfers=transfers))
    return out


# ---------------------------------------------------------------------------------------------- entry
SCENARIOS = {"dp": run_dp, "hier": run_dp, "pp": run_pp}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, rank, out_path = argv[0], int(argv[1]), argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    # The CPU implementation of the kernels is the torch reference; never benchmark the Triton interpreter.
    from distlion_ds.kernels import _dispatch

    _dispatch.INTERPRET = False
    torch.set_num_threads(spec.get("threads", 1))
    world = spec["world"]
    dev = spec["devs"][rank]
    t_start = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}:{spec['port']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=spec.get("collective_timeout_s", 900)))
    try:
        results = SCENARIOS[spec["scenario"]](spec, rank, world, dev)
        _barrier()
    finally:
        dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(dict(rank=rank, world=world, dev=dev, rank_hosts=spec.get("rank_hosts"),
                       wall_s=time.perf_counter() - t_start, torch=torch.__version__, results=results), f)
    return 0


if __name__ == "__main__":  # the result file is written: no interpreter finalization for gloo to abort in
    from distlion_ds.comm import exit_after_teardown  # imported late: see the collective wrapping above

    exit_after_teardown(main())
