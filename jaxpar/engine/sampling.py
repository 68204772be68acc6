"""Token sampling on device: greedy, temperature, top-k, top-p, with per-row keys so every mesh (and any
batch padding) draws the same random numbers for the same prompt."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed_key, row_ids, step):
    """One key per prompt, a function of (seed, prompt index, step) only."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(seed_key, r), step))(row_ids)


def sample(logits, keys, temperature, top_k, top_p, greedy: bool):
    """logits [B, V] float32 -> tokens [B] int32. temperature/top_k/top_p are traced scalars."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    vals, idx = jax.lax.top_k(logits / temperature, vocab)  # sorted, descending
    rank = jnp.arange(vocab)[None, :]
    keep = (top_k <= 0) | (rank < top_k)
    vals = jnp.where(keep, vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before this token
    vals = jnp.where((before < top_p) | (rank == 0), vals, -jnp.inf)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    choice = jnp.argmax(vals + gumbel, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
