"""Slow-network benchmark: emulated hosts behind throttled links, D-Lion and p2p compression vs the baselines.

Usage (root; on a 2-core CPU machine the default run takes ~75 min):
    python -m benchmarks.slownet.run [--scenario dp,pp,3d,hier,megatron3d] [--bandwidth 10gbit,1gbit,100mbit]
                                     [--latency 0.1ms,5ms] [--models gpt10m,gpt50m] [--out runs/slownet]
    python -m benchmarks.slownet.run --scenario study [--study-methods adamw,dlion_mavo,...] [--study-steps 6]
                                     [--study-out benchmarks/slownet/results/study.json] [--out runs/slownet_study]

Scenarios (per network condition, every method of a scenario runs on the same link, so ratios compare like runs):
  dp          4 hosts, data parallel: fp32 gradient all-reduce + AdamW (DeepSpeed's ZeRO-0 path, written with
              torch) vs D-Lion MaVo vs D-Lion Avg on GPT models of ~10M and ~55M parameters (real forward/backward
              on one 64-token sequence per rank).
  pp          2 hosts, pipeline pp=2 (GPipe, a GPT split in two): uncompressed vs TopK-10 % vs 4-bit vs AQ-SGD
              frames (distlion_ds.compress.PipeCompressor) for activations and gradients over torch.distributed
              send/recv, plus isolated stage-to-stage transfers of the same tensors (15 each, median).
  3d          tp2 x pp2 x dp2 on 4 hosts (TP inside a host, PP and DP across links), hand-written Megatron-style
              TP: fp32 all-reduce + uncompressed p2p vs D-Lion MaVo + TopK-10 % p2p, with a phase breakdown.
  hier        2 hosts x 2 ranks (ranks of a host talk over the namespace's own local route, unshaped; hosts over
              the shaped link), data parallel on the dp models: fp32 all-reduce vs flat D-Lion MaVo (4 voters) vs
              hierarchical D-Lion (intra_node_size=2: fp32 reduce-scatter inside a host, 1-bit votes between the
              2 hosts), with the cross-link bytes per GPU against (1 + b)(M-1)/M / L bits per parameter (issue 12).
  megatron3d  the same placement running ``python -m distlion_ds.megatron.pretrain_gpt`` (megatron-core
              schedules, CompressedP2PCommunicator, DistributedLion), AdamW + uncompressed vs D-Lion + topk10_q8.
  study       not in the default list. 4 hosts x 1 rank, the loss-versus-bytes study's exact inner step
              (benchmarks/study: 6.5M-parameter GPT, bf16 autocast, 3 sequences per worker, the optimizer
              benchmarks.study.run.make_optimizer builds) for each of its 13 methods (--study-methods), one launch
              per condition: seconds per inner step (local methods: whole rounds, outer step amortised), compute
              s/step, payload and host-wire bytes per step. Conditions default to --bandwidth 1gbit,100mbit
              --latency 5ms; also writes --study-out (benchmarks/slownet/results/study.json), which
              benchmarks/study/report.py turns into wall-clock to a target loss. 10.1 min here (2 conditions).
Each host is a network namespace with a veth to a router namespace: tbf shapes both directions of every link,
a user-space NFQUEUE delay line adds one-way latency (this kernel has no netem; see netns.py and delay.py).
Every condition is calibrated (ping RTT, TCP goodput) and the numbers go into the tables.
Outputs under --out: results.json (raw and aggregated), results.md (tables), step_time_vs_bandwidth.png, logs.
Needs root, `ip`, `tc`, `iptables-legacy`; exits 2 with the reason otherwise. Tears everything down on exit,
Ctrl-C, SIGTERM or failure; each launch is bounded by --launch-timeout-s and the run by --max-minutes.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .netns import SlowNet, check_prerequisites, cleanup_stale, parse_latency, parse_rate, wait_all

logger = logging.getLogger("slownet")

DP_METHODS = ["fp32_allreduce", "dlion_mavo", "dlion_avg"]
HIER_METHODS = ["fp32_allreduce", "dlion_mavo", "dlion_hier"]
PP_METHODS = ["uncompressed", "topk10", "q4", "aqsgd"]
DEFAULT_CONDITIONS = ("10gbit,1gbit,100mbit", "0.1ms,5ms")  # --bandwidth, --latency when not given
STUDY_CONDITIONS = ("1gbit,100mbit", "5ms")  # the same for the study scenario (issue 13's two links)


def _worker_env(dev: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # never benchmark the interpreter
    env.update(GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _tcp_settings() -> str:
    keys = ("net.ipv4.tcp_congestion_control", "net.ipv4.tcp_slow_start_after_idle")
    out = subprocess.run(["sysctl", *keys], capture_output=True, text=True).stdout
    return ", ".join(line.strip() for line in out.splitlines())


def _host_bytes(net: SlowNet) -> list[int]:
    """Bytes sent by each host's veth so far (read from its namespace)."""
    out = []
    for i, h in enumerate(net.hosts):
        text = net.exec(i, ["cat", "/proc/net/dev"]).stdout
        line = next(x for x in text.splitlines() if x.split(":")[0].strip() == h.dev)
        out.append(int(line.split(":")[1].split()[8]))
    return out


