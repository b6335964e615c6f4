"""Which replica owns which view, when several replicas split the views between them.

Each view belongs to exactly one of ``shard_count`` shards, by a jump consistent hash (Lamping and
Veach, 2014) of its namespace/name: stable across restarts and replicas, and when the count changes
from n to n+1 only about 1/(n+1) of the views move (to the new shard), the rest stay where they were.
Replica i runs with ``--shard-index i --shard-count n`` and handles only its own views; the lock row
of each view remains the last guard while replicas with different counts overlap in a rollout.
"""

from __future__ import annotations

import hashlib

_MULTIPLIER = 2862933555777941757
_MASK = 0xFFFF_FFFF_FFFF_FFFF


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) of a 64-bit key."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * _MULTIPLIER + 1) & _MASK
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(namespace: str, name: str, shard_count: int) -> int:
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return jump_hash(int.from_bytes(digest[:8], "big"), shard_count)


def owns(shard_index: int, shard_count: int, namespace: str, name: str) -> bool:
    return shard_count <= 1 or shard_of(namespace, name, shard_count) == shard_index
