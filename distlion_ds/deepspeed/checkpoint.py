"""Per-rank D-Lion momentum in DeepSpeed checkpoints.

Without ZeRO, DeepSpeed writes the optimizer state once per model-parallel rank, from data-parallel rank 0 only
(``mp_rank_XX_model_states.pt``). That is enough for Adam, whose state is replicated, but every D-Lion rank has
its own momentum (an EMA of its own local gradients, DESIGN 3.1). So next to DeepSpeed's files each rank writes

    <save_dir>/<tag>/distlion_optim_mp_rank_XX_dp_rank_YYY.pt

holding its DistributedLion ``state_dict()`` (momentum ``exp_avg`` per parameter and the step counter ``step``
per param group, which the zero rule depends on) and the DP/MP sizes it was saved with.

Loading with a different data-parallel size (the step policy of :mod:`distlion_ds.optim.policy`, rule 4, the same
for the megatron-core optimizer; logged as a warning):
    rank ``r`` of the new run loads the momentum saved by DP rank ``r % N_saved``.
Hierarchical D-Lion (``intra_node_size`` > 1) is the exception: each rank holds one shard of its node's momentum, so
another DP size, node size or local rank is refused naming both layouts (DeepSpeed first loads DP rank 0's optimizer
state into every rank; that copy is tolerated and replaced by each rank's own file, see optim/hierarchical.py).
Why: each saved momentum is an EMA of one worker's local gradients; with data sharded i.i.d. across workers any
of them is a valid state for a worker, so every new rank starts from a real, warmed-up worker momentum (its
magnitude and sign statistics intact). Resetting to zero instead would make the next ~1/(1-beta2) steps
(100 at beta2=0.99) vote on ``(1-beta1)*g``, the sign of single noisy gradients, i.e. a cold restart; averaging all
saved momenta would hand every rank the same momentum, so the first votes would be perfectly correlated (all
ranks agree), which removes exactly the per-worker diversity majority voting relies on. Growing, ranks ``r`` and
``r + N_saved`` start from the same momentum and decorrelate as their own gradients enter it; shrinking, the
momenta of the dropped ranks are not used. The step counter is global (equal on every rank) and always kept.
A different model-parallel size is refused (the parameters themselves would have to be resharded).

Every file of the checkpoint goes through :mod:`distlion_ds.checkpoint_io` (temporary name, fsync, rename, SHA-256
sidecar; verified at load, a corrupt or truncated file refused with :class:`~distlion_ds.checkpoint_io.
CheckpointCorruptError`): our momentum files, and DeepSpeed's own files too, through the engine's checkpoint engine
(its ``save`` / ``load`` / ``makedirs`` seam, when it is DeepSpeed's default ``TorchCheckpointEngine``). The
``latest`` marker is written last, by global rank 0, after a barrier that follows every rank's files (DeepSpeed alone
writes it before its final barrier, so it could name a tag whose ZeRO files another rank is still writing), and is
read verified when a load follows it. A killed save therefore leaves ``latest`` naming the previous complete tag.
A checkpoint folder that holds no ``.sha256`` sidecar at all was written by plain DeepSpeed (every file our save
puts under its final name has its sidecar before it): its DeepSpeed files and its ``latest`` are loaded unverified,
with a warning naming the folder, so warm starts from other DeepSpeed runs keep working; our momentum files are
always verified.
"""

from __future__ import annotations

import functools
import glob
import inspect
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as dist

from distlion_ds.checkpoint_io import (
    atomic_save,
    atomic_write_text,
    checksum_path,
    load_verified,
    makedirs_durable,
    read_verified_text,
)
from distlion_ds.comm import raise_together
from distlion_ds.optim import policy
from distlion_ds.optim.local_steps import LocalStepsLion

__all__ = [
    "LATEST_FILE",
    "MOMENTUM_FILE_PREFIX",
    "install_checkpoint_hooks",
    "load_deepspeed_file",
    "load_momentum",
    "momentum_checkpoint_path",
    "save_momentum",
]

logger = logging.getLogger(__name__)

MOMENTUM_FILE_PREFIX = "distlion_optim"
_FORMAT_VERSION = 1
_HOOK_MARKER = "_distlion_checkpoint_hooks"


