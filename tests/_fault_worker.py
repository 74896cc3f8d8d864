"""A D-Lion training loop for fault injection (run by tests/test_faults.py as one process per rank).

argv: out_dir fault victim_rank fault_step timeout_s [deepspeed]. ``fault`` is ``stop`` (SIGSTOP itself: a frozen VM
or a partition) or ``kill`` (SIGKILL itself: a preempted machine). The victim writes the time of its fault first.
With ``deepspeed`` the loop runs a DeepSpeed engine from ``distlion_ds.initialize``, which creates the process group
itself with the config's ``"distlion": {"distributed_timeout_minutes": ...}``.
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
from distlion_ds.comm import set_timeout_everywhere


def main() -> None:
    out_dir, fault, victim, fault_step, timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5])
    rank = int(os.environ["RANK"])
    use_deepspeed = sys.argv[6:] == ["deepspeed"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    if use_deepspeed:
        import deepspeed

        import distlion_ds
        from distlion_ds.deepspeed.engine import get_distributed_lion

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-45 s JIT build
        config = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**6, "gradient_clipping": 0.0,
                  "optimizer": {"type": "DistributedLion", "params": {"lr": 1e-3, "bucket_numel": 1024}},
                  "distlion": {"distributed_timeout_minutes": timeout_s / 60}}
        engine, _, _, _ = distlion_ds.initialize(model=model, model_parameters=model.parameters(), config=config)
        dp_group = get_distributed_lion(engine).process_group  # DeepSpeed's clone of the world
        for group in (dist.group.WORLD, dp_group):
            timeout = group._get_backend(torch.device("cpu")).options._timeout
            assert timeout == datetime.timedelta(seconds=timeout_s), timeout
    else:
        # The timeout also bounds the rendezvous, and ranks importing torch on a loaded 2-core machine can join
        # more than a few seconds apart: rendezvous with a minute, then give every group the short test timeout.
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=1))
        set_timeout_everywhere(datetime.timedelta(seconds=timeout_s))
        opt = DistributedLion(model.parameters(), lr=1e-3, bucket_numel=1024)
    for step in range(1, 1000):
        if rank == victim and step == fault_step:
            with open(os.path.join(out_dir, "fault_time"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank))
        if use_deepspeed:
            engine.backward(engine(x).square().mean())
            engine.step()
        else:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    with open(os.path.join(out_dir, f"finished_{rank}"), "w") as f:  # never reached by the survivors
        f.write("done")


if __name__ == "__main__":
    main()
