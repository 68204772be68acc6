"""The paged KV cache: each layer's keys and values live in a pool of fixed-size pages, and a page table says
which pages hold a request's tokens (position p is slot p % page of the request's logical page p // page).

Layout of a layer's pool: [pages, page_size, 2 * kv_heads, head_dim], keys and values interleaved by head (key
of kv head h at 2h, its value at 2h + 1: the layout TPU's ragged paged attention kernel reads, and one write
per token instead of two), or MLA's latent [pages, page_size, 1, latent_dim] whose values are its keys. The
pages are split over the batch axes (each data or expert shard owns the pages of its own slots) and over the `seq` axes (a request's logical page j lives on
seq device j % n, so its tokens spread evenly over the seq devices whatever its length). Page-table entries are
indices into the local pool of the device that owns the page, so every gather and write below runs inside a
shard_map on local arrays: no collective is needed to find a page.

- `write_pages`: new keys/values [B, S, KV, D] at their positions into the pool. With the sequence split over
  `seq` (a prompt in ring/Ulysses prefill), the chunk's keys/values are first gathered over `seq` (each device
  keeps the positions whose pages it owns); their positions come whole from the caller (computed per row,
  not gathered).
- `paged_attention`: S new tokens per row (S = 1 in decode; a later chunk of a prompt otherwise) are written,
  then attend over every cached position up to their own: on TPU through the ragged paged attention kernel
  when it takes the layer (decode_kernels.py), otherwise over pages gathered by XLA. Over `seq`, each device
  attends over its own pages and the partial results merge with one max and one (packed) sum all-reduce
  (FlashDecoding across devices).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.layout.rules import active
from jaxpar.model import quant
from jaxpar.model.attend import AttentionSpec, accumulate, attend, empty_partial, with_sinks
from jaxpar.model.quant import Quantized
from jaxpar.parallel import decode_kernels

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
    rows, slots = idx.reshape(b * s), (positions % page).reshape(b * s)
    # an 8-bit cache: the values and their scale per token and head, as the layer quantized them
    return jax.tree.map(lambda p, x: p.at[rows, slots].set(x.reshape((b * s,) + x.shape[2:]).astype(p.dtype),
                                                           mode="drop"), pool, new)


def cache_entries(k, v, pool):
    """New keys and values [b, s, KV, D] (an 8-bit cache's: Quantized, with their scales [b, s, KV, 1]) as
    `pool` holds them: [b, s, 2 * KV', D], interleaved by head, or MLA's latent keys (v None) as they are.
    Under Ulysses the model's kv heads come repeated (consecutively) for its all-to-all, and the pool keeps
    one copy of each (layout/plan.cache_kv_heads): KV' = KV / repeats."""
    heads = pool.shape[2] // (1 if v is None else 2)
    k = jax.tree.map(lambda a: a[:, :, ::a.shape[2] // heads], k)
    if v is None:
        return k
    v = jax.tree.map(lambda a: a[:, :, ::a.shape[2] // heads], v)
    return jax.tree.map(lambda a, b: jnp.stack([a, b], axis=3).reshape(a.shape[:2] + (2 * heads, a.shape[-1])),
                        k, v)


def read_pages(pool, pages, latent: bool, dtype):
    """The keys and values of `pages` [b, n] (local page indices) -> ([b, n * page_size, KV, D],) * 2 in dtype
    (an 8-bit cache dequantized after the gather). Each is gathered from its own strided view of the pool (XLA
    folds the view into the gather): gathering the pages whole and then splitting keys from values would copy
    everything read twice."""
    def gather(view):
        if isinstance(view, Quantized):
            return Quantized(gather(view.values), gather(view.scale)).dequantize(dtype)
        return jnp.take(view, pages, axis=0).reshape((pages.shape[0], -1) + view.shape[2:]).astype(dtype)
    if latent:
        keys = gather(pool)
        return keys, keys
    return gather(jax.tree.map(lambda a: a[:, :, 0::2], pool)), gather(jax.tree.map(lambda a: a[:, :, 1::2], pool))


def _gather_seq(x, axis, n):
    """A sequence-split [b, s/n, ...] block (or a Quantized pair of them) -> the whole sequence [b, s, ...] on
    every seq device."""
    return jax.tree.map(lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True), x) if n > 1 else x


def write_pages(pool, k, v, table, positions, valid):
    """After prefill attention: the prompt chunk's keys and values [B, S, KV, D] into the layer's pool (MLA: v
    None, k its latent). positions, valid [B, S_all]: of the whole chunk in the sequence's order (not split
    over seq)."""
    axis, n = _seq_axes()
    lay = active()
    split = lay is not None and lay.size("seq") > 1  # the chunk itself is split over seq (prefill)

    def body(pool, k, v, table, positions, valid):
        entries = cache_entries(k, v, pool)  # before the gather: fewer bytes
        return _write_local(pool, _gather_seq(entries, axis, n) if split else entries, table, positions, valid,
                            axis, n)
    if lay is None or lay.mesh.size == 1:
        return body(pool, k, v, table, positions, valid)
    rows = lay.spec(("batch", None))
    pool_spec = quant.spec(lay, pool, POOL)
    kv = None if v is None else quant.spec(lay, v, KV)
    return lay.shard_map(body, in_specs=(pool_spec, quant.spec(lay, k, KV), kv, lay.spec(TABLE), rows, rows),
                         out_specs=pool_spec)(pool, k, v, table, positions, valid)


def decode_kernel(lay, spec: AttentionSpec, sinks: bool, heads: int, kv_heads: int, head_dim: int,
                  dtype, kv_scaled: bool = False) -> tuple:
    """Which attention over the paged cache (decode, a prompt's later chunks) runs under `lay` for a layer with
    this spec and `heads` query / `kv_heads` cached kv heads per device; the one place this is decided
    (`paged_attention` branches on it, `inspect --platform` reports it) -> (name, why the platform's kernel does
    not take the layer, or None): the platform's kernel (decode_kernels.py) when the pages are whole on each
    device and it takes the layer; otherwise "paged-gather": the pages gathered by XLA, then attention in one
    piece or block by block, merged over `seq` (FlashDecoding) when the pages spread over it ("+seq-merge")."""
    if lay is not None and lay.size("cache_seq") > 1:
        return "paged-gather+seq-merge", None
    if lay is None or lay.platform not in decode_kernels.KERNELS:
        return "paged-gather", None
    if kv_scaled:
        return "paged-gather", "the 8-bit cache has a scale per token and head; the kernel takes one per tensor"
    why = decode_kernels.unfit(lay.platform, head_dim, heads, kv_heads, spec, sinks, dtype)
    return ("paged-gather" if why else decode_kernels.KERNELS[lay.platform]), why


# Keys per step when a row's pages are read block by block: the score array stays [b, H, s, BLOCK_TOKENS], and
# the loop stops at the last page any row of the call has filled, so a wide page table costs nothing unused.
BLOCK_TOKENS = 256


def _attend_local(q, k, v, pool, table, positions, valid, sinks=None, *, axis, n, spec: AttentionSpec,
                  kernel: bool):
    """Per device: write the new tokens, then attend over this device's pages (every page when n = 1); v None:
    a latent cache whose values are its keys. kernel: the platform's (decode_kernels.py), pages whole here.
    Otherwise a table of at most BLOCK_TOKENS tokens is read in one piece; a wider one block by block (online
    softmax), from the first block a valid position's window reaches (the first page without a window) to the
    last page a valid position of the call reaches."""
    pool = _write_local(pool, cache_entries(k, v, pool), table, positions, valid, axis, n)
    if kernel:
        return decode_kernels.ragged_paged(q, pool, table, positions, valid, spec), pool
    page = pool.shape[1]
    b, nb = table.shape
    local = nb // n  # this device's logical pages: j = i, i + n, i + 2n, ...
    first = jax.lax.axis_index(axis) if n > 1 else 0
    per_block = max(1, BLOCK_TOKENS // page)

    def block_inputs(cols):
        key_pos = (cols[:, None] * page + jnp.arange(page)[None, :]).reshape(-1)  # [T]
        pages = jnp.take(table, cols, axis=1, mode="fill", fill_value=0)  # [b, len(cols)]
        keys, vals = read_pages(pool, pages, spec.latent, q.dtype)
        in_table = jnp.repeat(cols < nb, page)[None, None, :]
        mask = spec.visible(positions[:, :, None], key_pos[None, None, :]) & in_table
        return keys, vals, mask  # as the spec says over the cached positions, none past the table

    kv_heads = pool.shape[2] // (1 if spec.latent else 2)
    if local <= per_block:
        keys, vals, mask = block_inputs(first + n * jnp.arange(local))
        if n == 1:
            return attend(q, keys, vals, mask, spec, sinks), pool
        acc = accumulate(empty_partial(q, kv_heads), q, keys, vals, mask, spec)
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
        acc = jax.lax.fori_loop(start + 1, blocks, step, step(start, empty_partial(q, kv_heads)))
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
    return out.astype(q.dtype).reshape(bb, s, kv * g, d), pool


def paged_attention(q, k, v, pool, table, positions, valid, spec: AttentionSpec, sinks=None):
    """New tokens q [B,S,H,D], k, v [B,S,KV,D] (MLA: v None, k its latent) at positions [B,S] (valid [B,S]) of
    rows whose pages are `table` [B, nb]: write their keys and values into the layer's pool, attend over the
    cached positions `spec` makes visible (with attention sinks [H] when given). The sequence of q is not split
    (decode rules); the pool's pages are. -> (out [B,S,H,D], pool)."""
    axis, n = _seq_axes()
    lay = active()
    heads, kv_heads = q.shape[2], pool.shape[2] // (1 if spec.latent else 2)
    if lay is not None:
        heads, kv_heads = heads // lay.size("heads"), kv_heads // lay.size("kv_heads")
    name, _ = decode_kernel(lay, spec, sinks is not None, heads, kv_heads, q.shape[-1], q.dtype,
                            isinstance(pool, Quantized))
    kernel = name in decode_kernels.KERNELS.values()
    body = functools.partial(_attend_local, axis=axis, n=n, spec=spec, kernel=kernel)
    args = (q, k, v, pool, table, positions, valid, sinks)
    if lay is None or lay.mesh.size == 1:
        return body(*args)
    rows = lay.spec(ROWS)  # an absent v or sinks (None) takes the spec None
    pool_spec = quant.spec(lay, pool, POOL)
    specs = (lay.spec(Q), quant.spec(lay, k, KV), None if v is None else quant.spec(lay, v, KV), pool_spec,
             lay.spec(TABLE), rows, rows,
             None if sinks is None else lay.spec(("heads",)))
    return lay.shard_map(body, in_specs=specs, out_specs=(lay.spec(Q), pool_spec), check_vma=not kernel)(*args)
