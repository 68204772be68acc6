"""The platforms' fused attention over the paged KV cache (decode steps and a prompt's later chunks), for
pages held whole on each device (no `cache_seq` split; heads and batch may be split, so the kernel runs per
device inside shard_map):

- TPU: JAX's ragged paged attention (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), the kernel
  vLLM's TPU backend runs: it reads each row's pages through the page table itself (no gathered copy of the
  cache), with causal, sliding-window and soft-capped scores and grouped queries. It takes the pool as it is
  (engine/state.pool_shape: keys and values interleaved by head, [pages, page_size, 2 * kv_heads, head_dim]).
- CUDA and CPU: none; the pages are gathered by XLA (parallel/paged.py).

Attention sinks and MLA's latent cache have no counterpart in the kernel, and its tiles need the head dim in
multiples of 128 lanes and the kv heads on a device in counts it can tile: `unfit` says what stops it, and
the caller then gathers the pages (paged.py). The queries of a call are packed row after row (the kernel's
ragged layout: a row's padding takes no place), run, and unpacked.

On CPU the kernel cannot run: TPU interpret mode (`pltpu.force_tpu_interpret_mode`) stops on the kernel's
reshape of a DMA'd buffer ("'ReshapeTransform' object has no attribute 'indices'", jax 0.10.2), so tests check
the packing and arguments against the kernel's own reference (`ref_ragged_paged_attention`, reference=True)
and lower the kernel for TPU (`inspect --platform tpu`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model.attend import AttentionSpec
from jaxpar.parallel.prefill_kernels import no_fused_kernel

KERNELS = {"tpu": "ragged-paged"}
LANES = 128


def unfit(platform: str, head_dim: int, heads: int, kv_heads: int, spec: AttentionSpec, sinks: bool,
          dtype) -> str | None:
    """Why `platform`'s kernel cannot attend over the pages with `heads` query and `kv_heads` kv heads per
    device (None: it can)."""
    if platform not in KERNELS:
        return f"no kernel on {platform}"
    if why := no_fused_kernel(spec, sinks):
        return why
    if head_dim % LANES:
        return f"head_dim {head_dim} is not a multiple of {LANES}"
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel
    try:
        kernel.get_min_heads_per_blk(heads, 2 * kv_heads, jnp.dtype(dtype), jnp.dtype(dtype))
    except ValueError:
        return f"{kv_heads} kv heads per device cannot be tiled (1, 2, 4, 8 or a multiple of 8 in bfloat16)"
    return None


def _pack(q, positions, valid):
    """Rows of S query slots -> the kernel's ragged batch: each row's valid tokens (a prefix of the row) one
    after another. -> (queries [B*S, H, D], kv_lens [B], cu_q_lens [B+1], where each slot went [B, S])."""
    b, s = valid.shape
    q_lens = valid.sum(axis=1).astype(jnp.int32)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    kv_lens = jnp.where(q_lens > 0, positions[:, 0] + q_lens, 0).astype(jnp.int32)  # through the row's last token
    dest = jnp.where(valid, cu[:-1, None] + jnp.arange(s)[None, :], b * s)  # padding: nowhere
    packed = jnp.zeros((b * s,) + q.shape[2:], q.dtype).at[dest.reshape(-1)].set(
        q.reshape((b * s,) + q.shape[2:]), mode="drop")
    return packed, kv_lens, cu, dest


def ragged_paged(q, pool, table, positions, valid, spec: AttentionSpec, reference: bool = False):
    """One device's queries q [B, S, H, D] at positions [B, S] (valid [B, S], a prefix of each row) over the
    pages of `table` [B, nb] in `pool` [pages, page_size, 2 * KV, D], their own tokens already written
    -> [B, S, H, D] (padding slots undefined). reference: the kernel's pure-JAX reference (tests on CPU)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel
    b, s, h, d = q.shape
    packed, kv_lens, cu, dest = _pack(q, positions, valid)
    num_seqs = jnp.array([b], jnp.int32)
    scale = d ** -0.5 if spec.scale is None else spec.scale
    kw = dict(sm_scale=scale, sliding_window=spec.window, soft_cap=spec.softcap)
    args = (packed, pool, kv_lens, table.astype(jnp.int32), cu, num_seqs)
    if reference:
        out = kernel.ref_ragged_paged_attention(*args, **kw)
        out = jnp.concatenate([out, jnp.zeros((b * s - out.shape[0],) + out.shape[1:], out.dtype)])
    else:
        if jax.default_backend() != "tpu":  # lowering elsewhere: the library's untuned defaults, as on TPU
            kw.update(num_kv_pages_per_block=min(table.shape[1], 128), num_queries_per_block=min(b * s, 32))
        out = kernel.ragged_paged_attention(*args, **kw)
    return out[jnp.minimum(dest, b * s - 1)].astype(q.dtype)
