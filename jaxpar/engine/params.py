"""Parameters: the abstract model, its shardings, and the canonical <-> kv-replicated forms.

The canonical form (what checkpoints store) has the model's own number of kv heads; a layout with
kv_repeat > 1 stores each kv head kv_repeat times along the `kv_heads` axis."""
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
def abstract_model(cfg: ModelConfig, kv_repeat: int = 1):
    """(graphdef, abstract State) of the model, without allocating anything."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0), kv_repeat))
    return nnx.split(model)


def logical_names(cfg: ModelConfig, kv_repeat: int = 1) -> dict:
    """Pure dict: param path -> tuple of logical axis names."""
    _, state = abstract_model(cfg, kv_repeat)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(lambda p: tuple(p), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def shapes(cfg: ModelConfig, kv_repeat: int = 1) -> dict:
    _, state = abstract_model(cfg, kv_repeat)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def _is_names(x):
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def shardings(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, replicate_kv: bool = False) -> dict:
    def one(names):
        if replicate_kv:
            names = tuple(None if n == "kv_heads" else n for n in names)
        return layout.sharding(names)
    return jax.tree.map(one, logical_names(cfg, kv_repeat), is_leaf=_is_names)


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


def bind(cfg: ModelConfig, kv_repeat: int, params: dict) -> Decoder:
    """A Decoder whose parameters are `params` (call inside jit)."""
    graph, state = abstract_model(cfg, kv_repeat)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested params dict -> {"layers.attn.wq": leaf, ...}."""
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


def layer_shardings(cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    """Shardings of one layer's parameters (the layers subtree without its leading layers axis)."""
    def one(names):
        return layout.sharding(tuple(n for n in names[1:]))
    return jax.tree.map(one, logical_names(cfg, kv_repeat)["layers"], is_leaf=_is_names)


def unstack(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    """Stacked parameters -> the unrolled form: `layers` becomes a list of per-layer dicts, each array laid
    out as its slice was (split on device, one parameter at a time)."""
    n = cfg.num_hidden_layers
    flat, shard = flatten(params["layers"]), flatten(layer_shardings(cfg, layout, kv_repeat))
    per = {k: jax.jit(lambda a: tuple(a[i] for i in range(n)), out_shardings=(shard[k],) * n)(v)
           for k, v in flat.items()}
    return {**{k: v for k, v in params.items() if k != "layers"},
            "layers": [unflatten({k: per[k][i] for k in per}) for i in range(n)]}


def stack(params: dict, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1) -> dict:
    """Inverse of unstack (the form checkpoints store)."""
    if not is_unstacked(params):
        return params
    sh = flatten(shardings(cfg, layout, kv_repeat)["layers"])
    flat = [flatten(d) for d in params["layers"]]
    out = {k: jax.jit(lambda *a: jnp.stack(a), out_shardings=sh[k])(*[f[k] for f in flat]) for k in flat[0]}
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": unflatten(out)}


def is_unstacked(params: dict) -> bool:
    return isinstance(params.get("layers"), list)
