"""``install(compression)``: compressed p2p for callers that pass no ``p2p_communicator`` to the schedules.

Injection comes first (STYLE 7): pass ``CompressedP2PCommunicator`` through ``forward_backward_func(...,
p2p_communicator=comm, pg_collection=...)``. Code that cannot (e.g. a training loop calling the schedules with
neither argument) gets the same effect from ``install``: the schedules module builds its default communicator as
``P2PCommunicator(pp_group=..., config=config)`` by module-global name, and ``install`` rebinds that name to a
subclass of :class:`CompressedP2PCommunicator` with the compression bound. Opt-in, idempotent (a marker attribute
on the schedules module), the original kept for :func:`uninstall`, logged once; the private signature it relies
on (``P2PCommunicator._communicate``'s keywords and the constructor call) is pinned by a test. The installed class
holds the EF / AQ-SGD state its per-call instances share; uninstalling drops it.
"""

from __future__ import annotations

import logging

from megatron.core.pipeline_parallel import schedules

from distlion_ds.compress import CompressionConfig

from .communicator import CompressedP2PCommunicator, compression_state

logger = logging.getLogger(__name__)

_MARKER = "_distlion_p2p_original"


def install(compression: CompressionConfig | dict | str) -> type[CompressedP2PCommunicator]:
    """Make megatron-core's schedules build compressed communicators when given none.

    Args:
        compression: ``CompressionConfig`` or anything ``CompressionConfig.from_json`` accepts.
    Returns:
        The communicator class now bound in ``megatron.core.pipeline_parallel.schedules``.
    """
    config = CompressionConfig.from_json(compression)
    current = schedules.P2PCommunicator
    if getattr(schedules, _MARKER, None) is not None and getattr(current, "compression", None) == config:
        return current  # already installed with this config: nothing to do, nothing to log

    class InstalledCompressedP2PCommunicator(CompressedP2PCommunicator):
        compression_config = config
        # The schedules build one instance per call; EF / AQ-SGD state must outlive them. The class holds it, so
        # it is freed with the class once uninstall() (or a re-install) drops the binding.
        shared_state = compression_state(config)

        def __init__(self, pp_group, config, **kwargs):
            kwargs.setdefault("compression", type(self).compression_config)
            if kwargs["compression"] == type(self).compression_config:
                kwargs.setdefault("state", type(self).shared_state)
            super().__init__(pp_group, config, **kwargs)

    InstalledCompressedP2PCommunicator.compression = config  # class-level: idempotence check above
    if getattr(schedules, _MARKER, None) is None:
        setattr(schedules, _MARKER, current)
        logger.info("distlion_ds: megatron-core schedules now build CompressedP2PCommunicator by default")
    else:
        logger.info("distlion_ds: compressed p2p re-installed with a new compression config")
    schedules.P2PCommunicator = InstalledCompressedP2PCommunicator
    return InstalledCompressedP2PCommunicator


def uninstall() -> None:
    """Restore megatron-core's own default communicator (no-op when not installed)."""
    original = getattr(schedules, _MARKER, None)
    if original is not None:
        schedules.P2PCommunicator = original
        setattr(schedules, _MARKER, None)
        logger.info("distlion_ds: megatron-core schedules restored to P2PCommunicator")


def is_installed() -> bool:
    return getattr(schedules, _MARKER, None) is not None
