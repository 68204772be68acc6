"""Parameters: the abstract model, its shardings, and the canonical <-> run forms.

The canonical form (what checkpoints store) has the model's own number of kv heads and its layer groups
(model/groups.py); a layout with kv_repeat > 1 stores each kv head kv_repeat times along the `kv_heads` axis,
the split form holds every layer as its own group, and under pipeline stages each group is padded to a multiple of
the stages (model/groups.Form; `regroup` moves between forms)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import Layout
from jaxpar.model.decoder import Decoder
from jaxpar.model.groups import CANONICAL, SPLIT, Form, layer_groups


@functools.lru_cache(maxsize=32)
def abstract_model(cfg: ModelConfig, kv_repeat: int = 1, form: Form = CANONICAL):
    """(graphdef, abstract State) of the model, without allocating anything."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), kv_repeat, form))
    return nnx.split(model)


def logical_names(cfg: ModelConfig, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    """Pure dict: param path -> tuple of logical axis names."""
    _, state = abstract_model(cfg, kv_repeat, form)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def shapes(cfg: ModelConfig, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    _, state = abstract_model(cfg, kv_repeat, form)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def _is_names(x):
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def shardings(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, replicate_kv: bool = False,
              form: Form = CANONICAL) -> dict:
    """Each parameter's sharding. A group's `layers` axis that the stages do not divide (the canonical form of
    a padded group, held while loading or saving) is replicated over them."""
    stages = layout.size("layers")

    def one(names, x):
        if replicate_kv:
            names = tuple(None if n == "kv_heads" else n for n in names)
        if "layers" in names and x.shape[names.index("layers")] % stages:
            names = tuple(None if n == "layers" else n for n in names)
        return layout.sharding(names)
    return jax.tree.map(one, logical_names(cfg, kv_repeat, form), shapes(cfg, kv_repeat, form), is_leaf=_is_names)


def abstract_params(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, replicate_kv: bool = False,
                    form: Form = CANONICAL) -> dict:
    sh = shardings(cfg, layout, kv_repeat, replicate_kv, form)
    return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sh,
                        shapes(cfg, kv_repeat, form))


def _kv_axis(names):
    return names.index("kv_heads") if "kv_heads" in names else None


def expand_kv(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int, form: Form = CANONICAL) -> dict:
    """Params with the model's kv heads -> each kv head repeated kv_repeat times, laid out on `layout`."""
    if kv_repeat == 1:
        return params
    names = logical_names(cfg, kv_repeat, form)
    out_sh = shardings(cfg, layout, kv_repeat, form=form)

    def rep(x, n):
        ax = _kv_axis(n)
        return x if ax is None else jnp.repeat(x, kv_repeat, axis=ax)
    return jax.jit(lambda p: jax.tree.map(rep, p, names, is_leaf=lambda x: not isinstance(x, dict)),
                   out_shardings=out_sh)(params)


def canonical_kv(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int) -> dict:
    """Inverse of expand_kv, on device: keep every kv_repeat-th kv head. Only the kv parameters are touched
    (they come out replicated over the axes the model's fewer kv heads cannot split); the rest pass through."""
    if kv_repeat == 1:
        return params
    names = logical_names(cfg, kv_repeat)
    canon_sh = shardings(cfg, layout, 1, replicate_kv=True)

    def take(x, n, sh):
        ax = _kv_axis(n)
        if ax is None:
            return x
        return jax.jit(lambda a: jax.lax.slice_in_dim(a, 0, a.shape[ax], kv_repeat, axis=ax), out_shardings=sh)(x)
    return jax.tree.map(take, params, names, canon_sh, is_leaf=lambda x: not isinstance(x, dict))


def init_params(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, seed: int = 0) -> dict:
    """Random parameters, created directly in their shards (canonical kv heads, then expanded)."""
    from jaxpar.engine.quantize import quantize_flat
    from jaxpar.model.quant import float_config

    def make():  # a quantized model is drawn in float, then quantized (the same weights, rounded)
        with nnx.use_eager_sharding(False):
            state = nnx.to_pure_dict(nnx.state(Decoder(float_config(cfg), nnx.Rngs(seed), 1)))
        return unflatten(quantize_flat(flatten(state), cfg)) if cfg.quantize else state
    canon = jax.jit(make, out_shardings=shardings(cfg, layout, 1, replicate_kv=kv_repeat > 1))()
    return expand_kv(canon, cfg, layout, kv_repeat)


def bind(cfg: ModelConfig, kv_repeat: int, params: dict, form: Form = CANONICAL) -> Decoder:
    """A Decoder whose parameters are `params` (call inside jit)."""
    graph, state = abstract_model(cfg, kv_repeat, form)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested params dict -> {"group0.block0.attn.wq": leaf, ...}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of flatten."""
    out: dict = {}
    for name, v in flat.items():
        *parents, last = name.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs (the largest device's share)."""
    totals: dict = {}
    for x in jax.tree.leaves(tree):
        sh = x.sharding
        per = int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for d in sh.device_set:
            totals[d] = totals.get(d, 0) + per
    return max(totals.values()) if totals else 0


def _layer_slots(cfg: ModelConfig, form: Form) -> dict:
    """Layer index -> (parameter path prefix of its block, index along the block's layers axis)."""
    out = {}
    for g, group in enumerate(layer_groups(cfg, form)):
        for j in range(group.repeats):
            for u in range(len(group.unit)):
                out[group.layer_index(j, u)] = (f"group{g}.block{u}.", j)
    return out


@functools.partial(jax.jit, static_argnums=(2,))
def _take(a, j, sharding):
    return jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(a, j, 1), sharding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize(a, slots: int, sharding):
    """A stacked parameter with `slots` entries on its layers axis: the padding cut off, or zeros appended."""
    if slots <= a.shape[0]:
        return jax.lax.with_sharding_constraint(a[:slots], sharding)
    pad = jnp.zeros((slots - a.shape[0],) + a.shape[1:], a.dtype)
    return jax.lax.with_sharding_constraint(jnp.concatenate([a, pad]), sharding)


def is_split(params: dict, cfg: ModelConfig) -> bool:
    """Whether `params` hold every layer as its own group (when that differs from the canonical grouping)."""
    return len(layer_groups(cfg)) != len(layer_groups(cfg, SPLIT)) and f"group{cfg.num_hidden_layers - 1}" in params


def split_leaf(name: str, a, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    """One parameter of the canonical form -> its part of the split form ({path: array}): a group parameter
    becomes one slice per layer, laid out as the split form's; others pass through. Loaders call it a
    parameter at a time, so the two forms of the model are never whole on the devices at once."""
    if not name.startswith("group"):
        return {name: a}
    prefix = name[:name.index(".", name.index(".") + 1) + 1]  # "group{g}.block{u}."
    rest = name[len(prefix):]
    src, dst = _layer_slots(cfg, CANONICAL), _layer_slots(cfg, SPLIT)
    sh = flatten(shardings(cfg, layout, kv_repeat, form=SPLIT))
    return {dst[i][0] + rest: _take(a, j, sh[dst[i][0] + rest]) for i, (p, j) in src.items() if p == prefix}


def regroup(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    """Parameters in any form (model/groups.Form) -> `form`, on device, one block parameter at a time, each laid
    out as its new group's are. Between stacked forms only the padding changes; to or from the split form
    the layers are taken one by one."""
    flat = flatten(params)
    src = _layer_slots(cfg, SPLIT if is_split(params, cfg) else CANONICAL)
    sh = flatten(shardings(cfg, layout, kv_repeat, form=form))
    out = {k: v for k, v in flat.items() if not k.startswith("group")}
    for g, group in enumerate(layer_groups(cfg, form)):
        for u in range(len(group.unit)):
            prefix = f"group{g}.block{u}."
            layers = [group.layer_index(j, u) for j in range(group.repeats)]
            first = src[layers[0]][0]
            for name in (k[len(first):] for k in flat if k.startswith(first)):
                a = flat[first + name]
                if all(src[i] == (first, j) for j, i in enumerate(layers)):  # one stack, maybe padded otherwise
                    out[prefix + name] = a if a.shape[0] == group.slots else _resize(a, group.slots, sh[prefix + name])
                    continue
                pieces = [_take(flat[src[i][0] + name], src[i][1], sh[prefix + name]) for i in layers]
                if group.padding:
                    pieces.append(jnp.zeros((group.padding,) + a.shape[1:], a.dtype))
                out[prefix + name] = pieces[0] if len(pieces) == 1 else jax.jit(
                    lambda *xs: jnp.concatenate(xs), out_shardings=sh[prefix + name])(*pieces)
    return unflatten(out)
