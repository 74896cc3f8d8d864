"""Typed, strict compression configs (DESIGN 3.3): what the pipeline p2p sends for activations and gradients.

Every model forbids unknown keys and names the allowed ones, every choice is a ``Literal``, and every number and
flag is strict: no bool -> number coercion (``"ratio": true`` is refused, it does not become 1.0 and switch
compression off), no string -> number, no float -> int, no number -> bool. :meth:`CompressionConfig.from_json`
raises one ``ValueError`` whose lines each name the file (when the config came from one), the key path (e.g.
``activations.ratio``), the value given and what is allowed; anything that is not a config, a dict, a JSON document
or the path of a JSON file is refused before any file is opened.

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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["AQSGDConfig", "CompressionConfig", "NoneCodecConfig", "QuantizeCodecConfig", "TopKCodecConfig",
           "format_validation_error"]

Feedback = Literal["none", "ef", "ef21", "aqsgd"]
CODEC_METHODS = ("none", "topk", "quantize")
_ALLOWED_BITS = (2, 4, 8)
_MAX_REPR = 120  # a value quoted in an error is cut to this many characters (a whole wrong section can be long)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def format_validation_error(err: ValidationError, *, what: str, source: str | None = None, prefix: str = "") -> str:
    """One line per error: the file, the key path as written in the JSON, the value given and what is allowed.

    Args:
        err: pydantic's error.
        what: what was being read, e.g. ``"compression config"``.
        source: the file the config came from (None for a dict or a JSON string).
        prefix: the key path of the validated section inside a larger config (e.g. ``"p2p_compression"``).

    Returns:
        The message.
    """
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        # A discriminated union puts the tag (the codec method) in the path: "activations.topk.ratio" is written
        # "activations.ratio" in the JSON.
        if len(loc) >= 2 and loc[0] in ("activations", "gradients") and loc[1] in CODEC_METHODS:
            del loc[1]
        msg = item["msg"]
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("method")
            given = item.get("ctx", {}).get("tag")
            msg = f"allowed: {', '.join(repr(m) for m in CODEC_METHODS)}" + (
                f" (got {given!r})" if given is not None else " (missing)"
            )
            lines.append(f"{'.'.join([prefix, *loc] if prefix else loc) or '<top level>'}: {msg}")
            continue
        msg = msg.removeprefix("Value error, ")
        key = ".".join([prefix, *loc] if prefix else loc) or "<top level>"
        if msg.startswith("unknown key(s)"):  # the keys are named; the whole section would only be noise
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key}: {msg} (got {_short_repr(item.get('input'))})")
    where = f" {source}" if source else ""
    return f"invalid {what}{where}: " + "; ".join(lines)


def _exact_int_choice(value: Any, allowed: tuple[int, ...]) -> Any:
    # Literal[2, 4, 8] alone would take 8.0 and True == 1-style look-alikes; only a JSON integer is a bit width.
    if type(value) is not int:
        raise ValueError(f"must be one of {', '.join(map(str, allowed))} (an integer)")
    return value


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
    ratio: Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.1
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
    block_size: StrictInt = 256
    """Elements per fp32 scale: a positive multiple of 8 (every block then starts on a byte boundary) and at most
    16384 (one kernel program holds a whole block). 256 makes the scales cost 4/256 = 0.016 bytes per element."""
    stochastic: StrictBool = False
    """Stochastic rounding (unbiased) instead of round-to-nearest; seeds advance per stream and transfer."""
    feedback: Feedback = "none"
    """``none`` | ``ef`` | ``ef21`` | ``aqsgd`` (activations only); see ``TopKCodecConfig.feedback``."""

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_exact(cls, v: Any) -> Any:
        return _exact_int_choice(v, _ALLOWED_BITS)

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int) -> int:
        # 16384 = distlion_ds.kernels.quantize.MAX_BLOCK_SIZE (a test pins it); not imported here so that
        # loading a config never imports triton.
        if v <= 0 or v % 8 or v > 16384:
            raise ValueError("block_size must be a positive multiple of 8 and at most 16384")
        return v


# The union is keyed by ``method``; the codec registry (codecs.py) maps the same names to implementations.
CodecConfig = Annotated[NoneCodecConfig | TopKCodecConfig | QuantizeCodecConfig, Field(discriminator="method")]


class AQSGDConfig(_Strict):
    """AQ-SGD (arXiv 2206.01299) per-sample activation buffers m(xi), kept on both sides of every pipeline cut."""

    warmup_epochs: Annotated[StrictInt, Field(ge=0)] = 1
    """Epochs (counted from 0, set with ``set_epoch``) whose activations are sent in full and stored as m(xi);
    later epochs send C(a(xi) - m(xi)) and both sides add the decoded delta to m(xi)."""
    store: Literal["device", "cpu", "disk"] = "cpu"
    """Where buffers live: ``device`` (next to the activation), ``cpu`` (pinned when CUDA is present) or ``disk``
    (a memory-mapped file under ``path``; RAM use bounded)."""
    path: StrictStr | None = None
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
    def from_json(
        cls, source: str | os.PathLike | dict | CompressionConfig, *, key: str | None = None
    ) -> CompressionConfig:
        """Build a config from a JSON file path, a JSON string, a dict, or pass a config through.

        Args:
            source: path to a ``.json`` file, a JSON document, a dict of the DESIGN 3.3 schema, or a config.
            key: where the config sits in a larger one (e.g. ``"p2p_compression"`` of a DeepSpeed config), so
                errors name the full key path.

        Returns:
            The validated, frozen config.

        Raises:
            ValueError: a source of another type (a bool, a number, a list: refused before any file is opened),
                a missing or unreadable file, invalid JSON, unknown keys, values of the wrong type or out of range;
                the message names the file, the key path, the value and the allowed values.
        """
        if isinstance(source, CompressionConfig):
            return source
        where = key or "compression config"
        if isinstance(source, dict):
            return cls._validate(source, None, key)
        # Not bool/int/list/None: open(True) would open file descriptor 1 and close stdout on exit.
        if not isinstance(source, str | os.PathLike):
            raise ValueError(
                f"{where}: expected a JSON object (dict), a JSON document or the path of a JSON file, got "
                f"{_short_repr(source)} ({type(source).__name__})"
            )
        text = os.fspath(source)
        if isinstance(text, bytes):
            raise ValueError(f"{where}: expected a str path, got bytes {_short_repr(text)}")
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON document: {e}") from None
            return cls._validate(data, None, key)
        if not os.path.isfile(text):
            raise ValueError(
                f"{where}: {text!r} is neither a JSON document nor an existing file (give the path of a JSON file "
                "such as configs/compression/topk10_q8.json, or a dict)"
            )
        with open(text, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"compression config {text}: invalid JSON: {e}") from None
        return cls._validate(data, text, key)

    @classmethod
    def _validate(cls, data: Any, source: str | None, key: str | None) -> CompressionConfig:
        if not isinstance(data, dict):
            where = f"compression config {source}" if source else (key or "compression config")
            raise ValueError(f"{where}: must be a JSON object, got {_short_repr(data)} ({type(data).__name__})")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(
                format_validation_error(err, what="compression config", source=source, prefix=key or "")
            ) from None
