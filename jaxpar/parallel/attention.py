"""Which prefill attention runs, chosen by the active layout (the model never looks at the mesh itself), in
one place (`prefill_kernel`):

- no `seq` axis, on TPU or CUDA: the platform's fused kernel (prefill_kernels.py: splash attention; cuDNN or
  the Pallas GPU flash attention) when the spec, head dim and prompt fit it;
- no `seq` axis otherwise: blockwise causal attention for prompts of BLOCK_MIN tokens or more (never the whole
  score matrix; key blocks past the diagonal skipped), dense attention for shorter ones;
- `seq` axis, `attention: ring | ulysses`: the shard_map kernels of ring_attention.py / ulysses.py;
- `seq` axis, `attention: dense`: plain attention on sequence-sharded tensors, left to XLA (it gathers K/V;
  the baseline the kernels are measured against).
The KV cache is paged (paged.py): prefill writes a prompt's K/V to its pages, decode and later prompt chunks
attend over them."""
from __future__ import annotations

import functools

from jaxpar.layout.rules import active
from jaxpar.model.attend import AttentionSpec, attend, causal_blockwise
from jaxpar.parallel import prefill_kernels
from jaxpar.parallel.ring_attention import ring_attention_local
from jaxpar.parallel.ulysses import ulysses_attention_local

Q = ("batch", "seq", "heads", "head_dim")
KV = ("batch", "seq", "kv_heads", "head_dim")


BLOCK_MIN = 512  # prompts at least this long take the blockwise path (below, dense is as fast)


def block_size(s: int, platform: str = "cpu") -> int | None:
    """The key/query block of `causal_blockwise` for a prompt of s tokens (padded to a multiple of it), or
    None for dense attention. On CPU 128 up to 512 tokens, 256 beyond: about the fastest on XLA:CPU
    (BENCHMARKS.md, "Prefill attention"). Those sizes are not carried to other platforms: there 512, an untuned
    multiple of the TPU and GPU tiles, for the specs the platform's kernel cannot take."""
    if s < BLOCK_MIN:
        return None
    if platform != "cpu":
        return 512
    return 128 if s <= 512 else 256


def _seq(logical):
    lay = active()
    if lay is None or lay.size(logical) == 1:
        return None, 1, lay
    return lay.axes(logical), lay.size(logical), lay


def prefill_kernel(lay, s: int, head_dim: int, spec: AttentionSpec, sinks: bool, dtype) -> tuple:
    """Which attention a prompt chunk of s tokens runs under the layout `lay` (None: one CPU device); the one
    place this is decided (`prefill_attention` branches on it, `inspect --platform` reports it) -> (name, why
    the platform's Pallas kernel does not take the chunk, or None):
    "ring" / "ulysses": the seq axis' kernel; "dense-seq": XLA's attention on the split sequence (the mesh file's
    `attention: dense`); "splash" (TPU) / "cudnn" or "pallas-flash" (CUDA): no seq axis, and a fused kernel
    takes this chunk (prefill_kernels.choose); "blockwise": s >= BLOCK_MIN; "dense" otherwise."""
    platform = "cpu" if lay is None else lay.platform
    if lay is not None and lay.size("seq") > 1:
        return ("dense-seq" if lay.attention == "dense" else lay.attention), None
    if platform not in prefill_kernels.KERNELS:
        return ("blockwise" if block_size(s, platform) else "dense"), None
    kernel, why = prefill_kernels.choose(platform, head_dim, spec, sinks, dtype)
    return kernel or ("blockwise" if block_size(s, platform) else "dense"), why


def prefill_attention(q, k, v, positions, spec: AttentionSpec, sinks=None):
    """Causal attention over the prompt, as `spec` says (sliding window, soft-capping, scale), with attention
    sinks [H] when given. q [B,S,H,D]; k, v [B,S,KV,D]; positions [B,S]."""
    axes, n, lay = _seq("seq")
    kernel, _ = prefill_kernel(lay, q.shape[1], q.shape[-1], spec, sinks is not None, q.dtype)
    if kernel in prefill_kernels.NAMES:  # no seq axis: index i holds position i
        body = functools.partial(prefill_kernels.local, kernel, spec=spec)
        if lay.mesh.size == 1:
            return body(q, k, v)
        return lay.shard_map(body, in_specs=(lay.spec(Q), lay.spec(KV), lay.spec(KV)), out_specs=lay.spec(Q),
                             check_vma=False)(q, k, v)
    if kernel == "blockwise":  # no seq axis: index i holds position i
        return causal_blockwise(q, k, v, block_size(q.shape[1], lay.platform if lay else "cpu"), spec, sinks)
    if kernel in ("dense", "dense-seq"):
        return attend(q, k, v, spec.visible(positions[:, :, None], positions[:, None, :]), spec, sinks)
    body = functools.partial(ring_attention_local if kernel == "ring" else ulysses_attention_local,
                             axis=axes, n=n, spec=spec)
    specs = (lay.spec(Q), lay.spec(KV), lay.spec(KV))
    if sinks is None:
        return lay.shard_map(body, in_specs=specs, out_specs=lay.spec(Q))(q, k, v)
    return lay.shard_map(body, in_specs=specs + (lay.spec(("heads",)),), out_specs=lay.spec(Q))(q, k, v, sinks)
