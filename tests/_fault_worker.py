"""A D-Lion training loop for fault injection (run by tests/test_faults.py as one process per rank).

argv: out_dir fault victim_rank fault_step timeout_s. ``fault`` is ``stop`` (SIGSTOP itself: a frozen VM or a
partition) or ``kill`` (SIGKILL itself: a preempted machine). The victim writes the time of its fault first.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from distlion_ds import DistributedLion


def main() -> None:
    out_dir, fault, victim, fault_step, timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = DistributedLion(model.parameters(), lr=1e-3, bucket_numel=1024)
    for step in range(1, 1000):
        if rank == victim and step == fault_step:
            with open(os.path.join(out_dir, "fault_time"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with open(os.path.join(out_dir, f"finished_{rank}"), "w") as f:  # never reached by the survivors
        f.write("done")


if __name__ == "__main__":
    main()
