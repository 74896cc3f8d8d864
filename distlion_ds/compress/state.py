"""State that outlives a communicator: EF / EF21 tensors per stream and AQ-SGD per-sample buffers (DESIGN 3.4).

megatron-core's schedules may build a new ``P2PCommunicator`` per call, so nothing here hangs off one: a stream is
keyed by the pipeline cut it crosses (the forward sender's ``stage`` and model ``chunk``), the ``direction``
(activations / gradients), the ``role`` of this rank at the cut (send / recv: with interleaving one rank is on
both sides of different cuts) and, for AQ-SGD, the sample id.

Checkpoint policy: ``state_dict()`` holds everything needed for a resumed run to equal an uninterrupted one:
EF residuals, EF21 estimates, the stochastic-rounding counters and every AQ-SGD buffer (the ``disk`` store
flushes its file and records the slot index instead of copying the data, so resume from the latest checkpoint
of a run is exact; resuming an older checkpoint needs a copy of the store folder taken with it).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

Direction = Literal["activations", "gradients"]
Role = Literal["send", "recv"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, order=True)
class StreamKey:
    """One side of one pipeline cut in one direction.

    ``stage``/``chunk`` name the cut by its forward sender (pipeline rank and model chunk), so both ranks of a
    cut use the same key in both directions; ``role`` tells the two sides apart.
    """

    stage: int
    chunk: int
    direction: Direction
    role: Role

    def name(self) -> str:
        return f"{self.stage}.{self.chunk}.{self.direction}.{self.role}"

    @classmethod
    def parse(cls, name: str) -> StreamKey:
        stage, chunk, direction, role = name.split(".")
        return cls(int(stage), int(chunk), direction, role)  # type: ignore[arg-type]


class FeedbackStore:
    """EF residuals / EF21 estimates (fp32, per stream and tensor shape) and per-stream transfer counters."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[StreamKey, tuple[int, ...]], torch.Tensor] = {}
        self._counters: dict[StreamKey, int] = {}

    def get(self, key: StreamKey, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The stream's fp32 state for ``shape``, zeros on first use.

        Keyed by shape too: with ``variable_seq_lengths`` each sequence length is its own stream (a residual of
        one length cannot be added to a tensor of another).
        """
        t = self._tensors.get((key, tuple(shape)))
        if t is None:
            return torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        return t.to(device)

    def put(self, key: StreamKey, value: torch.Tensor) -> None:
        self._tensors[(key, tuple(value.shape))] = value.detach().float()

    def next_count(self, key: StreamKey) -> int:
        """Transfers so far on ``key`` (then counts this one): seeds stochastic rounding reproducibly."""
        n = self._counters.get(key, 0)
        self._counters[key] = n + 1
        return n

    def clear(self) -> None:
        self._tensors.clear()
        self._counters.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": [(k.name(), list(s), t.cpu()) for (k, s), t in sorted(self._tensors.items())],
            "counters": {k.name(): n for k, n in sorted(self._counters.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tensors = {(StreamKey.parse(n), tuple(s)): t.float() for n, s, t in state["tensors"]}
        self._counters = {StreamKey.parse(n): int(c) for n, c in state["counters"].items()}


class SampleBufferStore(ABC):
    """AQ-SGD buffers m(xi): one tensor per (stream, sample id), all of the store's ``dtype``."""

    kind: str

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @abstractmethod
    def get(self, key: StreamKey, ids: Sequence[int], sample_shape: Sequence[int],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buffers [len(ids), *sample_shape] of self.dtype on device, present bool [len(ids)])``;
        a sample never stored reads as zeros with ``present`` False."""

    @abstractmethod
    def put(self, key: StreamKey, ids: Sequence[int], values: torch.Tensor) -> None:
        """Store ``values[i]`` (cast to ``self.dtype``) as the buffer of sample ``ids[i]``."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of buffers held (over all streams)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def flush(self) -> None:  # noqa: B027 - optional hook: memory stores have nothing to flush
        """Make stored buffers durable (the disk store); a no-op for memory stores."""


class MemorySampleStore(SampleBufferStore):
    """Buffers in a dict: on the activation's device (``device``) or in host memory (``cpu``, pinned when CUDA
    is present so the copies back to the GPU can run asynchronously)."""

    def __init__(self, dtype: torch.dtype, where: Literal["device", "cpu"]):
        super().__init__(dtype)
        self.kind = where
        self._buf: dict[tuple[StreamKey, int], torch.Tensor] = {}
        # Checked once per store, not per put: only pin when there is a GPU to copy to.
        self._pin = where == "cpu" and torch.cuda.is_available()

    def get(self, key, ids, sample_shape, device):
        out = torch.zeros((len(ids), *sample_shape), dtype=self.dtype, device=device)
        present = torch.zeros(len(ids), dtype=torch.bool)
        for i, sid in enumerate(ids):
            b = self._buf.get((key, int(sid)))
            if b is not None:
                if tuple(b.shape) != tuple(sample_shape):
                    raise ValueError(
                        f"AQ-SGD buffer of sample {sid} on {key.name()} has shape {tuple(b.shape)}, "
                        f"the new activation {tuple(sample_shape)}: a sample must keep its sequence length"
                    )
                out[i].copy_(b, non_blocking=self._pin)
                present[i] = True
        return out, present

    def put(self, key, ids, values):
        for i, sid in enumerate(ids):
            v = values[i].detach().to(self.dtype)
            if self.kind == "cpu":
                v = v.to("cpu")
                if self._pin:
                    v = v.pin_memory()
            else:
                v = v.clone()
            self._buf[(key, int(sid))] = v

    def __len__(self) -> int:
        return len(self._buf)

    def state_dict(self):
        return {"kind": self.kind, "dtype": str(self.dtype),
                "buffers": [(k.name(), sid, t.cpu()) for (k, sid), t in sorted(self._buf.items())]}

    def load_state_dict(self, state):
        self._buf = {}
        for name, sid, t in state["buffers"]:
            self.put(StreamKey.parse(name), [sid], t.unsqueeze(0))


class _MappedStream:
    """One stream's buffers in one file: fixed-size slots, a sample-id -> slot index beside it in JSON."""

    def __init__(self, path: str, dtype: torch.dtype, sample_shape: Sequence[int] | None):
        self.path = path
        self.index_path = path + ".index.json"
        self.dtype = dtype
        self.slots: dict[int, int] = {}
        self.sample_shape: tuple[int, ...] | None = tuple(sample_shape) if sample_shape is not None else None
        if os.path.exists(self.index_path):
            with open(self.index_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta["dtype"] != str(dtype):
                raise ValueError(f"{self.index_path} holds {meta['dtype']} buffers, the config asks for {dtype}")
            self.sample_shape = tuple(meta["sample_shape"])
            self.slots = {int(k): v for k, v in meta["slots"].items()}
        self._file = open(path, "a+b")  # noqa: SIM115 - lives as long as the mapping
        self._mm: mmap.mmap | None = None
        self._view: torch.Tensor | None = None
        self._map()

    @property
    def slot_bytes(self) -> int:
        assert self.sample_shape is not None
        return max(1, math.prod(self.sample_shape)) * self.dtype.itemsize

    def _map(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if size > 0:
            self._mm = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_WRITE)
            self._view = torch.frombuffer(self._mm, dtype=torch.uint8)

    def _ensure_capacity(self, n_slots: int) -> None:
        need = n_slots * self.slot_bytes
        size = os.fstat(self._file.fileno()).st_size
        if need > size:
            # Grow geometrically (x1.5) so remapping stays rare; sparse on filesystems that support it.
            self._file.truncate(max(need, size + size // 2))
            self._map()

    def read(self, slot: int) -> torch.Tensor:
        assert self._view is not None and self.sample_shape is not None
        b = self.slot_bytes
        return self._view[slot * b:(slot + 1) * b].view(self.dtype).view(self.sample_shape)

    def slot_for(self, sid: int) -> int:
        slot = self.slots.get(sid)
        if slot is None:
            slot = len(self.slots)
            self._ensure_capacity(slot + 1)
            self.slots[sid] = slot
        return slot

    def trim(self) -> None:
        """Write dirty pages back and drop the mapping's resident pages (they re-read from the file)."""
        if self._mm is not None:
            self._mm.flush()
            if hasattr(mmap, "MADV_DONTNEED"):
                self._mm.madvise(mmap.MADV_DONTNEED)

    def flush(self) -> None:
        self.trim()
        tmp = self.index_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"dtype": str(self.dtype), "sample_shape": list(self.sample_shape or ()),
                       "slots": {str(k): v for k, v in self.slots.items()}}, f)
        os.replace(tmp, self.index_path)  # atomic: a crash leaves the old index, never a torn one

    def close(self) -> None:
        self.flush()
        self._view = None
        if self._mm is not None:
            self._mm.close()
        self._file.close()


class DiskSampleStore(SampleBufferStore):
    """Buffers in memory-mapped files under ``path``, one per stream, with bounded RAM.

    The reference AQ-SGD cache is ~65 GB for 20k GPT-2 XL samples: too big for host memory on most nodes. The
    pages of a shared file mapping are backed by the file, and after every ``max_resident_bytes`` of buffers
    touched the store flushes and ``madvise(MADV_DONTNEED)``s its mappings, so the process keeps at most about
    that much of the store resident. Reopening the same ``path`` (e.g. after a restart) finds the buffers again.
    """

    kind = "disk"

    def __init__(self, dtype: torch.dtype, path: str, max_resident_bytes: int = 256 << 20):
        super().__init__(dtype)
        self.path = path
        self.max_resident_bytes = max_resident_bytes
        os.makedirs(path, exist_ok=True)
        self._streams: dict[StreamKey, _MappedStream] = {}
        self._touched = 0
        for fname in sorted(os.listdir(path)):
            if fname.endswith(".bin"):
                key = StreamKey.parse(fname[: -len(".bin")])
                self._streams[key] = _MappedStream(os.path.join(path, fname), dtype, None)

    def _stream(self, key: StreamKey, sample_shape: Sequence[int]) -> _MappedStream:
        s = self._streams.get(key)
        if s is None:
            s = _MappedStream(os.path.join(self.path, key.name() + ".bin"), self.dtype, sample_shape)
            self._streams[key] = s
        if s.sample_shape is None:
            s.sample_shape = tuple(sample_shape)
        if s.sample_shape != tuple(sample_shape):
            raise ValueError(
                f"disk AQ-SGD store {s.path} has fixed slots of shape {s.sample_shape}, got a sample of shape "
                f"{tuple(sample_shape)}; use store 'cpu' or 'device' with variable sequence lengths"
            )
        return s

    def _touch(self, nbytes: int) -> None:
        self._touched += nbytes
        if self._touched >= self.max_resident_bytes:
            for s in self._streams.values():
                s.trim()
            self._touched = 0

    def get(self, key, ids, sample_shape, device):
        s = self._stream(key, sample_shape)
        out = torch.zeros((len(ids), *sample_shape), dtype=self.dtype, device=device)
        present = torch.zeros(len(ids), dtype=torch.bool)
        for i, sid in enumerate(ids):
            slot = s.slots.get(int(sid))
            if slot is not None:
                out[i].copy_(s.read(slot))
                present[i] = True
        self._touch(len(ids) * s.slot_bytes)
        return out, present

    def put(self, key, ids, values):
        s = self._stream(key, values.shape[1:])
        cpu = values.detach().to(device="cpu", dtype=self.dtype)
        for i, sid in enumerate(ids):
            s.read(s.slot_for(int(sid))).copy_(cpu[i])
        self._touch(len(ids) * s.slot_bytes)

    def __len__(self) -> int:
        return sum(len(s.slots) for s in self._streams.values())

    def flush(self) -> None:
        for s in self._streams.values():
            s.flush()

    def close(self) -> None:
        for s in self._streams.values():
            s.close()
        self._streams.clear()

    def state_dict(self):
        self.flush()
        return {"kind": "disk", "dtype": str(self.dtype), "path": self.path,
                "slots": {k.name(): dict(s.slots) for k, s in self._streams.items()}}

    def load_state_dict(self, state):
        if os.path.abspath(state["path"]) != os.path.abspath(self.path):
            raise ValueError(f"checkpoint's AQ-SGD store is at {state['path']}, this store at {self.path}")
        for name, slots in state["slots"].items():
            key = StreamKey.parse(name)
            if key not in self._streams:
                raise ValueError(f"AQ-SGD store file for {name} is missing under {self.path}")
            # Slots are append-only, so the checkpoint's index is a prefix of the file's: samples first seen
            # after the checkpoint are forgotten (they read as zeros again), as in the uninterrupted run.
            self._streams[key].slots = {int(k): v for k, v in slots.items()}


def make_sample_store(store: Literal["device", "cpu", "disk"], buffer_dtype: str,
                      path: str | None = None) -> SampleBufferStore:
    """The store an ``AQSGDConfig`` asks for."""
    dtype = _DTYPES[buffer_dtype]
    if store == "disk":
        if not path:
            raise ValueError("aqsgd.path is required when aqsgd.store is 'disk'")
        return DiskSampleStore(dtype, path)
    return MemorySampleStore(dtype, store)
