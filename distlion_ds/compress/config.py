"""Typed, strict compression configs (DESIGN 3.3): what the pipeline p2p sends for activations and gradients.

Every model forbids unknown keys and names the allowed ones, every choice is a ``Literal``, and a bad value is a
``ValueError`` (pydantic's ``ValidationError``) whose message carries the key path, e.g. ``activations.topk.ratio``.

The JSON form (``configs/compression/*.json``)::

    {"activations": {"method": "topk", "ratio": 0.1, "feedback": "none"},
     "gradients":   {"method": "quantize", "bits": 8, "block_size": 256, "stochastic": false, "feedback": "none"},
     "aqsgd":       {"warmup_epochs": 1, "store": "cpu", "path": null},
     "inference":   "compressed"}
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Feedback = Literal["none", "ef", "ef21", "aqsgd"]


class _Strict(BaseModel):
    """Frozen, no unknown keys; an unknown key's message lists the allowed ones (pydantic's does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; allowed keys: {sorted(cls.model_fields)}")
        return data


class NoneCodecConfig(_Strict):
    """Send the tensor's own bytes: lossless, the baseline every other method is measured against."""

    method: Literal["none"] = "none"
    """Codec name (registry key)."""
    feedback: Literal["none"] = "none"
    """Error feedback has nothing to correct on a lossless codec, so only ``"none"`` is accepted."""


class TopKCodecConfig(_Strict):
    """Keep the ``ratio`` largest-magnitude elements (values in the tensor's dtype plus an index encoding)."""

    method: Literal["topk"] = "topk"
    """Codec name (registry key)."""
    ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """Fraction of elements kept, in (0, 1]; k = max(1, round(ratio * numel))."""
    feedback: Feedback = "none"
    """``none`` | ``ef`` (sender adds back what was dropped) | ``ef21`` (both sides track an estimate g and send
    C(x - g)) | ``aqsgd`` (activations only: per-sample buffers, send C(a - m(xi)))."""


class QuantizeCodecConfig(_Strict):
    """Blockwise absmax k-bit quantization: ``bits`` per element plus one fp32 scale per ``block_size``."""

    method: Literal["quantize"] = "quantize"
    """Codec name (registry key)."""
    bits: Literal[2, 4, 8] = 8
    """Bits per element: 2, 4 or 8."""
    block_size: int = 256
    """Elements per fp32 scale: a positive multiple of 8 (every block then starts on a byte boundary) and at most
    16384 (one kernel program holds a whole block). 256 makes the scales cost 4/256 = 0.016 bytes per element."""
    stochastic: bool = False
    """Stochastic rounding (unbiased) instead of round-to-nearest; seeds advance per stream and transfer."""
    feedback: Feedback = "none"
    """``none`` | ``ef`` | ``ef21`` | ``aqsgd`` (activations only); see ``TopKCodecConfig.feedback``."""

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        # 16384 = distlion_ds.kernels.quantize.MAX_BLOCK_SIZE (a test pins it); not imported here so that
        # loading a config never imports triton.
        if v <= 0 or v % 8 or v > 16384:
            raise ValueError(f"block_size must be a positive multiple of 8 and at most 16384, got {v}")
        return v


# The union is keyed by ``method``; the codec registry (codecs.py) maps the same names to implementations.
CodecConfig = Annotated[NoneCodecConfig | TopKCodecConfig | QuantizeCodecConfig, Field(discriminator="method")]


class AQSGDConfig(_Strict):
    """AQ-SGD (arXiv 2206.01299) per-sample activation buffers m(xi), kept on both sides of every pipeline cut."""

    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    """Epochs (counted from 0, set with ``set_epoch``) whose activations are sent in full and stored as m(xi);
    later epochs send C(a(xi) - m(xi)) and both sides add the decoded delta to m(xi)."""
    store: Literal["device", "cpu", "disk"] = "cpu"
    """Where buffers live: ``device`` (next to the activation), ``cpu`` (pinned when CUDA is present) or ``disk``
    (a memory-mapped file under ``path``; RAM use bounded)."""
    path: str | None = None
    """Folder of the ``disk`` store (required for it, ignored otherwise)."""
    buffer_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the stored m(xi). Both sides round to it identically; bfloat16 halves the store (the reference
    implementation's fp16 cache is ~65 GB for 20k GPT-2 XL samples)."""

    @model_validator(mode="after")
    def _disk_needs_path(self) -> AQSGDConfig:
        if self.store == "disk" and not self.path:
            raise ValueError("aqsgd.path is required when aqsgd.store is 'disk'")
        return self


class CompressionConfig(_Strict):
    """What pipeline p2p sends: one codec (+ feedback) for forward activations, one for backward gradients."""

    activations: CodecConfig = Field(default_factory=NoneCodecConfig)
    """Codec for activations sent forward (``method``: none | topk | quantize)."""
    gradients: CodecConfig = Field(default_factory=NoneCodecConfig)
    """Codec for activation gradients sent backward; the paper (arXiv 2401.07788) finds they need milder
    compression than activations. ``feedback: aqsgd`` is not allowed here (AQ-SGD compresses gradients directly)."""
    aqsgd: AQSGDConfig = Field(default_factory=AQSGDConfig)
    """AQ-SGD buffer settings, used when ``activations.feedback`` is ``aqsgd``."""
    inference: Literal["compressed", "uncompressed"] = "compressed"
    """Forward-only traffic (run under ``torch.no_grad()``): TopK-trained models need compression at inference
    too, while error-feedback-trained ones can run uncompressed (arXiv 2401.07788)."""

    @model_validator(mode="after")
    def _feedback_rules(self) -> CompressionConfig:
        if self.gradients.feedback == "aqsgd":
            raise ValueError(
                "gradients.feedback 'aqsgd' is for activations only; allowed for gradients: none, ef, ef21"
            )
        return self

    @property
    def uses_aqsgd(self) -> bool:
        return self.activations.feedback == "aqsgd"

    @classmethod
    def from_json(cls, source: str | os.PathLike | dict | CompressionConfig) -> CompressionConfig:
        """Build a config from a JSON file path, a JSON string, a dict, or pass a config through.

        Args:
            source: path to a ``.json`` file, a JSON document, a dict of the DESIGN 3.3 schema, or a config.
        Returns:
            The validated, frozen config.
        Raises:
            ValueError: unknown keys or out-of-range values; the message names the key and the allowed values.
        """
        if isinstance(source, CompressionConfig):
            return source
        if isinstance(source, dict):
            return cls.model_validate(source)
        text = str(source)
        if text.lstrip().startswith("{"):
            return cls.model_validate_json(text)
        with open(source, encoding="utf-8") as f:
            return cls.model_validate(json.load(f))
