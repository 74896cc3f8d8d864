"""Timing shared by the benchmarks: synchronised median over repetitions."""

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
