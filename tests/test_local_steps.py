"""LocalStepsLion (issue 13): the contract against an oracle written here, on 4 gloo ranks.

The oracle replays every rank's inner optimizer (torch's own SGD / AdamW on copies: the inner optimizer is the
caller's, not the code under test) and the outer D-Lion step element by element in fp32, in the order the contract
states: c = b1*m + (1-b1)*delta, votes with the zero rule on (j + t), S = sum of votes, MaVo / Avg, decoupled weight
decay on theta_out, m = b2*m + (1-b2)*delta.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from _dist import spawn

from distlion_ds import LocalStepsLion

F32 = torch.float32
N, H = 4, 3
SHAPES = {"w": ((4, 8), F32), "b": ((32,), F32), "z": ((32,), F32), "h": ((32,), torch.bfloat16)}


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in SHAPES.items():
        out[name] = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(dtype))
    return out


def _set_grads(params: dict[str, torch.Tensor], rank: int, step: int, poison: bool = False) -> None:
    """A gradient that depends on the parameter (so the inner trajectory matters), the rank and the step; ``z``
    never gets one (its pseudo-gradient is exactly 0: the zero rule decides its votes)."""
    for k, (name, p) in enumerate(params.items()):
        if name == "z":
            p.grad = None
            continue
        x = p.detach().float()
        g = torch.sin(x * (1.7 + 0.3 * k) + 0.9 * rank + 0.37 * step) + 0.05 * (rank - 1.5)
        if poison and name == "b":
            g[3] = math.inf
        p.grad = g.to(p.dtype)


def _inner(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)


def _zero_rule(n: int, t: int) -> torch.Tensor:
    j = torch.arange(n)
    return torch.where((j + t) % 2 == 0, 1.0, -1.0)


def _sign_with_zero_rule(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, _zero_rule(x.numel(), t)))


class Oracle:
    """All N ranks, in one process: inner optimizers on copies, the outer D-Lion step written out."""

    def __init__(self, kind: str, aggregation: str, lr: float, betas, wd: float):
        self.ranks = [_params() for _ in range(N)]
        self.inners = [_inner(kind, list(p.values())) for p in self.ranks]
        self.theta = {k: p.detach().float().clone() for k, p in _params().items()}
        self.m = [{k: torch.zeros(v.numel()) for k, v in self.theta.items()} for _ in range(N)]
        self.aggregation, self.lr, self.betas, self.wd = aggregation, lr, betas, wd
        self.steps = 0
        self.skipped = 0

    def step(self, poison_rank: int | None = None) -> None:
        for r in range(N):
            _set_grads(self.ranks[r], r, self.steps + 1, poison=poison_rank == r)
            self.inners[r].step()
        self.steps += 1
        if self.steps % H:
            return
        t = self.steps // H
        deltas = [{k: (self.theta[k] - p.detach().float()).reshape(-1) for k, p in ps.items()} for ps in self.ranks]
        if all(bool(torch.isfinite(d).all()) for dr in deltas for d in dr.values()):
            b1, b2 = (torch.tensor(b, dtype=F32) for b in self.betas)
            one = torch.tensor(1.0, dtype=F32)
            for k in self.theta:
                total = torch.zeros(self.theta[k].numel())
                for r in range(N):
                    c = self.m[r][k] * b1 + deltas[r][k] * (one - b1)
                    total += _sign_with_zero_rule(c, t)
                    self.m[r][k] = self.m[r][k] * b2 + deltas[r][k] * (one - b2)
                if self.aggregation == "mavo":
                    agg = _sign_with_zero_rule(total, t)
                else:
                    agg = total / N
                flat = self.theta[k].reshape(-1)
                if self.wd:
                    flat = flat * torch.tensor(1 - self.lr * self.wd, dtype=F32)
                self.theta[k] = (flat - agg * torch.tensor(self.lr, dtype=F32)).view_as(self.theta[k])
        else:
            self.skipped += 1
        with torch.no_grad():
            for ps in self.ranks:
                for k, p in ps.items():
                    p.copy_(self.theta[k])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


class _CountCollectives:
    """Counts calls of torch.distributed's collectives (patched on the module, where the comm layer calls them)."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
             "reduce_scatter_tensor", "send", "recv", "isend", "irecv", "barrier")

    def __enter__(self):
        self.calls = 0
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

        def wrap(fn):
            def counted(*a, **k):
                self.calls += 1
                return fn(*a, **k)
            return counted

        for n, fn in self.saved.items():
            setattr(dist, n, wrap(fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def _run_case(rank: int, kind: str, aggregation: str, wd: float, steps: int, poison: dict[int, int] | None = None):
    lr, betas = 0.02, (0.9, 0.99)
    oracle = Oracle(kind, aggregation, lr, betas, wd)
    params = _params()
    inner = _inner(kind, list(params.values()))
    opt = LocalStepsLion(list(params.values()), inner, H, lr=lr, betas=betas, weight_decay=wd,
                         aggregation=aggregation)
    poison = poison or {}
    per_round = None
    for s in range(1, steps + 1):
        _set_grads(params, rank, s, poison=poison.get(s) == rank)
        sent_before = opt.comm_stats()["bytes_sent"]
        if s % H:
            with _CountCollectives() as counter:
                opt.step()
            assert counter.calls == 0, f"step {s}: {counter.calls} collectives between outer steps"
            assert opt.comm_stats()["bytes_sent"] == sent_before
        else:
            opt.step()
            per_round = opt.comm_stats()["bytes_sent"] - sent_before
        oracle.step(poison_rank=poison.get(s))
        for k, p in params.items():
            assert _same(p, oracle.ranks[rank][k]), f"{kind}/{aggregation}: step {s}: {k} differs from the oracle"
        # replicas bit-identical after every outer step
        if s % H == 0:
            sums = torch.stack([_bits(p).double().mul(torch.arange(1, p.numel() + 1).double().view_as(p)).sum()
                                for p in params.values()])
            gathered = [torch.zeros_like(sums) for _ in range(N)]
            dist.all_gather(gathered, sums)
            assert all(torch.equal(gathered[0], g) for g in gathered), f"step {s}: replicas differ"
    return opt, per_round, oracle


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    numel = sum(math.prod(s) for s, _ in SHAPES.values())
    for kind in ("sgd", "adamw"):
        for aggregation, wd in (("mavo", 0.0), ("avg", 0.5)):
            opt, per_round, _ = _run_case(rank, kind, aggregation, wd, steps=2 * H)
            stats = opt.comm_stats()
            b = 1 if aggregation == "mavo" else math.ceil(math.log2(N + 1))
            # every parameter is a multiple of 8N elements (no padding): the votes are exactly (1 + b)(N-1)/N bits
            # per parameter per round, plus one non-finite flag byte per peer (one bucket)
            assert per_round == (1 + b) * (N - 1) * numel // (8 * N) + (N - 1), (per_round, numel)
            assert stats["control_bytes_sent"] == 2 * (N - 1)
            assert stats["steps"] == 2 * H and stats["rounds"] == 2 and stats["local_steps"] == H
            assert stats["params"] == numel and stats["world_size"] == N and stats["aggregation"] == aggregation
            # per inner step: 2(N-1)/N/H for MaVo, (1 + b)(N-1)/N/H for Avg
            assert stats["bits_per_param_step"] == (1 + b) * (N - 1) / N / H, stats
    # the zero rule reached the never-trained parameter z (its pseudo-gradient is 0 every round): it oscillates
    opt, _, oracle = _run_case(rank, "sgd", "mavo", 0.0, steps=2 * H)
    z0 = _params()["z"].detach()
    z = opt.param_groups[0]["params"][2].detach()
    assert (z - z0).abs().max() < 1e-6, "z moves by +-lr, then -+lr: it oscillates and never drifts"

    # a non-finite pseudo-gradient on one rank (rank 2, round 2) skips that outer step everywhere
    opt, _, oracle = _run_case(rank, "adamw", "mavo", 0.1, steps=3 * H, poison={H + 1: 2})
    # (the poisoned inner state of rank 2 is never reset, per the contract, so later rounds skip too)
    assert opt.comm_stats()["skipped_steps"] == oracle.skipped >= 1
    assert opt.comm_stats()["rounds"] == 3

    # resume mid-round (after step H + 1) equals uninterrupted, bit for bit
    for kind in ("sgd", "adamw"):
        params = _params()
        opt = LocalStepsLion(list(params.values()), _inner(kind, list(params.values())), H, lr=0.02,
                             weight_decay=0.1, aggregation="avg")
        saved = None
        for s in range(1, 3 * H + 2):
            _set_grads(params, rank, s)
            opt.step()
            if s == H + 1:
                # (deep-copied: like torch's optimizers, state_dict() returns references to live state)
                saved = ({k: p.detach().clone() for k, p in params.items()}, copy.deepcopy(opt.state_dict()))
        params2 = {k: torch.nn.Parameter(v.clone()) for k, v in saved[0].items()}
        opt2 = LocalStepsLion(list(params2.values()), _inner(kind, list(params2.values())), H, lr=0.02,
                              weight_decay=0.1, aggregation="avg")
        opt2.load_state_dict(saved[1])
        for s in range(H + 2, 3 * H + 2):
            _set_grads(params2, rank, s)
            opt2.step()
        for k in params:
            assert _same(params[k], params2[k]), f"{kind}: resume mid-round: {k} differs"
        # counters: inner_steps is the position (restored), steps and bytes count this process's work
        assert opt2.comm_stats()["inner_steps"] == opt.comm_stats()["inner_steps"] == 3 * H + 1
        assert opt2.comm_stats()["steps"] == 2 * H and opt2.comm_stats()["rounds"] == 2
        assert 3 * opt2.comm_stats()["bytes_sent"] == 2 * opt.comm_stats()["bytes_sent"]


def test_contract_four_ranks():
    spawn(_worker, N)


def _agree_worker(rank: int, world: int) -> None:
    p = torch.nn.Parameter(torch.ones(16))
    opt = LocalStepsLion([p], torch.optim.SGD([p], lr=0.1), 2 + rank, lr=0.01)  # H differs between the ranks
    with pytest.raises(ValueError, match="local_steps"):
        for _ in range(4):
            p.grad = torch.ones(16)
            opt.step()


def test_mismatched_local_steps_refused_before_any_vote():
    spawn(_agree_worker, 2)


def test_single_process_is_inner_then_lion_on_the_pseudo_gradient():
    """N = 1: after each round, theta_out moved by exactly -lr * sign(delta) (no zeros here)."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(40))
    opt = LocalStepsLion([p], torch.optim.SGD([p], lr=0.1), 4, lr=0.01)
    start = p.detach().clone()
    for _ in range(4):
        p.grad = torch.randn(40)
        opt.step()
    # round 1: m = 0, so the vote is sign((1-b1) * delta) = sign(delta) = sign(start - p_after_inner)
    assert torch.equal(opt.outer.param_groups[0]["params"][0].detach(), p.detach())
    moved = p.detach() - start
    assert torch.allclose(moved.abs(), torch.full((40,), 0.01), rtol=0, atol=1e-6)
    assert opt.comm_stats()["rounds"] == 1 and opt.comm_stats()["bytes_sent"] == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(local_steps=0), "local_steps"),
    (dict(local_steps=True), "local_steps"),
    (dict(local_steps=2.0), "local_steps"),
    (dict(lr=0.0), "lr"),
    (dict(aggregation="median"), "aggregation"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(inner="adamw"), "inner"),
    (dict(inner="other-params"), "inner optimizer"),
])
def test_bad_options_refused_naming_them(kwargs, needle):
    p = torch.nn.Parameter(torch.zeros(8))
    q = torch.nn.Parameter(torch.zeros(8))
    args = dict(local_steps=3, lr=0.01)
    inner = kwargs.pop("inner", None)
    inner = {None: torch.optim.SGD([p], lr=0.1), "adamw": "adamw",
             "other-params": torch.optim.SGD([p, q], lr=0.1)}[inner]
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        LocalStepsLion([p], inner, **args)


def test_load_state_dict_checks_local_steps():
    p = torch.nn.Parameter(torch.zeros(8))
    a = LocalStepsLion([p], torch.optim.SGD([p], lr=0.1), 3, lr=0.01)
    b = LocalStepsLion([p], torch.optim.SGD([p], lr=0.1), 4, lr=0.01)
    with pytest.raises(ValueError, match="local_steps=3"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a LocalStepsLion state dict"):
        b.load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())


@pytest.mark.parametrize("outer", ["LocalStepsLion", "DiLoCo"])
def test_schedulers_drive_the_inner_lr_also_after_loading(outer):
    from distlion_ds.optim.diloco import DiLoCo

    p = torch.nn.Parameter(torch.zeros(8))
    inner = torch.optim.AdamW([p], lr=0.1)
    opt = {"LocalStepsLion": LocalStepsLion, "DiLoCo": DiLoCo}[outer]([p], inner, 2, lr=0.01)
    state = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(state)  # torch's load_state_dict replaces the inner optimizer's param_groups list
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        p.grad = torch.ones(8)
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    assert opt.outer.param_groups[0]["lr"] == 0.01  # the outer lr is not the scheduler's
