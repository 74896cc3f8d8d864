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
