"""Attention arithmetic shared by the dense path and the parallel kernels: grouped-query attention in one
shot, and its blockwise form (an unnormalised partial result plus running max and sum) that ring attention
and sequence-sharded decode merge across blocks and devices (online softmax).

What a layer's attention computes is an `AttentionSpec`; every kernel (dense, blockwise, ring, Ulysses, paged)
takes its visibility rule and its score transform from the spec, so a new variant changes this file only."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """window: sliding-window attention (Mistral, Qwen2, gpt-oss and Gemma's local layers): the query at position
    p sees the keys at p - window + 1 .. p; None: every earlier position (causal).
    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2); None: unchanged.
    scale: the factor applied to q.k; None: head_dim ** -0.5 (Gemma's query_pre_attn_scalar sets another).
    latent: the cache kind. False: grouped K and V. True: MLA's compressed latent in the absorbed form, one
    tensor per token whose values are its keys (the kernels move and cache it once, and use it as both)."""
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    latent: bool = False

    def visible(self, q_pos, k_pos):
        """Whether a query at q_pos may attend to a key at k_pos (broadcasting integer positions)."""
        ok = k_pos <= q_pos
        if self.window is not None:
            ok = ok & (k_pos > q_pos - self.window)
        return ok

    def scores(self, q, k):
        """Scores of grouped queries q [B,S,KV,G,D] against keys k [B,T,KV,D] -> [B,KV,G,S,T], float32."""
        s = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
        s = s * (q.shape[-1] ** -0.5 if self.scale is None else self.scale)
        if self.softcap is not None:
            s = self.softcap * jnp.tanh(s / self.softcap)
        return s


CAUSAL = AttentionSpec()


def _group(q, kv_heads):
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def _sink_logits(sinks, kv_heads):
    """Per-head sink logits [H] -> [KV, G, 1] (broadcast against [B, KV, G, S])."""
    return sinks.astype(jnp.float32).reshape(kv_heads, -1)[:, :, None]


def attend(q, k, v, mask, spec: AttentionSpec = CAUSAL, sinks=None):
    """Grouped-query attention. q [B,S,H,D]; k, v [B,T,KV,D]; mask [B,S,T] (True = may attend; callers build it
    with `spec.visible`). sinks [H] or None: attention sinks (gpt-oss), one learned logit per head that joins
    every query's softmax as a key with no value, so a query may give part of its attention to nothing."""
    b, s, h, d = q.shape
    scores = jnp.where(mask[:, None, None], spec.scores(_group(q, k.shape[2]), k), NEG_INF)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        sink = _sink_logits(sinks, k.shape[2])[..., None]  # [KV, G, 1, 1]
        m = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
        p = jnp.exp(scores - m)
        probs = (p / (p.sum(axis=-1, keepdims=True) + jnp.exp(sink - m))).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def empty_partial(q, kv_heads):
    """The accumulator for a query block that has seen no keys yet: (out [B,S,KV,G,D], max, sum [B,KV,G,S])."""
    b, s, h, d = q.shape
    g = h // kv_heads
    return (jnp.zeros((b, s, kv_heads, g, d), jnp.float32), jnp.full((b, kv_heads, g, s), NEG_INF, jnp.float32),
            jnp.zeros((b, kv_heads, g, s), jnp.float32))


def accumulate(acc, q, k, v, mask=None, spec: AttentionSpec = CAUSAL):
    """Fold one key/value block into a query block's accumulator (online softmax, float32).
    q [B,S,H,D]; k, v [B,T,KV,D]; mask [B,S,T] or None (every key visible)."""
    o, m, l = acc
    s = spec.scores(_group(q, k.shape[2]), k)
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


def with_sinks(acc, sinks):
    """Fold attention sinks [H] into an accumulator, once, before it is normalised (see `attend`)."""
    o, m, l = acc
    sink = _sink_logits(sinks, o.shape[2])
    m_new = jnp.maximum(m, sink)
    scale = jnp.exp(m - m_new)
    return o * jnp.moveaxis(scale, -1, 1)[..., None], m_new, l * scale + jnp.exp(sink - m_new)


def finish(acc, dtype, sinks=None):
    """Normalise an accumulator (with attention sinks [H] when given): -> [B,S,H,D]. A query that saw no key
    gets zeros (not 0/0)."""
    if sinks is not None:
        acc = with_sinks(acc, sinks)
    o, _, l = acc
    b, s, kv, g, d = o.shape
    l = jnp.maximum(jnp.moveaxis(l, -1, 1)[..., None], jnp.finfo(jnp.float32).tiny)
    return (o / l).astype(dtype).reshape(b, s, kv * g, d)


def causal_blockwise(q, k, v, block: int, spec: AttentionSpec = CAUSAL, sinks=None):
    """Causal attention over a prompt in position order, one query block against one key block at a time
    (online softmax, `accumulate`): the largest score array is [B, H, block, block], never [B, H, S, S], and
    key blocks after a query block's diagonal are skipped (about half the work of `attend`); with a sliding
    window, so are the key blocks wholly before it (the work grows with S x window, not S x S).
    q [B,S,H,D]; k, v [B,S,KV,D]; position i at index i. S is padded at the end to a multiple of the block
    (padded keys come after every real query, so the causal mask hides them; padded queries are dropped)."""
    b, s, h, d = q.shape
    pad = -s % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    n, kvh = (s + pad) // block, k.shape[2]
    qb = q.reshape(b, n, block, h, d)
    kb, vb = (x.reshape(b, n, block, kvh, d) for x in (k, v))
    offsets = jnp.arange(block)

    def mask(i, j):  # query block i against key block j
        return jnp.broadcast_to(spec.visible((i * block + offsets)[:, None], (j * block + offsets)[None, :]),
                                (b, block, block))

    def query_block(i):
        qi = qb[:, i]
        if spec.window is None:  # every key block before the diagonal is wholly visible
            first, inner = 0, (lambda j, acc: accumulate(acc, qi, kb[:, j], vb[:, j], None, spec))
        else:
            first = jnp.maximum(i * block - spec.window + 1, 0) // block
            inner = (lambda j, acc: accumulate(acc, qi, kb[:, j], vb[:, j], mask(i, j), spec))
        acc = jax.lax.fori_loop(first, i, inner, empty_partial(qi, kvh))
        return finish(accumulate(acc, qi, kb[:, i], vb[:, i], mask(i, i), spec), q.dtype, sinks)

    out = jax.lax.map(query_block, jnp.arange(n))  # [n, B, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, s + pad, h, d)[:, :s]
