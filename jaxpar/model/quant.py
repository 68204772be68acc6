"""Quantized weights: int8 or fp8 (e4m3) values with float32 scales, and the one helper every weight product
goes through.

A weight's scale has the weight's shape with its *reduced axes* (the axes a Hugging Face Linear calls its
input: the contraction of the usual product) shrunk: to 1 for one scale per output channel, or to the number
of blocks for block scales (FP8 checkpoints' 128 x 128 blocks: a scale per block of the input and, expanded,
per output channel). Every other axis keeps its length and its logical name, so a scale shards with its
weight on every mesh (heads and mlp over tensor, experts over expert, layers over stage) and a row-parallel
weight's per-output scale is whole on every device: partial sums over a split contraction stay exact.

Products dequantize first (`einsum`): values * scale in the compute dtype, then the plain product. On GPU and
TPU XLA fuses that elementwise prologue into the matmul, so HBM reads only the 8-bit values (the choice qwix
makes for weight-only quantization). On XLA:CPU neither order fuses: both run 10-16x slower than
float32 at batch 1 and equally so (BENCHMARKS.md, `bench quant`); float32 stays the CPU default."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.errors import ConfigError

_TYPES = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}
SCALE_DTYPE = jnp.float32


def storage_dtype(fmt: str):
    return _TYPES[fmt][0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Quantized:
    """values (int8 or float8_e4m3fn, the weight's shape) * scale (float32, broadcast over each block)."""
    values: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.values.shape

    def dequantize(self, dtype):
        return self.values.astype(dtype) * expand(self.scale, self.values.shape).astype(dtype)


def expand(scale, shape):
    """A block scale repeated to `shape` along its blocked axes (axes of length 1 broadcast as they are)."""
    for axis, (s, n) in enumerate(zip(scale.shape, shape)):
        if 1 < s < n:
            scale = jnp.repeat(scale, n // s, axis=axis)
    return scale


def scale_shape(shape: tuple, reduced: tuple, block: int | None) -> tuple:
    """The scale's shape for a weight of `shape` whose `reduced` axes (consecutive) form the input dimension:
    1 on each (per channel), or with `block`, the blocks of the flattened input (row-major, last axis fastest:
    Hugging Face's [out, in] order), e.g. [h, hd] with hd = 64 and block 128 -> [h / 2, 1]."""
    out = list(shape)
    if block is None:
        for a in reduced:
            out[a] = 1
        return tuple(out)
    left = block
    for a in reversed(reduced):
        if left == 1:
            break
        if shape[a] % left == 0:
            out[a], left = shape[a] // left, 1
        elif left % shape[a] == 0:
            out[a], left = 1, left // shape[a]
        else:
            raise ValueError(f"an input of {[shape[a] for a in reduced]} does not split into blocks of {block}")
    return tuple(out)


def quantize(w, fmt: str, shape_of_scale: tuple, scale_dtype=SCALE_DTYPE) -> Quantized:
    """Symmetric quantization: each block's largest magnitude maps to the format's largest value."""
    dtype, top = _TYPES[fmt]
    w32 = w.astype(jnp.float32)
    split = []
    for s, n in zip(shape_of_scale, w.shape):
        split += [s, n // s]
    amax = jnp.max(jnp.abs(w32.reshape(split)), axis=tuple(range(1, 2 * w.ndim, 2)))
    scale = (amax / top).astype(scale_dtype)
    scale = jnp.where(scale > 0, scale, jnp.ones((), scale_dtype))  # all zeros (or below the scale's range)
    q = w32 / expand(scale, w.shape).astype(jnp.float32)
    q = jnp.clip(jnp.round(q), -top, top) if fmt == "int8" else jnp.clip(q, -top, top)
    return Quantized(q.astype(dtype), scale)


def quantize_layers(w, fmt: str, shape_of_scale: tuple) -> Quantized:
    """quantize() of a parameter stacked on a leading layers axis, one layer at a time (the float32 working
    copy is one layer's, not the whole stack's)."""
    return jax.lax.map(lambda layer: quantize(layer, fmt, shape_of_scale[1:]), w)


def quantize_vectors(x, fmt: str) -> Quantized:
    """The KV cache's form: one scale (in x's dtype) per vector of the last axis (a token's key or value of
    one head)."""
    return quantize(x, fmt, x.shape[:-1] + (1,), x.dtype)


def dense(w, dtype):
    """A plain array as it is; a quantized one dequantized to dtype."""
    return w.dequantize(dtype) if isinstance(w, Quantized) else w


def float_config(cfg):
    """The same model with its weights unquantized (the form loaders read, and the embedding and LM head of a
    block-scaled model)."""
    return cfg.replace(quantize=None, quant_block=None)


def einsum(eq: str, x, w, **kw):
    """jnp.einsum(eq, x, w) for a plain or quantized weight (dequantized to x's dtype first)."""
    return jnp.einsum(eq, x, dense(w, x.dtype), **kw)


def take_rows(table, ids, dtype):
    """table[ids] along axis 0 (an embedding lookup); a quantized table dequantizes only the rows taken."""
    if isinstance(table, Quantized):
        rows = jnp.take(table.values, ids, axis=0).astype(dtype)
        return rows * expand(jnp.take(table.scale, ids, axis=0), rows.shape).astype(dtype)
    return jnp.take(table, ids, axis=0)


def scale_names(names: tuple, shape: tuple, shape_of_scale: tuple) -> tuple:
    """A scale's logical axes: its weight's, less the axes it holds one value along."""
    return tuple(n if s == d or s > 1 else None for n, s, d in zip(names, shape_of_scale, shape))


def spec(lay, w, names: tuple):
    """The shard_map spec of a weight: a PartitionSpec, or for a quantized one a Quantized of two."""
    if isinstance(w, Quantized):
        return Quantized(lay.spec(names), lay.spec(scale_names(names, w.values.shape, w.scale.shape)))
    return lay.spec(names)


# --- the model side: a weight declared once, plain or quantized as the config says ---

def weight(module: nnx.Module, name: str, rngs, shape: tuple, names: tuple, cfg, reduced: tuple, init):
    """Set module.<name> (the weight, in cfg.dtype, or cfg.quantize's storage type) and, when quantized,
    module.<name>_scale. `reduced`: the axes that form the input dimension (see scale_shape)."""
    if cfg.quantize is None:
        setattr(module, name, nnx.Param(init(rngs.params(), shape, cfg.dtype), out_sharding=names))
        return
    # only the shapes matter: parameters are made in float and quantized (engine/quantize.py)
    try:
        sshape = scale_shape(shape, reduced, cfg.quant_block)
    except ValueError as e:
        raise ConfigError(f"weight {name} {list(shape)}: {e}") from None
    setattr(module, name, nnx.Param(jnp.zeros(shape, storage_dtype(cfg.quantize)), out_sharding=names))
    setattr(module, name + "_scale", nnx.Param(jnp.ones(sshape, SCALE_DTYPE),
                                               out_sharding=scale_names(names, shape, sshape)))


def get(module: nnx.Module, name: str):
    """module.<name>'s value: an array, or a Quantized when the module stores a scale for it."""
    w = getattr(module, name)[...]
    scale = getattr(module, name + "_scale", None)
    return w if scale is None else Quantized(w, scale[...])
