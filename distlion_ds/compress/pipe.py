"""Pipeline-cut compression: frames (header + codec body), error feedback, AQ-SGD. No transport here.

One frame per tensor per direction. Its size is a pure function of (shape, dtype, config, mode), so a receiver
allocates it before data arrives. The header (int32 fields, then int64 sample ids) carries what an intermediate
stage cannot know by itself: which cut the tensor crossed (interleaved schedules multiplex model chunks over one
rank pair) and, for AQ-SGD, the sample ids (only the first stage reads data) and the epoch.

Modes (both sides derive the mode locally before the transfer; the header repeats it and a mismatch is an error):

- ``TRAIN``    codec + feedback (none / EF / EF21) on a training transfer.
- ``INFER``    codec, stateless: forward-only traffic with ``inference: compressed``; never touches training state.
- ``RAW``      the tensor's bytes: forward-only traffic with ``inference: uncompressed``.
- ``AQ_WARMUP`` AQ-SGD warm-up epochs: the activation in full; both sides store it as m(xi).
- ``AQ_DELTA``  AQ-SGD later epochs: C(a(xi) - m(xi)); both sides add the decoded delta to m(xi).

Feedback (per stream, state in :class:`~distlion_ds.compress.state.FeedbackStore`):

- EF (Seide et al. 2014; Karimireddy et al. 2019): sender sends C(x + e), keeps e <- x + e - D(C(x + e)).
- EF21 (Richtarik et al. 2021): both sides hold g; sender sends C(x - g); both do g <- g + D(payload); the receiver
  hands on g. Both sides run the same decode on the same bytes, so their g stay bit-identical.
- AQ-SGD (Wang et al. 2022, arXiv 2206.01299, Alg. 1): as EF21 but per training sample xi, with m(xi) rounded to
  ``aqsgd.buffer_dtype`` identically on both sides.

Host syncs (issue 10): a frame's size comes from (shape, dtype, config, mode) only. The sender copies its header
from a small device-resident cache (one entry per (mode, cut, epoch, id count)) and its sample ids through pinned
memory, never a pageable host-to-device copy. The receiver checks the header on the device (``torch._assert_async``)
against what it expects, and copies header fields to the host only where the host needs them: AQ-SGD sample ids
(the buffer store is indexed on the host) and, when the caller cannot name the cut, the cut of a stateful stream
(interleaved schedules with EF21 / AQ-SGD). On CPU tensors every check runs at once with a precise message.

Agreement: a header check comes after the transfer, too late for a transport that needs equal sizes on both sides
(NCCL). So the sizes are agreed before: :meth:`PipeCompressor.settings` lists what both sides must share (the
config, the protocol); a transport compares them across the pipeline group once at start
(:func:`find_disagreements`), and compares the AQ-SGD epoch whenever it is set (the epoch picks warm-up or delta
frames, whose sizes differ).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .codecs import Codec, NoneCodec, Provider, as_dtype, build_codec, check_on_device
from .config import CompressionConfig, NoneCodecConfig
from .state import Direction, FeedbackStore, SampleBufferStore, StreamKey, make_sample_store

logger = logging.getLogger(__name__)

_MAGIC = 0x444C5032  # "DLP2"
_HEADER_FIELDS = 6  # magic, mode, stage, chunk, epoch, number of sample ids
HEADER_BYTES = _HEADER_FIELDS * 4  # 24: a multiple of 8, so the ids (int64) and any body dtype stay aligned
PROTOCOL = 2  # bumped whenever the frame layout changes; part of the settings both sides must agree on
# Header cache entries per compressor: (mode, cut, epoch, id count) combinations seen; an epoch change adds a few.
_HEADER_CACHE_MAX = 256


class Mode(enum.IntEnum):
    TRAIN = 0
    INFER = 1
    RAW = 2
    AQ_WARMUP = 3
    AQ_DELTA = 4


@dataclass(frozen=True)
class FrameInfo:
    """What a receiver learns from a header."""

    mode: Mode
    stage: int
    chunk: int
    epoch: int
    sample_ids: tuple[int, ...] = ()


def _mix_seed(*parts: int) -> int:
    """A 32-bit seed from small integers (splitmix-style), so streams and transfers get unrelated draws."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0xFFFFFFFF


