"""A group of layers (model/groups.py), run as one scan or pipelined over the `stage` axis in the same SPMD
program.

Pipeline (GPipe schedule, for prefill and decode alike): a group's stacked repeats are split over `stage` (each
device holds R/P consecutive repeats and their KV cache; the groups go through the stages in turn; a group whose
repeats do not divide by P is padded with repeats the stages skip, model/groups.Form), the batch
is cut into M microbatches (microbatch m holds rows m, m+M, m+2M, ...), and the program runs M+P-1 ticks. At tick t stage s works on microbatch
t-s when 0 <= t-s < M (otherwise it idles: the P-1 fill and drain ticks of the bubble, (P-1)/(M+P-1) of
the time); then every stage hands its activations to the next with one `ppermute`. Stage 0 takes
microbatch t from the input; the last stage's results are gathered once at the end. Only activations move
between stages, never weights."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpar.layout.rules import active


def run_layers(layer, state, x, rows, cache, repeats: int):
    """Apply a group's repeats to x [B, S, D].

    layer(h, unit_state, unit_cache, rows) -> (h, unit_cache, stats) applies one repeat of the group's unit;
    state: the group's parameters (leading layers axis, one entry per slot); rows: per-row inputs (leading
    batch axis, model/layers.Rows); cache: the group's KV pools (leading layers axis) or None; repeats: the
    real ones, the first of the slots (the rest pad the group to a multiple of the pipeline stages and are
    skipped). Returns (x, cache, stats) with stats stacked over slots (zero for the padding).

    One repeat (the split form, model/groups.py) is applied directly to its parameters, so its weights are
    read where they lie; several are scanned, or pipelined under a `layers` axis."""
    lay = active()
    slots = jax.tree.leaves(state)[0].shape[0]
    if slots > repeats:
        layer = _skipping(layer)
    if lay is not None and lay.size("layers") > 1:
        return _pipeline(layer, state, x, rows, cache, lay, repeats, slots > repeats)
    if slots == 1:
        first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
        x, cache, stats = layer(x, first(state), None if cache is None else first(cache), rows)
        again = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
        return x, (None if cache is None else again(cache)), again(stats)

    def body(h, xs):
        unit_state, unit_cache, real = xs
        h, unit_cache, stats = layer(h, unit_state, unit_cache, rows, *((real,) if slots > repeats else ()))
        return h, (unit_cache, stats)
    x, (cache, stats) = jax.lax.scan(body, x, (state, cache, jnp.arange(slots) < repeats))
    return x, cache, stats


def _skipping(layer):
    """layer, taking one more argument: whether the slot holds a real repeat. A padding slot passes its input
    through and reports zero statistics (its pools are its own, so what it writes there is never read)."""
    def run(h, unit_state, unit_cache, rows, real):
        out, unit_cache, stats = layer(h, unit_state, unit_cache, rows)
        return (jnp.where(real, out, h), unit_cache,
                jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), stats))
    return run


def _microbatches(tree, m):
    """[B, ...] -> [B/m, m, ...]: microbatch j is rows j, j+m, ... (keeps a batch split over `data` intact)."""
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // m, m) + a.shape[1:]), tree)


def _pipeline(layer, state, x, rows, cache, lay, repeats: int, padded: bool):
    axis = lay.axes("layers")
    p = lay.size("layers")
    m = lay.microbatches
    per_stage = jax.tree.leaves(state)[0].shape[0] // p

    def local(state, x, rows, cache):
        s = jax.lax.axis_index(axis)
        xs, rs = _microbatches(x, m), _microbatches(rows, m)

        real = s * per_stage + jnp.arange(per_stage) < repeats  # this stage's slots that hold real repeats

        def stack(h, mb, cache_mb, valid):
            def body(h, xs):
                layer_state, layer_cache, real_slot = xs
                h, layer_cache, stats = layer(h, layer_state, layer_cache,
                                              dataclasses.replace(mb, valid=mb.valid & valid),
                                              *((real_slot,) if padded else ()))
                return h, (layer_cache, stats)
            return jax.lax.scan(body, h, (state, cache_mb, real))

        def tick(carry, t):
            buf, outs, cs = carry
            j = t - s
            working = (j >= 0) & (j < m)
            j = jnp.clip(j, 0, m - 1)
            mb = jax.tree.map(lambda a: a[:, j], rs)
            inp = jnp.where(s == 0, xs[:, jnp.minimum(t, m - 1)], buf)
            # the stage's whole KV pool: pages are shared by every row, and a token writes only while it is
            # valid, so idle ticks write nothing
            h, (cs, stats) = stack(inp, mb, cs, working)
            outs = outs.at[:, j].set(jnp.where(working & (s == p - 1), h, outs[:, j]))
            buf = jax.lax.ppermute(h, axis, [(i, i + 1) for i in range(p - 1)])
            return (buf, outs, cs), stats  # idle ticks route nothing, so their statistics are zero

        carry = (jnp.zeros_like(xs[:, 0]), jnp.zeros_like(xs), cache)
        (_, outs, cs), per_tick = jax.lax.scan(tick, carry, jnp.arange(m + p - 1))
        acc = jax.tree.map(lambda a: a.sum(axis=0), per_tick)
        # the last stage's results to every stage; summed in float32 (XLA:CPU aborts promoting a bf16
        # all-reduce over a manual axis), exact since every other stage adds zeros
        out = jax.lax.psum(jnp.where(s == p - 1, outs, 0).astype(jnp.float32), axis).astype(outs.dtype)
        return out.reshape(x.shape), cs, acc

    staged = P(axis if len(axis) > 1 else axis[0])
    return jax.shard_map(local, mesh=lay.mesh, in_specs=(staged, P(), P(), staged),
                         out_specs=(P(), staged, staged), axis_names=frozenset(axis),
                         check_vma=False)(state, x, rows, cache)
