"""DistributedLion against the D-Lion reference (DESIGN 3.1-3.3), on gloo with 2 and 4 spawned ranks."""

import math

import pytest
import torch
import torch.distributed as dist
from _dist import spawn

from distlion_ds import DistributedLion
from distlion_ds.kernels import _dispatch
from distlion_ds.kernels.lion import aggregate_bits
from distlion_ds.optim.lion import dlion_update_ref

SHAPES = [(37, 5), (64,), (3, 4, 7), (1,), (1000,)]
NO_GRAD_ON_RANK0 = 2  # parameter index whose gradient is None on rank 0


def _grad(step, rank, i, shape):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.1] = 0.0  # exact zeros: the zero rule is exercised
    if i == 3:
        x.zero_()  # a parameter whose every vote is a tie
    return x


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _lion_pytorch_step(p, g, m, lr, betas, wd):
    """lion-pytorch's update_fn, written out: the plain Lion that D-Lion must equal at N=1 / equal votes."""
    p.mul_(1 - lr * wd)
    update = m.clone().mul_(betas[0]).add(g, alpha=1 - betas[0]).sign_()
    p.add_(update, alpha=-lr)
    m.mul_(betas[1]).add_(g, alpha=1 - betas[1])


def _check_against_reference(rank, world, aggregation, use_triton):
    _dispatch.INTERPRET = use_triton  # this rank's dispatch: interpreted Triton kernels or torch references
    lr, betas, wd = 0.01, (0.9, 0.99), 0.1
    params = _params()
    opt = DistributedLion(params, lr=lr, betas=betas, weight_decay=wd, aggregation=aggregation,
                          bucket_numel=512, check_replicas_every=1)
    ref_p = [p.detach().clone() for p in params]
    ref_m = [[torch.zeros(s) for _ in range(world)] for s in SHAPES]
    for step in range(1, 4):
        for i, p in enumerate(params):
            p.grad = None if (rank == 0 and i == NO_GRAD_ON_RANK0) else _grad(step, rank, i, SHAPES[i])
        opt.step()
        for i, s in enumerate(SHAPES):
            grads = [None if (r == 0 and i == NO_GRAD_ON_RANK0) else _grad(step, r, i, s) for r in range(world)]
            ref_p[i], ref_m[i] = dlion_update_ref(ref_p[i], grads, ref_m[i], lr, betas, wd, step, aggregation)
            torch.testing.assert_close(params[i].detach(), ref_p[i], atol=0, rtol=0)
            torch.testing.assert_close(opt.state[params[i]]["exp_avg"], ref_m[i][rank], atol=0, rtol=0)
    # Wire accounting, exact: per bucket, (N-1) chunks of shard+1 bytes up, (N-1)*b*shard bytes down.
    stats = opt.comm_stats()
    nbits = aggregate_bits(aggregation, world)
    per_step = sum((world - 1) * (b.numel // 8 // world) * (1 + nbits) + (world - 1) for b in opt._buckets)
    assert len(opt._buckets) > 1
    assert stats["bytes_sent"] == stats["bytes_received"] == 3 * per_step
    assert stats["steps"] == 3 and stats["skipped_steps"] == 0 and stats["world_size"] == world


def _check_skip_and_identical_grads(rank, world):
    lr, betas, wd = 0.02, (0.9, 0.99), 0.0
    for aggregation in ("mavo", "avg"):
        params = _params()
        opt = DistributedLion(params, lr=lr, betas=betas, aggregation=aggregation)
        lion_p = [p.detach().clone() for p in params]
        lion_m = [torch.zeros(s) for s in SHAPES]
        for step in range(1, 4):
            for i, p in enumerate(params):
                p.grad = torch.randn(SHAPES[i], generator=torch.Generator().manual_seed(step * 7 + i)) + 1e-3
            opt.step()
            for i in range(len(params)):
                _lion_pytorch_step(lion_p[i], params[i].grad, lion_m[i], lr, betas, wd)
                torch.testing.assert_close(params[i].detach(), lion_p[i], atol=0, rtol=0)
        # A NaN on one rank skips the step everywhere: p and m untouched, counted.
        before_p = [p.detach().clone() for p in params]
        before_m = [opt.state[p]["exp_avg"].clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape)
        if rank == world - 1:
            params[-1].grad[17] = float("nan")
        opt.step()
        for p, bp, bm in zip(params, before_p, before_m, strict=True):
            torch.testing.assert_close(p.detach(), bp, atol=0, rtol=0)
            torch.testing.assert_close(opt.state[p]["exp_avg"], bm, atol=0, rtol=0)
        assert opt.comm_stats()["skipped_steps"] == 1 and opt.param_groups[0]["step"] == 3
        opt.raise_on_nonfinite = True
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    # Bandwidth target on a >= 1M-parameter model: within 2 % of (1+b)(N-1)/(8N) bytes per parameter per step.
    for aggregation in ("mavo", "avg"):
        big = [torch.nn.Parameter(torch.zeros(1 << 20)), torch.nn.Parameter(torch.zeros(513, 77))]
        opt = DistributedLion(big, lr=1e-3, aggregation=aggregation)
        for p in big:
            p.grad = torch.randn(p.shape)
        opt.step()
        stats = opt.comm_stats()
        b = aggregate_bits(aggregation, world)
        target = (1 + b) * (world - 1) / (8 * world)
        per_param = stats["bytes_sent"] / stats["params"]
        assert abs(per_param / target - 1) < 0.02, (per_param, target)
        assert stats["control_bytes_sent"] == world - 1  # one flag byte per peer and bucket (one bucket here)
        assert math.isclose(stats["bits_per_param_step"],
                            8 * (stats["bytes_sent"] - stats["control_bytes_sent"]) / stats["params"])
    # Divergence is caught by the opt-in replica check.
    opt = DistributedLion([torch.nn.Parameter(torch.ones(10))], lr=1e-3)
    opt.param_groups[0]["params"][0].data[0] += rank
    with pytest.raises(RuntimeError, match="diverged"):
        opt.check_replicas()


def _check_subgroups(rank, world):
    # Two DP groups of 2 (as in a 3D run): each votes inside its own group only.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    params = _params()
    opt = DistributedLion(params, lr=0.01, process_group=mine, aggregation="avg", check_replicas_every=1)
    for step in range(1, 3):
        for i, p in enumerate(params):
            p.grad = _grad(step, rank, i, SHAPES[i])
        opt.step()
    for i, s in enumerate(SHAPES):
        want = _params()[i].detach()
        m = [torch.zeros(s), torch.zeros(s)]
        for step in range(1, 3):
            grads = [_grad(step, r, i, s) for r in (2 * (rank // 2), 2 * (rank // 2) + 1)]
            want, m = dlion_update_ref(want, grads, m, 0.01, (0.9, 0.99), 0.0, step, "avg")
        torch.testing.assert_close(params[i].detach(), want, atol=0, rtol=0)
    assert opt.comm_stats()["world_size"] == 2


def _worker_2(rank, world):
    for aggregation in ("mavo", "avg"):
        _check_against_reference(rank, world, aggregation, use_triton=True)
    _check_skip_and_identical_grads(rank, world)


def _worker_4(rank, world):
    for aggregation in ("mavo", "avg"):
        _check_against_reference(rank, world, aggregation, use_triton=False)
    _dispatch.INTERPRET = True
    _check_against_reference(rank, world, "mavo", use_triton=True)
    _check_skip_and_identical_grads(rank, world)
    _check_subgroups(rank, world)


@pytest.mark.slow
def test_two_ranks():
    spawn(_worker_2, 2)


@pytest.mark.slow
def test_four_ranks():
    spawn(_worker_4, 4)


def test_single_process_equals_lion_and_state_roundtrip():
    lr, betas, wd = 0.01, (0.9, 0.99), 0.05
    params = _params()
    opt = DistributedLion(params, lr=lr, betas=betas, weight_decay=wd)
    lion_p = [p.detach().clone() for p in params]
    lion_m = [torch.zeros(s) for s in SHAPES]

    def grads(step):
        return [torch.randn(s, generator=torch.Generator().manual_seed(step * 31 + i)) + 1e-3
                for i, s in enumerate(SHAPES)]

    for step in range(1, 4):
        for p, g in zip(params, grads(step), strict=True):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads(step)):
            _lion_pytorch_step(lion_p[i], g, lion_m[i], lr, betas, wd)
            torch.testing.assert_close(params[i].detach(), lion_p[i], atol=0, rtol=0)
    assert opt.comm_stats()["bytes_sent"] == 0

    # save -> load into a fresh optimizer -> continue == uninterrupted
    state = opt.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DistributedLion(params2, lr=lr, betas=betas, weight_decay=wd)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["step"] == 3
    for step in range(4, 6):
        for ps in (params, params2):
            for p, g in zip(ps, grads(step), strict=True):
                p.grad = g
        opt.step()
        opt2.step()
    for a, b in zip(params, params2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bf16_params_keep_fp32_momentum_and_scheduler_drives_lr():
    p = torch.nn.Parameter(torch.zeros(16, dtype=torch.bfloat16))
    opt = DistributedLion([p], lr=1.0, betas=(0.0, 0.5))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(16, dtype=torch.bfloat16) / 3
    opt.step()
    sched.step()
    assert p.detach().float().tolist() == [-1.0] * 16
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    opt.step()  # lr is now 0.5
    assert p.detach().float().tolist() == [-1.5] * 16
    sd = opt.state_dict()
    opt2 = DistributedLion([torch.nn.Parameter(p.detach().clone())], lr=1.0, betas=(0.0, 0.5))
    opt2.load_state_dict(sd)
    m2 = opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"]
    assert m2.dtype == torch.float32
    torch.testing.assert_close(m2, opt.state[p]["exp_avg"], atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(0.9,)), "betas"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(aggregation="median"), "aggregation"), (dict(check_replicas_every=-1), "check_replicas_every"),
    (dict(bucket_numel=0), "bucket_numel"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DistributedLion([torch.nn.Parameter(torch.zeros(2))], **kwargs)
