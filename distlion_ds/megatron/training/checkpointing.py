"""Checkpoints of the entry through ``megatron.core.dist_checkpointing`` (``--ckpt-format torch_dist``).

Layout of ``<save>/`` (Megatron-LM's names)::

    latest_checkpointed_iteration.txt (+ .sha256)  the tracker: written last, atomically, after every rank finished
    iter_0000004/                                  dist_checkpointing's files (``.metadata``, ``__<r>_<t>.distcp``,
                                                   ``common.pt``, ``metadata.json``) plus
      distlion_manifest.json (+ .sha256)           SHA-256 of each of those files
      rank_state/mp_rank_TT_PPP_dpDDD.pt (+ .sha256)  this rank's own state (below), through checkpoint_io

What goes where: the model chunks' ``sharded_state_dict()`` and the optimizer's ``sharded_state_dict`` (D-Lion: every
DP rank's own momentum, see :mod:`distlion_ds.megatron.optimizer`; AdamW: megatron-core's, DP rank 0's copy) are
sharded tensors; iteration, skipped steps, the LR scheduler and the layout are common state (identical on every
rank); the RNG states (Python, NumPy, torch, CUDA, megatron's tracker) and the p2p / tied-embedding compression state
(EF residuals, AQ-SGD buffers, transfer counters: different on every rank) go to the rank's side file.

Nothing is lost on a crash: a save writes into ``iter_N.partial/``; when every rank is done (a barrier), rank 0 writes
the manifest, renames the folder to ``iter_N`` and then rewrites the tracker (checkpoint_io: temporary, fsync,
rename). A kill at any point leaves the tracker naming the previous complete checkpoint; the next save of that
iteration removes the stale ``.partial`` folder.

What is verified at load: the tracker, each rank's side file and every dist_checkpointing file against the manifest
(SHA-256; the ranks split the files), before anything is read; a mismatch raises
:class:`~distlion_ds.checkpoint_io.CheckpointCorruptError` naming the file, on its rank, and every other rank names
the failed ranks (no collective is left waiting). dist_checkpointing itself checks only structure (keys, shapes,
the DP size of D-Lion's momentum axis), not content: without the manifest a flipped byte inside a ``.distcp`` tensor
loads silently.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distlion_ds import checkpoint_io as cio
from distlion_ds.comm import raise_together

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "distlion_manifest.json"
RANK_DIR = "rank_state"
FORMAT = "distlion_ds.megatron.pretrain_gpt/2"


def iteration_dir(root: str | os.PathLike, iteration: int) -> pathlib.Path:
    """``<root>/iter_<7 digits>`` (Megatron-LM's name)."""
    return pathlib.Path(root) / f"iter_{iteration:07d}"


def rank_file(folder: pathlib.Path, ranks: dict) -> pathlib.Path:
    """This rank's side file in an iteration folder."""
    return folder / RANK_DIR / f"mp_rank_{ranks['tp']:02d}_{ranks['pp']:03d}_dp{ranks['dp']:03d}.pt"


def rng_state() -> dict:
    """Every RNG the run draws from (dropout on CPU uses the default generator)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]  # Megatron-LM's keys


def sharded_state(chunks: list, opt, sched, *, common: dict, is_loading: bool) -> dict:
    """The ``dist_checkpointing`` state dict: model chunks, optimizer, scheduler and ``common`` entries."""
    model = {k: c.module.sharded_state_dict() for k, c in zip(_model_keys(chunks), chunks, strict=True)}
    out = {**model, "opt_param_scheduler": sched.state_dict(), **common}
    if hasattr(opt, "sharded_state_dict"):  # local steps: the optimizer state is per rank, in the side file
        out["optimizer"] = opt.sharded_state_dict(model, is_loading=is_loading)
    return out


def _share(files: list[str]) -> list[str]:
    return files[dist.get_rank()::dist.get_world_size()]


def save_checkpoint(root: str, iteration: int, *, chunks: list, opt, sched, common: dict, rank_state: dict,
                    ranks: dict) -> None:
    """Save iteration ``iteration`` under ``root`` (collective; module docstring for the order of writes)."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        cio.makedirs_durable(root)
        if partial.exists():  # a save of this iteration that was killed: never named by the tracker
            shutil.rmtree(partial)
        cio.makedirs_durable(partial)
    dist.barrier()
    state = sharded_state(chunks, opt, sched, common={**common, "iteration": iteration, "format": FORMAT},
                          is_loading=False)
    dist_checkpointing.save(state, str(partial))
    mine = rank_file(partial, ranks)
    cio.makedirs_durable(mine.parent)
    cio.atomic_save(rank_state, mine)
    dist.barrier()  # every rank's files are complete
    names: list[Any] = [None]
    if dist.get_rank() == 0:
        names = [sorted(str(p.relative_to(partial)) for p in partial.rglob("*")
                        if p.is_file() and p.parts[len(partial.parts)] != RANK_DIR)]
    dist.broadcast_object_list(names, src=0)
    digests = {name: cio.file_sha256(partial / name) for name in _share(names[0])}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    if dist.get_rank() == 0:
        manifest = {name: d for part in gathered for name, d in part.items()}
        cio.atomic_write_text(partial / MANIFEST, json.dumps({"files": dict(sorted(manifest.items()))}, indent=1))
        tracker = pathlib.Path(root) / TRACKER_FILE
        if final.exists():  # a leftover of an earlier run at this iteration; the tracker must not name it
            if tracker.exists() and cio.read_verified_text(tracker).strip() == str(iteration):
                raise FileExistsError(f"--save {root}: iteration {iteration} is already the latest checkpoint; "
                                      "refusing to replace it in place")
            shutil.rmtree(final)
        os.replace(partial, final)
        cio.fsync_dir(root)
        cio.atomic_write_text(tracker, f"{iteration}\n")
        logger.info("saved checkpoint of iteration %d to %s", iteration, root)
    dist.barrier()


def _verify(root: str, ranks: dict) -> tuple[int, pathlib.Path, dict]:
    tracker = pathlib.Path(root) / TRACKER_FILE
    if not tracker.exists():
        raise FileNotFoundError(f"--load {root}: no {TRACKER_FILE} (nothing saved there)")
    iteration = int(cio.read_verified_text(tracker).strip())
    folder = iteration_dir(root, iteration)
    manifest = json.loads(cio.read_verified_text(folder / MANIFEST))["files"]
    for name in _share(sorted(manifest)):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"--load {root}: {path} (listed in {MANIFEST}) is missing")
        actual = cio.file_sha256(path)
        if actual != manifest[name]:
            raise cio.CheckpointCorruptError(path, f"SHA-256 {actual[:16]}... differs from {manifest[name][:16]}... "
                                             f"recorded in {folder / MANIFEST} (truncated or corrupted)")
    mine = rank_file(folder, ranks)
    if not mine.exists():
        raise FileNotFoundError(f"--load {root}: {mine} of iteration {iteration} is missing; was it saved with "
                                "another parallel layout?")
    # weights_only=False: the RNG states hold Python and NumPy objects; the file passed its checksum.
    return iteration, folder, cio.load_verified(mine, map_location="cpu", weights_only=False)


