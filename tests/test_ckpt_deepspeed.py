"""DeepSpeed checkpoints through distlion_ds (issue 9, item 2): kill -9 during a save, then resume bit for bit.

Three 2-rank spawns (each ~10-15 s, mostly imports):
1. trains K steps, saves tag "a", trains K more (the uninterrupted reference), then saves tag "b" and is SIGKILLed
   on rank 0 in the middle of writing DeepSpeed's model file (a torn temporary; "latest" still names "a");
2. resumes through "latest" (= "a"), trains K steps: bit for bit the reference; corrupted copies of "a" refused
   (a corrupt momentum file on one rank makes every rank raise);
   saves tag "c" and is SIGKILLed on rank 0 just before the "latest" rename (every file of "c" complete);
3. resumes through "latest" (still "a": the marker is written last) bit for bit again; "c" loaded by its tag equals
   the reference state.
"""

import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from _dist import spawn
from _kill import kill_mid_write

LR = 1e-2
K = 3
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 4}}
CONFIG = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6, "gradient_clipping": 0.0,
          "optimizer": {"type": "DistributedLion", "params": {"lr": LR, "betas": [0.9, 0.99]}}, "scheduler": WARMUP}


class _Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Parameter(torch.zeros(6))  # zero-rule moves: a lost step counter shows here

    def forward(self, x, y):
        return F.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


def _setup():
    import logging

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 30-45 s JIT build (DESIGN 4)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)


def _engine(seed=0):
    import distlion_ds

    engine, opt, _, _ = distlion_ds.initialize(model=_Net(seed), config=CONFIG)
    return engine, opt


def _train(engine, steps, rank):
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        engine.backward(engine(x, y))
        engine.step()


def _state(engine, opt):
    return {"params": [p.detach().clone() for p in engine.module.parameters()],
            "momentum": [opt.state[p]["exp_avg"].clone() for p in engine.module.parameters()],
            "step": opt.param_groups[0]["step"], "lr": opt.param_groups[0]["lr"], "global_steps": engine.global_steps}


