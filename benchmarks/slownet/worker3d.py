"""One rank of the 3D scenario (tp2 x pp2 x dp2 = 8 ranks on 4 hosts); started by run.py.

Usage (run.py does this):  ip netns exec NS python -m benchmarks.slownet.worker3d SPEC.json RANK OUT.json

Placement: rank = 4*d + 2*s + t (data-parallel replica d, pipeline stage s, tensor-parallel rank t); host = 2*d + s.
The two TP ranks of a (d, s) share a host namespace, so their all-reduces run over loopback, unshaped (as NVLink
inside a node); the pipeline p2p (s=0 <-> s=1) and the data-parallel exchange (d=0 <-> d=1) cross the shaped links.
Each TP rank sends its own copy of the stage boundary activation, as Megatron does without sequence parallelism.

One step = GPipe forward/backward over the micro-batches (TP all-reduces + p2p frames), an untimed barrier, then
the optimizer with its DP exchange: fp32 all-reduce + AdamW, or DistributedLion on the DP group.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from . import worker
from .models import GPTConfig
from .worker import PP_METHODS, TIMER, _agree, _barrier, netdev

# 4 blocks (2 per stage), heads and MLP split over TP=2; ~21M parameters, ~7.4M per rank (embedding or head
# replicated over TP, as without a vocab-parallel embedding).
GPT3D = GPTConfig(vocab=8192, d_model=512, n_layers=4, n_heads=8, seq_len=64)

# method -> (DP optimizer, pipeline codec)
METHODS_3D = {
    "fp32+uncompressed": ("fp32_allreduce", "uncompressed"),
    "dlion_mavo+topk10": ("dlion_mavo", "topk10"),
}


def run_3d(spec: dict, rank: int, world: int, dev: str) -> list[dict]:
    from distlion_ds import DistributedLion
    from distlion_ds.compress import CompressionConfig, CompressionState, PipeCompressor

    from .models import MODELS, GPTStage, token_batch

    if world != 8:
        raise ValueError("the 3D scenario runs tp2 x pp2 x dp2 = 8 ranks")
    p = spec["params"]
    cfg = GPT3D if p["model"] == "gpt3d" else MODELS[p["model"]]
    d, s, t = rank // 4, (rank // 2) % 2, rank % 2
    # every rank creates every group, in the same order
    tp_groups = [dist.new_group([2 * h, 2 * h + 1]) for h in range(4)]
    dp_groups = {(s_, t_): dist.new_group([2 * s_ + t_, 4 + 2 * s_ + t_]) for s_ in range(2) for t_ in range(2)}
    tp_group, dp_group = tp_groups[2 * d + s], dp_groups[(s, t)]
    peer = 4 * d + 2 * (1 - s) + t
    half = cfg.n_layers // 2
    torch.manual_seed(s)  # same weights on every DP replica (and on both TP shards: fine for timing)
    stage = GPTStage(cfg, 0, half, tp_group) if s == 0 else GPTStage(cfg, half, cfg.n_layers, tp_group)
    init = {k: v.clone() for k, v in stage.state_dict().items()}
    params = list(stage.parameters())
    n_params = sum(q.numel() for q in params)
    mb, n_micro = p["micro_batch"], p["n_micro"]
    data = [token_batch(cfg, mb, seed=1000 * d + m) for m in range(n_micro)]
    act_shape = (cfg.seq_len, mb, cfg.d_model)
    out = []
    for method in p["methods"]:
        dp_method, pp_method = METHODS_3D[method]
        stage.load_state_dict(init)
        if dp_method == "fp32_allreduce":
            adamw = torch.optim.AdamW(params, lr=1e-4)

            def opt_step(adamw=adamw):
                grads = [q.grad for q in params]
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=dp_group)
                flat.div_(2)
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                    g.copy_(synced)
                adamw.step()
        else:
            opt = DistributedLion(params, lr=1e-4, aggregation="mavo", process_group=dp_group)
            opt_step = opt.step
        pc = PipeCompressor(CompressionState(CompressionConfig.from_json(PP_METHODS[pp_method])), sample_dim=1)
        codec = {"s": 0.0}

        def encode(direction, x, pc=pc, codec=codec):
            t0 = time.perf_counter()
            f = pc.encode(direction, x, stage=0, chunk=0, mode=pc.mode(direction, True))
            codec["s"] += time.perf_counter() - t0
            return f

        def receive(direction, pc=pc, codec=codec):
            mode = pc.mode(direction, True)
            frame = torch.empty(pc.frame_nbytes(direction, act_shape, torch.float32, mode), dtype=torch.uint8)
            dist.recv(frame, peer)
            t0 = time.perf_counter()
            x, _ = pc.decode(direction, frame, act_shape, torch.float32, mode)
            codec["s"] += time.perf_counter() - t0
            return x

        records = []
        total, i = p["warmup"] + p["steps"], 0
        while i < total:
            codec["s"] = 0.0
            _barrier()
            rx0, tx0 = netdev(dev)
            TIMER.reset()
            t0 = time.perf_counter()
            kept = []
            for x, y in data:
                if s == 0:
                    a = stage(x)
                    dist.send(encode("activations", a), peer)
                    kept.append(a)
                else:
                    h = receive("activations").detach().requires_grad_(True)
                    kept.append((h, stage(h, y) / n_micro))
            for m in reversed(range(n_micro)):
                if s == 0:
                    kept[m].backward(receive("gradients"))
                else:
                    h, loss = kept[m]
                    loss.backward()
                    dist.send(encode("gradients", h.grad), peer)
            t1 = time.perf_counter()
            pipe_ops = dict(TIMER.by_op)
            _barrier()
            TIMER.reset()
            t2 = time.perf_counter()
            opt_step()
            t3 = time.perf_counter()
            rx1, tx1 = netdev(dev)
            for q in params:
                q.grad = None
            records.append(dict(warmup=i < p["warmup"], pipe_s=t1 - t0, opt_s=t3 - t2,
                                p2p_s=pipe_ops.get("send", 0.0) + pipe_ops.get("recv", 0.0),
                                tp_s=pipe_ops.get("all_reduce", 0.0), codec_s=codec["s"], dp_comm_s=TIMER.total,
                                wire_tx=tx1 - tx0, wire_rx=rx1 - rx0))
            i += 1
            if i == p["warmup"]:
                est = (t1 - t0) + (t3 - t2)
                n = p["steps"] if est <= 0 else int(p["budget_s"] / est)
                total = p["warmup"] + int(_agree(max(p["min_steps"], min(p["steps"], n))))
        out.append(dict(method=method, n_params_rank=n_params, records=records))
    return out


if __name__ == "__main__":  # the result file is written: no interpreter finalization for gloo to abort in
    from distlion_ds.comm import exit_after_teardown  # imported late: see the collective wrapping above

    worker.SCENARIOS["3d"] = run_3d
    exit_after_teardown(worker.main())
