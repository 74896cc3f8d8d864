"""Compressed activations / gradients between DeepSpeed PipelineEngine stages (the codecs of distlion_ds.compress).

DeepSpeed users have asked for int8 pipeline p2p for years; this gives PipelineEngine the same codecs, frames and
feedback state as the megatron-core seam, configured by the same schema: a ``"p2p_compression": {...}`` block in
the DeepSpeed config (see :func:`split_p2p_compression`).

Seam: PipelineEngine runs each schedule instruction through ``self._INSTRUCTION_MAP`` (looked up on the instance),
and its four p2p instructions call ``deepspeed.runtime.pipe.p2p.send/recv`` once per tensor. :func:`enable_pipe_
compression` gives one engine its own instruction map whose send/recv entries run the original method with
``p2p.send/recv`` routed through a compressor for the duration of that instruction only, so the engine's other
p2p traffic (tensor metadata, the loss broadcast) is untouched. Per tensor, one uint8 frame replaces the tensor:
floating-point tensors are compressed; integer tensors (metadata, partition metas) and the attention / bool mask
DeepSpeed sends as the last half-precision element are passed through unchanged. Receive sizes come from the
shapes DeepSpeed already exchanges, so no extra message is added.

Stream keys: a DeepSpeed pipeline has no model chunks, so the key's ``chunk`` is the tensor's slot in the
activation tuple; ``stage`` is the forward sender's stage, as in the megatron seam. Training vs forward-only is
``torch.is_grad_enabled()`` (``eval_batch`` runs under ``torch.no_grad()``), so the ``inference`` switch applies.
AQ-SGD is not wired here: PipelineEngine loads micro-batches itself and exposes no sample ids (refused clearly).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.runtime.pipe import p2p, schedule

from distlion_ds.compress import CompressionConfig, CompressionState, PipeCompressor

logger = logging.getLogger(__name__)

CONFIG_KEY = "p2p_compression"
_MARKER = "_distlion_pipe_compression"


def split_p2p_compression(config: dict[str, Any]) -> tuple[dict[str, Any], CompressionConfig | None]:
    """Take the ``"p2p_compression"`` block out of a DeepSpeed config dict (DeepSpeed must not see it).

    Returns:
        ``(config without the block, the validated CompressionConfig or None)``.
    Raises:
        ValueError: the block is invalid (the message names the key and the allowed values).
    """
    if CONFIG_KEY not in config:
        return config, None
    rest = {k: v for k, v in config.items() if k != CONFIG_KEY}
    return rest, CompressionConfig.from_json(config[CONFIG_KEY], key=CONFIG_KEY)  # errors name p2p_compression.*


class _Router:
    """``p2p.send``/``p2p.recv`` replacements for one p2p instruction of one direction.

    ``slot`` counts the data tensors of the instruction (metadata is sent by ``_send/_recv_tensor_meta``, which
    run with ``passthrough`` set), so both sides number a tuple's tensors the same way.
    """

    def __init__(self, engine, pc: PipeCompressor, direction: str, sending: bool, buffer_id: int):
        self.engine, self.pc, self.direction, self.sending = engine, pc, direction, sending
        self.buffer_id = buffer_id
        self.mode = pc.mode(direction, torch.is_grad_enabled())  # type: ignore[arg-type]
        self.slot = 0
        self.passthrough = False
        self.send_orig, self.recv_orig = p2p.send, p2p.recv

    def _mask_slot(self) -> int:
        """Slot of the attention / bool mask DeepSpeed sends last, cast to half (never compress it); -1: none."""
        e = self.engine
        if self.direction != "activations" or not (e.has_attention_mask or e.has_bool_tensors):
            return -1
        buf = e.pipe_buffers["outputs"][self.buffer_id] if self.sending else e.pipe_recv_buf
        return len(buf) - 1 if isinstance(buf, tuple) else 0

    def _compress(self, t: torch.Tensor) -> bool:
        return not self.passthrough and t.is_floating_point() and self.slot != self._mask_slot()

    def _stage(self) -> int:
        # the cut is named by its forward sender: this stage for activations, the previous one for gradients
        return self.engine.stage_id - (self.direction == "gradients")

    def _recv_stage(self) -> int:
        # a received activation crossed the cut the previous stage sends on; a received gradient this stage's
        return self.engine.stage_id - (self.direction == "activations")

    def send(self, tensor: torch.Tensor, dest_stage: int, async_op: bool = False):
        if self._compress(tensor):
            tensor = self.pc.encode(self.direction, tensor, stage=self._stage(), chunk=self.slot,  # type: ignore
                                    mode=self.mode)
        if not self.passthrough:
            self.slot += 1
        return self.send_orig(tensor, dest_stage, async_op=async_op)

    def recv(self, tensor: torch.Tensor, src_stage: int, async_op: bool = False):
        if not self._compress(tensor):
            if not self.passthrough:
                self.slot += 1
            return self.recv_orig(tensor, src_stage, async_op=async_op)
        frame = torch.empty(self.pc.frame_nbytes(self.direction, tensor.shape, tensor.dtype, self.mode),  # type: ignore
                            dtype=torch.uint8, device=tensor.device)
        out = self.recv_orig(frame, src_stage, async_op=async_op)
        # The cut is known here, so the header is checked (on the device on a GPU), never read on the host for it.
        value, _ = self.pc.decode(self.direction, frame, tensor.shape, tensor.dtype, self.mode,  # type: ignore
                                  cut=(self._recv_stage(), self.slot))
        with torch.no_grad():
            tensor.copy_(value)
        self.slot += 1
        return out


@contextlib.contextmanager
def _routed(router: _Router) -> Iterator[None]:
    p2p.send, p2p.recv = router.send, router.recv
    try:
        yield
    finally:
        p2p.send, p2p.recv = router.send_orig, router.recv_orig


def _agree(engine, pc: PipeCompressor) -> None:
    """Compare the frame settings across the pipeline group (one collective at enable time); raise on every rank,
    naming the setting and the ranks, before any frame of a mismatched size is sent."""
    import torch.distributed as dist

    from distlion_ds.compress.pipe import find_disagreements

    group = engine.grid.get_pipe_parallel_group()
    mine = pc.settings()
    per_rank: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, mine, group=group)
    bad = find_disagreements(per_rank, dist.get_process_group_ranks(group))
    if bad:
        raise ValueError("pipeline stages disagree on p2p compression settings (give every stage the same "
                         "p2p_compression block):\n  " + "\n  ".join(bad))


def enable_pipe_compression(engine, compression: CompressionConfig | dict | str, *,
                            state: CompressionState | None = None) -> CompressionState:
    """Compress this PipelineEngine's activation and gradient p2p (idempotent per engine).

    Args:
        engine: a ``deepspeed.runtime.pipe.engine.PipelineEngine``.
        compression: ``CompressionConfig`` or anything ``CompressionConfig.from_json`` accepts.
        state: EF / EF21 state and byte counts (a fresh one by default); save ``state.state_dict()`` with
            checkpoints.
    Returns:
        The engine's compression state (``state.stats`` has the DESIGN 3.3 ``comm_stats`` keys).
    Raises:
        NotImplementedError: AQ-SGD (``activations.feedback: aqsgd``), which needs sample ids PipelineEngine
            does not expose.
    """
    config = CompressionConfig.from_json(compression)
    existing = getattr(engine, _MARKER, None)
    if existing is not None:
        if existing.config != config:
            raise ValueError("this engine already compresses its p2p with a different config")
        return existing
    if config.uses_aqsgd:
        raise NotImplementedError("AQ-SGD is not supported for DeepSpeed PipelineEngine yet: it exposes no sample "
                                  "ids; use feedback none, ef or ef21")
    state = state if state is not None else CompressionState(config)
    pc = PipeCompressor(state, sample_dim=0)  # [batch, ...] activations; unused without AQ-SGD
    _agree(engine, pc)
    base = type(engine)._INSTRUCTION_MAP
    current: list[_Router] = []

    def wrap(fn, direction: str, sending: bool):
        def run(self, buffer_id):
            router = _Router(self, pc, direction, sending, buffer_id)
            current.append(router)
            try:
                with _routed(router):
                    return fn(self, buffer_id)
            finally:
                current.pop()
        run.__wrapped__ = fn
        return run

    def meta(fn):
        def run(*args, **kwargs):
            router = current[-1] if current else None
            if router is not None:
                router.passthrough = True
            try:
                return fn(*args, **kwargs)
            finally:
                if router is not None:
                    router.passthrough = False
        return run

    # Instance attributes shadow the class's: only this engine changes, and the originals stay reachable.
    engine._INSTRUCTION_MAP = {
        **base,
        schedule.SendActivation: wrap(base[schedule.SendActivation], "activations", True),
        schedule.RecvActivation: wrap(base[schedule.RecvActivation], "activations", False),
        schedule.SendGrad: wrap(base[schedule.SendGrad], "gradients", True),
        schedule.RecvGrad: wrap(base[schedule.RecvGrad], "gradients", False),
    }
    engine._send_tensor_meta = meta(engine._send_tensor_meta)
    engine._recv_tensor_meta = meta(engine._recv_tensor_meta)
    setattr(engine, _MARKER, state)
    logger.info("distlion_ds: PipelineEngine stage %d p2p compressed: activations %s, gradients %s",
                engine.stage_id, config.activations.method, config.gradients.method)
    return state


def comm_stats(engine) -> dict[str, Any]:
    """The DESIGN 3.3 ``comm_stats`` of a compressed engine."""
    state = getattr(engine, _MARKER, None)
    if state is None:
        raise ValueError("p2p compression is not enabled on this engine")
    return copy.deepcopy(state.stats)


__all__ = ["CONFIG_KEY", "comm_stats", "enable_pipe_compression", "split_p2p_compression"]
