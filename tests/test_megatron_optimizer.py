"""DistributedLionOptimizer on megatron-core's DDP, schedules and dist_checkpointing (issue 11 items 1, 2, 6).

CPU, gloo, spawn; each spawn checks many things. The oracle is :func:`distlion_ds.optim.lion.dlion_update_ref`, fed
with every DP rank's gradient (all-gathered by the test, outside the optimizer) and momenta carried by the test; the
clipping coefficient is recomputed by the test from the optimizer's reported replica norm, which is checked against
an fp64 norm the test computes itself.
"""

from __future__ import annotations

import io
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
    if dtype == torch.bfloat16:  # as Megatron-LM's get_model: every parameter (norms too) in bf16
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
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

    def _wrap(self, name: str, orig):
        def wrapped(*args, **kwargs):
            if self.active and self._hit(kwargs.get("group")):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [a for a in args if isinstance(a, list)]
                t = tensors[-1] if tensors else lists[-1][0]
                key = (name, str(t.dtype))
                self.bytes[key] = self.bytes.get(key, 0) + t.numel() * t.element_size()
            return orig(*args, **kwargs)
        return wrapped

    def __enter__(self):
        # torch.distributed's functions, plus the reduce-scatter megatron-core's buffer captured at import time.
        import megatron.core.distributed.param_and_grad_buffer as pgb

        targets = [(self.dist, name) for name in self.NAMES if hasattr(self.dist, name)]
        targets.append((pgb, "dist_reduce_scatter_func"))
        for module, name in targets:
            orig = getattr(module, name)
            self.saved[(module, name)] = orig
            setattr(module, name, self._wrap(name, orig))
        return self

    def __exit__(self, *exc):
        for (module, name), orig in self.saved.items():
            setattr(module, name, orig)

    def float_bytes(self) -> int:
        return sum(v for (_, dt), v in self.bytes.items() if dt in ("torch.float32", "torch.bfloat16",
                                                                      "torch.float16", "torch.float64"))


def _checksums(tensors) -> list[int]:
    from megatron.core import parallel_state as ps

    from distlion_ds.comm import replica_checksum

    return replica_checksum(list(tensors), ps.get_data_parallel_group())