TIED_Q8 = '{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}'
MEGATRON_METHODS = {
    # name -> pretrain_gpt arguments: megatron-core's DDP (fp32 gradient all-reduce) + its own AdamW with
    # uncompressed p2p, against D-Lion MaVo (votes from the DDP buckets, no DP all-reduce) with the repo's TopK-10 %
    # activations / 8-bit gradients config; then D-Lion with its bucket votes overlapped with the last micro-batch's
    # backward, and with the tied-embedding all-reduce compressed (8-bit + error feedback)
    "adam+uncompressed": ["--optimizer", "adam"],
    "dlion_mavo+topk10_q8": ["--optimizer", "distlion", "--aggregation", "mavo",
                             "--p2p-compression", "configs/compression/topk10_q8.json"],
    # overlap on vs off: clipping off in both (a clip coefficient needs every bucket's gradient, so clipping
    # keeps every vote in the step) and 8 DDP buckets of 2**20 elements instead of megatron-core's one
    "dlion_mavo+topk10_q8+noclip": ["--optimizer", "distlion", "--aggregation", "mavo", "--clip-grad", "0",
                                    "--ddp-bucket-size", str(1 << 20),
                                    "--p2p-compression", "configs/compression/topk10_q8.json"],
    "dlion_mavo+topk10_q8+noclip+overlap": ["--optimizer", "distlion", "--aggregation", "mavo", "--clip-grad", "0",
                                            "--ddp-bucket-size", str(1 << 20), "--overlap-grad-reduce",
                                            "--p2p-compression", "configs/compression/topk10_q8.json"],
    "dlion_mavo+topk10_q8+tied_q8": ["--optimizer", "distlion", "--aggregation", "mavo",
                                     "--p2p-compression", "configs/compression/topk10_q8.json",
                                     "--tied-embedding-compression", TIED_Q8],
    # Tied embeddings cost one fp32 all-reduce of the embedding gradient between the first and the last stage
    # per iteration (vocab x hidden / tp elements), which neither D-Lion nor p2p compression touches: the same
    # pair with untied embeddings shows what that all-reduce costs on a slow link.
    "adam+uncompressed+untied": ["--optimizer", "adam", "--untie-embeddings-and-output-weights"],
    "dlion_mavo+topk10_q8+untied": ["--optimizer", "distlion", "--aggregation", "mavo",
                                    "--p2p-compression", "configs/compression/topk10_q8.json",
                                    "--untie-embeddings-and-output-weights"],
}


