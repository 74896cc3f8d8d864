"""distlion_ds: Distributed Lion (1-bit votes) and compressed pipeline p2p for DeepSpeed and megatron-core.

``import distlion_ds`` is lean: it imports neither triton, deepspeed nor megatron and does not touch CUDA.
The public names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DiLoCo": "distlion_ds.optim.diloco",
    "DistributedLion": "distlion_ds.optim.distributed_lion",
    "LocalStepsLion": "distlion_ds.optim.local_steps",
    "lion_update_ref": "distlion_ds.optim.lion",
    "initialize": "distlion_ds.deepspeed.engine",
}

if TYPE_CHECKING:  # pragma: no cover
    from distlion_ds.deepspeed.engine import initialize
    from distlion_ds.optim.diloco import DiLoCo
    from distlion_ds.optim.distributed_lion import DistributedLion
    from distlion_ds.optim.lion import lion_update_ref
    from distlion_ds.optim.local_steps import LocalStepsLion

__all__ = ["DiLoCo", "DistributedLion", "LocalStepsLion", "initialize", "lion_update_ref", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "kernels":
        return importlib.import_module("distlion_ds.kernels")
    raise AttributeError(f"module 'distlion_ds' has no attribute {name!r}")
