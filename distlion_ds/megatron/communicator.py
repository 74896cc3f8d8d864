"""``CompressedP2PCommunicator``: megatron-core's ``P2PCommunicator`` with compressed activations and gradients.

The seam is ``_communicate`` (DESIGN section 4): every public send/recv method of the parent funnels into it,
so overriding it covers the 1F1B and interleaved schedules, batched and unbatched p2p, overlapped p2p (the wait
handles decode on ``wait()``) and ``variable_seq_lengths`` (the parent's shape exchange runs first). Per call and
direction exactly one uint8 frame travels (distlion_ds.compress.pipe: header + codec body), whose size the
receiver computes from (shape, dtype, config, mode) before anything arrives. Received tensors are fresh leaves
with ``requires_grad=True``, as the schedules expect.

Which cut a tensor crosses matters only for stateful feedback (EF, EF21, AQ-SGD). A rank knows its pipeline stage;
with interleaving it also needs the model chunk, which ``_communicate`` is not told. The receiver learns it from
the frame header; the sender finds it from the tensor itself:

- forward: the output was computed from an input this communicator received (a leaf tagged with the header it
  came with), found by walking the output's autograd graph; no tagged leaf means virtual stage 0. Without
  interleaving the forward sends leave a stage in the order its inputs arrived, so a FIFO suffices.
- backward: the gradient is ``leaf.grad`` of such an input; a post-accumulate-grad hook tags it.

AQ-SGD sample ids enter at the first stage through :func:`set_sample_ids` and ride in the headers from there.

Agreement before traffic (frames have sizes both sides compute; NCCL needs them equal): at construction the
communicator compares the compression settings, the pipeline dtype and ``variable_seq_lengths`` across the
pipeline group once per state (an ``all_gather_object``), and with AQ-SGD every :meth:`set_epoch` compares the
epoch (warm-up and delta frames differ in size). A mismatch raises on every rank, naming the setting and the ranks.
No host sync per frame otherwise: receivers name the cut they expect whenever they know it (1F1B), so the header is
checked on the device; see distlion_ds.compress.pipe.

State lifetime: a communicator holds its ``CompressionState``; communicators built without ``state=`` share the
live state of an equal config (a weak registry), and ``install()`` holds one until ``uninstall()``. Nothing keeps a
state alive once its owners are gone.
"""

from __future__ import annotations

import collections
import copy
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, _batched_p2p_ops, _p2p_ops

from distlion_ds.comm import wait_work
from distlion_ds.compress import CompressionConfig, CompressionState, FrameInfo, Mode, PipeCompressor
from distlion_ds.compress.codecs import Provider
from distlion_ds.compress.pipe import find_disagreements

logger = logging.getLogger(__name__)

_META = "_distlion_p2p_info"  # attribute on received leaves and on their gradients: the FrameInfo of the cut
# Weak: a state lives as long as a communicator or install() holds it (issue 9: freed with its owner).
_STATES: weakref.WeakValueDictionary[str, CompressionState] = weakref.WeakValueDictionary()
_PENDING_IDS: list[tuple[int, ...]] = []


def set_sample_ids(ids: Sequence[int] | torch.Tensor) -> None:
    """Hand the sample ids of the micro-batch being run to the pipeline (AQ-SGD needs them).

    Call it in your ``forward_step`` on the first pipeline stage, where the batch is loaded, with one integer id
    per sample of the micro-batch (e.g. the dataset index). The next forward send of virtual stage 0 takes
    them; every later stage reads them from the frame header, so intermediate stages need no data.

    Args:
        ids: one id per sample, in the micro-batch order (tensor or sequence of ints).
    """
    ids = ids.tolist() if torch.is_tensor(ids) else ids
    _PENDING_IDS[:] = [tuple(int(i) for i in ids)]


def _take_pending_ids() -> tuple[int, ...] | None:
    return _PENDING_IDS.pop() if _PENDING_IDS else None


