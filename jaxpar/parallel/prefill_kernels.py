"""The platforms' fused prefill attention kernels, for a prompt chunk held whole on each device (no `seq` axis;
heads and batch may be split, so a kernel runs per device inside shard_map):

- TPU: JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): the causal mask or the
  sliding window as a local mask, block-sparse (blocks the mask hides are skipped), soft-capped scores,
  grouped queries (one multi-query call per kv head).
- CUDA: JAX's Pallas GPU flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`, a Triton kernel):
  causal only; kv heads are repeated to the query heads first.

The scale is applied to q first. Attention sinks and MLA's latent cache have no counterpart in either, and the
tiles need the prompt (and on TPU the head dim) in multiples of BLOCK: `unfit` says what stops a kernel, and
the caller then runs the XLA path (parallel/attention.py). cuDNN (jax.nn.dot_product_attention) is not used:
it cannot be lowered or checked without cuDNN present. On CPU the kernels run in Pallas interpret mode (tests
compare them with the XLA path there)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.model.attend import AttentionSpec

BLOCK = 128  # the kernels' query and key blocks: TPU tiles of 128 lanes, the GPU kernel's default block
KERNELS = {"tpu": "splash", "cuda": "pallas-flash"}


def unfit(platform: str, s: int, head_dim: int, spec: AttentionSpec, sinks: bool) -> str | None:
    """Why `platform`'s kernel cannot run a prompt chunk of s tokens with this head dim and spec (None: it can;
    a platform without a kernel: "no kernel on <platform>")."""
    if platform not in KERNELS:
        return f"no kernel on {platform}"
    if sinks:
        return "attention sinks"
    if spec.latent:
        return "MLA's latent cache"
    if platform == "cuda" and spec.window is not None:
        return "a sliding window (the GPU kernel is causal only)"
    if platform == "cuda" and spec.softcap is not None:
        return "soft-capping"
    if platform == "tpu" and head_dim % BLOCK:
        return f"head_dim {head_dim} is not a multiple of {BLOCK}"
    if platform == "cuda" and head_dim > 256:
        return f"head_dim {head_dim} is above 256"
    if s % BLOCK:
        return f"a {s}-token chunk is not a multiple of {BLOCK}"
    return None


def local(platform: str, q, k, v, *, spec: AttentionSpec, interpret: bool = False):
    """One device's prompt chunk on `platform`'s kernel: q [B, S, H, D], k, v [B, S, KV, D], index i holding
    position i -> [B, S, H, D]."""
    d = q.shape[-1]
    q = q * jnp.asarray(d ** -0.5 if spec.scale is None else spec.scale, q.dtype)
    return (_splash if platform == "tpu" else _flash_gpu)(q, k, v, spec, interpret).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(s: int, group: int, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as K
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as M

    one = M.CausalMask((s, s)) if window is None else M.LocalMask((s, s), (window - 1, 0), 0)
    return K.make_splash_mqa_single_device(M.MultiHeadMask([one] * group),
                                           block_sizes=K.BlockSizes(BLOCK, BLOCK, BLOCK),
                                           attn_logits_soft_cap=softcap, interpret=interpret)


def _splash(q, k, v, spec: AttentionSpec, interpret: bool):
    b, s, h, d = q.shape
    kv = k.shape[2]
    kern = _splash_kernel(s, h // kv, spec.window, spec.softcap, interpret)
    qg = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, D]
    kk, vv = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, KV, S, D]
    out = jax.vmap(jax.vmap(kern))(qg, kk, vv)  # [B, KV, G, S, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def _flash_gpu(q, k, v, spec: AttentionSpec, interpret: bool):
    from jax.experimental.pallas.ops.gpu.attention import mha

    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))  # query head i reads kv head i // g
    return mha(q, k, v, None, sm_scale=1.0, causal=True, interpret=interpret)
