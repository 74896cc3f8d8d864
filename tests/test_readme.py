"""The README's plain-PyTorch example runs as written, under torchrun with 2 ranks."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from _dist import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_pytorch_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Distributed Lion in plain PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"([0-9.]+) wire bits/param/step, 0 skipped", out.stdout)
    assert m, out.stdout
    assert float(m.group(1)) == pytest.approx(1.0, rel=0.05)  # (1+1)(N-1)/N at N=2, plus alignment padding