def run_megatron3d(net: SlowNet, args, out_dir: Path, tag: str, port: int, timeout: float) -> list[dict]:
    """tp2 x pp2 x dp2 with ``python -m distlion_ds.megatron.pretrain_gpt`` (megatron-core's DDP, schedules and
    finalize_model_grads, our CompressedP2PCommunicator and DistributedLionOptimizer on the DDP buckets), torchrun's
    environment, 2 ranks per host.
    megatron-core orders ranks tp-cp-ep-dp-pp, so rank r sits on host r // 2: TP pairs share a host, the DP pairs
    (hosts 0-1, 2-3) and the PP pairs (hosts 0-2, 1-3) cross the shaped links."""
    rows = []
    methods = {m: a for m, a in MEGATRON_METHODS.items() if not args.mega_methods or m in args.mega_methods.split(",")}
    for k, (method, extra) in enumerate(methods.items()):
        run_dir = out_dir / f"{tag}_{method.replace('+', '_')}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "distlion_ds.megatron.pretrain_gpt",
               "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--num-layers", "4", "--hidden-size", str(args.mega_hidden), "--num-attention-heads", "8",
               "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
               "--train-iters", str(args.mega_iters), "--eval-iters", "0", "--log-interval", "1",
               "--data-path", "data_cache/stdlib", "--out", str(run_dir), *extra]
        before = _host_bytes(net)
        procs, logs = [], []
        for rank in range(8):
            h = rank // 2
            env = _worker_env(net.hosts[h].dev, dict(
                RANK=str(rank), LOCAL_RANK=str(rank % 2), WORLD_SIZE="8", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR=net.hosts[0].addr, MASTER_PORT=str(port + k)))
            logs.append(run_dir / f"rank{rank}.log")
            with open(logs[-1], "w") as log:
                procs.append(net.popen(h, cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = wait_all(procs, timeout, net)
        for p in procs:
            net.forget(p)
        if any(codes):
            bad = next(i for i, c in enumerate(codes) if c)
            tail = "".join(logs[bad].read_text().splitlines(keepends=True)[-25:])
            raise RuntimeError(f"{tag} {method}: rank exit codes {codes}; rank {bad}'s log:\n{tail}")
        sent = [b - a for a, b in zip(before, _host_bytes(net), strict=True)]
        summary = json.loads((run_dir / "summary.json").read_text())
        # the last rank logs the running mean "x s/iter" after each iteration; the first one (warm-up: buffers,
        # first-touch allocations) is left out of s/iter: (training-loop wall - first iteration) / (iters - 1)
        means = [float(line.rsplit("|", 1)[1].split()[0]) for line in logs[7].read_text().splitlines()
                 if "s/iter" in line and "iteration" in line]
        iters = summary["steps"]
        step_s = (summary["wall_s"] - means[0]) / (iters - 1) if iters > 1 else summary["wall_s"]
        wire = summary["wire"]
        p2p = [wire[f"p2p_{d}"] for d in ("activations", "gradients")]
        # bytes per iteration, summed over the 8 ranks (summary.json counts the whole invocation); host_tx is the
        # mean per host of what its veth sent during the invocation (start-up included), per iteration
        rows.append(dict(method=method, iters=iters, step_s=step_s, first_iter_s=means[0], params=summary["params"],
                         dp_bytes=((wire["dlion"] or {}).get("bytes_sent") or wire["dp_allreduce"] or 0) / iters,
                         p2p_bytes=None if p2p[0] is None else sum(x["bytes_sent"] for x in p2p) / iters,
                         emb_bytes=(wire["embedding_allreduce"] or 0) / iters,
                         host_tx_bytes=statistics.fmean(sent) / iters,
                         replicas_identical=summary["dp_replicas_identical"], final_loss=summary["losses"][-1],
                         early_buckets=(wire["dlion"] or {}).get("early_buckets")))
    for r in rows:  # against AdamW + uncompressed with the same embedding tying
        untied = r["method"].endswith("+untied")
        base = next(b for b in rows if b["method"].startswith("adam") and b["method"].endswith("+untied") == untied)
        r["step_speedup"] = base["step_s"] / r["step_s"]
        r["wire_ratio"] = base["host_tx_bytes"] / r["host_tx_bytes"]
    return rows


def launch(net: SlowNet, spec: dict, rank_hosts: list[int], out_dir: Path, tag: str, timeout: float) -> list[dict]:
    """Run one rank per entry of ``rank_hosts`` (the host index of each rank); return each rank's JSON."""
    spec = dict(spec, world=len(rank_hosts), master=net.hosts[rank_hosts[0]].addr,
                devs=[net.hosts[h].dev for h in rank_hosts], rank_hosts=rank_hosts)
    spec_path = out_dir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    procs, outs, logs = [], [], []
    for rank, h in enumerate(rank_hosts):
        outs.append(out_dir / f"{tag}.rank{rank}.json")
        logs.append(out_dir / f"{tag}.rank{rank}.log")
        outs[-1].unlink(missing_ok=True)
        with open(logs[-1], "w") as log:
            module = spec.get("module", "benchmarks.slownet.worker")
            procs.append(net.popen(h, [sys.executable, "-m", module, str(spec_path), str(rank),
                                       str(outs[-1])], env=_worker_env(net.hosts[h].dev),
                                   stdout=log, stderr=subprocess.STDOUT))
    codes = wait_all(procs, timeout, net)  # on an exception the processes stay registered: teardown kills them
    for p in procs:
        net.forget(p)
    if any(codes):
        bad = next(i for i, c in enumerate(codes) if c)
        tail = "".join(logs[bad].read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{tag}: rank exit codes {codes}; rank {bad}'s log ({logs[bad]}):\n{tail}")
    return [json.loads(p.read_text()) for p in outs]


# ---------------------------------------------------------------------------------------------- aggregation
def _timed(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["warmup"]]


def _per_step(per_rank: list[list[dict]], n: int, field, over=max) -> float:
    """Median over the ``n`` timed steps of ``over`` (max, sum, fmean) across ranks of one record field.

    ``field`` is a record key or a function of a record."""
    get = field if callable(field) else (lambda rec: rec[field])
    return statistics.median(over(get(pr[k]) for pr in per_rank) for k in range(n))


def _bits(aggregation: str, voters: int) -> int:
    """b of the bits-per-parameter formula: 1 for MaVo, ceil(log2(voters + 1)) for Avg (DESIGN 3.1)."""
    return 1 if aggregation == "mavo" else max(1, voters.bit_length())


def aggregate_dp(ranks: list[dict]) -> list[dict]:
    """Per (model, method): per timed step the max over ranks (the step ends when the slowest rank does),
    then the median over steps. Bytes are per rank per step (mean over ranks).

    Several ranks per host (the hier scenario): every rank reads its host's veth, so ``wire_tx_bytes`` is per host
    and ``wire_tx_per_gpu`` divides it by the host's ranks. D-Lion rows also carry the optimizer's own split
    (``inter_node_bytes`` / ``intra_node_bytes``, per rank) and ``formula_bytes``: (1 + b)(M-1)/M / L bits per
    parameter, the inter-node payload per rank issue 12 predicts."""
    rows = []
    for j, res in enumerate(ranks[0]["results"]):
        per_rank = [_timed(r["results"][j]["records"]) for r in ranks]
        n = min(len(x) for x in per_rank)

        med = functools.partial(_per_step, per_rank, n)
        steps = [max(pr[k]["compute_s"] for pr in per_rank) + max(pr[k]["opt_s"] for pr in per_rank)
                 for k in range(n)]
        iso = [r["results"][j]["isolated"] for r in ranks]
        iso_comm = statistics.median(max(x[k]["comm_s"] for x in iso) for k in range(len(iso[0])))
        ops = sorted({op for x in iso for rep in x for op in rep["by_op"]})
        iso_ops = {op: statistics.median(max(x[k]["by_op"].get(op, 0.0) for x in iso) for k in range(len(iso[0])))
                   for op in ops}
        rows.append(dict(model=res["model"], method=res["method"], n_params=res["n_params"], steps=n,
                         step_s=statistics.median(steps), compute_s=med("compute_s"), opt_s=med("opt_s"),
                         comm_s=med("comm_s"), iso_comm_s=iso_comm, iso_by_op=iso_ops,
                         payload_bytes=med("payload_bytes", statistics.fmean),
                         wire_tx_bytes=med("wire_tx", statistics.fmean),
                         wire_rx_bytes=med("wire_rx", statistics.fmean)))
        row = rows[-1]
        hosts = ranks[0].get("rank_hosts") or list(range(len(ranks)))
        row["ranks_per_host"] = len(hosts) // len(set(hosts))
        row["wire_tx_per_gpu"] = row["wire_tx_bytes"] / row["ranks_per_host"]
        if "intra_node_size" in res:
            L, M = res["intra_node_size"], res["num_nodes"]
            row.update(intra_node_size=L, num_nodes=M, inter_node_bytes=med("inter_node_bytes", statistics.fmean),
                       intra_node_bytes=med("intra_node_bytes", statistics.fmean),
                       formula_bytes=res["n_params"] * (1 + _bits(res["aggregation"], M)) * (M - 1) / M / L / 8)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["method"] == "fp32_allreduce")
        r["step_speedup"] = base["step_s"] / r["step_s"]
        r["opt_speedup"] = base["opt_s"] / r["opt_s"]
        r["comm_speedup"] = base["comm_s"] / r["comm_s"] if r["comm_s"] > 0 else float("nan")
        r["iso_comm_speedup"] = base["iso_comm_s"] / r["iso_comm_s"] if r["iso_comm_s"] > 0 else float("nan")
        r["wire_ratio"] = base["wire_tx_bytes"] / r["wire_tx_bytes"] if r["wire_tx_bytes"] else float("nan")
    return rows


def aggregate_pp(ranks: list[dict]) -> list[dict]:
    rows = []
    for j, res in enumerate(ranks[0]["results"]):
        per_rank = [_timed(r["results"][j]["records"]) for r in ranks]
        n = min(len(x) for x in per_rank)
        med = functools.partial(_per_step, per_rank, n)
        row = dict(method=res["method"], act_shape=res["act_shape"], steps=n, step_s=med("step_s"),
                   p2p_s=med("p2p_s"), codec_s=med(lambda rec: rec["encode_s"] + rec["decode_s"]),
                   frames_bytes=med("frames_sent", sum), wire_bytes=med("wire_tx", sum))
        for direction, src in (("activations", 0), ("gradients", 1)):
            sends = [t for t in ranks[src]["results"][j]["transfers"] if t["direction"] == direction]
            recvs = [t for t in ranks[1 - src]["results"][j]["transfers"] if t["direction"] == direction]
            key = direction[:3]
            row[f"{key}_transfer_s"] = statistics.median(r["end"] - s["start"] for s, r in zip(sends, recvs,
                                                                                             strict=True))
            row[f"{key}_encode_s"] = statistics.median(s["encode_s"] for s in sends)
            row[f"{key}_decode_s"] = statistics.median(r["decode_s"] for r in recvs)
            row[f"{key}_frame_bytes"] = sends[0]["nbytes"]
            row[f"{key}_wire_bytes"] = statistics.median(s["wire_tx"] for s in sends)
        rows.append(row)
    for r in rows:
        base = next(b for b in rows if b["method"] == "uncompressed")
        r["step_speedup"] = base["step_s"] / r["step_s"]
        for key in ("act", "gra"):
            r[f"{key}_speedup"] = base[f"{key}_transfer_s"] / r[f"{key}_transfer_s"]
    return rows


def aggregate_3d(ranks: list[dict]) -> list[dict]:
    """Per method: per step the slowest rank's pipeline phase plus the slowest rank's optimizer phase."""
    rows = []
    for j, res in enumerate(ranks[0]["results"]):
        per_rank = [_timed(r["results"][j]["records"]) for r in ranks]
        n = min(len(x) for x in per_rank)

        med = functools.partial(_per_step, per_rank, n)
        rows.append(dict(method=res["method"], steps=n,
                         step_s=statistics.median(max(pr[k]["pipe_s"] for pr in per_rank)
                                                  + max(pr[k]["opt_s"] for pr in per_rank) for k in range(n)),
                         pipe_s=med("pipe_s"), opt_s=med("opt_s"), p2p_s=med("p2p_s"),
                         tp_s=med("tp_s"), codec_s=med("codec_s"), dp_comm_s=med("dp_comm_s"),
                         wire_tx_bytes=med("wire_tx", statistics.fmean)))
    for r in rows:
        r["step_speedup"] = rows[0]["step_s"] / r["step_s"]
    return rows


def aggregate_study(ranks: list[dict]) -> list[dict]:
    """Per method: s/step = the slowest rank's wall of the timed window (barriers at both ends) / timed steps;
    compute s/step likewise (the slowest rank's forward+backward); bytes per step are the mean over ranks (hosts).

    adamw / lion all-reduce inside DDP, which nobody instruments: their payload is the ring model 2(N-1)/N * 4 bytes
    per parameter, as the study counts it. Local methods also get the median over rounds of the (slowest rank's)
    step that ends a round, outer step included, against the median of the other steps."""
    world = len(ranks)
    rows = []
    for j, res in enumerate(ranks[0]["results"]):
        per = [r["results"][j] for r in ranks]
        n = res["steps_timed"]
        modelled = res["payload_bytes"] is None
        payload = 2 * (world - 1) / world * 4 * res["n_params"] if modelled else \
            statistics.fmean(x["payload_bytes"] for x in per) / n
        row = dict(method=res["method"], H=res["H"], n_params=res["n_params"], warmup_steps=res["warmup_steps"],
                   steps_timed=n, s_per_step=max(x["wall_s"] for x in per) / n,
                   compute_s_per_step=max(x["compute_s"] for x in per) / n,
                   fwd_bwd_s_per_step=max(x["fwd_bwd_s"] for x in per) / n,
                   payload_bytes_per_step=payload, payload_source="ring model" if modelled else "measured",
                   host_tx_bytes_per_step=statistics.fmean(x["host_tx_bytes"] for x in per) / n)
        if res["kind"] not in ("adamw", "lion", "dlion_mavo", "dlion_avg"):
            slowest = [max(x["step_s"][k] for x in per) for k in range(n)]
            h = res["H"]
            row["round_end_step_s"] = statistics.median(slowest[h - 1::h])
            inner = [s for k, s in enumerate(slowest) if k % h != h - 1]
            row["inner_step_s"] = statistics.median(inner) if inner else None
        rows.append(row)
    base = next((r for r in rows if r["method"] == "adamw"), None)
    for r in rows:
        r["vs_adamw"] = r["s_per_step"] / base["s_per_step"] if base else None
    return rows


def _study_git_rev() -> str:
    from benchmarks.study.run import git_rev

    return git_rev("distlion_ds", "benchmarks/slownet/*.py", "benchmarks/study/*.py")


STUDY_ROW_KEYS = ("method", "H", "n_params", "s_per_step", "compute_s_per_step", "payload_bytes_per_step",
                  "payload_source", "host_tx_bytes_per_step", "steps_timed")


def write_study_json(path: Path, results: dict) -> None:
    """The compact file benchmarks/study/report.py reads: per measured condition its calibration and per method
    the seconds per inner step (written atomically after every condition, so a partial run leaves what it has)."""
    m = results["meta"]
    conditions = []
    for run in results["runs"]:
        if run["scenario"] != "study":
            continue
        bw, lat = run["bandwidth"], run["latency"]
        rows = [{k: r[k] for k in STUDY_ROW_KEYS} for r in results["study"]
                if (r["bandwidth"], r["latency"]) == (bw, lat)]
        conditions.append(dict(bandwidth=bw, latency=lat, calibration=run["calib"], wall_s=run["wall_s"],
                               loadavg_before=run["loadavg_before"], loadavg_after=run["loadavg_after"], rows=rows))
    doc = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": dict(node=m["host"], cpus=m["cpus"], cpu=m["cpu"], kernel=m["kernel"],
                           python=platform.python_version(), torch=importlib.metadata.version("torch"), tcp=m["tcp"]),
           "git_rev": m["git_rev"], "command": m["command"], "conditions": conditions}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _study_data(data: str) -> int:
    """Prepare the study's dataset and its sample-index cache once, here, before the ranks memory-map it (the
    study's own sample count: the cache its runs built is reused); returns the tokenizer's actual vocabulary."""
    from benchmarks.study.common import SUITES
    from benchmarks.study.run import prepare_data

    suite = SUITES["study"]
    return prepare_data(suite, suite.steps, data)["vocab_size_actual"]


