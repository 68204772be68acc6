"""The platforms' fused prefill attention kernels, for a prompt chunk held whole on each device (no `seq` axis;
heads and batch may be split, so a kernel runs per device inside shard_map):

- TPU: JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): the causal mask or the
  sliding window as a local mask, block-sparse (blocks the mask hides are skipped), soft-capped scores,
  grouped queries (one multi-query call per kv head).
- CUDA with cuDNN present (`cudnn_available`: a real NVIDIA GPU where a cuDNN attention compiles): cuDNN's
  fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`: causal or a sliding window,
  grouped queries, bfloat16 or float16, head dim up to 128.
- CUDA otherwise (and for what cuDNN does not take): JAX's Pallas GPU flash attention
  (`jax.experimental.pallas.ops.gpu.attention.mha`, a Triton kernel): causal only; kv heads are repeated to the
  query heads first.

The scale is applied to q first. Attention sinks and MLA's latent cache have no counterpart in any, and the
TPU tiles need the head dim in multiples of BLOCK (a chunk that is not a multiple of BLOCK is padded at its
end: causal masks keep the padding out of every real query's view): `choose` picks the kernel and
says what stops the platform's, and the caller then runs the XLA path (parallel/attention.py). On CPU the
Pallas kernels run in interpret mode and the cuDNN call's arguments run through XLA's implementation (tests
compare them with the XLA path there); cuDNN itself cannot be lowered without cuDNN present, so on this
project's CPU machines `inspect --platform cuda` reports the Pallas kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpar.model.attend import AttentionSpec

BLOCK = 128  # the kernels' query and key blocks: TPU tiles of 128 lanes, the GPU kernel's default block
KERNELS = {"tpu": "splash", "cuda": "pallas-flash"}  # each platform's Pallas kernel; "cudnn" on CUDA first
NAMES = frozenset(KERNELS.values()) | {"cudnn"}


@functools.lru_cache(maxsize=1)
def cudnn_available() -> bool:
    """Whether this process runs on NVIDIA GPUs whose cuDNN compiles a fused attention (checked once, on a
    tiny bfloat16 call)."""
    if jax.default_backend() != "gpu":
        return False
    x = jax.ShapeDtypeStruct((1, BLOCK, 1, 64), jnp.bfloat16)
    try:
        jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")).lower(
            x, x, x).compile()
    except Exception:  # noqa: BLE001 (any failure means: no usable cuDNN; the Pallas kernel runs)
        return False
    return True


def no_fused_kernel(spec: AttentionSpec, sinks: bool) -> str | None:
    """What no fused kernel here takes (prefill's or decode_kernels'): attention sinks, MLA's latent cache."""
    if sinks:
        return "attention sinks"
    if spec.latent:
        return "MLA's latent cache"
    return None


def cudnn_unfit(head_dim: int, spec: AttentionSpec, sinks: bool, dtype) -> str | None:
    """Why cuDNN's fused attention cannot take this chunk (None: it can)."""
    if why := no_fused_kernel(spec, sinks):
        return why
    if spec.softcap is not None:
        return "soft-capping"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{jnp.dtype(dtype).name} (cuDNN attention takes bfloat16 or float16)"
    if head_dim > 128:
        return f"head_dim {head_dim} is above 128"
    return None


def choose(platform: str, head_dim: int, spec: AttentionSpec, sinks: bool, dtype, cudnn: bool | None = None) -> tuple:
    """The fused kernel a prompt chunk runs on `platform` -> (name or None, why the platform's Pallas kernel
    does not take it or None). cudnn: whether cuDNN is present (default: `cudnn_available()`)."""
    why = unfit(platform, head_dim, spec, sinks)
    if platform == "cuda" and (cudnn_available() if cudnn is None else cudnn) and \
            cudnn_unfit(head_dim, spec, sinks, dtype) is None:
        return "cudnn", why
    return (KERNELS[platform] if why is None else None), why


def unfit(platform: str, head_dim: int, spec: AttentionSpec, sinks: bool) -> str | None:
    """Why `platform`'s kernel cannot run a prompt chunk with this head dim and spec (None: it can;
    a platform without a kernel: "no kernel on <platform>")."""
    if platform not in KERNELS:
        return f"no kernel on {platform}"
    if why := no_fused_kernel(spec, sinks):
        return why
    if platform == "cuda" and spec.window is not None:
        return "a sliding window (the GPU kernel is causal only)"
    if platform == "cuda" and spec.softcap is not None:
        return "soft-capping"
    if platform == "tpu" and head_dim % BLOCK:
        return f"head_dim {head_dim} is not a multiple of {BLOCK}"
    if platform == "cuda" and head_dim > 256:
        return f"head_dim {head_dim} is above 256"
    return None


def local(kernel: str, q, k, v, *, spec: AttentionSpec, interpret: bool = False):
    """One device's prompt chunk on `kernel` (a name `choose` gives): q [B, S, H, D], k, v [B, S, KV, D], index
    i holding position i -> [B, S, H, D]. interpret: Pallas interpret mode, or XLA's implementation of the
    cuDNN call (CPU tests)."""
    d, s = q.shape[-1], q.shape[1]
    q = q * jnp.asarray(d ** -0.5 if spec.scale is None else spec.scale, q.dtype)
    pad = -s % BLOCK  # keys past the chunk's end come after every real query: causal masks hide them
    if pad and kernel != "cudnn":
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    run = {"splash": _splash, "pallas-flash": _flash_gpu, "cudnn": _cudnn}[kernel]
    return run(q, k, v, spec, interpret)[:, :s].astype(q.dtype)


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


def _cudnn(q, k, v, spec: AttentionSpec, interpret: bool):
    window = None if spec.window is None else (spec.window - 1, 0)  # the window's keys: itself and window-1 back
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, local_window_size=window,
                                        implementation="xla" if interpret else "cudnn")
