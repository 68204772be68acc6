"""The stack of layers, run either as one scan or pipelined over the `stage` axis in the same SPMD program.

Pipeline (GPipe schedule, for prefill and decode alike): the stacked layers are split over `stage` (each
device holds L/P consecutive layers and their KV cache), the batch is cut into M microbatches (microbatch m
holds rows m, m+M, m+2M, ...), and the program runs M+P-1 ticks. At tick t stage s works on microbatch
t-s when 0 <= t-s < M (otherwise it idles: the P-1 fill and drain ticks of the bubble, (P-1)/(M+P-1) of
the time); then every stage hands its activations to the next with one `ppermute`. Stage 0 takes
microbatch t from the input; the last stage's results are gathered once at the end. Only activations move
between stages, never weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpar.layout.rules import active


def run_layers(layer, state, x, rows, cache, extra):
    """Apply every layer to x [B, S, D].

    layer(h, layer_state, layer_cache, rows, extra) -> (h, layer_cache, stats) applies one layer;
    state: the stacked layer parameters (leading layers axis); rows: a pytree of per-row inputs (leading
    batch axis); cache: the KV pools (leading layers axis) or None; extra: inputs every
    row shares. Returns (x, cache, stats) with stats stacked over layers.

    state as a list of per-layer states (and cache as a list of per-layer caches): the layers are applied
    one after another in the program (unrolled), so each layer's weights are read where they lie. XLA:CPU
    copies the slice of stacked weights a scan step takes, tripling the bytes a decode step moves. Each layer's
    statistics feed the next layer's input (_after), so the program keeps the scan's collectives, one set per
    layer."""
    if isinstance(state, list):
        stats = []
        new_cache = []
        for i, layer_state in enumerate(state):
            x, layer_cache, st = layer(x, layer_state, None if cache is None else cache[i], rows, extra)
            x = _after(x, st)
            new_cache.append(layer_cache)
            stats.append(st)
        return x, (None if cache is None else new_cache), jax.tree.map(lambda *a: jnp.stack(a), *stats)
    lay = active()
    if lay is None or lay.size("layers") == 1:
        def body(h, xs):
            layer_state, layer_cache = xs
            h, layer_cache, stats = layer(h, layer_state, layer_cache, rows, extra)
            return h, (layer_cache, stats)
        x, (cache, stats) = jax.lax.scan(body, x, (state, cache))
        return x, cache, stats
    return _pipeline(layer, state, x, rows, cache, extra, lay)


def _after(x, stats):
    """x, made to depend on this layer's statistics without changing its value (x + 0 * sum: XLA folds
    0 * a only for integers, since 0 * inf is NaN). Without it, the unrolled layers' statistics all-reduces
    are independent of one another and XLA combines them into one; an optimisation barrier does not stop
    that on XLA:CPU."""
    leaves = jax.tree.leaves(stats)
    if not leaves:
        return x
    return x + (0.0 * sum(jnp.sum(a) for a in leaves)).astype(x.dtype)


def _microbatches(tree, m):
    """[B, ...] -> [B/m, m, ...]: microbatch j is rows j, j+m, ... (keeps a batch split over `data` intact)."""
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // m, m) + a.shape[1:]), tree)


def _pipeline(layer, state, x, rows, cache, extra, lay):
    axis = lay.axes("layers")
    p = lay.size("layers")
    m = lay.microbatches

    def local(state, x, rows, cache, extra):
        s = jax.lax.axis_index(axis)
        xs, rs = _microbatches(x, m), _microbatches(rows, m)

        def stack(h, mb, cache_mb, valid):
            def body(h, xs):
                layer_state, layer_cache = xs
                h, layer_cache, stats = layer(h, layer_state, layer_cache, {**mb, "valid": mb["valid"] & valid},
                                              extra)
                return h, (layer_cache, stats)
            return jax.lax.scan(body, h, (state, cache_mb))

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
    return jax.shard_map(local, mesh=lay.mesh, in_specs=(staged, P(), P(), staged, P()),
                         out_specs=(P(), staged, staged), axis_names=frozenset(axis),
                         check_vma=False)(state, x, rows, cache, extra)
