"""Local-step D-Lion through a DeepSpeed config (issue 13): ``"local_steps"`` + ``"inner_optimizer"``.

One 2-rank spawn: the engine equals LocalStepsLion + torch AdamW driven by hand (bit for bit, every step), no
collective at all between outer steps (no DP all-reduce, no norm all-reduce), local clipping, DeepSpeed's scheduler
drives the inner lr, and engine.save_checkpoint mid-round -> a fresh engine's load_checkpoint -> continue equals
uninterrupted. Single-process: bad config keys refused naming them.
"""

import copy
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import spawn

H = 3
LR_OUT, LR_IN = 3e-3, 1e-2
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor", "all_to_all_single",
               "broadcast")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        return F.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _config(clip=0.0):
    return {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**6, "gradient_clipping": clip,
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": LR_IN,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}},
            "optimizer": {"type": "DistributedLion",
                          "params": {"lr": LR_OUT, "weight_decay": 0.1, "local_steps": H,
                                     "inner_optimizer": {"type": "AdamW",
                                                         "params": {"lr": LR_IN, "weight_decay": 0.01}}}}}


class _Count:
    def __enter__(self):
        self.calls, self._saved = [], {n: getattr(dist, n) for n in COLLECTIVES}
        for name, fn in self._saved.items():
            def counted(*a, _fn=fn, _name=name, **k):
                self.calls.append(_name)
                return _fn(*a, **k)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _worker(rank, world, outdir):
    import deepspeed

    import distlion_ds
    from distlion_ds import LocalStepsLion
    from distlion_ds.deepspeed.engine import DeepSpeedLocalStepsLion, clip_local_grad_norm_, get_distributed_lion

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)

    for clip in (0.0, 0.05):
        engine, opt, _, sched = distlion_ds.initialize(model=_Net(), config=_config(clip))
        assert type(opt) is DeepSpeedLocalStepsLion and get_distributed_lion(engine) is opt
        assert engine.enable_backward_allreduce is False and opt.local_steps == H
        ref = _Net()
        ref_inner = torch.optim.AdamW(ref.parameters(), lr=LR_IN, weight_decay=0.01)
        ref_opt = LocalStepsLion(ref.parameters(), ref_inner, H, lr=LR_OUT, weight_decay=0.1)
        for step in range(1, 2 * H + 2):
            # DeepSpeed's WarmupLR sets the inner lr (param_groups are the inner optimizer's)
            for g in ref_inner.param_groups:
                g["lr"] = opt.param_groups[0]["lr"]
            x, y = _batch(step, rank)
            with _Count() as count:
                engine.backward(engine(x, y))
                engine.step()
            outer = step % H == 0
            assert bool(count.calls) == outer, (step, count.calls)  # nothing between outer steps
            ref(x, y).backward()
            if clip:
                clip_local_grad_norm_(list(ref.parameters()), clip)
            ref_opt.step()
            ref_opt.zero_grad()
            assert torch.equal(_flat(engine.module), _flat(ref)), f"clip={clip} step {step}"
            if outer:
                both = [torch.zeros_like(_flat(ref)) for _ in range(world)]
                dist.all_gather(both, _flat(engine.module))
                assert torch.equal(both[0], both[1]), "replicas differ after an outer step"
            else:
                assert not torch.equal(*_gather(_flat(engine.module))), "ranks train locally between rounds"
        # the scheduler drives the inner optimizer's lr (warm-up done); the outer lr is untouched
        assert opt.param_groups[0]["lr"] == sched.get_lr()[0] == pytest.approx(LR_IN, rel=1e-9)
        assert opt.inner.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert opt.outer.param_groups[0]["lr"] == LR_OUT
        stats = opt.comm_stats()
        assert stats["rounds"] == 2 and stats["steps"] == 2 * H + 1 and stats["local_steps"] == H

    # save mid-round (after step H + 1), resume in a fresh engine, continue: equal to uninterrupted
    engine, opt, _, _ = distlion_ds.initialize(model=_Net(), config=_config())
    snapshot = None
    for step in range(1, 3 * H + 1):
        x, y = _batch(step, rank)
        engine.backward(engine(x, y))
        engine.step()
        if step == H + 1:
            engine.save_checkpoint(str(outdir), tag="mid")
            snapshot = copy.deepcopy(opt.state_dict())
    engine2, opt2, _, _ = distlion_ds.initialize(model=_Net(), config=_config())
    engine2.load_checkpoint(str(outdir), tag="mid")
    loaded = opt2.state_dict()["local_steps_lion"]
    assert loaded["inner_steps"] == H + 1
    for a, b in zip(loaded["theta_out"], snapshot["local_steps_lion"]["theta_out"], strict=True):
        assert torch.equal(a, b)
    for step in range(H + 2, 3 * H + 1):
        x, y = _batch(step, rank)
        engine2.backward(engine2(x, y))
        engine2.step()
    assert torch.equal(_flat(engine2.module), _flat(engine.module)), "resume mid-round differs"


def _gather(t):
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def test_deepspeed_local_steps_two_ranks(tmp_path):
    spawn(_worker, 2, tmp_path)


@pytest.mark.parametrize("params, needle", [
    ({"local_steps": 4}, "local_steps=4 needs optimizer.params.inner_optimizer"),
    ({"local_steps": 0}, "optimizer.params.local_steps"),
    ({"local_steps": 2, "inner_optimizer": {"type": "Adafactor"}}, "inner_optimizer: type: 'Adafactor'"),
    ({"local_steps": 2, "inner_optimizer": {"type": "AdamW", "parms": {}}}, "inner_optimizer: parms: unknown key"),
    ({"local_steps": 2, "inner_optimizer": {"type": "SGD", "params": {"lrate": 1.0}}},
     "inner_optimizer: params.lrate: unknown key for SGD"),
    ({"local_steps": 2, "inner_optimizer": {"type": "AdamW", "params": {"lr": -1.0}}}, "Invalid learning rate"),
    ({"local_steps": 2, "inner_optimizer": {"type": "AdamW", "params": {"lr": True}}}, "params.lr: True"),
])
def test_bad_local_steps_config_refused_naming_the_key(params, needle):
    from distlion_ds.deepspeed.config import parse_deepspeed_config

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_deepspeed_config({"train_batch_size": 4, "optimizer": {"type": "DistributedLion", "params": params}})


def test_local_steps_with_deepspeed_mixed_precision_refused():
    from distlion_ds.deepspeed.config import parse_deepspeed_config

    cfg = {"train_batch_size": 4, "bf16": {"enabled": True},
           "optimizer": {"type": "DistributedLion",
                         "params": {"local_steps": 2, "inner_optimizer": {"type": "Lion", "params": {"lr": 1e-4}}}}}
    with pytest.raises(ValueError, match="bf16.enabled cannot be used with local-step D-Lion"):
        parse_deepspeed_config(cfg)
    del cfg["bf16"]
    plan = parse_deepspeed_config(cfg)
    assert plan.optimizer.local_steps == 2 and plan.optimizer.inner_optimizer["type"] == "Lion"
