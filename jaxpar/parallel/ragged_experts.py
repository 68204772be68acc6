"""Dropless expert dispatch without capacity padding: `jax.lax.ragged_all_to_all` + `jax.lax.ragged_dot`.

The static path (experts.py `_dispatch_local`) sends fixed [E, cap, D] buffers; dropless, cap is all of the
device's tokens, so the wire carries E/k times the routed rows. Here each device sends only its routed rows:

  1. sort the t*k (token, choice) assignments by expert (padding tokens, `valid` False, sort last and are
     never sent), count rows per expert;
  2. all-gather the [E] counts of every device over the expert axis (ep*E int32: the sizes and offsets of
     every slice follow from it on every device, so no second exchange is needed);
  3. ragged all-to-all the sorted rows to the devices holding their experts, into a receive buffer of static
     size ep * t * min(k, E_l) rows: a token's k choices are distinct experts (top-k), so at most
     min(k, E_l) of them land on one device, and all ep sources may send all their tokens to it -- the
     worst case, so nothing is ever dropped;
  4. the buffer holds [source 0: local expert 0.., source 1: ..]; a stable sort by local expert groups it
     for `ragged_dot` (gate, up, down), the permutation is undone, and the inverse ragged all-to-all brings
     each row back to the slot it left; the rows are unsorted, weighted and summed over k.

XLA:CPU cannot compile ragged_all_to_all, so on CPU devices (tests: the path forced through the layout's
`expert_dispatch`) the exchange is `emulated_ragged_all_to_all`, the same semantics from an all-gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.model import quant


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """jax.lax.ragged_all_to_all's semantics from an all-gather of every device's operand and slice table
    (its docstring's pseudocode): each source's slice c (sent to device c // slices_per_device) is written to
    that device's output at the source's output_offsets[c]. Moves ep times the operand; for CPU tests only.
    recv_sizes is not needed (the op requires it to equal the senders' send_sizes)."""
    del recv_sizes
    ep = jax.lax.axis_size(axis_name)
    per = input_offsets.shape[0] // ep
    n = operand.shape[0]
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name).reshape((ep * n,) + operand.shape[1:])
    table = jax.lax.all_gather(jnp.stack([input_offsets, send_sizes, output_offsets]), axis_name)  # [ep, 3, K]
    mine = jax.lax.dynamic_slice_in_dim(table, me * per, per, axis=2)  # every source's slices to this device
    start, size, dst = (mine[:, i].reshape(ep * per, 1) for i in range(3))  # [slices, 1]
    src = jnp.repeat(jnp.arange(ep), per)[:, None]
    rel = jnp.arange(output.shape[0])[None, :] - dst  # [slices, M]: each output row's place in each slice
    take = (rel >= 0) & (rel < size)  # well-formed offsets: at most one slice writes a row
    row = jnp.sum(jnp.where(take, src * n + jnp.clip(start + rel, 0, n - 1), 0), axis=0)
    hit = take.any(axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(hit, ops[row], output)


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def ragged_local(x, idx, weights, valid, w, *, axis, ep, tensor_axes, token_axes, gate, exchange):
    """Per device, inside the expert kernel's shard_map (the in/out specs of experts.expert_ffn): x [b,s,D]
    its tokens; w its E_l experts ([E_l,D,F_l] ...). exchange: jax.lax.ragged_all_to_all or its emulation.
    -> (out [b,s,D], stats [E+1] float32: assignments per expert, then dropped (always 0), over all devices)."""
    b, s, d = x.shape
    k = idx.shape[-1]
    e_local = w["w_gate"].shape[0]
    e = e_local * ep
    t = b * s
    n = t * k
    xt = x.reshape(t, d)
    ok = jnp.repeat(valid.reshape(t), k)
    expert = jnp.where(ok, idx.reshape(n), e)  # padding sorts past the last expert: never sent
    order = jnp.argsort(expert, stable=True)
    rows = xt[order // k]  # [n, D] sorted by expert (assignment i is token i // k's choice i % k)
    counts = jnp.sum(jax.nn.one_hot(expert, e, dtype=jnp.int32), axis=0)  # [E] (padding's one-hot is zero)

    # every device's counts: every[i, j, l] rows from device i for expert l of device j
    every = jax.lax.all_gather(counts, axis).reshape(ep, ep, e_local)  # [src, dst, E_l]
    me = jax.lax.axis_index(axis)
    sizes = every.sum(axis=2)  # [src, dst]
    src_offsets = _exclusive_cumsum(sizes, axis=1)  # where each dst's slice starts in the src's sorted rows
    dst_offsets = _exclusive_cumsum(sizes, axis=0)  # where each src's slice lands in the dst's buffer
    send, recv = sizes[me], sizes[:, me]
    cap = ep * t * min(k, e_local)  # the worst case (module docstring): dropless
    # slice j of this device's rows goes to device j, landing where j's buffer keeps this device's rows
    buf = exchange(rows, jnp.zeros((cap, d), x.dtype), src_offsets[me], send, dst_offsets[me], recv,
                   axis_name=axis)

    # the buffer: source by source, each source's rows by local expert; group them by local expert
    seg = every[:, me].reshape(ep * e_local)  # rows per (source, local expert), in buffer order
    seg_end = jnp.cumsum(seg)
    slot = jnp.searchsorted(seg_end, jnp.arange(cap), side="right")  # (source, expert) segment of each row
    local = jnp.where(slot < ep * e_local, slot % e_local, e_local)  # past the received rows: e_local
    perm = jnp.argsort(local, stable=True)
    group_sizes = every[:, me].sum(axis=0)  # [E_l]
    xin = buf[perm]
    which = jnp.minimum(local[perm], e_local - 1)  # each grouped row's expert (for the biases)
    w = {k: quant.dense(v, x.dtype) for k, v in w.items()}  # ragged_dot takes plain weights
    g = jax.lax.ragged_dot(xin, w["w_gate"], group_sizes)
    u = jax.lax.ragged_dot(xin, w["w_up"], group_sizes)
    if "b_gate" in w:
        g, u = g + w["b_gate"][which], u + w["b_up"][which]
    y = jax.lax.ragged_dot(gate(g, u), w["w_down"], group_sizes)  # rows past the groups: not sent back
    if tensor_axes:  # in float32, as the static path (XLA:CPU cannot promote a bf16 all-reduce in a pipeline)
        y = jax.lax.psum(y.astype(jnp.float32), tensor_axes).astype(x.dtype)
    if "b_down" in w:  # after the sum over the tensor split: added once
        y = y + w["b_down"][which]
    y = jnp.zeros_like(y).at[perm].set(y)  # back to buffer order

    # the inverse exchange: each source's rows back to where they left its sorted rows
    back = exchange(y, jnp.zeros((n, d), x.dtype), dst_offsets[:, me], recv, src_offsets[:, me], send,
                    axis_name=axis)
    got = jnp.zeros_like(back).at[order].set(back)  # unsort: assignment order (padding's rows stay zero)
    scale = (weights.reshape(n) * ok).astype(x.dtype)
    out = (got * scale[:, None]).reshape(t, k, d).sum(axis=1).reshape(b, s, d)
    stats = jnp.concatenate([counts, jnp.zeros((1,), jnp.int32)]).astype(jnp.float32)
    return out, jax.lax.psum(stats, token_axes)
