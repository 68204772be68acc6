"""The decode state and the prefill batch: plain dataclasses registered as pytrees, so the compiled programs take
and return them whole (the state donated, its KV pools updated in place).

Per slot (a row of the running batch) the state holds what decoding needs on device: the last sampled token,
how many tokens its cache holds, how many it has generated, its request's limits and sampling parameters and a
done flag. Which pages hold a slot's tokens (the page table) is the host's: its allocator decides, and each
program gets the table rows it needs."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STOP_WIDTH = 4  # stop token ids per request kept on device (end-of-sequence ids; -1 pads)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RequestRows:
    """A request's limits and sampling parameters, one row per slot (state) or per prompt (prefill batch)."""
    max_new: Any  # [N] int32: tokens to generate at most (already bounded by the context window)
    temperature: Any  # [N] float32, 0 = greedy
    top_k: Any  # [N] int32, 0 = off
    top_p: Any  # [N] float32
    keys: Any  # [N, 2] uint32: the request's seed key (sampling.seed_key)
    stop_ids: Any  # [N, STOP_WIDTH] int32: token ids that end the request (-1 pads)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: Any  # KV pools per layer group and unit position: [repeats, pages, page_size, 2 * kv_heads, head_dim]
    # (keys and values interleaved by head, parallel/paged.py), or MLA's latent [..., 1, latent_dim]
    tokens: Any  # [S] int32: each slot's last sampled token (not yet written to the cache)
    lengths: Any  # [S] int32: tokens in the slot's cache (the next token's position)
    generated: Any  # [S] int32: tokens emitted so far (also the sampling step of the next one)
    done: Any  # [S] bool: True for free slots, finished requests and prompts still being prefilled
    request: RequestRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillBatch:
    """One chunk of R prompts: tokens [R, C] at positions start + 0..C-1 (in the layout's sequence order), of
    which the first `length` are real. `table` [R, nb]: each row's pages. Rows with `final` set end their
    prompt: their next token is sampled and they join the running batch in state slot `slot` (a slot of the
    row's own batch shard; -1: a padding row). `generated`: tokens the request had already generated (a
    preempted request comes back with them appended to its prompt, and its sampling steps go on from there)."""
    tokens: Any
    start: Any
    length: Any
    table: Any
    final: Any
    slot: Any
    generated: Any
    request: RequestRows


_REQUEST_NAMES = RequestRows(max_new=("batch",), temperature=("batch",), top_k=("batch",), top_p=("batch",),
                             keys=("batch", None), stop_ids=("batch", None))


def state_names(cache_names) -> DecodeState:
    """The logical axis names of a DecodeState's leaves (`cache_names` for the pools)."""
    return DecodeState(cache=cache_names, tokens=("batch",), lengths=("batch",), generated=("batch",),
                       done=("batch",), request=_REQUEST_NAMES)


def batch_names() -> PrefillBatch:
    return PrefillBatch(tokens=("batch", "seq"), start=("batch",), length=("batch",), table=("batch", None),
                        final=("batch",), slot=("batch",), generated=("batch",), request=_REQUEST_NAMES)


@dataclasses.dataclass(frozen=True)
class CacheSizes:
    """How the paged KV cache is sized on a layout.

    slots: rows of the running batch (max_num_seqs, padded to the layout's batch multiple); page_size: tokens
    per page; pages_per_shard: pages of each pool block (one block per batch shard and seq device); max_pages:
    columns of a page table (a request's pages at most: max_model_len / page_size, rounded up to the seq split).

    ring_pages: for a model that mixes sliding and full attention layers, the pages of each slot's window ring
    (a multiple of the seq split; 0 otherwise). The sliding layers' pools hold, per slot, a fixed ring of pages
    that logical page j of the slot's request reuses as j % ring_pages (`ring_table`): enough for the window and
    the tokens one iteration computes, so those layers' cache is bounded by the window whatever the context.
    The full layers' pools are the shared, allocated ones."""
    slots: int
    page_size: int
    pages_per_shard: int
    max_pages: int
    batch_shards: int
    seq_shards: int
    ring_pages: int = 0

    @property
    def slots_per_shard(self) -> int:
        return self.slots // self.batch_shards

    @property
    def pool_pages(self) -> int:
        return self.pages_per_shard * self.batch_shards * self.seq_shards

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def ring_pool_pages(self) -> int:
        return self.slots * self.ring_pages