def _assert_state(got, want):
    assert got["step"] == want["step"] and got["lr"] == want["lr"] and got["global_steps"] == want["global_steps"]
    for a, b in zip(got["params"], want["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got["momentum"], want["momentum"], strict=True):
        assert torch.equal(a, b)


def _killed(outdir, what):
    (outdir / f"killed_{what}").write_text("")  # the test checks the kill happened where it was meant to
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_mid_write(outdir, basename_suffix):
    """SIGKILL this process after the second chunk torch.save streams into the temporary of a matching file."""
    kill_mid_write(outdir / "killed_mid_write", basename_suffix)


def _kill_before_rename(outdir, basename):
    from distlion_ds import checkpoint_io as cio

    original = cio._rename_durably

    def rename_durably(tmp, path):
        if os.path.basename(path) == basename:
            _killed(outdir, "before_rename")
        return original(tmp, path)

    cio._rename_durably = rename_durably


def _first_run(rank, world, outdir):
    _setup()
    from distlion_ds import checkpoint_io as cio

    ckpt = outdir / "ckpt"
    engine, opt = _engine()
    _train(engine, range(1, K + 1), rank)
    engine.save_checkpoint(str(ckpt), tag="a")
    tag_files = sorted(p.name for p in (ckpt / "a").iterdir())
    assert tag_files == ["distlion_optim_mp_rank_00_dp_rank_000.pt", "distlion_optim_mp_rank_00_dp_rank_000.pt.sha256",
                         "distlion_optim_mp_rank_00_dp_rank_001.pt", "distlion_optim_mp_rank_00_dp_rank_001.pt.sha256",
                         "mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt.sha256"], tag_files
    for name in tag_files:
        if name.endswith(".pt"):
            cio.verify_file(ckpt / "a" / name)  # DeepSpeed's own file too went through checkpoint_io
    assert cio.read_verified_text(ckpt / "latest") == "a"
    _train(engine, range(K + 1, 2 * K + 1), rank)
    torch.save(_state(engine, opt), outdir / f"ref_rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        _kill_mid_write(outdir, "mp_rank_00_model_states.pt")
    engine.save_checkpoint(str(ckpt), tag="b")
    raise AssertionError("unreachable: rank 0 is killed during the save of 'b'")


def _resume_and_check(rank, outdir):
    ref = torch.load(outdir / f"ref_rank{rank}.pt", weights_only=False)
    engine, opt = _engine(seed=123)
    load_path, _ = engine.load_checkpoint(str(outdir / "ckpt"))  # through 'latest'
    assert load_path is not None and os.path.basename(os.path.dirname(load_path)) == "a", load_path
    assert opt.param_groups[0]["step"] == K and engine.global_steps == K
    _train(engine, range(K + 1, 2 * K + 1), rank)
    _assert_state(_state(engine, opt), ref)  # bit for bit the uninterrupted run
    return engine, opt, ref


def _second_run(rank, world, outdir):
    _setup()
    from distlion_ds import checkpoint_io as cio

    ckpt = outdir / "ckpt"
    # What the kill left: "b" has both momentum files (written before DeepSpeed's) but no model file, only
    # rank 0's torn temporary; "latest" still names "a".
    b_files = sorted(p.name for p in (ckpt / "b").iterdir())
    assert "mp_rank_00_model_states.pt" not in b_files and any(n.startswith(".mp_rank_00") for n in b_files)
    assert cio.read_verified_text(ckpt / "latest") == "a"
    # Corrupted copies of "a": a flipped byte in DeepSpeed's model file, a truncated momentum file, a hand-edited
    # marker: each refused, naming the file (every rank has its own copy and fails at the same point).
    engine, _ = _engine(seed=9)
    bad = outdir / f"bad{rank}"
    shutil.copytree(ckpt, bad)
    model_file = bad / "a" / "mp_rank_00_model_states.pt"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 1
    model_file.write_bytes(bytes(raw))
    with pytest.raises(cio.CheckpointCorruptError, match="previous checkpoint") as e:
        engine.load_checkpoint(str(bad))
    assert str(model_file) in str(e.value)
    shutil.copy(ckpt / "a" / "mp_rank_00_model_states.pt", model_file)
    # Rank 1's momentum file only: rank 1 names the file, rank 0 (whose own file is fine) names rank 1, and both
    # raise now rather than at the first training collective.
    momentum_file = bad / "a" / "distlion_optim_mp_rank_00_dp_rank_001.pt"
    momentum_file.write_bytes(momentum_file.read_bytes()[:-100])
    if rank == 1:
        with pytest.raises(cio.CheckpointCorruptError, match="truncated or corrupted") as e:
            engine.load_checkpoint(str(bad))
        assert str(momentum_file) in str(e.value)
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] could not load their DistributedLion momentum"):
            engine.load_checkpoint(str(bad))
    (bad / "latest").write_text("b")
    with pytest.raises(cio.CheckpointCorruptError, match="latest"):
        engine.load_checkpoint(str(bad))
    engine, opt, ref = _resume_and_check(rank, outdir)
    torch.distributed.barrier()
    if rank == 0:
        _kill_before_rename(outdir, "latest")
    engine.save_checkpoint(str(ckpt), tag="c")
    raise AssertionError("unreachable: rank 0 is killed before 'latest' names 'c'")


def _third_run(rank, world, outdir):
    _setup()
    from distlion_ds import checkpoint_io as cio

    ckpt = outdir / "ckpt"
    assert cio.read_verified_text(ckpt / "latest") == "a"  # the marker is written last: still "a"
    _resume_and_check(rank, outdir)
    ref = torch.load(outdir / f"ref_rank{rank}.pt", weights_only=False)
    engine, opt = _engine(seed=5)
    load_path, _ = engine.load_checkpoint(str(ckpt), tag="c")  # every file of "c" was complete
    assert os.path.basename(os.path.dirname(load_path)) == "c"
    _assert_state(_state(engine, opt), ref)


@pytest.mark.slow
def test_kill_during_save_then_resume_is_exact(tmp_path):
    for run, point in ((_first_run, "mid_write"), (_second_run, "before_rename")):
        with pytest.raises(AssertionError) as e:  # spawn reports the killed rank (or its peer's broken pipe)
            spawn(run, 2, tmp_path)
        assert "unreachable" not in str(e.value) and (tmp_path / f"killed_{point}").exists(), str(e.value)[-2000:]
    spawn(_third_run, 2, tmp_path)
