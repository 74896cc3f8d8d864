"""DistributedLion under the conditions users meet: frozen and late-added parameters, flat parameter buffers,
non-finite gradients in any bucket, and ranks that disagree (4 gloo ranks, one spawn, many assertions)."""

from __future__ import annotations

import pytest
import torch
from _dist import spawn

import distlion_ds.optim.distributed_lion as dl
from distlion_ds import DistributedLion
from distlion_ds.optim.lion import dlion_update_ref

LR, BETAS, WD = 0.01, (0.9, 0.99), 0.1


def _grad(step, rank, i, shape):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.1] = 0.0
    return x


def _check_frozen_and_added(rank, world):
    torch.manual_seed(0)
    shapes = [(6, 5), (16,), (3, 7)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[1].requires_grad_(False)  # frozen (LoRA-style base weight)
    frozen_before = params[1].detach().clone()
    opt = DistributedLion(params, lr=LR, betas=BETAS, weight_decay=WD, bucket_numel=64)
    ref = {i: (params[i].detach().clone(), [torch.zeros(shapes[i]) for _ in range(world)]) for i in (0, 2)}
    late = torch.nn.Parameter(torch.randn(9, generator=torch.Generator().manual_seed(5)))
    late_ref = (late.detach().clone(), [torch.zeros(9) for _ in range(world)])
    for step in range(1, 6):
        if step == 3:
            opt.add_param_group({"params": [late], "lr": 2 * LR})
        for i, p in enumerate(params):
            p.grad = None if not p.requires_grad else _grad(step, rank, i, shapes[i])
        late.grad = _grad(step, rank, 7, (9,))
        opt.step()
        for i in (0, 2):
            grads = [_grad(step, r, i, shapes[i]) for r in range(world)]
            ref[i] = dlion_update_ref(ref[i][0], grads, ref[i][1], LR, BETAS, WD, step, "mavo")
            torch.testing.assert_close(params[i].detach(), ref[i][0], atol=0, rtol=0)
        if step >= 3:  # the late group's own step counter starts at 1, the shared one continues: t = step
            grads = [_grad(step, r, 7, (9,)) for r in range(world)]
            late_ref = dlion_update_ref(late_ref[0], grads, late_ref[1], 2 * LR, BETAS, WD, step, "mavo")
            torch.testing.assert_close(late.detach(), late_ref[0], atol=0, rtol=0)
        assert torch.equal(params[1].detach(), frozen_before), "a frozen parameter moved"
        assert params[1] not in opt.state or "exp_avg" not in opt.state[params[1]]
    trainable = sum(shapes[i][0] * (shapes[i][1] if len(shapes[i]) > 1 else 1) for i in (0, 2)) + 9
    assert opt.comm_stats()["params"] == trainable
    # Unfreezing re-buckets (a collective agreement check runs again) and the parameter trains from then on.
    params[1].requires_grad_(True)
    for i, p in enumerate(params):
        p.grad = _grad(9, rank, i, shapes[i])
    late.grad = _grad(9, rank, 7, (9,))
    opt.step()
    assert not torch.equal(params[1].detach(), frozen_before)
    for i in (0, 2):  # momentum survived the re-bucketing
        grads = [_grad(9, r, i, shapes[i]) for r in range(world)]
        want, _ = dlion_update_ref(ref[i][0], grads, ref[i][1], LR, BETAS, WD, 6, "mavo")
        torch.testing.assert_close(params[i].detach(), want, atol=0, rtol=0)


def _check_flat_buffer_runs(rank, world, monkeypatch_calls):
    """Parameters that are views of one flat buffer (as megatron-core's DDP keeps them) are voted and applied as one
    tensor per run, with the same bits as separate parameters (which go to the same multi-tensor calls)."""
    sizes = [64, 40, 24, 13]  # the last is not a multiple of 8: it still joins the run as its tail
    for aggregation in ("mavo", "avg"):
        flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(1))
        flat_grad = torch.zeros(sum(sizes))
        views, separate, off = [], [], 0
        for n in sizes:
            v = torch.nn.Parameter(flat[off: off + n])
            v.grad = flat_grad[off: off + n]
            views.append(v)
            separate.append(torch.nn.Parameter(flat[off: off + n].clone()))
            off += n
        opt_v = DistributedLion(views, lr=LR, betas=BETAS, weight_decay=WD, aggregation=aggregation)
        opt_s = DistributedLion(separate, lr=LR, betas=BETAS, weight_decay=WD, aggregation=aggregation)
        assert [len(r.params) for r in opt_v._build_buckets()[0].runs] == [4]
        assert [len(r.params) for r in opt_s._build_buckets()[0].runs] == [1, 1, 1, 1]
        for step in range(1, 4):
            g = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(10 * step + rank))
            flat_grad.copy_(g)
            for p, v in zip(separate, views, strict=True):
                p.grad = v.grad.clone()
            monkeypatch_calls.clear()
            opt_v.step()
            assert monkeypatch_calls == [("votes", 1), ("apply", 1)], monkeypatch_calls  # the run as one tensor
            monkeypatch_calls.clear()
            opt_s.step()
            assert monkeypatch_calls == [("votes", 4), ("apply", 4)], monkeypatch_calls  # one multi-tensor call
            for a, b in zip(views, separate, strict=True):
                torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)
                torch.testing.assert_close(opt_v.state[a]["exp_avg"], opt_s.state[b]["exp_avg"], atol=0, rtol=0)


