"""Compressed tied-embedding gradient all-reduce inside megatron-core's ``finalize_model_grads`` (issue 11, item 3).

With tied word embeddings the first and the last pipeline stage each hold a copy of the embedding matrix, and
megatron-core's ``finalize_model_grads`` sums the two copies' gradients with an fp32 ``all_reduce`` over the
embedding group. That all-reduce crosses the pipeline's slow link and is the largest channel of a 3D run (issue 11:
83.9 MB a step against 3.7 MB of D-Lion votes). Here it is replaced, opt-in, by an exchange of codec payloads:

1. each rank of the embedding group encodes ``x = g + e`` (its gradient plus its error-feedback residual ``e``; with
   ``feedback: none`` just ``g``) with one of our codecs (``distlion_ds.compress``: ``topk`` / ``quantize`` /
   ``none``);
2. one ``all_gather`` of the fixed-size payloads (its size is a pure function of shape, dtype and config, DESIGN 3.4);
3. every rank decodes every payload and adds them in group-rank order in fp32, so both copies receive the same
   bits (same bytes, same decode, same order of additions); with EF the rank keeps ``e <- x - D(C(x))``
   (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD", Alg. 2).

With ``method: none`` the result equals megatron-core's fp32 all-reduce bit for bit on a group of two (fp32
addition of two values is commutative; a test pins it against megatron's own step).

Seam: :func:`finalize_model_grads_with` returns a callable with ``finalize_model_grads``'s signature that runs
megatron-core's own ``finalize_model_grads`` (DP sync, conditional embedders, layernorm / TP grads, position
embeddings, MoE bias, token scaling: unchanged and in its order) and swaps only the word-embedding step:
``finalize_model_grads`` looks ``_allreduce_word_embedding_grads`` up as a module global at call time, and the
callable rebinds that name for the duration of the call (restored in ``finally``). Which model chunk and weight
the step reduces is megatron-core's own choice: :func:`_compressed_word_embedding_grads` hands megatron's
``_allreduce_embedding_grad`` a weight getter that records the weight and returns None, which makes megatron return
before its all-reduce. Every private name and signature used here is pinned by tests/test_megatron_tied.py
(identical in megatron-core 0.16.1 and 0.19.0).

State: the EF residual (fp32, this rank's own) and the transfer counter (stochastic-rounding seeds) live in a
:class:`TiedEmbeddingState` outside the callable, so a new callable (or a resumed run) continues them; its
``state_dict`` / ``load_state_dict`` carry them through a checkpoint (``sharded_state_dict`` for
``megatron.core.dist_checkpointing``: one object per rank). ``comm_stats()`` counts the bytes per channel.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ValidationError

from distlion_ds.comm import gather_fingerprints, run_collective
from distlion_ds.compress import build_codec
from distlion_ds.compress.codecs import Codec, Provider, available_codecs
from distlion_ds.compress.config import (
    NoneCodecConfig,
    QuantizeCodecConfig,
    TopKCodecConfig,
    format_validation_error,
)

logger = logging.getLogger(__name__)

__all__ = ["CompressedFinalizeModelGrads", "TiedEmbeddingCompressor", "TiedEmbeddingState",
           "finalize_model_grads_with", "tied_embedding_config"]

TiedCodecConfig = NoneCodecConfig | TopKCodecConfig | QuantizeCodecConfig
CHANNEL = "word_embeddings"  # the comm_stats / state key of the tied word-embedding gradient
SHARDED_KEY = "distlion.tied_embedding_compression.state"  # dist_checkpointing key of TiedEmbeddingState
_FEEDBACK = ("none", "ef")
_CONFIG_CLASSES: dict[str, type[BaseModel]] = {c.model_fields["method"].default: c
                                               for c in (NoneCodecConfig, TopKCodecConfig, QuantizeCodecConfig)}
# torch 2.13 names it all_gather_single; older releases only all_gather_into_tensor (same arguments).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_FMG_MODULE = "megatron.core.distributed.finalize_model_grads"


def _fmg():
    # The module, not the package attribute: megatron.core.distributed re-exports the *function* under that name.
    return importlib.import_module(_FMG_MODULE)


def tied_embedding_config(source: str | os.PathLike | dict | BaseModel, *,
                          key: str = "tied_embedding_compression") -> TiedCodecConfig:
    """The codec section for the tied-embedding all-reduce, validated.

    Same keys as one codec section of a compression config (DESIGN 3.3), e.g.
    ``{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}`` or
    ``{"method": "topk", "ratio": 0.05, "feedback": "ef"}``; ``feedback`` is ``none`` or ``ef`` (EF21 / AQ-SGD have
    no meaning for a gradient summed by all ranks).

    Args:
        source: a dict, a JSON document, the path of a JSON file, or a codec config model.
        key: the name the errors give this section (a flag or a config key).

    Returns:
        The frozen codec config.

    Raises:
        ValueError: unreadable file, invalid JSON, unknown method or key, a value out of range, or a feedback other
            than none / ef; the message names ``key`` (and the file), the value and what is allowed.
    """
    source_name = None
    if isinstance(source, BaseModel):
        data: Any = source.model_dump()
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if isinstance(text, str) and text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}: invalid JSON document: {e}") from None
        elif os.path.isfile(text):
            source_name = str(text)
            with open(text, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{key}: {text}: invalid JSON: {e}") from None
        else:
            raise ValueError(f"{key}: {text!r} is neither a JSON document nor an existing file (give e.g. "
                             '\'{"method": "quantize", "bits": 8, "block_size": 256, "feedback": "ef"}\' or a path)')
    else:
        raise ValueError(f"{key}: expected a dict, a JSON document or a file path, got {source!r} "
                         f"({type(source).__name__})")
    where = f"{key} ({source_name})" if source_name else key
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a JSON object, got {data!r}")
    method = data.get("method", "none")
    cls = _CONFIG_CLASSES.get(method)
    if cls is None:
        raise ValueError(f"{where}.method: unknown codec {method!r}; allowed: {', '.join(available_codecs())}")
    try:
        config = cls.model_validate(data)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, what="tied-embedding compression", source=source_name,
                                                 prefix=key)) from None
    if config.feedback not in _FEEDBACK:
        raise ValueError(f"{where}.feedback: {config.feedback!r} is not available for the tied-embedding all-reduce; "
                         f"allowed: {', '.join(_FEEDBACK)}")
    return config


class TiedEmbeddingState:
    """This rank's error-feedback residuals and transfer counters, per channel; outlives any callable.

    Checkpoint policy: :meth:`state_dict` holds the residuals (fp32, this rank's own: the two ends of the embedding
    group hold different ones) and the counters (they seed stochastic rounding), everything a resumed run needs to
    equal an uninterrupted one. Byte counters (``comm_stats``) are measurements of this process and are not saved.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}
        self.transfers: dict[str, int] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def residual(self, channel: str, like: torch.Tensor) -> torch.Tensor:
        """The channel's fp32 residual shaped as ``like`` (zeros on first use)."""
        r = self.residuals.get(channel)
        if r is None:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        if tuple(r.shape) != tuple(like.shape):
            raise ValueError(f"tied-embedding EF residual of {channel!r} has shape {tuple(r.shape)}, the gradient "
                             f"{tuple(like.shape)}: the state belongs to another model (load the matching checkpoint "
                             "or start from a fresh TiedEmbeddingState)")
        return r.to(like.device)

    def next_transfer(self, channel: str) -> int:
        n = self.transfers.get(channel, 0)
        self.transfers[channel] = n + 1
        return n

    def count(self, channel: str, **amounts: int) -> None:
        s = self.stats.setdefault(channel, {"bytes_sent": 0, "bytes_received": 0, "elements_sent": 0,
                                            "transfers": 0, "fp32_allreduce_bytes": 0})
        for k, v in amounts.items():
            s[k] += v

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.detach().cpu().clone() for k, v in sorted(self.residuals.items())},
                "transfers": dict(sorted(self.transfers.items()))}

    def sharded_state_dict(self, key: str = SHARDED_KEY):
        """This rank's state as a ``megatron.core.dist_checkpointing`` ``ShardedObject`` (one shard per global rank:
        every rank saves and loads its own; loading needs the same world size, else dist_checkpointing refuses the
        global shape).

        Args:
            key: the checkpoint key.

        Returns:
            The ``ShardedObject``; after ``dist_checkpointing.load`` its place in the returned dict holds the saved
            state, to hand to :meth:`load_state_dict`.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        return ShardedObject(key, self.state_dict(), (world,), (rank,), replica_id=0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"residuals", "transfers"}
        if unknown:
            raise ValueError(f"TiedEmbeddingState.load_state_dict: unknown key(s) {sorted(unknown)}; "
                             "allowed: residuals, transfers")
        self.residuals = {k: v.float().clone() for k, v in state["residuals"].items()}
        self.transfers = {k: int(v) for k, v in state["transfers"].items()}


class TiedEmbeddingCompressor:
    """The compressed sum of one tensor over a group: encode, ``all_gather`` payloads, decode all, add in rank order.

    Args:
        config: codec section (anything :func:`tied_embedding_config` accepts).
        state: where residuals and counters live (a new one when None).
        provider: codec kernels: ``auto`` (Triton on CUDA) or ``torch`` (the references).
    """

    def __init__(self, config: Any, state: TiedEmbeddingState | None = None, provider: Provider = "auto"):
        self.config = tied_embedding_config(config)
        self.codec: Codec = build_codec(self.config, provider=provider)
        self.state = state if state is not None else TiedEmbeddingState()
        self._agreed: set[tuple[Any, ...]] = set()

    @property
    def feedback(self) -> bool:
        return self.config.feedback == "ef"

    def wire_dtype(self, grad: torch.Tensor) -> torch.dtype:
        """The dtype that is encoded: fp32 with EF (g + e is an fp32 value), else the gradient's own."""
        return torch.float32 if self.feedback else grad.dtype

    def payload_bytes(self, grad: torch.Tensor) -> int:
        """Bytes one rank's payload has for ``grad`` (a pure function of shape, dtype and config)."""
        return self.codec.nbytes(grad.shape, self.wire_dtype(grad))

    def _agree(self, grad: torch.Tensor, group) -> None:
        """Once per (group, shape, dtype): every rank must use the same codec config, shape and dtype, else the
        payload sizes differ (a hang or garbage on NCCL). One all_gather of three int64; a mismatch raises on every
        rank naming the ranks and their settings."""
        key = (id(group), tuple(grad.shape), grad.dtype)
        if key in self._agreed:
            return
        config_json = self.config.model_dump_json()
        mine = {"config": zlib.crc32(config_json.encode()), "numel": grad.numel(),
                "dtype": zlib.crc32(str(grad.dtype).encode())}
        table = gather_fingerprints(mine, group)
        bad = [name for name, values in table.items() if len(set(values)) > 1]
        if bad:
            from distlion_ds.comm import gather_objects

            settings = gather_objects((config_json, tuple(grad.shape), str(grad.dtype)), group)
            lines = "; ".join(f"group rank {r}: config {c}, shape {s}, dtype {d}" for r, (c, s, d) in
                              enumerate(settings))
            raise ValueError(f"tied-embedding compression: the embedding group disagrees on {', '.join(bad)} "
                             f"({lines}); give every rank the same --tied-embedding-compression")
        self._agreed.add(key)

    def all_reduce_(self, grad: torch.Tensor, group, channel: str = CHANNEL) -> torch.Tensor:
        """Replace ``grad`` by the sum over ``group`` of every rank's decoded payload (in place).

        Args:
            grad: this rank's gradient (contiguous; fp32, bf16 or fp16).
            group: the process group (megatron-core's embedding group).
            channel: the name of the stream (residual, counter and statistics key).

        Returns:
            ``grad``, now identical on every rank of ``group``.
        """
        if not grad.is_contiguous():
            raise ValueError(f"tied-embedding all-reduce needs a contiguous gradient, got strides {grad.stride()}")
        n = dist.get_world_size(group)
        me = dist.get_rank(group)
        self._agree(grad, group)
        if self.feedback:
            x = grad.float() + self.state.residual(channel, grad)
        else:
            x = grad
        count = self.state.next_transfer(channel)
        # Distinct per rank of the group and per transfer, reproducible across a resume (the counter is saved).
        seed = (count * 1_000_003 + me * 7919 + zlib.crc32(channel.encode())) % (2**31 - 1)
        nbytes = self.payload_bytes(grad)
        payload = self.codec.encode(x, seed=seed)
        gathered = torch.empty(n * nbytes, dtype=torch.uint8, device=grad.device)
        run_collective(f"all_gather of the tied-embedding payload ({nbytes} B, {channel})",
                       lambda: _all_gather_single(gathered, payload, group=group), step=None, group=group)
        wire = self.wire_dtype(grad)
        total: torch.Tensor | None = None
        mine: torch.Tensor | None = None
        for r in range(n):  # group-rank order on every rank: the same fp32 additions, the same bits
            part = self.codec.decode(gathered[r * nbytes:(r + 1) * nbytes], grad.shape, wire).float()
            if r == me:
                mine = part
            total = part.clone() if total is None else total.add_(part)
        if self.feedback:
            assert mine is not None
            self.state.residuals[channel] = (x - mine).detach()
        grad.copy_(total)
        # Bytes this rank hands to / receives from the others (DESIGN 3.3): its payload reaches n - 1 ranks and it
        # receives n - 1 payloads. The fp32 ring all-reduce megatron-core would run sends 2 (n - 1) / n * 4 B/element.
        self.state.count(channel, bytes_sent=nbytes * (n - 1), bytes_received=nbytes * (n - 1),
                         elements_sent=grad.numel() * (n - 1), transfers=1,
                         fp32_allreduce_bytes=math.ceil(2 * (n - 1) * grad.numel() * 4 / n))
        return grad

    def comm_stats(self) -> dict[str, Any]:
        """Cumulative for this rank: ``{"bytes_sent", "bytes_received", <channel>: {"bytes_sent", "bytes_received",
        "elements_sent", "transfers", "fp32_allreduce_bytes"}}`` (``fp32_allreduce_bytes``: what megatron-core's
        uncompressed ring all-reduce would have sent for the same transfers)."""
        out: dict[str, Any] = {"bytes_sent": 0, "bytes_received": 0}
        for channel, s in sorted(self.state.stats.items()):
            out[channel] = dict(s)
            out["bytes_sent"] += s["bytes_sent"]
            out["bytes_received"] += s["bytes_received"]
        return out


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has none to refuse
        return False
    return isinstance(t, DTensor)


