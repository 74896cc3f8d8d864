"""GPT-style decoder models for the slow-network benchmark: whole, split into pipeline stages, tensor-parallel.

Pre-LN blocks (causal self-attention + 4x MLP with GELU), learned position embeddings, an untied LM head: the
parameter layout of GPT-2, at sizes a 2-core CPU can step. Megatron-style tensor parallelism (column-parallel
QKV / fc1, row-parallel proj / fc2, one all-reduce after each row-parallel layer forward and one before each
column-parallel layer backward) when a TP group is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int

    def n_params(self) -> int:
        d = self.d_model
        block = 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 (+ biases) and two LayerNorms
        return 2 * self.vocab * d + self.seq_len * d + self.n_layers * block + 2 * d


# ~10M and ~55M parameters (the issue's ~10M / ~50M); gpt2m for the smoke test; "pp" for the pipeline scenario: one
# block per stage and a small vocabulary, so the stages' compute stays near the transfer time of its
# [128, 8, 512] activations (2 MiB in fp32) instead of dwarfing it on a 2-core CPU.
MODELS = {
    "gpt10m": GPTConfig(vocab=8192, d_model=256, n_layers=8, n_heads=4, seq_len=64),
    "gpt50m": GPTConfig(vocab=16384, d_model=512, n_layers=12, n_heads=8, seq_len=64),
    "gpt2m": GPTConfig(vocab=2048, d_model=128, n_layers=4, n_heads=4, seq_len=32),
    "pp": GPTConfig(vocab=2048, d_model=512, n_layers=2, n_heads=8, seq_len=128),
}


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, tp_group=None):
        super().__init__()
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        if cfg.n_heads % tp or (4 * cfg.d_model) % tp:
            raise ValueError(f"heads {cfg.n_heads} / mlp {4 * cfg.d_model} not divisible by tp={tp}")
        d = cfg.d_model
        self.tp_group = tp_group
        self.heads = cfg.n_heads // tp
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d // tp)
        self.proj = nn.Linear(d // tp, d, bias=tp_group is None)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d // tp)
        self.fc2 = nn.Linear(4 * d // tp, d, bias=tp_group is None)
        if tp_group is not None:  # row-parallel biases are added once, after the reduction
            self.proj_bias = nn.Parameter(torch.zeros(d))
            self.fc2_bias = nn.Parameter(torch.zeros(d))

    def _in(self, x):
        return _CopyToTP.apply(x, self.tp_group) if self.tp_group is not None else x

    def _out(self, x, bias_name: str):
        if self.tp_group is None:
            return x
        return _ReduceFromTP.apply(x, self.tp_group) + getattr(self, bias_name)

    def forward(self, x):  # x: [seq, batch, d] (megatron's layout)
        s, b, d = x.shape
        q, k, v = self.qkv(self._in(self.ln1(x))).view(s, b, 3, self.heads, -1).permute(2, 1, 3, 0, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, s, hd]
        x = x + self._out(self.proj(a.permute(2, 0, 1, 3).reshape(s, b, -1)), "proj_bias")
        return x + self._out(self.fc2(F.gelu(self.fc1(self._in(self.ln2(x))))), "fc2_bias")


class GPTStage(nn.Module):
    """Layers ``[first, last)`` of a GPT; the first stage embeds tokens, the last one returns the LM loss.

    Args:
        cfg: model shape.
        first, last: the block range of this stage.
        tp_group: tensor-parallel group (None: no TP). Embedding and head are replicated across TP ranks
            (their gradients are identical there, as in Megatron with a vocab-parallel-free setup).
    """

    def __init__(self, cfg: GPTConfig, first: int = 0, last: int | None = None, tp_group=None):
        super().__init__()
        last = cfg.n_layers if last is None else last
        self.cfg = cfg
        self.is_first = first == 0
        self.is_last = last == cfg.n_layers
        if self.is_first:
            self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, tp_group) for _ in range(first, last))
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, x, targets=None):
        """First stage: ``x`` = tokens [batch, seq]; others: hidden [seq, batch, d]. Last stage returns the loss."""
        if self.is_first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = (self.tok(x) + self.pos(pos)).transpose(0, 1).contiguous()
        for blk in self.blocks:
            x = blk(x)
        if self.is_last:
            logits = self.head(self.ln_f(x))  # [seq, batch, vocab]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.transpose(0, 1).reshape(-1))
        return x


def token_batch(cfg: GPTConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[batch, seq]``: random tokens (step and wire time do not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(cfg.vocab, (batch, cfg.seq_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]
