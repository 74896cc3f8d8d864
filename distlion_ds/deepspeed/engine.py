"""``distlion_ds.initialize``: ``deepspeed.initialize`` that understands ``"optimizer": {"type": "DistributedLion"}``.

With any other config this is ``deepspeed.initialize``, called with the same arguments. With DistributedLion
(see :mod:`distlion_ds.deepspeed.config` for the validation) it

1. builds :class:`DeepSpeedDistributedLion` on the data-parallel group (the PipelineModule's grid, else
   ``mpu.get_data_parallel_group()``, else DeepSpeed's DP group, i.e. the world) and hands it to
   ``deepspeed.initialize(optimizer=...)`` (as a callable, so it is built after DeepSpeed has cast the model
   for fp16/bf16 and created its process groups);
2. turns the engine's data-parallel gradient all-reduce off (``enable_backward_allreduce``, and
   ``pipeline_enable_backward_allreduce`` for PipelineEngine): each rank's local gradient feeds its own vote;
3. makes ``engine.save_checkpoint`` / ``load_checkpoint`` keep every DP rank's momentum
   (:mod:`distlion_ds.deepspeed.checkpoint`).

How DeepSpeed features map onto D-Lion:

- ``gradient_accumulation_steps``: DeepSpeed accumulates the micro-batch gradients locally (no reduction, step 2)
  and calls the optimizer once per boundary, so each rank casts one vote per optimizer step on its accumulated
  local gradient (the mean over its micro-batches, DeepSpeed scaling each loss by 1/GAS).
- ``gradient_clipping`` (DeepSpeed default 1.0): each rank clips *its own* gradient by *its own* L2 norm, with
  no collective across DP ranks (:func:`clip_local_grad_norm_`). DeepSpeed's version would all-reduce the mean
  of the ranks' local norms, which describes no gradient that anybody applies. With model parallelism the
  norm is that of the rank's whole model replica (summed over its model-parallel group: pipeline stages and
  tensor slices, never over DP). Lion's update is ``sign(beta1*m + (1-beta1)*g)``: scaling ``g`` by a positive
  factor never changes the sign of ``g`` alone, so clipping only changes how much one large gradient weighs
  against the momentum, in the vote and in the momentum EMA.
- fp16 (dynamic loss scaling) and bf16 without pipeline: DeepSpeed wraps the optimizer in its
  ``FP16_UnfusedOptimizer`` (fp32 master weights, D-Lion state on the masters). Its overflow check is all-reduced
  (MAX) over the world, or over the DP and model-parallel groups with an mpu, whenever the DP gradient
  all-reduce is off, so an overflow on any rank skips the step on every rank and every rank lowers its loss
  scale identically. Unscaling happens before our step, clipping after unscaling.
- DeepSpeed's scheduler section (WarmupLR, WarmupCosineLR, ...) writes ``param_groups[i]["lr"]``, which
  DistributedLion reads every step.
- A step that DistributedLion skips because some rank had a non-finite gradient is reported to DeepSpeed like an
  fp16 overflow (``optimizer.overflow``): the engine counts it in ``skipped_steps`` and does not advance its LR
  scheduler, so the schedule stays aligned with D-Lion's step counter.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

from distlion_ds.comm import set_timeout_everywhere
from distlion_ds.deepspeed.checkpoint import install_checkpoint_hooks
from distlion_ds.deepspeed.config import (
    DISTLION_SECTION,
    DistLionDeepSpeedPlan,
    DistlionSection,
    inner_optimizer_class,
    load_deepspeed_config,
    parse_deepspeed_config,
    split_distlion_section,
)
from distlion_ds.optim import policy
from distlion_ds.optim.distributed_lion import DistributedLion
from distlion_ds.optim.local_steps import LocalStepsLion

__all__ = [
    "DeepSpeedDistributedLion", "DeepSpeedLocalStepsLion", "clip_local_grad_norm_", "get_distributed_lion",
    "initialize",
]

logger = logging.getLogger(__name__)

@torch.no_grad()
def clip_local_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    *,
    excluded: frozenset[int] = frozenset(),
    model_parallel_group: Any = None,
) -> float:
    """Scale this rank's gradient in place so that its L2 norm is at most ``max_norm``.

    ``norm = sqrt(sum_p ||g_p||_fp32 ** 2)`` in fp32 over the parameters with a gradient (those whose ``id`` is in
    ``excluded`` do not count, e.g. tied or tensor-parallel-replicated copies whose gradient another rank of the
    same replica already counts), summed over ``model_parallel_group`` when given; never over data parallelism.
    When ``norm > max_norm`` every gradient is multiplied by ``max_norm / (norm + 1e-6)`` computed in fp32
    (DeepSpeed's and megatron-core's epsilon); otherwise the gradients are untouched. A non-finite norm leaves them
    untouched: the optimizer's non-finite rule then skips the step on every rank. This is
    :mod:`distlion_ds.optim.policy`, the same policy as the megatron-core seam.

    Args:
        params: the parameters whose ``.grad`` to clip.
        max_norm: the largest allowed norm (> 0).
        excluded: ids of parameters counted elsewhere.
        model_parallel_group: the group holding the rest of this replica's parameters, or None.

    Returns:
        The norm before clipping.
    """
    params = list(params)
    grads = [(id(p), p.grad) for p in params if p.grad is not None]
    device = params[0].device if params else torch.device("cpu")

    def model_parallel_sum(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=model_parallel_group)

    # The one policy of both seams (distlion_ds.optim.policy): fp32 per-tensor norms summed in fp32 in parameter
    # order on the device, the coefficient on the device; one host sync per step (the float() below, for DeepSpeed's
    # get_global_grad_norm).
    norm = policy.replica_grad_norm(
        [g for pid, g in grads if pid not in excluded], device,
        model_parallel_sum if model_parallel_group is not None and dist.get_world_size(group=model_parallel_group) > 1
        else None)
    policy.clip_grads_([g for _, g in grads], policy.clip_coefficient(norm, max_norm))
    return float(norm)


class _DeepSpeedStepPolicy:
    """What both D-Lion optimizers do inside a DeepSpeed engine (mixed into the optimizer class).

    - ``max_grad_norm``: :func:`clip_local_grad_norm_` before every ``step()`` (0 disables);
    - ``overflow``: whether the last ``step()`` skipped its D-Lion step for non-finite gradients (read by DeepSpeed's
      engine, which then does not advance its LR scheduler);
    - while :func:`initialize` runs ``deepspeed.initialize``, ``step()`` does nothing: DeepSpeed's
      ``FP16_UnfusedOptimizer`` (fp16, and bf16 without ZeRO) calls ``step()`` once at construction with zero
      gradients to materialise Adam-style state. For D-Lion that would be a real update: every ``c == 0``, so
      the zero rule (DESIGN 3.1) moves each weight by ``±lr`` and advances the step counter.
    """

    def _init_policy(self, max_grad_norm: float) -> None:
        if not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.overflow = False
        self.last_local_grad_norm: float | None = None
        self._global_grad_norm: float | None = None  # what DeepSpeed's get_global_grad_norm() reports
        self._norm_excluded: frozenset[int] = frozenset()
        self._norm_group: Any = None
        self._inside_deepspeed_initialize = False

    def _configure_for_engine(self, *, norm_excluded: frozenset[int], norm_group: Any) -> None:
        self._norm_excluded = norm_excluded
        self._norm_group = norm_group
        self._inside_deepspeed_initialize = False

    def _policy_step(self, step: Any, closure: Any) -> Any:
        if self._inside_deepspeed_initialize:
            logger.debug("%s: step() during deepspeed.initialize ignored (no D-Lion step)", type(self).__name__)
            return None
        if self.max_grad_norm > 0.0:
            params = [p for group in self.param_groups for p in group["params"]]
            norm = clip_local_grad_norm_(
                params, self.max_grad_norm, excluded=self._norm_excluded, model_parallel_group=self._norm_group
            )
            self.last_local_grad_norm = self._global_grad_norm = norm
        skipped_before = self.comm_stats()["skipped_steps"]
        loss = step(closure)
        self.overflow = self.comm_stats()["skipped_steps"] != skipped_before
        return loss


class DeepSpeedDistributedLion(_DeepSpeedStepPolicy, DistributedLion):
    """DistributedLion as handed to DeepSpeed: local gradient clipping, DeepSpeed's skip protocol
    (:class:`_DeepSpeedStepPolicy`). Same state and ``state_dict`` as
    :class:`~distlion_ds.optim.distributed_lion.DistributedLion`."""

    def __init__(self, params: Any, *, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        DistributedLion.__init__(self, params, **kwargs)
        self._init_policy(max_grad_norm)

    def step(self, closure: Any = None) -> Any:
        return self._policy_step(super().step, closure)


class DeepSpeedLocalStepsLion(_DeepSpeedStepPolicy, LocalStepsLion):
    """Local-step D-Lion as handed to DeepSpeed (``optimizer.params.inner_optimizer``): the inner optimizer is built
    here from the config on the same parameters; each rank clips its local gradient before its inner step, and a
    skipped outer round is reported as an overflow (:class:`_DeepSpeedStepPolicy`)."""

    def __init__(self, params: Any, *, inner_optimizer: dict[str, Any], local_steps: int,
                 max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        params = list(params)
        inner_cls = inner_optimizer_class(inner_optimizer["type"])
        inner = inner_cls(params, **inner_optimizer.get("params", {}))
        LocalStepsLion.__init__(self, params, inner, local_steps, **kwargs)
        self._init_policy(max_grad_norm)

    def step(self, closure: Any = None) -> Any:
        return self._policy_step(super().step, closure)


def get_distributed_lion(engine: Any) -> DistributedLion | LocalStepsLion:
    """The DistributedLion (or LocalStepsLion) inside an engine from :func:`initialize` (under DeepSpeed's fp16/bf16
    wrapper, if any)."""
    for candidate in (getattr(engine, "basic_optimizer", None), getattr(engine, "optimizer", None)):
        if isinstance(candidate, DistributedLion | LocalStepsLion):
            return candidate
    raise ValueError("this engine does not step a DistributedLion (was it built by distlion_ds.initialize?)")


def _data_parallel_group(model: Any, mpu: Any) -> Any:
    if isinstance(model, PipelineModule):
        return model.mpu().get_data_parallel_group()
    if mpu is not None:
        return mpu.get_data_parallel_group()
    from deepspeed.utils import groups

    return groups._get_data_parallel_group()  # the engine uses the same group (a clone of the world)


def _model_parallel(model: Any, mpu: Any) -> tuple[Any, Any]:
    """(mpu-like object, model-parallel group) of this replica, or (None, None)."""
    unit = model.mpu() if isinstance(model, PipelineModule) else mpu
    if unit is None or not hasattr(unit, "get_model_parallel_group"):
        return unit, None
    return unit, unit.get_model_parallel_group()


def _norm_exclusions(engine: Any, optimizer: DistributedLion, unit: Any) -> frozenset[int]:
    """Ids of optimizer parameters whose gradient another rank of the same replica counts in the norm.

    Mirrors DeepSpeed's get_weight_norm: pipeline-tied copies (``ds_pipe_replicated``) and, on tensor-parallel
    ranks > 0, parameters that are not tensor-parallel (replicated across the slice). Under DeepSpeed's fp16/bf16
    wrapper the optimizer holds fp32 masters; the attributes live on the model parameters they mirror.
    """
    wrapper = engine.optimizer
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
        pairs = [
            (model_p, opt_p)
            for model_group, opt_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
            for model_p, opt_p in zip(model_group, opt_group, strict=True)
        ]
    else:
        pairs = [(p, p) for group in optimizer.param_groups for p in group["params"]]
    tp_rank = bwc_tensor_model_parallel_rank(unit) if unit is not None else 0
    return frozenset(
        id(opt_p)
        for model_p, opt_p in pairs
        if getattr(model_p, "ds_pipe_replicated", False) or (tp_rank > 0 and not is_model_parallel_parameter(model_p))
    )


def _try_load(source: Any) -> dict[str, Any] | None:
    """The config as a dict; None for a source that is neither a dict nor a file (e.g. base64: DeepSpeed's business).

    A file that exists but does not parse is an error naming the file, raised here before any process group.
    """
    if isinstance(source, dict) or (isinstance(source, str | os.PathLike) and os.path.isfile(source)):
        return load_deepspeed_config(source)
    return None


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    config_params: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with DistributedLion selectable from the config, and pipeline p2p compression.

    Args and Returns: as :func:`deepspeed.initialize` (``kwargs`` such as ``distributed_port`` are passed on).
    The config comes from ``config``, ``config_params`` or ``args.deepspeed_config``, as a dict or a JSON path.

    - ``"optimizer": {"type": "DistributedLion", "params": {...}}`` (type case-insensitive): the returned
      optimizer is the DistributedLion, or DeepSpeed's fp16/bf16 wrapper around it (:func:`get_distributed_lion`
      finds it), and the DP gradient all-reduce is off.
    - ``"p2p_compression": {...}`` (the schema of ``configs/compression/*.json``): the PipelineEngine's
      activation / gradient p2p is compressed (:func:`distlion_ds.deepspeed.pipe_compression.enable_pipe_compression`;
      its state is ``engine._distlion_pipe_compression``). DeepSpeed never sees the block.
    - Anything else goes to ``deepspeed.initialize`` unchanged.

    Raises:
        ValueError: before any process group or engine is created, for an invalid DistributedLion or
            p2p_compression section, p2p_compression without a PipelineModule, a DeepSpeed setting D-Lion cannot
            use (ZeRO stage >= 1, offload, bf16 with a PipelineModule, float16 torch_autocast), or when
            ``optimizer=`` is also given with a DistributedLion config.
    """
    from distlion_ds.deepspeed.pipe_compression import CONFIG_KEY, enable_pipe_compression, split_p2p_compression

    source, args_attr = (config, None) if config is not None else (config_params, None)
    if source is None:
        for attr in ("deepspeed_config", "deepscale_config"):
            if getattr(args, attr, None) is not None:
                source, args_attr = getattr(args, attr), attr
                break
    raw = _try_load(source) if source is not None else None
    p2p = None
    ours = DistlionSection()
    rewritten = False
    if raw is not None:
        rewritten = DISTLION_SECTION in raw
        raw, ours = split_distlion_section(raw)  # validated before any process-group work
    if raw is not None and CONFIG_KEY in raw:
        if not isinstance(model, PipelineModule):
            raise ValueError(f'"{CONFIG_KEY}" compresses the p2p between pipeline stages: it needs a deepspeed '
                             f"PipelineModule as model (got {type(model).__name__}); remove the block or use a "
                             "PipelineModule")
        raw, p2p = split_p2p_compression(raw)
        rewritten = True
    if rewritten:
        config, config_params = raw, None  # DeepSpeed gets the config without our blocks...
    # Every check on the config runs before the process group exists.
    plan = parse_deepspeed_config(raw, pipeline=isinstance(model, PipelineModule)) if raw is not None else None
    if plan is not None and optimizer is not None:
        raise ValueError(
            "the config selects optimizer.type=DistributedLion and optimizer= was passed too: pass one of them"
        )
    if plan is not None and model is None:
        raise ValueError("initialize requires a model")
    # A config that is not ours at all goes to DeepSpeed unchanged (DeepSpeed's own default timeout, 10 minutes).
    ours_involved = plan is not None or p2p is not None or rewritten
    timeout = _init_distributed(ours, kwargs | {"dist_init_required": dist_init_required}) if ours_involved else None
    hide = args_attr if rewritten else None
    saved = getattr(args, hide) if hide else None
    if hide:  # ...and not also in args, which it would refuse
        setattr(args, hide, None)
    try:
        out = _initialize(plan, args_attr, args=args, model=model, optimizer=optimizer,
                          model_parameters=model_parameters, training_data=training_data, lr_scheduler=lr_scheduler,
                          mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                          config_params=config_params, **kwargs)
    finally:
        if hide:
            setattr(args, hide, saved)
    if p2p is not None:
        enable_pipe_compression(out[0], p2p)
    if timeout is not None:  # DeepSpeed's own groups (DP, pipeline) were made with torch's 30-minute default
        n = set_timeout_everywhere(timeout)
        logger.info("distlion_ds.initialize: process-group timeout %s on %d groups", timeout, n)
    return out


def _init_distributed(ours: DistlionSection, ds_kwargs: dict[str, Any]) -> datetime.timedelta | None:
    """Create the default process group with our timeout, unless the caller already did; the timeout to apply.

    A stalled peer (a frozen VM, a partition) then makes every other rank's collective fail after
    ``distlion.distributed_timeout_minutes`` (the package's collectives raise one line naming the step and the
    collective) instead of hanging for torch's default of 30 minutes. When the caller created the process group,
    its timeout stands (None is returned).
    """
    timeout = datetime.timedelta(minutes=ours.distributed_timeout_minutes)
    if dist.is_initialized():
        logger.info("distlion_ds.initialize: torch.distributed was initialized by the caller; its timeout applies "
                    "(pass timeout= to init_process_group, or leave the initialization to us for "
                    "distlion.distributed_timeout_minutes=%s)", ours.distributed_timeout_minutes)
        return None
    if ds_kwargs.get("dist_init_required") is False:
        return None
    init_kwargs = {k: ds_kwargs[k] for k in ("distributed_port",) if k in ds_kwargs}
    deepspeed.init_distributed(timeout=timeout, **init_kwargs)
    return timeout


def _initialize(
    plan: DistLionDeepSpeedPlan | None,
    args_attr: str | None,
    *,
    args: Any,
    model: torch.nn.Module | None,
    optimizer: Any,
    config: Any,
    config_params: Any,
    mpu: Any,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """:func:`initialize` once the config is validated (``plan``: None unless it selects DistributedLion)."""
    if plan is None:
        if isinstance(optimizer, DistributedLion):
            logger.warning(
                "distlion_ds.initialize: a DistributedLion was passed as optimizer= with a config that does not "
                "select it, so DeepSpeed keeps its fp32 gradient all-reduce (every rank then casts the same "
                'votes). Put "optimizer": {"type": "DistributedLion", ...} in the config for the 1-bit exchange.'
            )
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, mpu=mpu, config=config,
                                    config_params=config_params, **kwargs)
    sp_size = getattr(mpu, "get_sequence_parallel_world_size", None)
    if sp_size is not None and sp_size() > 1:
        raise ValueError(
            "sequence parallelism cannot be used with DistributedLion: sequence-parallel ranks hold partial "
            "gradients of one replica that DeepSpeed sums with the DP all-reduce that D-Lion turns off"
        )
    return _initialize_distributed_lion(plan, args=args, args_attr=args_attr, model=model, mpu=mpu, **kwargs)


def _initialize_distributed_lion(
    plan: DistLionDeepSpeedPlan, *, args: Any, args_attr: str | None, model: Any, mpu: Any, **ds_kwargs: Any
) -> tuple[Any, Any, Any, Any]:
    built: list[tuple[DeepSpeedDistributedLion | DeepSpeedLocalStepsLion, Any]] = []

    def make_optimizer(params: Any) -> DeepSpeedDistributedLion | DeepSpeedLocalStepsLion:
        group = _data_parallel_group(model, mpu)
        kwargs = plan.optimizer.model_dump(exclude_none=True)
        local_steps = kwargs.pop("local_steps")
        if "inner_optimizer" in kwargs:
            opt = DeepSpeedLocalStepsLion(params, local_steps=local_steps, max_grad_norm=plan.gradient_clipping,
                                          process_group=group, **kwargs)
        else:
            opt = DeepSpeedDistributedLion(params, max_grad_norm=plan.gradient_clipping, process_group=group,
                                           **kwargs)
        opt._inside_deepspeed_initialize = True  # until _configure_for_engine below
        built.append((opt, group))
        return opt

    saved_args_config = getattr(args, args_attr) if args_attr else None
    if args_attr:  # DeepSpeed refuses a config in both args and config=; it gets ours, rewritten
        setattr(args, args_attr, None)
    try:
        engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=make_optimizer, mpu=mpu, config=plan.deepspeed_config, **ds_kwargs
        )
    finally:
        if args_attr:
            setattr(args, args_attr, saved_args_config)
    if len(built) != 1:
        raise RuntimeError(f"deepspeed.initialize built the optimizer {len(built)} times, expected once")
    opt, dp_group = built[0]

    # D-Lion exchanges 1-bit votes of each rank's *local* gradient; DeepSpeed's DP gradient all-reduce would
    # average them first (an fp32 ring all-reduce moves 64(N-1)/N bits per parameter, 32x MaVo's 2(N-1)/N, and
    # every rank would then cast the same votes). PipelineEngine already
    # sets enable_backward_allreduce=False and schedules its own reduction behind pipeline_enable_backward_allreduce.
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False

    unit, norm_group = _model_parallel(model, mpu)
    opt._configure_for_engine(norm_excluded=_norm_exclusions(engine, opt, unit), norm_group=norm_group)
    install_checkpoint_hooks(engine, opt, dp_group)
    if dist.get_rank() == 0:
        logger.info(
            "distlion_ds: DistributedLion(%s) over %d data-parallel ranks; DP gradient all-reduce off; "
            "local gradient clipping at %s",
            plan.optimizer.aggregation,
            dist.get_world_size(group=dp_group),
            plan.gradient_clipping or "off",
        )
    return engine, engine_optimizer, loader, scheduler