def _compressed_word_embedding_grads(model, config, embd_group=None, pp_group=None, *,
                                     compressor: TiedEmbeddingCompressor) -> None:
    """Drop-in for megatron-core's ``_allreduce_word_embedding_grads(model, config, embd_group, pp_group)``."""
    from megatron.core import parallel_state

    fmg = _fmg()
    if embd_group is None:
        embd_group = parallel_state.get_embedding_group(check_initialized=False)
    if pp_group is None:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
    chosen: list[torch.nn.Parameter] = []

    def record(module):
        # megatron-core picks the chunk (first / last stage, MTP) and checks the group; returning None makes it skip
        # its own all-reduce, so the choice stays megatron's and the reduction ours.
        weight = fmg._get_shared_word_embedding_weight(module, config)
        if weight is not None:
            chosen.append(weight)
        return None

    fmg._allreduce_embedding_grad(model, embd_group, pp_group, record, config=config)
    if not chosen:
        return
    weight = chosen[0]
    grad_attr = fmg._get_main_grad_attr(weight)
    grad = getattr(weight, grad_attr)
    if grad is None:  # a frozen embedding (megatron-core skips it too)
        return
    if _is_dtensor(grad):
        raise NotImplementedError("tied-embedding compression does not support FSDP / DTensor gradients; "
                                  "drop --tied-embedding-compression with megatron FSDP")
    compressor.all_reduce_(grad, embd_group, CHANNEL)