def momentum_checkpoint_path(tag_dir: str, mp_rank: int, dp_rank: int) -> str:
    """Path of the momentum file of one (model-parallel rank, data-parallel rank) in a checkpoint tag folder."""
    return os.path.join(tag_dir, f"{MOMENTUM_FILE_PREFIX}_mp_rank_{mp_rank:02d}_dp_rank_{dp_rank:03d}.pt")


def _mp_rank_and_size(engine: Any) -> tuple[int, int]:
    return int(getattr(engine, "checkpoint_mp_rank", 0)), int(getattr(engine, "mp_world_size", 1))


def save_momentum(engine: Any, optimizer: torch.optim.Optimizer, dp_group: Any, tag_dir: str) -> str:
    """Write this rank's DistributedLion state into ``tag_dir``.

    Args:
        engine: the DeepSpeed engine (for its model-parallel rank and size).
        optimizer: the DistributedLion the engine steps.
        dp_group: the data-parallel process group the optimizer votes over.
        tag_dir: ``<save_dir>/<tag>``.

    Returns:
        The path written.
    """
    mp_rank, mp_size = _mp_rank_and_size(engine)
    dp_rank, dp_size = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
    makedirs_durable(tag_dir)
    path = momentum_checkpoint_path(tag_dir, mp_rank, dp_rank)
    payload = {
        "format_version": _FORMAT_VERSION,
        "optimizer": optimizer.state_dict(),
        "dp_rank": dp_rank,
        "dp_world_size": dp_size,
        "mp_rank": mp_rank,
        "mp_world_size": mp_size,
    }
    if isinstance(optimizer, LocalStepsLion):
        # Mid-round, each rank's weights are its own (local steps since theta_out), but DeepSpeed saves the module
        # of DP rank 0 only: keep this rank's weights with its inner state, or a resume would train rank 0's.
        payload["local_parameters"] = [p.detach().clone() for p in optimizer.local_parameters()]
    atomic_save(payload, path)
    return path


def _saved_dp_ranks(tag_dir: str, mp_rank: int) -> list[int]:
    pattern = os.path.join(tag_dir, f"{MOMENTUM_FILE_PREFIX}_mp_rank_{mp_rank:02d}_dp_rank_*.pt")
    ranks = []
    for path in glob.glob(pattern):
        match = re.search(r"_dp_rank_(\d+)\.pt$", path)
        if match:
            ranks.append(int(match.group(1)))
    return sorted(ranks)


def load_momentum(engine: Any, optimizer: torch.optim.Optimizer, dp_group: Any, tag_dir: str) -> int:
    """Load this rank's DistributedLion state from ``tag_dir`` (the policy is in the module docstring).

    Args:
        engine: the DeepSpeed engine (for its model-parallel rank and size).
        optimizer: the DistributedLion the engine steps.
        dp_group: the data-parallel process group the optimizer votes over.
        tag_dir: ``<load_dir>/<tag>``.

    Returns:
        The DP rank whose momentum was loaded.

    Raises:
        FileNotFoundError: the checkpoint holds no DistributedLion momentum for this model-parallel rank.
        ValueError: the model-parallel size differs, or the saved files are incomplete.
        CheckpointCorruptError: a momentum file fails its checksum (a ``ValueError``).
    """
    mp_rank, mp_size = _mp_rank_and_size(engine)
    dp_rank, dp_size = dist.get_rank(group=dp_group), dist.get_world_size(group=dp_group)
    saved = _saved_dp_ranks(tag_dir, mp_rank)
    if not saved:
        raise FileNotFoundError(
            f"{tag_dir} holds no DistributedLion momentum files ({MOMENTUM_FILE_PREFIX}_mp_rank_{mp_rank:02d}_*): "
            "it was not saved by an engine from distlion_ds.initialize. Pass load_optimizer_states=False to load "
            "the weights and start every rank from zero momentum."
        )
    saved_size = len(saved)
    if saved != list(range(saved_size)):
        raise ValueError(f"{tag_dir}: DistributedLion momentum files are incomplete (DP ranks {saved})")
    # the step policy's rule (distlion_ds.optim.policy, shared with the megatron-core optimizer); it logs once
    source = policy.momentum_source_rank(saved_size, dp_size, dp_rank, what=f"DistributedLion checkpoint {tag_dir}")
    payload = load_verified(momentum_checkpoint_path(tag_dir, mp_rank, source), map_location="cpu", weights_only=True)
    if payload.get("dp_world_size") != saved_size:
        raise ValueError(
            f"{tag_dir}: {saved_size} DistributedLion momentum files for mp_rank {mp_rank}, but they were saved "
            f"with dp_world_size={payload.get('dp_world_size')} (files from two runs mixed?)"
        )
    if payload["mp_world_size"] != mp_size:
        raise ValueError(
            f"{tag_dir} was saved with model-parallel size {payload['mp_world_size']}, this engine has {mp_size}: "
            "DistributedLion momentum cannot be resharded across model-parallel ranks"
        )
    optimizer.load_state_dict(payload["optimizer"])
    if isinstance(optimizer, LocalStepsLion):
        optimizer.set_local_parameters(payload["local_parameters"])
    return source


