"""Where a launcher runs: the Triton kernel or the torch reference.

A CUDA tensor runs the Triton kernel. A CPU tensor runs the pure-torch reference, unless
``TRITON_INTERPRET=1`` was in the environment before triton was imported: then the Triton kernel
runs in the interpreter on CPU tensors, which is how CI tests the kernels without a GPU.
(Setting the flag after ``import triton`` breaks ``tl.sum`` and friends, so it is read once.)
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the launcher should run its Triton kernel for these tensors."""
    devices = {t.device.type for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different device types {sorted(devices)}; move them to one device")
    if devices == {"cuda"}:
        return True
    return INTERPRET


def check_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """Kernels read flat memory: non-contiguous input is copied (the copy is the caller's cost, not a bug)."""
    return t if t.is_contiguous() else t.contiguous()


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


# The torch references are also the CPU path, and on CPU they run on whole buckets (10^7-10^8 elements). Written as
# whole-tensor expressions, every op allocates a fresh bucket-sized temporary whose pages fault in on first touch;
# the references therefore walk flat tensors in chunks of this many elements (a multiple of 8, so a chunk starts on
# a byte of the packed layouts): a chunk's temporaries (256 KiB in fp32) stay in cache and the allocator reuses them.
# Same operations per element, so the same bits (tests set it small to cross chunk boundaries everywhere).
REF_CHUNK = 1 << 16


def ref_chunks(n: int, multiple: int = 8):
    """``(start, end)`` of consecutive chunks covering ``range(n)``; every start is a multiple of ``multiple``."""
    size = max(multiple, REF_CHUNK // multiple * multiple)
    for start in range(0, n, size):
        yield start, min(n, start + size)