def _bump(stats: dict[str, Any], direction: str, nbytes: int, elements: int, sent: bool) -> None:
    if sent:
        stats["bytes_sent"] += nbytes
        stats[direction]["bytes_sent"] += nbytes
        stats[direction]["elements_sent"] += elements
    else:
        stats["bytes_received"] += nbytes


def empty_stats() -> dict[str, Any]:
    """``comm_stats()`` keys of DESIGN 3.3, zeroed."""
    return {"bytes_sent": 0, "bytes_received": 0,
            "activations": {"bytes_sent": 0, "elements_sent": 0},
            "gradients": {"bytes_sent": 0, "elements_sent": 0}}


@dataclass
class CompressionState:
    """Everything a pipeline rank keeps between transfers; lives outside any communicator.

    Args:
        config: the compression config.
        feedback: EF / EF21 store (a fresh one by default).
        samples: AQ-SGD buffer store (built from ``config.aqsgd`` when AQ-SGD is on).
    """

    config: CompressionConfig
    feedback: FeedbackStore = field(default_factory=FeedbackStore)
    samples: SampleBufferStore | None = None
    epoch: int = 0
    stats: dict[str, Any] = field(default_factory=empty_stats)
    agreed_groups: set[tuple[int, ...]] = field(default_factory=set, repr=False, compare=False)
    """Groups (their global ranks) whose ranks already compared settings with this state: a transport compares
    once per group, not per communicator it builds."""

    def __post_init__(self) -> None:
        if self.samples is None and self.config.uses_aqsgd:
            a = self.config.aqsgd
            self.samples = make_sample_store(a.store, a.buffer_dtype, a.path)

    def bind_rank(self, tag: str) -> None:
        """Give this rank's AQ-SGD disk store its own folder, ``<aqsgd.path>/<tag>`` (a no-op for other stores).

        One set of files per pipeline stage, model chunk (both in the stream file names) and data-parallel /
        tensor-parallel rank (``tag``): two ranks never write one file. Transports call it with the rank's
        coordinates before the first transfer; a tag that changes after the store opened is an error.
        """
        if self.samples is not None:
            self.samples.bind(tag)

    def set_epoch(self, epoch: int) -> None:
        """AQ-SGD: the training epoch (from 0); epochs below ``aqsgd.warmup_epochs`` are warm-up. Every pipeline
        rank must set the same epoch: the header carries it and a receiver refuses a mismatch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(), "epoch": self.epoch,
                "feedback": self.feedback.state_dict(),
                "samples": self.samples.state_dict() if self.samples is not None else None,
                "stats": self.stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if CompressionConfig.model_validate(state["config"]) != self.config:
            raise ValueError("checkpoint's compression config differs from this one; refusing to mix states")
        self.epoch = state["epoch"]
        self.feedback.load_state_dict(state["feedback"])
        if self.samples is not None and state["samples"] is not None:
            self.samples.load_state_dict(state["samples"])
        self.stats = state["stats"]


def _host_ints(ids: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if torch.is_tensor(ids):
        # A CUDA tensor costs a device sync here: pass host ids (a list or a CPU tensor) where the data is loaded.
        return tuple(int(i) for i in ids.reshape(-1).tolist())
    return tuple(int(i) for i in ids)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a pageable copy: staged in pinned memory, copied asynchronously.

    The caching host allocator keeps a pinned block until the copies recorded on it complete, so the staging
    tensor may be dropped at once.
    """
    if device.type == "cpu":
        return host
    if device.type == "meta":
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    return host.pin_memory().to(device, non_blocking=True)


def _flat_settings(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj):
            _flat_settings(f"{prefix}.{k}" if prefix else str(k), obj[k], out)
    else:
        out[prefix] = obj


