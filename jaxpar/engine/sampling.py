"""Token sampling on device, per row: each row has its own temperature (0 = greedy), top-k, top-p and key, and
its random numbers depend only on (its seed, how many tokens it has sampled), never on its slot or the batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def seed_key(seed: int) -> np.ndarray:
    """A request's key data (uint32[2]) from its seed, as jax.random.PRNGKey(seed) makes it (threefry: the
    seed's high and low 32 bits), computed on the host without a device round trip."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def sample_rows(logits, keys, steps, temperature, top_k, top_p, any_sampling):
    """logits [B, V] float32; keys [B, 2] uint32; steps [B]: tokens each row sampled before; temperature,
    top_k, top_p [B]; any_sampling: a scalar, False when every row is greedy (the full-vocabulary sort is then
    skipped). -> tokens [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        vocab = logits.shape[-1]
        t = jnp.maximum(temperature, 1e-6)[:, None]
        vals, idx = jax.lax.top_k(logits / t, vocab)  # sorted, descending
        rank = jnp.arange(vocab)[None, :]
        keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        vals = jnp.where(keep, vals, -jnp.inf)
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before this token
        vals = jnp.where((before < top_p[:, None]) | (rank == 0), vals, -jnp.inf)
        gumbel = jax.vmap(lambda k, s: jax.random.gumbel(jax.random.fold_in(k, s), (vocab,), jnp.float32))(
            keys, steps)
        choice = jnp.argmax(vals + gumbel, axis=-1)
        drawn = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(any_sampling, sampled, lambda _: greedy, None)
