"""Rotary position embeddings (Hugging Face rotate-half convention), plain or with linear / llama3 / YaRN
scaling."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv = _yarn(head_dim, theta, scaling)
    return inv


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: dict | None) -> float:
    """The factor YaRN applies to cos and sin (1 for every other rope type), as transformers computes it:
    attention_factor when given, else from factor (and mscale / mscale_all_dim when both are set)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)
    return _yarn_mscale(factor)


def yarn_softmax_scale(scaling: dict | None, scale: float) -> float:
    """DeepSeek's attention scale under YaRN: scale * mscale(factor, mscale_all_dim) ** 2 when mscale_all_dim is
    set (transformers' yarn_apply_mscale); unchanged otherwise."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default" or not scaling.get("mscale_all_dim"):
        return scale
    m = _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
    return scale * m * m


def _yarn(dim: int, base: float, scaling: dict) -> np.ndarray:
    """YaRN (Peng et al. 2023): frequencies that rotate more than beta_fast times over the original context keep
    their value, those under beta_slow are divided by the factor, a linear ramp between."""
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos = base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    keep = 1 - ramp  # the share of the unscaled frequency
    return ((1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep).astype(np.float32)


def rope_tables(positions, inv_freq: np.ndarray, factor: float = 1.0):
    """positions [B, S] int -> (cos, sin) [B, S, head_dim] float32, both scaled by `factor` (YaRN's)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def apply_rope(x, cos, sin):
    """x [B, S, heads, head_dim]; cos/sin [B, S, head_dim]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + rot.astype(jnp.float32) * s).astype(x.dtype)