def compression_state(compression: CompressionConfig | dict | str) -> CompressionState:
    """The live shared state for a config: communicators built with an equal config and no ``state=`` share it,
    because megatron-core may build a new communicator per ``forward_backward`` call while EF / AQ-SGD state must
    last. Held weakly: it is freed when no communicator (nor ``install()``, nor the caller) holds it any more, so
    keep a communicator or pass ``state=`` to keep feedback state across calls."""
    config = CompressionConfig.from_json(compression)
    key = config.model_dump_json()
    state = _STATES.get(key)
    if state is None:
        state = CompressionState(config)
        _STATES[key] = state
        if config.activations.feedback != "none" or config.gradients.feedback != "none":
            logger.info("distlion_ds: new shared p2p compression state (feedback state starts at zero); it lives "
                        "while a communicator, install() or the caller holds it")
    return state


def _rank_tag() -> str:
    """This rank's coordinates for per-rank files (AQ-SGD disk store): pipeline, data- and tensor-parallel rank."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        tag = f"pp{ps.get_pipeline_model_parallel_rank()}-dp{ps.get_data_parallel_rank()}"
        if ps.get_tensor_model_parallel_world_size() > 1:
            tag += f"-tp{ps.get_tensor_model_parallel_rank()}"
        if ps.get_context_parallel_world_size() > 1:
            tag += f"-cp{ps.get_context_parallel_rank()}"
        return tag
    return f"rank{dist.get_rank()}"  # groups built by hand: the global rank is unique


class _DecodeOnWait:
    """A p2p request whose ``wait()`` also decodes the received frame into the leaf handed out earlier."""

    def __init__(self, req: Any, finish: Callable[[], None] | None, keep: torch.Tensor | None = None,
                 group: Any = None):
        self._req = req
        self._group = group
        self._finish = finish
        self._keep = keep  # the frame buffer must outlive the request

    def wait(self) -> None:
        wait_work(self._req, "pipeline p2p (overlapped)", group=self._group)
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        self._keep = None

    def is_completed(self) -> bool:
        return self._req.is_completed()


class TimedP2PCommunicator(P2PCommunicator):
    """megatron-core's own p2p, uncompressed, whose waits are bounded by the pipeline group's timeout.

    On gloo a point-to-point wait never times out by itself (a frozen neighbour hangs the stage for good); this waits
    each request through :func:`distlion_ds.comm.wait_work`, which fails with one line naming the p2p after the
    process group's timeout. Batched p2p (``batch_p2p_comm``) is waited by megatron-core itself, unchanged.
    """

    def _communicate(self, *, wait_on_reqs: bool = True, **kwargs):
        if not wait_on_reqs or self.config.batch_p2p_comm:
            return super()._communicate(wait_on_reqs=wait_on_reqs, **kwargs)
        recv_prev, recv_next, reqs = super()._communicate(wait_on_reqs=False, **kwargs)
        for req in reqs if isinstance(reqs, list) else reqs.values():
            wait_work(req, "pipeline p2p send/recv", group=self.pp_group)
        return recv_prev, recv_next, None


class CompressedP2PCommunicator(P2PCommunicator):
    """A ``P2PCommunicator`` that compresses what it sends between pipeline stages.

    Args:
        pp_group: the pipeline-parallel process group.
        config: the model's ``ModelParallelConfig`` / ``TransformerConfig`` (``pipeline_dtype`` set).
        compression: ``CompressionConfig``, or a dict / JSON path for ``CompressionConfig.from_json``;
            ``None`` means lossless (method ``none``).
        state: where EF / AQ-SGD state and byte counts live; defaults to the process-wide state of the config.
        provider: kernel provider for the codecs (``auto``: CUDA -> Triton, CPU -> torch reference).

    Raises:
        ValueError: pp = 2 with the interleaved schedule and ``batch_p2p_comm`` (megatron-core computes it
            wrongly, silently; Megatron-LM's own argument checks forbid it).
        NotImplementedError: ``use_ring_exchange_p2p``.
    """

    def __init__(self, pp_group: dist.ProcessGroup, config: ModelParallelConfig,
                 compression: CompressionConfig | dict | str | None = None, *,
                 state: CompressionState | None = None, provider: Provider = "auto"):
        super().__init__(pp_group, config)
        self.compression = CompressionConfig.from_json(compression if compression is not None else {})
        self.state = state if state is not None else compression_state(self.compression)
        if self.state.config != self.compression:
            raise ValueError("state was built for a different compression config")
        self.compressor = PipeCompressor(self.state, sample_dim=1, provider=provider)
        self.pp_size = pp_group.size()
        self.pp_rank = pp_group.rank()
        self.vp_size = self.virtual_pipeline_model_parallel_size or 1
        self._fifo: collections.deque[FrameInfo] = collections.deque()
        self._check_config()
        self.state.bind_rank(_rank_tag())
        self._agree()

    # ------------------------------------------------------------------ agreement across the pipeline group

    def settings(self) -> dict[str, Any]:
        """What every rank of the pipeline group must share for frames to match (flat; see ``_agree``)."""
        return {**self.compressor.settings(), "pipeline_dtype": str(self.config.pipeline_dtype),
                "variable_seq_lengths": bool(self.config.variable_seq_lengths)}

    def _gather(self, obj: Any) -> tuple[list[Any], list[int]]:
        out: list[Any] = [None] * self.pp_size
        dist.all_gather_object(out, obj, group=self.pp_group)
        return out, dist.get_process_group_ranks(self.pp_group)

    def _agree(self) -> None:
        """Compare :meth:`settings` across the pipeline group, once per state and group; raise on every rank."""
        # Schedules may build a communicator per call: the comparison is a collective worth doing once per state.
        ranks = tuple(dist.get_process_group_ranks(self.pp_group))
        done = self.state.agreed_groups
        if ranks in done:
            return
        per_rank, ranks_list = self._gather(self.settings())
        bad = find_disagreements(per_rank, ranks_list)
        if bad:
            raise ValueError("pipeline ranks disagree on p2p compression settings (use one compression config and "
                             "one model config on every rank):\n  " + "\n  ".join(bad))
        done.add(ranks)

    def _check_config(self) -> None:
        c = self.config
        if self.pp_size == 2 and self.vp_size > 1 and c.batch_p2p_comm:
            raise ValueError(
                "pipeline size 2 with the interleaved schedule and batch_p2p_comm=True gives wrong results in "
                "megatron-core (both p2p directions with one peer in one batch); set batch_p2p_comm=False"
            )
        if c.use_ring_exchange_p2p:
            raise NotImplementedError("CompressedP2PCommunicator does not support use_ring_exchange_p2p")

    # ------------------------------------------------------------------ public extras

    def comm_stats(self) -> dict[str, Any]:
        """Cumulative bytes of this rank's frames (DESIGN 3.3 keys): ``bytes_sent``, ``bytes_received``, and per
        direction ``bytes_sent`` and ``elements_sent`` (the tensor elements the frames stand for)."""
        return copy.deepcopy(self.state.stats)

    def set_epoch(self, epoch: int) -> None:
        """AQ-SGD epoch (from 0); call on every pipeline rank at the same point (e.g. every iteration).

        With AQ-SGD the epoch decides between warm-up frames (full activations) and delta frames, whose sizes
        differ, so the ranks compare it here (one small ``all_gather_object`` on the pipeline group per call) and a
        mismatch raises on every rank, naming the ranks and their epochs, before any frame is sent.
        """
        self.state.set_epoch(epoch)
        if self.compression.uses_aqsgd:
            epochs, ranks = self._gather(int(epoch))
            bad = find_disagreements([{"epoch": e} for e in epochs], ranks)
            if bad:
                raise ValueError("pipeline ranks disagree on the AQ-SGD epoch (warm-up and delta frames differ in "
                                 "size; call set_epoch with the same value on every pipeline rank): " + bad[0])

    def state_dict(self) -> dict[str, Any]:
        """Compression state to save with a training checkpoint (EF / EF21 / AQ-SGD / counters)."""
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    # ------------------------------------------------------------------ which cut a tensor crosses

    def _stateful(self, direction: str) -> bool:
        cfg = self.compression.activations if direction == "activations" else self.compression.gradients
        return cfg.feedback != "none"

    def _forward_source(self, output: torch.Tensor, training: bool) -> tuple[int, int, tuple[int, ...] | None]:
        """(stage, chunk, sample ids) of the virtual stage that produced ``output``."""
        need_ids = training and self.compression.uses_aqsgd
        # Gradient state is keyed by the header of the forward frame, so stateful gradients need it right too.
        if not training or not (need_ids or self._stateful("activations") or self._stateful("gradients")):
            if self.pp_rank == 0:
                _take_pending_ids()  # stale ids must never reach a later training transfer
            return self.pp_rank, 0, None
        if self.vp_size == 1:
            if self.pp_rank == 0:
                return 0, 0, _take_pending_ids()
            if not need_ids:
                return self.pp_rank, 0, None
            if not self._fifo:
                raise RuntimeError(f"pipeline rank {self.pp_rank} sends an activation it received no input for; "
                                   "run forward-only steps under torch.no_grad()")
            return self.pp_rank, 0, self._fifo.popleft().sample_ids
        info = self._find_input_info(output)
        if info is None:
            if self.pp_rank != 0:
                raise RuntimeError(
                    f"pipeline rank {self.pp_rank}: cannot tell which model chunk produced the sent activation "
                    "(its autograd graph holds no tensor received by this communicator)"
                )
            return 0, 0, _take_pending_ids()
        v = info.chunk * self.pp_size + info.stage + 1  # the virtual stage that consumed the received input
        return v % self.pp_size, v // self.pp_size, info.sample_ids

    @staticmethod
    def _find_input_info(output: torch.Tensor) -> FrameInfo | None:
        """The header of the received input ``output`` was computed from, found in its autograd graph."""
        stack = [output.grad_fn]
        seen = set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
            if var is not None:
                info = getattr(var, _META, None)
                if info is not None:
                    return info
                continue
            stack.extend(f for f, _ in fn.next_functions)
        return None

    def _backward_cut(self, grad: torch.Tensor) -> tuple[int, int]:
        if self.vp_size == 1 or not self._stateful("gradients"):
            return (self.pp_rank - 1) % self.pp_size, 0
        info = getattr(grad, _META, None)
        if info is None:
            raise RuntimeError("cannot tell which pipeline cut a gradient belongs to: it is not the .grad of a "
                               "tensor received by this communicator")
        return info.stage, info.chunk

    def _recv_cut(self, direction: str) -> tuple[int, int] | None:
        """The cut a received frame crossed, where this rank knows it without the header (no interleaving)."""
        if self.vp_size > 1:
            return None
        if direction == "activations":
            return (self.pp_rank - 1) % self.pp_size, 0
        return self.pp_rank, 0

    def _routes_by_header(self, training: bool) -> bool:
        """Interleaved training with stateful streams: later sends find their cut from the received headers."""
        return self.vp_size > 1 and training and (
            self.compression.uses_aqsgd or self._stateful("activations") or self._stateful("gradients"))

    def _tag_leaf(self, leaf: torch.Tensor, info: FrameInfo | None, training: bool) -> None:
        if info is None:
            return
        setattr(leaf, _META, info)
        if not training:
            return
        if self.vp_size == 1:
            if self.compression.uses_aqsgd and self.pp_rank != self.pp_size - 1:
                self._fifo.append(info)
        elif self._stateful("gradients"):
            leaf.register_post_accumulate_grad_hook(lambda t: setattr(t.grad, _META, info))

    # ------------------------------------------------------------------ the seam

    def _communicate(
        self,
        *,
        tensor_send_next: torch.Tensor | None,
        tensor_send_prev: torch.Tensor | None,
        recv_prev: bool,
        recv_next: bool,
        tensor_shape: Sequence[int] | torch.Size | None,
        wait_on_reqs: bool = True,
    ):
        config = self.config
        self._check_config()  # configs are mutable dataclasses: re-check the refused combination per call
        training = torch.is_grad_enabled()
        if config.variable_seq_lengths or getattr(config, "mtp_standalone", False):
            recv_prev_shape, recv_next_shape = self._communicate_shapes(
                tensor_send_next, tensor_send_prev, recv_prev, recv_next
            )
        else:
            recv_prev_shape = recv_next_shape = tensor_shape
        if (recv_prev or recv_next) and config.pipeline_dtype is None:
            raise RuntimeError("pipeline_dtype must be provided to receive tensors")
        if (recv_prev or recv_next) and tensor_shape is None:
            raise RuntimeError("tensor_shape must be specified to receive tensors "
                               "(common tensor_shape is (seq_length, micro_batch_size, hidden_size))")
        dtype = config.pipeline_dtype
        device = torch.cuda.current_device()
        pc = self.compressor

        send_next = send_prev = None
        if tensor_send_next is not None:
            self._check_dtype(tensor_send_next)
            stage, chunk, ids = self._forward_source(tensor_send_next, training)
            send_next = pc.encode("activations", tensor_send_next, stage=stage, chunk=chunk,
                                  mode=pc.mode("activations", training), sample_ids=ids)
        if tensor_send_prev is not None:
            self._check_dtype(tensor_send_prev)
            stage, chunk = self._backward_cut(tensor_send_prev)
            send_prev = pc.encode("gradients", tensor_send_prev, stage=stage, chunk=chunk,
                                  mode=pc.mode("gradients", training))

        finishers: dict[str, Callable[[], None]] = {}
        out: dict[str, torch.Tensor] = {}
        frames: dict[str, torch.Tensor] = {}
        for name, want, shape, direction in (("recv_prev", recv_prev, recv_prev_shape, "activations"),
                                             ("recv_next", recv_next, recv_next_shape, "gradients")):
            if not want:
                continue
            shape = tuple(int(d) for d in shape)
            mode = pc.mode(direction, training)
            frame = torch.empty(pc.frame_nbytes(direction, shape, dtype, mode), dtype=torch.uint8, device=device)
            leaf = torch.empty(shape, requires_grad=True, device=device, dtype=dtype)
            frames[name], out[name] = frame, leaf
            finishers[name] = self._finisher(direction, frame, leaf, mode, training)

        p2p = _batched_p2p_ops if config.batch_p2p_comm else _p2p_ops
        if config.batch_p2p_comm and not wait_on_reqs:
            raise ValueError("batch_p2p_comm needs wait_on_reqs (megatron-core asserts the same)")
        reqs = p2p(
            tensor_send_prev=send_prev, tensor_recv_prev=frames.get("recv_prev"),
            tensor_send_next=send_next, tensor_recv_next=frames.get("recv_next"),
            group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
        )
        if wait_on_reqs:
            for req in reqs if isinstance(reqs, list) else reqs.values():
                wait_work(req, "pipeline p2p send/recv", group=self.pp_group)
            if config.batch_p2p_comm and config.batch_p2p_sync:
                torch.cuda.synchronize()  # megatron-core's guard against a batch_isend_irecv race
            for finish in finishers.values():
                finish()
            reqs = None
        else:
            keep = {"send_next": send_next, "send_prev": send_prev, **frames}
            reqs = {name: _DecodeOnWait(req, finishers.get(name), keep.get(name), self.pp_group)
                    for name, req in reqs.items()}
        return out.get("recv_prev"), out.get("recv_next"), reqs

    def _check_dtype(self, t: torch.Tensor) -> None:
        if self.config.pipeline_dtype is not None and t.dtype != self.config.pipeline_dtype:
            raise ValueError(f"sending a {t.dtype} tensor but pipeline_dtype is {self.config.pipeline_dtype}: "
                             "the receiver would decode the wrong dtype")

    def _finisher(self, direction: str, frame: torch.Tensor, leaf: torch.Tensor, mode: Mode,
                  training: bool) -> Callable[[], None]:
        cut = self._recv_cut(direction)
        want_info = direction == "activations" and self._routes_by_header(training)

        def finish() -> None:
            value, info = self.compressor.decode(direction, frame, leaf.shape, leaf.dtype, mode, cut=cut,
                                                 want_info=want_info)
            with torch.no_grad():
                leaf.copy_(value)
            self._tag_leaf(leaf, info, training and direction == "activations")
        return finish
