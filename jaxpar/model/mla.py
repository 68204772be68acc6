"""Multi-head latent attention (MLA, DeepSeek V2/V3), in its absorbed form everywhere.

Each token is compressed to one latent c (kv_lora_rank values, RMS-normalised) and one rope key k_r
(qk_rope_head_dim values, shared by every head): the cache holds [c, k_r] per token and layer (576 values for
DeepSeek-V3), with no head axis. Head h's key would be [W_uk[h] c, k_r] and its value W_uv[h] c; instead of
rebuilding them, the per-head up-projections are absorbed into the query and the output:

    score_h = q_nope[h] . (W_uk[h] c) + q_rope[h] . k_r = [W_uk[h]^T q_nope[h], q_rope[h]] . [c, k_r]
    out_h   = W_uv[h] (sum_t p_t c_t)

so attention is multi-query attention of H queries of kv_lora_rank + qk_rope_head_dim values over one shared
key per token whose value is the key itself (AttentionSpec.latent): decode reads the latent cache and never
builds per-head K/V. (Prefill does the same; it costs (576 + 576) / (192 + 128) = 3.6x the attention FLOPs of
expanded K/V on DeepSeek-V3's shapes, and the prompt's K/V never exist per head either.)

Under tensor parallelism the query heads split and the latent, having no head axis, is replicated on every
device of the split (kv_repeat, as for MQA)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import constrain
from jaxpar.model import quant
from jaxpar.model.layers import Rows, attention_spec, norm, weight
from jaxpar.model.rope import apply_rope
from jaxpar.parallel.attention import prefill_attention
from jaxpar.parallel.paged import paged_attention, write_pages
from jaxpar.parallel.seq_parallel import row_parallel


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, kv_heads: int, sliding: bool, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        nope, rope, lat, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        self.nope, self.lat = nope, lat
        self.q_lora = cfg.q_lora_rank is not None
        if self.q_lora:
            weight(self, "wq_a", rngs, (d, cfg.q_lora_rank), ("embed", None), cfg)
            self.q_norm = norm(cfg, cfg.q_lora_rank, (None,), rngs)
            weight(self, "wq_b", rngs, (cfg.q_lora_rank, h, nope + rope), (None, "heads", "head_dim"), cfg)
        else:
            weight(self, "wq", rngs, (d, h, nope + rope), ("embed", "heads", "head_dim"), cfg)
        # the latent and the rope key, one "kv head" (repeated kv_heads times under a wide tensor split)
        weight(self, "wkv_a", rngs, (d, kv_heads, lat + rope), ("embed", "kv_heads", "head_dim"), cfg)
        self.kv_norm = norm(cfg, lat, ("head_dim",), rngs)
        # the up-projections per head (key, value): Hugging Face's kv_b_proj, whose input is the latent
        weight(self, "w_uk", rngs, (h, nope, lat), ("heads", None, "head_dim"), cfg, reduced=(2,))
        weight(self, "w_uv", rngs, (h, lat, vd), ("heads", "head_dim", None), cfg, reduced=(1,))
        weight(self, "wo", rngs, (h, vd, d), ("heads", None, "embed"), cfg, reduced=(0, 1))
        self.rope = "sliding" if sliding else "full"
        self.table = "ring_table" if sliding else "table"  # a mixed model's sliding layers cache in per-slot rings
        self.spec = attention_spec(cfg, sliding)
        self.kv_dtype = cfg.kv_dtype

    def __call__(self, x, rows: Rows, cache=None):
        """As Attention.__call__; cache: the layer's latent pool (its values are its keys)."""
        cos, sin = rows.rope[self.rope]
        if self.q_lora:
            q_a = self.q_norm(quant.einsum("bsd,dr->bsr", x, quant.get(self, "wq_a")))
            q = quant.einsum("bsr,rhk->bshk", q_a, quant.get(self, "wq_b"))
        else:
            q = quant.einsum("bsd,dhk->bshk", x, quant.get(self, "wq"))
        # W_uk absorbed into the query
        q_lat = quant.einsum("bshn,hnc->bshc", q[..., :self.nope], quant.get(self, "w_uk"))
        q = jnp.concatenate([q_lat, apply_rope(q[..., self.nope:], cos, sin)], axis=-1)
        kv = quant.einsum("bsd,dhk->bshk", x, quant.get(self, "wkv_a"))
        k = jnp.concatenate([self.kv_norm(kv[..., :self.lat]), apply_rope(kv[..., self.lat:], cos, sin)], axis=-1)
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        kc = k  # what the cache is given
        if self.kv_dtype:  # quantized once: attention sees the latent as the 8-bit cache will return it
            kc = quant.quantize_vectors(k, self.kv_dtype)
            k = kc.dequantize(k.dtype)
        pages = rows.pages
        table = None if pages is None else pages.get(self.table, pages["table"])
        if rows.paged:
            out, cache = paged_attention(q, kc, None, cache, table, rows.positions, rows.valid, self.spec)
        else:
            out = prefill_attention(q, k, k, rows.positions, self.spec)
            if cache is not None:
                cache = write_pages(cache, kc, None, table, pages["positions"], pages["valid"])
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        # W_uv absorbed into the output
        o = quant.einsum("bshc,hcv->bshv", out[..., :self.lat], quant.get(self, "w_uv"))
        y = row_parallel("bshv,hvd->bsd", o, quant.get(self, "wo"), ("batch", "seq", "heads", None),
                         ("heads", None, "embed"))
        return constrain(y, ("batch", "residual_seq", "embed")), cache
