"""Parameters: the abstract model, its shardings, and the canonical <-> run forms.

The canonical form (what checkpoints store) has the model's own number of kv heads and its layer groups
(model/groups.py); a layout with kv_repeat > 1 stores each kv head kv_repeat times along the `kv_heads` axis,
and the split form (split=True) holds every layer as its own group (`regroup`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.layout.rules import Layout
from jaxpar.model.decoder import Decoder


@functools.lru_cache(maxsize=32)
def abstract_model(cfg: ModelConfig, kv_repeat: int = 1, split: bool = False):
    """(graphdef, abstract State) of the model, without allocating anything."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), kv_repeat, split))
    return nnx.split(model)


def logical_names(cfg: ModelConfig, kv_repeat: int = 1, split: bool = False) -> dict:
    """Pure dict: param path -> tuple of logical axis names."""
    _, state = abstract_model(cfg, kv_repeat, split)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def shapes(cfg: ModelConfig, kv_repeat: int = 1, split: bool = False) -> dict:
    _, state = abstract_model(cfg, kv_repeat, split)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def _is_names(x):
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def shardings(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, replicate_kv: bool = False,
              split: bool = False) -> dict:
    def one(names):
        if replicate_kv:
            names = tuple(None if n == "kv_heads" else n for n in names)
        return layout.sharding(names)
    return jax.tree.map(one, logical_names(cfg, kv_repeat, split), is_leaf=_is_names)


def abstract_params(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, replicate_kv: bool = False) -> dict:
    sh = shardings(cfg, layout, kv_repeat, replicate_kv)
    return jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sh, shapes(cfg, kv_repeat))


def _kv_axis(names):
    return names.index("kv_heads") if "kv_heads" in names else None


def expand_kv(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int) -> dict:
    """Canonical params -> params with each kv head repeated kv_repeat times, laid out on `layout`."""
    if kv_repeat == 1:
        return params
    names = logical_names(cfg, kv_repeat)
    out_sh = shardings(cfg, layout, kv_repeat)

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
    def make():
        with nnx.use_eager_sharding(False):
            return nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(seed), 1)))
    canon = jax.jit(make, out_shardings=shardings(cfg, layout, 1, replicate_kv=kv_repeat > 1))()
    return expand_kv(canon, cfg, layout, kv_repeat)


def bind(cfg: ModelConfig, kv_repeat: int, params: dict, split: bool = False) -> Decoder:
    """A Decoder whose parameters are `params` (call inside jit)."""
    graph, state = abstract_model(cfg, kv_repeat, split)
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


def _layer_slots(cfg: ModelConfig, split: bool) -> dict:
    """Layer index -> (parameter path prefix of its block, index along the block's layers axis)."""
    from jaxpar.model.groups import layer_groups
    out = {}
    for g, group in enumerate(layer_groups(cfg, split)):
        for j in range(group.repeats):
            for u in range(len(group.unit)):
                out[group.layer_index(j, u)] = (f"group{g}.block{u}.", j)
    return out


@functools.partial(jax.jit, static_argnums=(2,))
def _take(a, j, sharding):
    return jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(a, j, 1), sharding)


def is_split(params: dict, cfg: ModelConfig) -> bool:
    """Whether `params` hold every layer as its own group (when that differs from the canonical grouping)."""
    from jaxpar.model.groups import layer_groups
    return len(layer_groups(cfg)) != len(layer_groups(cfg, True)) and f"group{cfg.num_hidden_layers - 1}" in params


def split_leaf(name: str, a, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    """One parameter of the canonical form -> its part of the split form ({path: array}): a group parameter
    becomes one slice per layer, laid out as the split form's; others pass through. Loaders call it a
    parameter at a time, so the two forms of the model are never whole on the devices at once."""
    if not name.startswith("group"):
        return {name: a}
    src, dst = _layer_slots(cfg, False), _layer_slots(cfg, True)
    prefix = name[:name.index(".", name.index(".") + 1) + 1]  # "group{g}.block{u}."
    rest = name[len(prefix):]
    sh = flatten(shardings(cfg, layout, kv_repeat, split=True))
    return {dst[i][0] + rest: _take(a, j, sh[dst[i][0] + rest]) for i, (p, j) in src.items() if p == prefix}


def regroup(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, split: bool = False) -> dict:
    """Parameters from one grouping to the other (split: every layer its own group; else the canonical groups
    checkpoints store), on device, one block parameter at a time, each laid out as its new group's are."""
    if is_split(params, cfg) == split:
        return params
    src, dst = _layer_slots(cfg, not split), _layer_slots(cfg, split)
    flat = flatten(params)
    sh = flatten(shardings(cfg, layout, kv_repeat, split=split))
    out = {k: v for k, v in flat.items() if not k.startswith("group")}
    targets: dict = {}
    for i in range(cfg.num_hidden_layers):
        targets.setdefault(dst[i][0], []).append(i)
    for prefix, layers in targets.items():
        for name in (k[len(src[layers[0]][0]):] for k in flat if k.startswith(src[layers[0]][0])):
            pieces = []
            for i in layers:
                a = flat[src[i][0] + name]
                whole = a.shape[0] == 1
                pieces.append(a if whole else _take(a, src[i][1], sh[prefix + name]))
            out[prefix + name] = pieces[0] if len(pieces) == 1 else jax.jit(
                lambda *xs: jnp.concatenate(xs), out_shardings=sh[prefix + name])(*pieces)
    return unflatten(out)
