"""Where a launcher runs: the Triton kernel or the torch reference; how every kernel is launched.

A CUDA tensor runs the Triton kernel. A CPU tensor runs the pure-torch reference, unless
``TRITON_INTERPRET=1`` was in the environment before triton was imported: then the Triton kernel
runs in the interpreter on CPU tensors, which is how CI tests the kernels without a GPU.
(Setting the flag after ``import triton`` breaks ``tl.sum`` and friends, so it is read once.)

Compile-only mode (:func:`compile_only`): launchers treat ``meta`` tensors as CUDA tensors and JIT-compile their
kernels (Triton's warm-up: the same specialisation as a real launch, i.e. integer arguments equal to 1 become
constants, pointers get 16-byte alignment attributes from ``data_ptr()``) without launching. Meta tensors report
``data_ptr() == storage_offset * itemsize``, so slices with an offset reproduce unaligned arguments, and meta
tensors of any size cost no memory. Together with a driver whose target is a CUDA GPU (tests/_fake_cuda.py) this
compiles every launcher path for sm_80 / sm_90 on a machine without a GPU.

The GPU-bits policy (every kernel is launched through :func:`launch`):
- no FMA contraction (``enable_fp_fusion=False``): the torch references round every product and every sum, and on
  a GPU a contracted ``a*b + c`` rounds once, so a vote could flip where ``c`` is within an ulp of zero. The
  kernels are memory-bound: fusion buys no time.
- IEEE-rounded division (``tl.math.div_rn``) wherever a kernel divides: ``/`` on fp32 is ``div.full.f32``
  (approximate, up to 2 ulp) on NVIDIA GPUs.
- 64-bit offsets wherever an offset can pass 2**31: program bases are int64, row strides are added to pointers
  (never multiplied in int32); 32-bit offsets only inside a tile.
tests/test_gpu_compile.py checks all three in the PTX for sm_80 and sm_90, and that no kernel spills.
"""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels compiled while compile_only() is active: (kernel name, compiled kernel), in launch order; None otherwise.
_COMPILED: list | None = None


@contextlib.contextmanager
def compile_only():
    """Within the block, launchers given ``meta`` tensors compile their Triton kernels and never launch them.

    Needs a triton driver whose current target is a GPU (a real one, or a fake one for compile checks) and
    ``TRITON_INTERPRET`` unset. Yields a list that collects ``(kernel_name, compiled_kernel)`` for every launch;
    ``compiled_kernel.asm["ptx"]`` is the PTX on NVIDIA targets. Outputs of the launchers are meta tensors.
    """
    global _COMPILED
    if INTERPRET:
        raise RuntimeError("compile_only() needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    previous, _COMPILED = _COMPILED, []
    try:
        yield _COMPILED
    finally:
        _COMPILED = previous


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the launcher should run its Triton kernel for these tensors."""
    devices = {t.device.type for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different device types {sorted(devices)}; move them to one device")
    if devices == {"cuda"}:
        return True
    if devices == {"meta"} and _COMPILED is not None:
        return True
    return INTERPRET


def launch(kernel, grid: tuple[int, ...], *args, **options):
    """``kernel[grid](*args, **options)`` under the GPU-bits policy (module docstring); compile-only aware."""
    options.setdefault("enable_fp_fusion", False)
    if _COMPILED is not None:
        compiled = kernel.run(*args, grid=grid, warmup=True, **options)
        _COMPILED.append((kernel.fn.__name__, compiled))
        return compiled
    return kernel[grid](*args, **options)


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
