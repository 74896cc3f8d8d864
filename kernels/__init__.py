"""Triton kernels for distlion_ds hot paths, each with a pure-torch reference (the oracle and the CPU path).

Installed as ``distlion_ds.kernels`` (the repo folder ``kernels/``). Importing this package imports triton (the
kernel modules define their ``@triton.jit`` functions at import); ``import distlion_ds`` does not, because the
top-level package resolves its public names lazily. Dispatch: a CUDA tensor runs the Triton kernel; a CPU tensor
runs the torch reference, unless ``TRITON_INTERPRET=1`` was set before triton was imported (then the interpreter).
"""

from .lion import (
    lion_apply,
    lion_apply_multi,
    lion_apply_ref,
    lion_votes,
    lion_votes_multi,
    lion_votes_ref,
    vote_count,
    vote_count_ref,
)
from .quantize import dequantize, dequantize_ref, quantize, quantize_ref
from .signs import pack_signs, pack_signs_ref, unpack_signs, unpack_signs_ref
from .topk import topk_scatter, topk_scatter_ref, topk_select, topk_select_ref

__all__ = [
    "pack_signs", "pack_signs_ref", "unpack_signs", "unpack_signs_ref",
    "lion_votes", "lion_votes_ref", "vote_count", "vote_count_ref", "lion_apply", "lion_apply_ref",
    "lion_votes_multi", "lion_apply_multi",
    "quantize", "quantize_ref", "dequantize", "dequantize_ref",
    "topk_select", "topk_select_ref", "topk_scatter", "topk_scatter_ref",
]
