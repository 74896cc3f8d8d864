"""Fault injection: a stalled (SIGSTOP) or killed (SIGKILL) rank makes every other rank exit, non-zero, with one line
naming the step and the collective, within the process-group timeout plus a slack (never torch's 30-minute default).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _dist import free_port

WORKER = Path(__file__).with_name("_fault_worker.py")
WORLD, VICTIM, FAULT_STEP, TIMEOUT_S = 3, 1, 5, 5.0
# Interpreter teardown and a loaded 2-core CI machine; a hang would take torch's default of 30 minutes.
SLACK_S = 25.0


def _run(tmp_path: Path, fault: str, world: int = WORLD, extra: tuple[str, ...] = (), timeout_s: float = TIMEOUT_S
         ) -> tuple[float, dict[int, tuple[int, float, str]]]:
    port = free_port()
    procs = {}
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world))
        procs[rank] = subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), fault, str(VICTIM), str(FAULT_STEP), str(timeout_s), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    try:
        for rank, proc in procs.items():
            if rank == VICTIM:
                continue
            out, _ = proc.communicate(timeout=180)
            results[rank] = (proc.returncode, time.time(), out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        victim_out, _ = procs[VICTIM].communicate()
    assert (tmp_path / "fault_time").exists(), f"the victim never reached its fault:\n{victim_out[-3000:]}\n" + \
        "\n".join(f"--- rank {r}:\n{out[-2000:]}" for r, (_, _, out) in results.items())
    return float((tmp_path / "fault_time").read_text()), results


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_stalled_or_dead_peer_ends_every_rank(tmp_path, fault):
    fault_time, results = _run(tmp_path, fault)
    assert sorted(results) == [r for r in range(WORLD) if r != VICTIM]
    for rank, (code, end, out) in results.items():
        assert code != 0, f"rank {rank} exited 0 although a peer {fault}ped:\n{out[-2000:]}"
        assert not (tmp_path / f"finished_{rank}").exists()
        lines = [ln for ln in out.splitlines() if "CollectiveError: distlion_ds: step" in ln]
        assert lines, out[-3000:]
        assert f"step {FAULT_STEP}: all_to_all_single of bucket 0 on a group of {WORLD} ranks" in lines[-1]
        if fault == "kill":
            assert "peer: 127.0.0.1:" in lines[-1], lines[-1]
        else:  # the stalled peer is noticed by the process group's timeout, not before, not 30 minutes later
            waited = float(re.search(r"failed after ([0-9.]+) s", lines[-1]).group(1))
            assert TIMEOUT_S - 0.5 <= waited < TIMEOUT_S + SLACK_S, lines[-1]
        assert end - fault_time < TIMEOUT_S + SLACK_S, (rank, end - fault_time)


@pytest.mark.slow
def test_deepspeed_config_timeout_ends_a_stalled_run(tmp_path):
    """distlion_ds.initialize creates the process group with "distlion": {"distributed_timeout_minutes": ...}."""
    # That timeout also bounds the rendezvous, where two ranks importing DeepSpeed on 2 loaded cores can be seconds
    # apart: 15 s here (users set minutes).
    timeout_s = 15.0
    fault_time, results = _run(tmp_path, "stop", world=2, extra=("deepspeed",), timeout_s=timeout_s)
    code, end, out = results[0]
    assert code != 0, out[-2000:]
    lines = [ln for ln in out.splitlines() if "CollectiveError: distlion_ds: step" in ln]
    assert lines and f"step {FAULT_STEP}: all_to_all_single of bucket 0 on a group of 2 ranks" in lines[-1], out[-3000:]
    waited = float(re.search(r"failed after ([0-9.]+) s", lines[-1]).group(1))
    assert timeout_s - 0.5 <= waited < timeout_s + SLACK_S, lines[-1]
    assert end - fault_time < timeout_s + SLACK_S


@pytest.mark.slow
def test_megatron_entry_stalled_stage_ends_the_other(tiny_data, tmp_path):
    """pp=2: the first stage freezes mid-run (SIGSTOP from outside); the last stage exits non-zero with one line naming
    the iteration and the phase, after --distributed-timeout-minutes."""
    timeout_s = 15.0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0", "--log-interval", "1",
            "--train-iters", "100000", "--data-path", tiny_data, "--pipeline-model-parallel-size", "2",
            "--optimizer", "distlion", "--distributed-timeout-minutes", str(timeout_s / 60), "--out", str(tmp_path)]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for rank in range(2):
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distlion_ds.megatron.pretrain_gpt", *args],
                env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                         WORLD_SIZE="2"), stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 150
        while "iteration      3/" not in logs[1].read_text():
            assert procs[1].poll() is None and time.time() < deadline, logs[1].read_text()[-3000:]
            time.sleep(0.2)
        os.kill(procs[0].pid, signal.SIGSTOP)
        stalled_at = time.time()
        code = procs[1].wait(timeout=timeout_s + 60)
        ended = time.time()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    out = logs[1].read_text()
    assert code != 0, out[-3000:]
    # "iteration N" from the entry's phases, "step N" from the ones inside the D-Lion optimizer
    lines = [ln for ln in out.splitlines() if re.search(r"CollectiveError: distlion_ds: (iteration|step) \d+", ln)]
    assert lines, out[-3000:]
    # The stall lands in whichever phase the last stage is in: the schedule's p2p (or finalize_model_grads'
    # tied-embedding all-reduce after it), or the optimizer step (its norm / flag all-reduces, the vote exchange).
    # (a recv that megatron-core's schedule posts outside our communicator's wrapper names the phase only, as seen
    # in a clean-clone CI run: "iteration 6: the pipeline schedule and finalize_model_grads (...) on a group of 2")
    assert re.search(r"(iteration|step) \d+: (the pipeline schedule and finalize_model_grads \(p2p send/recv, TP "
                     r"collectives, tied-embedding and DP gradient all-reduces\)"
                     r"(: (pipeline p2p send/recv|.*all_reduce))?"
                     r"|the replica gradient-norm all-reduce|the non-finite flag all-reduce|all_to_all_single of bucket"
                     r"|the optimizer step) .*on a group of 2 ranks", lines[-1]), lines[-1]
    waited = float(re.search(r"failed after ([0-9.]+) s", lines[-1]).group(1))
    assert timeout_s - 0.5 <= waited < timeout_s + SLACK_S, lines[-1]
    assert ended - stalled_at < timeout_s + SLACK_S, ended - stalled_at