# ---------------------------------------------------------------------------------------------- scenarios
def scenario_specs(args) -> dict[str, dict]:
    dp = dict(scenario="dp", n_hosts=args.dp_hosts, params=dict(
        models=args.models.split(","), methods=args.dp_methods.split(","), batch=args.batch, warmup=1, steps=args.steps,
        min_steps=args.min_steps, budget_s=args.method_budget_s, isolated_repeats=3))
    pp = dict(scenario="pp", n_hosts=2, params=dict(
        model="pp", methods=args.pp_methods.split(","), micro_batch=args.pp_micro_batch, n_micro=args.pp_n_micro,
        warmup=1, steps=args.pp_steps, min_steps=args.min_steps, budget_s=args.method_budget_s, transfer_repeats=15))
    d3 = dict(scenario="3d", n_hosts=4, rank_hosts=[r // 2 for r in range(8)], module="benchmarks.slownet.worker3d",
              params=dict(model="gpt3d", methods=args.d3_methods.split(","), micro_batch=4, n_micro=2, warmup=1,
                          steps=args.steps, min_steps=args.min_steps, budget_s=args.method_budget_s))
    # consecutive ranks on one host: the nodes DistributedLion(intra_node_size=2) makes by default (the worker checks)
    hier = dict(scenario="hier", n_hosts=2, rank_hosts=[0, 0, 1, 1], params=dict(dp["params"], intra_node_size=2,
                                                                                methods=args.hier_methods.split(",")))
    # vocab_size is filled in by main (from the prepared tokenizer) when the scenario runs
    study = dict(scenario="study", n_hosts=4, module="benchmarks.slownet.worker_study",
                 params=dict(methods=args.study_methods.split(","), steps=args.study_steps, data=args.study_data))
    return {"dp": dp, "pp": pp, "3d": d3, "hier": hier, "megatron3d": dict(scenario="megatron3d", n_hosts=4),
            "study": study}


def scenario_conditions(name: str, args) -> list[tuple[str, str]]:
    """(bandwidth, latency) pairs of a scenario: --bandwidth x --latency, each defaulting per scenario."""
    bws, lats = STUDY_CONDITIONS if name == "study" else DEFAULT_CONDITIONS
    return [(bw, lat) for bw in (args.bandwidth or bws).split(",") for lat in (args.latency or lats).split(",")]


def run_scenario(name: str, spec: dict, conditions: list[tuple[str, str]], args, out_dir: Path,
                 deadline: float, results: dict) -> None:
    n_hosts = spec.pop("n_hosts")
    rank_hosts = spec.pop("rank_hosts", list(range(n_hosts)))
    with SlowNet(n_hosts) as net:
        for k, (bw, lat) in enumerate(conditions):
            cond = f"{bw}/{lat}"
            if time.monotonic() > deadline:
                logger.warning("%s %s skipped: --max-minutes reached", name, cond)
                results["skipped"].append(f"{name} {cond}")
                continue
            net.shape(bw, lat)
            calib = net.probe()
            logger.info("%s %s: rtt %.3f ms, goodput %.2f MB/s", name, cond, calib.get("rtt_ms") or -1,
                        calib["goodput_MBps"])
            t0 = time.monotonic()
            load_before = _loadavg()
            tag = f"{name}_{bw}_{lat}".replace(".", "p")
            timeout = min(args.launch_timeout_s, max(60.0, deadline - time.monotonic()))
            try:
                if name == "megatron3d":
                    rows = run_megatron3d(net, args, out_dir, tag, 29500 + 10 * k, timeout)
                else:
                    ranks = launch(net, dict(spec, port=29500 + k), rank_hosts, out_dir, tag, timeout)
                    agg = {"dp": aggregate_dp, "hier": aggregate_dp, "pp": aggregate_pp, "3d": aggregate_3d,
                           "study": aggregate_study}[name]
                    rows = agg(ranks)
            except (RuntimeError, TimeoutError) as exc:
                logger.error("%s %s failed: %s", name, cond, exc)
                results["errors"].append(f"{name} {cond}: {exc}")
                continue
            for r in rows:
                r.update(bandwidth=bw, latency=lat, rtt_ms=calib.get("rtt_ms"), goodput_MBps=calib["goodput_MBps"])
            results[name].extend(rows)
            # the machine may be shared: 1-min load averages before and after (our own ranks add ~N to it)
            results["runs"].append(dict(scenario=name, condition=cond, bandwidth=bw, latency=lat,
                                        wall_s=time.monotonic() - t0, calib=calib,
                                        loadavg_before=load_before, loadavg_after=_loadavg()))
            (out_dir / "results.json").write_text(json.dumps(results, indent=1))
            if name == "study":
                write_study_json(Path(args.study_out), results)
            print(report.table(name, rows), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--scenario", default="dp,pp,3d,megatron3d",
                    help="comma list of: dp, pp, 3d, hier, megatron3d, study")
    ap.add_argument("--mega-hidden", type=int, default=512, help="megatron3d: hidden size (4 layers, 8 heads)")
    ap.add_argument("--mega-iters", type=int, default=6, help="megatron3d: iterations per method")
    ap.add_argument("--mega-methods", default="", help="megatron3d: comma list of methods (default: all of "
                    "MEGATRON_METHODS); AdamW + uncompressed with the same tying is the baseline, so keep it in")
    ap.add_argument("--bandwidth", default=None, help=f"comma list (default {DEFAULT_CONDITIONS[0]}; "
                    f"study: {STUDY_CONDITIONS[0]})")
    ap.add_argument("--latency", default=None, help=f"one-way host-to-host latency, comma list (default "
                    f"{DEFAULT_CONDITIONS[1]}; study: {STUDY_CONDITIONS[1]})")
    ap.add_argument("--models", default="gpt10m,gpt50m", help="dp models (benchmarks/slownet/models.py)")
    ap.add_argument("--batch", type=int, default=1, help="dp: sequences per rank per step")
    ap.add_argument("--dp-methods", default=",".join(DP_METHODS), help="must include fp32_allreduce (baseline)")
    ap.add_argument("--hier-methods", default=",".join(HIER_METHODS),
                    help="hier scenario: must include fp32_allreduce (baseline); dlion_hier[_avg] is hierarchical")
    ap.add_argument("--d3-methods", default="fp32+uncompressed,dlion_mavo+topk10",
                    help="3d scenario; the first one is the baseline")
    ap.add_argument("--pp-methods", default=",".join(PP_METHODS), help="must include 'uncompressed' (baseline)")
    ap.add_argument("--study-methods", default=None,
                    help="study: comma list (default: benchmarks.study.common.STUDY_METHODS, all 13); adamw is the "
                    "baseline of the s/step ratio")
    ap.add_argument("--study-steps", type=int, default=6,
                    help="study: timed steps of a per-step method (after 2 warm-up steps); local methods time "
                    "max(1, ceil(16/H)) whole rounds after one warm-up round")
    ap.add_argument("--study-data", default="data_cache/stdlib", help="study: the prepared dataset (made if missing)")
    ap.add_argument("--study-out", default="benchmarks/slownet/results/study.json",
                    help="study: the compact result file benchmarks/study/report.py reads")
    ap.add_argument("--dp-hosts", type=int, default=4)
    ap.add_argument("--pp-micro-batch", type=int, default=8)
    ap.add_argument("--pp-n-micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (after 1 warm-up step)")
    ap.add_argument("--pp-steps", type=int, default=10, help="pp: timed steps (compute-bound, so noisier)")
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--method-budget-s", type=float, default=60.0,
                    help="fewer timed steps when one would exceed this (estimated from the warm-up step)")
    ap.add_argument("--launch-timeout-s", type=float, default=1200.0)
    ap.add_argument("--max-minutes", type=float, default=150.0, help="skip conditions that would start later")
    ap.add_argument("--out", default="runs/slownet")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.study_methods is None:
        from benchmarks.study.common import STUDY_METHODS

        args.study_methods = ",".join(STUDY_METHODS)
    if args.study_steps < 1:
        ap.error(f"--study-steps {args.study_steps}: must be >= 1")
    from benchmarks.study.common import parse_method

    for method in args.study_methods.split(","):
        try:
            parse_method(method)
        except ValueError as exc:
            ap.error(str(exc).replace("--method", "--study-methods"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    reason = check_prerequisites()
    if reason:
        print(f"slownet: cannot run: {reason}", file=sys.stderr)
        return 2
    names = args.scenario.split(",")
    for bw, lat in (c for name in names for c in scenario_conditions(name, args)):
        parse_rate(bw)
        parse_latency(lat)
    stale = cleanup_stale()
    if stale:
        logger.info("removed namespaces of dead runs: %s", stale)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    deadline = t_start + 60 * args.max_minutes
    results = dict(meta=dict(date=time.strftime("%Y-%m-%d %H:%M"), host=socket.gethostname(),
                             cpus=os.cpu_count(), cpu=platform.processor() or platform.machine(),
                             kernel=platform.release(), command="python -m benchmarks.slownet.run " + shlex.join(
                                 sys.argv[1:] if argv is None else argv),
                             tcp=_tcp_settings(), git_rev=_study_git_rev()),
                   dp=[], pp=[], hier=[], runs=[], errors=[], skipped=[], megatron3d=[], study=[], **{"3d": []})
    specs = scenario_specs(args)
    unknown = set(names) - set(specs)
    if unknown:
        print(f"slownet: unknown scenario(s) {sorted(unknown)}; choose from {sorted(specs)}", file=sys.stderr)
        return 2
    if "study" in names:
        specs["study"]["params"]["vocab_size"] = _study_data(args.study_data)
    try:
        for name in names:
            run_scenario(name, specs[name], scenario_conditions(name, args), args, out_dir, deadline, results)
    except KeyboardInterrupt:
        logger.warning("interrupted: the network was torn down; partial results are in %s", out_dir)
        results["errors"].append("interrupted")
    results["meta"]["total_wall_s"] = time.monotonic() - t_start
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    md = report.markdown(results)
    (out_dir / "results.md").write_text(md)
    png = report.plot(results, out_dir / "step_time_vs_bandwidth.png")
    print(md)
    logger.info("total %.1f min; tables: %s; plot: %s", results["meta"]["total_wall_s"] / 60,
                out_dir / "results.md", png)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
