"""Local-step D-Lion: D-Lion as a 1-bit outer optimizer over H local steps (the DiLoCo family; issue 13).

Every rank trains ``H = local_steps`` steps with its own inner optimizer (AdamW, Lion, SGD ...; its state is never
communicated and never reset). Every H-th ``step()`` ends round ``t`` (from 1) with one outer step, a collective:

1. ``theta_out``: the parameters as they were at the start of the round, identical on every rank, kept in fp32;
2. the pseudo-gradient ``delta = theta_out - theta`` in fp32 on every rank;
3. outer D-Lion exactly as DESIGN 3.1 with ``g = delta`` and step ``t`` (per-rank fp32 outer momentum, votes with the
   zero rule on ``(j + t)``, MaVo or Avg, ``theta_out <- theta_out * (1 - lr * wd) - lr * delta_agg``), through the
   same bucketed all_to_all + all_gather as per-step D-Lion (:class:`~distlion_ds.optim.DistributedLion` is the
   outer optimizer here, its parameters are the ``theta_out`` tensors and their gradients the pseudo-gradients);
4. every rank's parameters are set to the new ``theta_out`` (cast to their dtype): replicas are bit-identical after
   every outer step.

A non-finite ``delta`` on any rank skips the outer step on every rank (``theta_out`` and the outer momentum
untouched) and resets the parameters to ``theta_out``; it is counted and logged. Nothing is sent between outer steps:
the wire is ``2(N-1)/N`` bits per parameter per round for MaVo, ``2(N-1)/N/H`` per inner step (DistributedLion's
``(1 + b)(N-1)/N`` per round in general).

Memory beyond the inner optimizer: three fp32 copies of the parameters (``theta_out``, the pseudo-gradient buffer and
the outer momentum), 12 bytes per parameter.

Learning rates. ``param_groups`` is the inner optimizer's: LR schedulers (torch's, DeepSpeed's) drive the inner
learning rate, as DiLoCo schedules its inner AdamW; the outer learning rate is ``outer.param_groups`` (constant
unless you schedule it yourself).

Related work: DiLoCo (arXiv 2311.08105; Nesterov outer step on an fp32 all-reduced pseudo-gradient), Distributed
Sign Momentum with local steps (arXiv 2411.17866; sign-based outer updates).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .distributed_lion import DistributedLion

logger = logging.getLogger(__name__)

STATE_KEY = "local_steps_lion"


def check_same_parameters(owner: str, trainable: list[torch.Tensor], inner) -> None:
    """An outer optimizer over local steps and its inner optimizer must own the same trainable parameters: a
    parameter only the inner one steps would drift apart across the replicas, one only the outer one holds would
    never train. ``ValueError`` naming both counts otherwise."""
    mine = {id(p) for p in trainable}
    theirs = {id(p) for g in inner.param_groups for p in g["params"] if p.requires_grad}
    if mine != theirs:
        raise ValueError(
            f"{owner}: the trainable parameters ({len(mine)}) and the inner optimizer's ({len(theirs)}) differ "
            f"({len(mine - theirs)} only here, {len(theirs - mine)} only in inner): build the inner optimizer on "
            "the same parameters, or the replicas would drift apart")


class _OuterLion(DistributedLion):
    """The outer D-Lion: DistributedLion whose agreement check also compares the number of local steps."""

    def __init__(self, params, *, local_steps: int, **kwargs: Any):
        self.local_steps = local_steps
        super().__init__(params, **kwargs)

    def _settings(self) -> dict[str, object]:
        return {"local_steps": self.local_steps, **super()._settings()}


def _as_groups(params) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("LocalStepsLion: empty parameter list")
    if isinstance(params[0], dict):
        return [dict(g, params=list(g["params"])) for g in params]
    return [{"params": params}]


class InnerOptimizerView:
    """``param_groups`` and ``state`` of an outer optimizer over local steps are the inner optimizer's: LR schedulers
    (torch's, DeepSpeed's) drive the inner learning rate. Read through, not copied: torch's ``load_state_dict``
    replaces the inner optimizer's lists, and a copied attribute would go stale (a scheduler would then drive a list
    nobody reads). Set ``self.inner`` first and ``self._delegating = True`` after ``torch.optim.Optimizer.__init__``.
    """

    @property
    def param_groups(self) -> list[dict]:
        if self.__dict__.get("_delegating"):
            return self.inner.param_groups
        return self.__dict__["_base_param_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if self.__dict__.get("_delegating"):
            self.inner.param_groups = value
        else:
            self.__dict__["_base_param_groups"] = value

    @property
    def state(self):
        if self.__dict__.get("_delegating"):
            return self.inner.state
        return self.__dict__["_base_state"]

    @state.setter
    def state(self, value) -> None:
        if self.__dict__.get("_delegating"):
            self.inner.state = value
        else:
            self.__dict__["_base_state"] = value


class LocalStepsLion(InnerOptimizerView, torch.optim.Optimizer):
    """D-Lion as the outer optimizer of H local steps of ``inner`` (see the module docstring for the contract).

    Args:
        params: the parameters (or param-group dicts, which may set the outer ``lr``, ``betas``, ``weight_decay``
            per group); those with ``requires_grad=True`` must be exactly the parameters ``inner`` optimizes.
        inner: the inner optimizer, built by the caller on the same parameters; every rank keeps its own. A
            ``torch.optim.Optimizer``, or anything with ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``
            and ``param_groups`` (megatron-core's ``MegatronOptimizer`` on fp32 parameters).
        local_steps: H >= 1, inner steps per round.
        lr: outer learning rate (> 0): each outer step moves a weight by ``lr`` (MaVo).
        betas: outer ``(beta1, beta2)``.
        weight_decay: outer decoupled weight decay, applied to ``theta_out`` once per round.
        aggregation: ``"mavo"`` or ``"avg"``.
        process_group: the data-parallel group (None: the default group).
        **outer_kwargs: further keyword arguments of :class:`~distlion_ds.optim.DistributedLion` for the outer
            step (``raise_on_nonfinite``, ``check_replicas_every`` (counted in rounds), ``bucket_numel``,
            ``intra_node_size`` ...).
    """

    def __init__(self, params, inner, local_steps: int, lr: float,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, aggregation: str = "mavo",
                 process_group=None, **outer_kwargs: Any):
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"Invalid local_steps: {local_steps!r} (an int >= 1: inner steps per outer step)")
        missing = [a for a in ("step", "zero_grad", "state_dict", "load_state_dict", "param_groups")
                   if not hasattr(inner, a)]
        if missing:
            raise ValueError(f"Invalid inner: {type(inner).__name__} has no {', '.join(missing)} (an optimizer "
                             "built on the same parameters, e.g. torch.optim.AdamW(model.parameters(), lr=...), or "
                             "a megatron-core MegatronOptimizer)")
        if isinstance(inner, LocalStepsLion | DistributedLion):
            raise ValueError(f"Invalid inner: {type(inner).__name__} communicates; the inner optimizer must be "
                             "local (AdamW, SGD, a single-process Lion ...)")
        groups = _as_groups(params)
        trainable = [p for g in groups for p in g["params"] if p.requires_grad]
        inner_params = [p for g in inner.param_groups for p in g["params"]]
        check_same_parameters("LocalStepsLion", trainable, inner)
        self.inner = inner
        self.local_steps = local_steps
        self._groups = groups
        self._outer_args = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, aggregation=aggregation,
                                process_group=process_group, **outer_kwargs)
        self.outer: _OuterLion | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._inner_steps = 0  # position in training (restored by load_state_dict)
        self._steps_here = 0  # inner steps run by this object (the denominator of bits_per_param_step)
        self._skipped_rounds = 0  # in training (restored)
        self._skipped_here = 0
        self._pending_state: dict | None = None
        # Validates the outer arguments now (same errors as DistributedLion) without keeping anything.
        # (flat: a hierarchical outer step would create its node groups twice)
        _OuterLion([torch.zeros(8, requires_grad=True)], local_steps=local_steps,
                   **{**self._outer_args, "intra_node_size": 1, "node_groups": None})
        # torch.optim.Optimizer bookkeeping (hooks, LR-scheduler patching); from then on param_groups and state are
        # the inner optimizer's (properties below).
        super().__init__(inner_params, {})
        self.defaults = getattr(inner, "defaults", {})  # MegatronOptimizer has none
        self._delegating = True

    # ------------------------------------------------------------------------------------------ outer set-up
    def _build_outer(self) -> None:
        """theta_out = fp32 copies of the trainable parameters as they are now (the start of a round)."""
        outer_groups, self._pairs = [], []
        for g in self._groups:
            thetas = []
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                theta = p.detach().to(torch.float32, copy=True).requires_grad_(True)
                self._pairs.append((p, theta))
                thetas.append(theta)
            if thetas:
                outer_groups.append({**{k: v for k, v in g.items() if k in ("lr", "betas", "weight_decay")},
                                     "params": thetas})
        self.outer = _OuterLion(outer_groups, local_steps=self.local_steps, **self._outer_args)
        if self._pending_state is not None:
            self._load_outer(self._pending_state)
            self._pending_state = None

    def _load_outer(self, state: dict) -> None:
        thetas = state["theta_out"]
        if len(thetas) != len(self._pairs):
            raise ValueError(f"LocalStepsLion: the checkpoint has {len(thetas)} outer parameters, this optimizer "
                             f"{len(self._pairs)}: resume with the model and parameter order it was saved with")
        with torch.no_grad():
            for (_, theta), saved in zip(self._pairs, thetas, strict=True):
                if saved.shape != theta.shape:
                    raise ValueError(f"LocalStepsLion: a saved outer parameter has shape {tuple(saved.shape)}, "
                                     f"the model's {tuple(theta.shape)}")
                theta.copy_(saved)
        self.outer.load_state_dict(state["outer"])

    # ------------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        """One inner step; every ``local_steps``-th call also the outer step (a collective: every rank calls it)."""
        if self.outer is None:
            self._build_outer()
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._inner_steps += 1
        self._steps_here += 1
        if self._inner_steps % self.local_steps == 0:
            self._outer_step(self._inner_steps // self.local_steps)
        return loss

    @torch.no_grad()
    def _outer_step(self, t: int) -> None:
        for p, theta in self._pairs:
            if theta.grad is None:
                theta.grad = torch.empty_like(theta)
            torch.sub(theta, p.detach(), out=theta.grad)  # delta = theta_out - theta, in fp32
        for g in self.outer.param_groups:  # the outer step of round t uses t in its zero rule (DESIGN 3.1)
            g["step"] = t - 1
        skipped = self.outer.comm_stats()["skipped_steps"]
        self.outer.step()
        if self.outer.comm_stats()["skipped_steps"] != skipped:
            self._skipped_rounds += 1
            self._skipped_here += 1
            logger.warning("LocalStepsLion: a non-finite pseudo-gradient on at least one rank in round %d; the outer "
                           "step is skipped on every rank and the parameters reset to the start of the round "
                           "(%d rounds skipped so far)", t, self._skipped_rounds)
        for p, theta in self._pairs:
            p.copy_(theta)  # cast to the parameter's dtype: the same bits on every rank

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------------ stats
    def comm_stats(self) -> dict:
        """DistributedLion's statistics of the outer exchange, per inner step.

        Returns:
            the keys of :meth:`DistributedLion.comm_stats`, with ``steps`` = inner steps and ``bits_per_param_step``
            = bits sent per parameter per inner step (``2(N-1)/N/H`` for MaVo after whole rounds), ``skipped_steps``
            = skipped outer steps; plus ``local_steps`` (H), ``rounds`` (outer steps run, applied or skipped),
            ``inner_steps`` (the position in training, restored from a checkpoint) and ``skipped_rounds`` (in
            training). Like DistributedLion's, ``steps``, ``rounds`` and the bytes count what this object ran
            (since construction or loading).
        """
        if self.outer is None:
            self._build_outer()
        stats = self.outer.comm_stats()
        n_params = stats["params"]
        sent = stats["bytes_sent"] - stats["control_bytes_sent"]  # the votes (DistributedLion's accounting)
        rounds = stats["steps"]
        stats.update(
            steps=self._steps_here,
            inner_steps=self._inner_steps,
            rounds=rounds,
            local_steps=self.local_steps,
            skipped_steps=self._skipped_here,
            skipped_rounds=self._skipped_rounds,
            bits_per_param_step=8.0 * sent / (n_params * self._steps_here) if n_params and self._steps_here
            else 0.0,
        )
        return stats

    # ------------------------------------------------------------------------------------------ state
    def local_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters, in order: mid-round each rank's are its own (an engine that saves the
        weights of one rank only must save these per rank)."""
        return [p for g in self._groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def set_local_parameters(self, values: list[torch.Tensor]) -> None:
        """Copy ``values`` (as :meth:`local_parameters` returned them) into the parameters."""
        params = self.local_parameters()
        if len(values) != len(params) or any(v.shape != p.shape for v, p in zip(values, params, strict=False)):
            raise ValueError(f"LocalStepsLion: {len(values)} saved parameters do not match the model's "
                             f"{len(params)} (shapes and order must be those it was saved with)")
        for p, v in zip(params, values, strict=True):
            p.copy_(v)

    def state_dict(self) -> dict:
        """Inner state, outer state (momentum, round counter), ``theta_out`` and the position inside the round."""
        if self.outer is None:
            self._build_outer()
        return {
            "inner": self.inner.state_dict(),
            STATE_KEY: {
                "local_steps": self.local_steps,
                "inner_steps": self._inner_steps,
                "skipped_rounds": self._skipped_rounds,
                "theta_out": [theta.detach().clone() for _, theta in self._pairs],
                "outer": self.outer.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (resume mid-round is exact: the round's ``theta_out`` is restored too).

        The model's parameters themselves come from the model's own checkpoint.
        """
        if STATE_KEY not in state_dict or "inner" not in state_dict:
            raise ValueError("LocalStepsLion.load_state_dict: not a LocalStepsLion state dict (missing "
                             f"{STATE_KEY!r} or 'inner'); a per-step DistributedLion checkpoint cannot resume "
                             "local steps")
        mine = state_dict[STATE_KEY]
        if mine["local_steps"] != self.local_steps:
            raise ValueError(f"LocalStepsLion: the checkpoint was saved with local_steps={mine['local_steps']}, "
                             f"this optimizer has local_steps={self.local_steps}")
        self.inner.load_state_dict(state_dict["inner"])
        self._inner_steps = int(mine["inner_steps"])
        self._skipped_rounds = int(mine["skipped_rounds"])
        if self.outer is None:
            self._pending_state = mine
            self._build_outer()
        else:
            self._load_outer(mine)
