"""Ulysses attention for prefill over the `seq` axis: one all-to-all turns the sequence-sharded Q, K and V
into head-sharded ones over the whole sequence, each device runs ordinary causal attention on its heads,
and one all-to-all turns the result back. Q, K and V travel together, so it is two all-to-alls per layer."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model.attend import AttentionSpec, attend
from jaxpar.parallel import zigzag


def ulysses_attention_local(q, k, v, sinks=None, *, axis, n: int, spec: AttentionSpec):
    """Per-device body (inside shard_map). q [B, S/n, H, D]; k, v [B, S/n, KV, D], H and KV divisible by n;
    the sequence is in zigzag order (zigzag.order); sinks [H]: attention sinks of this device's heads before
    the all-to-all. -> [B, S/n, H, D]."""
    b, sl, h, d = q.shape
    kv = k.shape[2]
    moved = (q, k) if spec.latent else (q, k, v)  # a latent cache's values are its keys
    # [B, S/n, n, heads/n, D] per tensor, heads grouped by destination device, then Q|K|V side by side
    parts = [x.reshape(b, sl, n, x.shape[2] // n, d) for x in moved]
    qkv = jax.lax.all_to_all(jnp.concatenate(parts, axis=3), axis, split_axis=2, concat_axis=1, tiled=True)
    qkv = qkv.reshape(b, sl * n, (h + (len(moved) - 1) * kv) // n, d)  # the whole sequence, this device's heads
    hq, hk = h // n, kv // n
    ql, kl = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
    vl = kl if spec.latent else qkv[:, :, hq + hk:]
    pos = zigzag.order(sl * n, n)
    pos = jnp.asarray(pos)
    mask = jnp.broadcast_to(spec.visible(pos[:, None], pos[None, :]), (b, sl * n, sl * n))
    if sinks is not None:  # after the all-to-all this device holds the i-th n-th of its heads
        sinks = jax.lax.dynamic_slice_in_dim(sinks, jax.lax.axis_index(axis) * hq, hq)
    out = attend(ql, kl, vl, mask, spec, sinks)  # [B, S, H/n, D]
    out = jax.lax.all_to_all(out.reshape(b, n, sl, hq, d), axis, split_axis=1, concat_axis=3, tiled=True)
    return out.reshape(b, sl, h, d)
