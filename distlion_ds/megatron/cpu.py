"""``enable_cpu()``: run megatron-core's pipeline schedules on CPU / gloo (DESIGN section 4).

megatron-core 0.16 assumes CUDA in four places that a CPU run reaches; measured on a CPU-only machine, these four
patches are enough for GPTModel with the local layer spec under the 1F1B and interleaved schedules:

1. ``torch.cuda.current_device()`` -> the CPU device: P2P receive buffers and shape tensors are allocated on it.
2. ``torch.cuda.synchronize()`` -> no-op: called after batched p2p and shape exchanges.
3. A ``TorchFunctionMode`` that maps ``device="cuda"`` (and ``Tensor.cuda()``) to the CPU: the schedules allocate
   ``total_num_tokens`` on "cuda" and tied embeddings call ``.cuda()``.
4. A CPU RNG tracker in place of ``CudaRNGStatesTracker.add`` / ``.fork``: the tracker snapshots CUDA RNG states.

Opt-in and idempotent (a marker attribute on ``torch.cuda``); originals are kept in ``_ORIGINALS``. On a machine
with CUDA it changes nothing: the schedules run as megatron-core intends. The function mode is pushed on the
calling thread's mode stack (torch function modes are thread-local); CPU autograd runs on the calling thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_MARKER = "_distlion_cpu_shim"
_ORIGINALS: dict[str, Any] = {}
_MODE: TorchFunctionMode | None = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU; everything else passes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]  # the tensor is already where a CPU run keeps everything
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` on the CPU generator: same bookkeeping and errors as megatron-core's."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _cpu_rng_fork(self, name: str | None = None) -> Iterator[None]:
    """``CudaRNGStatesTracker.fork`` on the CPU generator: run the body from ``name``'s state, then restore."""
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME

    name = name or _MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


def enable_cpu() -> bool:
    """Apply the four CPU patches (idempotent). Returns True when the shim is active, False on a CUDA machine.

    Returns:
        Whether the shim is in effect.
    """
    global _MODE
    if torch.cuda.is_available():
        if not _ORIGINALS.get("_logged_cuda"):
            logger.info("enable_cpu(): CUDA is available, megatron-core runs unpatched")
            _ORIGINALS["_logged_cuda"] = True
        return False
    if getattr(torch.cuda, _MARKER, False):
        return True
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    _ORIGINALS.update(current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
                      rng_add=CudaRNGStatesTracker.add, rng_fork=CudaRNGStatesTracker.fork)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    CudaRNGStatesTracker.add = _cpu_rng_add
    CudaRNGStatesTracker.fork = _cpu_rng_fork
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    setattr(torch.cuda, _MARKER, True)
    logger.info("enable_cpu(): megatron-core patched for CPU (current_device, synchronize, cuda->cpu, RNG tracker)")
    return True


def disable_cpu() -> None:
    """Undo :func:`enable_cpu` (for tests; must run on the thread that enabled it)."""
    global _MODE
    if not getattr(torch.cuda, _MARKER, False):
        return
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    torch.cuda.current_device = _ORIGINALS["current_device"]
    torch.cuda.synchronize = _ORIGINALS["synchronize"]
    CudaRNGStatesTracker.add = _ORIGINALS["rng_add"]
    CudaRNGStatesTracker.fork = _ORIGINALS["rng_fork"]
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    delattr(torch.cuda, _MARKER)
