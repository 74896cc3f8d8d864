"""DiLoCo: the local-steps baseline (arXiv 2311.08105), with an fp32, int8 or int4 outer all-reduce.

Written from the paper (and from INTELLECT-1 / Streaming DiLoCo for the quantised all-reduce), not from torchft.
torchft 0.2.0 installs here and imports on CPU, but its ``DiLoCo`` needs a torchft ``Manager`` (a lighthouse server,
a quorum every sync) around the process group, and its quantised all-reduce is fp8 Triton kernels on CUDA streams
(checked 2026-11-30): neither is what this baseline needs on CPU gloo, so the algorithm is written here.

Every rank calls :meth:`DiLoCo.step` once per inner step; it runs ``inner.step()`` (AdamW in the paper; each rank keeps
its own inner state, never communicated, never reset). Every ``local_steps``-th call (H) ends round ``t`` with the
outer step, a collective:

1. ``theta_out``: the parameters at the start of the round (fp32, identical on every rank);
2. the pseudo-gradient ``delta = theta_out - theta`` (fp32) on every rank;
3. its mean over the N ranks, ``mean = (delta_0 + delta_1 + ... + delta_{N-1}) / N`` (summed in rank order, fp32);
4. the paper's outer step: SGD with Nesterov momentum on ``theta_out`` with gradient ``mean`` (lr 0.7, momentum 0.9;
   ``torch.optim.SGD`` semantics: ``b <- mu*b + mean`` (``b = mean`` in round 1), ``d = mean + mu*b``,
   ``theta_out <- theta_out - lr*d``);
5. every rank's parameters are set to the new ``theta_out`` (cast to their dtype): replicas are bit-identical.

The all-reduce of step 3 is a reduce-scatter + all-gather of encoded payloads (:class:`distlion_ds.comm.shard_exchange.
ShardExchange`): each rank encodes its pseudo-gradient, sends shard r to rank r, rank r decodes the N shards, sums them
in rank order, divides by N, re-encodes its reduced shard and all-gathers it; every rank decodes every reduced shard
(its own too, so replicas agree). ``quantization=None`` sends fp32 bytes (a ring all-reduce's 64(N-1)/N bits per
parameter per round); ``"int8"`` / ``"int4"`` send blockwise absmax codes (:func:`distlion_ds.kernels.quantize`,
round to nearest, one fp32 scale per ``quant_block_size`` elements): ``2(N-1)/N * (bits + 32/block)`` bits per
parameter per round. Both halves are quantised, as INTELLECT-1's int8 ring all-reduce does.

A non-finite pseudo-gradient on any rank (its flag rides on the reduce-scatter) skips the round on every rank: the
all-gather is not run, ``theta_out`` and the outer momentum are untouched, the parameters are reset to ``theta_out``;
counted and logged.

Memory beyond the inner optimizer: three fp32 copies of the parameters (``theta_out``, the pseudo-gradient, the outer
momentum), 12 bytes per parameter.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from distlion_ds.comm import gather_fingerprints, local_checksum
from distlion_ds.comm.shard_exchange import ShardExchange
from distlion_ds.kernels.quantize import MAX_BLOCK_SIZE, dequantize, quantize

from .local_steps import InnerOptimizerView, check_same_parameters

logger = logging.getLogger(__name__)

STATE_KEY = "diloco"
QUANTIZATIONS = {None: 32, "int8": 8, "int4": 4}
# 2**24 fp32 elements (64 MiB) per reduce-scatter: large enough to amortise a slow link's latency, small enough that
# the encode / decode buffers of one bucket stay a fraction of the model.
DEFAULT_BUCKET_NUMEL = 1 << 24


def _hash64(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


class DiLoCo(InnerOptimizerView, torch.optim.Optimizer):
    """DiLoCo's outer loop around a user-built inner optimizer (see the module docstring).

    Args:
        params: the parameters; those with ``requires_grad=True`` must be exactly the ones ``inner`` optimizes.
        inner: the inner optimizer (AdamW in the paper), built on the same parameters; every rank keeps its own.
        local_steps: H >= 1, inner steps per round.
        lr: outer learning rate (> 0; the paper's 0.7).
        momentum: outer momentum in [0, 1) (the paper's 0.9).
        nesterov: Nesterov momentum (the paper's choice; needs ``momentum > 0``).
        quantization: None (fp32 all-reduce), ``"int8"`` or ``"int4"`` (blockwise absmax codes on the wire).
        process_group: the data-parallel group (None: the default group, or one process without torch.distributed).
        quant_block_size: elements per fp32 scale when quantised (a positive multiple of 8, at most 16384).
        bucket_numel: elements per reduce-scatter (rounded to whole shards).

    ``param_groups`` are the inner optimizer's (LR schedulers drive the inner learning rate); the outer learning rate
    is ``self.outer.param_groups[0]["lr"]``.
    """

    def __init__(self, params, inner: torch.optim.Optimizer, local_steps: int, lr: float = 0.7,
                 momentum: float = 0.9, nesterov: bool = True, quantization: str | None = None,
                 process_group=None, *, quant_block_size: int = 256, bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"Invalid local_steps: {local_steps!r} (an int >= 1: inner steps per outer step)")
        if isinstance(lr, bool) or not lr > 0.0:
            raise ValueError(f"Invalid lr: {lr!r} (the outer learning rate, > 0; the paper uses 0.7)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (in [0, 1); the paper uses 0.9)")
        if nesterov and momentum == 0.0:
            raise ValueError("Invalid nesterov=True with momentum=0 (Nesterov needs momentum > 0; pass "
                             "nesterov=False for plain averaging steps)")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"Invalid quantization: {quantization!r} (allowed: None, 'int8', 'int4')")
        if (isinstance(quant_block_size, bool) or not isinstance(quant_block_size, int)
                or not 0 < quant_block_size <= MAX_BLOCK_SIZE or quant_block_size % 8):
            raise ValueError(f"Invalid quant_block_size: {quant_block_size!r} (a positive multiple of 8, at most "
                             f"{MAX_BLOCK_SIZE})")
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel!r} (an int >= 1)")
        if not isinstance(inner, torch.optim.Optimizer) or isinstance(inner, DiLoCo):
            raise ValueError(f"Invalid inner: {type(inner).__name__} (a local torch.optim.Optimizer built on the same "
                             "parameters, e.g. torch.optim.AdamW(model.parameters(), lr=...))")
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [p for g in params for p in g["params"]]
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("DiLoCo: no trainable parameters (requires_grad=True)")
        check_same_parameters("DiLoCo", trainable, inner)
        devices = {p.device for p in trainable}
        if len(devices) != 1:
            raise ValueError(f"DiLoCo: parameters on several devices {sorted(map(str, devices))}; one device only")
        self.inner = inner
        self.local_steps = local_steps
        self.quantization = quantization
        self.bits = QUANTIZATIONS[quantization]
        self.quant_block_size = quant_block_size
        self.exchange = ShardExchange(process_group)
        self.process_group = process_group
        self._params = trainable
        self._numel = sum(p.numel() for p in trainable)
        n = self.exchange.world_size
        unit = n * (quant_block_size if quantization else 1)  # a shard is whole blocks (whole code bytes)
        padded = -(-self._numel // unit) * unit
        cap = max(unit, bucket_numel // unit * unit)
        self._buckets = [(s, min(s + cap, padded)) for s in range(0, padded, cap)]
        device = trainable[0].device
        self._anchor = torch.zeros(padded, dtype=torch.float32, device=device)
        self._delta = torch.zeros(padded, dtype=torch.float32, device=device)
        self._views = []
        off = 0
        for p in trainable:
            self._views.append((p, off))
            off += p.numel()
        with torch.no_grad():
            for p, o in self._views:
                self._anchor[o: o + p.numel()].copy_(p.detach().reshape(-1))
        self._anchor.requires_grad_(True)
        # The paper's outer optimizer, on theta_out as one flat fp32 tensor; its gradient is the averaged delta.
        self.outer = torch.optim.SGD([self._anchor], lr=lr, momentum=momentum, nesterov=nesterov, foreach=False)
        self._inner_steps = 0
        self._rounds = 0
        self._skipped = 0
        self._check_agreement()
        super().__init__([p for g in inner.param_groups for p in g["params"]], {})
        self.defaults = inner.defaults
        self._delegating = True  # param_groups / state: the inner optimizer's (InnerOptimizerView)

    # ------------------------------------------------------------------------------------------ agreement
    def _check_agreement(self) -> None:
        """Every rank must start from the same parameters with the same settings (one small all_gather)."""
        if self.exchange.world_size == 1:
            return
        g = self.outer.param_groups[0]
        settings = {
            "local_steps": self.local_steps, "lr": g["lr"], "momentum": g["momentum"], "nesterov": g["nesterov"],
            "quantization": self.quantization, "quant_block_size": self.quant_block_size,
            "buckets": self._buckets,
            "parameter shapes, dtypes and order": [(tuple(p.shape), str(p.dtype)) for p in self._params],
        }
        values = {k: _hash64(v) for k, v in settings.items()}
        values["parameter values"] = local_checksum(self._params)
        table = gather_fingerprints(values, self.process_group)
        bad = [k for k, per_rank in table.items() if len(set(per_rank)) > 1]
        if bad:
            raise ValueError(f"DiLoCo: the data-parallel ranks disagree on {', '.join(bad)} (per-rank fingerprints: "
                             + "; ".join(f"{k}: {table[k]}" for k in bad) + "). Every rank must build the same model "
                             "from the same seed and pass the same DiLoCo settings")

    # ------------------------------------------------------------------------------------------ codec
    def _encode(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``x`` (fp32, ``rows`` equal shards) as uint8 ``[rows, bytes per shard]``."""
        if self.bits == 32:
            return x.view(torch.uint8).view(rows, -1)
        codes, scales = quantize(x, self.bits, self.quant_block_size)
        return torch.cat([codes.view(rows, -1), scales.view(torch.uint8).view(rows, -1)], dim=1)

    def _decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """One shard's uint8 payload back to fp32 ``[numel]``."""
        if self.bits == 32:
            return payload.clone().view(torch.float32)  # a fresh, 4-byte-aligned copy of the bytes
        n_code = numel * self.bits // 8
        codes = payload[:n_code].contiguous()
        scales = payload[n_code:].clone().view(torch.float32)
        return dequantize(codes, scales, self.bits, self.quant_block_size, numel, torch.float32)

    # ------------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        """One inner step; every ``local_steps``-th call also the outer step (a collective: every rank calls it)."""
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._inner_steps += 1
        if self._inner_steps % self.local_steps == 0:
            self._outer_step(self._inner_steps // self.local_steps)
        return loss

    @torch.no_grad()
    def _outer_step(self, t: int) -> None:
        anchor, delta = self._anchor.detach(), self._delta
        for p, o in self._views:
            torch.sub(anchor[o: o + p.numel()], p.detach().reshape(-1), out=delta[o: o + p.numel()])
        nonfinite = not bool(torch.isfinite(delta).all())
        n = self.exchange.world_size
        mean = torch.empty_like(delta)
        self._rounds += 1
        for s, e in self._buckets:
            shard = (e - s) // n
            recv, skip = self.exchange.scatter(self._encode(delta[s:e], n), nonfinite, t)
            if skip:  # every rank saw every flag on this collective: all take this branch, none gathers
                self._skipped += 1
                logger.warning("DiLoCo: a non-finite pseudo-gradient on at least one rank in round %d; the outer "
                               "step is skipped on every rank and the parameters reset to the start of the round "
                               "(%d rounds skipped so far)", t, self._skipped)
                self._copy_out()
                return
            total = self._decode(recv[0], shard).clone()
            for r in range(1, n):  # rank order: the same sum on every shard owner, whatever the transport did
                total += self._decode(recv[r], shard)
            reduced = total / n
            gathered = self.exchange.gather(self._encode(reduced, 1).view(-1), t)
            for r in range(n):  # the owner decodes its own shard too: replicas get the same bits
                mean[s + r * shard: s + (r + 1) * shard] = self._decode(gathered[r], shard)
        self._anchor.grad = mean
        self.outer.step()
        self._anchor.grad = None
        self._copy_out()

    @torch.no_grad()
    def _copy_out(self) -> None:
        for p, o in self._views:
            p.copy_(self._anchor[o: o + p.numel()].view(p.shape))  # cast to the parameter's dtype on every rank

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------------ stats
    def comm_stats(self) -> dict:
        """Cumulative statistics of this rank (restored with the state dict).

        Returns:
            ``{"steps"`` (inner steps), ``"rounds"`` (outer steps, applied or skipped), ``"params"`` (trainable
            elements), ``"bytes_sent"``, ``"bytes_received"`` (payload bytes handed to / received from other ranks
            in the outer all-reduce), ``"bits_per_param_step"`` (bits sent per parameter per inner step:
            ``2(N-1)/N * (bits + 32/block) / H`` plus the padding and the flag bytes), ``"skipped_steps"``
            (skipped rounds), ``"world_size"``, ``"local_steps"``, ``"quantization"``.
        """
        sent = self.exchange.bytes_sent
        return {
            "steps": self._inner_steps,
            "rounds": self._rounds,
            "params": self._numel,
            "bytes_sent": sent,
            "bytes_received": self.exchange.bytes_received,
            "bits_per_param_step": 8.0 * sent / (self._numel * self._inner_steps) if self._inner_steps else 0.0,
            "skipped_steps": self._skipped,
            "world_size": self.exchange.world_size,
            "local_steps": self.local_steps,
            "quantization": self.quantization,
        }

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Inner state, ``theta_out``, the outer momentum, the position inside the round and the byte counters."""
        return {
            "inner": self.inner.state_dict(),
            STATE_KEY: {
                "local_steps": self.local_steps,
                "quantization": self.quantization,
                "inner_steps": self._inner_steps,
                "rounds": self._rounds,
                "skipped_rounds": self._skipped,
                "bytes_sent": self.exchange.bytes_sent,
                "bytes_received": self.exchange.bytes_received,
                "theta_out": self._anchor.detach().clone(),
                "outer": self.outer.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; resuming mid-round is exact (the model's parameters come from its own
        checkpoint)."""
        if STATE_KEY not in state_dict or "inner" not in state_dict:
            raise ValueError(f"DiLoCo.load_state_dict: not a DiLoCo state dict (missing {STATE_KEY!r} or 'inner')")
        mine = state_dict[STATE_KEY]
        for key in ("local_steps", "quantization"):
            if mine[key] != getattr(self, key):
                raise ValueError(f"DiLoCo: the checkpoint was saved with {key}={mine[key]!r}, this optimizer has "
                                 f"{key}={getattr(self, key)!r}")
        if mine["theta_out"].shape != self._anchor.shape:
            raise ValueError(f"DiLoCo: the checkpoint's theta_out has {mine['theta_out'].numel()} elements, this "
                             f"optimizer {self._anchor.numel()} (another model, world size or block size)")
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            self._anchor.copy_(mine["theta_out"])
        self.outer.load_state_dict(mine["outer"])
        self._inner_steps = int(mine["inner_steps"])
        self._rounds = int(mine["rounds"])
        self._skipped = int(mine["skipped_rounds"])
        self.exchange.bytes_sent = int(mine["bytes_sent"])
        self.exchange.bytes_received = int(mine["bytes_received"])
