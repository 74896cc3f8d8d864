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

This module imports neither deepspeed nor torch.distributed, so configs can be checked anywhere.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "DISTRIBUTED_LION_TYPE",
    "DistLionDeepSpeedPlan",
    "DistributedLionParams",
    "load_deepspeed_config",
    "parse_deepspeed_config",
]

DISTRIBUTED_LION_TYPE = "DistributedLion"

# DeepSpeed's own default (deepspeed/runtime/constants.py, GRADIENT_CLIPPING_DEFAULT); kept as a literal so that
# this module does not import deepspeed. tests/test_deepspeed_config.py pins it against the installed DeepSpeed.
DEEPSPEED_GRADIENT_CLIPPING_DEFAULT = 1.0


class DistributedLionParams(BaseModel):
    """``optimizer.params`` for ``"type": "DistributedLion"`` (the keyword arguments of DistributedLion)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-4, gt=0.0, allow_inf_nan=False)
    """Learning rate: the size of every step (MaVo moves each weight by exactly ``lr``). DeepSpeed's scheduler
    section, when present, overwrites it every step."""

    betas: tuple[float, float] = (0.9, 0.99)
    """(beta1, beta2): beta1 mixes momentum and gradient for the vote, beta2 is the momentum's EMA rate."""

    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """Decoupled weight decay, applied locally: ``p <- p * (1 - lr * weight_decay)``."""

    aggregation: Literal["mavo", "avg"] = "mavo"
    """How votes are combined: ``mavo`` (majority vote, sign of the sum) or ``avg`` (mean of the votes)."""

    raise_on_nonfinite: bool = False
    """Raise instead of skipping the step (on every rank) when any rank has a non-finite gradient."""

    check_replicas_every: int = Field(0, ge=0)
    """Every K optimizer steps compare a checksum of the parameters across DP ranks and raise if they differ;
    0 disables the check."""

    bucket_numel: int | None = Field(None, ge=8)
    """Maximum elements per vote-exchange bucket; ``null`` keeps DistributedLion's default (2**25)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        for name, beta in zip(("beta1", "beta2"), value, strict=True):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        return value


class DistLionDeepSpeedPlan(BaseModel):
    """What :func:`parse_deepspeed_config` decided for a DistributedLion config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    optimizer: DistributedLionParams
    """Arguments for DistributedLion."""

    gradient_clipping: float
    """Max L2 norm of each rank's local gradient (0 disables clipping)."""

    deepspeed_config: dict[str, Any]
    """The config to give DeepSpeed: no ``optimizer`` section and ``gradient_clipping`` 0."""


_SECTION_KEYS = frozenset({"type", "params"})


def load_deepspeed_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a fresh dict.

    Args:
        config: a dict (deep-copied) or the path of a JSON file (hjson, as DeepSpeed reads it, when installed).

    Returns:
        The config dict.
    """
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, str | os.PathLike) and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            text = f.read()
        try:
            import hjson  # DeepSpeed's own reader (it accepts comments); a DeepSpeed dependency
        except ImportError:  # pragma: no cover - deepspeed always brings hjson
            loaded = json.loads(text)
        else:
            loaded = hjson.loads(text)
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


def _format_validation_error(prefix: str, err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for item in err.errors():
        key = ".".join([prefix, *(str(p) for p in item["loc"])])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            lines.append(f"{key}: unknown key (allowed keys: {allowed})")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "invalid DistributedLion config: " + "; ".join(lines)


def _zero_stage(zero: Any) -> int:
    if isinstance(zero, bool):  # legacy "zero_optimization": true meant stage 1
        return int(zero)
    if isinstance(zero, dict):
        stage = zero.get("stage", 0)
        return int(stage) if not isinstance(stage, str) else int(stage.strip() or 0)
    return 0


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def parse_deepspeed_config(
    config: str | os.PathLike | dict[str, Any], *, pipeline: bool = False
) -> DistLionDeepSpeedPlan | None:
    """Validate a DeepSpeed config for DistributedLion.

    Args:
        config: DeepSpeed config dict or JSON path.
        pipeline: whether the model is a DeepSpeed PipelineModule.

    Returns:
        ``None`` when the optimizer section is absent or is not DistributedLion (DeepSpeed gets the config
        unchanged); else the plan: optimizer arguments, local clipping norm and the config for DeepSpeed.

    Raises:
        ValueError: naming the key, for an invalid optimizer section or a DeepSpeed setting D-Lion cannot use.
    """
    raw = load_deepspeed_config(config)
    section = raw.get("optimizer")
    if not _is_distributed_lion(section):
        return None
    unknown = sorted(set(section) - _SECTION_KEYS)
    if unknown:
        raise ValueError(
            f"invalid DistributedLion config: optimizer.{unknown[0]}: unknown key "
            f"(allowed keys: {', '.join(sorted(_SECTION_KEYS))})"
        )
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"optimizer.params must be a JSON object, got {params!r}")
    try:
        optimizer = DistributedLionParams.model_validate(params)
    except ValidationError as err:
        raise ValueError(_format_validation_error("optimizer.params", err, DistributedLionParams)) from None

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
    if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0.0 or clip == float("inf"):
        raise ValueError(f"gradient_clipping must be a finite number >= 0, got {clip!r}")

    bf16 = _enabled(raw.get("bf16")) or _enabled(raw.get("bfloat16"))
    if pipeline and bf16:
        raise ValueError(
            "bf16.enabled with a PipelineModule cannot be used with DistributedLion: DeepSpeed then wraps the "
            "optimizer in its BF16_Optimizer, which partitions fp32 master weights and optimizer state across "
            "data-parallel ranks; every D-Lion rank must update all of its weights from its own full momentum. "
            "Use fp16 (dynamic loss scaling) or fp32 with pipeline parallelism."
        )
    autocast = raw.get("torch_autocast")
    if _enabled(autocast) and str(autocast.get("dtype", "")).lower() in ("fp16", "float16", "half", "torch.float16"):
        raise ValueError(
            "torch_autocast.dtype=float16 cannot be used with DistributedLion: its GradScaler skips a step from "
            "the local gradients only, so ranks would disagree on skipping. Use the fp16 section (dynamic loss "
            "scaling agrees on overflow across ranks) or torch_autocast with bfloat16."
        )

    ds_config = {k: v for k, v in raw.items() if k != "optimizer"}
    ds_config["gradient_clipping"] = 0.0
    return DistLionDeepSpeedPlan(optimizer=optimizer, gradient_clipping=float(clip), deepspeed_config=ds_config)
