"""The decoder block's parts, in Flax NNX. Parameters carry logical axis names only."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import constrain
from jaxpar.model import quant
from jaxpar.model.attend import AttentionSpec
from jaxpar.model.groups import LayerKind
from jaxpar.model.rope import apply_rope, yarn_softmax_scale
from jaxpar.parallel.attention import prefill_attention
from jaxpar.parallel.paged import paged_attention, write_pages
from jaxpar.parallel.experts import NAMES, Gate, expert_ffn, top_k_per_token
from jaxpar.parallel.seq_parallel import row_parallel

INIT = nnx.initializers.normal(0.02)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """What every layer reads besides its input, one row per sequence (leading batch axis on every array, so a
    pipeline cuts it into microbatches).

    positions, valid [B, S]: each token's position and whether it is real (only real tokens are written to the
    cache and routed by mixture-of-experts layers). rope: (cos, sin) tables per attention kind ("full",
    "sliding"). pages: None (no cache), or the page tables {"table": [B, nb]} and, for a first chunk, the whole
    chunk's "positions" and "valid" [B, S] (not split over seq) for the page writes. paged: tokens attend over
    what the pages hold (decode, later chunks of a prompt) rather than through the prefill kernels.
    router_aux: mixture-of-experts layers also report their load-balancing loss."""
    positions: Any
    valid: Any
    rope: dict
    pages: Any = None
    paged: bool = dataclasses.field(default=False, metadata=dict(static=True))
    router_aux: bool = dataclasses.field(default=False, metadata=dict(static=True))


def param(rngs, shape, names, dtype, init=INIT):
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def weight(module, name, rngs, shape, names, cfg: ModelConfig, reduced=(0,)):
    """A matrix of the model (module.<name>), stored as cfg.quantize says: reduced = its input axes."""
    quant.weight(module, name, rngs, shape, names, cfg, reduced, INIT)


class RMSNorm(nnx.Module):
    """offset 1 (Gemma): the weight is stored as an offset from 1. scale_float32 (gpt-oss, and Gemma): the weight
    applies in float32 before the cast back (Llama casts first)."""

    def __init__(self, dim: int, eps: float, names: tuple, dtype, rngs: nnx.Rngs, offset: float = 0.0,
                 scale_float32: bool = False):
        self.eps, self.offset = eps, float(offset)
        self.scale_float32 = scale_float32 or bool(self.offset)
        init = nnx.initializers.zeros if self.offset else nnx.initializers.ones
        self.weight = param(rngs, (dim,), names, dtype, init)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale_float32:
            return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * y.astype(x.dtype)


def norm(cfg: ModelConfig, dim: int, names: tuple, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, names, cfg.dtype, rngs, cfg.norm_offset, cfg.norm_scale_float32)


ACT = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def attention_spec(cfg: ModelConfig, sliding: bool) -> AttentionSpec:
    """What a layer's attention computes (model/attend.py): its window when it slides, the config's soft-cap
    and query scale; MLA's latent cache with its YaRN-corrected scale."""
    window = cfg.sliding_window if sliding else None
    if cfg.mla:
        rope = cfg.qk_rope_head_dim
        return AttentionSpec(window=window, latent=True,
                             scale=yarn_softmax_scale(cfg.rope_scaling, (cfg.qk_nope_head_dim + rope) ** -0.5))
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    return AttentionSpec(window=window, softcap=cfg.attn_logit_softcapping, scale=scale)