@contextlib.contextmanager
def _word_embedding_step(compressor: TiedEmbeddingCompressor) -> Iterator[None]:
    fmg = _fmg()
    previous = fmg._allreduce_word_embedding_grads

    def step(model, config, embd_group=None, pp_group=None):
        _compressed_word_embedding_grads(model, config, embd_group, pp_group, compressor=compressor)

    fmg._allreduce_word_embedding_grads = step
    try:
        yield
    finally:
        fmg._allreduce_word_embedding_grads = previous


class CompressedFinalizeModelGrads:
    """megatron-core's ``finalize_model_grads`` with the tied word-embedding all-reduce compressed.

    Set it as ``config.finalize_model_grads_func`` (megatron-core's schedules call it after the last backward),
    or let :func:`distlion_ds.megatron.install_megatron_lm` put it in Megatron-LM's ``train()``.

    Args:
        compression: the codec section (anything :func:`tied_embedding_config` accepts).
        state: residuals and counters; pass the same one to a new instance (or load a checkpoint's) to continue.
        finalize: the ``finalize_model_grads`` to run (default: megatron-core's own).
        provider: codec kernels (``auto`` | ``torch``).
    """

    def __init__(self, compression: Any, *, state: TiedEmbeddingState | None = None, finalize=None,
                 provider: Provider = "auto"):
        self.compressor = TiedEmbeddingCompressor(compression, state, provider=provider)
        self._finalize = finalize if finalize is not None else _fmg().finalize_model_grads

    @property
    def state(self) -> TiedEmbeddingState:
        return self.compressor.state

    def __call__(self, model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        """Same arguments as megatron-core's ``finalize_model_grads``; runs it with the compressed embedding step."""
        with _word_embedding_step(self.compressor):
            return self._finalize(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    def comm_stats(self) -> dict[str, Any]:
        """See :meth:`TiedEmbeddingCompressor.comm_stats`."""
        return self.compressor.comm_stats()


def finalize_model_grads_with(compression: Any, *, state: TiedEmbeddingState | None = None,
                              provider: Provider = "auto"):
    """A ``finalize_model_grads`` whose tied word-embedding all-reduce uses ``compression`` (None: megatron's own).

    Args:
        compression: the codec section (see :func:`tied_embedding_config`), or None for megatron-core's function.
        state: a :class:`TiedEmbeddingState` to continue (default: a new one).
        provider: codec kernels (``auto`` | ``torch``).

    Returns:
        A callable with ``finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False)``'s
        signature; a :class:`CompressedFinalizeModelGrads` (``.comm_stats()``, ``.state``) unless ``compression`` is
        None.
    """
    if compression is None:
        return _fmg().finalize_model_grads
    return CompressedFinalizeModelGrads(compression, state=state, provider=provider)
