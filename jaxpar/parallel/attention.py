"""Which attention runs, chosen by the active layout: the model calls these three functions and never
looks at the mesh itself.

- no `seq` axis: blockwise causal attention for prompts of BLOCK_MIN tokens or more (never the whole score
  matrix; key blocks past the diagonal skipped), dense attention for shorter ones, the cache indexed by
  position;
- `seq` axis, `attention: ring | ulysses`: the shard_map kernels of ring_attention.py / ulysses.py;
- `seq` axis, `attention: dense`: plain attention on sequence-sharded tensors, left to XLA (it gathers K/V;
  the baseline the kernels are measured against).
With a `seq` axis the KV cache is sequence-sharded (seq_decode.py) whatever the prefill attention."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.layout.rules import active
from jaxpar.model.attend import attend, causal_blockwise
from jaxpar.parallel.ring_attention import ring_attention_local
from jaxpar.parallel.seq_decode import decode_local, write_prompt_local
from jaxpar.parallel.ulysses import ulysses_attention_local

Q = ("batch", "seq", "heads", "head_dim")
KV = ("batch", "seq", "kv_heads", "head_dim")
CACHE = ("batch", "cache_seq", "kv_heads", "head_dim")


BLOCK_MIN = 512  # prompts at least this long take the blockwise path (below, dense is as fast)


def block_size(s: int) -> int | None:
    """The key/query block of `causal_blockwise` for a prompt of s tokens (padded to a multiple of it), or
    None for dense attention. 128 up to 512 tokens, 256 beyond: about the fastest on XLA:CPU (BENCHMARKS.md,
    "Prefill attention")."""
    if s < BLOCK_MIN:
        return None
    return 128 if s <= 512 else 256


def _seq(logical):
    lay = active()
    if lay is None or lay.size(logical) == 1:
        return None, 1, lay
    return lay.axes(logical), lay.size(logical), lay


def prefill_attention(q, k, v, positions):
    """Causal attention over the prompt. q [B,S,H,D]; k, v [B,S,KV,D]; positions [B,S]."""
    axes, n, lay = _seq("seq")
    block = block_size(q.shape[1]) if axes is None else None
    if block:  # no seq axis: index i holds position i
        return causal_blockwise(q, k, v, block)
    if axes is None or lay.attention == "dense":
        return attend(q, k, v, positions[:, :, None] >= positions[:, None, :])
    body = ring_attention_local if lay.attention == "ring" else ulysses_attention_local
    return lay.shard_map(functools.partial(body, axis=axes, n=n),
                         in_specs=(lay.spec(Q), lay.spec(KV), lay.spec(KV)), out_specs=lay.spec(Q))(q, k, v)


def write_prompt(cache, new):
    """After prefill: the prompt's K (or V) [B,S,KV,D] into a layer's cache [B,T,KV,D]."""
    axes, n, lay = _seq("cache_seq")
    if axes is None:
        return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), 0, axis=1)
    return lay.shard_map(write_prompt_local, in_specs=(lay.spec(CACHE), lay.spec(KV)),
                         out_specs=lay.spec(CACHE))(cache, new)


def decode_attention(q, k, v, cache, pos, prompt_len):
    """One new token per row: write its K/V at position pos [B], attend over the cache [B,T,KV,D] x 2.
    prompt_len: the prompt bucket the cache was filled with (it fixes the sequence-sharded slot map)."""
    axes, n, lay = _seq("cache_seq")
    if axes is None:
        write = jax.vmap(lambda c, x, p: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), p, axis=0))
        ck, cv = (write(c, x, pos) for c, x in zip(cache, (k, v)))
        mask = (jnp.arange(ck.shape[1])[None, :] <= pos[:, None])[:, None, :]
        return attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask), (ck, cv)
    row = lay.spec(("batch",))
    out, ck, cv = lay.shard_map(
        functools.partial(decode_local, axis=axes, n=n),
        in_specs=(lay.spec(Q), lay.spec(KV), lay.spec(KV), lay.spec(CACHE), lay.spec(CACHE), row, lay.spec(())),
        out_specs=(lay.spec(Q), lay.spec(CACHE), lay.spec(CACHE)))(q, k, v, *cache, pos, prompt_len)
    return out, (ck, cv)
