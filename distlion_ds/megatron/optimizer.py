"""D-Lion as a megatron-core ``MegatronOptimizer`` on megatron-core's own ``DistributedDataParallel`` (issue 11).

Usage (the shape of ``megatron.core.optimizer.get_megatron_optimizer``)::

    from megatron.core.distributed import DistributedDataParallel as DDP
    from distlion_ds.megatron import ddp_config_for_dlion, get_optimizer

    chunks = [DDP(config, ddp_config_for_dlion(overlap_grad_reduce=True), chunk) for chunk in model]
    optimizer = get_optimizer(OptimizerConfig(lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99,
                                              clip_grad=1.0, bf16=True), chunks, aggregation="mavo")
    scheduler = OptimizerParamScheduler(optimizer, ...)      # param_groups carry lr / weight_decay as megatron's
    ... forward_backward_func(...) with config.finalize_model_grads_func = finalize_model_grads ...
    success, grad_norm, num_zeros = optimizer.step()

``OptimizerConfig`` mapping: ``lr`` -> the Lion learning rate (each group's ``lr``, driven by
``OptimizerParamScheduler``); ``weight_decay`` -> decoupled weight decay (x the group's ``wd_mult``: megatron-core's
own grouping, no decay on biases and 1-D parameters); ``adam_beta1`` / ``adam_beta2`` -> Lion's ``beta1`` (mixes the
vote) / ``beta2`` (mixes the momentum): pass Lion's values (0.9, 0.99), or ``betas=`` to override; ``clip_grad`` ->
local clipping by the replica's norm (0 disables); ``log_num_zeros_in_grad`` as megatron. ``fp16`` is refused (a loss
scaler would have to unscale before the vote); bf16 models train through fp32 main parameters as megatron's
``Float16OptimizerWithFloat16Params`` does.

**Where the DP gradient all-reduce goes (the seam).** megatron-core's DDP reduces gradients in exactly one place per
bucket group: ``_ParamAndGradBucketGroup.start_grad_sync`` (all-reduce / reduce-scatter, after scaling by
``1/dp``), reached either from ``finish_grad_sync`` (``overlap_grad_reduce=False``: finalize_model_grads calls
``model_chunk.finish_grad_sync()``) or from the backward hook's ``register_grad_ready`` as soon as a bucket's
gradients are final in the last micro-batch (``overlap_grad_reduce=True``). No DDP config knob turns the reduction
off while keeping the DP group (a DP group of size 1 in the DDP would also silence ``broadcast_params`` and the
per-token-loss ``num_tokens`` all-reduce, and would make the DDP's bucket padding ignore the real DP size), so
:func:`get_optimizer` replaces them *on each bucket-group instance* of the given chunks (nothing global is
patched): ``start_grad_sync`` becomes "compute this bucket's votes and start its all_to_all" (only when voting early
is exact, see below; otherwise nothing; idempotent within a backward), ``finish_grad_sync`` does nothing, and
``reset`` (``zero_grad_buffer``) first drops the exchanges of a backward that no step consumed. finalize_model_grads
stays megatron-core's: its DP step is now silent, and its later steps (the tied word-embedding and position-embedding
all-reduces across pipeline stages, layernorm grads under sequence parallelism) run unchanged on the local gradients,
before the votes of the buckets they touch. Every DDP gradient is the rank's local sum over its micro-batches (the
``1/dp`` scaling lived in the replaced method; a constant scale does not change a sign vote, but it would change the
clipping norm). Private megatron-core names relied on: ``DistributedDataParallel.bucket_groups`` /
``expert_parallel_bucket_groups`` / ``ddp_config`` / ``intra_dp_cp_group`` (else ``dp_cp_group``),
``_ParamAndGradBucketGroup.buckets`` / ``start_grad_sync`` / ``finish_grad_sync`` / ``reset``,
``_ParamAndGradBucket.grad_data`` / ``param_data`` / ``params_list``, ``Parameter.main_grad``, and
``megatron.core.optimizer._get_param_groups`` (falls back to the classic grouping when its signature changes).
They were read and tested on 0.16.1; :func:`get_optimizer` checks each attribute and fails naming it (and the
installed version) on a release without it.

**Layout.** Votes are computed from each DDP bucket's contiguous ``grad_data`` (one ``lion_votes`` launch per
bucket), the momentum is one fp32 buffer per bucket in the same layout, and the apply is one ``lion_apply`` launch
per run of parameters with the same ``lr`` (the whole bucket, in practice) on the bucket's ``param_data`` (fp32
parameters, when the DDP keeps a parameter buffer) or the bucket's fp32 main parameters (bf16 models, then copied
into the model's bf16 parameters); fp32 parameters without a parameter buffer are applied with one multi-tensor
call per param group (``lion_apply_multi``: one launch per kind of tensor, not one per parameter). Weight
decay is a per-run scale before the apply (the same fp32 rounding as the fused kernel's ``p * (1 - lr*wd)``). The
zero rule of DESIGN 3.1 uses an element's index inside its parameter; every parameter must start at a bucket offset
that is a multiple of 8 (votes byte-aligned, parity preserved). ``DistributedDataParallelConfig(
use_distributed_optimizer=True)`` guarantees it (megatron pads each parameter to 64 elements and each bucket to a
multiple of the DP size; with D-Lion that flag only selects this padding and the parameter buffer: no optimizer
state is sharded and the parameter all-gather never runs); :func:`ddp_config_for_dlion` sets it. Padding elements
between parameters get votes too (their gradient and momentum stay 0); their parameter slots are not parameters.

**Overlap.** With ``overlap_grad_reduce=True`` a bucket's all_to_all starts inside the backward of the last
micro-batch, as soon as its gradients are final, when that is exact: not with clipping (``clip_grad > 0``: the
coefficient needs every bucket's gradient), not with ``calculate_per_token_loss`` (finalize_model_grads rescales
every gradient afterwards), never for a bucket holding a parameter that finalize_model_grads still changes (tied or
position embeddings under pipeline parallelism, sequence-parallel / TP-averaged / qk-layernorm parameters, DiT
condition embedders), and never for the last bucket: it is voted in the step and carries the agreed non-finite flag.
Everything else (counts, all_gather, apply) finishes in the step. The result is the same bits as the serialized path.

**A step** (at most one host synchronisation, the skip decision): ``prepare_grads`` clips (device-side coefficient),
votes the buckets not yet voted, agrees the non-finite flag over the model-parallel group (in the norm all-reduce, or
one 4-byte MAX all-reduce), sends the last bucket with it, and reads every DP rank's flag from it (the sync):
returns ``found_inf``. ``step_with_ready_grads`` counts, all-gathers and applies. megatron-core's
``get_grad_norm_fp32`` / ``clip_grad_by_total_norm_fp32`` are not called: the first reads the norm on the host
(``.item()``, a second host synchronisation per step, before any vote can leave), the second needs that host float
and asserts CUDA tensors; the policy's norm is the same quantity (fp32, megatron's own filter of what counts:
``param_is_not_shared`` and ``param_is_not_tensor_parallel_duplicate``) kept on the device. The policy
(clipping, agreement, skip counting, replica checks, checkpoint rules) is :mod:`distlion_ds.optim.policy`.

**Checkpoints** (``sharded_state_dict`` for ``megatron.core.dist_checkpointing``): each parameter's momentum is a
``ShardedTensor`` with the model parameter's sharding plus a leading data-parallel axis (global shape ``(dp, ...)``,
this rank at offset ``dp_rank``, its data-parallel replica index set to 0: every DP rank owns and saves its own
slice); fp32 main parameters are saved as megatron's (one copy, DP rank 0); the step counter, skip count and the DP
size are common state. Loading at another DP size follows the step policy (:mod:`distlion_ds.optim.policy`, rule 4,
shared with the DeepSpeed seam): rank ``r`` loads the momentum saved by rank ``r % N_saved``. Call
:func:`prepare_checkpoint_load` (it reads the checkpoint's common state) before building the loading
``sharded_state_dict``, so the momentum's DP axis has the saved size and this rank reads its source slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from distlion_ds.comm import VoteExchange, replica_checksum, run_collective
from distlion_ds.kernels.lion import AGGREGATIONS, f32, lion_apply, lion_apply_multi, lion_votes
from distlion_ds.optim import policy

logger = logging.getLogger(__name__)

FORMAT = "distlion_ds.megatron.DistributedLionOptimizer/1"
MOMENTUM_PREFIX = "optimizer.distlion.exp_avg_per_dp_rank"
MASTER_PREFIX = "optimizer.state.fp32_param"
_PATCH_MARK = "_distlion_dlion_optimizer"

try:
    from megatron.core.optimizer import MegatronOptimizer
except ImportError as exc:  # pragma: no cover - the package requires megatron-core for this module
    raise ImportError("distlion_ds.megatron.optimizer needs megatron-core (pip install megatron-core)") from exc


def ddp_config_for_dlion(**overrides: Any):
    """A ``DistributedDataParallelConfig`` that D-Lion's bucket path accepts.

    ``use_distributed_optimizer=True`` (64-element-aligned parameters in contiguous parameter and gradient buffers:
    see the module docstring; no optimizer state is sharded), ``overlap_param_gather=False`` (parameters are whole on
    every rank; there is nothing to all-gather). Other fields keep megatron-core's defaults unless overridden.

    Args:
        overrides: any ``DistributedDataParallelConfig`` field, e.g. ``overlap_grad_reduce=True``, ``bucket_size``.
    Returns:
        The config.
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    fields = {"use_distributed_optimizer": True, "overlap_param_gather": False, **overrides}
    return DistributedDataParallelConfig(**fields)


