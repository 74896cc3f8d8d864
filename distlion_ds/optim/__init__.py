"""Optimizers: the D-Lion reference update (the oracle) and the DistributedLion class."""

from .distributed_lion import DistributedLion
from .lion import dlion_update_ref, lion_update_ref
from .local_steps import LocalStepsLion

__all__ = ["DistributedLion", "LocalStepsLion", "dlion_update_ref", "lion_update_ref"]