def _check_nonfinite_in_any_bucket(rank, world):
    params = [torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(i))) for i in range(4)]
    opt = DistributedLion(params, lr=LR, bucket_numel=40)  # one bucket per parameter
    for p in params:
        p.grad = torch.randn(40)
    opt.step()
    assert len(opt._buckets) == 4
    for bad_bucket in (0, 2, 3):  # the first bucket is exchanged long before the flag of a later one is known
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in params]
        for p in params:
            p.grad = torch.randn(40)
        if rank == 1:
            params[bad_bucket].grad[3] = float("inf")
        opt.step()
        for p, (bp, bm) in zip(params, before, strict=True):
            assert torch.equal(p.detach(), bp) and torch.equal(opt.state[p]["exp_avg"], bm)
    assert opt.comm_stats()["skipped_steps"] == 3


def _expect_mismatch(rank, world, make, names, ranks_text):
    opt = make(rank)
    for p in (q for g in opt.param_groups for q in g["params"]):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError) as info:
        opt.step()
    msg = str(info.value)
    for name in names:
        assert name in msg, msg
    assert ranks_text in msg, msg
    assert "disagree" in msg


def _check_disagreement(rank, world):
    def params(seed=0, order=(0, 1)):
        shapes = [(8, 4), (4, 8)]
        made = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(seed + i)))
                for i, s in enumerate(shapes)]
        return [made[i] for i in order]

    last = world - 1
    _expect_mismatch(rank, world, lambda r: DistributedLion(params(), lr=0.01 if r != last else 0.02),
                     ["lr (per param group)"], f"ranks [{last}] have [0.02]")
    _expect_mismatch(rank, world, lambda r: DistributedLion(params(), lr=0.01, bucket_numel=64 if r else 128),
                     ["bucket_numel"], "ranks [0] have 128")
    _expect_mismatch(rank, world, lambda r: DistributedLion(params(), aggregation="avg" if r == 2 else "mavo"),
                     ["aggregation"], "ranks [2] have 'avg'")
    _expect_mismatch(rank, world, lambda r: DistributedLion(params(seed=r == 1)),
                     ["parameter values"], "ranks [1] have checksum")
    _expect_mismatch(rank, world, lambda r: DistributedLion(params(order=(1, 0) if r == 3 else (0, 1))),
                     ["parameter shapes, dtypes and order"], "ranks [3] have [((4, 8)")
    # After a refusal the group is still usable, and agreeing ranks train.
    opt = DistributedLion(params())
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.comm_stats()["steps"] == 1
    # A learning rate changed on one rank later is caught by the periodic replica check.
    opt.check_replicas_every = 1
    opt.param_groups[0]["lr"] = 0.5 if rank == 0 else 1e-4
    with pytest.raises(RuntimeError, match=r"replicas diverged at step 2: lr \(per param group\)"):
        opt.step()


