"""The paged KV cache: each layer's keys and values live in a pool of fixed-size pages, and a page table says
which pages hold a request's tokens (position p is slot p % page of the request's logical page p // page).

Layout of a pool: [pages, page_size, kv_heads, head_dim], the pages split over the batch axes (each data or
expert shard owns the pages of its own slots) and over the `seq` axes (a request's logical page j lives on
seq device j % n, so its tokens spread evenly over the seq devices whatever its length). Page-table entries are
indices into the local pool of the device that owns the page, so every gather and write below runs inside a
shard_map on local arrays: no collective is needed to find a page.

- `write_pages`: new keys/values [B, S, KV, D] at their positions into the pool. With the sequence split over
  `seq` (a prompt in ring/Ulysses prefill), the chunk's keys/values are first gathered over `seq` (each device
  keeps the positions whose pages it owns); their positions come whole from the caller (computed per row,
  not gathered).
- `paged_attention`: S new tokens per row (S = 1 in decode; a later chunk of a prompt otherwise) are written,
  then attend over every cached position up to their own. Over `seq`, each device attends over its own pages
  and the partial results merge with one max and one (packed) sum all-reduce (FlashDecoding across devices).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.layout.rules import active
from jaxpar.model.attend import AttentionSpec, accumulate, attend, empty_partial, with_sinks

POOL = ("pages", None, "kv_heads", "head_dim")
Q = ("batch", "seq", "heads", "head_dim")
KV = ("batch", "seq", "kv_heads", "head_dim")
ROWS = ("batch", "seq")
TABLE = ("batch", None)


def _seq_axes():
    """(mesh axes the cache's pages spread over by position, their size) under the active layout."""
    lay = active()
    if lay is None:
        return (), 1
    return lay.axes("cache_seq"), lay.size("cache_seq")


def _write_local(pool, new, table, positions, valid, axis, n):
    """Per device: write the tokens whose pages this device owns. pool [P, page, KV, D]; new [b, s, KV, D];
    table [b, nb] (local page indices); positions, valid [b, s]."""
    page = pool.shape[1]
    logical = positions // page
    col = jnp.clip(logical, 0, table.shape[1] - 1)
    idx = jnp.take_along_axis(table, col, axis=1)  # [b, s] local page of each token
    ok = valid & (logical < table.shape[1])
    if n > 1:
        ok = ok & (logical % n == jax.lax.axis_index(axis))
    idx = jnp.where(ok, idx, pool.shape[0])  # out of range: dropped
    b, s = positions.shape
    return pool.at[idx.reshape(b * s), (positions % page).reshape(b * s)].set(
        new.reshape((b * s,) + new.shape[2:]).astype(pool.dtype), mode="drop")


def _cached_heads(x, pool):
    """New keys or values [b, s, KV, D] -> the kv heads the pool holds: under Ulysses the model's kv heads come
    repeated (consecutively) for its all-to-all, and the pool keeps one copy of each (engine/state.cache_kv_heads)."""
    stride = x.shape[2] // pool.shape[2]
    return x if stride == 1 else x[:, :, ::stride]


def _gather_seq(x, axis, n):
    """A sequence-split [b, s/n, ...] block -> the whole sequence [b, s, ...] on every seq device."""
    return jax.lax.all_gather(x, axis, axis=1, tiled=True) if n > 1 else x


def write_pages(pools, k, v, table, positions, valid):
    """After prefill attention: the prompt chunk's K and V [B, S, KV, D] into the layer's pools (k, v), or its
    latent k into the one pool (k,) of a latent cache. positions, valid [B, S_all]: of the whole chunk in the
    sequence's order (not split over seq)."""
    axis, n = _seq_axes()
    lay = active()
    split = lay is not None and lay.size("seq") > 1  # the chunk itself is split over seq (prefill)
    new = (k, v)[:len(pools)]

    def body(pools, new, table, positions, valid):
        new = tuple(_cached_heads(x, p) for p, x in zip(pools, new))  # before the gather: fewer bytes
        return tuple(_write_local(p, _gather_seq(x, axis, n) if split else x, table, positions, valid, axis, n)
                     for p, x in zip(pools, new))
    if lay is None or lay.mesh.size == 1:
        return body(pools, new, table, positions, valid)
    pool, kv, rows = lay.spec(POOL), lay.spec(KV), lay.spec(("batch", None))
    return lay.shard_map(body, in_specs=((pool,) * len(pools), (kv,) * len(pools), lay.spec(TABLE), rows, rows),
                         out_specs=(pool,) * len(pools))(tuple(pools), new, table, positions, valid)


def decode_kernel(lay) -> str:
    """What attention over the paged cache (decode, a prompt's later chunks) runs under `lay`, for reports:
    the pages gathered by XLA, then attention in one piece or block by block, merged over `seq` (FlashDecoding)
    when the pages spread over it."""
    return "paged-gather" + ("+seq-merge" if lay is not None and lay.size("cache_seq") > 1 else "")


# Keys per step when a row's pages are read block by block: the score array stays [b, H, s, BLOCK_TOKENS], and
# the loop stops at the last page any row of the call has filled, so a wide page table costs nothing unused.
BLOCK_TOKENS = 256


def _attend_local(q, k, v, pools, table, positions, valid, sinks=None, *, axis, n, spec: AttentionSpec):
    """Per device: write the new tokens, then attend over this device's pages (every page when n = 1); pools:
    (k, v), or a latent cache's (k,) whose values are its keys.
    A table of at most BLOCK_TOKENS tokens is read in one piece; a wider one block by block (online softmax),
    from the first block a valid position's window reaches (the first page without a window) to the last page
    a valid position of the call reaches."""
    k, v = _cached_heads(k, pools[0]), _cached_heads(v, pools[0])
    pools = tuple(_write_local(p, x, table, positions, valid, axis, n) for p, x in zip(pools, (k, v)))
    pk, pv = pools[0], pools[-1]
    page = pk.shape[1]
    b, nb = table.shape
    local = nb // n  # this device's logical pages: j = i, i + n, i + 2n, ...
    first = jax.lax.axis_index(axis) if n > 1 else 0
    per_block = max(1, BLOCK_TOKENS // page)

    def block_inputs(cols):
        key_pos = (cols[:, None] * page + jnp.arange(page)[None, :]).reshape(-1)  # [T]
        pages = jnp.take(table, cols, axis=1, mode="fill", fill_value=0)  # [b, len(cols)]
        keys = pk[pages].reshape(b, -1, *pk.shape[2:]).astype(q.dtype)
        vals = keys if spec.latent else pv[pages].reshape(b, -1, *pv.shape[2:]).astype(q.dtype)
        in_table = jnp.repeat(cols < nb, page)[None, None, :]
        mask = spec.visible(positions[:, :, None], key_pos[None, None, :]) & in_table
        return keys, vals, mask  # as the spec says over the cached positions, none past the table

    if local <= per_block:
        keys, vals, mask = block_inputs(first + n * jnp.arange(local))
        if n == 1:
            return attend(q, keys, vals, mask, spec, sinks), pools
        acc = accumulate(empty_partial(q, keys.shape[2]), q, keys, vals, mask, spec)
    else:
        last_page = jnp.max(jnp.where(valid, positions, 0)) // page
        filled = jnp.maximum(last_page - first, -1) // n + 1  # this device's pages up to last_page
        blocks = -(-filled // per_block)
        start = 0
        if spec.window is not None:  # blocks wholly before every valid position's window hold nothing visible
            lo_page = jnp.maximum(jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max // 2))
                                  - spec.window + 1, 0) // page
            start = jnp.minimum((jnp.maximum(lo_page - first, 0) + n - 1) // n // per_block,
                                jnp.maximum(blocks - 1, 0))

        def step(j, acc):
            keys, vals, mask = block_inputs(first + n * (j * per_block + jnp.arange(per_block)))
            return accumulate(acc, q, keys, vals, mask, spec)
        # the first block outside the loop: the carry then has the types (and varying mesh axes) of the result
        acc = jax.lax.fori_loop(start + 1, blocks, step, step(start, empty_partial(q, k.shape[2])))
    o, m, l = acc
    if n > 1:  # merge the devices' partial results
        m_all = jax.lax.pmax(m, axis)
        scale = jnp.exp(m - m_all)
        o = o * jnp.moveaxis(scale, -1, 1)[..., None]
        l = l * scale
        # out and sum in one all-reduce: the sum rides along as one more channel of the head dimension
        packed = jax.lax.psum(jnp.concatenate([o, jnp.moveaxis(l, -1, 1)[..., None]], axis=-1), axis)
        o, l = packed[..., :-1], jnp.moveaxis(packed[..., -1], 1, -1)
        m = m_all
    if sinks is not None:  # once, after the devices' partial results are merged
        o, m, l = with_sinks((o, m, l), sinks)
    out = o / jnp.maximum(jnp.moveaxis(l, -1, 1)[..., None], jnp.finfo(jnp.float32).tiny)
    bb, s, kv, g, d = out.shape
    return out.astype(q.dtype).reshape(bb, s, kv * g, d), pools


def paged_attention(q, k, v, pools, table, positions, valid, spec: AttentionSpec, sinks=None):
    """New tokens q [B,S,H,D], k, v [B,S,KV,D] at positions [B,S] (valid [B,S]) of rows whose pages are
    `table` [B, nb]: write their K/V into the pools, attend over the cached positions `spec` makes visible
    (with attention sinks [H] when given). The sequence of q is not split (decode rules); the pools' pages are.
    -> (out [B,S,H,D], pools)."""
    axis, n = _seq_axes()
    lay = active()
    body = functools.partial(_attend_local, axis=axis, n=n, spec=spec)
    pools = tuple(pools)
    args = (q, k, v, pools, table, positions, valid) + (() if sinks is None else (sinks,))
    if lay is None or lay.mesh.size == 1:
        return body(*args)
    pool, rows = lay.spec(POOL), lay.spec(ROWS)
    specs = (lay.spec(Q), lay.spec(KV), lay.spec(KV), (pool,) * len(pools), lay.spec(TABLE), rows, rows)
    return lay.shard_map(body, in_specs=specs + (() if sinks is None else (lay.spec(("heads",)),)),
                         out_specs=(lay.spec(Q), (pool,) * len(pools)))(*args)

