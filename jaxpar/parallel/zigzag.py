"""Where tokens live when the sequence is split over N devices.

Prompt (prefill): the S positions are cut into 2N chunks of c = S/(2N); device i holds chunks i and 2N-1-i,
so under a causal mask every device has the same amount of attention work (the zigzag placement). The
sequence the model computes on is the concatenation of the devices' pieces in device order: `order(S, N)`.

KV cache: each device holds T/N slots. Slots 0..S/N-1 of device i hold its prompt positions (as above);
positions p >= S (generated tokens) go round-robin, device (p-S) mod N, slot S/N + (p-S) div N, so the cache
stays balanced as it grows. For N = 1 both maps are the identity.
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


def slot_positions(device, slots: int, n: int, prompt_len):
    """Position stored in each of a device's cache slots, for a prompt bucket of `prompt_len` (may be traced)."""
    j = jnp.arange(slots)
    per = prompt_len // n
    c = jnp.maximum(prompt_len // (2 * n), 1)
    chunk = jnp.where(j < c, device, 2 * n - 1 - device)
    prompt = chunk * c + j % c
    generated = prompt_len + (j - per) * n + device
    return jnp.where(j < per, prompt, generated)


def slot_of(pos, n: int, prompt_len):
    """(device, slot) holding position `pos` (arrays, may be traced)."""
    c = jnp.maximum(prompt_len // (2 * n), 1)
    chunk = pos // c
    first = chunk < n
    p_dev = jnp.where(first, chunk, 2 * n - 1 - chunk)
    p_slot = jnp.where(first, 0, c) + pos % c
    q = pos - prompt_len
    g_dev, g_slot = q % n, prompt_len // n + q // n
    in_prompt = pos < prompt_len
    return jnp.where(in_prompt, p_dev, g_dev), jnp.where(in_prompt, p_slot, g_slot)
