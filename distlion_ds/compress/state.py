"""State that outlives a communicator: EF / EF21 tensors per stream and AQ-SGD per-sample buffers (DESIGN 3.4).

megatron-core's schedules may build a new ``P2PCommunicator`` per call, so nothing here hangs off one: a stream is
keyed by the pipeline cut it crosses (the forward sender's ``stage`` and model ``chunk``), the ``direction``
(activations / gradients), the ``role`` of this rank at the cut (send / recv: with interleaving one rank is on
both sides of different cuts) and, for AQ-SGD, the sample id.

Checkpoint policy: ``state_dict()`` holds everything needed for a resumed run to equal an uninterrupted one:
EF residuals, EF21 estimates, the stochastic-rounding counters and every AQ-SGD buffer. The ``disk`` store does not
copy its data into the checkpoint: it seals its files (copy-on-write slots, see :class:`DiskSampleStore`) and the
checkpoint records which slot holds each sample and its CRC-32, so a run killed hard after a checkpoint resumes
from it exactly, and a corrupted or overwritten buffer is refused by name. Resuming an older checkpoint than the
latest needs a copy of the store folder taken with it (detected, not silent).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distlion_ds.checkpoint_io import atomic_write_text, read_verified_text

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
    """EF residuals / EF21 estimates (fp32, per stream and tensor shape) and per-stream transfer counters.

    Bounded: a stream keeps the state of at most ``max_shapes`` tensor shapes, least recently used evicted first.
    With ``variable_seq_lengths`` each sequence length is its own state (a residual of one length is never added
    to a tensor of another); a few recurring lengths (bucketed batches) keep theirs, and memory stays bounded by
    ``max_shapes`` tensors per stream whatever the lengths. Both sides of an EF21 cut see the same shapes in the
    same order, so they evict identically and their estimates stay bit-identical. An evicted shape restarts from
    zeros (EF: no carried error; EF21: the estimate is rebuilt, the first transfer is plain compression).
    """

    def __init__(self, max_shapes: int = 4) -> None:
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.max_shapes = max_shapes
        self._tensors: dict[StreamKey, OrderedDict[tuple[int, ...], torch.Tensor]] = {}
        self._counters: dict[StreamKey, int] = {}
        self.evictions = 0

    def get(self, key: StreamKey, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The stream's fp32 state for ``shape``, zeros on first use (or after eviction)."""
        t = self._tensors.get(key, {}).get(tuple(shape))
        if t is None:
            return torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        return t.to(device)

    def put(self, key: StreamKey, value: torch.Tensor) -> None:
        shapes = self._tensors.setdefault(key, OrderedDict())
        shape = tuple(value.shape)
        shapes[shape] = value.detach().float()
        shapes.move_to_end(shape)
        while len(shapes) > self.max_shapes:
            evicted, _ = shapes.popitem(last=False)
            self.evictions += 1
            logger.debug("feedback state of %s for shape %s evicted (%d shapes kept per stream)", key.name(),
                         evicted, self.max_shapes)

    def next_count(self, key: StreamKey) -> int:
        """Transfers so far on ``key`` (then counts this one): seeds stochastic rounding reproducibly."""
        n = self._counters.get(key, 0)
        self._counters[key] = n + 1
        return n

    def __len__(self) -> int:
        """Tensors held (over all streams and shapes)."""
        return sum(len(v) for v in self._tensors.values())

    def clear(self) -> None:
        self._tensors.clear()
        self._counters.clear()

    def state_dict(self) -> dict[str, Any]:
        # Per stream in least-recently-used order, so a resumed run evicts exactly as the uninterrupted one.
        return {
            "tensors": [(k.name(), list(s), t.cpu()) for k in sorted(self._tensors)
                        for s, t in self._tensors[k].items()],
            "counters": {k.name(): n for k, n in sorted(self._counters.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tensors = {}
        for n, s, t in state["tensors"]:
            self._tensors.setdefault(StreamKey.parse(n), OrderedDict())[tuple(s)] = t.float()
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

    def bind(self, tag: str) -> None:  # noqa: B027 - optional hook: memory stores are per process already
        """Give the store this rank's own place (the disk store's per-rank folder); a no-op for memory stores."""


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


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())


class _MappedStream:
    """One stream's buffers in one file of fixed-size physical slots, copy-on-write against the last checkpoint.

    ``table`` maps a sample id to its current physical slot; ``crc`` holds the CRC-32 of every slot as last
    written. :meth:`seal` (at every checkpoint) makes the data durable and marks the current slots ``protected``:
    a later write of such a sample goes to a free slot instead (the table then points there), so the sealed
    slots keep their bytes until the next seal, whatever happens to the process. At most two slots per sample.
    The sealed table (slots and CRCs) goes into the checkpoint and into ``<file>.index.json`` beside the data.
    """

    def __init__(self, path: str, dtype: torch.dtype, sample_shape: Sequence[int] | None):
        self.path = path
        self.index_path = path + ".index.json"
        self.dtype = dtype
        self.table: dict[int, int] = {}
        self.crc: dict[int, int] = {}
        self.protected: set[int] = set()
        self.free: list[int] = []
        self.n_slots = 0  # physical slots handed out so far (the file may be larger: it grows by 1.5x)
        self.sample_shape: tuple[int, ...] | None = tuple(sample_shape) if sample_shape is not None else None
        if os.path.exists(self.index_path):
            meta = json.loads(read_verified_text(self.index_path))
            if meta["dtype"] != str(dtype):
                raise ValueError(f"{self.index_path} holds {meta['dtype']} buffers, the config asks for {dtype}")
            self.sample_shape = tuple(meta["sample_shape"])
        self._file = open(path, "a+b")  # noqa: SIM115 - lives as long as the mapping
        self._mm: mmap.mmap | None = None
        self._view: torch.Tensor | None = None
        self._map()
        if os.path.exists(self.index_path):
            self.restore(meta, verify=False)

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

    def _capacity(self) -> int:
        return os.fstat(self._file.fileno()).st_size // self.slot_bytes if self.sample_shape is not None else 0

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

    def get_slot(self, sid: int) -> int | None:
        return self.table.get(sid)

    def write(self, sid: int, value: torch.Tensor) -> None:
        """Store ``value`` (CPU, ``dtype``) as the buffer of ``sid``; never into a slot the last seal protects."""
        slot = self.table.get(sid)
        if slot is None or slot in self.protected:
            if self.free:
                slot = self.free.pop()
            else:
                slot = self.n_slots
                self.n_slots += 1
                self._ensure_capacity(self.n_slots)
            self.table[sid] = slot
        self.read(slot).copy_(value)
        self.crc[slot] = _crc(value)

    def trim(self) -> None:
        """Write dirty pages back and drop the mapping's resident pages (they re-read from the file)."""
        if self._mm is not None:
            self._mm.flush()
            if hasattr(mmap, "MADV_DONTNEED"):
                self._mm.madvise(mmap.MADV_DONTNEED)

    def seal(self) -> dict[str, Any]:
        """Durable data, current slots protected until the next seal; returns the sealed table."""
        if self._mm is not None:
            self._mm.flush()  # msync: the slots the table names are on disk before the checkpoint names them
        self.protected = set(self.table.values())
        self.free = sorted((s for s in range(self.n_slots) if s not in self.protected), reverse=True)
        meta = {"dtype": str(self.dtype), "sample_shape": list(self.sample_shape or ()),
                "slots": {str(k): v for k, v in sorted(self.table.items())},
                "crc": {str(self.table[k]): self.crc[self.table[k]] for k in sorted(self.table)}}
        # Atomic and checksummed (distlion_ds.checkpoint_io): a kill leaves the previous index or this one, and a
        # corrupted index is refused by name when the folder is reopened.
        atomic_write_text(self.index_path, json.dumps(meta))
        return meta

    def restore(self, meta: dict[str, Any], verify: bool = True) -> None:
        """Adopt a sealed table (from a checkpoint or the index file); ``verify`` checks every slot's CRC-32."""
        if tuple(meta["sample_shape"]) != self.sample_shape:
            raise ValueError(f"{self.path}: the checkpoint's buffers have shape {tuple(meta['sample_shape'])}, "
                             f"the store file {self.sample_shape}")
        table = {int(k): int(v) for k, v in meta["slots"].items()}
        crc = {int(k): int(v) for k, v in meta["crc"].items()}
        capacity = self._capacity()
        if verify:
            for sid, slot in table.items():
                if slot >= capacity or _crc(self.read(slot)) != crc[slot]:
                    raise ValueError(
                        f"AQ-SGD store file {self.path}: the buffer of sample {sid} (slot {slot}) is not the one the "
                        "checkpoint recorded (CRC-32 mismatch: the file was corrupted, truncated, or rewritten after "
                        "a later checkpoint). Resume from the latest checkpoint, or restore the store folder saved "
                        "with this one."
                    )
        self.table, self.crc = table, crc
        self.protected = set(table.values())
        self.n_slots = max([capacity, *[s + 1 for s in self.protected]])
        self.free = sorted((s for s in range(self.n_slots) if s not in self.protected), reverse=True)

    def close(self) -> None:
        self.seal()
        self._view = None
        if self._mm is not None:
            self._mm.close()
        self._file.close()


class DiskSampleStore(SampleBufferStore):
    """Buffers in memory-mapped files, one per stream, with bounded RAM; exact across hard kills.

    Folder: ``path``, or ``path/<tag>`` once :meth:`bind` gave the rank's tag (the communicator does, with its
    data- and tensor-parallel coordinates; stage and chunk are in the stream file names), so no two ranks share a
    file. The folder is opened on first use.

    RAM: the reference AQ-SGD cache is ~65 GB for 20k GPT-2 XL samples, too big for host memory on most nodes. The
    pages of a shared file mapping are backed by the file, and after every ``max_resident_bytes`` of buffers
    touched the store flushes and ``madvise(MADV_DONTNEED)``s its mappings, so the process keeps at most about
    that much of the store resident.

    Checkpoints (copy-on-write, see :class:`_MappedStream`): ``state_dict()`` seals every stream (msync, then
    the table of current slots with their CRC-32s, which the checkpoint carries) and protects those slots until
    the next ``state_dict()``; buffers updated after it go to other slots. A process killed at any point after a
    checkpoint (SIGKILL, OOM, preemption) therefore leaves that checkpoint's buffers intact, and
    ``load_state_dict`` of it restores the table and verifies every slot's CRC-32: the resumed run equals the
    uninterrupted one. Cost: at most two slots per sample on disk, one msync and one small index per checkpoint,
    a CRC-32 per buffer written. Only the latest checkpoint is guaranteed: after the next one, the older one's
    slots may be reused, which its CRCs detect (refused with the fix: restore a copy of the folder).
    Reopening the folder without a checkpoint (a restart) finds the buffers of the last seal.
    """

    kind = "disk"

    def __init__(self, dtype: torch.dtype, path: str, max_resident_bytes: int = 256 << 20):
        super().__init__(dtype)
        self.base = path
        self.path = path
        self.max_resident_bytes = max_resident_bytes
        self._streams: dict[StreamKey, _MappedStream] | None = None
        self._touched = 0

    def bind(self, tag: str) -> None:
        path = os.path.join(self.base, tag)
        if path == self.path:
            return
        if self._streams is not None:
            raise ValueError(f"AQ-SGD disk store already opened at {self.path}; cannot move it to {path}")
        self.path = path

    def _open(self) -> dict[StreamKey, _MappedStream]:
        if self._streams is None:
            os.makedirs(self.path, exist_ok=True)
            self._streams = {}
            for fname in sorted(os.listdir(self.path)):
                if fname.endswith(".bin"):
                    key = StreamKey.parse(fname[: -len(".bin")])
                    self._streams[key] = _MappedStream(os.path.join(self.path, fname), self.dtype, None)
        return self._streams

    def _stream(self, key: StreamKey, sample_shape: Sequence[int]) -> _MappedStream:
        streams = self._open()
        s = streams.get(key)
        if s is None:
            s = _MappedStream(os.path.join(self.path, key.name() + ".bin"), self.dtype, sample_shape)
            streams[key] = s
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
            for s in self._open().values():
                s.trim()
            self._touched = 0

    def get(self, key, ids, sample_shape, device):
        s = self._stream(key, sample_shape)
        out = torch.zeros((len(ids), *sample_shape), dtype=self.dtype, device=device)
        present = torch.zeros(len(ids), dtype=torch.bool)
        for i, sid in enumerate(ids):
            slot = s.get_slot(int(sid))
            if slot is not None:
                out[i].copy_(s.read(slot))
                present[i] = True
        self._touch(len(ids) * s.slot_bytes)
        return out, present

    def put(self, key, ids, values):
        s = self._stream(key, values.shape[1:])
        cpu = values.detach().to(device="cpu", dtype=self.dtype)
        for i, sid in enumerate(ids):
            s.write(int(sid), cpu[i])
        self._touch(len(ids) * s.slot_bytes)

    def __len__(self) -> int:
        return sum(len(s.table) for s in self._open().values())

    def flush(self) -> None:
        for s in self._open().values():
            s.seal()

    def close(self) -> None:
        if self._streams is not None:
            for s in self._streams.values():
                s.close()
            self._streams = None

    def state_dict(self):
        return {"kind": "disk", "dtype": str(self.dtype), "path": self.path,
                "streams": {k.name(): s.seal() for k, s in sorted(self._open().items())}}

    def load_state_dict(self, state):
        if "streams" not in state:
            raise ValueError("the checkpoint's AQ-SGD disk store state predates copy-on-write slots (no 'streams'): "
                             "it cannot be resumed exactly; start the run again or use that version of distlion_ds")
        if os.path.abspath(state["path"]) != os.path.abspath(self.path):
            raise ValueError(f"checkpoint's AQ-SGD store is at {state['path']}, this store at {self.path}")
        streams = self._open()
        for name, meta in state["streams"].items():
            key = StreamKey.parse(name)
            if key not in streams:
                raise ValueError(f"AQ-SGD store file {os.path.join(self.path, name + '.bin')} is missing: the "
                                 "checkpoint has buffers there; restore the store folder saved with it")
            streams[key].restore(meta)
        for key, s in streams.items():
            if key.name() not in state["streams"]:  # first written after the checkpoint: as if never written
                s.restore({"sample_shape": list(s.sample_shape or ()), "slots": {}, "crc": {}})


def make_sample_store(store: Literal["device", "cpu", "disk"], buffer_dtype: str,
                      path: str | None = None) -> SampleBufferStore:
    """The store an ``AQSGDConfig`` asks for."""
    dtype = _DTYPES[buffer_dtype]
    if store == "disk":
        if not path:
            raise ValueError("aqsgd.path is required when aqsgd.store is 'disk'")
        return DiskSampleStore(dtype, path)
    return MemorySampleStore(dtype, store)
