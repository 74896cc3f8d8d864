"""AQ-SGD disk store exact across hard kills, one set of files per rank (issue 9 item 3).

- One process pair of compressors (sender / receiver, each with its own disk store) killed with SIGKILL after a
  checkpoint, resumed from it: the transfers equal those of an uninterrupted run, bit for bit. A flipped byte in a
  checkpointed buffer, and an older checkpoint whose slots were reused, are refused naming the file.
- End to end: ``distlion_ds.megatron.pretrain_gpt`` at pp=2 x dp=2 with the shipped ``aqsgd_q2_disk.json`` (two
  data-parallel ranks on one store path) runs; killed with SIGKILL on every rank one iteration after a checkpoint
  (AQ-SGD delta epoch: buffers updated after the checkpoint) and resumed, it equals the uninterrupted run: losses,
  parameters, optimizer state and every AQ-SGD buffer (by CRC-32).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp
from _dist import free_port, spawn

from distlion_ds.compress import CompressionConfig, CompressionState, DiskSampleStore, Mode, PipeCompressor

logger = logging.getLogger(__name__)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "compression" / "aqsgd_q2_disk.json"
N = 8  # transfers; checkpoint after CKPT, kill after KILL
CKPT, KILL = 4, 6


def _pair(root: str) -> tuple[PipeCompressor, PipeCompressor]:
    cfg = {"activations": {"method": "quantize", "bits": 2, "stochastic": True, "feedback": "aqsgd"},
           "gradients": {"method": "topk", "ratio": 0.2, "feedback": "ef21"},
           "aqsgd": {"store": "disk", "path": root, "buffer_dtype": "bfloat16", "warmup_epochs": 1}}
    out = []
    for tag in ("pp0", "pp1"):  # one store per rank, as the communicator binds them
        state = CompressionState(CompressionConfig.from_json(cfg))
        state.bind_rank(tag)
        out.append(PipeCompressor(state))
    return out[0], out[1]


def _data():
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(16, 2, 24, generator=g) for _ in range(N)]
    ids = [[(2 * i) % 6, (2 * i + 1) % 6] for i in range(N)]  # 3 micro-batches per epoch, 6 samples
    return xs, ids


def _transfers(snd, rcv, start: int, stop: int) -> list[torch.Tensor]:
    xs, ids = _data()
    out = []
    for i in range(start, stop):
        for s in (snd, rcv):
            s.state.set_epoch(i // 3)
        mode = snd.mode("activations", True)
        f = snd.encode("activations", xs[i], stage=0, chunk=0, mode=mode, sample_ids=ids[i])
        out.append(rcv.decode("activations", f, xs[i].shape, xs[i].dtype, mode, cut=(0, 0))[0])
        g = snd.encode("gradients", xs[i] * 0.1, stage=0, chunk=0, mode=Mode.TRAIN)
        out.append(rcv.decode("gradients", g, xs[i].shape, xs[i].dtype, Mode.TRAIN, cut=(0, 0))[0])
    return out


def _killed_child(root: str, ckpt: str, first: str) -> None:
    snd, rcv = _pair(root)
    outs = _transfers(snd, rcv, 0, CKPT)
    torch.save({"snd": snd.state.state_dict(), "rcv": rcv.state.state_dict()}, ckpt)
    torch.save(outs, first)
    _transfers(snd, rcv, CKPT, KILL)  # AQ-SGD deltas: every buffer these samples have is updated after the save
    os.kill(os.getpid(), signal.SIGKILL)


def _load(root: str, ckpt: str) -> tuple[PipeCompressor, PipeCompressor]:
    snd, rcv = _pair(root)
    blob = torch.load(ckpt, weights_only=False)
    snd.state.load_state_dict(blob["snd"])
    rcv.state.load_state_dict(blob["rcv"])
    return snd, rcv


def test_hard_kill_after_checkpoint_resumes_exactly(tmp_path):
    ref = _transfers(*_pair(str(tmp_path / "ref")), 0, N)
    root, ckpt, first = str(tmp_path / "run"), str(tmp_path / "ckpt.pt"), str(tmp_path / "first.pt")
    child = mp.get_context("spawn").Process(target=_killed_child, args=(root, ckpt, first))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, child.exitcode

    # The buffers written after the checkpoint reached the files (in slots the checkpoint does not name).
    snd, rcv = _load(root, ckpt)
    s = next(iter(snd.state.samples._open().values()))
    protected = set(s.table.values())
    later = [i for i in range(s._capacity()) if i not in protected and s.read(i).any()]
    assert later, "the killed run wrote no buffer after the checkpoint: the test would prove nothing"

    got = torch.load(first, weights_only=False) + _transfers(snd, rcv, CKPT, N)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))

    # A checkpoint's buffer corrupted on disk: refused, naming the file.
    slot = next(iter(protected))
    with open(s.path, "r+b") as f:
        f.seek(slot * s.slot_bytes + 3)
        byte = f.read(1)
        f.seek(slot * s.slot_bytes + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ValueError, match=rf"AQ-SGD store file {s.path}: .*CRC-32 mismatch.*latest checkpoint"):
        _load(root, ckpt)


def test_older_checkpoint_refused_once_its_slots_are_reused(tmp_path):
    root = str(tmp_path / "run")
    snd, rcv = _pair(root)
    _transfers(snd, rcv, 0, CKPT)
    old = {"snd": snd.state.state_dict(), "rcv": rcv.state.state_dict()}
    _transfers(snd, rcv, CKPT, N)
    snd.state.state_dict(), rcv.state.state_dict()  # a later checkpoint: the old one's slots become free
    _transfers(snd, rcv, 0, 3)  # every sample written again (epoch 0 ids)
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="rewritten after a later checkpoint"):
        _load(root, str(tmp_path / "old.pt"))
    store = snd.state.samples
    assert all(len(s.table) == 6 for s in store._open().values())
    # at most two slots per sample: the sealed one and the one written since
    assert all(s.n_slots <= 12 for s in store._open().values()), [s.n_slots for s in store._open().values()]


# ------------------------------------------------------------------------------------- end to end, pp=2 x dp=2

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--eval-iters", "1", "--log-interval", "1",
        "--pipeline-model-parallel-size", "2", "--optimizer", "distlion", "--lr", "3e-3", "--train-iters", "4",
        "--epoch-samples", "16", "--p2p-compression", str(SHIPPED)]


def _main(data: str, cwd: pathlib.Path, *extra: str) -> None:
    import distlion_ds.kernels._dispatch as dispatch
    from distlion_ds.megatron import pretrain_gpt

    dispatch.INTERPRET = False  # torch references on CPU tensors (the interpreter is ~100x slower)
    torch.set_num_threads(1)
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)  # the shipped config's store path is relative: runs/aqsgd_buffers under this folder
    assert pretrain_gpt.main([*BASE, "--data-path", data, "--out", str(cwd / "out"), *extra]) == 0


def _killed_worker(rank: int, world: int, port: int, data: str, root: str) -> None:
    import torch.distributed as dist

    from distlion_ds.megatron import CompressedP2PCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    set_epoch = CompressedP2PCommunicator.set_epoch
    calls = []

    def kill_at_iteration_4(self, epoch):
        calls.append(epoch)
        if len(calls) == 4:  # iteration 3 (delta epoch) ran after the checkpoint of iteration 2
            dist.barrier()  # every rank is done with iteration 3's traffic
            os.kill(os.getpid(), signal.SIGKILL)
        return set_epoch(self, epoch)

    CompressedP2PCommunicator.set_epoch = kill_at_iteration_4
    part = pathlib.Path(root) / "part"
    _main(data, part, "--save", str(part / "ckpt"), "--save-interval", "2")


def _resume_worker(rank: int, world: int, data: str, root: str) -> None:
    full, part = pathlib.Path(root) / "full", pathlib.Path(root) / "part"
    _main(data, full, "--save", str(full / "ckpt"))
    _main(data, part, "--load", str(part / "ckpt"), "--save", str(part / "ckpt"))


def _buffers_by_sample(p2p: dict) -> dict:
    """{stream: {sample id: CRC-32 of its buffer}}: slot numbers may differ between runs, contents may not."""
    streams = p2p["samples"]["streams"]
    return {n: {sid: m["crc"][str(slot)] for sid, slot in m["slots"].items()} for n, m in streams.items()}


@pytest.mark.slow
def test_disk_store_dp2_hard_kill_resume_equals_uninterrupted(tiny_data, tmp_path):
    t0 = time.perf_counter()
    ctx = mp.start_processes(_killed_worker, args=(4, free_port(), tiny_data, str(tmp_path)), nprocs=4,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(300)
    codes = [p.exitcode for p in ctx.processes]
    assert codes == [-signal.SIGKILL] * 4, codes
    ckpt = tmp_path / "part" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    stores = sorted((tmp_path / "part" / "runs" / "aqsgd_buffers").iterdir())
    assert [d.name for d in stores] == ["pp0-dp0", "pp0-dp1", "pp1-dp0", "pp1-dp1"]  # one folder per rank
    # The killed run wrote buffers after its checkpoint (iteration 3 sends deltas), in slots the checkpoint does not
    # name: the resume below must ignore them. (Opened read-only in effect: nothing is sealed here.)
    later = 0
    for d in stores:
        for s in DiskSampleStore(torch.bfloat16, str(d))._open().values():
            protected = set(s.table.values())
            later += sum(1 for i in range(s._capacity()) if i not in protected and s.read(i).any())
    assert later > 0

    spawn(_resume_worker, 4, tiny_data, str(tmp_path))
    full = json.loads((tmp_path / "full" / "out" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "out" / "summary.json").read_text())
    assert part["start_iteration"] == 2 and part["end_iteration"] == 4
    assert full["losses"][2:] == part["losses"], (full["losses"], part["losses"])
    from _mcore_ckpt import assert_same, contents

    a = contents(tmp_path / "full" / "ckpt" / "iter_0000004", tmp_path / "cmp" / "a.pt")
    b = contents(tmp_path / "part" / "ckpt" / "iter_0000004", tmp_path / "cmp" / "b.pt")
    # model and optimizer (dist_checkpointing's tensors) bit for bit
    assert_same({k: v for k, v in a.items() if k.startswith("dcp/")},
                {k: v for k, v in b.items() if k.startswith("dcp/")}, "model and optimizer", skip=("_extra_state",))
    files = sorted(k for k in a if k.startswith("rank_state/"))
    assert len(files) == 4  # one side file per rank: the p2p compression state is per rank
    for f in files:
        assert a[f]["p2p"]["samples"]["kind"] == "disk" and a[f]["p2p"]["epoch"] == b[f]["p2p"]["epoch"] == 1
        bufs = _buffers_by_sample(a[f]["p2p"])
        # 16 samples per epoch, 8 per data-parallel rank, one stream per rank (pp0 sends, pp1 receives)
        assert len(bufs) == 1 and all(len(v) == 8 for v in bufs.values()), {n: len(v) for n, v in bufs.items()}
        assert bufs == _buffers_by_sample(b[f]["p2p"]), f
    shutil.rmtree(tmp_path / "full" / "runs", ignore_errors=True)
    logger.info("pp2 x dp2 disk store, kill + resume: %.1f s", time.perf_counter() - t0)
