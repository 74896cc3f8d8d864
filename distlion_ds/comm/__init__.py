"""Communication layer: the only package code (besides the DeepSpeed/Megatron seams) that uses torch.distributed."""

from .vote_exchange import VoteExchange, replica_checksum

__all__ = ["VoteExchange", "replica_checksum"]
