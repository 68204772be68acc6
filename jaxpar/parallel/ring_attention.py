"""Ring attention for prefill over the `seq` axis (zigzag-balanced).

Each device keeps its query block (zigzag chunks i and 2N-1-i, see zigzag.py) and passes its key/value
block around the ring with `ppermute`; queries accumulate each visiting block with online softmax, so no
device ever holds more than one block's scores. At step t a device holds the K/V of device j = (i-t) mod N:

- step 0 (its own block): the causal mask within the block;
- j < i (t <= i): only K/V chunk j is visible, and to both query chunks: (2c queries x c keys);
- j > i: both K/V chunks are visible, to the second query chunk only: (c queries x 2c keys).

No other block pair is computed, and every device does the same work at every step. The next block is sent
before the current one is used, so the transfer can overlap the computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model.attend import accumulate, empty_partial, finish
from jaxpar.parallel import zigzag


def uses_first_kv_chunk(step: int, device):
    """After step 0, whether `device` attends with only the first K/V chunk (all its queries) at `step`,
    rather than with both chunks (its second query chunk only)."""
    return step <= device


def ring_attention_local(q, k, v, axis, n: int):
    """Per-device body (inside shard_map). q [B, 2c, H, D]; k, v [B, 2c, KV, D] -> [B, 2c, H, D]."""
    i = jax.lax.axis_index(axis)
    c = q.shape[1] // 2
    kv_heads = k.shape[2]
    pos = zigzag.local_positions(i, 2 * c, n)
    causal = jnp.broadcast_to(pos[:, None] >= pos[None, :], (q.shape[0], 2 * c, 2 * c))
    acc = empty_partial(q, kv_heads)
    ring = [(j, (j + 1) % n) for j in range(n)]
    cur = (k, v)
    for t in range(n):
        nxt = jax.lax.ppermute(cur, axis, ring) if t < n - 1 else None  # send before computing on cur
        kt, vt = cur
        if t == 0:
            acc = accumulate(acc, q, kt, vt, causal)
        else:
            def first_chunk(acc, kt=kt, vt=vt):
                return accumulate(acc, q, kt[:, :c], vt[:, :c])

            def second_queries(acc, kt=kt, vt=vt):
                o, m, l = acc
                o2, m2, l2 = accumulate((o[:, c:], m[..., c:], l[..., c:]), q[:, c:], kt, vt)
                return (jnp.concatenate([o[:, :c], o2], axis=1), jnp.concatenate([m[..., :c], m2], axis=-1),
                        jnp.concatenate([l[..., :c], l2], axis=-1))
            acc = jax.lax.cond(uses_first_kv_chunk(t, i), first_chunk, second_queries, acc)
        cur = nxt
    return finish(acc, q.dtype)
