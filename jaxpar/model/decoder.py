"""The decoder, written once: an embedding, a sequence of layer groups (model/groups.py), a final norm and the
LM head. Each group's layers are stacked on a leading `layers` axis and scanned (or pipelined over `stage`,
parallel/pipeline.py), so the compiled program (and compile time) grows with the number of groups, not with
depth."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import constrain
from jaxpar.model.groups import CANONICAL, Form, Group, layer_groups
from jaxpar.model import quant
from jaxpar.model.layers import Block, Rows, norm, weight
from jaxpar.model.rope import attention_factor, inv_frequencies, rope_tables
from jaxpar.parallel.embedding import embed_lookup
from jaxpar.parallel.pipeline import run_layers


class GroupLayers(nnx.Module):
    """One group's parameters: `block{u}` holds the unit's u-th layer of every repeat, stacked on `layers`."""

    def __init__(self, cfg: ModelConfig, group: Group, kv_heads: int, rngs: nnx.Rngs):
        self.size = len(group.unit)
        for u, kind in enumerate(group.unit):
            setattr(self, f"block{u}", _stacked(cfg, kv_heads, kind, group.slots, rngs))

    def unit(self, x, rows: Rows, cache):
        """One repeat of the unit (called on one repeat's parameters): -> (x, cache, stats per position)."""
        new_cache, stats = [], []
        for u in range(self.size):
            x, c, st = getattr(self, f"block{u}")(x, rows, None if cache is None else cache[u])
            new_cache.append(c)
            stats.append(st)
        return x, (None if cache is None else tuple(new_cache)), tuple(stats)


def _stacked(cfg: ModelConfig, kv_heads: int, kind, repeats: int, rngs: nnx.Rngs) -> Block:
    """`repeats` Blocks of one kind, their parameters stacked on a leading `layers` axis."""
    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, kv_heads, kind, r)
    return make(rngs)


class Decoder(nnx.Module):
    """`kv_repeat` > 1 stores each kv head that many times, so kv heads can be split over more devices than
    the model has kv heads (GQA/MQA under wide tensor parallelism). form: how the layers are grouped
    (model/groups.Form: the model's groups, every layer its own group on CPU, or padded for pipeline stages)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kv_repeat: int = 1, form: Form = CANONICAL):
        self.cfg = cfg
        self.kv_repeat = kv_repeat
        self.layer_groups = layer_groups(cfg, form)
        # an FP8 checkpoint (block scales) ships its embedding and LM head unquantized: they stay as shipped
        tables = cfg if cfg.quant_block is None else quant.float_config(cfg)
        weight(self, "embed", rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), tables, reduced=(1,))
        for g, group in enumerate(self.layer_groups):
            setattr(self, f"group{g}", GroupLayers(cfg, group, cfg.kv_heads * kv_repeat, rngs))
        self.norm = norm(cfg, cfg.hidden_size, ("embed",), rngs)
        if not cfg.tie_word_embeddings:
            weight(self, "lm_head", rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), tables)

    def __call__(self, tokens, positions, valid=None, cache=None, pages=None, paged=False, router_aux=False):
        """tokens, positions [B, S] -> (hidden [B, S, embed] before the final norm, the cache, statistics).

        cache None: a plain causal forward. cache: per group, per unit position, the layer's pool [slots, pages,
        page_size, 2 * kv_heads, head_dim] (keys and values interleaved; MLA: its latent) (parallel/paged.py); pages and paged: see
        `Rows`. Under a `seq` axis a prompt's sequence is in the zigzag order (parallel/zigzag.py) and positions
        say which position each index holds. valid [B, S] marks real tokens (default all). stats: the mixture-of-experts
        layers' statistics, one row per MoE layer in layer order ({} for a dense model)."""
        cfg = self.cfg
        x = embed_lookup(quant.get(self, "embed"), tokens, cfg.dtype)
        if cfg.scale_embeddings:  # Gemma: by sqrt(hidden_size), rounded to the parameters' dtype
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
        x = constrain(x, ("batch", "residual_seq", "embed"))
        full = rope_tables(positions, inv_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling),
                           attention_factor(cfg.rope_scaling))
        sliding = full if cfg.rope_local_base_freq is None else rope_tables(
            positions, inv_frequencies(cfg.rope_dim, cfg.rope_local_base_freq, None))
        rows = Rows(positions, jnp.ones(tokens.shape, bool) if valid is None else valid,
                    {"full": full, "sliding": sliding}, pages, paged, router_aux)
        caches, stats = [], []
        for g, group in enumerate(self.layer_groups):
            graph, state = nnx.split(getattr(self, f"group{g}"))

            def unit(h, unit_state, unit_cache, rows, graph=graph):
                return nnx.merge(graph, unit_state).unit(h, rows, unit_cache)
            x, c, st = run_layers(unit, state, x, rows, None if cache is None else cache[g], group.repeats)
            if group.slots == 1:  # applied directly, not in a loop of its own (the split form)
                x = _after(x, st)
            caches.append(c)
            stats.append(st)
        return x, (None if cache is None else tuple(caches)), self._layer_order(stats)

    def _layer_order(self, stats: list) -> dict:
        """Per group and unit position statistics [repeats, ...] -> one row per MoE layer, in layer order."""
        rows, index = [], []
        for group, per_position in zip(self.layer_groups, stats):
            for u, st in enumerate(per_position):
                if st:
                    rows.append({k: v[:group.repeats] for k, v in st.items()})  # without the padding
                    index += [group.layer_index(j, u) for j in range(group.repeats)]
        if not rows:
            return {}
        order = np.argsort(index)
        cat = {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}
        return cat if (order == np.arange(len(order))).all() else {k: v[order] for k, v in cat.items()}

    def logits(self, h):
        """Final norm and LM head; logits are vocab-sharded, float32."""
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            out = quant.einsum("bsd,vd->bsv", h, quant.get(self, "embed"), preferred_element_type=jnp.float32)
        else:
            out = quant.einsum("bsd,dv->bsv", h, quant.get(self, "lm_head"), preferred_element_type=jnp.float32)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = cap * jnp.tanh(out / cap)
        return constrain(out, ("batch", "seq", "vocab"))


def _after(x, stats):
    """x, made to depend on a group's statistics without changing its value (x + 0 * sum: XLA folds 0 * a only
    for integers, since 0 * inf is NaN). Without it the statistics all-reduces of groups applied one after
    another (the split form) are independent of one another, and XLA combines them into one; an optimisation
    barrier does not stop that on XLA:CPU. It keeps one set of collectives per layer, as the planner counts
    (a scanned group's statistics come out of its own loop, and a pipelined group's are split over the stages:
    they need nothing)."""
    leaves = jax.tree.leaves(stats)
    if not leaves:
        return x
    return x + (0.0 * sum(jnp.sum(a) for a in leaves)).astype(x.dtype)