def _load_momentum_everywhere(engine: Any, optimizer: torch.optim.Optimizer, dp_group: Any, tag_dir: str) -> None:
    """:func:`load_momentum` on every rank, then every rank learns which ranks failed and all of them raise.

    Each rank reads its own momentum file, so one corrupt file fails one rank only; without this the others would go
    on to the first training collective and wait there for the process-group timeout.
    """
    try:
        load_momentum(engine, optimizer, dp_group, tag_dir)
        error = None
    except Exception as e:  # re-raised below, after the other ranks are told
        error = e
    raise_together(error, lambda bad: (
        f"{tag_dir}: rank(s) {bad} could not load their DistributedLion momentum (their errors name the files); "
        "load the previous checkpoint, or pass load_optimizer_states=False to start every rank from zero momentum"))


LATEST_FILE = "latest"  # DeepSpeed's marker: the tag a load without ``tag=`` resumes from


def _has_sidecars(folder: str) -> bool:
    """Whether any file in ``folder`` has a checksum sidecar (then the folder was written through checkpoint_io)."""
    try:
        return any(name.endswith(".sha256") for name in os.listdir(folder))
    except FileNotFoundError:
        return False


_warned_unverified: set[str] = set()


def _warn_unverified(folder: str, what: str) -> None:
    if folder not in _warned_unverified:
        _warned_unverified.add(folder)
        logger.warning(
            "%s has no .sha256 checksum files (written by plain DeepSpeed, not through distlion_ds): %s loaded "
            "without verification",
            folder,
            what,
        )


def load_deepspeed_file(path: str, map_location: Any = None) -> Any:
    """Load one of DeepSpeed's checkpoint files, verified unless its folder comes from plain DeepSpeed.

    Args:
        path: a file DeepSpeed's engine asks its checkpoint engine for.
        map_location: as ``torch.load``.

    Returns:
        The loaded object (``weights_only=False``, as DeepSpeed's own engine loads: its files hold configs and
        client state, not only tensors).

    Raises:
        CheckpointCorruptError: the file fails its checksum, or it has no sidecar although its folder has some.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(checksum_path(path)) or _has_sidecars(folder):
        return load_verified(path, map_location=map_location, weights_only=False)
    _warn_unverified(folder, "its DeepSpeed files are")
    return torch.load(path, map_location=map_location, weights_only=False)


def _verify_checkpoint_engine(engine: Any) -> bool:
    """Route DeepSpeed's own checkpoint files through checkpoint_io (save, load, makedirs of the engine's
    ``checkpoint_engine``, wrapped on the instance). Only DeepSpeed's default ``TorchCheckpointEngine``: the others
    (Nebula, fast, decoupled) have their own write paths and are left as they are (logged). Returns whether done.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if type(ckpt_engine) is not TorchCheckpointEngine:
        logger.warning(
            "distlion_ds: DeepSpeed checkpoint engine %s is not TorchCheckpointEngine: DeepSpeed's own checkpoint "
            "files are written and read by it unverified (the D-Lion momentum files still are verified)",
            type(ckpt_engine).__name__,
        )
        return False

    def save(state_dict: Any, path: str) -> None:
        # torch's zip format whatever DeepSpeed's "checkpoint": {"checkpoint_serialization": ...} says: torch.load
        # reads both formats, and the zip writer is the one that streams through the hashing writer.
        atomic_save(state_dict, path)

    def load(path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location)

    def makedirs(path: str, exist_ok: bool = False) -> None:
        if not exist_ok and os.path.isdir(path):
            raise FileExistsError(f"{path} exists")
        makedirs_durable(path)

    ckpt_engine.save, ckpt_engine.load, ckpt_engine.makedirs = save, load, makedirs
    return True


