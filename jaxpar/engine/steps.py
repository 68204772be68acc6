"""The compiled programs: full forward (logits), prefill, and one decode step. Each is traced under the
engine's layout; shardings of inputs and outputs come from the logical-axis table."""
from __future__ import annotations

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxpar.layout.rules import activate, constrain
from jaxpar.engine import params as P
from jaxpar.engine.sampling import row_keys, sample
from jaxpar.parallel import zigzag

CACHE_NAMES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


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
    processes (jax.distributed), host inputs become global arrays first (`in_shardings`: the top-level
    shardings, None for static or pytree arguments)."""

    def __init__(self, fn, layout, in_shardings=()):
        self.fn, self.layout, self.in_shardings = fn, layout, in_shardings

    def __call__(self, *args, **kwargs):
        if jax.process_count() > 1:
            args = tuple(to_global(a, sh) if sh is not None else a
                         for a, sh in zip(args, tuple(self.in_shardings) + (None,) * len(args)))
        with activate(self.layout):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with activate(self.layout):
            return self.fn.lower(*args, **kwargs)


class Steps:
    """unrolled: parameters and KV cache in the per-layer form (P.unstack), the layers applied one after
    another; otherwise stacked and scanned (or pipelined)."""

    def __init__(self, cfg, layout, kv_repeat, unrolled: bool = False):
        self.cfg, self.layout, self.kv_repeat, self.unrolled = cfg, layout, kv_repeat, unrolled
        lay = layout
        self.param_sh = P.shardings(cfg, lay, kv_repeat)
        self.cache_sh = lay.sharding(CACHE_NAMES)
        cache_tree = (self.cache_sh,) * 2
        if unrolled:
            layer_sh = P.layer_shardings(cfg, lay, kv_repeat)
            self.param_sh = {**self.param_sh, "layers": [layer_sh] * cfg.num_hidden_layers}
            cache_tree = [(lay.sharding(CACHE_NAMES[1:]),) * 2] * cfg.num_hidden_layers
        self.cache_tree_sh = cache_tree
        tok2 = lay.sharding(("batch", "seq"))
        row = lay.sharding(("batch",))
        rep = lay.sharding(())
        self.row_sh, self.rep_sh = row, rep
        self.logits = InLayout(jax.jit(self._logits, in_shardings=(self.param_sh, tok2, tok2),
                              out_shardings=lay.sharding(("batch", "seq", "vocab"))), lay, (None, tok2, tok2))
        samp = (rep, rep, rep, rep)  # key, temperature, top_k, top_p
        # outputs: sampled tokens, the cache, and expert load statistics ({} for a dense model)
        self.prefill = InLayout(jax.jit(self._prefill, static_argnums=(10,), donate_argnums=(1,),
                               in_shardings=(self.param_sh, cache_tree, tok2, row, row, row) + samp,
                               out_shardings=(row, cache_tree, rep)), lay,
                                (None, None, tok2, row, row, row) + samp)
        dec_in = (row, row, rep, row, row, rep) + samp
        self.decode = InLayout(jax.jit(self._decode, static_argnums=(12,), donate_argnums=(1,),
                              in_shardings=(self.param_sh, cache_tree) + dec_in,
                              out_shardings=(row, cache_tree, rep)), lay.for_decode(), (None, None) + dec_in)
        loop_in = (row, row, rep, row, row, rep, rep, rep) + samp + (rep,)
        # the host functions streaming decode loops hand each step's tokens to, by call id (an argument of
        # the loop, so concurrent or nested calls each reach their own): see `streaming`
        self.sinks: dict = {}
        self._calls = itertools.count()
        self.decode_loop = InLayout(jax.jit(self._decode_loop, static_argnums=(15, 16, 17), donate_argnums=(1,),
                                   in_shardings=(self.param_sh, cache_tree) + loop_in,
                                   out_shardings=(row, cache_tree, rep)), lay.for_decode(), (None, None) + loop_in)
        self.new_cache = functools.lru_cache(maxsize=8)(self._cache_fn)

    def _model(self, params):
        """The bound model, and the keyword that hands it the per-layer parameters in the unrolled form."""
        if self.unrolled:
            rest = {k: v for k, v in params.items() if k != "layers"}
            return P.bind(self.cfg, self.kv_repeat, rest), {"layers": params["layers"]}
        return P.bind(self.cfg, self.kv_repeat, params), {}

    def cache_shape(self, batch: int, length: int):
        c = self.cfg
        return (c.num_hidden_layers, batch, length, c.kv_heads * self.kv_repeat, c.head_size)

    def cache_struct(self, batch: int, length: int):
        """The KV cache's abstract arrays: (k, v) [layers, batch, slots, kv_heads, head_dim], or per layer."""
        shape, dt = self.cache_shape(batch, length), jnp.dtype(self.cfg.dtype)
        if self.unrolled:
            return [tuple(jax.ShapeDtypeStruct(shape[1:], dt, sharding=sh) for sh in pair) for pair in self.cache_tree_sh]
        return tuple(jax.ShapeDtypeStruct(shape, dt, sharding=self.cache_sh) for _ in range(2))

    def _cache_fn(self, batch: int, length: int):
        structs = self.cache_struct(batch, length)
        return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs),
                       out_shardings=self.cache_tree_sh)

    def seq_order(self, s: int):
        """The position computed at each sequence index: zigzag when the sequence is split (identity
        otherwise). Callers put tokens in this order; s must be a multiple of `seq_multiple`."""
        return zigzag.order(s, self.layout.size("seq"))

    @property
    def seq_multiple(self) -> int:
        """Prompt lengths (and cache lengths) must be multiples of this (Layout.seq_multiple)."""
        return self.layout.seq_multiple

    def _logits(self, params, tokens, valid):
        """tokens [B, S] in `seq_order`; logits come back in the same order. valid [B, S]: real tokens."""
        model, kw = self._model(params)
        pos = jnp.broadcast_to(jnp.asarray(self.seq_order(tokens.shape[1]), jnp.int32), tokens.shape)
        h, _, _ = model(tokens, pos, valid=valid, **kw)
        return model.logits(h)

    def _sample(self, logits, row_ids, key, step, temperature, top_k, top_p, greedy):
        logits = constrain(logits, ("batch", None))  # gather the vocab shards once, then sample locally
        return sample(logits, row_keys(key, row_ids, step), temperature, top_k, top_p, greedy)

    def _prefill(self, params, cache, tokens, lengths, active, row_ids, key, temperature, top_k, top_p, greedy):
        """tokens [B, S] in the layout's sequence order (`seq_order`); active [B]: real rows."""
        model, kw = self._model(params)
        pos = jnp.broadcast_to(jnp.asarray(self.seq_order(tokens.shape[1]), jnp.int32), tokens.shape)
        h, cache, stats = model(tokens, pos, cache=cache, valid=(pos < lengths[:, None]) & active[:, None], **kw)
        # each row's last prompt token, picked by position (a masked sum: one small all-reduce when the
        # sequence is split, where indexing would gather the whole sequence)
        last = constrain(jnp.sum(jnp.where((pos == (lengths - 1)[:, None])[..., None], h, jnp.zeros((), h.dtype)),
                                 axis=1, keepdims=True), ("batch", None, "embed"))
        with activate(self.layout.for_decode()):  # one token per row from here on: no sequence to split
            logits = model.logits(last)[:, 0]
        return self._sample(logits, row_ids, key, 0, temperature, top_k, top_p, greedy), cache, stats

    def _decode(self, params, cache, tokens, pos, prompt_len, active, row_ids, step, key, temperature, top_k,
                top_p, greedy):
        """prompt_len: the prompt bucket the cache was prefilled with (fixes where each position is cached
        when the cache is split over `seq`). active [B]: rows still generating."""
        model, kw = self._model(params)
        h, cache, stats = model(tokens[:, None], pos[:, None], cache=cache, decode=(pos, prompt_len),
                                valid=active[:, None], **kw)
        logits = model.logits(h)[:, 0]
        return self._sample(logits, row_ids, key, step, temperature, top_k, top_p, greedy), cache, stats

    @contextlib.contextmanager
    def streaming(self, sink):
        """A call id for one decode loop, under which its callback reaches sink(step, tokens [B])."""
        call = next(self._calls)
        self.sinks[call] = sink
        try:
            yield call
        finally:
            del self.sinks[call]

    def _deliver(self, call, step, column):
        self.sinks[int(call)](int(step), np.asarray(column))

    def _decode_loop(self, params, cache, tok, lengths, prompt_len, done, row_ids, eos, max_new, cache_len, key,
                     temperature, top_k, top_p, call, out_width, greedy, stream=False):
        """Every decode step of a generate call in one program: a while loop on device that records each
        row's token, stops rows at end-of-sequence or the context window, and samples the next token, with
        the host's step-by-step loop's exact rules (Engine._stream). tok [B]: prefill's tokens; done [B]:
        rows not generating (padding); eos [E]: end ids (-1 pads; none when generation ignores them);
        max_new, cache_len: scalars. Returns (tokens [B, out_width], -1 after a row stopped; cache; summed
        expert statistics). stream: each step's column of tokens also goes to the host as soon as it is
        known (an ordered host callback to `self.sinks[call](step, tokens [B])`), but for the last column, which the
        caller reads from the result."""
        ctx = self.cfg.max_position_embeddings
        b = tok.shape[0]

        def record(step, tok, done, out):
            stop = done | jnp.isin(tok, eos) | (lengths + step >= ctx)
            return stop, out.at[:, step].set(jnp.where(stop, -1, tok))

        def cond(c):
            step, _, _, done, _, _ = c
            return (step < max_new - 1) & jnp.any(~done & (lengths + step < cache_len))

        def body(c):
            step, tok, cache, done, out, acc = c
            pos = lengths + step
            active = ~done & (pos < cache_len)  # as the host loop: the rows not done before this token
            new_done, out = record(step, tok, done, out)
            if stream:
                # replicated first: the callback runs on one device, and XLA warns when it must gather a
                # batch-sharded operand there itself
                io_callback(self._deliver, None, call, step, constrain(out[:, step], (None,)), ordered=True)
            tok, cache, stats = self._decode(params, cache, tok, jnp.minimum(pos, cache_len - 1), prompt_len,
                                             active, row_ids, step + 1, key, temperature, top_k, top_p, greedy)
            return step + 1, tok, cache, new_done, out, jax.tree.map(jnp.add, acc, stats)

        acc = jax.eval_shape(lambda: self._decode(params, cache, tok, lengths, prompt_len, done, row_ids, 1, key,
                                                  temperature, top_k, top_p, greedy)[2])
        acc = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acc)
        out = jnp.full((b, out_width), -1, jnp.int32)
        step, tok, cache, done, out, acc = jax.lax.while_loop(
            cond, body, (jnp.int32(0), tok, cache, done, out, acc))
        _, out = record(step, tok, done, out)
        return out, cache, acc
