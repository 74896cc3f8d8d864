"""Markdown tables and the step-time-vs-bandwidth plot of a slow-network run (results.json from run.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_MB = 1e6


def _mb(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / _MB:.2f}"


def _cond(r: dict) -> str:
    rtt = r.get("rtt_ms")
    return f"{r['bandwidth']} | {r['latency']} ({rtt:.2f})" if rtt is not None else f"{r['bandwidth']} | {r['latency']}"


def study_table(rows: list[dict]) -> str:
    """One line per method, one s/step column per condition (in the order measured), with the ratio to adamw's s/step
    at the same condition; compute s/step and host-wire bytes per step are given per condition, separated by ' / '."""
    conds = list(dict.fromkeys((r["bandwidth"], r["latency"]) for r in rows))
    by = {(r["method"], r["bandwidth"], r["latency"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    heads = [f"{bw} {lat}" for bw, lat in conds]
    out = ["| method | H | s/step " + " | s/step ".join(heads) + " | compute s/step (" + " / ".join(heads)
           + ") | payload MB/step | host wire MB/step (" + " / ".join(heads) + ") | steps timed |",
           "|---|---|" + "---|" * len(conds) + "---|---|---|---|"]

    def each(method: str, fmt) -> list[str]:
        return [fmt(by[(method, *c)]) if (method, *c) in by else "n/a" for c in conds]

    def sps(r: dict) -> str:
        return f"{r['s_per_step']:.3f}" + ("" if r.get("vs_adamw") is None else f" ({r['vs_adamw']:.2f}x adamw)")

    for m in methods:
        first = next(r for r in rows if r["method"] == m)
        payload = f"{first['payload_bytes_per_step'] / _MB:.4g}" + (" (ring model)" if first["payload_source"]
                                                                      == "ring model" else "")
        out.append(f"| {m} | {first['H']} | " + " | ".join(each(m, sps))
                   + " | " + " / ".join(each(m, lambda r: f"{r['compute_s_per_step']:.3f}"))
                   + f" | {payload} | " + " / ".join(each(m, lambda r: f"{r['host_tx_bytes_per_step'] / _MB:.3f}"))
                   + f" | {first['steps_timed']} |")
    return "\n".join(out) + "\n"


def table(name: str, rows: list[dict]) -> str:
    if name == "study":
        return study_table(rows)
    if name == "dp":
        head = ("| link | latency (RTT ms) | goodput MB/s | model | method | step s | fwd+bwd s | optimizer s "
                "| comm in step s | comm isolated s | payload MB | wire MB | comm speedup in step / isolated "
                "| step speedup |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        body = "".join(
            f"| {_cond(r)} | {r['goodput_MBps']:.1f} | {r['model']} ({r['n_params'] / 1e6:.1f}M) | {r['method']} "
            f"| {r['step_s']:.3f} | {r['compute_s']:.3f} | {r['opt_s']:.3f} | {r['comm_s']:.3f} "
            f"| {r['iso_comm_s']:.3f} | {r['payload_bytes'] / _MB:.2f} | {r['wire_tx_bytes'] / _MB:.2f} "
            f"| {r['comm_speedup']:.1f}x / {r['iso_comm_speedup']:.1f}x | {r['step_speedup']:.2f}x |\n" for r in rows)
        return head + body
    if name == "hier":
        head = ("| link | latency (RTT ms) | goodput MB/s | model | method | step s | fwd+bwd s | optimizer s "
                "| comm in step s | comm isolated s | payload MB/GPU | inter-node MB/GPU (formula) "
                "| intra-node MB/GPU | cross-link wire MB/GPU | wire ratio | step speedup |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

        def inter(r: dict) -> str:
            if r.get("inter_node_bytes") is None:
                return "n/a"
            return (f"{_mb(r['inter_node_bytes'])} ({_mb(r['formula_bytes'])}, "
                    f"{r['inter_node_bytes'] / r['formula_bytes']:.3f}x)")

        body = "".join(
            f"| {_cond(r)} | {r['goodput_MBps']:.1f} | {r['model']} ({r['n_params'] / 1e6:.1f}M) | {r['method']} "
            f"| {r['step_s']:.3f} | {r['compute_s']:.3f} | {r['opt_s']:.3f} | {r['comm_s']:.3f} "
            f"| {r['iso_comm_s']:.3f} | {_mb(r['payload_bytes'])} | {inter(r)} | {_mb(r.get('intra_node_bytes'))} "
            f"| {_mb(r['wire_tx_per_gpu'])} | {r['wire_ratio']:.1f}x | {r['step_speedup']:.2f}x |\n" for r in rows)
        return head + body
    if name == "megatron3d":
        head = ("| link | latency (RTT ms) | goodput MB/s | method | s/iter | first iter s | DP MB/iter "
                "| p2p MB/iter | tied-embedding all-reduce MB/iter | wire MB/host/iter | wire ratio "
                "| DP replicas identical | step speedup |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        body = "".join(
            f"| {_cond(r)} | {r['goodput_MBps']:.1f} | {r['method']} | {r['step_s']:.3f} | {r['first_iter_s']:.2f} "
            f"| {r['dp_bytes'] / _MB:.1f} | {_mb(r['p2p_bytes'])} "
            f"| {r['emb_bytes'] / _MB:.1f} | {r['host_tx_bytes'] / _MB:.1f} | {r['wire_ratio']:.1f}x "
            f"| {r['replicas_identical']} | {r['step_speedup']:.2f}x |\n" for r in rows)
        return head + body
    if name == "3d":
        head = ("| link | latency (RTT ms) | goodput MB/s | method | step s | pipeline fwd+bwd s | p2p s | TP s "
                "| codec s | optimizer s | DP comm s | wire MB/host | step speedup |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        body = "".join(
            f"| {_cond(r)} | {r['goodput_MBps']:.1f} | {r['method']} | {r['step_s']:.3f} | {r['pipe_s']:.3f} "
            f"| {r['p2p_s']:.3f} | {r['tp_s']:.3f} | {r['codec_s']:.3f} | {r['opt_s']:.3f} | {r['dp_comm_s']:.3f} "
            f"| {r['wire_tx_bytes'] / _MB:.2f} | {r['step_speedup']:.2f}x |\n" for r in rows)
        return head + body
    head = ("| link | latency (RTT ms) | goodput MB/s | method | act frame KB | act transfer ms (enc+dec) "
            "| act speedup | grad frame KB | grad transfer ms (enc+dec) | grad speedup | step s | p2p s "
            "| step speedup |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {_cond(r)} | {r['goodput_MBps']:.1f} | {r['method']} | {r['act_frame_bytes'] / 1e3:.0f} "
        f"| {1e3 * r['act_transfer_s']:.1f} ({1e3 * (r['act_encode_s'] + r['act_decode_s']):.1f}) "
        f"| {r['act_speedup']:.2f}x | {r['gra_frame_bytes'] / 1e3:.0f} "
        f"| {1e3 * r['gra_transfer_s']:.1f} ({1e3 * (r['gra_encode_s'] + r['gra_decode_s']):.1f}) "
        f"| {r['gra_speedup']:.2f}x | {r['step_s']:.3f} | {r['p2p_s']:.3f} | {r['step_speedup']:.2f}x |\n"
        for r in rows)
    return head + body


def markdown(results: dict) -> str:
    m = results["meta"]
    out = [f"Run {m['date']} on {m['host']} ({m['cpus']} CPUs, {m['cpu']}, kernel {m['kernel']}); "
           f"total {m.get('total_wall_s', 0) / 60:.1f} min.\n\nCommand: `{m['command']}`\n"]
    if results["dp"]:
        out.append("\n### Data parallel\n\n" + table("dp", results["dp"]))
    if results["pp"]:
        out.append("\n### Pipeline pp=2 (2 hosts)\n\n" + table("pp", results["pp"]))
    if results.get("3d"):
        out.append("\n### 3D tp2 x pp2 x dp2 (8 ranks on 4 hosts)\n\n" + table("3d", results["3d"]))
    if results.get("hier"):
        out.append("\n### Hierarchical D-Lion: data parallel, 2 hosts x 2 ranks (4 ranks; a host's ranks talk over its "
                   "local route, unshaped)\n\nBytes are per rank (GPU) per step. Inter-node: the optimizer's "
                   "comm_stats() (flat D-Lion counts all its votes as inter-node, also those to the same host's "
                   "rank), with issue 12's (1 + b)(M-1)/M / L bits per parameter in brackets. Cross-link wire: what "
                   "the host's veth sent during the optimizer phase (TCP/IP headers included) / ranks per host.\n\n"
                   + table("hier", results["hier"]))
    if results.get("megatron3d"):
        out.append("\n### megatron-core 3D tp2 x pp2 x dp2 (distlion_ds.megatron.pretrain_gpt, 8 ranks on 4 hosts)\n\n"
                   + table("megatron3d", results["megatron3d"]))
    if results.get("study"):
        conds = [r for r in results["runs"] if r["scenario"] == "study"]
        calib = "; ".join(f"{r['condition']}: RTT {r['calib'].get('rtt_ms') or float('nan'):.2f} ms, goodput "
                          f"{r['calib']['goodput_MBps']:.1f} MB/s" for r in conds)
        out.append("\n### The study's training step (benchmarks/study: 6.5M-parameter GPT, bf16 autocast, 3 sequences "
                   "per worker), 4 hosts x 1 rank\n\nSeconds per inner step: the slowest rank's wall over the timed "
                   "steps (barriers at both ends; local methods: whole rounds, outer step included), in brackets "
                   "against adamw's at the same link. Compute: forward+backward alone (adamw / lion: passes under "
                   "DDP's no_sync). Payload: the optimizer's comm_stats() bytes per worker per step (DDP: the ring "
                   "model 2(N-1)/N x 4 B/param); host wire: what the host's veth sent (TCP/IP headers, acks and "
                   f"barriers included). Links: {calib}.\n\n" + table("study", results["study"]))
    if results.get("runs"):
        runs = "; ".join(f"{r['scenario']} {r['condition']} {r['wall_s']:.0f} s, load "
                         f"{r.get('loadavg_before', 0):.1f} -> {r.get('loadavg_after', 0):.1f}"
                         for r in results["runs"])
        out.append("\nPer launch (1-min load average before -> after; the ranks of the launch itself add ~2-8): "
                   + runs + "\n")
    for key in ("errors", "skipped"):
        if results[key]:
            out.append(f"\n{key}: " + "; ".join(results[key]) + "\n")
    return "".join(out)


def plot(results: dict, path: Path) -> Path | None:
    """Step time vs bandwidth (log-log), one panel per (scenario/model, latency), one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    panels: dict[tuple[str, str, str], dict[str, list[tuple[float, float]]]] = {}
    from .netns import parse_rate

    def add(title: str, r: dict, value: float, ylabel: str = "step time (s)") -> None:
        panels.setdefault((title, r["latency"], ylabel), {}).setdefault(r["method"], []).append(
            (parse_rate(r["bandwidth"]) / 1e6, value))

    for r in results["dp"]:
        add(f"DP, {r['model']}", r, r["step_s"])
    for r in results.get("hier", []):
        add(f"DP 2 hosts x 2 ranks, {r['model']}", r, r["step_s"])
    for r in results["pp"]:
        add("PP=2", r, r["step_s"])
        add("PP=2 activation transfer", r, 1e3 * r["act_transfer_s"], "encode+send+recv+decode (ms)")
    for r in results.get("3d", []):
        add("3D tp2xpp2xdp2", r, r["step_s"])
    for r in results.get("megatron3d", []):
        add("megatron-core 3D", r, r["step_s"])
    for r in results.get("study", []):
        add("study step (6.5M GPT, 4 hosts)", r, r["s_per_step"], "s per inner step")
    if not panels:
        return None
    keys = sorted(panels)
    cols = 2
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for method, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel(key[2])
        ax.set_title(f"{key[0]}, one-way latency {key[1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


if __name__ == "__main__":  # re-render: python -m benchmarks.slownet.report RESULTS_JSON [PNG]
    res = json.loads(Path(sys.argv[1]).read_text())
    print(markdown(res))
    plot(res, Path(sys.argv[2]) if len(sys.argv) > 2 else Path(sys.argv[1]).with_name("step_time_vs_bandwidth.png"))
