"""Optimizers: the D-Lion reference update (the oracle) and the DistributedLion class."""

from .diloco import DiLoCo
from .distributed_lion import DistributedLion
from .lion import Lion, dlion_update_ref, lion_update_ref
from .local_steps import LocalStepsLion

__all__ = ["DiLoCo", "DistributedLion", "Lion", "LocalStepsLion", "dlion_update_ref", "lion_update_ref"]