# --------------------------------------------------------------------------------------------- 3D: oracle bit for bit
def _case_3d(*, seed: int, clip: float, aggregation: str, ddp_kwargs: dict, steps: int = 3):
    """Train ``steps`` iterations and hold every step to the oracle; returns (ddp, optimizer)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from distlion_ds.megatron import get_optimizer
    from distlion_ds.optim.lion import dlion_update_ref

    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    _, ddp = _build(seed=seed, ddp_kwargs=ddp_kwargs)
    opt = get_optimizer(_opt_config(clip_grad=clip), [ddp], aggregation=aggregation)
    sched = OptimizerParamScheduler(opt, init_lr=1e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant")
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    decays = _decays(ddp)
    oracle_m = {id(p): [torch.zeros(p.shape, dtype=torch.float32) for _ in range(dp)] for p in params}
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
            if clip > 0:
                assert abs(grad_norm - norm64) <= 1e-5 * norm64, (grad_norm, norm64)
                assert norm64 > clip  # the coefficient below is < 1: clipping is exercised
                # The test's clipping from the reported norm (policy: fp32 max / (norm + 1e-6)).
                coef = torch.tensor(clip, dtype=torch.float32) / (torch.tensor(grad_norm, dtype=torch.float32)
                                                                  + 1e-6)
            else:
                assert grad_norm is None
                coef = torch.ones((), dtype=torch.float32)
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
                                                 wds[id(p)], step, aggregation)
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
    # (1 + b)(N-1)/N bits per parameter (b = 1 for both at N = 2) plus padding and one flag byte per chunk.
    assert 1.0 <= stats["bits_per_param_step"] <= 1.0 + 2.0 * 8 * 1024 / stats["params"], stats
    return ddp, opt


def _worker_3d(rank: int, world: int, tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    _init(tp, pp)
    # Serialized, clipping active on every step, MaVo.
    _case_3d(seed=7, clip=0.05, aggregation="mavo", ddp_kwargs={})
    # overlap_grad_reduce with small buckets, Avg: stage 0's buckets leave during the backward, except those
    # holding the tied or position embeddings (finalize_model_grads changes them afterwards) and the last one.
    ddp, opt = _case_3d(seed=8, clip=0.0, aggregation="avg", ddp_kwargs=dict(overlap_grad_reduce=True,
                                                                               bucket_size=200))
    buckets = [b for bg in ddp.bucket_groups for b in bg.buckets]
    pos = getattr(getattr(getattr(ddp.module, "embedding", None), "position_embeddings", None), "weight", None)
    late = [any(getattr(p, "shared_embedding", False) or getattr(p, "is_embedding_or_output_parameter", False)
                or p is pos for p in b.params_list) for b in buckets]
    expected = 2 * sum(not lt for lt in late[:-1])  # iterations 2 and 3 (the first has no golden counts)
    info = (len(buckets), late, opt.comm_stats()["early_buckets"])
    assert opt.comm_stats()["early_buckets"] == expected, info
    if ps.get_pipeline_model_parallel_rank() == 0:  # megatron buckets only the first stage
        assert len(buckets) >= 4 and any(late) and expected > 0, info


def test_3d_tp2_pp2_dp2_equals_oracle():
    """tp x pp x dp = 2 x 2 x 2 through megatron-core's DDP, schedules and finalize_model_grads (tied embeddings,
    clipping active, OptimizerParamScheduler driving lr): every parameter and this rank's momentum equal the
    oracle bit for bit at every step; replicas identical, tied copies identical, zero float bytes on the DP group."""
    spawn(_worker_3d, 8, 2, 2)


# --------------------------------------------------------------------------------------------- overlap, buckets, skip
def _worker_paths(rank: int, world: int) -> None:
    from megatron.core import parallel_state as ps

    import distlion_ds
    from distlion_ds.megatron import get_optimizer

    _init(1, 1)
    # A: overlap_grad_reduce with small buckets (early all_to_all); B: serialized; ref: the per-parameter
    # DistributedLion of the package on B's gradients. Same seed: identical initial weights.
    _, ddp_a = _build(seed=11, ddp_kwargs=dict(overlap_grad_reduce=True, bucket_size=300))
    _, ddp_b = _build(seed=11, ddp_kwargs={})
    opt_a = get_optimizer(_opt_config(), [ddp_a])
    opt_b = get_optimizer(_opt_config(), [ddp_b])
    pa = [p for p in ddp_a.module.parameters()]
    pb = [p for p in ddp_b.module.parameters()]
    assert len(ddp_a.bucket_groups) >= 4 and len(ddp_b.bucket_groups) == 1
    decays = _decays(ddp_b)
    clones = [p.detach().clone().requires_grad_(True) for p in pb]
    ref = distlion_ds.DistributedLion(
        [{"params": [c for c, p in zip(clones, pb, strict=True) if decays[id(p)]], "weight_decay": 0.1},
         {"params": [c for c, p in zip(clones, pb, strict=True) if not decays[id(p)]], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), aggregation="mavo", process_group=ps.get_data_parallel_group())
    import distlion_ds.megatron.optimizer as mod

    launches = {"votes": 0, "apply": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            launches[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    n_a = sum(len(bg.buckets) for bg in ddp_a.bucket_groups)
    originals = (mod.lion_votes, mod.lion_apply)
    with _WireTap(ps.get_data_parallel_group()) as tap:
        for step in range(1, 4):
            if step == 2:  # one vote launch and one apply launch per DDP bucket (every group has the same lr)
                mod.lion_votes, mod.lion_apply = counting("votes", mod.lion_votes), counting("apply", mod.lion_apply)
            _backward(ddp_a, opt_a, step)
            if step == 3:  # a second start (Megatron-LM's grad_sync_func after register_grad_ready) sends nothing
                sent = opt_a.comm_stats()["early_buckets"]
                ddp_a.start_grad_sync()
                assert opt_a.comm_stats()["early_buckets"] == sent
            _backward(ddp_b, opt_b, step)
            for c, p in zip(clones, pb, strict=True):
                c.grad = p.main_grad.detach().clone()
            assert opt_a.step()[0] is True and opt_b.step()[0] is True
            ref.step()
            if step == 2:
                mod.lion_votes, mod.lion_apply = originals
                assert launches == {"votes": n_a + 1, "apply": n_a + 1}, (launches, n_a)
            for x, y, c in zip(pa, pb, clones, strict=True):
                assert torch.equal(x.detach(), y.detach()), "overlapped path != serialized path"
                assert torch.equal(y.detach(), c.detach()), "bucket path != per-parameter DistributedLion"
                assert torch.equal(opt_a.get_momentum(x), opt_b.get_momentum(y))
                assert torch.equal(opt_b.get_momentum(y), ref.state[c]["exp_avg"])
    assert tap.float_bytes() == 0, tap.bytes
    # The first iteration has no golden bucket counts yet (megatron dispatches nothing early then); the next two
    # send every bucket but the last (the flag carrier) during the backward.
    n_buckets = sum(len(bg.buckets) for bg in ddp_a.bucket_groups)
    assert opt_a.comm_stats()["early_buckets"] == 2 * (n_buckets - 1), opt_a.comm_stats()
    assert opt_b.comm_stats()["early_buckets"] == 0

    def wire(ddp) -> int:  # DESIGN 3.2 per step: all_to_all (N-1)(shard + 1 flag byte) + all_gather (N-1) shard
        n = 2
        total = 0
        for bg in ddp.bucket_groups:
            for b in bg.buckets:
                shard = -(-b.grad_data.numel() // (8 * n)) * 8 * n // 8 // n
                total += (n - 1) * (shard + 1) + (n - 1) * shard
        return total

    assert opt_a.comm_stats()["bytes_sent"] == 3 * wire(ddp_a), (opt_a.comm_stats(), wire(ddp_a))
    assert opt_b.comm_stats()["bytes_sent"] == 3 * wire(ddp_b), (opt_b.comm_stats(), wire(ddp_b))

    # Without megatron's distributed-optimizer layout (no parameter buffer: one apply launch per fp32 parameter,
    # no padding) the bits are the same; num_zeros as megatron's log_num_zeros_in_grad.
    _, ddp_f = _build(seed=11, ddp_kwargs=dict(use_distributed_optimizer=False))
    assert all(b.param_data is None for bg in ddp_f.bucket_groups for b in bg.buckets)
    opt_f = get_optimizer(_opt_config(log_num_zeros_in_grad=True), [ddp_f])
    _, ddp_g = _build(seed=11, ddp_kwargs={})
    opt_g = get_optimizer(_opt_config(), [ddp_g])
    pf, pg_ = list(ddp_f.module.parameters()), list(ddp_g.module.parameters())
    # megatron-core 0.19's fp32 local accumulation (param_name_patterns_for_fp32_local_accumulation), as it lays it
    # out: main_grad a separate tensor, its slice of grad_data kept as main_grad_copy_in_grad_buffer.
    _, ddp_h = _build(seed=11, ddp_kwargs={})
    ph = list(ddp_h.module.parameters())
    ph[2].main_grad_copy_in_grad_buffer = ph[2].main_grad
    ph[2].main_grad = torch.zeros_like(ph[2].main_grad)
    opt_h = get_optimizer(_opt_config(), [ddp_h])
    for step in (1, 2):
        _backward(ddp_f, opt_f, step)
        _backward(ddp_g, opt_g, step)
        ddp_h.zero_grad_buffer()
        ph[2].main_grad.zero_()  # megatron 0.19 zeroes its extra main_grads with the buffers
        _backward(ddp_h, opt_h, step)
        assert opt_h.step()[0] is True
        zeros = sum(p.numel() - int(torch.count_nonzero(p.main_grad)) for p in pf)
        ok, _, num_zeros = opt_f.step()
        assert ok is True and num_zeros == float(zeros)
        assert opt_g.step()[0] is True
        assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(pf, pg_, strict=True))
        assert all(torch.equal(opt_f.get_momentum(x), opt_g.get_momentum(y)) for x, y in zip(pf, pg_, strict=True))
        assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(ph, pg_, strict=True))

    # Clipping needs every bucket's gradient before any vote: with clip_grad > 0 nothing leaves during the backward
    # (the result is the serialized one).
    _, ddp_d = _build(seed=11, ddp_kwargs=dict(overlap_grad_reduce=True, bucket_size=300))
    opt_d = get_optimizer(_opt_config(clip_grad=0.01), [ddp_d])
    for step in (1, 2):
        _backward(ddp_d, opt_d, step)
        assert opt_d.step()[0] is True
    assert opt_d.comm_stats()["early_buckets"] == 0

    # Non-finite gradient on one rank: every rank skips, nothing moves, the skip is counted; then training goes on.
    _backward(ddp_b, opt_b, 4)
    if rank == 1:
        pb[3].main_grad.view(-1)[0] = float("nan")
    snap = [p.detach().clone() for p in pb]
    msnap = [opt_b.get_momentum(p).clone() for p in pb]
    assert opt_b.step() == (False, None, None)
    assert all(torch.equal(p.detach(), s) for p, s in zip(pb, snap, strict=True))
    assert all(torch.equal(opt_b.get_momentum(p), s) for p, s in zip(pb, msnap, strict=True))
    assert opt_b.comm_stats()["skipped_steps"] == 1 and opt_b.step_count == 3
    _backward(ddp_b, opt_b, 5)
    assert opt_b.step()[0] is True and opt_b.step_count == 4
    assert len(set(_checksums(pb))) == 1
    # A backward whose buckets left early but that no step consumed: zero_grad_buffer drops those exchanges, and
    # A (which has not seen B's skipped step) lands on B's bits with the same data and step number.
    _backward(ddp_a, opt_a, 99)
    _backward(ddp_a, opt_a, 5)
    assert opt_a.step()[0] is True and opt_a.step_count == 4
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(pa, pb, strict=True))
    assert all(torch.equal(opt_a.get_momentum(x), opt_b.get_momentum(y)) for x, y in zip(pa, pb, strict=True))

    # state_dict (per rank, torch.save) -> a fresh model with B's weights -> load -> the same next step as B.
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    _, ddp_e = _build(seed=99, ddp_kwargs={})
    opt_e = get_optimizer(_opt_config(), [ddp_e])
    pe = list(ddp_e.module.parameters())
    for x, y in zip(pe, pb, strict=True):
        x.data.copy_(y.detach())
    buf.seek(0)
    opt_e.load_state_dict(torch.load(buf, weights_only=False))
    assert opt_e.step_count == 4 and opt_e.comm_stats()["skipped_steps"] == 1
    _backward(ddp_b, opt_b, 6)
    _backward(ddp_e, opt_e, 6)
    assert opt_b.step()[0] is True and opt_e.step()[0] is True
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(pe, pb, strict=True))
    assert all(torch.equal(opt_e.get_momentum(x), opt_b.get_momentum(y)) for x, y in zip(pe, pb, strict=True))

    # The wire tap does see the DP gradient reduce-scatter when megatron-core's own grad sync runs (no D-Lion on C).
    _, ddp_c = _build(seed=11, ddp_kwargs={})

    class _NoOpt:
        def zero_grad(self):
            pass

    with _WireTap(ps.get_data_parallel_group()) as tap_c:
        _backward(ddp_c, _NoOpt(), 1)
    assert tap_c.bytes.get(("dist_reduce_scatter_func", "torch.float32"), 0) >= \
        4 * sum(p.numel() for p in ddp_c.module.parameters()), tap_c.bytes

    # Bad arguments are refused naming the argument.
    def refused(match, fn):
        with pytest.raises((ValueError, RuntimeError), match=match):
            fn()

    refused("aggregation='sum'", lambda: get_optimizer(_opt_config(), [ddp_c], aggregation="sum"))
    refused("is not megatron.core.distributed.DistributedDataParallel",
            lambda: get_optimizer(_opt_config(), [ddp_c.module]))
    refused("model_chunks=", lambda: get_optimizer(_opt_config(), []))
    refused(r"config.lr=0", lambda: get_optimizer(_opt_config(lr=0.0), [ddp_c]))
    refused(r"config.clip_grad=-1", lambda: get_optimizer(_opt_config(clip_grad=-1.0), [ddp_c]))
    refused(r"config.weight_decay=-0.1", lambda: get_optimizer(_opt_config(weight_decay=-0.1), [ddp_c]))
    refused(r"config.adam_beta1/adam_beta2=\(1.5", lambda: get_optimizer(_opt_config(adam_beta1=1.5), [ddp_c]))
    refused(r"betas=\(0.9, 1.0\)", lambda: get_optimizer(_opt_config(), [ddp_c], betas=(0.9, 1.0)))
    refused("config.fp16=True", lambda: get_optimizer(_opt_config(fp16=True), [ddp_c]))
    refused("check_replicas_every=-1", lambda: get_optimizer(_opt_config(), [ddp_c], check_replicas_every=-1))
    refused("already feed another DistributedLionOptimizer", lambda: get_optimizer(_opt_config(), [ddp_b]))
    refused("without a successful prepare_grads", opt_b.step_with_ready_grads)
    _, ddp_pg = _build(seed=11, ddp_kwargs=dict(use_distributed_optimizer=True, overlap_param_gather=True))
    refused("ddp_config.overlap_param_gather=True", lambda: get_optimizer(_opt_config(), [ddp_pg]))
    # Without megatron's distributed-optimizer padding, hidden 12 puts a parameter at an offset not divisible by 8.
    _, ddp_odd = _build(seed=11, ddp_kwargs=dict(use_distributed_optimizer=False), hidden=12)
    refused(r"starts at element \d+ of its DDP bucket, not a multiple of 8.*use_distributed_optimizer=True",
            lambda: get_optimizer(_opt_config(), [ddp_odd]))

    # Replica check: a replica changed outside the optimizer is caught on every rank.
    opt_b.check_replicas()
    if rank == 1:
        pb[0].data.view(-1)[0] += 1e-3
    with pytest.raises(RuntimeError, match="replicas diverged at step 5"):
        opt_b.check_replicas()


def test_overlap_equals_serialized_equals_per_parameter_and_skip_and_bad_args():
    """dp=2: overlap_grad_reduce with 8 buckets (all_to_all started in the backward) == serialized == the package's
    DistributedLion on the same gradients, bit for bit (params and momentum); zero float bytes on the DP group
    (and the wire tap does see megatron's own all-reduce); one rank's NaN skips the step everywhere; bad arguments
    are refused naming the argument."""
    spawn(_worker_paths, 2)


# --------------------------------------------------------------------------------------------- checkpoints, bf16
def _worker_ckpt(rank: int, world: int, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from distlion_ds.megatron import get_optimizer, prepare_checkpoint_load

    _init(1, 1)
    bf16 = torch.bfloat16
    lr = 1e-5  # below half a bf16 ulp of every weight with |w| >= 2**-8: bf16 alone would stall
    conf = dict(lr=lr, min_lr=lr, weight_decay=0.0, bf16=True)
    _, ddp = _build(seed=5, ddp_kwargs=dict(grad_reduce_in_fp32=True), dtype=bf16)
    opt = get_optimizer(_opt_config(**conf), [ddp])
    params = list(ddp.module.parameters())
    assert all(p.dtype == bf16 for p in params)
    w0 = [p.detach().clone() for p in params]
    for step in (1, 2):
        _backward(ddp, opt, step)
        assert opt.step()[0] is True
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)
    saved_m = [opt.get_momentum(p).clone() for p in params]
    assert len(set(_checksums(saved_m))) == 2, "the two DP ranks' momenta should differ"
    for step in (3, 4):
        _backward(ddp, opt, step)
        assert opt.step()[0] is True
    final = [p.detach().clone() for p in params]
    final_main = [opt.get_main_param(p).detach().clone() for p in params]
    final_m = [opt.get_momentum(p).clone() for p in params]

    # Fresh model (another seed) and optimizer, loaded from the checkpoint, continued: bit-identical.
    _, ddp2 = _build(seed=77, ddp_kwargs=dict(grad_reduce_in_fp32=True), dtype=bf16)
    opt2 = get_optimizer(_opt_config(**conf), [ddp2])
    params2 = list(ddp2.module.parameters())
    assert not all(torch.equal(a.detach(), b) for a, b in zip(params2, w0, strict=True))
    assert prepare_checkpoint_load(ckpt_dir, opt2) == 2 and opt2.load_data_parallel_size is None  # same size
    model_sd2 = ddp2.module.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd2, "optimizer": opt2.sharded_state_dict(model_sd2, is_loading=True)}, ckpt_dir)
    ddp2.module.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.step_count == 2
    assert all(torch.equal(opt2.get_momentum(p), m) for p, m in zip(params2, saved_m, strict=True)), \
        "this DP rank's own momentum is restored"
    for step in (3, 4):
        _backward(ddp2, opt2, step)
        assert opt2.step()[0] is True
    assert opt2.step_count == 4
    for p, f, fm, m in zip(params2, final, final_main, final_m, strict=True):
        assert torch.equal(p.detach(), f) and torch.equal(opt2.get_main_param(p), fm)
        assert torch.equal(opt2.get_momentum(p), m)

    # bf16 without a stall: lr is below half an ulp of the larger weights (one rounded bf16 update returns the
    # old weight), yet through the fp32 main parameters they move; the model weights are the rounded masters.
    for step in range(5, 11):
        _backward(ddp2, opt2, step)
        assert opt2.step()[0] is True
    moved_big = 0
    for p, w in zip(params2, w0, strict=True):
        main = opt2.get_main_param(p)
        assert main.dtype == torch.float32 and torch.equal(p.detach(), main.to(bf16))
        big = w.float().abs() >= 2.0 ** -7
        assert torch.equal((w.float() + lr).to(bf16)[big], w[big]) and torch.equal((w.float() - lr).to(bf16)[big],
                                                                                     w[big])
        moved_big += int((p.detach() != w)[big].sum())
    assert moved_big > 0, "no bf16 weight above 2**-7 moved: the update stalled"

    # Another DP size (policy rule 4, as the DeepSpeed seam): rank r of the new run loads the momentum saved by DP
    # rank r % N_saved. Here DP 2 -> 1 (tp 1 -> 2): both ranks are DP rank 0 and read saved DP rank 0's momentum,
    # resharded by dist_checkpointing to their tensor-parallel slice; the step counter is kept.
    import torch.distributed as dist

    rank0_m = [saved_m]
    dist.broadcast_object_list(rank0_m, src=0)
    ps.destroy_model_parallel()
    _init(2, 1)
    assert ps.get_data_parallel_world_size() == 1
    _, ddp3 = _build(seed=5, ddp_kwargs=dict(grad_reduce_in_fp32=True), dtype=bf16)
    opt3 = get_optimizer(_opt_config(**conf), [ddp3])
    assert prepare_checkpoint_load(ckpt_dir, opt3) == 2 and opt3.load_data_parallel_size == 2
    model_sd3 = ddp3.module.sharded_state_dict()
    loaded3 = dist_checkpointing.load(
        {"model": model_sd3, "optimizer": opt3.sharded_state_dict(model_sd3, is_loading=True)}, ckpt_dir)
    ddp3.module.load_state_dict(loaded3["model"])
    opt3.load_state_dict(loaded3["optimizer"])
    assert opt3.step_count == 2 and opt3.load_data_parallel_size is None
    tp_rank = ps.get_tensor_model_parallel_rank()
    for p, full in zip(ddp3.module.parameters(), rank0_m[0], strict=True):
        want = full.chunk(2, dim=p.partition_dim)[tp_rank] if getattr(p, "tensor_model_parallel", False) else full
        assert torch.equal(opt3.get_momentum(p), want), "DP rank 0's saved momentum, on this TP slice"


def test_dist_checkpointing_resume_bit_exact_bf16_and_dp_size_policy(tmp_path):
    """dp=2, bf16 model with fp32 main parameters: torch_dist save after 2 steps, 2 more steps; a fresh model (other
    seed) + optimizer loaded from the checkpoint and continued 2 steps equals them bit for bit (weights, masters,
    each DP rank's own momentum, step counter); lr below half a bf16 ulp still moves weights; a run with another
    DP size loads saved rank r % N_saved (the step policy)."""
    (tmp_path / "ckpt").mkdir()
    spawn(_worker_ckpt, 2, str(tmp_path / "ckpt"))


# --------------------------------------------------------------------------------------------- policy (no spawn)
def test_policy_norm_clip_flags_and_rules(caplog):
    """The step policy of distlion_ds.optim.policy, each rule against an independent computation."""
    from distlion_ds.optim import policy

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(37, generator=g), torch.randn(4, 5, generator=g) * 3, torch.randn(9, generator=g).bfloat16()]
    exact = math.sqrt(sum(float(x.double().pow(2).sum()) for x in grads))
    sq = policy.replica_sq_norm(grads, torch.device("cpu"))
    assert sq.dtype == torch.float32 and sq.dim() == 0
    assert abs(math.sqrt(float(sq)) - exact) <= 1e-6 * exact
    calls = []

    def mp_sum(t):  # stands for the model-parallel all-reduce: another rank holding 5.0 of squared norm
        calls.append(t.clone())
        t.add_(5.0)

    norm = policy.replica_grad_norm(grads, torch.device("cpu"), mp_sum)
    assert len(calls) == 1 and torch.equal(calls[0], sq)
    assert torch.equal(norm, (sq + 5.0).sqrt())
    assert torch.equal(policy.replica_grad_norm(grads, torch.device("cpu")), sq.sqrt())

    # Clip coefficient: exactly 1 at or below the limit and for non-finite norms; max / (norm + 1e-6) in fp32 above.
    one = torch.ones((), dtype=torch.float32)
    for n in (0.0, 0.5, 1.0, float("inf"), float("nan")):
        assert torch.equal(policy.clip_coefficient(torch.tensor(n), 1.0), one), n
    above = torch.tensor(4.0)
    assert torch.equal(policy.clip_coefficient(above, 1.0),
                       torch.tensor(1.0, dtype=torch.float32) / (above + torch.tensor(1e-6, dtype=torch.float32)))
    with pytest.raises(ValueError, match="max_norm=0"):
        policy.clip_coefficient(above, 0.0)
    # A coefficient of 1 leaves every bit (bf16 and fp32, NaN payloads aside) unchanged; 0.5 halves exactly.
    before = [x.clone() for x in grads]
    policy.clip_grads_(grads, one)
    assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True))
    policy.clip_grads_(grads, torch.tensor(0.5))
    assert all(torch.equal(a, (b.float() * 0.5).to(b.dtype)) for a, b in zip(grads, before, strict=True))

    # Non-finite flag: from the norm, from a local flag, or both.
    flag = policy.nonfinite_flag(torch.tensor(float("nan")), None)
    assert flag.dtype == torch.int32 and flag.tolist() == [1]
    assert policy.nonfinite_flag(torch.tensor(2.0), torch.zeros(1, dtype=torch.int32)).tolist() == [0]
    assert policy.nonfinite_flag(torch.tensor(2.0), torch.ones(1, dtype=torch.int32)).tolist() == [1]
    assert policy.nonfinite_flag(None, torch.tensor([3], dtype=torch.int32)).tolist() == [1]
    with pytest.raises(ValueError, match="norm or a local flag"):
        policy.nonfinite_flag(None, None)

    # Replica-check cadence and skip counting.
    assert [t for t in range(1, 301) if policy.replica_check_due(t, 100)] == [100, 200, 300]
    assert not any(policy.replica_check_due(t, 0) for t in range(1, 10))
    counter = policy.SkipCounter("Owner")
    with caplog.at_level("WARNING"):
        counter.record(7)
        counter.record(9)
    assert counter.skipped == 2 and "at step 9" in caplog.text and "(2 skipped so far)" in caplog.text
    with pytest.raises(FloatingPointError, match="Owner: a non-finite gradient .* at step 3"):
        policy.SkipCounter("Owner", raise_on_nonfinite=True).record(3)

    # Momentum checkpoint rule: rank r loads saved rank r % N_saved (growing and shrinking).
    assert [policy.momentum_source_rank(2, 4, r) for r in range(4)] == [0, 1, 0, 1]
    assert [policy.momentum_source_rank(4, 2, r) for r in range(2)] == [0, 1]
    assert [policy.momentum_source_rank(3, 3, r) for r in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="rank=2"):
        policy.momentum_source_rank(2, 2, 2)


def test_get_optimizer_refuses_before_any_process_group():
    """Arguments that need no model are checked first, naming the argument (no process group is touched)."""
    from distlion_ds.megatron import get_optimizer

    with pytest.raises(ValueError, match="aggregation='majority'"):
        get_optimizer(_opt_config(), [object()], aggregation="majority")
    with pytest.raises(ValueError, match="model_chunks=None"):
        get_optimizer(_opt_config(), None)
    with pytest.raises(ValueError, match="is not megatron.core.distributed.DistributedDataParallel"):
        get_optimizer(_opt_config(), [torch.nn.Linear(2, 2)])
