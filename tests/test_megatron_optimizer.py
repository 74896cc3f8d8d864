"""DistributedLionOptimizer on megatron-core's DDP, schedules and dist_checkpointing (issue 11 items 1, 2, 6).

CPU, gloo, spawn; each spawn checks many things. The oracle is :func:`distlion_ds.optim.lion.dlion_update_ref`, fed
with every DP rank's gradient (all-gathered by the test, outside the optimizer) and momenta carried by the test; the
clipping coefficient is recomputed by the test from the optimizer's reported replica norm, which is checked against
an fp64 norm the test computes itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist import spawn

VOCAB, HIDDEN, SEQ, MICRO, N_MB = 64, 16, 8, 2, 2


# --------------------------------------------------------------------------------------------- worker helpers
def _init(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from distlion_ds.megatron import enable_cpu

    enable_cpu()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _build(*, seed: int, ddp_kwargs: dict, dtype=torch.float32, tied: bool = True, hidden: int = HIDDEN):
    """A tiny GPTModel chunk (local spec) of this rank in megatron-core's DDP; identical on every DP rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from distlion_ds.megatron import ddp_config_for_dlion

    pp_rank = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)  # TP shards are slices of one master weight; DP replicas identical
    model_parallel_cuda_manual_seed(seed + 100 * pp_rank)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=hidden, num_attention_heads=2,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True, pipeline_dtype=dtype, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0, attention_dropout=0.0, batch_p2p_comm=False, init_method_std=0.02)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=tied)
    ddp = DistributedDataParallel(cfg, ddp_config_for_dlion(**ddp_kwargs), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    return cfg, ddp


def _opt_config(**kw):
    from megatron.core.optimizer import OptimizerConfig

    base = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, clip_grad=0.0,
                bf16=False)
    base.update(kw)
    return OptimizerConfig(**base)


def _batches(step: int, dp_rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 17 * dp_rank + 3)
    return [torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g) for _ in range(N_MB)]


def _forward_step(data_iterator, model):
    seq = next(data_iterator)
    tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    pos = torch.arange(SEQ).expand(MICRO, SEQ)
    out = model(tokens, pos, None, labels=labels)

    def loss_fn(o):
        loss = o.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_fn


def _backward(ddp, opt, step: int) -> None:
    """One iteration's forward/backward over N_MB micro-batches through megatron-core's schedule (finalize
    included): afterwards the DDP buffers hold this rank's gradients as the optimizer sees them."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=_forward_step,
                                data_iterator=iter(_batches(step, ps.get_data_parallel_rank())),
                                model=[ddp], num_microbatches=N_MB, seq_length=SEQ, micro_batch_size=MICRO,
                                forward_only=False)


def _decays(ddp) -> dict[int, bool]:
    """The test's own rule for megatron's default grouping: no weight decay on biases and 1-D parameters."""
    return {id(p): not (p.ndim == 1 or n.endswith(".bias")) for n, p in ddp.module.named_parameters()}


def _dp_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _replica_norm64(ddp) -> float:
    """fp64 replica norm computed by the test: megatron's rule of what counts (not shared, not a TP duplicate)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    sq = torch.zeros((), dtype=torch.float64)
    for p in ddp.module.parameters():
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            sq += p.main_grad.double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return math.sqrt(float(sq))


