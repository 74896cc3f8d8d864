"""DiLoCo (distlion_ds.optim.diloco) against an oracle written here: N replicas simulated in one process, the paper's
outer step (mean pseudo-gradient, Nesterov momentum SGD) written out, and an independent blockwise absmax quantiser.

One 4-rank gloo spawn holds the distributed checks (fp32 and int8 exact to the oracle, int4 error bound, replicas,
bytes, skip on a non-finite pseudo-gradient, resume mid-round); single-process tests cover N=1 and bad arguments.
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from _dist import spawn

from distlion_ds.kernels import _dispatch
from distlion_ds.optim.diloco import DiLoCo

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]
H = 3
ZERO_PARAM = 3  # starts at exactly 0 and never gets a gradient: its pseudo-gradient is exactly 0


def _params():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    with torch.no_grad():
        ps[ZERO_PARAM].zero_()
    return ps


def _grads(step, rank, values, nan_at=None):
    """This rank's gradients at inner step ``step`` (1-based), from the current parameter values (a noisy
    quadratic pull towards 0, different per rank, as data parallelism has)."""
    out = []
    for i, v in enumerate(values):
        if i == ZERO_PARAM:
            out.append(None)
            continue
        gen = torch.Generator().manual_seed(1000 * step + 10 * rank + i)
        g = 0.5 * v.detach() + torch.randn(v.shape, generator=gen)
        if nan_at == (step, rank) and i == 0:
            g.view(-1)[3] = float("nan")
        out.append(g)
    return out


def _inner(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, foreach=False)
    return torch.optim.AdamW(params, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def _absmax_roundtrip(x, bits, block):
    """Independent oracle of the wire codec: per block absmax / qmax, round half up, clamp, times the scale."""
    qmax = 2 ** (bits - 1) - 1
    xb = x.view(-1, block)
    scale = xb.abs().amax(dim=1, keepdim=True) / torch.full((xb.shape[0], 1), float(qmax))
    q = torch.where(scale > 0, torch.floor(xb / torch.where(scale > 0, scale, 1.0) + 0.5), 0.0).clamp(-qmax, qmax)
    return (q * scale).view(-1), scale.view(-1)


class Oracle:
    """N replicas in one process: inner optimizers on clones, the outer step written from the paper."""

    def __init__(self, world, inner_kind, lr, momentum, nesterov, bits=32, block=256):
        self.world, self.lr, self.mu, self.nesterov, self.bits, self.block = world, lr, momentum, nesterov, bits, block
        base = _params()
        self.replicas = [[p.detach().clone().requires_grad_(True) for p in base] for _ in range(world)]
        self.inners = [_inner(inner_kind, reps) for reps in self.replicas]
        self.anchor = torch.cat([p.detach().reshape(-1) for p in base])
        n = self.anchor.numel()
        unit = world * (block if bits < 32 else 1)
        self.padded = -(-n // unit) * unit
        self.buf = None
        self.t = 0
        self.skipped = 0
        self.last_exact_mean = None
        self.last_scales = None

    def inner_step(self, nan_at=None):
        self.t += 1
        for r in range(self.world):
            for p, g in zip(self.replicas[r], _grads(self.t, r, self.replicas[r], nan_at), strict=True):
                p.grad = g
            self.inners[r].step()
        if self.t % H == 0:
            self.outer()

    def _flat(self, r):
        return torch.cat([p.detach().reshape(-1) for p in self.replicas[r]])

    def outer(self):
        n = self.anchor.numel()
        deltas = [torch.nn.functional.pad(self.anchor - self._flat(r), (0, self.padded - n)) for r in range(self.world)]
        if not all(bool(torch.isfinite(d).all()) for d in deltas):
            self.skipped += 1
        else:
            if self.bits < 32:
                sent = [_absmax_roundtrip(d, self.bits, self.block)[0] for d in deltas]
            else:
                sent = deltas
            total = sent[0].clone()
            for d in sent[1:]:
                total += d
            mean = total / self.world
            exact = deltas[0].clone()
            for d in deltas[1:]:
                exact += d
            self.last_exact_mean = (exact / self.world)[:n]
            if self.bits < 32:
                mean, self.last_scales = _absmax_roundtrip(mean, self.bits, self.block)
                self.last_sent_scales = [_absmax_roundtrip(d, self.bits, self.block)[1] for d in deltas]
            mean = mean[:n]
            if self.mu:
                self.buf = mean.clone() if self.buf is None else self.buf.mul(self.mu).add(mean)
                step = mean.add(self.buf, alpha=self.mu) if self.nesterov else self.buf
            else:
                step = mean
            self.anchor = self.anchor.add(step, alpha=-self.lr)
        for r in range(self.world):
            off = 0
            for p in self.replicas[r]:
                with torch.no_grad():
                    p.copy_(self.anchor[off: off + p.numel()].view(p.shape))
                off += p.numel()

    def params(self, r):
        return [p.detach() for p in self.replicas[r]]


def _run(rank, world, params, opt, start, stop, nan_at=None):
    for t in range(start + 1, stop + 1):
        for p, g in zip(params, _grads(t, rank, params, nan_at), strict=True):
            p.grad = g
        opt.step()


def _flat_all_ranks(params, world):
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    out = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    return out


def _expected_bytes_per_round(numel, world, bits, block):
    """Reduce-scatter of N chunks (+1 flag byte each) and all-gather of the reduced shard, (N-1) of each sent."""
    unit = world * (block if bits < 32 else 1)
    shard = -(-numel // unit) * unit // world
    chunk = shard * 4 if bits == 32 else shard * bits // 8 + shard // block * 4
    return (world - 1) * (chunk + 1) + (world - 1) * chunk


def _distributed_checks(rank, world):
    _dispatch.INTERPRET = False  # torch references of the codec (the kernels are held to them in test_quantize.py)
    numel = sum(math.prod(s) for s in SHAPES)

    # 1. fp32, SGD inner, Nesterov: exact to the oracle after every inner step (10 steps: 3 rounds and one more).
    for inner_kind in ("sgd", "adamw"):
        params = _params()
        opt = DiLoCo(params, _inner(inner_kind, params), local_steps=H, lr=0.7, momentum=0.9)
        oracle = Oracle(world, inner_kind, 0.7, 0.9, True)
        for t in range(1, 11):
            _run(rank, world, params, opt, t - 1, t)
            oracle.inner_step()
            for p, q in zip(params, oracle.params(rank), strict=True):
                torch.testing.assert_close(p.detach(), q, atol=0, rtol=0, msg=f"{inner_kind} step {t}")
            stats = opt.comm_stats()
            # No bytes between outer steps; exactly the formula at each.
            assert stats["bytes_sent"] == (t // H) * _expected_bytes_per_round(numel, world, 32, 256), (t, stats)
            flats = _flat_all_ranks(params, world)
            same = all(torch.equal(flats[0], f) for f in flats)
            assert same == (t % H == 0), f"step {t}: replicas identical exactly after outer steps"
        assert stats["bytes_received"] == stats["bytes_sent"]
        assert stats["steps"] == 10 and stats["rounds"] == 3 and stats["skipped_steps"] == 0
        assert stats["params"] == numel and stats["world_size"] == world
        assert params[ZERO_PARAM].item() == 0.0  # a pseudo-gradient of exact zeros moves nothing
        assert stats["bits_per_param_step"] == 8 * stats["bytes_sent"] / (numel * 10)

    # 2. int8 on the wire, AdamW inner: exact to the oracle's independent quantiser (round half up, absmax scales).
    params = _params()
    opt = DiLoCo(params, _inner("adamw", params), local_steps=H, quantization="int8", quant_block_size=8)
    oracle = Oracle(world, "adamw", 0.7, 0.9, True, bits=8, block=8)
    for t in range(1, 7):
        _run(rank, world, params, opt, t - 1, t)
        oracle.inner_step()
        for p, q in zip(params, oracle.params(rank), strict=True):
            torch.testing.assert_close(p.detach(), q, atol=0, rtol=0, msg=f"int8 step {t}")
    per_round = _expected_bytes_per_round(numel, world, 8, 8)
    assert opt.comm_stats()["bytes_sent"] == 2 * per_round
    # ~ 2(N-1)/N * (8 + 32/8) bits per parameter per round, plus the padding and flag bytes.
    flats = _flat_all_ranks(params, world)
    assert all(torch.equal(flats[0], f) for f in flats)

    # 3. int4, plain averaging (lr 1, no momentum): theta_out moves by exactly minus the decoded mean, which is
    #    within half a step of every rank's quantiser plus half a step of the re-encode of the exact mean.
    params = _params()
    opt = DiLoCo(params, _inner("sgd", params), local_steps=H, lr=1.0, momentum=0.0, nesterov=False,
                 quantization="int4", quant_block_size=16)
    oracle = Oracle(world, "sgd", 1.0, 0.0, False, bits=4, block=16)
    before = torch.cat([p.detach().reshape(-1) for p in params])
    _run(rank, world, params, opt, 0, H)
    for _ in range(H):
        oracle.inner_step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    for p, q in zip(params, oracle.params(rank), strict=True):
        torch.testing.assert_close(p.detach(), q, atol=0, rtol=0, msg="int4 round")
    applied = before - after
    n_pad = oracle.padded
    half_steps = (sum(s.repeat_interleave(16) for s in oracle.last_sent_scales) / world / 2
                  + oracle.last_scales.repeat_interleave(16) / 2)[:numel]
    err = (applied - oracle.last_exact_mean).abs()
    # fp32 slack: a few ulp of the block's magnitude (the quantiser's division and the sums).
    slack = 1e-6 * (before.abs() + oracle.last_exact_mean.abs() + 1)
    assert bool((err <= half_steps + slack).all()), float((err - half_steps).max())
    assert float(err.max()) > 0  # the bound is not vacuous: int4 is lossy here
    assert n_pad % (world * 16) == 0

    # 4. A NaN on rank 2 in round 2 skips that round on every rank; the parameters are reset to theta_out.
    params = _params()
    opt = DiLoCo(params, _inner("sgd", params), local_steps=H)
    oracle = Oracle(world, "sgd", 0.7, 0.9, True)
    for t in range(1, 10):
        _run(rank, world, params, opt, t - 1, t, nan_at=(5, 2))
        oracle.inner_step(nan_at=(5, 2))
        if rank == 2 and t == 5:
            assert not bool(torch.isfinite(params[0]).all())  # the NaN is there until the round ends
        else:
            for p, q in zip(params, oracle.params(rank), strict=True):
                torch.testing.assert_close(p.detach(), q, atol=0, rtol=0, msg=f"skip run step {t}")
    assert oracle.skipped == 1
    stats = opt.comm_stats()
    assert stats["skipped_steps"] == 1 and stats["rounds"] == 3
    # The skipped round sent its reduce-scatter (which carried the flags) and no all-gather.
    shard = -(-numel // world)
    assert stats["bytes_sent"] == 3 * _expected_bytes_per_round(numel, world, 32, 256) - (world - 1) * shard * 4

    # 5. Resume mid-round (step 4 of 9: inside round 2) is bit-exact, byte counters included.
    for quant in (None, "int8"):
        params = _params()
        opt = DiLoCo(params, _inner("adamw", params), local_steps=H, quantization=quant, quant_block_size=8)
        _run(rank, world, params, opt, 0, 4)
        saved_params = [p.detach().clone() for p in params]
        saved = copy.deepcopy(opt.state_dict())  # state_dict() holds references, as torch's optimizers' do
        _run(rank, world, params, opt, 4, 9)
        want = [p.detach().clone() for p in params]
        want_stats = opt.comm_stats()

        fresh = _params()
        opt2 = DiLoCo(fresh, _inner("adamw", fresh), local_steps=H, quantization=quant, quant_block_size=8)
        with torch.no_grad():
            for p, s in zip(fresh, saved_params, strict=True):
                p.copy_(s)
        opt2.load_state_dict(saved)
        _run(rank, world, fresh, opt2, 4, 9)
        for p, q in zip(fresh, want, strict=True):
            torch.testing.assert_close(p.detach(), q, atol=0, rtol=0, msg=f"resume {quant}")
        assert opt2.comm_stats() == want_stats

    # 6. Ranks that start from different parameters are refused at construction, naming what differs.
    params = _params()
    if rank == 1:
        with torch.no_grad():
            params[0].add_(1.0)
    with pytest.raises(ValueError, match="parameter values"):
        DiLoCo(params, _inner("sgd", params), local_steps=H)


def test_diloco_against_oracle_4_ranks():
    spawn(_distributed_checks, 4)


def test_single_process_equals_oracle_and_bits():
    """N=1 without torch.distributed: the mean is the rank's own pseudo-gradient; the formula's bits are 0."""
    params = _params()
    opt = DiLoCo(params, _inner("adamw", params), local_steps=H)
    oracle = Oracle(1, "adamw", 0.7, 0.9, True)
    _run(0, 1, params, opt, 0, 7)
    for _ in range(7):
        oracle.inner_step()
    for p, q in zip(params, oracle.params(0), strict=True):
        torch.testing.assert_close(p.detach(), q, atol=0, rtol=0)
    assert opt.comm_stats()["bytes_sent"] == 0 and opt.comm_stats()["rounds"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_steps=0), "local_steps: 0"),
    (dict(local_steps=True), "local_steps: True"),
    (dict(local_steps=3, lr=0.0), "lr: 0.0"),
    (dict(local_steps=3, momentum=1.0), "momentum: 1.0"),
    (dict(local_steps=3, momentum=0.0), "nesterov=True with momentum=0"),
    (dict(local_steps=3, quantization="int2"), "quantization: 'int2'"),
    (dict(local_steps=3, quantization="int8", quant_block_size=12), "quant_block_size: 12"),
])
def test_bad_arguments_name_the_key(kwargs, match):
    params = _params()
    with pytest.raises(ValueError, match=match):
        DiLoCo(params, _inner("sgd", params), **kwargs)


def test_inner_on_other_parameters_is_refused():
    params = _params()
    with pytest.raises(ValueError, match="inner optimizer"):
        DiLoCo(params, _inner("sgd", params[:2]), local_steps=3)
    with pytest.raises(ValueError, match="Invalid inner"):
        DiLoCo(params, object(), local_steps=3)


def test_checkpoint_of_another_setting_is_refused():
    params = _params()
    opt = DiLoCo(params, _inner("sgd", params), local_steps=3)
    other = DiLoCo(params, _inner("sgd", params), local_steps=4)
    with pytest.raises(ValueError, match="local_steps=3"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a DiLoCo state dict"):
        opt.load_state_dict(_inner("sgd", params).state_dict())
