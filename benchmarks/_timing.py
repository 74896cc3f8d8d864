"""Timing shared by the benchmarks: synchronised median over repetitions; the GPT-like tensor list they step."""

from __future__ import annotations

import time

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, min_time: float = 0.3, warmup: int = 2) -> float:
    """Median seconds per call over at least ``min_time`` seconds (and 3 calls) of repetitions."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def resolve_provider(ap, provider: str | None) -> tuple[str, torch.device]:
    """``--provider`` -> (provider, device): triton on CUDA by default, the torch references on CPU.

    The torch provider also switches the CPU dispatch to the references (a TRITON_INTERPRET=1 environment would
    otherwise time the interpreter).
    """
    from distlion_ds.kernels import _dispatch

    cuda = torch.cuda.is_available()
    provider = provider or ("triton" if cuda else "torch")
    if provider == "triton" and not cuda and not _dispatch.INTERPRET:
        ap.error("--provider triton needs a CUDA device (or TRITON_INTERPRET=1, which is far too slow to time)")
    if provider == "torch":
        _dispatch.INTERPRET = False
    return provider, torch.device("cuda" if cuda and provider == "triton" else "cpu")


def gpt_like_shapes(numel: int) -> list[tuple[int, ...]]:
    """A GPT's parameter list (12 layers of 12 tensors, an embedding; 147 tensors) scaled to about ``numel``
    elements."""
    h = max(64, int((numel / (12 * 12 + 50)) ** 0.5) // 64 * 64)
    layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    return [(50 * h, h)] + layer * 12 + [(h,), (h,)]
