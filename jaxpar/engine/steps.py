"""The inputs of one `generate` call's programs, as abstract arrays: what `jaxpar.inspect` compiles on this
machine's devices and what `inspect --platform` lowers for a TPU or GPU that is not here.

A call of `batch` prompts of `prompt_len` tokens and `max_new_tokens` runs the first prompt chunk (every prompt
whole, as one chunk), possibly later chunks over the paged cache, and the decode loop, on a decode state of
exactly that many slots and cache positions."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxpar.engine.buckets import batch_bucket, seq_bucket
from jaxpar.engine.programs import Programs
from jaxpar.engine.state import cache_sizes
from jaxpar.model.groups import ring_window, shared_window


@dataclasses.dataclass
class Steps:
    programs: Programs
    batch: int  # padded rows
    prompt_len: int  # padded prompt
    cache_len: int  # cache positions per row
    page_size: int
    decode_steps: int
    state: object  # DecodeState of ShapeDtypeStructs
    prefill_batch: object  # PrefillBatch (the first chunk: the prompt split like the layout's sequence)
    chunk_batch: object  # PrefillBatch (a later chunk: over the paged cache, decode rules)
    table: jax.ShapeDtypeStruct
    release: jax.ShapeDtypeStruct
    flag: jax.ShapeDtypeStruct

    def prefill(self, params) -> tuple:
        return params, self.state, self.prefill_batch, self.flag

    def chunk(self, params) -> tuple:
        return params, self.state, self.chunk_batch, self.flag

    def decode(self, params) -> tuple:
        return params, self.state, self.table, self.release, self.flag, self.decode_steps


def step_shapes(cfg, layout, kv_repeat: int, form, serving, eos_ids, batch: int, prompt_len: int,
                max_new_tokens: int) -> Steps:
    """The programs (built for these shapes) and their abstract inputs; the caller has checked the numbers."""
    from jaxpar.serving.scheduler import Scheduler

    ctx = cfg.max_position_embeddings
    b = batch_bucket(batch, layout.batch_multiple)
    s = seq_bucket(prompt_len, ctx, layout.seq_multiple)
    t = seq_bucket(prompt_len + max_new_tokens, ctx, layout.seq_multiple)
    page = serving.page_size
    # one prefill of the whole prompt: the window rings (a model mixing sliding and full layers) hold it
    sizes = cache_sizes(layout, b, t, page, None, shared_window(cfg), serving.ahead, ring_window(cfg),
                        ring_ahead=max(serving.ahead, s))
    progs = Programs(cfg, layout, kv_repeat, form, sizes)
    sched = Scheduler(sizes, dataclasses.replace(serving, max_model_len=t), layout, eos_ids)
    host = sched.padding_batch(b // sizes.batch_shards, s, sched.table_bucket(sizes.pages_for(s)))

    def structs(tree, shardings):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
    return Steps(
        programs=progs, batch=b, prompt_len=s, cache_len=t, page_size=page, decode_steps=serving.decode_steps,
        state=progs.state_struct(), prefill_batch=structs(host, progs.batch_sh),
        chunk_batch=structs(host, progs.paged_batch_sh),
        table=jax.ShapeDtypeStruct((b, sizes.max_pages), np.int32, sharding=layout.sharding(("batch", None))),
        release=jax.ShapeDtypeStruct((b,), np.bool_, sharding=progs.row_sh),
        flag=jax.ShapeDtypeStruct((), np.bool_, sharding=progs.rep_sh))
