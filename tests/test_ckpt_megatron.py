"""The Megatron entry's checkpoints (issue 9, item 2): kill -9 during a save, then resume bit for bit.

Two 2-rank spawns (pp=2), ``pretrain_gpt.main`` in-process:
1. the uninterrupted reference (4 iterations, saved at 4); then the same run saving every 2 iterations, whose rank 1
   is SIGKILLed in the middle of writing its file of iteration 4 (rank 0's file of iteration 4 is complete);
2. the tracker still names iteration 2; resuming from it gives the reference's losses and, at iteration 4, the
   reference's files bit for bit; a flipped byte in one rank's file makes every rank refuse (the corrupt rank names
   the file, the other names the rank), before any collective can be left waiting.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import spawn
from _kill import kill_mid_write

ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0", "--log-interval", "1",
        "--pipeline-model-parallel-size", "2", "--optimizer", "distlion", "--lr", "3e-3", "--lr-warmup-iters", "1",
        "--train-iters", "4"]
TRACKER = "latest_checkpointed_iteration.txt"


def _prepare(rank):
    import distlion_ds.kernels._dispatch as dispatch

    dispatch.INTERPRET = False  # torch references on CPU tensors (the interpreter is ~100x slower)
    torch.set_num_threads(1)


def _run(out: pathlib.Path, name: str, data: str, *extra: str) -> None:
    from distlion_ds.megatron import pretrain_gpt

    assert pretrain_gpt.main([*ARGS, "--data-path", data, "--out", str(out / name), *extra]) == 0, name


def _first(rank, world, data, out):
    _prepare(rank)

    out = pathlib.Path(out)
    _run(out, "full", data, "--save", str(out / "ckpt_full"))
    if rank == 1:
        kill_mid_write(out / "killed", "iter_0000004/mp_rank_00_001_dp000.pt")
    _run(out, "killed", data, "--save", str(out / "ckpt"), "--save-interval", "2")
    raise AssertionError("unreachable: rank 1 is killed during the save of iteration 4")


def _same(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _same(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{what}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), what
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), what
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _second(rank, world, data, out):
    _prepare(rank)
    from distlion_ds import checkpoint_io as cio
    from distlion_ds.megatron import pretrain_gpt

    out = pathlib.Path(out)
    ckpt = out / "ckpt"
    mine = f"mp_rank_00_{rank:03d}_dp000.pt"
    # What the kill left: the tracker names 2; iteration 4 has rank 0's file and rank 1's torn temporary only.
    assert cio.read_verified_text(ckpt / TRACKER) == "2\n"
    it4 = sorted(p.name for p in (ckpt / "iter_0000004").iterdir())
    assert it4[1:] == ["mp_rank_00_000_dp000.pt", "mp_rank_00_000_dp000.pt.sha256"], it4
    assert it4[0].startswith(".mp_rank_00_001_dp000.pt.tmp."), it4

    # A flipped byte in rank 1's file of iteration 2: every rank refuses at load.
    bad = out / f"bad{rank}"
    shutil.copytree(ckpt, bad)
    victim = bad / "iter_0000002" / "mp_rank_00_001_dp000.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    victim.write_bytes(bytes(raw))
    args = [*ARGS, "--data-path", data, "--out", str(out / f"refused{rank}"), "--load", str(bad)]
    if rank == 1:
        with pytest.raises(cio.CheckpointCorruptError, match="previous checkpoint") as e:
            pretrain_gpt.main(args)
        assert str(victim) in str(e.value)
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] could not read"):
            pretrain_gpt.main(args)

    _run(out, "resumed", data, "--load", str(ckpt), "--save", str(out / "ckpt_resumed"))
    dist.barrier()  # rank 0 writes summary.json after the run's last collective: the other ranks wait for it
    full = json.loads((out / "full" / "summary.json").read_text())
    resumed = json.loads((out / "resumed" / "summary.json").read_text())
    assert resumed["start_iteration"] == 2 and resumed["losses"] == full["losses"][2:], (full, resumed)
    a = cio.load_verified(out / "ckpt_full" / "iter_0000004" / mine, weights_only=False)
    b = cio.load_verified(out / "ckpt_resumed" / "iter_0000004" / mine, weights_only=False)
    for key in ("iteration", "model", "optimizer", "scheduler", "rng", "p2p", "skipped_steps"):
        _same(a[key], b[key], f"{mine} {key}")


@pytest.mark.slow
def test_kill_during_save_then_resume_is_exact(tiny_data, tmp_path):
    with pytest.raises(AssertionError) as e:  # spawn reports the killed rank (or its peer's broken connection)
        spawn(_first, 2, tiny_data, str(tmp_path))
    assert "unreachable" not in str(e.value) and (tmp_path / "killed").exists(), str(e.value)[-3000:]
    spawn(_second, 2, tiny_data, str(tmp_path))