class Attention(nnx.Module):
    """Column-parallel Q/K/V (heads sharded), row-parallel O: one all-reduce after O under tensor parallelism."""

    def __init__(self, cfg: ModelConfig, kv_heads: int, sliding: bool, rngs: nnx.Rngs):
        d, h, hd, dt = cfg.hidden_size, cfg.num_attention_heads, cfg.head_size, cfg.dtype
        weight(self, "wq", rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        weight(self, "wk", rngs, (d, kv_heads, hd), ("embed", "kv_heads", "head_dim"), cfg)
        weight(self, "wv", rngs, (d, kv_heads, hd), ("embed", "kv_heads", "head_dim"), cfg)
        weight(self, "wo", rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg, reduced=(0, 1))
        zeros = nnx.initializers.zeros
        self.bias = cfg.attention_bias
        if self.bias:
            self.bq = param(rngs, (h, hd), ("heads", "head_dim"), dt, zeros)
            self.bk = param(rngs, (kv_heads, hd), ("kv_heads", "head_dim"), dt, zeros)
            self.bv = param(rngs, (kv_heads, hd), ("kv_heads", "head_dim"), dt, zeros)
        self.out_bias = cfg.out_bias
        if self.out_bias:
            self.bo = param(rngs, (d,), ("embed",), dt, zeros)
        self.rope = "sliding" if sliding else "full"
        self.table = "ring_table" if sliding else "table"  # a mixed model's sliding layers cache in per-slot rings
        self.spec = attention_spec(cfg, sliding)
        self.kv_dtype = cfg.kv_dtype
        self.has_sinks = cfg.attention_sinks
        if self.has_sinks:  # gpt-oss: one learned logit per head joins every softmax (model/attend.py)
            self.sinks = param(rngs, (h,), ("heads",), dt)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            self.q_norm = norm(cfg, hd, ("head_dim",), rngs)
            self.k_norm = norm(cfg, hd, ("head_dim",), rngs)

    def __call__(self, x, rows: Rows, cache=None):
        """cache None: a plain causal forward. cache: this layer's pool (its shared pages, or for a
        sliding layer of a mixed model its per-slot window rings: `table`); rows.paged False: the first
        chunk of prompts (the prefill kernels, then their K/V written to pages); True: tokens that attend over
        what the pages already hold (decode, later chunks of a prompt)."""
        cos, sin = rows.rope[self.rope]
        q = quant.einsum("bsd,dhk->bshk", x, quant.get(self, "wq"))
        k = quant.einsum("bsd,dhk->bshk", x, quant.get(self, "wk"))
        v = quant.einsum("bsd,dhk->bshk", x, quant.get(self, "wv"))
        if self.bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        kc, vc = k, v  # what the cache is given
        if self.kv_dtype:  # quantized once: every attention path sees what the 8-bit cache will return
            kc, vc = quant.quantize_vectors(k, self.kv_dtype), quant.quantize_vectors(v, self.kv_dtype)
            k, v = kc.dequantize(k.dtype), vc.dequantize(v.dtype)
        pages = rows.pages
        table = None if pages is None else pages.get(self.table, pages["table"])
        sinks = self.sinks[...] if self.has_sinks else None
        if rows.paged:
            out, cache = paged_attention(q, kc, vc, cache, table, rows.positions, rows.valid, self.spec,
                                         sinks)
        else:
            out = prefill_attention(q, k, v, rows.positions, self.spec, sinks)
            if cache is not None:
                cache = write_pages(cache, kc, vc, table, pages["positions"], pages["valid"])
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = row_parallel("bshk,hkd->bsd", out, quant.get(self, "wo"), ("batch", "seq", "heads", "head_dim"),
                         ("heads", "head_dim", "embed"))
        if self.out_bias:
            y = y + self.bo[...]
        return constrain(y, ("batch", "residual_seq", "embed")), cache


class MLP(nnx.Module):
    """A gated FFN (SwiGLU, or GeGLU for Gemma): column-parallel gate/up, row-parallel down: one all-reduce
    under tensor parallelism."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, ffn: int | None = None):
        d, f, dt = cfg.hidden_size, ffn or cfg.intermediate_size, cfg.dtype
        self.act = cfg.hidden_act
        weight(self, "w_gate", rngs, (d, f), ("embed", "mlp"), cfg)
        weight(self, "w_up", rngs, (d, f), ("embed", "mlp"), cfg)
        weight(self, "w_down", rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x):
        g = quant.einsum("bsd,df->bsf", x, quant.get(self, "w_gate"))
        u = quant.einsum("bsd,df->bsf", x, quant.get(self, "w_up"))
        hmid = constrain(ACT[self.act](g) * u, ("batch", "seq", "mlp"))
        return row_parallel("bsf,fd->bsd", hmid, quant.get(self, "w_down"), ("batch", "seq", "mlp"),
                            ("mlp", "embed"))


class MoE(nnx.Module):
    """Mixture of experts: a router picks each token's top-k experts (softmax scores, or DeepSeek-V3's group-limited
    sigmoid routing: `route`), whose gated-FFN outputs (SwiGLU, or gpt-oss's clamped SwiGLU with biases) are
    summed with the router weights (renormalised over the top k when norm_topk_prob), plus a shared expert when
    the model has one.
    Experts are stacked on a logical `experts` axis; how they run (all experts masked, or dispatched to the
    devices holding them) is the layout's choice (parallel/experts.py)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e, dt = cfg.hidden_size, cfg.expert_ffn, cfg.num_local_experts, cfg.dtype
        self.k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = param(rngs, (d, e), ("embed", None), dt)
        self.has_router_bias, self.has_bias = cfg.router_bias, cfg.expert_bias
        if self.has_router_bias:
            self.router_bias = param(rngs, (e,), (None,), dt)
        weight(self, "w_gate", rngs, (e, d, f), NAMES["w_gate"], cfg, reduced=(1,))
        weight(self, "w_up", rngs, (e, d, f), NAMES["w_up"], cfg, reduced=(1,))
        weight(self, "w_down", rngs, (e, f, d), NAMES["w_down"], cfg, reduced=(1,))
        if self.has_bias:  # gpt-oss
            self.b_gate = param(rngs, (e, f), NAMES["b_gate"], dt)
            self.b_up = param(rngs, (e, f), NAMES["b_up"], dt)
            self.b_down = param(rngs, (e, d), NAMES["b_down"], dt)
        self.gate = Gate(cfg.swiglu_limit, cfg.swiglu_alpha)
        self.has_shared = bool(cfg.shared_expert_intermediate_size)
        self.shared_gated = self.has_shared and cfg.shared_expert_gated
        if self.has_shared:  # one more expert every token uses (Qwen2-MoE: scaled by a sigmoid gate; DeepSeek)
            self.shared = MLP(cfg, rngs, cfg.shared_expert_intermediate_size)
        if self.shared_gated:
            self.shared_gate = param(rngs, (d, 1), ("embed", None), dt)
        self.sigmoid = cfg.scoring_func == "sigmoid"
        self.groups = (cfg.n_group, cfg.topk_group) if cfg.n_group else None
        self.scaling = cfg.routed_scaling_factor
        self.has_score_bias = cfg.router_score_bias
        if self.has_score_bias:  # DeepSeek-V3: chooses experts, does not weigh them
            self.score_bias = param(rngs, (e,), (None,), jnp.float32, nnx.initializers.zeros)

    def route(self, x):
        """x [B,S,D] -> chosen experts [B,S,k], their weights [B,S,k] and all router probabilities [B,S,E]
        (float32). Softmax scores (Mixtral, Qwen, gpt-oss), or DeepSeek-V3's: sigmoid scores, experts chosen by
        score + correction bias within the best topk_group of n_group groups (a group's worth: its two best),
        weighted by their scores, renormalised and scaled by routed_scaling_factor."""
        logits = jnp.einsum("bsd,de->bse", x, self.router[...], preferred_element_type=jnp.float32)
        if self.has_router_bias:
            logits = logits + self.router_bias[...].astype(jnp.float32)
        scores = jax.nn.sigmoid(logits) if self.sigmoid else jax.nn.softmax(logits, axis=-1)
        choice = scores + self.score_bias[...] if self.has_score_bias else scores
        if self.groups:
            n, keep = self.groups
            b, s, e = choice.shape
            grouped = choice.reshape(b, s, n, e // n)
            best, _ = top_k_per_token(grouped.reshape(b, s * n, e // n), 2)
            _, chosen = top_k_per_token(best.sum(axis=-1).reshape(b, s, n), keep)
            allowed = jnp.any(chosen[..., None] == jnp.arange(n), axis=-2)  # [B,S,n]
            choice = jnp.where(jnp.repeat(allowed, e // n, axis=-1), choice, -jnp.inf)
        _, idx = top_k_per_token(choice, self.k)
        top = jnp.take_along_axis(scores, idx, axis=-1)
        if self.norm_topk:
            top = top / (jnp.sum(top, axis=-1, keepdims=True) + (1e-20 if self.sigmoid else 0.0))
        top = top * self.scaling
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True) if self.sigmoid else scores
        return idx, top, probs

    def __call__(self, x, valid, router_aux: bool = False):
        """valid [B,S]: real tokens (padding is not routed). -> (out, stats): stats holds `load` [E]
        (assignments per expert) and `dropped` (assignments past capacity); with router_aux also `aux`, the
        Switch-Transformer load-balancing loss E * sum_e(fraction routed to e * mean probability of e)."""
        idx, top, probs = self.route(x)
        names = ("w_gate", "w_up", "w_down") + (("b_gate", "b_up", "b_down") if self.has_bias else ())
        out, load, dropped = expert_ffn(x, idx, top, valid, {k: quant.get(self, k) for k in names}, self.gate)
        if self.shared_gated:
            out = out + jax.nn.sigmoid(jnp.einsum("bsd,do->bso", x, self.shared_gate[...])) * self.shared(x)
        elif self.has_shared:
            out = out + self.shared(x)
        stats = {"load": load, "dropped": dropped}
        if router_aux:
            n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
            p_mean = jnp.sum(probs * valid[..., None], axis=(0, 1)) / n
            stats["aux"] = probs.shape[-1] * jnp.sum(jax.lax.stop_gradient(load) / (n * self.k) * p_mean)
        return out, stats


class Block(nnx.Module):
    """One decoder layer of a given kind (model/groups.py): its attention slides or not, its feed-forward is
    dense or a mixture of experts."""

    def __init__(self, cfg: ModelConfig, kv_heads: int, kind: LayerKind, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.attn_norm = norm(cfg, d, ("embed",), rngs)
        if cfg.mla:
            from jaxpar.model.mla import LatentAttention  # it builds on this module's parts
            self.attn = LatentAttention(cfg, kv_heads, kind.sliding, rngs)
        else:
            self.attn = Attention(cfg, kv_heads, kind.sliding, rngs)
        self.mlp_norm = norm(cfg, d, ("embed",), rngs)
        self.mlp = MoE(cfg, rngs) if kind.moe else MLP(cfg, rngs)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma: each sublayer's output is normalised before the residual add
            self.attn_post_norm = norm(cfg, d, ("embed",), rngs)
            self.mlp_post_norm = norm(cfg, d, ("embed",), rngs)

    def __call__(self, x, rows: Rows, cache=None):
        """-> (x, cache, stats); stats: the MoE layer's load statistics ({} for a dense MLP)."""
        a, cache = self.attn(self.attn_norm(x), rows, cache)
        x = x + (self.attn_post_norm(a) if self.sandwich else a)
        if isinstance(self.mlp, MoE):
            m, stats = self.mlp(self.mlp_norm(x), rows.valid, rows.router_aux)
        else:
            m, stats = self.mlp(self.mlp_norm(x)), {}
        x = x + (self.mlp_post_norm(m) if self.sandwich else m)
        return constrain(x, ("batch", "residual_seq", "embed")), cache, stats