def _worker(rank, world):
    calls: list[str] = []
    real_votes, real_apply = dl.lion_votes_multi, dl.lion_apply_multi

    def votes(grads, *a, **k):  # the number of tensors (runs or parameters) in the call
        calls.append(("votes", len(grads)))
        return real_votes(grads, *a, **k)

    def apply(params, *a, **k):
        calls.append(("apply", len(params)))
        return real_apply(params, *a, **k)

    dl.lion_votes_multi, dl.lion_apply_multi = votes, apply
    _check_flat_buffer_runs(rank, world, calls)
    dl.lion_votes_multi, dl.lion_apply_multi = real_votes, real_apply
    _check_frozen_and_added(rank, world)
    _check_nonfinite_in_any_bucket(rank, world)
    _check_disagreement(rank, world)


@pytest.mark.slow
def test_reliability_four_ranks():
    spawn(_worker, 4)


def test_replica_check_is_on_by_default_and_bool_lr_refused():
    opt = DistributedLion([torch.nn.Parameter(torch.zeros(4))])
    assert opt.check_replicas_every == dl.DEFAULT_CHECK_REPLICAS_EVERY > 0
    with pytest.raises(ValueError, match="lr"):
        DistributedLion([torch.nn.Parameter(torch.zeros(4))], lr=True)
    with pytest.raises(ValueError, match="rounding_seed"):
        DistributedLion([torch.nn.Parameter(torch.zeros(4))], rounding_seed=-1)


def test_bf16_without_master_weights_does_not_stall_and_fp16_is_refused():
    # lr = 1/16 of the ulp of 1.0 in bf16 (2**-7): round-to-nearest never moves the weight, stochastic rounding moves
    # it by lr in expectation. A steady gradient of +1 makes every vote +1: the weight descends by lr a step.
    n, steps, lr = 4096, 8, 2.0 ** -11
    results = {}
    for seed in (None, 0):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = DistributedLion([p], lr=lr, betas=(0.9, 0.99), rounding_seed=seed)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt.step()
        results[seed] = p.detach().double()
    assert torch.equal(results[None], torch.ones(n, dtype=torch.float64))  # round-to-nearest: stalled
    moved = 1.0 - results[0].mean().item()
    expected = steps * lr
    # Unbiased rounding makes each step's rounding error a zero-mean martingale difference with variance at most
    # ulp**2 / 4 (ulp = 2**-8 on [0.5, 1)); so the mean over n weights has sd <= sqrt(steps / 4) * ulp / sqrt(n).
    sd = (steps / 4) ** 0.5 * 2.0 ** -8 / n ** 0.5
    assert abs(moved - expected) < 4 * sd, (moved, expected)
    # Replicas: the same seed gives the same bits.
    q = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = DistributedLion([q], lr=lr, rounding_seed=0)
    for _ in range(steps):
        q.grad = torch.ones(n, dtype=torch.bfloat16)
        opt.step()
    assert torch.equal(q.detach().double(), results[0])
    with pytest.raises(ValueError, match="float16 parameter"):
        h = torch.nn.Parameter(torch.ones(8, dtype=torch.float16))
        h.grad = torch.ones(8, dtype=torch.float16)
        DistributedLion([h]).step()


def test_checksum_sees_every_bit_and_ignores_layout():
    from distlion_ds.comm import local_checksum

    flat = torch.randn(103, generator=torch.Generator().manual_seed(3))
    for t in (flat, flat[13:40], flat[:7], torch.randn(5, dtype=torch.bfloat16)):
        base = local_checksum([t])
        assert torch.equal(base, local_checksum([t.clone()]))  # an odd offset in a flat buffer changes nothing
        raw = t.clone().view(torch.uint8)
        for byte in range(raw.numel()):
            for bit in (0, 7):
                flipped = raw.clone()
                flipped[byte] ^= 1 << bit
                assert not torch.equal(local_checksum([flipped.view(t.dtype)]), base), (t.numel(), byte, bit)
    a, b = torch.randn(6), torch.randn(6)
    assert not torch.equal(local_checksum([a, b]), local_checksum([b, a]))  # parameter order matters
