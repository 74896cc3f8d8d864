"""Wire bytes per channel, replica checks and ``<out>/summary.json`` of the entry.

Counted channels come from the senders' own counters (D-Lion's vote exchange, the compressed p2p communicator, the
compressed tied-embedding all-reduce). megatron-core's own fp32 all-reduces (the DDP gradient buckets of AdamW, the
uncompressed tied-embedding gradient) are ring estimates, ``2 (N-1)/N x payload`` per rank and iteration.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

import torch.distributed as dist

from distlion_ds.comm import replica_checksum

logger = logging.getLogger(__name__)


def ring_bytes(numel: int, n: int, elem: int = 4) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements over ``n`` ranks."""
    return 2 * (n - 1) * numel * elem // n if n > 1 else 0


def dp_grad_bucket_bytes(chunks: list, dp: int) -> int:
    """Ring bytes of megatron-core's DDP gradient all-reduce per iteration (every bucket of every chunk)."""
    total = 0
    for c in chunks:
        for bg in c.bucket_groups:
            for b in bg.buckets:
                total += ring_bytes(b.grad_data.numel(), dp, b.grad_data.element_size())
    return total


def shared_embedding(chunks: list, pp_first: bool):
    """The word-embedding weight this rank shares with the other end of the pipeline (None when not tied)."""
    module = (chunks[0] if pp_first else chunks[-1]).module
    if not module.share_embeddings_and_output_weights:
        return None
    return module.shared_embedding_or_output_weight()


def identical(params: list, group) -> bool:
    """Bit-identical on every rank of ``group`` (one 8-byte all_gather), checked, not assumed."""
    return len(set(replica_checksum(params, group))) == 1


def p2p_delta(now: dict, start: dict) -> dict:
    return {d: {k: now[d][k] - start[d][k] for k in ("bytes_sent", "elements_sent")}
            for d in ("activations", "gradients")}


def write_summary(args, layout, records: list[dict], start: int, end: int, skipped: int, wall: float) -> dict:
    """Combine every rank's record into ``<args.out>/summary.json`` (rank 0); returns the summary."""
    last = next(r for r in records if r["pp_last"] and r["tp"] == 0 and r["dp"] == 0)

    def total(key):
        values = [r[key] for r in records if r[key] is not None]
        return sum(values) if values else None

    def p2p(direction):
        if records[0]["p2p"] is None:
            return None  # megatron-core's own communicator: uncompressed, not counted
        sent = sum(r["p2p"][direction]["bytes_sent"] for r in records)
        elems = sum(r["p2p"][direction]["elements_sent"] for r in records)
        return {"bytes_sent": sent, "elements_sent": elems, "bytes_per_element": sent / elems if elems else None}

    dlion = None
    if args.distlion:
        bits = [r["dlion_bits"] for r in records]
        dlion = {"bytes_sent": total("dlion"), "bits_per_param_step": sum(bits) / len(bits),
                 "local_steps": args.dlion_local_steps,
                 "early_buckets": total("early_buckets")}
    summary = {
        "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "steps": end - start, "losses": last["losses"],
        "dp_replicas_identical": (None if any(r["dp_ok"] is None for r in records)  # local steps, mid-round
                                  else all(r["dp_ok"] for r in records)),
        "tp_replicated_params_identical": all(r["tp_ok"] for r in records),
        "tied_embeddings_identical": (all(r["tied_ok"] for r in records if r["tied_ok"] is not None)
                                      if any(r["tied_ok"] is not None for r in records) else None),
        "wire": {
            "unit": "bytes sent, summed over all ranks, this invocation",
            "dlion": dlion,
            "p2p_activations": p2p("activations"),
            "p2p_gradients": p2p("gradients"),
            "embedding_allreduce": total("embedding_allreduce") if layout.pp > 1 else None,
            "embedding_allreduce_compressed": args.tied_embedding_compression is not None,
            "dp_allreduce": total("dp_allreduce"),
            "estimated": "embedding_allreduce (when not compressed) and dp_allreduce are fp32 ring estimates",
            "not_counted": "tensor-parallel all-reduces inside layers; loss, norm and check collectives",
        },
        "vp": layout.vp, "world_size": layout.world, "optimizer": "distlion" if args.distlion else "adam",
        "aggregation": args.dlion_aggregation if args.distlion else None,
        "p2p_compression": args.p2p_compression, "tied_embedding_compression": args.tied_embedding_compression,
        "overlap_grad_reduce": args.overlap_grad_reduce, "start_iteration": start, "end_iteration": end,
        "train_iters": args.train_iters, "global_batch_size": layout.global_batch,
        "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
        "params": sum(r["params"] for r in records), "eval": last["evals"], "skipped_steps": skipped,
        "wall_s": wall,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s: dp_replicas_identical=%s tied_embeddings_identical=%s", out / "summary.json",
                summary["dp_replicas_identical"], summary["tied_embeddings_identical"])
    return summary


def gather_records(record: dict) -> list[Any]:
    """Every rank's record (all_gather_object over the world)."""
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records


def all_ok(records: list[dict]) -> bool:
    """Replicas and tied copies identical, every logged loss finite."""
    ok = all(r["dp_ok"] is not False and r["tp_ok"] and r["tied_ok"] is not False for r in records)
    return ok and all(math.isfinite(x) for r in records if r["pp_last"] for x in r["losses"])