@dataclass
class _Bucket:
    """One megatron-core DDP bucket as D-Lion sees it."""

    index: int
    grad: torch.Tensor  # the bucket's grad_data (flat, fp32 or bf16)
    numel: int
    params: list[tuple[torch.nn.Parameter, int, dict]]  # (model parameter, offset in the bucket, param group)
    param_data: torch.Tensor | None  # the DDP's flat parameter buffer of the bucket (None without one)
    exp_avg: torch.Tensor = None  # fp32 [numel]
    master: torch.Tensor | None = None  # fp32 main parameters [numel] (16-bit models)
    votes: torch.Tensor = None  # uint8, padded for the exchange
    late: bool = False  # finalize_model_grads still changes a parameter of it after the DP step
    # megatron-core >= 0.19 ``param_name_patterns_for_fp32_local_accumulation``: these parameters accumulate in a
    # separate fp32 ``main_grad``, copied into their slice of ``grad_data`` before the reduction (here: the vote).
    extra: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (main_grad, slice in grad)


class _Groups:
    """The ``optimizer`` attribute MegatronOptimizer expects: param_groups (lr / weight_decay / wd_mult / max_lr /
    min_lr, read and written by OptimizerParamScheduler) and an (empty) ``state``."""

    def __init__(self, param_groups: list[dict]):
        self.param_groups = param_groups
        self.state: dict = {}


def _require(obj: Any, attr: str, what: str) -> Any:
    if not hasattr(obj, attr):
        import megatron.core

        raise RuntimeError(
            f"DistributedLionOptimizer relies on megatron-core's private {what}.{attr}, which this megatron-core "
            f"({getattr(megatron.core, '__version__', '?')}) does not have; supported: 0.16.x and 0.19.x")
    return getattr(obj, attr)


def _late_param(name: str, param: torch.nn.Parameter, config: Any, pp_size: int) -> bool:
    """Whether finalize_model_grads changes this parameter's gradient after the DP step (its votes must wait)."""
    if getattr(param, "shared_embedding", False) or getattr(param, "pipeline_parallel", False):
        return True
    if getattr(param, "average_gradients_across_tp_domain", False):
        return True
    if getattr(config, "sequence_parallel", False) and getattr(param, "sequence_parallel", False):
        return True
    if getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name):
        return True
    return pp_size > 1 and (getattr(param, "is_embedding_or_output_parameter", False)
                            or name.endswith("position_embeddings.weight"))


