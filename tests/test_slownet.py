"""The slow-network benchmark (benchmarks/slownet): its bit-exact CPU fast path, its refusal without root, and a
2-host smoke run behind a real 100 Mbit/s, 5 ms link when this machine allows it (root, ip, tc, iptables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlion_ds.kernels.lion import lion_apply_ref, lion_votes_ref, vote_count_ref
from distlion_ds.kernels.signs import pack_bits_ref
from distlion_ds.kernels.topk import topk_select_ref

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.slownet import fastcpu  # noqa: E402
from benchmarks.slownet.netns import check_prerequisites, parse_latency, parse_rate  # noqa: E402


def test_units():
    assert parse_rate("100mbit") == 1e8 and parse_rate("10gbit") == 1e10
    assert parse_latency("0.1ms") == pytest.approx(1e-4) and parse_latency("5ms") == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="bandwidth"):
        parse_rate("100MBps")


@pytest.mark.parametrize("n", [1, 7, 64, 1003, 65536 + 5])
def test_fastcpu_is_bit_identical_to_the_references(n):
    """The proposal in fastcpu.py must produce the references' exact bits and floats, zero rule included."""
    gen = torch.Generator().manual_seed(n)
    for step in (1, 2):
        g, m = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        g[::3] = 0.0
        m[::3] = 0.0  # c == 0 -> zero rule
        ref, ref_flag = lion_votes_ref(g, m, 0.9, step, nonfinite=torch.zeros(1, dtype=torch.int32))
        got, got_flag = fastcpu.lion_votes_fast(g, m, 0.9, step, nonfinite=torch.zeros(1, dtype=torch.int32))
        assert torch.equal(got, ref) and torch.equal(got_flag, ref_flag)
        bad = g.clone()
        bad[n // 2] = float("nan")
        flag = torch.zeros(1, dtype=torch.int32)
        fastcpu.lion_votes_fast(bad, m, 0.9, step, nonfinite=flag)
        assert flag.item() == 1
        for n_ranks in (2, 3, 4):
            shard = -(-n // (8 * n_ranks))
            recv = torch.randint(0, 256, (n_ranks, shard + 1), dtype=torch.uint8, generator=gen)[:, :shard]
            for agg in ("mavo", "avg"):
                for off in (0, 8 * shard):
                    assert torch.equal(fastcpu.vote_count_fast(recv, n_ranks, agg, step, off),
                                       vote_count_ref(recv, n_ranks, agg, step, off))
                nbits = 1 if agg == "mavo" else (n_ranks + 1 - 1).bit_length()
                q = torch.randint(0, 2 if agg == "mavo" else n_ranks + 1, (-(-n // 8) * 8,), generator=gen)
                planes = torch.stack([pack_bits_ref(((q >> k) & 1) != 0) for k in range(nbits)])
                for wd in (0.0, 0.1):
                    p_ref, m_ref = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
                    p_got, m_got = p_ref.clone(), m_ref.clone()
                    lion_apply_ref(p_ref, m_ref, g, planes, n_ranks, 1e-3, wd, 0.99, agg)
                    fastcpu.lion_apply_fast(p_got, m_got, g, planes, n_ranks, 1e-3, wd, 0.99, agg)
                    assert torch.equal(p_got, p_ref) and torch.equal(m_got, m_ref)
    x = torch.randn(n, generator=gen)
    x[::5] = 1.0
    x[1::7] = -1.0  # many ties in magnitude: the lower index must win
    for k in {1, max(1, n // 10), n - 1 or 1}:
        v_ref, i_ref = topk_select_ref(x, k)
        v_got, i_got = fastcpu.topk_select_fast(x, k)
        assert torch.equal(i_got, i_ref) and torch.equal(v_got, v_ref)


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
    cmd = [sys.executable, "-m", "benchmarks.slownet.run", "--scenario", "dp", "--dp-hosts", "2", "--models", "gpt2m",
           "--dp-methods", "fp32_allreduce,dlion_mavo", "--bandwidth", "100mbit", "--latency", "5ms",
           "--steps", "2", "--min-steps", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=150)
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
    assert (tmp_path / "results.md").read_text().count("| 100mbit |") == 2
