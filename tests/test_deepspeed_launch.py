"""launch/deepspeed_gpt.sh runs the DeepSpeed launcher on the GPT entry point (CPU, gloo, 2 workers)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _dist import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_deepspeed_launcher_trains_gpt_with_dlion(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # No `deepspeed` command on PATH: the script starts DeepSpeed's launcher module with the interpreter it names.
    env["PATH"] = "/usr/bin:/bin"
    env["PYTHON"] = sys.executable
    env["MASTER_PORT"] = str(free_port())
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "deepspeed_gpt.sh"), str(ROOT / "configs" / "deepspeed" / "dlion_mavo.json"),
         "2", "--data", tiny_data, "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
         "--seq-length", "32", "--hidden-size", "32", "--num-layers", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 4 and len(summary["train_loss"]) == 4
    assert [e["iteration"] for e in summary["eval"]] == [2, 4]
    assert summary["bits_per_param_step"] == pytest.approx(1.0, rel=0.05)  # D-Lion MaVo at N=2, measured
