"""Which prefill attention runs, chosen by the active layout (the model never looks at the mesh itself):

- no `seq` axis: blockwise causal attention for prompts of BLOCK_MIN tokens or more (never the whole score
  matrix; key blocks past the diagonal skipped), dense attention for shorter ones;
- `seq` axis, `attention: ring | ulysses`: the shard_map kernels of ring_attention.py / ulysses.py;
- `seq` axis, `attention: dense`: plain attention on sequence-sharded tensors, left to XLA (it gathers K/V;
  the baseline the kernels are measured against).
The KV cache is paged (paged.py): prefill writes a prompt's K/V to its pages, decode and later prompt chunks
attend over them."""
from __future__ import annotations

import functools

from jaxpar.layout.rules import active
from jaxpar.model.attend import AttentionSpec, attend, causal_blockwise
from jaxpar.parallel.ring_attention import ring_attention_local
from jaxpar.parallel.ulysses import ulysses_attention_local

Q = ("batch", "seq", "heads", "head_dim")
KV = ("batch", "seq", "kv_heads", "head_dim")


BLOCK_MIN = 512  # prompts at least this long take the blockwise path (below, dense is as fast)


def block_size(s: int) -> int | None:
    """The key/query block of `causal_blockwise` for a prompt of s tokens (padded to a multiple of it), or
    None for dense attention. 128 up to 512 tokens, 256 beyond: about the fastest on XLA:CPU (BENCHMARKS.md,
    "Prefill attention")."""
    if s < BLOCK_MIN:
        return None
    return 128 if s <= 512 else 256


def _seq(logical):
    lay = active()
    if lay is None or lay.size(logical) == 1:
        return None, 1, lay
    return lay.axes(logical), lay.size(logical), lay


def prefill_attention(q, k, v, positions, spec: AttentionSpec, sinks=None):
    """Causal attention over the prompt, as `spec` says (sliding window, soft-capping, scale), with attention
    sinks [H] when given. q [B,S,H,D]; k, v [B,S,KV,D]; positions [B,S]."""
    axes, n, lay = _seq("seq")
    block = block_size(q.shape[1]) if axes is None else None
    if block:  # no seq axis: index i holds position i
        return causal_blockwise(q, k, v, block, spec, sinks)
    if axes is None or lay.attention == "dense":
        return attend(q, k, v, spec.visible(positions[:, :, None], positions[:, None, :]), spec, sinks)
    body = functools.partial(ring_attention_local if lay.attention == "ring" else ulysses_attention_local,
                             axis=axes, n=n, spec=spec)
    specs = (lay.spec(Q), lay.spec(KV), lay.spec(KV))
    if sinks is None:
        return lay.shard_map(body, in_specs=specs, out_specs=lay.spec(Q))(q, k, v)
    return lay.shard_map(body, in_specs=specs + (lay.spec(("heads",)),), out_specs=lay.spec(Q))(q, k, v, sinks)
