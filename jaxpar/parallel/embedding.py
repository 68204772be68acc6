"""Vocab-parallel embedding lookup: each device looks up the tokens in its slice of the vocabulary and one
all-reduce (psum) over the vocab axes assembles the rows (Megatron-style). A plain gather on a vocab-sharded
table would make XLA all-gather the whole table instead."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.layout.rules import active
from jaxpar.model import quant


def embed_lookup(table, tokens, dtype):
    """table [vocab, embed] (plain or quantized: model/quant.py), tokens [B, S] int -> [B, S, embed] in dtype."""
    lay = active()
    if lay is None or lay.size("vocab") == 1:
        return quant.take_rows(table, tokens, dtype)
    axes = lay.axes("vocab")

    def local(tbl, tok):
        n = tbl.shape[0]
        rel = tok - jax.lax.axis_index(axes) * n
        ok = (rel >= 0) & (rel < n)
        rows = quant.take_rows(tbl, jnp.where(ok, rel, 0), dtype)
        return jax.lax.psum(jnp.where(ok[..., None], rows, jnp.zeros((), rows.dtype)), axes)

    return lay.shard_map(local, in_specs=(quant.spec(lay, table, ("vocab", "embed")), lay.spec(("batch", "seq"))),
                         out_specs=lay.spec(("batch", "seq", "embed")))(table, tokens)
