"""The Megatron entry's dist_checkpointing checkpoints (issue 9 item 2, issue 11 item 5): kill -9 during a save,
then resume bit for bit.

Two 2-rank spawns (pp=2), ``pretrain_gpt.main`` in-process:
1. the uninterrupted reference (4 iterations, saved at 4); then the same run saving every 2 iterations, whose rank 1
   is SIGKILLed in the middle of writing its side file of iteration 4 (after dist_checkpointing's files of iteration
   4 are written, before the folder is renamed into place);
2. the tracker still names iteration 2 and ``iter_0000004`` does not exist (only ``iter_0000004.partial``); a flipped
   byte in one of dist_checkpointing's files, or in one rank's side file, makes every rank refuse (the rank that
   checked the file names it, the other names that rank), before any collective can be left waiting; resuming from
   the tracker into the same folder replaces the stale partial save and gives the reference's losses and, at
   iteration 4, the reference's checkpoint: every tensor, the common state and every side file, bit for bit.
"""

from __future__ import annotations

import json
import pathlib
import shutil

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
    if rank == 1:  # once rank 0's side file is renamed into place, complete (what _second expects to find)
        kill_mid_write(out / "killed", "iter_0000004.partial/rank_state/mp_rank_00_001_dp000.pt",
                       wait_for=out / "ckpt" / "iter_0000004.partial" / "rank_state" / "mp_rank_00_000_dp000.pt")
    _run(out, "killed", data, "--save", str(out / "ckpt"), "--save-interval", "2")
    raise AssertionError("unreachable: rank 1 is killed during the save of iteration 4")


def _refused(rank: int, data: str, out: pathlib.Path, ckpt: pathlib.Path, victim: str, bad_rank: int) -> None:
    """A copy of ``ckpt`` with one byte of ``victim`` (relative to iteration 2) flipped: every rank refuses."""
    from distlion_ds import checkpoint_io as cio
    from distlion_ds.megatron import pretrain_gpt

    bad = out / f"bad_{victim.replace('/', '_')}_{rank}"
    shutil.copytree(ckpt, bad)
    path = bad / "iter_0000002" / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    path.write_bytes(bytes(raw))
    args = [*ARGS, "--data-path", data, "--out", str(out / f"refused{rank}"), "--load", str(bad)]
    if rank == bad_rank:
        with pytest.raises(cio.CheckpointCorruptError, match="previous checkpoint") as e:
            pretrain_gpt.main(args)
        assert str(path) in str(e.value)
    else:
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{bad_rank}\] could not read"):
            pretrain_gpt.main(args)


def _second(rank, world, data, out):
    _prepare(rank)
    from _mcore_ckpt import assert_same, contents

    from distlion_ds import checkpoint_io as cio

    out = pathlib.Path(out)
    ckpt = out / "ckpt"
    # What the kill left: the tracker names 2; iteration 4 exists only as the partial folder, where rank 0's side
    # file is complete and rank 1's is a torn temporary.
    assert cio.read_verified_text(ckpt / TRACKER) == "2\n"
    assert not (ckpt / "iter_0000004").exists() and (ckpt / "iter_0000004.partial" / ".metadata").exists()
    side = sorted(p.name for p in (ckpt / "iter_0000004.partial" / "rank_state").iterdir())
    assert side[1:] == ["mp_rank_00_000_dp000.pt", "mp_rank_00_000_dp000.pt.sha256"], side
    assert side[0].startswith(".mp_rank_00_001_dp000.pt.tmp."), side

    # Corruption, refused on every rank: a dist_checkpointing file (checked against the manifest by the rank whose
    # share of the sorted file list holds it) and a side file (checked by its own rank).
    names = sorted(json.loads(cio.read_verified_text(ckpt / "iter_0000002" / "distlion_manifest.json"))["files"])
    distcp = next(n for n in names if n.endswith(".distcp"))
    _refused(rank, data, out, ckpt, distcp, names.index(distcp) % world)
    _refused(rank, data, out, ckpt, "rank_state/mp_rank_00_001_dp000.pt", 1)

    _run(out, "resumed", data, "--load", str(ckpt), "--save", str(ckpt))
    dist.barrier()  # rank 0 writes summary.json after the run's last collective: the other ranks wait for it
    full = json.loads((out / "full" / "summary.json").read_text())
    resumed = json.loads((out / "resumed" / "summary.json").read_text())
    assert resumed["start_iteration"] == 2 and resumed["losses"] == full["losses"][2:], (full, resumed)
    assert cio.read_verified_text(ckpt / TRACKER) == "4\n" and not (ckpt / "iter_0000004.partial").exists()
    if rank == 0:
        assert_same(contents(out / "ckpt_full" / "iter_0000004", out / "cmp" / "a.pt"),
                    contents(ckpt / "iter_0000004", out / "cmp" / "b.pt"), "iteration 4", skip=("_extra_state",))


@pytest.mark.slow
def test_kill_during_save_then_resume_is_exact(tiny_data, tmp_path):
    with pytest.raises(AssertionError) as e:  # spawn reports the killed rank (or its peer's broken connection)
        spawn(_first, 2, tiny_data, str(tmp_path))
    assert "unreachable" not in str(e.value) and (tmp_path / "killed").exists(), str(e.value)[-3000:]
    spawn(_second, 2, tiny_data, str(tmp_path))