def find_disagreements(per_rank: Sequence[dict[str, Any]], ranks: Sequence[int] | None = None) -> list[str]:
    """Settings that differ across ranks, one line each naming the setting, the values and the ranks holding them.

    Args:
        per_rank: :meth:`PipeCompressor.settings` (or any flat dict) of every rank of a group, in group order.
        ranks: the global rank of each entry (default: 0, 1, ...).
    Returns:
        Human-readable lines, empty when every rank agrees.
    """
    ranks = list(ranks) if ranks is not None else list(range(len(per_rank)))
    lines = []
    for name in sorted(set().union(*per_rank)):
        holders: dict[str, list[int]] = {}
        for r, s in zip(ranks, per_rank, strict=True):
            holders.setdefault(repr(s.get(name, "<missing>")), []).append(r)
        if len(holders) > 1:
            lines.append(f"{name}: " + "; ".join(f"ranks {rs} have {v}" for v, rs in holders.items()))
    return lines


class PipeCompressor:
    """Frames for one rank's pipeline transfers, built from a config, keeping state in a ``CompressionState``.

    Args:
        state: where feedback state, AQ-SGD buffers, the epoch and byte counts live.
        sample_dim: the sample (micro-batch) dimension of activations: 1 for megatron's [seq, batch, hidden].
        provider: kernel provider of the codecs (``auto`` or ``torch``).
    """

    def __init__(self, state: CompressionState, sample_dim: int = 1, provider: Provider = "auto"):
        self.state = state
        self.config = state.config
        self.sample_dim = sample_dim
        self.codecs: dict[str, Codec] = {
            "activations": build_codec(self.config.activations, provider),
            "gradients": build_codec(self.config.gradients, provider),
        }
        self.raw = NoneCodec(NoneCodecConfig())
        self._headers: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ sizes, modes, agreement

    def settings(self) -> dict[str, Any]:
        """Everything the two sides of a cut must share for frames to have equal sizes and meaning, flat.

        The compression config (without ``aqsgd.store`` / ``aqsgd.path``: where a rank keeps its buffers is its
        own business), the frame protocol and the sample dimension. Transports add their own (e.g. the
        pipeline dtype) and compare the whole across the pipeline group once (:func:`find_disagreements`).
        """
        cfg = self.config.model_dump()
        cfg["aqsgd"] = {k: v for k, v in cfg["aqsgd"].items() if k not in ("store", "path")}
        out: dict[str, Any] = {"protocol": PROTOCOL, "header_bytes": HEADER_BYTES, "sample_dim": self.sample_dim}
        _flat_settings("compression", cfg, out)
        return out

    def mode(self, direction: Direction, training: bool) -> Mode:
        """The mode of a transfer, derived the same way on both sides of the cut."""
        if direction == "gradients":
            return Mode.TRAIN
        if not training:
            return Mode.INFER if self.config.inference == "compressed" else Mode.RAW
        if self.config.uses_aqsgd:
            return Mode.AQ_WARMUP if self.state.epoch < self.config.aqsgd.warmup_epochs else Mode.AQ_DELTA
        return Mode.TRAIN

    def n_ids(self, direction: Direction, shape: Sequence[int], mode: Mode) -> int:
        if mode in (Mode.AQ_WARMUP, Mode.AQ_DELTA):
            return int(shape[self.sample_dim])
        return 0

    def _codec(self, direction: Direction, mode: Mode) -> Codec:
        return self.raw if mode in (Mode.RAW, Mode.AQ_WARMUP) else self.codecs[direction]

    def frame_nbytes(self, direction: Direction, shape: Sequence[int], dtype: torch.dtype, mode: Mode) -> int:
        """Bytes of a frame: a pure function of the arguments and the config."""
        body = self._codec(direction, mode).nbytes(shape, dtype)
        return HEADER_BYTES + 8 * self.n_ids(direction, shape, mode) + body

    def stateful(self, direction: Direction, mode: Mode, receiver: bool) -> bool:
        """Whether a transfer in ``mode`` reads or writes per-stream state on this side (so needs its cut)."""
        if mode in (Mode.AQ_WARMUP, Mode.AQ_DELTA):
            return True
        if mode != Mode.TRAIN:
            return False
        feedback = self.config.activations.feedback if direction == "activations" else self.config.gradients.feedback
        return feedback == "ef21" or (feedback == "ef" and not receiver)

    # ------------------------------------------------------------------ header

    def _header(self, device: torch.device, mode: Mode, stage: int, chunk: int, epoch: int, n_ids: int
                ) -> torch.Tensor:
        """The int32 header fields on ``device``, cached: a send copies them device to device."""
        key = (device, int(mode), stage, chunk, epoch, n_ids)
        head = self._headers.get(key)
        if head is None:
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            host = torch.tensor([_MAGIC, int(mode), stage, chunk, epoch, n_ids], dtype=torch.int32)
            head = self._headers[key] = _to_device(host, device)
        return head

    def _mask(self, device: torch.device, cut: bool, epoch: bool) -> torch.Tensor:
        """True for the header fields a receiver does not check (cached per device)."""
        key = (device, cut, epoch)
        m = self._masks.get(key)
        if m is None:
            host = torch.tensor([False, False, not cut, not cut, not epoch, False])
            m = self._masks[key] = _to_device(host, device)
        return m

    def _write_header(self, out: torch.Tensor, mode: Mode, stage: int, chunk: int, ids: Sequence[int]) -> int:
        head = self._header(out.device, mode, stage, chunk, self.state.epoch, len(ids))
        out[:HEADER_BYTES].copy_(head.view(torch.uint8))
        end = HEADER_BYTES + 8 * len(ids)
        if ids:
            out[HEADER_BYTES:end].copy_(_to_device(torch.tensor(list(ids), dtype=torch.int64), out.device)
                                        .view(torch.uint8))
        return end

    def read_header(self, frame: torch.Tensor) -> tuple[FrameInfo, int]:
        """Parse a frame's header on the host: ``(info, body offset)``. A device frame costs one sync here; the
        transfer path reads the header on the host only where the host needs its fields."""
        head = as_dtype(frame[:HEADER_BYTES], torch.int32).tolist()
        if head[0] != _MAGIC:
            raise ValueError(f"not a distlion_ds p2p frame (magic {head[0]:#x}); are both sides compressing?")
        n = head[5]
        end = HEADER_BYTES + 8 * n
        ids = tuple(as_dtype(frame[HEADER_BYTES:end], torch.int64).tolist()) if n else ()
        return FrameInfo(Mode(head[1]), head[2], head[3], head[4], ids), end

    def _check_header(self, direction: Direction, frame: torch.Tensor, mode: Mode, n_ids: int,
                      cut: tuple[int, int] | None) -> None:
        """Compare the received header with what this side expects; on the device unless the frame is on CPU."""
        aq = mode in (Mode.AQ_WARMUP, Mode.AQ_DELTA)
        stage, chunk = cut if cut is not None else (0, 0)
        if frame.device.type == "cpu":
            info, _ = self.read_header(frame)
            if info.mode != mode:
                raise ValueError(
                    f"{direction} frame sent in mode {info.mode.name}, received in mode {mode.name}: all pipeline "
                    "ranks must run forward-only steps under torch.no_grad() together and set the same AQ-SGD epoch"
                )
            if aq and info.epoch != self.state.epoch:
                raise ValueError(
                    f"AQ-SGD epoch mismatch: sender at epoch {info.epoch}, this rank at {self.state.epoch}")
            if len(info.sample_ids) != n_ids:
                raise ValueError(f"{direction} frame carries {len(info.sample_ids)} sample ids, expected {n_ids}")
            if cut is not None and (info.stage, info.chunk) != cut:
                raise ValueError(f"{direction} frame crossed cut (stage {info.stage}, chunk {info.chunk}), expected "
                                 f"(stage {stage}, chunk {chunk}): the two sides disagree on the schedule")
            return
        head = as_dtype(frame[:HEADER_BYTES], torch.int32)
        want = self._header(frame.device, mode, stage, chunk, self.state.epoch, n_ids)
        ok = ((head == want) | self._mask(frame.device, cut is not None, aq)).all()
        check_on_device(ok, f"distlion_ds {direction} frame header differs from this rank's (mode {mode.name}, "
                            f"cut {cut}, epoch {self.state.epoch}, {n_ids} sample ids): sides disagree")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, direction: Direction, x: torch.Tensor, *, stage: int, chunk: int, mode: Mode,
               sample_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The frame for ``x`` crossing cut ``(stage, chunk)`` in ``direction``; updates sender state.

        Args:
            direction: ``activations`` (forward) or ``gradients`` (backward).
            x: the tensor to send.
            stage, chunk: the cut, named by its forward sender's pipeline rank and model chunk.
            mode: from :meth:`mode`.
            sample_ids: one id per sample along ``sample_dim``; required by AQ-SGD modes (host ints: the
                buffer store is indexed on the host).
        Returns:
            Flat uint8 frame of ``frame_nbytes(direction, x.shape, x.dtype, mode)`` bytes on ``x``'s device.
        """
        x = x.detach()
        n_ids = self.n_ids(direction, x.shape, mode)
        ids: tuple[int, ...] = ()
        if n_ids:
            if sample_ids is None:
                raise ValueError(
                    "AQ-SGD (activations.feedback 'aqsgd') needs the sample ids of every micro-batch: call "
                    "distlion_ds.megatron.set_sample_ids(ids) in forward_step on the first pipeline stage"
                )
            ids = _host_ints(sample_ids)
            if len(ids) != n_ids:
                raise ValueError(f"got {len(ids)} sample ids for a micro-batch of {n_ids} samples")
        frame = torch.empty(self.frame_nbytes(direction, x.shape, x.dtype, mode), dtype=torch.uint8,
                            device=x.device)
        off = self._write_header(frame, mode, stage, chunk, ids)
        body = frame[off:]
        key = StreamKey(stage, chunk, direction, "send")
        codec = self._codec(direction, mode)
        # Forward-only traffic leaves the training counters alone, so an evaluation between two training steps
        # does not change the rounding of later training transfers.
        count = self.state.feedback.next_count(key) if mode not in (Mode.INFER, Mode.RAW) else 0
        seed = _mix_seed(stage, chunk, direction == "gradients", count)
        feedback = self.config.activations.feedback if direction == "activations" else self.config.gradients.feedback

        if mode == Mode.AQ_DELTA:
            m = self._buffers(key, ids, x.shape, x.device)
            delta = (x.float() - m.float()).to(x.dtype)
            codec.encode_into(delta, body, seed=seed)
            self._store_buffers(key, ids, m.float() + codec.decode(body, x.shape, x.dtype).float())
        elif mode == Mode.AQ_WARMUP:
            codec.encode_into(x, body)
            self._store_buffers(key, ids, x)
        elif mode == Mode.TRAIN and feedback == "ef":
            y = x.float() + self.state.feedback.get(key, x.shape, x.device)
            yt = y.to(x.dtype)
            codec.encode_into(yt, body, seed=seed)
            self.state.feedback.put(key, y - codec.decode(body, x.shape, x.dtype).float())
        elif mode == Mode.TRAIN and feedback == "ef21":
            g = self.state.feedback.get(key, x.shape, x.device)
            codec.encode_into((x.float() - g).to(x.dtype), body, seed=seed)
            self.state.feedback.put(key, g + codec.decode(body, x.shape, x.dtype).float())
        else:
            codec.encode_into(x, body, seed=seed)
        _bump(self.state.stats, direction, frame.numel(), x.numel(), sent=True)
        return frame

    def decode(self, direction: Direction, frame: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
               mode: Mode, *, cut: tuple[int, int] | None = None,
               want_info: bool = False) -> tuple[torch.Tensor, FrameInfo | None]:
        """The tensor a frame stands for, updating receiver state; ``(tensor, header info or None)``.

        Args:
            direction, shape, dtype, mode: as the sender's (``mode`` from :meth:`mode`).
            frame: the received frame.
            cut: ``(stage, chunk)`` of the cut when the caller knows it: the header is then only checked (on
                the device), never read on the host for it.
            want_info: return the header's cut even where this transfer keeps no state (a caller that routes
                later transfers by it); read on the host when ``cut`` is not given.
        Returns:
            The tensor, and the :class:`FrameInfo` where it was asked for, needed or known (``None`` otherwise).
        Raises:
            ValueError: the header's mode, epoch or cut differs from this rank's (the two sides disagree on
                training vs forward-only, on the AQ-SGD epoch or on the schedule), or the frame is malformed.
                On a GPU the check fails the stream asynchronously instead.
        """
        n_ids = self.n_ids(direction, shape, mode)
        aq = mode in (Mode.AQ_WARMUP, Mode.AQ_DELTA)
        info: FrameInfo | None = None
        if cut is None and (want_info or self.stateful(direction, mode, receiver=True)):
            # The host needs the cut: one read of the header (a sync on a GPU), then the same checks as below.
            head, _ = self.read_header(frame)
            cut = (head.stage, head.chunk)
        self._check_header(direction, frame, mode, n_ids, cut)
        off = HEADER_BYTES + 8 * n_ids
        if cut is not None:
            ids: tuple[int, ...] = ()
            if aq:  # the buffer store is indexed on the host: the ids are needed there, now
                ids = _host_ints(as_dtype(frame[HEADER_BYTES:off], torch.int64))
            info = FrameInfo(mode, cut[0], cut[1], self.state.epoch, ids)
        _bump(self.state.stats, direction, frame.numel(), 0, sent=False)
        body = frame[off:]
        out = self._codec(direction, mode).decode(body, shape, dtype)
        if info is None:
            return out, None
        key = StreamKey(info.stage, info.chunk, direction, "recv")
        feedback = self.config.activations.feedback if direction == "activations" else self.config.gradients.feedback
        if mode == Mode.AQ_DELTA:
            m = self._buffers(key, info.sample_ids, shape, frame.device)
            new = self._store_buffers(key, info.sample_ids, m.float() + out.float())
            return new.to(dtype), info
        if mode == Mode.AQ_WARMUP:
            self._store_buffers(key, info.sample_ids, out)
        elif mode == Mode.TRAIN and feedback == "ef21":
            g = self.state.feedback.get(key, shape, frame.device) + out.float()
            self.state.feedback.put(key, g)
            return g.to(dtype), info
        return out, info

    # ------------------------------------------------------------------ AQ-SGD buffers

    def _buffers(self, key: StreamKey, ids: Sequence[int], shape: Sequence[int],
                 device: torch.device) -> torch.Tensor:
        """m(xi) for every sample of a tensor of ``shape``, stacked along ``sample_dim`` (zeros where never stored)."""
        store = self._store()
        sample_shape = [d for i, d in enumerate(shape) if i != self.sample_dim]
        bufs, present = store.get(key, ids, sample_shape, device)
        if not bool(present.all()):
            # After warm-up a new sample starts from m = 0, so its first delta is the whole activation (compressed).
            logger.debug("AQ-SGD: %d of %d samples on %s have no buffer yet", int((~present).sum()), len(ids),
                         key.name())
        return bufs.movedim(0, self.sample_dim)

    def _store_buffers(self, key: StreamKey, ids: Sequence[int], value: torch.Tensor) -> torch.Tensor:
        """Round ``value`` to the buffer dtype, store it per sample; returns the rounded tensor."""
        store = self._store()
        rounded = value.to(store.dtype)
        store.put(key, ids, rounded.movedim(self.sample_dim, 0))
        return rounded

    def _store(self) -> SampleBufferStore:
        store = self.state.samples
        if store is None:
            raise RuntimeError("AQ-SGD mode without a sample store: the config has no activations.feedback 'aqsgd'")
        return store
