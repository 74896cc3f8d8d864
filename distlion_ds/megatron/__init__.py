"""megatron-core seam: compressed pipeline p2p (DESIGN 3.3), its opt-in install, and the CPU execution shim.

Importing this package imports megatron-core (``import distlion_ds`` alone does not).

Usage::

    from distlion_ds.megatron import CompressedP2PCommunicator, CompressionConfig
    comm = CompressedP2PCommunicator(pp_group, model_config,
                                     compression=CompressionConfig.from_json("configs/compression/topk10_q8.json"))
    forward_backward_func(..., p2p_communicator=comm, pg_collection=pg_collection)
    comm.comm_stats()
"""

import warnings

from distlion_ds.compress import CompressionConfig

with warnings.catch_warnings():
    # megatron-core warns on import, once per process, that Transformer Engine / Apex are absent and it uses its
    # local fallbacks; on a CPU run that is the expected configuration, not news (scoped to this import only).
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from .communicator import CompressedP2PCommunicator, compression_state, set_sample_ids
    from .cpu import disable_cpu, enable_cpu
    from .install import install, is_installed, uninstall
    from .optimizer import (
        DistributedLionOptimizer,
        ddp_config_for_dlion,
        get_optimizer,
        prepare_checkpoint_load,
    )
    from .plugin import (
        add_arguments,
        install_megatron_lm,
        is_megatron_lm_installed,
        tied_embedding_state,
        uninstall_megatron_lm,
    )
    from .tied import CompressedFinalizeModelGrads, TiedEmbeddingState, finalize_model_grads_with

__all__ = [
    "CompressedP2PCommunicator", "CompressionConfig", "compression_state", "set_sample_ids",
    "enable_cpu", "disable_cpu", "install", "uninstall", "is_installed",
    "DistributedLionOptimizer", "get_optimizer", "ddp_config_for_dlion", "prepare_checkpoint_load",
    "add_arguments", "install_megatron_lm", "uninstall_megatron_lm", "is_megatron_lm_installed", "tied_embedding_state",
    "CompressedFinalizeModelGrads", "TiedEmbeddingState", "finalize_model_grads_with",
]
