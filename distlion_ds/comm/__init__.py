"""Communication layer: the only package code (besides the DeepSpeed/Megatron seams) that uses torch.distributed."""

from .process_exit import exit_after_teardown
from .vote_exchange import (
    CollectiveError,
    InFlight,
    VoteExchange,
    gather_fingerprints,
    gather_objects,
    group_timeout,
    host_flag,
    local_checksum,
    raise_together,
    replica_checksum,
    run_collective,
    set_timeout_everywhere,
    wait_work,
)

__all__ = ["CollectiveError", "InFlight", "VoteExchange", "exit_after_teardown", "gather_fingerprints",
           "gather_objects", "group_timeout", "host_flag", "local_checksum", "raise_together", "replica_checksum",
           "run_collective", "set_timeout_everywhere", "wait_work"]
