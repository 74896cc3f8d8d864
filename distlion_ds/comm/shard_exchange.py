"""Reduce-scatter + all-gather of encoded byte payloads, for outer optimizers that reduce a (quantised) tensor.

DiLoCo-style outer steps all-reduce one pseudo-gradient per round. A quantised all-reduce cannot sum codes on the
wire (int8 codes of different scales do not add), so it is done the way INTELLECT-1 and Streaming DiLoCo do it:

1. :meth:`ShardExchange.scatter`: every rank splits its encoded payload into N chunks (chunk r encodes shard r of the
   tensor) and ``all_to_all_single`` sends chunk r to rank r; one extra byte rides on every chunk, the sender's
   non-finite flag, so every rank learns every rank's flag from the same collective (no extra latency);
2. the caller decodes the N chunks of its shard, sums them in fp32 and re-encodes the reduced shard;
3. :meth:`ShardExchange.gather`: ``all_gather`` of the reduced shards; every rank decodes all of them.

Each rank sends ``(N-1)`` chunks in each phase, ``2(N-1)/N`` of a payload per round (a ring all-reduce's volume),
and the byte counters add exactly the bytes handed to the collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .vote_exchange import _all_gather_single, _group_size_rank, host_flag, run_collective


class ShardExchange:
    """Moves per-shard uint8 payloads between the ranks of ``group`` and counts the bytes.

    Args:
        group: the data-parallel process group (None = the default group, or a single process when
            torch.distributed is not initialized).
    """

    def __init__(self, group=None):
        self.group = group
        self.world_size, self.rank = _group_size_rank(group)
        self.bytes_sent = 0
        self.bytes_received = 0

    def scatter(self, chunks: torch.Tensor, nonfinite: bool, step: int) -> tuple[torch.Tensor, bool]:
        """All-to-all of ``chunks`` (uint8 ``[N, c]``, row r for rank r) with this rank's flag on every row.

        Args:
            chunks: uint8 ``[N, c]``; row r is what rank r receives from this rank.
            nonfinite: this rank's flag (a non-finite value somewhere in what it encodes).
            step: the round (error messages).

        Returns:
            ``(recv, any_nonfinite)``: ``recv`` uint8 ``[N, c]`` (row s: rank s's chunk of this rank's shard) and
            whether any rank raised its flag (the same answer on every rank).
        """
        n = self.world_size
        if chunks.dim() != 2 or chunks.shape[0] != n or chunks.dtype != torch.uint8:
            raise ValueError(f"chunks must be uint8 [{n}, c], got {chunks.dtype} {tuple(chunks.shape)}")
        if n == 1:
            return chunks, nonfinite
        c = chunks.shape[1]
        send = torch.empty(n, c + 1, dtype=torch.uint8, device=chunks.device)
        send[:, :c].copy_(chunks)
        send[:, c] = int(bool(nonfinite))
        recv = torch.empty_like(send)
        run_collective(f"all_to_all_single of the pseudo-gradient ({send.numel()} B)",
                       lambda: dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.group),
                       step=step, group=self.group, unit="round")
        self.bytes_sent += (n - 1) * (c + 1)
        self.bytes_received += (n - 1) * (c + 1)
        return recv[:, :c], host_flag(recv[:, c])

    def gather(self, mine: torch.Tensor, step: int) -> torch.Tensor:
        """All-gather of this rank's reduced shard (uint8 ``[c]``); returns uint8 ``[N, c]`` in rank order."""
        n = self.world_size
        if mine.dtype != torch.uint8 or mine.dim() != 1:
            raise ValueError(f"mine must be 1-D uint8, got {mine.dtype} {tuple(mine.shape)}")
        if n == 1:
            return mine.view(1, -1)
        out = torch.empty(n, mine.numel(), dtype=torch.uint8, device=mine.device)
        run_collective(f"all_gather of the reduced pseudo-gradient ({mine.numel()} B)",
                       lambda: _all_gather_single(out.view(-1), mine.contiguous(), group=self.group),
                       step=step, group=self.group, unit="round")
        self.bytes_sent += (n - 1) * mine.numel()
        self.bytes_received += (n - 1) * mine.numel()
        return out
