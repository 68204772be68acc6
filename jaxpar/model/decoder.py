"""A Llama-family decoder, written once. Layers are stacked on a leading `layers` axis and scanned (or
pipelined over `stage`, parallel/pipeline.py), so the compiled program (and compile time) does not grow with
depth."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import constrain
from jaxpar.model.layers import Block, RMSNorm, param
from jaxpar.model.rope import inv_frequencies, rope_tables
from jaxpar.parallel.embedding import embed_lookup
from jaxpar.parallel.pipeline import run_layers


class Decoder(nnx.Module):
    """`kv_repeat` > 1 stores each kv head that many times, so kv heads can be split over more devices than
    the model has kv heads (GQA/MQA under wide tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kv_repeat: int = 1):
        self.cfg = cfg
        self.kv_repeat = kv_repeat
        dt = cfg.dtype
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return Block(cfg, cfg.kv_heads * kv_repeat, r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("embed",), dt, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(self, tokens, positions, valid=None, cache=None, pages=None, paged=False, router_aux=False,
                 layers=None):
        """tokens, positions [B, S] -> hidden [B, S, embed] (before the final norm), the cache, statistics.

        cache None: plain causal forward. cache: the KV pools (k, v) [layers, pages, page_size, kv_heads,
        head_dim] (parallel/paged.py); pages: {"table": [B, nb] each row's pages, and for paged=False
        "positions", "valid" [B, S]: the chunk's, whole (not split over seq)}; paged=False: the first chunk of
        prompts (positions start at 0), paged=True: tokens attending over what the pages hold (decode, later
        prompt chunks). Under a `seq` axis a prompt's sequence is in the zigzag order (parallel/zigzag.py)
        and positions say which position each index holds. valid [B,S] marks real tokens (default all):
        only they are written to the cache and routed by mixture-of-experts layers. stats: per-layer expert
        statistics stacked on a leading layers axis ({} for a dense model).

        layers: per-layer parameter dicts (the unrolled form, engine/params.unstack), used in place of the
        stacked `self.layers`; the cache is then a list of per-layer (k, v)."""
        cfg = self.cfg
        x = constrain(embed_lookup(self.embed[...], tokens), ("batch", "residual_seq", "embed"))
        cos, sin = rope_tables(positions, inv_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling))
        graph, state = nnx.split(self.layers)
        rows = {"cos": cos, "sin": sin, "positions": positions,
                "valid": jnp.ones(tokens.shape, bool) if valid is None else valid}
        if pages is not None:
            rows["pages"] = pages

        def layer(h, layer_state, layer_cache, rows, extra):
            return nnx.merge(graph, layer_state)(h, rows["cos"], rows["sin"], rows["positions"], rows["valid"],
                                                 layer_cache, rows.get("pages"), paged, router_aux)

        if layers is not None:
            state = [_state_of(state, d) for d in layers]
        return run_layers(layer, state, x, rows, cache, {})

    def logits(self, h):
        """Final norm and LM head; logits are vocab-sharded, float32."""
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            out = jnp.einsum("bsd,vd->bsv", h, self.embed[...], preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("bsd,dv->bsv", h, self.lm_head[...], preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "vocab"))


def _state_of(template, values: dict):
    """An nnx State shaped like `template` (the stacked layers' state) holding one layer's arrays."""
    st = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(st, values)
    return st
