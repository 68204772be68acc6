"""Where tokens live when the sequence is split over N devices.

Prompt (prefill): the S positions are cut into 2N chunks of c = S/(2N); device i holds chunks i and 2N-1-i,
so under a causal mask every device has the same amount of attention work (the zigzag placement). The
sequence the model computes on is the concatenation of the devices' pieces in device order: `order(S, N)`.

The KV cache does not follow this order: its pages spread over the seq devices by position (parallel/paged.py).
For N = 1 the order is the identity.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def chunks(device: int, n: int) -> tuple[int, int]:
    """The two prompt chunks (of 2n) that `device` holds."""
    return device, 2 * n - 1 - device


def order(s: int, n: int) -> np.ndarray:
    """order[j] = the position computed at sequence index j (device i holds indices i*s/n .. (i+1)*s/n-1)."""
    if n == 1:
        return np.arange(s)
    c = s // (2 * n)
    return np.concatenate([np.arange(ch * c, (ch + 1) * c) for i in range(n) for ch in chunks(i, n)])


def inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def local_positions(device, s_local: int, n: int):
    """Positions of a device's prompt tokens (device may be traced): [s_local] int32."""
    c = s_local // 2
    j = jnp.arange(s_local)
    chunk = jnp.where(j < c, device, 2 * n - 1 - device)
    return chunk * c + j % c
