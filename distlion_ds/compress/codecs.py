"""Codecs: a tensor to a flat uint8 payload and back (DESIGN 3.4). They know nothing of transport.

``nbytes(shape, dtype)`` is a pure function of the shape, the dtype and the codec's config: megatron-core
allocates its receive buffers before any data arrives, so a payload's size may never depend on the data.

Layouts (every section starts at a multiple of the element size it holds, so decode views rather than copies):

- ``none``:     the tensor's own bytes.
- ``topk``:     ``k`` values in the tensor's dtype, then the index set, encoded as whichever of these two is
  smaller for ``(numel, k)``: a bitmap of ``ceil(numel / 8)`` bytes, or the ``k`` ascending indices packed at
  ``w = bit_length(numel - 1)`` bits each. TopK-10 % of bf16: 0.2 + 0.125 = 0.325 bytes/element with the bitmap
  (int32 indices would cost 0.6); below ratio ~1/w the packed indices win (1 % of 1M elements: 0.045 vs 0.145).
- ``quantize``: ``ceil(numel / block_size)`` fp32 scales, then ``ceil(numel * bits / 8)`` packed codes
  (8-bit with block 256: 1.016 bytes/element, 4-bit: 0.516).

No host syncs: encode and decode read no tensor data on the host (no ``.item()``, ``.tolist()`` or ``.nonzero()``),
so on a GPU a frame is encoded and decoded without waiting for the device. Checks on received data run on the
device (``torch._assert_async``) and raise on the host only for CPU tensors, where reading costs nothing.
Meta tensors go through as far as shapes go: under ``distlion_ds.kernels`` compile-only mode the launchers compile
their kernels for them, otherwise the codec returns meta tensors of the right shape without running anything.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel

from .config import NoneCodecConfig, QuantizeCodecConfig, TopKCodecConfig

Provider = Literal["auto", "torch"]
"""``auto``: the kernel launchers' dispatch (CUDA -> Triton, CPU -> torch reference unless TRITON_INTERPRET=1);
``torch``: always the pure-torch references (benchmarks compare the two)."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _kernels(provider: Provider) -> dict[str, Any]:
    # Imported on first use: loading a config or building a codec must not import triton.
    from distlion_ds import kernels

    bits = {"pack_bits": kernels.signs.pack_bits_ref, "unpack_bits": kernels.signs.unpack_bits_ref}  # torch ops
    if provider == "torch":
        return {"quantize": kernels.quantize_ref, "dequantize": kernels.dequantize_ref,
                "topk_select": kernels.topk_select_ref, "topk_scatter": kernels.topk_scatter_ref, **bits}
    return {"quantize": kernels.quantize, "dequantize": kernels.dequantize,
            "topk_select": kernels.topk_select, "topk_scatter": kernels.topk_scatter, **bits}


def _meta_only(*tensors: torch.Tensor) -> bool:
    """Meta tensors that no kernel will be compiled for: only shapes are computed."""
    if not any(t.device.type == "meta" for t in tensors):
        return False
    from distlion_ds.kernels import _dispatch

    # Launchers compile for meta tensors only in compile-only mode, which the interpreter excludes (under
    # TRITON_INTERPRET=1 use_triton() is True for every device, and the interpreter cannot read meta data).
    return _dispatch.INTERPRET or not _dispatch.use_triton(*tensors)


