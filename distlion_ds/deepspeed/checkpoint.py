"""Per-rank D-Lion momentum in DeepSpeed checkpoints.

Without ZeRO, DeepSpeed writes the optimizer state once per model-parallel rank, from data-parallel rank 0 only
(``mp_rank_XX_model_states.pt``). That is enough for Adam, whose state is replicated, but every D-Lion rank has
its own momentum (an EMA of its own local gradients, DESIGN 3.1). So next to DeepSpeed's files each rank writes

    <save_dir>/<tag>/distlion_optim_mp_rank_XX_dp_rank_YYY.pt

holding its DistributedLion ``state_dict()`` (momentum ``exp_avg`` per parameter and the step counter ``step``
per param group, which the zero rule depends on) and the DP/MP sizes it was saved with.

Loading with a different data-parallel size (the policy, logged as a warning):
    rank ``r`` of the new run loads the momentum saved by DP rank ``r % N_saved``.
Why: each saved momentum is an EMA of one worker's local gradients; with data sharded i.i.d. across workers any
of them is a valid state for a worker, so every new rank starts from a real, warmed-up worker momentum (its
magnitude and sign statistics intact). Resetting to zero instead would make the next ~1/(1-beta2) steps
(100 at beta2=0.99) vote on ``(1-beta1)*g``, the sign of single noisy gradients, i.e. a cold restart; averaging all
saved momenta would hand every rank the same momentum, so the first votes would be perfectly correlated (all
ranks agree), which removes exactly the per-worker diversity majority voting relies on. Growing, ranks ``r`` and
``r + N_saved`` start from the same momentum and decorrelate as their own gradients enter it; shrinking, the
momenta of the dropped ranks are not used. The step counter is global (equal on every rank) and always kept.
A different model-parallel size is refused (the parameters themselves would have to be resharded).
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

__all__ = [
    "MOMENTUM_FILE_PREFIX",
    "install_checkpoint_hooks",
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
    os.makedirs(tag_dir, exist_ok=True)
    path = momentum_checkpoint_path(tag_dir, mp_rank, dp_rank)
    payload = {
        "format_version": _FORMAT_VERSION,
        "optimizer": optimizer.state_dict(),
        "dp_rank": dp_rank,
        "dp_world_size": dp_size,
        "mp_rank": mp_rank,
        "mp_world_size": mp_size,
    }
    torch.save(payload, path)
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
    source = dp_rank % saved_size
    payload = torch.load(momentum_checkpoint_path(tag_dir, mp_rank, source), map_location="cpu", weights_only=True)
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
    if saved_size != dp_size and dp_rank == 0 and mp_rank == 0:
        logger.warning(
            "DistributedLion checkpoint %s was saved with %d data-parallel ranks, loading into %d: rank r loads the "
            "momentum of saved rank r %% %d (step counter kept); see distlion_ds.deepspeed.checkpoint for why.",
            tag_dir,
            saved_size,
            dp_size,
            saved_size,
        )
    optimizer.load_state_dict(payload["optimizer"])
    return source


def install_checkpoint_hooks(engine: Any, optimizer: torch.optim.Optimizer, dp_group: Any) -> None:
    """Make ``engine.save_checkpoint`` / ``engine.load_checkpoint`` also save / load every rank's momentum.

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

    @functools.wraps(original_save)
    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = save_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        tag = bound.arguments.get("tag")
        if tag is None:  # the same default DeepSpeed applies
            tag = f"global_step{engine.global_steps}"
        bound.arguments["tag"] = str(tag)
        # Written before DeepSpeed's own save: its first barrier then guarantees every rank's file exists before
        # rank 0 writes the 'latest' pointer to this tag.
        save_momentum(engine, optimizer, dp_group, os.path.join(bound.arguments["save_dir"], str(tag)))
        return original_save(*bound.args, **bound.kwargs)

    @functools.wraps(original_load)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = load_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        load_path, client_state = original_load(*bound.args, **bound.kwargs)
        # DeepSpeed has just loaded DP rank 0's optimizer state into every rank; replace it with this rank's own.
        if (
            load_path is not None
            and bound.arguments.get("load_optimizer_states", True)
            and not bound.arguments.get("load_module_only", False)
        ):
            load_momentum(engine, optimizer, dp_group, os.path.dirname(load_path))
        return load_path, client_state

    engine._distlion_original_save_checkpoint = original_save
    engine._distlion_original_load_checkpoint = original_load
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    setattr(engine, _HOOK_MARKER, True)
    logger.info("distlion_ds: engine.save_checkpoint/load_checkpoint also keep every DP rank's D-Lion momentum")
