"""Ring attention for prefill over the `seq` axis (zigzag-balanced).

Each device keeps its query block (zigzag chunks i and 2N-1-i, see zigzag.py) and passes its key/value
block around the ring with `ppermute`; queries accumulate each visiting block with online softmax, so no
device ever holds more than one block's scores. At step t a device holds the K/V of device j = (i-t) mod N:

- step 0 (its own block): the causal mask within the block;
- j < i (t <= i): only K/V chunk j is visible, and to both query chunks: (2c queries x c keys);
- j > i: both K/V chunks are visible, to the second query chunk only: (c queries x 2c keys).

No other block pair is computed, and every device does the same work at every step. The next block is sent
before the current one is used, so the transfer can overlap the computation. With a sliding window
(`AttentionSpec.window`) the pairs are masked by position as well, and a pair with no key inside any of its
queries' windows is skipped."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model.attend import AttentionSpec, accumulate, empty_partial, finish
from jaxpar.parallel import zigzag


def uses_first_kv_chunk(step: int, device):
    """After step 0, whether `device` attends with only the first K/V chunk (all its queries) at `step`,
    rather than with both chunks (its second query chunk only)."""
    return step <= device


def ring_attention_local(q, k, v, sinks=None, *, axis, n: int, spec: AttentionSpec):
    """Per-device body (inside shard_map). q [B, 2c, H, D]; k, v [B, 2c, KV, D] -> [B, 2c, H, D]; sinks [H]:
    this device's heads' attention sinks, folded in once after the ring (every key has been seen)."""
    i = jax.lax.axis_index(axis)
    b, c = q.shape[0], q.shape[1] // 2
    kv_heads = k.shape[2]
    pos = zigzag.local_positions(i, 2 * c, n)

    def visible(qp, kp):
        return jnp.broadcast_to(spec.visible(qp[:, None], kp[None, :]), (b, qp.shape[0], kp.shape[0]))

    def fold(acc, q, kt, vt, mask):
        """accumulate, skipped when a window hides every key of the pair (mask None: all visible)."""
        if mask is None:
            return accumulate(acc, q, kt, vt, None, spec)
        return jax.lax.cond(jnp.any(mask), lambda a: accumulate(a, q, kt, vt, mask, spec), lambda a: a, acc)

    acc = empty_partial(q, kv_heads)
    ring = [(j, (j + 1) % n) for j in range(n)]
    cur = (k,) if spec.latent else (k, v)  # a latent cache's values are its keys: one tensor goes round
    for t in range(n):
        nxt = jax.lax.ppermute(cur, axis, ring) if t < n - 1 else None  # send before computing on cur
        kt, vt = cur[0], cur[-1]
        if t == 0:
            acc = accumulate(acc, q, kt, vt, visible(pos, pos), spec)
        else:
            kpos = zigzag.local_positions((i - t) % n, 2 * c, n)  # the visiting block's positions
            windowed = spec.window is not None

            def first_chunk(acc, kt=kt, vt=vt, kpos=kpos):
                return fold(acc, q, kt[:, :c], vt[:, :c], visible(pos, kpos[:c]) if windowed else None)

            def second_queries(acc, kt=kt, vt=vt, kpos=kpos):
                o, m, l = acc
                o2, m2, l2 = fold((o[:, c:], m[..., c:], l[..., c:]), q[:, c:], kt, vt,
                                  visible(pos[c:], kpos) if windowed else None)
                return (jnp.concatenate([o[:, :c], o2], axis=1), jnp.concatenate([m[..., :c], m2], axis=-1),
                        jnp.concatenate([l[..., :c], l2], axis=-1))
            acc = jax.lax.cond(uses_first_kv_chunk(t, i), first_chunk, second_queries, acc)
        cur = nxt
    return finish(acc, q.dtype, sinks)
