"""Data of the entry: the SentencePiece corpus of :mod:`distlion_ds.data` (rank 0 prepares the stdlib corpus when
missing), megatron-core ``GPTDataset`` micro-batches in Megatron-LM's sampler order, the forward step and the loss."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from functools import partial

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def prepare_data(args) -> dict:
    """The corpus metadata plus ``tokenizer_pieces``; rank 0 prepares the stdlib corpus when the folder is empty."""
    from distlion_ds.data import prepare

    root = pathlib.Path(args.data_path)
    if dist.get_rank() == 0 and not (root / "meta.json").exists():
        logger.info("%s has no prepared data: preparing the stdlib corpus there", root)
        prepare(corpus="stdlib", out=str(root))
    dist.barrier()
    meta = json.loads((root / "meta.json").read_text())
    tok = args.tokenizer_model or str(root / "tokenizer.model")
    if not os.path.exists(tok):
        raise FileNotFoundError(f"--tokenizer-model {tok} does not exist")
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=tok).get_piece_size()
    if n < meta["vocab_size_actual"]:
        raise ValueError(f"--tokenizer-model {tok} has {n} pieces, but {root} was tokenised with "
                         f"{meta['vocab_size_actual']}: not the tokenizer of this data")
    meta["tokenizer_pieces"] = n
    return meta


class Batches:
    """Micro-batches of one DP rank, by global sample index (Megatron-LM's ``MegatronPretrainingSampler`` order:
    micro-batch m of iteration i holds samples ``i*G + m*mbs*dp + rank*mbs + [0, mbs)``). Stateless, so a resumed
    run reads exactly what an uninterrupted one would."""

    def __init__(self, dataset, layout, micro: int, dp_rank: int, epoch_len: int, device):
        self.ds, self.layout, self.micro, self.dp_rank = dataset, layout, micro, dp_rank
        self.epoch_len, self.device = epoch_len, device

    def first_sample(self, iteration: int) -> int:
        return iteration * self.layout.global_batch

    def iterator(self, iteration: int, needed: bool):
        lay = self.layout
        for m in range(lay.num_micro):
            if not needed:  # a middle pipeline stage reads no data
                yield None
                continue
            first = iteration * lay.global_batch + (m * lay.dp + self.dp_rank) * self.micro
            ids = [(first + j) % self.epoch_len for j in range(self.micro)]
            samples = [self.ds[i] for i in ids]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(self.device)
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            batch["ids"] = torch.tensor(ids)
            yield batch


def forward_step(data_iterator, model, *, aqsgd: bool):
    """megatron-core's ``forward_step_func``: ``(output, loss_func)`` for one micro-batch."""
    from distlion_ds.megatron import set_sample_ids

    batch = next(data_iterator)
    if batch is None:
        return model(None, None, None), _loss_func_unreachable
    inner = getattr(model, "module", model)  # the GPTModel inside megatron-core's DDP
    if aqsgd and inner.pre_process:
        set_sample_ids(batch["ids"])  # AQ-SGD keys its per-sample buffers by dataset index
    output = model(batch["tokens"], batch["position_ids"], None,
                   labels=batch["labels"] if inner.post_process else None)
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """Masked mean over the micro-batch (megatron-core divides by the number of micro-batches)."""
    mask = loss_mask.float()
    loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # A copy: megatron-core divides the returned loss in place by the number of micro-batches, and a detached view
    # would share that storage (the logged loss came out halved at 2 micro-batches).
    return loss, {"lm loss": loss.detach().clone()}


def _loss_func_unreachable(_):
    raise RuntimeError("a middle pipeline stage computed a loss: the data iterator gave it no labels")