def install_checkpoint_hooks(engine: Any, optimizer: torch.optim.Optimizer, dp_group: Any) -> None:
    """Make ``engine.save_checkpoint`` / ``engine.load_checkpoint`` also save / load every rank's momentum, and
    make every file of the checkpoint atomic and checksummed (module docstring).

    The engine's bound methods are wrapped on the instance (DeepSpeed has no checkpoint hook for client
    optimizers); the originals stay reachable as ``engine._distlion_original_{save,load}_checkpoint``. Idempotent.
    The wrappers bind their arguments against the original signatures, which
    ``tests/test_deepspeed_config.py`` pins.
    """
    if getattr(engine, _HOOK_MARKER, False):
        return
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint
    save_signature = inspect.signature(original_save)
    load_signature = inspect.signature(original_load)
    _verify_checkpoint_engine(engine)

    def decoupled() -> bool:
        # A decoupled checkpoint engine writes 'latest' itself when its asynchronous commit lands.
        ckpt_engine = getattr(engine, "checkpoint_engine", None)
        return bool(ckpt_engine is not None and ckpt_engine.is_decoupled())

    @functools.wraps(original_save)
    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = save_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        tag = bound.arguments.get("tag")
        if tag is None:  # the same default DeepSpeed applies
            tag = f"global_step{engine.global_steps}"
        bound.arguments["tag"] = str(tag)
        save_dir = bound.arguments["save_dir"]
        write_latest = bound.arguments.get("save_latest", True) and not decoupled()
        if write_latest:
            bound.arguments["save_latest"] = False  # written below, last, atomically
        save_momentum(engine, optimizer, dp_group, os.path.join(save_dir, str(tag)))
        result = original_save(*bound.args, **bound.kwargs)
        # DeepSpeed's save ends with a barrier over all ranks: every rank's files of this tag are complete now.
        if write_latest:
            if dist.get_rank() == 0:
                atomic_write_text(os.path.join(save_dir, LATEST_FILE), str(tag))
            dist.barrier()  # no rank goes on (and, say, loads 'latest') before it names this tag
        return result

    @functools.wraps(original_load)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = load_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        universal = bool(getattr(engine, "load_universal_checkpoint", lambda: False)())
        if bound.arguments.get("tag") is None and not universal:
            load_dir = bound.arguments["load_dir"]
            latest = os.path.join(load_dir, LATEST_FILE)
            if os.path.isfile(latest) and (os.path.exists(checksum_path(latest)) or _has_sidecars(load_dir)):
                bound.arguments["tag"] = read_verified_text(latest).strip()
            elif os.path.isfile(latest):
                _warn_unverified(os.path.abspath(load_dir), f"its {LATEST_FILE} marker is")
        load_path, client_state = original_load(*bound.args, **bound.kwargs)
        # DeepSpeed has just loaded DP rank 0's optimizer state into every rank; replace it with this rank's own.
        if (
            load_path is not None
            and bound.arguments.get("load_optimizer_states", True)
            and not bound.arguments.get("load_module_only", False)
        ):
            _load_momentum_everywhere(engine, optimizer, dp_group, os.path.dirname(load_path))
        return load_path, client_state

    engine._distlion_original_save_checkpoint = original_save
    engine._distlion_original_load_checkpoint = original_load
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    setattr(engine, _HOOK_MARKER, True)
    logger.info(
        "distlion_ds: engine.save_checkpoint/load_checkpoint also keep every DP rank's D-Lion momentum; checkpoint "
        "files are written atomically with SHA-256 sidecars and verified at load"
    )