def check_on_device(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when the 0-d bool ``ok`` is False, without a host sync on a GPU.

    CPU: checked at once (reading host memory costs nothing). CUDA: ``torch._assert_async`` fails the stream
    asynchronously (the error surfaces at the next synchronization), so a transfer never waits on its own check.
    Meta: nothing to check.
    """
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    elif ok.device.type != "meta":
        torch._assert_async(ok, message)


def bitmap_gather(bits: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Dense tensor from a TopK bitmap and its ``k`` values (ascending index order), without a host sync.

    Element j takes value number (set bits up to and including j) - 1: a gather through a prefix sum, where
    ``.nonzero()`` would make the host wait for the device to learn its output size. Same bits as scattering the
    values to the set positions. A bitmap without exactly ``k`` bits set is refused (on the device on a GPU).

    Args:
        bits: flat bool bitmap of ``numel`` elements.
        values: the ``k`` kept values, in the output dtype.
        k: number of kept values (>= 1).
    Returns:
        Flat tensor of ``numel`` elements in ``values``' dtype, zeros where no bit is set.
    """
    numel = bits.numel()
    pos = torch.cumsum(bits, 0, dtype=torch.int32 if numel < 2**31 else torch.int64)
    check_on_device(pos[-1] == k, f"topk payload bitmap does not have exactly k={k} bits set")
    taken = values.index_select(0, pos.sub_(1).clamp_(min=0))
    return torch.where(bits, taken, torch.zeros((), dtype=values.dtype, device=values.device))


def as_dtype(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View a flat uint8 slice as ``dtype``; copies only when the slice is misaligned for it."""
    if dtype == torch.uint8:
        return payload
    if payload.data_ptr() % dtype.itemsize or payload.storage_offset() % dtype.itemsize:
        payload = payload.clone()
    return payload.view(dtype)


class Codec(ABC):
    """One compression method. Subclasses set ``method`` and ``config_cls`` and register themselves."""

    method: ClassVar[str]
    config_cls: ClassVar[type[BaseModel]]
    lossless: ClassVar[bool] = False

    def __init__(self, config: BaseModel, provider: Provider = "auto"):
        if provider not in ("auto", "torch"):
            raise ValueError(f"provider must be 'auto' or 'torch', got {provider!r}")
        self.config = config
        self.provider = provider

    @abstractmethod
    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Payload bytes for a tensor of ``shape`` and ``dtype``: a pure function of them and the config."""

    @abstractmethod
    def encode_into(self, t: torch.Tensor, out: torch.Tensor, *, seed: int | None = None) -> None:
        """Write the payload of ``t`` into ``out`` (uint8, exactly ``nbytes(t.shape, t.dtype)`` elements)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Tensor of ``shape`` and ``dtype`` from a payload made by :meth:`encode` (may alias ``payload``)."""

    def encode(self, t: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        """Flat uint8 payload of ``nbytes(t.shape, t.dtype)`` bytes on ``t``'s device.

        Args:
            t: the tensor (read flat, row-major).
            seed: stochastic-rounding seed where the method has one; ignored otherwise.
        Returns:
            The payload.
        """
        out = torch.empty(self.nbytes(t.shape, t.dtype), dtype=torch.uint8, device=t.device)
        self.encode_into(t, out, seed=seed)
        return out

    def _check(self, t: torch.Tensor) -> None:
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"codec {self.method!r} needs float32/bfloat16/float16, got {t.dtype}")

    def _check_payload(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> None:
        want = self.nbytes(shape, dtype)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != want:
            raise ValueError(
                f"codec {self.method!r}: payload must be flat uint8 of {want} bytes for shape {tuple(shape)} "
                f"{dtype}, got {payload.dtype} {tuple(payload.shape)}"
            )


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` buildable by its ``method`` name."""
    if cls.method in _REGISTRY:
        raise ValueError(f"codec {cls.method!r} is already registered")
    _REGISTRY[cls.method] = cls
    return cls


def available_codecs() -> list[str]:
    """Names accepted as ``method``."""
    return sorted(_REGISTRY)


def build_codec(config: BaseModel | dict | str, provider: Provider = "auto") -> Codec:
    """Codec for a config model, a config dict (``{"method": ..., ...}``) or a bare method name.

    Raises:
        ValueError: unknown method (the message lists the registered ones) or invalid keys/values.
    """
    if isinstance(config, str):
        config = {"method": config}
    method = config.get("method") if isinstance(config, dict) else getattr(config, "method", None)
    cls = _REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"unknown codec method {method!r}; available: {', '.join(available_codecs())}")
    if isinstance(config, dict):
        config = cls.config_cls.model_validate(config)
    return cls(config, provider=provider)


@register_codec
class NoneCodec(Codec):
    """The tensor's own bytes: bit-exact, any dtype."""

    method = "none"
    config_cls = NoneCodecConfig
    lossless = True

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return _numel(shape) * dtype.itemsize

    def encode_into(self, t: torch.Tensor, out: torch.Tensor, *, seed: int | None = None) -> None:
        out.copy_(t.contiguous().view(-1).view(torch.uint8))

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self._check_payload(payload, shape, dtype)
        return as_dtype(payload, dtype).view(tuple(shape))


@register_codec
class TopKCodec(Codec):
    """The ``k = max(1, round(ratio * numel))`` largest-magnitude elements; the rest decode to zero."""

    method = "topk"
    config_cls = TopKCodecConfig

    def k(self, numel: int) -> int:
        """Elements kept for a tensor of ``numel`` elements (0 for an empty tensor)."""
        return 0 if numel == 0 else min(numel, max(1, round(self.config.ratio * numel)))

    @staticmethod
    def index_width(numel: int) -> int:
        """Bits per packed index: enough for ``numel - 1``."""
        return max(1, (numel - 1).bit_length())

    def _index_layout(self, numel: int) -> tuple[str, int]:
        k = self.k(numel)
        bitmap = -(-numel // 8)
        packed = -(-k * self.index_width(numel) // 8)
        return ("bitmap", bitmap) if bitmap <= packed else ("packed", packed)

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        numel = _numel(shape)
        return self.k(numel) * dtype.itemsize + self._index_layout(numel)[1]

    def encode_into(self, t: torch.Tensor, out: torch.Tensor, *, seed: int | None = None) -> None:
        self._check(t)
        flat = t.reshape(-1)
        numel = flat.numel()
        k = self.k(numel)
        if k == 0 or _meta_only(t, out):
            return
        # Indices come back ascending (the kernel contract), which is what both index encodings rely on.
        ops = _kernels(self.provider)
        values, idx = ops["topk_select"](flat, k)
        vbytes = k * t.dtype.itemsize
        out[:vbytes].copy_(values.reshape(-1).view(torch.uint8))
        layout, _ = self._index_layout(numel)
        if layout == "bitmap":
            mask = torch.zeros(numel, dtype=torch.bool, device=t.device)
            mask[idx] = True
            out[vbytes:].copy_(ops["pack_bits"](mask))
        else:
            w = self.index_width(numel)
            shifts = torch.arange(w, dtype=torch.int64, device=t.device)
            out[vbytes:].copy_(ops["pack_bits"]((idx.reshape(-1, 1) >> shifts) & 1))

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self._check_payload(payload, shape, dtype)
        numel = _numel(shape)
        k = self.k(numel)
        if k == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=payload.device)
        if _meta_only(payload):
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        ops = _kernels(self.provider)
        vbytes = k * dtype.itemsize
        values = as_dtype(payload[:vbytes], dtype)
        layout, _ = self._index_layout(numel)
        if layout == "bitmap":
            bits = ops["unpack_bits"](payload[vbytes:], numel).view(torch.bool)
            if payload.device.type != "cpu":
                return bitmap_gather(bits, values, k).view(tuple(shape))
            # On the host .nonzero() waits for nothing, and its scatter is the faster CPU path (bench_p2p,
            # 2M bf16 elements at 10 %: 2.1 ms against 3.5 ms for the gather).
            idx = bits.nonzero().view(-1)
            if idx.numel() != k:
                raise ValueError(f"topk payload bitmap does not have exactly k={k} bits set (has {idx.numel()})")
        else:
            w = self.index_width(numel)
            bits = ops["unpack_bits"](payload[vbytes:], k * w).view(k, w).to(torch.int64)
            idx = (bits << torch.arange(w, dtype=torch.int64, device=payload.device)).sum(dim=1)
        return ops["topk_scatter"](values, idx, numel, dtype).view(tuple(shape))


@register_codec
class QuantizeCodec(Codec):
    """Blockwise absmax ``bits``-bit codes with one fp32 scale per ``block_size`` elements."""

    method = "quantize"
    config_cls = QuantizeCodecConfig

    def _sizes(self, numel: int) -> tuple[int, int]:
        c = self.config
        return -(-numel // c.block_size) * 4, (numel * c.bits + 7) // 8

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return sum(self._sizes(_numel(shape)))

    def encode_into(self, t: torch.Tensor, out: torch.Tensor, *, seed: int | None = None) -> None:
        self._check(t)
        if _meta_only(t, out):
            return
        c = self.config
        codes, scales = _kernels(self.provider)["quantize"](
            t.reshape(-1), c.bits, c.block_size, stochastic=c.stochastic, seed=seed
        )
        sbytes, _ = self._sizes(t.numel())
        out[:sbytes].copy_(scales.view(torch.uint8))
        out[sbytes:].copy_(codes)

    def decode(self, payload: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self._check_payload(payload, shape, dtype)
        if _meta_only(payload):
            return torch.empty(tuple(shape), dtype=dtype, device=payload.device)
        c = self.config
        numel = _numel(shape)
        sbytes, _ = self._sizes(numel)
        scales = as_dtype(payload[:sbytes], torch.float32)
        out = _kernels(self.provider)["dequantize"](payload[sbytes:], scales, c.bits, c.block_size, numel, dtype)
        return out.view(tuple(shape))
