"""The compiled programs, pure functions of (parameters, decode state, inputs), each traced under the engine's
layout with shardings from the logical-axis table:

- `logits(params, tokens, valid)`: the full causal forward pass;
- `prefill(params, state, batch)`: one chunk of R prompts into their pages; rows that end their prompt sample
  their first token and join the running batch in their slots (the state is donated: no copy of the cache);
- `generate(params, state, table, release, steps)`: up to `steps` decode steps of every running slot in one
  compiled loop, stopping on device (the one set of stopping rules below), returning those steps' tokens.

Stopping: a sampled token that is one of the request's stop ids ends it and is not emitted; otherwise it is
emitted, and the request ends once it has emitted `max_new` tokens (the host bounds max_new by the context
window: prompt + generated <= max_model_len)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.engine import params as P
from jaxpar.engine.sampling import sample_rows
from jaxpar.engine.state import (DecodeState, PrefillBatch, batch_names, host_rows, pool_shape, ring_table,
                                 state_names)
from jaxpar.layout.plan import cache_kv_heads
from jaxpar.layout.rules import activate, active, constrain
from jaxpar.model.groups import Form, layer_groups
from jaxpar.model.quant import Quantized, storage_dtype
from jaxpar.parallel import zigzag

POOL_NAMES = ("layers", "pages", None, "kv_heads", "head_dim")


def to_global(x, sharding):
    """Host data (the same in every process) -> one array laid out as `sharding` over every process's devices.
    With several processes jit refuses numpy inputs for sharded arguments; each process fills only its own
    devices' shards. Arrays already on the mesh pass through."""
    if isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as numpy in this process: gathered across processes when this one
    holds only part of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class InLayout:
    """A jitted function that traces (and lowers) under its layout, so model code sees the mesh. With several
    processes (jax.distributed), host inputs become global arrays first (`in_shardings`: a pytree per
    argument, None for an argument passed as it is)."""

    def __init__(self, fn, layout, in_shardings=()):
        self.fn, self.layout, self.in_shardings = fn, layout, in_shardings

    def __call__(self, *args):
        if jax.process_count() > 1:
            args = tuple(a if sh is None else jax.tree.map(to_global, a, sh)
                         for a, sh in zip(args, tuple(self.in_shardings) + (None,) * len(args)))
        with activate(self.layout):
            return self.fn(*args)

    def lower(self, *args, platform: str | None = None):
        """Lowered for this machine's devices, or for `platform` (its layout then holds an AbstractMesh)."""
        with activate(self.layout):
            if platform is None:
                return self.fn.lower(*args)
            with jax.sharding.use_abstract_mesh(self.layout.mesh):  # Pallas TPU lowering reads its device kind
                return self.fn.trace(*args).lower(lowering_platforms=(platform,))


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _names_to(layout, tree):
    """A pytree of logical axis names -> the same pytree of NamedShardings."""
    return jax.tree.map(layout.sharding, tree, is_leaf=_is_names)


