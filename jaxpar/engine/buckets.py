"""Shape buckets: a few padded shapes so prefill and decode compile once per bucket, not per request."""
from __future__ import annotations


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def batch_bucket(batch: int, multiple: int) -> int:
    """Batch padded to a power of two, then to a multiple of the batch-sharding degree."""
    b = next_pow2(batch)
    return -(-b // multiple) * multiple


def seq_bucket(length: int, limit: int, multiple: int = 1, minimum: int = 16) -> int:
    """Length padded to a power of two (at most `limit`, the context window), then to a multiple of
    `multiple` (a sequence split over devices); the last step may pass the window, only by padding."""
    b = min(next_pow2(length, minimum), limit)
    return -(-b // multiple) * multiple
