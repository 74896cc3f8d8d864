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


def table(name: str, rows: list[dict]) -> str:
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