def ring_table(sizes: CacheSizes, slots, columns: int):
    """Page tables [R, columns] of the sliding layers' pools for rows in state slots `slots` [R] (-1: padding):
    logical page j of the slot's request lives in ring slot j % ring_pages, on seq device j % n like every page
    (ring_pages is a multiple of n), at a local index inside the slot's own share of its batch shard's block."""
    n = sizes.seq_shards
    per_device = sizes.ring_pages // n
    j = jnp.arange(columns)[None, :]
    local_slot = (jnp.maximum(slots, 0) % sizes.slots_per_shard)[:, None]
    return (local_slot * per_device + (j % sizes.ring_pages) // n).astype(jnp.int32)


def pages_held(tokens: int, page_size: int, window: int | None = None, ahead: int = 0) -> int:
    """Pages a request of `tokens` tokens holds at once: all of them, or, when every layer attends within a
    sliding window, those from its window's start to the end of the next `ahead` tokens it computes (the
    serving scheduler gives the pages behind the window back)."""
    need = -(-tokens // page_size)
    if window is None:
        return need
    return min(need, -(-(window - 1 + ahead) // page_size) + 1)


def cache_sizes(layout, max_num_seqs: int, max_model_len: int, page_size: int, num_pages: int | None,
                window: int | None = None, ahead: int = 0, ring_window: int | None = None,
                ring_ahead: int | None = None) -> CacheSizes:
    """num_pages: pages per batch shard and seq device (None: enough for every slot at max_model_len, or with a
    sliding window on every layer for the pages a slot holds at once, `pages_held`). ring_window: the window of
    the sliding layers of a model that also has full ones (their pools are per-slot rings, sized for the window
    and `ring_ahead` tokens, default `ahead`)."""
    bm, d, n = layout.batch_multiple, layout.size("batch"), layout.size("cache_seq")
    slots = -(-max_num_seqs // bm) * bm
    per_seq = -(-max_model_len // page_size)
    max_pages = -(-per_seq // n) * n
    if num_pages is None:  # a request's held pages are consecutive logical pages: page j lives on seq device j % n
        num_pages = slots // d * -(-pages_held(max_model_len, page_size, window, ahead) // n)
    ring = 0
    if ring_window is not None:
        ring = ring_pages(max_model_len, page_size, ring_window, ahead if ring_ahead is None else ring_ahead, n)
    return CacheSizes(slots, page_size, int(num_pages), max_pages, d, n, ring)


def ring_pages(max_model_len: int, page_size: int, window: int, ahead: int, n: int) -> int:
    """Pages of a slot's window ring (CacheSizes.ring_pages): those a request holds at once for the window and
    `ahead` tokens, rounded up to a multiple of the n seq devices, and never more than a page table's width."""
    max_pages = -(-(-(-max_model_len // page_size)) // n) * n
    return min(-(-pages_held(max_model_len, page_size, window, ahead) // n) * n, max_pages)


def pool_shape(cfg, kv_heads: int, sizes: CacheSizes, ring: bool = False) -> tuple:
    """A layer's pool: the shared pages, or (ring: a sliding layer of a mixed model) the slots' window rings."""
    pages = sizes.ring_pool_pages if ring else sizes.pool_pages
    return (pages, sizes.page_size, cfg.cache_tensors * kv_heads, cfg.head_size)


def bytes_per_token(cfg, kv_repeat: int, layout) -> int:
    """KV cache bytes one token takes on one device (K and V, or MLA's latent; every layer held there whose
    cache grows with the context: a model mixing sliding and full layers keeps its sliding layers' tokens in
    fixed rings, not counted here)."""
    from jaxpar.model.groups import context_layers
    from jaxpar.layout.plan import cache_kv_heads
    kv = cache_kv_heads(cfg, kv_repeat, layout) // layout.size("kv_heads")
    layers = context_layers(cfg, layout.size("layers"))
    return cfg.cache_tensors * layers * kv * cache_vector_bytes(cfg)


def cache_vector_bytes(cfg) -> int:
    """Bytes the cache takes for one token's key (or value) of one head: head_size values in the compute dtype,
    or in 8 bits plus their scale (in the compute dtype)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return cfg.head_size * itemsize if cfg.kv_dtype is None else cfg.head_size + itemsize


def host_rows(n: int) -> RequestRows:
    """Zeroed request rows on the host (numpy), to fill in."""
    return RequestRows(max_new=np.zeros(n, np.int32), temperature=np.zeros(n, np.float32),
                       top_k=np.zeros(n, np.int32), top_p=np.ones(n, np.float32), keys=np.zeros((n, 2), np.uint32),
                       stop_ids=np.full((n, STOP_WIDTH), -1, np.int32))

