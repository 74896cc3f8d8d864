"""Codecs for pipeline p2p (DESIGN 3.4): tensor -> flat uint8 payload -> tensor, feedback state, AQ-SGD stores.

Transport-free: nothing here imports ``torch.distributed``; the megatron / DeepSpeed seams move the frames.
"""

from .codecs import Codec, NoneCodec, QuantizeCodec, TopKCodec, available_codecs, build_codec, register_codec
from .config import AQSGDConfig, CompressionConfig, NoneCodecConfig, QuantizeCodecConfig, TopKCodecConfig
from .pipe import (
    HEADER_BYTES,
    PROTOCOL,
    CompressionState,
    FrameInfo,
    Mode,
    PipeCompressor,
    empty_stats,
    find_disagreements,
)
from .state import (
    DiskSampleStore,
    FeedbackStore,
    MemorySampleStore,
    SampleBufferStore,
    StreamKey,
    make_sample_store,
)

__all__ = [
    "Codec", "NoneCodec", "QuantizeCodec", "TopKCodec", "available_codecs", "build_codec", "register_codec",
    "AQSGDConfig", "CompressionConfig", "NoneCodecConfig", "QuantizeCodecConfig", "TopKCodecConfig",
    "HEADER_BYTES", "PROTOCOL", "CompressionState", "FrameInfo", "Mode", "PipeCompressor", "empty_stats",
    "find_disagreements",
    "DiskSampleStore", "FeedbackStore", "MemorySampleStore", "SampleBufferStore", "StreamKey", "make_sample_store",
]
