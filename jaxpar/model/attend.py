"""Attention arithmetic shared by the dense path and the parallel kernels: grouped-query attention in one
shot, and its blockwise form (an unnormalised partial result plus running max and sum) that ring attention
and sequence-sharded decode merge across blocks and devices (online softmax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def _group(q, kv_heads):
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def attend(q, k, v, mask):
    """Grouped-query attention. q [B,S,H,D]; k, v [B,T,KV,D]; mask [B,S,T] (True = may attend)."""
    b, s, h, d = q.shape
    scores = jnp.einsum("bskgd,btkd->bkgst", _group(q, k.shape[2]), k,
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def empty_partial(q, kv_heads):
    """The accumulator for a query block that has seen no keys yet: (out [B,S,KV,G,D], max, sum [B,KV,G,S])."""
    b, s, h, d = q.shape
    g = h // kv_heads
    return (jnp.zeros((b, s, kv_heads, g, d), jnp.float32), jnp.full((b, kv_heads, g, s), NEG_INF, jnp.float32),
            jnp.zeros((b, kv_heads, g, s), jnp.float32))


def accumulate(acc, q, k, v, mask=None):
    """Fold one key/value block into a query block's accumulator (online softmax, float32).
    q [B,S,H,D]; k, v [B,T,KV,D]; mask [B,S,T] or None (every key visible)."""
    o, m, l = acc
    d = q.shape[-1]
    s = jnp.einsum("bskgd,btkd->bkgst", _group(q, k.shape[2]), k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:  # a row with no visible key so far must add nothing (exp(0) = 1 otherwise)
        p = jnp.where(mask[:, None, None], p, 0.0)
    scale = jnp.exp(m - m_new)
    l = l * scale + p.sum(axis=-1)
    pv = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o * jnp.moveaxis(scale, -1, 1)[..., None] + pv
    return o, m_new, l


def finish(acc, dtype):
    """Normalise an accumulator: -> [B,S,H,D]."""
    o, _, l = acc
    b, s, kv, g, d = o.shape
    return (o / jnp.moveaxis(l, -1, 1)[..., None]).astype(dtype).reshape(b, s, kv * g, d)


def causal_blockwise(q, k, v, block: int):
    """Causal attention over a prompt in position order, one query block against one key block at a time
    (online softmax, `accumulate`): the largest score array is [B, H, block, block], never [B, H, S, S], and
    key blocks after a query block's diagonal are skipped (about half the work of `attend`).
    q [B,S,H,D]; k, v [B,S,KV,D]; position i at index i. S is padded at the end to a multiple of the block
    (padded keys come after every real query, so the causal mask hides them; padded queries are dropped)."""
    b, s, h, d = q.shape
    pad = -s % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    n, kvh = (s + pad) // block, k.shape[2]
    qb = q.reshape(b, n, block, h, d)
    kb, vb = (x.reshape(b, n, block, kvh, d) for x in (k, v))
    diagonal = jnp.broadcast_to(jnp.tril(jnp.ones((block, block), bool)), (b, block, block))

    def query_block(i):
        qi = qb[:, i]
        acc = jax.lax.fori_loop(0, i, lambda j, acc: accumulate(acc, qi, kb[:, j], vb[:, j]),
                                empty_partial(qi, kvh))
        return finish(accumulate(acc, qi, kb[:, i], vb[:, i], diagonal), q.dtype)

    out = jax.lax.map(query_block, jnp.arange(n))  # [n, B, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, s + pad, h, d)[:, :s]
