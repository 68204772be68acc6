"""The KV cache split along the sequence over the `seq` axis (see zigzag.py for which slot holds which
position): writing the prompt after prefill, and decode attention across devices.

Decode is FlashDecoding across devices: the new token's K/V is written by the one device that owns its
position; every device attends over its own slots only, giving an unnormalised partial result with its
running max and sum; the partials merge with one max all-reduce and one sum all-reduce over `seq`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model.attend import accumulate, empty_partial
from jaxpar.parallel import zigzag


def write_prompt_local(cache, new):
    """cache [B, T/n, KV, D]; new [B, S/n, KV, D] (this device's prompt tokens) -> cache, slots 0..S/n-1 set."""
    return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), 0, axis=1)


def decode_local(q, k_new, v_new, cache_k, cache_v, pos, prompt_len, axis, n: int):
    """Per-device body. q [B,1,H,D]; k_new, v_new [B,1,KV,D]; cache_* [B,T/n,KV,D]; pos [B] (the new token's
    position); prompt_len: the prompt bucket S used at prefill. -> (out [B,1,H,D], cache_k, cache_v)."""
    i = jax.lax.axis_index(axis)
    owner, slot = zigzag.slot_of(pos, n, prompt_len)
    mine = owner == i
    slot = jnp.where(mine, slot, 0)

    def write(c, new, s, m):
        old = jax.lax.dynamic_slice_in_dim(c, s, 1, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(m, new.astype(c.dtype), old), s, axis=0)
    cache_k = jax.vmap(write)(cache_k, k_new, slot, mine)
    cache_v = jax.vmap(write)(cache_v, v_new, slot, mine)
    slots = cache_k.shape[1]
    mask = (zigzag.slot_positions(i, slots, n, prompt_len)[None, :] <= pos[:, None])[:, None, :]  # [B,1,T/n]
    o, m, l = accumulate(empty_partial(q, cache_k.shape[2]), q, cache_k.astype(q.dtype),
                         cache_v.astype(q.dtype), mask)
    m_all = jax.lax.pmax(m, axis)
    scale = jnp.exp(m - m_all)  # [B,KV,G,1]
    o = o * jnp.moveaxis(scale, -1, 1)[..., None]
    l = l * scale
    # out and sum in one all-reduce: the sum rides along as one more channel of the head dimension
    packed = jax.lax.psum(jnp.concatenate([o, jnp.moveaxis(l, -1, 1)[..., None]], axis=-1), axis)
    out = packed[..., :-1] / packed[..., -1:]
    b, s, kv, g, d = out.shape
    return out.astype(q.dtype).reshape(b, s, kv * g, d), cache_k, cache_v
