"""The DeepSpeed config as distlion_ds reads it: the ``"optimizer": {"type": "DistributedLion"}`` section.

Only the optimizer section is ours; everything else belongs to DeepSpeed and is passed through. When the
optimizer is DistributedLion, a few DeepSpeed settings change meaning or cannot work, and are refused or
rewritten here, before any process group or engine exists:

- ZeRO stage >= 1 and optimizer/parameter offload are refused: ZeRO partitions the optimizer state across
  data-parallel ranks, but every D-Lion rank must own its full momentum (each rank votes from its own
  momentum, DESIGN 3.1).
- ``gradient_clipping`` (DeepSpeed's default is 1.0) is taken out of DeepSpeed's hands: DeepSpeed would all-reduce
  a norm of local gradients across the DP group. We clip each rank's local gradient by its own norm instead
  (see :func:`distlion_ds.deepspeed.engine.clip_local_grad_norm_`); DeepSpeed is given ``gradient_clipping: 0``.
- ``bf16`` with a PipelineModule is refused: DeepSpeed then always uses its BF16_Optimizer, which partitions fp32
  master weights and optimizer state across DP ranks (ZeRO-1 style).
- ``torch_autocast`` with float16 is refused: its torch GradScaler decides to skip a step from the local
  gradients only, so ranks would disagree on skipping (and hang in the vote exchange).

Our own settings live in a top-level ``"distlion"`` section (accepted whatever the optimizer is, removed before
DeepSpeed sees the config; :class:`DistlionSection`)::

    "distlion": {"distributed_timeout_minutes": 10}

Every value is checked strictly (no bool -> number coercion: ``"lr": true`` is refused, not read as 1.0; no string
-> number; no float -> int), and every error names the file (when the config came from one), the key path, the value
and what is allowed, before any process group exists. An optimizer ``type`` that is neither ours nor one DeepSpeed
0.19.8 knows (its built-ins, case-insensitive, or a ``torch.optim`` class name) is refused listing both. A
``"p2p_compression"`` block, when present, is validated too (a dict or the path of a JSON file; ``true`` or a number
is refused before anything is opened).

This module imports neither deepspeed nor torch.distributed, so configs can be checked anywhere.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from distlion_ds.compress.config import CompressionConfig

__all__ = [
    "DEEPSPEED_BUILTIN_OPTIMIZERS",
    "DISTLION_SECTION",
    "DISTRIBUTED_LION_TYPE",
    "DistLionDeepSpeedPlan",
    "DistlionSection",
    "DistributedLionParams",
    "load_deepspeed_config",
    "parse_deepspeed_config",
    "parse_distlion_section",
    "split_distlion_section",
]

DISTRIBUTED_LION_TYPE = "DistributedLion"
DISTLION_SECTION = "distlion"
P2P_COMPRESSION_SECTION = "p2p_compression"  # the block distlion_ds.deepspeed.pipe_compression takes out

# DeepSpeed's own default (deepspeed/runtime/constants.py, GRADIENT_CLIPPING_DEFAULT); kept as a literal so that
# this module does not import deepspeed. tests/test_deepspeed_config.py pins it against the installed DeepSpeed.
DEEPSPEED_GRADIENT_CLIPPING_DEFAULT = 1.0

# DeepSpeed 0.19.8's built-in optimizer types (deepspeed/runtime/config.py, DEEPSPEED_OPTIMIZERS; it lower-cases the
# configured type before comparing). Any other type DeepSpeed resolves as getattr(torch.optim, type). A literal, so
# that checking a config does not import deepspeed; tests/test_deepspeed_config.py pins it against the installed one.
DEEPSPEED_BUILTIN_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")

ZERO_STAGES = (0, 1, 2, 3)

FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class DistributedLionParams(BaseModel):
    """``optimizer.params`` for ``"type": "DistributedLion"`` (the keyword arguments of DistributedLion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    lr: Annotated[StrictFloat, Field(gt=0.0, allow_inf_nan=False)] = 1e-4
    """Learning rate: the size of every step (MaVo moves each weight by exactly ``lr``). DeepSpeed's scheduler
    section, when present, overwrites it every step."""

    betas: tuple[FiniteFloat, FiniteFloat] = (0.9, 0.99)
    """(beta1, beta2), each in [0, 1): beta1 mixes momentum and gradient for the vote, beta2 is the momentum's EMA
    rate."""

    weight_decay: Annotated[StrictFloat, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    """Decoupled weight decay, applied locally: ``p <- p * (1 - lr * weight_decay)``."""

    aggregation: Literal["mavo", "avg"] = "mavo"
    """How votes are combined: ``mavo`` (majority vote, sign of the sum) or ``avg`` (mean of the votes)."""

    raise_on_nonfinite: StrictBool = False
    """Raise instead of skipping the step (on every rank) when any rank has a non-finite gradient."""

    check_replicas_every: Annotated[StrictInt, Field(ge=0)] | None = None
    """Every K optimizer steps compare a checksum of the parameters across DP ranks and raise if they differ;
    0 disables the check; ``null`` keeps DistributedLion's default (not passed to it)."""

    bucket_numel: Annotated[StrictInt, Field(ge=8)] | None = None
    """Maximum elements per vote-exchange bucket; ``null`` keeps DistributedLion's default (2**25)."""

    rounding_seed: Annotated[StrictInt, Field(ge=0, lt=2**31)] = 0
    """Seed of the stochastic rounding of 16-bit parameters without fp32 master weights, in [0, 2**31). Equal on
    every rank (the config is), so replicas round identically."""

    intra_node_size: Annotated[StrictInt, Field(ge=1)] = 1
    """Data-parallel ranks per node, L (hierarchical D-Lion, issue 12). 1: flat D-Lion, every rank votes. L > 1:
    the gradients are reduce-scattered in fp32 inside each node of L consecutive data-parallel ranks, each rank keeps
    the momentum of its 1/L shard only, and only the nodes vote (1 bit per parameter between nodes); L must divide
    the data-parallel size."""

    local_steps: Annotated[StrictInt, Field(ge=1)] = 1
    """H, inner steps per outer step (issue 13). 1 with no ``inner_optimizer``: per-step D-Lion. With an
    ``inner_optimizer``: local-step D-Lion (:class:`distlion_ds.LocalStepsLion`): every rank runs H steps of its own
    inner optimizer, then one 1-bit D-Lion outer step on the pseudo-gradient with ``lr``, ``betas``,
    ``weight_decay`` and ``aggregation`` above; DeepSpeed's scheduler then drives the inner learning rate."""

    inner_optimizer: dict[str, Any] | None = None
    """``{"type": "AdamW" | "Adam" | "SGD" | "Lion", "params": {...}}``: the inner optimizer of local-step D-Lion
    (its keyword arguments; torch.optim's for AdamW / Adam / SGD, :class:`distlion_ds.optim.Lion`'s for Lion).
    Required when ``local_steps`` > 1."""

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        for name, beta in zip(("beta1", "beta2"), value, strict=True):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        return value

    @field_validator("inner_optimizer")
    @classmethod
    def _inner_optimizer_known(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_inner_optimizer(value)
        return value

    @model_validator(mode="after")
    def _local_steps_need_an_inner_optimizer(self) -> DistributedLionParams:
        if self.local_steps > 1 and self.inner_optimizer is None:
            raise ValueError(
                f"local_steps={self.local_steps} needs optimizer.params.inner_optimizer (the optimizer each rank "
                'runs between outer steps), e.g. {"type": "AdamW", "params": {"lr": 0.001}}')
        return self


# Inner optimizers of local-step D-Lion, by lower-cased config name: (module, class).
INNER_OPTIMIZERS = {"adamw": ("torch.optim", "AdamW"), "adam": ("torch.optim", "Adam"),
                    "sgd": ("torch.optim", "SGD"), "lion": ("distlion_ds.optim.lion", "Lion")}


def inner_optimizer_class(name: str) -> type:
    """The class of an ``inner_optimizer.type`` (case-insensitive); ValueError listing the allowed names."""
    import importlib

    if not isinstance(name, str) or name.lower() not in INNER_OPTIMIZERS:
        allowed = ", ".join(cls for _, cls in INNER_OPTIMIZERS.values())
        raise ValueError(f"type: {_describe(name)} is not an inner optimizer (allowed: {allowed})")
    module, cls = INNER_OPTIMIZERS[name.lower()]
    return getattr(importlib.import_module(module), cls)


def check_inner_optimizer(section: Any) -> None:
    """Validate an ``inner_optimizer`` section: keys, type, and its params by building it on a dummy parameter.

    Raises:
        ValueError: naming the key inside the section (``type``, ``params.<key>``), the value and what is allowed.
    """
    import inspect

    import torch

    if not isinstance(section, dict):
        raise ValueError(f"must be a JSON object with keys type, params; got {_describe(section)}")
    unknown = sorted(set(section) - {"type", "params"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (allowed keys: type, params)")
    if "type" not in section:
        raise ValueError("type: missing (allowed: AdamW, Adam, SGD, Lion)")
    cls = inner_optimizer_class(section["type"])
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"params: must be a JSON object, got {_describe(params)}")
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"params.{key}: unknown key for {cls.__name__} "
                             f"(allowed keys: {', '.join(allowed)})")
        if isinstance(value, bool) and key not in ("amsgrad", "nesterov", "maximize", "foreach", "capturable",
                                                   "differentiable", "fused", "decoupled_weight_decay"):
            raise ValueError(f"params.{key}: {_describe(value)} is not a number")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **params)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"params: {cls.__name__}({_describe(params)}) refused it: {e}") from None


class DistlionSection(BaseModel):
    """The top-level ``"distlion"`` section of a DeepSpeed config: settings of ours that DeepSpeed does not read.

    Accepted whatever the optimizer is; DeepSpeed never sees it (:func:`split_distlion_section`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    distributed_timeout_minutes: Annotated[StrictFloat, Field(gt=0.0, allow_inf_nan=False)] = 10.0
    """Process-group timeout in minutes (Megatron-LM's ``--distributed-timeout-minutes``): a stalled or dead peer
    makes every other rank's collective fail after this long instead of hanging for torch's default 30 minutes."""


class DistLionDeepSpeedPlan(BaseModel):
    """What :func:`parse_deepspeed_config` decided for a DistributedLion config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    optimizer: DistributedLionParams
    """Arguments for DistributedLion."""

    gradient_clipping: float
    """Max L2 norm of each rank's local gradient (0 disables clipping)."""

    distlion: DistlionSection = DistlionSection()
    """The ``"distlion"`` section (defaults when the config has none)."""

    deepspeed_config: dict[str, Any]
    """The config to give DeepSpeed: no ``optimizer`` and no ``distlion`` section, ``gradient_clipping`` 0."""


_SECTION_KEYS = frozenset({"type", "params"})


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{text} ({type(value).__name__})"


def load_deepspeed_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a fresh dict.

    Args:
        config: a dict (deep-copied) or the path of a JSON file (hjson, as DeepSpeed reads it, when installed).

    Returns:
        The config dict.

    Raises:
        ValueError: not a dict nor an existing file, unreadable JSON, or not a JSON object (naming the file).
    """
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, str | os.PathLike) and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            text = f.read()
        try:
            import hjson  # DeepSpeed's own reader (it accepts comments); a DeepSpeed dependency
        except ImportError:  # pragma: no cover - deepspeed always brings hjson
            decode, decode_error = json.loads, json.JSONDecodeError
        else:
            decode, decode_error = hjson.loads, hjson.HjsonDecodeError
        try:
            loaded = decode(text)
        except decode_error as e:
            raise ValueError(f"DeepSpeed config {os.fspath(config)}: invalid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"DeepSpeed config {config} must hold a JSON object, got {type(loaded).__name__}")
        return dict(loaded)
    raise ValueError(f"expected a DeepSpeed config dict or the path of an existing JSON file, got {config!r}")


def _is_distributed_lion(section: Any) -> bool:
    return (
        isinstance(section, dict)
        and isinstance(section.get("type"), str)
        and section["type"].lower() == DISTRIBUTED_LION_TYPE.lower()
    )


def _torch_optimizer_names() -> list[str]:
    import torch.optim  # imported here: only an unknown optimizer type needs it

    return sorted(
        name
        for name in dir(torch.optim)
        if isinstance(getattr(torch.optim, name), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
        and name != "Optimizer"
    )


def _format_validation_error(prefix: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in err.errors():
        key = ".".join([prefix, *(str(p) for p in item["loc"])])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            lines.append(f"{key}: unknown key (allowed keys: {allowed})")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {item.get('input')!r})")
    return "; ".join(lines)


def _validate_section(model: type[BaseModel], value: Any, prefix: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{prefix}: must be a JSON object (allowed keys: {', '.join(model.model_fields)}), got "
                         f"{_describe(value)}")
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise ValueError(_format_validation_error(prefix, err, model)) from None


def parse_distlion_section(raw: dict[str, Any]) -> DistlionSection:
    """The ``"distlion"`` section of a DeepSpeed config dict, validated (defaults when absent).

    Args:
        raw: the whole DeepSpeed config dict (as :func:`load_deepspeed_config` returns it).

    Returns:
        The section.

    Raises:
        ValueError: naming ``distlion.<key>``, the value and what is allowed.
    """
    return _validate_section(DistlionSection, raw.get(DISTLION_SECTION, {}), DISTLION_SECTION)


def split_distlion_section(raw: dict[str, Any]) -> tuple[dict[str, Any], DistlionSection]:
    """``(the config without its "distlion" section, the validated section)``: DeepSpeed must not see it."""
    section = parse_distlion_section(raw)
    return {k: v for k, v in raw.items() if k != DISTLION_SECTION}, section


def _zero_stage(zero: Any) -> int:
    if isinstance(zero, bool):  # legacy "zero_optimization": true meant stage 1
        return int(zero)
    if not isinstance(zero, dict):
        raise ValueError(f'zero_optimization: must be a JSON object such as {{"stage": 0}}, got {_describe(zero)}')
    stage = zero.get("stage", 0)
    if type(stage) is not int or stage not in ZERO_STAGES:
        raise ValueError(
            f"zero_optimization.stage: must be one of {', '.join(map(str, ZERO_STAGES))} (an integer; "
            f"DistributedLion needs 0), got {_describe(stage)}"
        )
    return stage


def _enabled(raw: dict[str, Any], key: str) -> bool:
    section = raw.get(key)
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ValueError(f'{key}: must be a JSON object such as {{"enabled": true}}, got {_describe(section)}')
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"{key}.enabled: must be true or false, got {_describe(enabled)}")
    return enabled


def _check_optimizer_type(section: Any) -> bool:
    """Whether the optimizer section selects DistributedLion; refuses a type no one knows (listing both)."""
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ValueError(
            f'optimizer: must be a JSON object such as {{"type": "{DISTRIBUTED_LION_TYPE}", "params": {{...}}}}, '
            f"got {_describe(section)}"
        )
    if "type" not in section:
        return False  # DeepSpeed then builds no optimizer from the config (one is passed in code)
    type_name = section["type"]
    if isinstance(type_name, str) and type_name.lower() == DISTRIBUTED_LION_TYPE.lower():
        return True
    if isinstance(type_name, str) and (
        type_name.lower() in DEEPSPEED_BUILTIN_OPTIMIZERS or type_name in _torch_optimizer_names()
    ):
        return False
    raise ValueError(
        f"optimizer.type: unknown optimizer {_describe(type_name)}. Allowed: ours, {DISTRIBUTED_LION_TYPE!r} "
        f"(case-insensitive); DeepSpeed's built-ins (case-insensitive): {', '.join(DEEPSPEED_BUILTIN_OPTIMIZERS)}; "
        f"or a torch.optim class name: {', '.join(_torch_optimizer_names())}"
    )


def parse_deepspeed_config(
    config: str | os.PathLike | dict[str, Any], *, pipeline: bool = False
) -> DistLionDeepSpeedPlan | None:
    """Validate a DeepSpeed config for DistributedLion.

    Args:
        config: DeepSpeed config dict or JSON path.
        pipeline: whether the model is a DeepSpeed PipelineModule.

    Returns:
        ``None`` when the optimizer section is absent or is not DistributedLion (DeepSpeed gets the config
        unchanged); else the plan: optimizer arguments, local clipping norm, our ``distlion`` section and the
        config for DeepSpeed.

    Raises:
        ValueError: naming the file (for a path), the key path, the value and what is allowed: an invalid
            ``optimizer``, ``distlion`` or ``p2p_compression`` section, an optimizer type neither ours nor
            DeepSpeed's, or a DeepSpeed setting D-Lion cannot use.
    """
    raw = load_deepspeed_config(config)
    try:
        return _parse(raw, pipeline)
    except ValueError as e:
        if isinstance(config, dict):
            raise
        raise ValueError(f"DeepSpeed config {os.fspath(config)}: {e}") from None


def _parse(raw: dict[str, Any], pipeline: bool) -> DistLionDeepSpeedPlan | None:
    distlion = parse_distlion_section(raw)
    if P2P_COMPRESSION_SECTION in raw:
        CompressionConfig.from_json(raw[P2P_COMPRESSION_SECTION], key=P2P_COMPRESSION_SECTION)
    section = raw.get("optimizer")
    if not _check_optimizer_type(section):
        return None
    unknown = sorted(set(section) - _SECTION_KEYS)
    if unknown:
        raise ValueError(
            f"invalid DistributedLion config: optimizer.{unknown[0]}: unknown key "
            f"(allowed keys: {', '.join(sorted(_SECTION_KEYS))})"
        )
    try:
        optimizer = _validate_section(DistributedLionParams, section.get("params", {}), "optimizer.params")
    except ValueError as e:
        raise ValueError(f"invalid DistributedLion config: {e}") from None

    zero = raw.get("zero_optimization", {})
    stage = _zero_stage(zero)
    if stage >= 1:
        raise ValueError(
            f"zero_optimization.stage={stage} cannot be used with DistributedLion: ZeRO partitions optimizer "
            "state across data-parallel ranks, but every D-Lion rank must keep its own full momentum (each rank "
            "votes from its local momentum and only 1-bit votes are exchanged). Use zero_optimization.stage=0."
        )
    if isinstance(zero, dict):
        if zero.get("cpu_offload"):
            raise ValueError(
                "zero_optimization.cpu_offload cannot be used with DistributedLion: optimizer offload needs ZeRO "
                "and partitions the optimizer state; every D-Lion rank must keep its own full momentum."
            )
        for key in ("offload_optimizer", "offload_param"):
            offload = zero.get(key)
            if isinstance(offload, dict) and str(offload.get("device", "none")).lower() != "none":
                raise ValueError(
                    f"zero_optimization.{key}.device={offload.get('device')!r} cannot be used with "
                    "DistributedLion: offload runs through ZeRO's partitioned optimizer, but every D-Lion rank "
                    "must keep its own full momentum. Remove the offload section or set device 'none'."
                )

    clip = raw.get("gradient_clipping", DEEPSPEED_GRADIENT_CLIPPING_DEFAULT)
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0.0 or not math.isfinite(clip):
        raise ValueError(f"gradient_clipping: must be a finite number >= 0, got {_describe(clip)}")

    bf16 = _enabled(raw, "bf16") or _enabled(raw, "bfloat16")
    if pipeline and bf16:
        raise ValueError(
            "bf16.enabled with a PipelineModule cannot be used with DistributedLion: DeepSpeed then wraps the "
            "optimizer in its BF16_Optimizer, which partitions fp32 master weights and optimizer state across "
            "data-parallel ranks; every D-Lion rank must update all of its weights from its own full momentum. "
            "Use fp16 (dynamic loss scaling) or fp32 with pipeline parallelism."
        )
    autocast = raw.get("torch_autocast")
    if _enabled(raw, "torch_autocast") and str(autocast.get("dtype", "")).lower() in (
        "fp16", "float16", "half", "torch.float16"
    ):
        raise ValueError(
            "torch_autocast.dtype=float16 cannot be used with DistributedLion: its GradScaler skips a step from "
            "the local gradients only, so ranks would disagree on skipping. Use the fp16 section (dynamic loss "
            "scaling agrees on overflow across ranks) or torch_autocast with bfloat16."
        )

    if optimizer.inner_optimizer is not None:
        for key in ("fp16", "bf16", "bfloat16"):
            if _enabled(raw, key):
                raise ValueError(
                    f"{key}.enabled cannot be used with local-step D-Lion (optimizer.params.inner_optimizer): "
                    "DeepSpeed's mixed-precision wrappers swap the optimizer's parameters for fp32 master copies "
                    "that the outer step does not own. Keep fp32 parameters and use torch_autocast with bfloat16 "
                    "for bf16 compute.")

    ds_config = {k: v for k, v in raw.items() if k not in ("optimizer", DISTLION_SECTION)}
    ds_config["gradient_clipping"] = 0.0
    return DistLionDeepSpeedPlan(
        optimizer=optimizer, gradient_clipping=float(clip), distlion=distlion, deepspeed_config=ds_config
    )