class Programs:
    """form (model/groups.Form): parameters and KV pools with every layer its own group, the layers applied one
    after another (split), or in the model's own groups, each scanned (or pipelined, padded for the stages)."""

    def __init__(self, cfg, layout, kv_repeat, form: Form, sizes):
        self.cfg, self.layout, self.kv_repeat, self.form, self.sizes = cfg, layout, kv_repeat, form, sizes
        self.groups = layer_groups(cfg, form)
        lay, dec = layout, layout.for_decode()
        self.param_sh = P.shardings(cfg, lay, kv_repeat, form=form)
        pool_axes = POOL_NAMES if cfg.kv_dtype is None else Quantized(POOL_NAMES, POOL_NAMES[:-1] + (None,))
        pool_names = tuple((pool_axes,) * len(g.unit) for g in self.groups)
        self.state_sh = _names_to(lay, state_names(pool_names))
        self.batch_sh = _names_to(lay, batch_names())
        self.paged_batch_sh = _names_to(dec, batch_names())  # later chunks: the sequence is not split
        row, rep, table = lay.sharding(("batch",)), lay.sharding(()), lay.sharding(("batch", None))
        self.row_sh, self.rep_sh = row, rep
        tok2 = lay.sharding(("batch", "seq"))
        self.logits = InLayout(jax.jit(self._logits, in_shardings=(self.param_sh, tok2, tok2),
                                       out_shardings=lay.sharding(("batch", "seq", "vocab"))), lay, (None, tok2, tok2))
        outs = (self.state_sh, row, row, rep)  # state, emitted tokens (-1: none), done, expert statistics
        self.prefill_first = InLayout(
            jax.jit(lambda p, s, b, a: self._prefill(p, s, b, a, paged=False), donate_argnums=(1,),
                    in_shardings=(self.param_sh, self.state_sh, self.batch_sh, rep), out_shardings=outs),
            lay, (None, None, self.batch_sh, rep))
        self.prefill_paged = InLayout(
            jax.jit(lambda p, s, b, a: self._prefill(p, s, b, a, paged=True), donate_argnums=(1,),
                    in_shardings=(self.param_sh, self.state_sh, self.paged_batch_sh, rep), out_shardings=outs),
            dec, (None, None, self.paged_batch_sh, rep))
        self.generate = InLayout(
            jax.jit(self._generate, static_argnums=(5,), donate_argnums=(1,),
                    in_shardings=(self.param_sh, self.state_sh, table, row, rep),
                    out_shardings=(self.state_sh, row, row, rep)),
            dec, (None, None, table, row, rep))
        self.new_state = jax.jit(self._new_state, out_shardings=self.state_sh)

    # ---- state -------------------------------------------------------------------------------------------
    def state_struct(self) -> DecodeState:
        """The state's abstract arrays (with their shardings)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(self._new_state), self.state_sh)

    def _new_state(self) -> DecodeState:
        cfg, n = self.cfg, self.sizes.slots
        dt, rings = jnp.dtype(cfg.dtype), self.sizes.ring_pages > 0

        def pool(repeats, kind):
            shape = (repeats,) + pool_shape(cfg, cache_kv_heads(cfg, self.kv_repeat, self.layout), self.sizes,
                                            ring=rings and kind.sliding)
            if cfg.kv_dtype is None:
                return jnp.zeros(shape, dt)
            # an 8-bit cache: its values, and a scale (in the compute dtype) per token and head
            return Quantized(jnp.zeros(shape, storage_dtype(cfg.kv_dtype)), jnp.ones(shape[:-1] + (1,), dt))
        cache = tuple(tuple(pool(g.slots, kind) for kind in g.unit) for g in self.groups)
        i32 = jnp.zeros(n, jnp.int32)
        return DecodeState(cache=cache, tokens=i32, lengths=i32, generated=i32, done=jnp.ones(n, bool),
                           request=jax.tree.map(jnp.asarray, host_rows(n)))

    # ---- the model -----------------------------------------------------------------------------------------
    def _model(self, params):
        return P.bind(self.cfg, self.kv_repeat, params, self.form)

    def seq_order(self, s: int):
        """The position computed at each sequence index: zigzag when the sequence is split (identity
        otherwise). Callers put a prompt chunk's tokens in this order; s must be a multiple of `seq_multiple`."""
        return zigzag.order(s, self.layout.size("seq"))

    @property
    def seq_multiple(self) -> int:
        return self.layout.seq_multiple

    def _logits(self, params, tokens, valid):
        """tokens [B, S] in `seq_order`; logits come back in the same order. valid [B, S]: real tokens."""
        model = self._model(params)
        pos = jnp.broadcast_to(jnp.asarray(self.seq_order(tokens.shape[1]), jnp.int32), tokens.shape)
        h, _, _ = model(tokens, pos, valid=valid)
        return model.logits(h)

    def _sample(self, logits, request, steps, any_sampling):
        """Each device samples its own rows (a shard_map: XLA would otherwise gather the batch around the
        sampling branch); the vocab shards are gathered once before."""
        logits = constrain(logits, ("batch", None))
        args = (logits, request.keys, steps, request.temperature, request.top_k, request.top_p, any_sampling)
        lay = active()
        if lay is None or lay.mesh.size == 1:
            return sample_rows(*args)
        row, two = lay.spec(("batch",)), lay.spec(("batch", None))
        return lay.shard_map(sample_rows, in_specs=(two, two, row, row, row, row, lay.spec(())),
                             out_specs=row)(*args)

    def _tables(self, table, slots) -> dict:
        """The page tables layers read: "table" (the shared pages), and for a model mixing sliding and full
        layers "ring_table" (the sliding layers' per-slot rings, from the rows' slots)."""
        if not self.sizes.ring_pages:
            return {"table": table}
        ring = constrain(ring_table(self.sizes, slots, table.shape[1]), ("batch", None))
        return {"table": table, "ring_table": ring}

    @staticmethod
    def _stop(tok, request, generated, active):
        """The stopping rules: -> (emitted [N] bool, generated, ended [N] bool)."""
        stop = jnp.any(tok[:, None] == request.stop_ids, axis=1)
        emitted = active & ~stop
        generated = generated + emitted.astype(jnp.int32)
        return emitted, generated, active & (stop | (generated >= request.max_new))

    def _prefill(self, params, state: DecodeState, batch: PrefillBatch, any_sampling, paged: bool):
        """A chunk of prompts into their pages; rows that end their prompt sample their first token and are
        inserted into their slots. paged=False: every row's chunk starts at position 0 (the prefill kernels:
        blockwise, ring, Ulysses); paged=True: later chunks, attending over the pages too."""
        model = self._model(params)
        c = batch.tokens.shape[1]
        order = jnp.arange(c) if paged else jnp.asarray(self.seq_order(c), jnp.int32)
        offset = order[None, :]
        pos = batch.start[:, None] + offset
        valid = offset < batch.length[:, None]
        pages = self._tables(batch.table, batch.slot)
        if not paged:  # the chunk's positions whole (in its sequence order), for the page writes
            pages["positions"] = constrain(pos, ("batch", None))
            pages["valid"] = constrain(valid, ("batch", None))
        h, cache, stats = model(batch.tokens, pos, valid=valid, cache=state.cache, pages=pages, paged=paged)
        # each row's last chunk token, picked by position (a masked sum: one small all-reduce when the sequence
        # is split, where indexing would gather the whole sequence)
        last = constrain(jnp.sum(jnp.where((offset == (batch.length - 1)[:, None])[..., None], h,
                                           jnp.zeros((), h.dtype)), axis=1, keepdims=True), ("batch", None, "embed"))
        with activate(self.layout.for_decode()):  # one token per row from here on: no sequence to split
            logits = model.logits(last)[:, 0]
        tok = self._sample(logits, batch.request, batch.generated, any_sampling)
        emitted, generated, ended = self._stop(tok, batch.request, batch.generated, batch.final)
        state = dataclasses.replace(state, cache=cache)
        state = self._insert(state, batch, tok, batch.start + batch.length, generated, ended)
        return state, jnp.where(emitted, tok, -1), ended, stats

    def _insert(self, state: DecodeState, batch: PrefillBatch, tok, lengths, generated, ended):
        """The rows that end their prompt into their slots. Every row's slot is in its own batch shard, so each
        device writes its own rows into its own slots: no collective."""
        lay = self.layout
        axes = lay.axes("batch")
        per = self.sizes.slots_per_shard
        fields = dict(tokens=tok, lengths=lengths, generated=generated, done=ended, request=batch.request)
        old = dict(tokens=state.tokens, lengths=state.lengths, generated=state.generated, done=state.done,
                   request=state.request)

        def local(old, new, slot, final):
            base = jax.lax.axis_index(axes) * per if axes else 0
            idx = jnp.where(final & (slot >= 0), slot - base, per)  # out of range: not written
            return jax.tree.map(lambda o, n: o.at[idx].set(n.astype(o.dtype), mode="drop"), old, new)
        if lay.mesh.size == 1:
            out = local(old, fields, batch.slot, batch.final)
        else:
            spec = jax.tree.map(lambda a: lay.spec(("batch",) + (None,) * (a.ndim - 1)), old)
            row = lay.spec(("batch",))
            out = lay.shard_map(local, in_specs=(spec, spec, row, row), out_specs=spec)(old, fields, batch.slot,
                                                                                          batch.final)
        return dataclasses.replace(state, **out)

    def _generate(self, params, state: DecodeState, table, release, any_sampling, steps: int):
        """Up to `steps` decode steps of every running slot; slots in `release` stop first (aborted or
        preempted requests, whose pages the host is taking back). table [S, nb]: each slot's pages.
        -> (state, tokens [S, steps]: the emitted tokens, -1 for none; done [S]; summed expert statistics)."""
        model = self._model(params)
        state = dataclasses.replace(state, done=state.done | release)

        def step(st, i, out):
            active = ~st.done
            h, cache, stats = model(st.tokens[:, None], st.lengths[:, None], valid=active[:, None], cache=st.cache,
                                    pages=self._tables(table, jnp.arange(table.shape[0])), paged=True)
            tok = self._sample(model.logits(h)[:, 0], st.request, st.generated, any_sampling)
            emitted, generated, ended = self._stop(tok, st.request, st.generated, active)
            out = out.at[:, i].set(jnp.where(emitted, tok, -1))
            st = dataclasses.replace(st, cache=cache, tokens=jnp.where(active, tok, st.tokens),
                                     lengths=st.lengths + active.astype(jnp.int32), generated=generated,
                                     done=st.done | ended)
            return st, out, stats

        out = jnp.full((state.tokens.shape[0], steps), -1, jnp.int32)
        acc = jax.eval_shape(lambda: step(state, 0, out)[2])
        acc = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acc)

        def body(c):
            i, st, out, acc = c
            st, out, stats = step(st, i, out)
            return i + 1, st, out, jax.tree.map(jnp.add, acc, stats)

        def cond(c):
            i, st, _, _ = c
            return (i < steps) & jnp.any(~st.done)

        _, state, out, acc = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, acc))
        return state, out, state.done, acc