class _WireTap:
    """Wraps torch.distributed collectives and counts the bytes each hands to a given group, by dtype."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "all_gather_into_tensor",
             "all_to_all_single", "all_gather", "reduce_scatter", "broadcast")

    def __init__(self, group):
        import torch.distributed as dist

        self.dist = dist
        self.ranks = sorted(dist.get_process_group_ranks(group))
        self.bytes: dict[tuple[str, str], int] = {}
        self.saved = {}
        self.active = True  # the test's own oracle gathers are not counted

    def _hit(self, group) -> bool:
        g = group if group is not None else self.dist.group.WORLD
        return sorted(self.dist.get_process_group_ranks(g)) == self.ranks

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(self.dist, name, None)
            if orig is None:
                continue
            self.saved[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                if self.active and self._hit(kwargs.get("group")):
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    lists = [a for a in args if isinstance(a, list)]
                    t = tensors[-1] if tensors else lists[-1][0]
                    key = (_name, str(t.dtype))
                    self.bytes[key] = self.bytes.get(key, 0) + t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(self.dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(self.dist, name, orig)

    def float_bytes(self) -> int:
        return sum(v for (_, dt), v in self.bytes.items() if dt in ("torch.float32", "torch.bfloat16",
                                                                      "torch.float16", "torch.float64"))


def _checksums(tensors) -> list[int]:
    from megatron.core import parallel_state as ps

    from distlion_ds.comm import replica_checksum

    return replica_checksum(list(tensors), ps.get_data_parallel_group())


# --------------------------------------------------------------------------------------------- 3D: oracle bit for bit
def _worker_3d(rank: int, world: int, tp: int, pp: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from distlion_ds.megatron import get_optimizer
    from distlion_ds.optim.lion import dlion_update_ref

    _init(tp, pp)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    _, ddp = _build(seed=7, ddp_kwargs={})
    clip = 0.05  # below the replicas' norms here: clipping is active on every step
    opt = get_optimizer(_opt_config(clip_grad=clip), [ddp], aggregation="mavo")
    sched = OptimizerParamScheduler(opt, init_lr=1e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant")
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    decays = _decays(ddp)
    oracle_m = {id(p): [torch.zeros(p.shape, dtype=torch.float32) for _ in range(dp)] for p in params}
    steps = 3
    with _WireTap(ps.get_data_parallel_group()) as tap:
        for step in range(1, steps + 1):
            _backward(ddp, opt, step)
            before = {id(p): p.detach().clone() for p in params}
            grads = {id(p): p.main_grad.detach().clone() for p in params}
            lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
            wds = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
            tap.active = False
            norm64 = _replica_norm64(ddp)
            tap.active = True
            success, grad_norm, num_zeros = opt.step()
            tap.active = False
            assert success is True and num_zeros is None
            assert abs(grad_norm - norm64) <= 1e-5 * norm64, (grad_norm, norm64)
            assert norm64 > clip  # the coefficient below is < 1: clipping is exercised
            # The test's clipping from the reported norm (policy: fp32 max / (norm + 1e-6)).
            coef = torch.tensor(clip, dtype=torch.float32) / (torch.tensor(grad_norm, dtype=torch.float32) + 1e-6)
            coefs = _dp_all_gather(coef.reshape(1))
            flat = torch.cat([grads[id(p)].reshape(-1) for p in params])
            all_flat = _dp_all_gather(flat)
            off = 0
            for p in params:
                n = p.numel()
                g_all = [all_flat[r][off: off + n].view(p.shape) * coefs[r] for r in range(dp)]
                off += n
                assert lrs[id(p)] == sched.get_lr(next(g for g in opt.param_groups if any(q is p for q in
                                                                                              g["params"])))
                assert wds[id(p)] == (0.1 if decays[id(p)] else 0.0)
                new_p, new_ms = dlion_update_ref(before[id(p)], g_all, oracle_m[id(p)], lrs[id(p)], (0.9, 0.99),
                                                 wds[id(p)], step, "mavo")
                assert torch.equal(p.detach(), new_p), f"parameter {tuple(p.shape)} differs from the oracle"
                assert torch.equal(opt.get_momentum(p), new_ms[dp_rank]), "momentum differs from the oracle"
                oracle_m[id(p)] = new_ms
            sched.step(1)
            tap.active = True
    # Replicas bit-identical; momenta differ per DP rank (they are per rank, never communicated).
    sums = _checksums(params)
    assert len(set(sums)) == 1, sums
    msums = _checksums([opt.get_momentum(p) for p in params])
    assert len(set(msums)) == dp, msums
    # Tied word embeddings: stage 0's embedding and the last stage's output weight stay bit-identical.
    if ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage():
        w = ddp.module.shared_embedding_or_output_weight().detach().clone()
        group = ps.get_embedding_group()
        both = [torch.empty_like(w) for _ in range(dist.get_world_size(group))]
        dist.all_gather(both, w, group=group)
        assert all(torch.equal(both[0], x) for x in both[1:])
    # Wire: no floating-point payload ever reached the DP group; the votes did (uint8 all_to_all).
    assert tap.float_bytes() == 0, tap.bytes
    assert tap.bytes.get(("all_to_all_single", "torch.uint8"), 0) > 0, tap.bytes
    stats = opt.comm_stats()
    for key in ("steps", "params", "bytes_sent", "bytes_received", "skipped_steps", "world_size", "aggregation",
                "bits_per_param_step", "intra_node_size", "num_nodes", "inter_node_bytes_sent",
                "intra_node_bytes_sent", "dp_grad_bytes_sent"):
        assert key in stats, key
    assert stats["dp_grad_bytes_sent"] == 0 and stats["steps"] == steps and stats["skipped_steps"] == 0
    assert stats["bytes_sent"] > 0 and stats["world_size"] == dp
    # 1-bit MaVo: (1 + 1)(N-1)/N bits per parameter plus padding and one flag byte per chunk.
    assert 1.0 <= stats["bits_per_param_step"] <= 1.0 + 2.0 * 8 * 1024 / stats["params"], stats


def test_3d_tp2_pp2_dp2_equals_oracle():
    """tp x pp x dp = 2 x 2 x 2 through megatron-core's DDP, schedules and finalize_model_grads (tied embeddings,
    clipping active, OptimizerParamScheduler driving lr): every parameter and this rank's momentum equal the
    oracle bit for bit at every step; replicas identical, tied copies identical, zero float bytes on the DP group."""
    spawn(_worker_3d, 8, 2, 2)