def _megatron_param_groups(model_chunks: list, config: Any, config_overrides: Any) -> list[dict]:
    """megatron-core's own grouping (``_get_param_groups``: no weight decay on biases and 1-D parameters, decoupled
    lr); a private function, so a signature it no longer has falls back to the same classic rule."""
    try:
        from megatron.core.optimizer import _get_param_groups

        return _get_param_groups(model_chunks, config, config_overrides)
    except (ImportError, TypeError) as exc:
        logger.warning("megatron-core's _get_param_groups is unavailable (%s); grouping by the classic rule "
                       "(no weight decay on biases and 1-D parameters)", exc)
    decay, no_decay = [], []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    base = {"is_expert_parallel": False, "default_config": True, "lr_mult": 1.0, "is_decoupled_lr": False,
            "max_lr": config.lr, "min_lr": config.min_lr}
    return [{**base, "params": decay, "wd_mult": 1.0}, {**base, "params": no_decay, "wd_mult": 0.0}]


class DistributedLionOptimizer(MegatronOptimizer):
    """D-Lion (DESIGN 3.1) as a megatron-core optimizer over DDP-wrapped model chunks; built by :func:`get_optimizer`.

    Args:
        config: megatron-core ``OptimizerConfig`` (mapping in the module docstring).
        model_chunks: the DDP-wrapped chunks (megatron-core ``DistributedDataParallel``).
        param_groups: groups of model parameters with megatron's keys (``wd_mult``, ``max_lr``, ``min_lr``, ...).
        aggregation: ``"mavo"`` or ``"avg"``.
        betas: Lion's ``(beta1, beta2)``; None takes ``(config.adam_beta1, config.adam_beta2)``.
        data_parallel_group: the group that votes; None takes the chunks' DDP gradient group.
        model_parallel_group: the rest of a replica (norm and non-finite agreement); None takes megatron's
            ``parallel_state.get_model_parallel_group()``.
        tp_group: for tensor-parallel duplicates in the norm; None takes megatron's.
        check_replicas_every: replica checksum cadence in applied steps (0 disables; None: the policy's default).
        raise_on_nonfinite: raise ``FloatingPointError`` instead of skipping.
    """

    def __init__(self, config: Any, model_chunks: list, param_groups: list[dict], *, aggregation: str = "mavo",
                 betas: tuple[float, float] | None = None, data_parallel_group=None, model_parallel_group=None,
                 tp_group=None, check_replicas_every: int | None = None, raise_on_nonfinite: bool = False):
        _validate(config, model_chunks, aggregation, betas, check_replicas_every)
        beta1, beta2 = betas if betas is not None else (config.adam_beta1, config.adam_beta2)
        groups = []
        for g in param_groups:
            groups.append({**g, "lr": config.lr, "weight_decay": config.weight_decay * g.get("wd_mult", 1.0),
                           "betas": (float(beta1), float(beta2))})
        super().__init__(_Groups(groups), config, init_state_fn=lambda *a: None)
        self.is_stub_optimizer = False  # read by MegatronOptimizer.param_groups; set for real below
        self.model_chunks = list(model_chunks)
        self.aggregation = aggregation
        self.betas = (float(beta1), float(beta2))
        self.clip_grad = float(config.clip_grad or 0.0)
        self.check_replicas_every = (policy.DEFAULT_CHECK_REPLICAS_EVERY if check_replicas_every is None
                                     else check_replicas_every)
        self.skips = policy.SkipCounter("DistributedLionOptimizer", raise_on_nonfinite)
        self.dp_group = data_parallel_group if data_parallel_group is not None else _ddp_group(model_chunks)
        if model_parallel_group is None:
            from megatron.core import parallel_state

            model_parallel_group = parallel_state.get_model_parallel_group()
        self.mp_group = model_parallel_group
        self.tp_group = tp_group
        self.exchange = VoteExchange(self.dp_group, aggregation)
        self.dp_size, self.dp_rank = self.exchange.world_size, self.exchange.rank
        self.load_data_parallel_size: int | None = None  # the checkpoint's DP size while loading one (policy rule 4)
        self._step = 0
        self._steps_seen = 0
        self._early_count = 0
        self._flights: dict[int, Any] = {}
        self._ready = False
        self._grad_norm: torch.Tensor | None = None
        self._group_of = {id(p): g for g in groups for p in g["params"]}
        self._buckets = self._build_buckets()
        self.device = self._buckets[0].grad.device if self._buckets else torch.device("cpu")
        self._flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        # Optimizer parameters, as megatron's: fp32 main parameters for 16-bit model parameters (views of the
        # bucket's master buffer), the model parameters themselves for fp32.
        self._main_of: dict[int, torch.Tensor] = {}
        for b in self._buckets:
            for p, off, _ in b.params:
                if b.master is not None:
                    main = b.master[off: off + p.numel()].view(p.shape)
                    self._main_of[id(p)] = main
        for g in groups:
            g["params"] = [self._main_of.get(id(p), p) for p in g["params"]]
        self._model_params = [p for b in self._buckets for p, _, _ in b.params]
        self.is_stub_optimizer = not self._model_params
        self._overlap = self._early_votes_possible()
        self._install()

    # ------------------------------------------------------------------------------------------ layout
    def _build_buckets(self) -> list[_Bucket]:
        from megatron.core import parallel_state

        pp_size = parallel_state.get_pipeline_model_parallel_world_size() \
            if parallel_state.model_parallel_is_initialized() else 1
        buckets: list[_Bucket] = []
        seen: set[int] = set()
        for chunk in self.model_chunks:
            names = {id(p): n for n, p in chunk.named_parameters()}
            cfg = getattr(chunk, "config", None)
            if _require(chunk, "expert_parallel_bucket_groups", "DistributedDataParallel"):
                raise ValueError("model_chunks: expert-parallel parameters (MoE experts, allreduce=False) are not "
                                 "supported by DistributedLionOptimizer yet; use a dense model")
            for bg in _require(chunk, "bucket_groups", "DistributedDataParallel"):
                for mb in _require(bg, "buckets", "_ParamAndGradBucketGroup"):
                    grad = _require(mb, "grad_data", "_ParamAndGradBucket")
                    param_data = _require(mb, "param_data", "_ParamAndGradBucket")
                    b = _Bucket(len(buckets), grad, grad.numel(), [], param_data)
                    start = grad.storage_offset()
                    for p in sorted(_require(mb, "params_list", "_ParamAndGradBucket"),
                                    key=lambda q: _grad_slice(q).storage_offset()):
                        view = _grad_slice(p)
                        if view.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr():
                            raise ValueError(f"model_chunks: the gradient of {names.get(id(p), tuple(p.shape))} is "
                                             "not in its DDP bucket's grad_data; DistributedLionOptimizer votes on "
                                             "the bucket buffers (this megatron-core layout is not supported)")
                        if view is not p.main_grad:
                            b.extra.append((p.main_grad, view))
                        off = view.storage_offset() - start
                        if off % 8:
                            raise ValueError(
                                f"model_chunks: parameter {names.get(id(p), tuple(p.shape))} starts at element {off} "
                                "of its DDP bucket, not a multiple of 8: D-Lion's packed votes and zero rule need "
                                "aligned parameters. Build the DDP with DistributedDataParallelConfig("
                                "use_distributed_optimizer=True) (distlion_ds.megatron.ddp_config_for_dlion()), "
                                "which pads every parameter to 64 elements")
                        if id(p) not in self._group_of:
                            raise ValueError(f"model_chunks: parameter {names.get(id(p))} is in a DDP bucket but in "
                                             "no param group")
                        seen.add(id(p))
                        b.params.append((p, off, self._group_of[id(p)]))
                        b.late |= _late_param(names.get(id(p), ""), p, cfg, pp_size)
                    self._layout(b)
                    buckets.append(b)
        missing = [id(p) for g in self.optimizer.param_groups for p in g["params"] if id(p) not in seen]
        if missing:
            raise ValueError(f"param groups hold {len(missing)} parameter(s) that no DDP bucket of model_chunks "
                             "holds; pass the DDP-wrapped chunks whose parameters the groups list")
        return buckets

    def _layout(self, b: _Bucket) -> None:
        dtypes = {p.dtype for p, _, _ in b.params}
        if len(dtypes) > 1:
            raise ValueError(f"model_chunks: a DDP bucket mixes parameter dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        if dtype == torch.float16:
            raise ValueError("model_chunks: float16 parameters need a loss scaler, which DistributedLionOptimizer "
                             "does not implement; use bf16 (OptimizerConfig(bf16=True)) or fp32")
        b.exp_avg = torch.zeros(b.numel, dtype=torch.float32, device=b.grad.device)
        b.votes = torch.zeros(self.exchange.padded_numel(b.numel) // 8, dtype=torch.uint8, device=b.grad.device)
        if dtype != torch.float32:
            b.master = torch.zeros(b.numel, dtype=torch.float32, device=b.grad.device)
            for p, off, _ in b.params:
                b.master[off: off + p.numel()].copy_(p.detach().reshape(-1))
    @staticmethod
    def _flat_target(b: _Bucket) -> torch.Tensor | None:
        """The flat fp32 tensor the apply writes (masters, or the DDP's fp32 parameter buffer), or None."""
        if b.master is not None:
            return b.master
        if b.param_data is not None and b.param_data.dtype == torch.float32:
            return b.param_data
        return None

    def _early_votes_possible(self) -> bool:
        ddp_cfgs = [_require(c, "ddp_config", "DistributedDataParallel") for c in self.model_chunks]
        if not any(c.overlap_grad_reduce for c in ddp_cfgs):
            return False
        if self.clip_grad > 0:
            logger.info("DistributedLionOptimizer: overlap_grad_reduce=True with clip_grad=%g: votes wait for the "
                        "replica's norm, so every bucket is voted and sent in the step", self.clip_grad)
            return False
        if any(getattr(getattr(c, "config", None), "calculate_per_token_loss", False) for c in self.model_chunks):
            logger.info("DistributedLionOptimizer: calculate_per_token_loss rescales gradients after the backward; "
                        "every bucket is voted and sent in the step")
            return False
        return True

    def _install(self) -> None:
        """Replace each bucket group's start/finish_grad_sync (module docstring: the seam)."""
        by_group: list[tuple[Any, list[_Bucket]]] = []
        i = 0
        for chunk in self.model_chunks:
            for bg in chunk.bucket_groups:
                mine = self._buckets[i: i + len(bg.buckets)]
                i += len(bg.buckets)
                by_group.append((bg, mine))
        for bg, mine in by_group:
            if getattr(bg, _PATCH_MARK, None) is not None:
                raise ValueError("model_chunks: these DDP chunks already feed another DistributedLionOptimizer; "
                                 "build one optimizer per model")
            setattr(bg, _PATCH_MARK, self)
            bg.start_grad_sync = self._make_start(mine)
            bg.finish_grad_sync = _finish_grad_sync_noop
            bg.reset = self._make_reset(mine, bg.reset)

    def _make_reset(self, buckets: list[_Bucket], original):
        def reset() -> None:
            """megatron-core's reset (``zero_grad_buffer``), after dropping these buckets' exchanges of a backward
            that no step consumed (their votes were cast on gradients about to be zeroed)."""
            stale = [self._flights.pop(b.index) for b in buckets if b.index in self._flights]
            if stale:
                self.exchange.drain(stale)
                self._flag.zero_()  # their non-finite findings belonged to the discarded gradients
            original()
        return reset

    def _make_start(self, buckets: list[_Bucket]):
        def start_grad_sync(force_all_reduce: bool | None = False) -> None:
            """D-Lion: start these buckets' vote exchange now when exact (module docstring), else nothing."""
            if not self._overlap:
                return
            for b in buckets:
                if b.late or b is self._buckets[-1]:  # the last bucket carries the step's flag
                    continue
                if b.index in self._flights:  # already sent in this backward (Megatron-LM's grad_sync_func may
                    continue                  # call again after register_grad_ready did)
                self._flights[b.index] = self._vote_and_start(b, self._step + 1, self._flag)
                self._early_count += 1
        return start_grad_sync

    # ------------------------------------------------------------------------------------------ step
    def _vote_and_start(self, b: _Bucket, t: int, flag: torch.Tensor):
        _copy_extra(b)
        lion_votes(b.grad, b.exp_avg, self.betas[0], t, out=b.votes[: -(-b.numel // 8)], nonfinite=flag)
        return self.exchange.start(b.votes, flag, t, key=b.index)

    def _grads_for_norm(self) -> list[torch.Tensor]:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        out = []
        for b in self._buckets:
            for p, off, _ in b.params:
                if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, self.tp_group):
                    out.append(b.grad[off: off + p.numel()])
        return out

    def _mp_size(self) -> int:
        return dist.get_world_size(self.mp_group) if self.mp_group is not None else 1

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Clip, vote the buckets not yet voted, agree on non-finite gradients, send the last bucket with the flag.

        Returns:
            ``found_inf``: True on every rank when any rank of any replica saw a non-finite gradient (the step is
            then skipped and counted; ``step_with_ready_grads`` must not be called).
        """
        t = self._step + 1
        flag = self._flag
        mp_sum = None
        if self._mp_size() > 1:
            def mp_sum(x: torch.Tensor) -> None:
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.mp_group)
        self._grad_norm = None
        for b in self._buckets:
            if b.index not in self._flights:
                _copy_extra(b)
        if self.clip_grad > 0:
            norm = run_collective("the replica gradient-norm all-reduce (model-parallel group)",
                                  lambda: policy.replica_grad_norm(self._grads_for_norm(), self.device, mp_sum),
                                  step=t, group=self.mp_group)
            coef = policy.clip_coefficient(norm, self.clip_grad)
            policy.clip_grads_([b.grad for b in self._buckets], coef)
            self._grad_norm = norm
            flag = policy.nonfinite_flag(norm, flag)
        pending = [b for b in self._buckets if b.index not in self._flights]
        for b in pending[:-1]:
            self._flights[b.index] = self._vote_and_start(b, t, flag)
        if pending:
            lion_votes(pending[-1].grad, pending[-1].exp_avg, self.betas[0], t,
                       out=pending[-1].votes[: -(-pending[-1].numel // 8)], nonfinite=flag)
        if self._mp_size() > 1:
            run_collective("the non-finite flag all-reduce (model-parallel group)",
                           lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.mp_group),
                           step=t, group=self.mp_group)
        if pending:
            carrier = self._flights[pending[-1].index] = self.exchange.start(pending[-1].votes, flag, t,
                                                                               key=pending[-1].index)
        else:  # every bucket left during the backward, or no bucket at all: a flag-only exchange
            carrier = self.exchange.start(torch.zeros(0, dtype=torch.uint8, device=self.device), flag, t, key=-1)
        found_inf = self.exchange.any_nonfinite(carrier)  # the step's one host synchronisation
        self._steps_seen += 1
        if found_inf:
            self.exchange.drain(list(self._flights.values()) + [carrier])
            self._flights = {}
            self._flag.zero_()
            self._ready = False
            self.skips.record(t)
            return True
        self._ready = True
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """Count, all-gather and apply every bucket (after ``prepare_grads`` returned False). Returns True."""
        if not self._ready:
            raise RuntimeError("DistributedLionOptimizer.step_with_ready_grads() without a successful "
                               "prepare_grads() before it (call step(), or prepare_grads() first)")
        t = self._step + 1
        flights = [(b, self._flights[b.index]) for b in self._buckets]
        for _, f in flights:
            self.exchange.reduce(f)
        n = self.dp_size
        for b, f in flights:
            agg = self.exchange.finish(f)
            self._apply(b, agg, t, n)
        self._flights = {}
        self._flag.zero_()
        self._ready = False
        self._step = t
        if policy.replica_check_due(t, self.check_replicas_every):
            self.check_replicas()
        return True

    def _apply(self, b: _Bucket, agg: torch.Tensor, t: int, n: int) -> None:
        beta2 = self.betas[1]
        target = self._flat_target(b)
        if target is None:  # fp32 parameters without a DDP parameter buffer: one multi-tensor call per param group
            by_group: dict[int, tuple[dict, list]] = {}
            for p, off, g in b.params:
                by_group.setdefault(id(g), (g, []))[1].append((p, off))
            for g, items in by_group.values():
                lion_apply_multi([p for p, _ in items], [b.grad[off: off + p.numel()] for p, off in items],
                                 [off for _, off in items], b.exp_avg, agg, n, g["lr"], g["weight_decay"], beta2,
                                 self.aggregation)
            return
        # Runs of consecutive parameters with the same (lr) or (lr, weight_decay), from the groups' current values
        # (OptimizerParamScheduler may change them every step); a run spans the padding between its parameters.
        runs: list[list] = []  # [start, end, lr]
        decay: list[list] = []  # [start, end, factor]
        prev_factor = None
        for p, off, g in b.params:
            end = off + p.numel()
            if runs and runs[-1][2] == g["lr"]:
                runs[-1][1] = end
            else:
                runs.append([off, end, g["lr"]])
            factor = f32(1.0 - g["lr"] * g["weight_decay"]) if g["weight_decay"] else None
            if factor is not None and factor == prev_factor:  # spans the padding after the previous parameter
                decay[-1][1] = end
            elif factor is not None:
                decay.append([off, end, factor])
            prev_factor = factor
        for start, end, factor in decay:  # = the fused kernel's fp32 p * (1 - lr*wd), rounded once
            target[start:end].mul_(factor)
        for start, end, lr in runs:
            lion_apply(target[start:end], b.exp_avg[start:end], b.grad[start:end],
                       agg[:, start // 8: -(-end // 8)], n, lr, 0.0, beta2, self.aggregation)
        if b.master is not None:  # fp32 main parameters -> the model's 16-bit parameters (round to nearest)
            if b.param_data is not None:
                b.param_data.copy_(b.master)
            else:
                for p, off, _ in b.params:
                    p.data.copy_(b.master[off: off + p.numel()].view(p.shape))

    @torch.no_grad()
    def step(self):
        """``prepare_grads`` + ``step_with_ready_grads``, as ``MegatronOptimizer.step``.

        Returns:
            ``(success, grad_norm, num_zeros_in_grad)``: ``(False, None, None)`` on a skipped step; ``grad_norm`` is
            the replica's norm before clipping (None when ``clip_grad`` is 0); ``num_zeros_in_grad`` when
            ``config.log_num_zeros_in_grad``, else None.
        """
        if self.prepare_grads():
            return False, None, None
        grad_norm = float(self._grad_norm) if self._grad_norm is not None else None
        num_zeros = self.count_zeros() if getattr(self.config, "log_num_zeros_in_grad", False) else None
        return self.step_with_ready_grads(), grad_norm, num_zeros

    def count_zeros(self) -> float:
        """Zeros in this replica's (clipped) gradients, summed over the model-parallel group."""
        total = torch.zeros(1, dtype=torch.float32, device=self.device)
        for g in self._grads_for_norm():
            total += g.numel() - torch.count_nonzero(g)
        if self._mp_size() > 1:
            dist.all_reduce(total, group=self.mp_group)
        return float(total.item())

    def check_replicas(self) -> None:
        """Raise ``RuntimeError`` when the data-parallel replicas' parameters differ (a bit-level checksum)."""
        params = self._model_params + [b.master for b in self._buckets if b.master is not None]
        sums = replica_checksum(params, self.dp_group)
        if len(set(sums)) > 1:
            raise RuntimeError(f"DistributedLionOptimizer: data-parallel replicas diverged at step {self._step}: "
                               f"parameter checksums per DP rank {sums}; something outside the optimizer modified "
                               "a replica")

    def get_momentum(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's fp32 momentum of a model parameter (a view of the bucket's momentum buffer)."""
        for b in self._buckets:
            for p, off, _ in b.params:
                if p is param:
                    return b.exp_avg[off: off + p.numel()].view(p.shape)
        raise KeyError(f"get_momentum: a parameter of shape {tuple(param.shape)} that this optimizer does not hold")

    def get_main_param(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 main parameter of a 16-bit model parameter (the parameter itself when it is fp32)."""
        return self._main_of.get(id(param), param)

    @property
    def step_count(self) -> int:
        """Applied steps so far (the ``t`` of the last applied step)."""
        return self._step

    # ------------------------------------------------------------------------------------------ megatron API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop ``.grad`` of the model parameters (DDP gradients live in its buffers: ``zero_grad_buffer``)."""
        for p in self._model_params:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    def get_loss_scale(self) -> torch.Tensor:
        """1.0 (no loss scaling: bf16/fp32 only)."""
        return torch.ones(1, dtype=torch.float32, device=self.device)

    def reload_model_params(self, state_dict=None) -> None:
        """Copy the model's parameters into the fp32 main parameters (after loading model weights only)."""
        for b in self._buckets:
            if b.master is not None:
                for p, off, _ in b.params:
                    b.master[off: off + p.numel()].copy_(p.detach().reshape(-1))

    def comm_stats(self) -> dict:
        """Cumulative statistics of this rank: the keys of ``DistributedLion.comm_stats`` plus
        ``dp_grad_bytes_sent`` (fp32/bf16 gradient bytes this optimizer or the DDP it patched handed to a DP
        collective: 0, the gradient all-reduce is gone) and ``early_buckets`` (buckets whose all_to_all started
        during the backward)."""
        n_params = sum(p.numel() for p in self._model_params)
        steps = self._steps_seen
        sent = self.exchange.bytes_sent
        return {
            "steps": steps, "params": n_params, "skipped_steps": self.skips.skipped, "world_size": self.dp_size,
            "aggregation": self.aggregation,
            "bits_per_param_step": 8.0 * sent / (n_params * steps) if n_params and steps else 0.0,
            "bytes_sent": sent, "bytes_received": self.exchange.bytes_received,
            "inter_node_bytes_sent": sent, "intra_node_bytes_sent": 0, "intra_node_size": 1,
            "num_nodes": self.dp_size, "dp_grad_bytes_sent": 0, "early_buckets": self._early_count,
        }

    # ------------------------------------------------------------------------------------------ state
    def _common(self) -> dict:
        return {"format": FORMAT, "step": self._step, "skipped_steps": self.skips.skipped,
                "data_parallel_size": self.dp_size, "aggregation": self.aggregation, "betas": self.betas}

    def _groups_state(self) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """This rank's state for ``torch.save`` (momentum per bucket, main parameters, hyper-parameters, step)."""
        return {"distlion": {**self._common(), "keyed_by": "bucket"}, "param_groups": self._groups_state(),
                "exp_avg": {str(i): b.exp_avg.clone() for i, b in enumerate(self._buckets)},
                "fp32_param": {str(i): b.master.clone() for i, b in enumerate(self._buckets) if b.master is not None}}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata: dict | None = None,
                           **kwargs):
        """The optimizer's part of a ``dist_checkpointing`` state dict (module docstring: checkpoints).

        Args:
            model_sharded_state_dict: the model chunks' sharded state dict (with ``keep_vars=True`` parameters, as
                megatron's ``sharded_state_dict()`` gives).
            is_loading: when loading and :func:`prepare_checkpoint_load` found another DP size, the momentum's DP
                axis has the saved size and this rank reads saved rank ``dp_rank % N_saved``.
            metadata: unused.
        Returns:
            A dict with ShardedTensors for every parameter's per-DP-rank momentum and the fp32 main parameters.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
        )

        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._model_params)
        momentum, masters, unused = {}, {}, {}
        i = 0
        for b in self._buckets:
            for p, off, _ in b.params:
                sh = id_map.get(i)
                if not isinstance(sh, ShardedTensor):
                    raise ValueError(f"sharded_state_dict: parameter {i} {tuple(p.shape)} has "
                                     f"{'no ShardedTensor' if sh is None else type(sh).__name__} in "
                                     "model_sharded_state_dict; pass model.sharded_state_dict() of the same chunks")
                m = b.exp_avg[off: off + p.numel()].view(p.shape)
                if is_loading and self.load_data_parallel_size is not None:
                    # Another DP size (policy rule 4): read saved rank dp_rank % n. dist_checkpointing checks that
                    # the reads cover every saved slice once as a main replica, so growing, the ranks reading the
                    # same slice are replicas (dp_rank // n), and shrinking, rank r also reads the slices of the
                    # dropped ranks r + dp, r + 2 dp, ... into scratch buffers that are not used.
                    n = self.load_data_parallel_size
                    momentum[str(i)] = self._per_dp_rank(sh, m, n, self.dp_rank % n, self.dp_rank // n)
                    for slot in range(self.dp_rank + self.dp_size, n, self.dp_size):
                        unused[f"{i}.{slot}"] = self._per_dp_rank(sh, torch.empty_like(m), n, slot, 0)
                else:
                    momentum[str(i)] = self._per_dp_rank(sh, m, self.dp_size, self.dp_rank, 0)
                if b.master is not None:
                    masters[str(i)] = make_sharded_optimizer_tensor(
                        sh, b.master[off: off + p.numel()].view(p.shape), prefix=MASTER_PREFIX)
                i += 1
        out = {"distlion": {**self._common(), "keyed_by": "param"}, "param_groups": self._groups_state(),
               "exp_avg": momentum}
        if masters:
            out["fp32_param"] = masters
        if unused:
            out["exp_avg_not_loaded"] = unused
        return out

    def _per_dp_rank(self, sh, data: torch.Tensor, n: int, slot: int, dp_replica: int):
        """The model parameter's ShardedTensor with a leading data-parallel axis of ``n`` slices, at ``slot``; saving,
        each DP rank owns its own slice (``slot`` = its rank, ``dp_replica`` 0)."""
        r = slot
        rid = sh.replica_id
        if not isinstance(rid, tuple) or not rid:
            raise ValueError(f"sharded_state_dict: {sh.key} has replica_id {rid!r}; expected megatron's tuple "
                             "(..., data-parallel rank)")
        return replace(
            sh, key=f"{MOMENTUM_PREFIX}.{sh.key}", data=data, dtype=data.dtype,
            global_shape=(n, *sh.global_shape), global_offset=(r, *sh.global_offset),
            axis_fragmentations=(n, *sh.axis_fragmentations) if sh.axis_fragmentations else None,
            prepend_axis_num=sh.prepend_axis_num + 1,
            # The last element of megatron's replica_id is the DP rank (the replica of the parameter); momentum is
            # not replicated across DP, so each DP rank is the main copy of its own slice.
            replica_id=(*rid[:-1], dp_replica), allow_shape_mismatch=False)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` (``torch.save`` per rank) or a ``dist_checkpointing.load`` of
        ``sharded_state_dict()``: momentum, main parameters, hyper-parameters and the step counter.

        Raises:
            ValueError: another format, another data-parallel size (policy), or another layout.
        """
        common = state_dict.get("distlion") if isinstance(state_dict, dict) else None
        if not isinstance(common, dict) or common.get("format") != FORMAT:
            raise ValueError(f"load_state_dict: not a DistributedLionOptimizer state (format "
                             f"{common.get('format') if isinstance(common, dict) else None!r}, expected {FORMAT!r})")
        # Another DP size: a dist_checkpointing load already read the source rank's slice (prepare_checkpoint_load);
        # a per-rank state_dict() is whichever file the caller chose (policy rule 4: rank r % N_saved's).
        policy.momentum_source_rank(int(common["data_parallel_size"]), self.dp_size, self.dp_rank)
        self.load_data_parallel_size = None
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(f"load_state_dict: {len(groups)} param groups saved, {len(self.optimizer.param_groups)} "
                             "here; build the optimizer with the same grouping")
        exp_avg = state_dict["exp_avg"]
        masters = state_dict.get("fp32_param", {})
        if common.get("keyed_by") == "bucket":
            sizes = [int(exp_avg[str(i)].numel()) if str(i) in exp_avg else None for i in range(len(self._buckets))]
            if len(exp_avg) != len(self._buckets) or sizes != [b.numel for b in self._buckets]:
                raise ValueError(f"load_state_dict: the saved momentum has buckets of {sizes} elements, this "
                                 f"optimizer {[b.numel for b in self._buckets]}; build the DDP with the same "
                                 "bucket_size and parameters")
            for i, b in enumerate(self._buckets):
                b.exp_avg.copy_(exp_avg[str(i)])
                if b.master is not None:
                    b.master.copy_(masters[str(i)])
        else:
            if len(exp_avg) != len(self._model_params):
                raise ValueError(f"load_state_dict: momentum for {len(exp_avg)} parameters saved, "
                                 f"{len(self._model_params)} here")
            i = 0
            for b in self._buckets:
                for p, off, _ in b.params:
                    b.exp_avg[off: off + p.numel()].copy_(exp_avg[str(i)].reshape(-1))
                    if b.master is not None:
                        b.master[off: off + p.numel()].copy_(masters[str(i)].reshape(-1))
                    i += 1
        for mine, saved in zip(self.optimizer.param_groups, groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v
        self._step = int(common["step"])
        self.skips.skipped = int(common["skipped_steps"])
        for b in self._buckets:  # the model's 16-bit parameters follow the loaded masters
            if b.master is not None:
                for p, off, _ in b.params:
                    p.data.copy_(b.master[off: off + p.numel()].view(p.shape))


def _grad_slice(p: torch.nn.Parameter) -> torch.Tensor:
    """The parameter's gradient slice in its DDP bucket's grad_data (megatron-core >= 0.19 may keep ``main_grad``
    elsewhere, in fp32, and the slice as ``main_grad_copy_in_grad_buffer``)."""
    inbuf = getattr(p, "main_grad_copy_in_grad_buffer", None)
    return inbuf if inbuf is not None else _require(p, "main_grad", "Parameter")


def _copy_extra(b: _Bucket) -> None:
    for main_grad, view in b.extra:  # as megatron-core's start_grad_sync does before its reduction
        view.copy_(main_grad)


def _finish_grad_sync_noop(force_all_reduce: bool | None = False) -> None:
    """D-Lion: no DP gradient reduction (the votes are exchanged by the optimizer)."""


def _ddp_group(model_chunks: list):
    groups = []
    for c in model_chunks:
        g = getattr(c, "intra_dp_cp_group", None)
        if g is None:
            g = getattr(c, "dp_cp_group", None)
        if g is None:
            raise RuntimeError("DistributedLionOptimizer: the DDP chunk has neither intra_dp_cp_group nor dp_cp_group "
                               "(megatron-core private attributes); pass data_parallel_group=")
        groups.append(g)
    if any(g is not groups[0] for g in groups):
        raise ValueError("model_chunks: the chunks reduce over different data-parallel groups; pass "
                         "data_parallel_group=")
    return groups[0]


def _validate(config: Any, model_chunks: list, aggregation: str, betas, check_replicas_every) -> None:
    from megatron.core.distributed import DistributedDataParallel

    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
    if not isinstance(model_chunks, (list, tuple)) or not model_chunks:
        raise ValueError(f"model_chunks={model_chunks!r}: a non-empty list of DDP-wrapped model chunks")
    for c in model_chunks:
        if not isinstance(c, DistributedDataParallel):
            raise ValueError(f"model_chunks: {type(c).__name__} is not megatron.core.distributed."
                             "DistributedDataParallel; wrap each chunk in it (ddp_config=ddp_config_for_dlion())")
        ddp = c.ddp_config
        if ddp.overlap_param_gather:
            raise ValueError("ddp_config.overlap_param_gather=True: D-Lion keeps whole parameters on every rank, "
                             "there is nothing to all-gather; set it False")
        if getattr(ddp, "num_distributed_optimizer_instances", 1) != 1:
            raise ValueError(f"ddp_config.num_distributed_optimizer_instances="
                             f"{ddp.num_distributed_optimizer_instances}: D-Lion votes over one DP group; set 1")
    if not (isinstance(config.lr, (int, float)) and not isinstance(config.lr, bool) and config.lr > 0):
        raise ValueError(f"config.lr={config.lr!r}: the Lion learning rate must be > 0")
    if not config.weight_decay >= 0:
        raise ValueError(f"config.weight_decay={config.weight_decay!r}: must be >= 0")
    if config.clip_grad is not None and not config.clip_grad >= 0:
        raise ValueError(f"config.clip_grad={config.clip_grad!r}: must be >= 0 (0 disables clipping)")
    if getattr(config, "fp16", False):
        raise ValueError("config.fp16=True: D-Lion would need the loss scaler to unscale before voting, which "
                         "DistributedLionOptimizer does not implement; use bf16=True")
    if getattr(config, "use_precision_aware_optimizer", False):
        raise ValueError("config.use_precision_aware_optimizer=True is not supported by DistributedLionOptimizer "
                         "(fp32 momentum and main parameters are its own); set it False")
    b = betas if betas is not None else (config.adam_beta1, config.adam_beta2)
    if len(b) != 2 or not all(isinstance(x, (int, float)) and 0.0 <= x < 1.0 for x in b):
        name = "betas" if betas is not None else "config.adam_beta1/adam_beta2"
        raise ValueError(f"{name}={tuple(b)!r}: Lion's (beta1, beta2), each in [0, 1)")
    if check_replicas_every is not None and (isinstance(check_replicas_every, bool)
                                             or not isinstance(check_replicas_every, int) or check_replicas_every < 0):
        raise ValueError(f"check_replicas_every={check_replicas_every!r}: an int >= 0 (0 disables)")


def get_optimizer(config: Any, model_chunks: list, *, aggregation: str = "mavo", config_overrides=None,
                  betas: tuple[float, float] | None = None, **kwargs: Any) -> DistributedLionOptimizer:
    """Build :class:`DistributedLionOptimizer` for DDP-wrapped model chunks (the shape of ``get_megatron_optimizer``).

    Installs the optimizer on the chunks' DDP bucket groups (their DP gradient all-reduce is replaced by the vote
    exchange; module docstring). One optimizer per model.

    Args:
        config: megatron-core ``OptimizerConfig`` (lr, weight_decay, adam_beta1/2 as Lion's betas, clip_grad).
        model_chunks: the megatron-core ``DistributedDataParallel`` chunks of this rank.
        aggregation: ``"mavo"`` or ``"avg"``.
        config_overrides: megatron-core's per-parameter group overrides (as ``get_megatron_optimizer``).
        betas: Lion's ``(beta1, beta2)`` instead of ``(config.adam_beta1, config.adam_beta2)``.
        kwargs: ``data_parallel_group``, ``model_parallel_group``, ``tp_group``, ``check_replicas_every``,
            ``raise_on_nonfinite`` (see :class:`DistributedLionOptimizer`).
    Returns:
        The optimizer.
    """
    _validate(config, model_chunks, aggregation, betas, kwargs.get("check_replicas_every"))
    groups = _megatron_param_groups(list(model_chunks), config, config_overrides)
    return DistributedLionOptimizer(config, list(model_chunks), groups, aggregation=aggregation, betas=betas,
                                    **kwargs)


def prepare_checkpoint_load(checkpoint_dir: str, optimizer: DistributedLionOptimizer) -> int | None:
    """Before building the loading ``sharded_state_dict``: read the checkpoint's D-Lion data-parallel size.

    Reads only the checkpoint's common state. When it differs from this run's, the optimizer's loading
    ``sharded_state_dict`` gives the momentum the saved DP axis and this rank reads saved rank ``dp_rank % N_saved``
    (policy rule 4, logged once).

    Returns:
        The saved data-parallel size, or None when the checkpoint holds no DistributedLionOptimizer state.
    """
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(checkpoint_dir)

    def find(obj):
        if isinstance(obj, dict):
            if obj.get("format") == FORMAT:
                return obj
            for v in obj.values():
                hit = find(v)
                if hit is not None:
                    return hit
        return None

    saved = find(common)
    if saved is None:
        optimizer.load_data_parallel_size = None
        return None
    n = int(saved["data_parallel_size"])
    policy.momentum_source_rank(n, optimizer.dp_size, optimizer.dp_rank, what=f"checkpoint {checkpoint_dir}")
    optimizer.load_data_parallel_size = n if n != optimizer.dp_size else None
    return n
