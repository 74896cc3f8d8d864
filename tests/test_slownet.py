"""The slow-network benchmark (benchmarks/slownet): its units, its refusal without root, and a 2-host smoke run
behind a real 100 Mbit/s, 5 ms link when this machine allows it (root, ip, tc, iptables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.slownet.netns import check_prerequisites, parse_latency, parse_rate  # noqa: E402


def test_units():
    assert parse_rate("100mbit") == 1e8 and parse_rate("10gbit") == 1e10
    assert parse_latency("0.1ms") == pytest.approx(1e-4) and parse_latency("5ms") == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="bandwidth"):
        parse_rate("100MBps")


def test_refuses_without_root(monkeypatch, capsys):
    from benchmarks.slownet import run

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert run.main(["--scenario", "dp"]) == 2
    assert "needs root" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_two_hosts_behind_100mbit(tmp_path):
    reason = check_prerequisites()
    if reason:
        pytest.skip(f"slow-network smoke test: {reason}")
    cmd = [sys.executable, "-m", "benchmarks.slownet.run", "--scenario", "dp,hier", "--dp-hosts", "2",
           "--models", "gpt2m", "--dp-methods", "fp32_allreduce,dlion_mavo", "--hier-methods",
           "fp32_allreduce,dlion_mavo,dlion_hier", "--bandwidth", "100mbit", "--latency", "5ms",
           "--steps", "2", "--min-steps", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the harness tears its namespaces down
            proc.wait(30)
    assert proc.returncode == 0, log[-3000:]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"dlsn{proc.pid}" not in namespaces, "the harness left namespaces behind"

    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in res["dp"]}
    fp32, mavo = rows["fp32_allreduce"], rows["dlion_mavo"]
    # the shaping is real: TCP goodput under 100 Mbit/s (12.5 MB/s) and one-way 5 ms (RTT ~10 ms)
    assert 5.0 < fp32["goodput_MBps"] < 12.6
    assert 9.5 < fp32["rtt_ms"] < 14.0
    # fp32 ring all-reduce at N=2 hands 4 B/param to the wire; MaVo 2 x 1/2 bit + one flag byte per chunk
    n = fp32["n_params"]
    assert fp32["payload_bytes"] == pytest.approx(4 * n)
    assert 30 < fp32["payload_bytes"] / mavo["payload_bytes"] <= 32
    # what the veth really carried (TCP/IP headers, acks, barriers included) keeps that ratio within 15 %
    assert fp32["wire_tx_bytes"] >= fp32["payload_bytes"]
    assert 27 < fp32["wire_tx_bytes"] / mavo["wire_tx_bytes"] <= 33
    # the fp32 exchange could not have beaten the link: >= payload / 12.5 MB/s
    assert fp32["iso_comm_s"] >= fp32["payload_bytes"] / 12.5e6
    assert mavo["comm_s"] < fp32["comm_s"] / 4
    assert (tmp_path / "results.md").read_text().count("| 100mbit |") == 2 + 3

    # hier: 2 hosts x 2 ranks; hierarchical D-Lion (L = 2 ranks per node, M = 2 nodes, MaVo b = 1) sends
    # (1 + 1)(2-1)/2 / 2 = 1/2 bit per parameter per rank between the nodes (+ padding and one flag byte per
    # bucket), and inside the node half the fp32 gradient out plus half the 1-bit aggregate: 33/16 bytes per parameter
    hier = {r["method"]: r for r in res["hier"]}
    h, flat = hier["dlion_hier"], hier["dlion_mavo"]
    assert (h["intra_node_size"], h["num_nodes"]) == (2, 2) and (flat["intra_node_size"], flat["num_nodes"]) == (1, 4)
    n = h["n_params"]
    assert h["formula_bytes"] == pytest.approx(n / 16)
    assert n / 16 <= h["inter_node_bytes"] <= 1.02 * n / 16
    assert 33 / 16 * n <= h["intra_node_bytes"] <= 1.02 * 33 / 16 * n
    # flat D-Lion over 4 voters: 2 x 3/4 bit per parameter, all counted inter-node, none intra-node
    assert flat["intra_node_bytes"] == 0 and 3 / 16 * n <= flat["inter_node_bytes"] <= 1.02 * 3 / 16 * n
    # on the wire (each host's veth carries what its 2 ranks send to the other host, headers included): hierarchical
    # D-Lion >= its 1/2 bit per parameter per rank; flat D-Lion's all_to_all alone sends 2 of each rank's 3 vote
    # shards across (1/2 bit), and its all_gather adds 3/8 bit with gloo's ring (one link crossing per host)
    assert h["ranks_per_host"] == 2 and h["wire_tx_per_gpu"] == pytest.approx(h["wire_tx_bytes"] / 2)
    assert n / 16 <= h["wire_tx_per_gpu"] < 0.7 * flat["wire_tx_per_gpu"]


def test_study_aggregation_takes_the_slowest_rank_and_models_ddp_bytes():
    from benchmarks.slownet.run import aggregate_study

    def res(method, kind, h, wall, payload, step_s):
        return dict(method=method, kind=kind, H=h, n_params=1000, warmup_steps=h, steps_timed=len(step_s),
                    wall_s=wall, compute_s=wall / 2, fwd_bwd_s=wall / 2, payload_bytes=payload,
                    host_tx_bytes=4000, step_s=step_s)

    ranks = [{"results": [res("adamw", "adamw", 1, 2.0, None, [1.0, 1.0]),
                          res("local_dlion_H2", "local_dlion", 2, 4.0, 100, [0.5, 1.5, 0.5, 1.5])]},
             {"results": [res("adamw", "adamw", 1, 3.0, None, [1.5, 1.5]),
                          res("local_dlion_H2", "local_dlion", 2, 2.0, 300, [0.5, 2.5, 0.5, 0.5])]}]
    adamw, local = aggregate_study(ranks)
    assert adamw["s_per_step"] == 1.5 and adamw["payload_source"] == "ring model"  # slowest rank: 3.0 s / 2
    assert adamw["payload_bytes_per_step"] == 2 * (2 - 1) / 2 * 4 * 1000  # ring all-reduce of fp32, N = 2
    assert local["s_per_step"] == 1.0 and local["payload_bytes_per_step"] == 50.0  # mean(100, 300) / 4 steps
    assert local["round_end_step_s"] == 2.0 and local["inner_step_s"] == 0.5  # medians of max(2.5,1.5), max(1.5,0.5)
    assert local["vs_adamw"] == 1.0 / 1.5
