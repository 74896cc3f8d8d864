"""Pure-torch reference of the D-Lion update (DESIGN 3.1): the oracle that DistributedLion is tested against.

Written for clarity, one parameter at a time, in fp64-free fp32 math in the order of the contract; it uses no
kernels and no communication: the votes of all ranks are passed in explicitly.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mavo", "avg")


def _zero_rule(n: int, step: int, device) -> torch.Tensor:
    """+1 where ``(j + step)`` is even, else -1 (DESIGN 3.1 step 2): what a vote of exactly 0 becomes."""
    j = torch.arange(n, device=device)
    return torch.where((j + step) % 2 == 0, 1, -1).to(torch.int32)


def _votes(c: torch.Tensor, step: int) -> torch.Tensor:
    flat = c.reshape(-1)
    return torch.where(flat > 0, 1, torch.where(flat < 0, -1, _zero_rule(flat.numel(), step, flat.device)))


def dlion_update_ref(param: torch.Tensor, grads: list[torch.Tensor | None], exp_avgs: list[torch.Tensor],
                     lr: float, betas: tuple[float, float], weight_decay: float, step: int,
                     aggregation: str = "mavo") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One D-Lion step of one parameter, given every rank's gradient and momentum.

    Args:
        param: the (replicated) parameter before the step.
        grads: one gradient per rank (None = zeros).
        exp_avgs: one fp32 momentum per rank.
        lr, betas, weight_decay: hyper-parameters. step: ``t`` from 1. aggregation: ``"mavo"`` or ``"avg"``.
    Returns:
        ``(new_param, new_exp_avgs)``; the inputs are not modified.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
    beta1, beta2 = betas
    f32 = torch.float32
    n_ranks = len(grads)
    total = torch.zeros(param.numel(), dtype=torch.int32, device=param.device)
    new_ms = []
    for g, m in zip(grads, exp_avgs, strict=True):
        g32 = torch.zeros_like(m) if g is None else g.reshape(m.shape).to(f32)
        c = m * torch.tensor(beta1, dtype=f32) + g32 * torch.tensor(1 - beta1, dtype=f32)
        total += _votes(c, step)
        new_ms.append(m * torch.tensor(beta2, dtype=f32) + g32 * torch.tensor(1 - beta2, dtype=f32))
    if aggregation == "mavo":
        delta = torch.where(total == 0, _zero_rule(total.numel(), step, total.device), total.sign()).to(f32)
    else:
        delta = total.to(f32) / n_ranks
    p32 = param.reshape(-1).to(f32)
    new_p = p32 * torch.tensor(1 - lr * weight_decay, dtype=f32) - delta * torch.tensor(lr, dtype=f32)
    return new_p.to(param.dtype).view_as(param), new_ms


def lion_update_ref(param: torch.Tensor, grad: torch.Tensor | None, exp_avg: torch.Tensor, lr: float,
                    betas: tuple[float, float], weight_decay: float, step: int):
    """Single-worker Lion with the zero rule (D-Lion at N = 1): returns ``(new_param, new_exp_avg)``."""
    new_p, (new_m,) = dlion_update_ref(param, [grad], [exp_avg], lr, betas, weight_decay, step)
    return new_p, new_m


def check_lion_hyperparameters(lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """``ValueError`` naming the argument, as torch.optim does, for every Lion-family optimizer here."""
    if isinstance(lr, bool) or not lr > 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be > 0)")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (two values in [0, 1))")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")


class Lion(torch.optim.Optimizer):
    """Single-process Lion with the zero rule (D-Lion at N = 1): the local inner optimizer of local-step D-Lion.

    Args:
        params: parameters or param groups. lr: step size (> 0). betas: ``(beta1, beta2)`` in [0, 1).
        weight_decay: decoupled weight decay (>= 0).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        check_lion_hyperparameters(lr, betas, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                new_p, new_m = lion_update_ref(p, p.grad, state["exp_avg"], group["lr"], group["betas"],
                                               group["weight_decay"], state["step"])
                p.copy_(new_p)
                state["exp_avg"].copy_(new_m.view_as(state["exp_avg"]))
        return loss