def load_checkpoint(root: str, *, chunks: list, opt, sched, layout: dict, ranks: dict, distlion: bool
                    ) -> tuple[int, dict, dict]:
    """Verify and load the latest checkpoint under ``root`` into the chunks, optimizer and scheduler (collective).

    Returns:
        ``(iteration, common state, this rank's side state)``; the caller restores RNG and compression state.
    Raises:
        CheckpointCorruptError / FileNotFoundError on the rank whose file failed, RuntimeError naming those ranks on
        the others; ValueError when the checkpoint was saved with another layout or data-parallel size.
    """
    from megatron.core import dist_checkpointing

    try:
        iteration, folder, side = _verify(root, ranks)
        error = None
    except Exception as e:  # missing, corrupt, unreadable: re-raised below, after the other ranks are told
        iteration, folder, side, error = None, None, None, e
    raise_together(error, lambda bad: f"--load {root}: rank(s) {bad} could not read their checkpoint files "
                   "(their errors name the files); load the previous checkpoint or fix those files")
    common = dist_checkpointing.load_common_state_dict(str(folder))
    if common.get("format") != FORMAT or common.get("layout") != layout:
        raise ValueError(f"--load {root}: saved with {common.get('layout')} ({common.get('format')}), this run is "
                         f"{layout} ({FORMAT}); resume with the arguments it was saved with, or train without --load")
    if distlion and hasattr(opt, "sharded_state_dict"):
        from distlion_ds.megatron import prepare_checkpoint_load

        prepare_checkpoint_load(str(folder), opt)
    loaded = dist_checkpointing.load(sharded_state(chunks, opt, sched, common={}, is_loading=True), str(folder))
    for key, chunk in zip(_model_keys(chunks), chunks, strict=True):
        chunk.module.load_state_dict(loaded[key])
    if "optimizer" in loaded:
        opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["opt_param_scheduler"])
    logger.info("resumed from iteration %d of %s", iteration, root)
    return iteration, common, side
