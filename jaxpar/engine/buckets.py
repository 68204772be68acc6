"""Shape buckets: a few padded shapes so prefill and decode compile once per bucket, not per request."""
from __future__ import annotations


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def batch_bucket(batch: int, multiple: int) -> int:
    """Batch padded to a power of two, then to a multiple of the batch-sharding degree."""
    b = next_pow2(batch)
    return -(-b // multiple) * multiple


def seq_bucket(length: int, limit: int, minimum: int = 16) -> int:
    return min(next_pow2(length, minimum), limit)
