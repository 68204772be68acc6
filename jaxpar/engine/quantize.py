"""Float parameters -> the quantized form a config asks for (model/quant.py), one parameter at a time.

Loaders (random init, Orbax, Hugging Face) produce each parameter in float, laid out on the devices, and
hand it here: a weight with a scale in the quantized model becomes its values and scale, in their own
shardings, before the next parameter is read, so a float copy of the whole model never exists."""
from __future__ import annotations

import functools

import jax

from jaxpar.config import ModelConfig
from jaxpar.engine import params as P
from jaxpar.errors import CheckpointError
from jaxpar.layout.rules import Layout
from jaxpar.model import quant
from jaxpar.model.groups import CANONICAL, Form


def scale_shapes(cfg: ModelConfig, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    """Flat parameter path of each quantized weight -> its scale's shape."""
    if cfg.quantize is None:
        return {}
    flat = P.flatten(P.shapes(cfg, kv_repeat, form))
    return {k[:-len("_scale")]: v.shape for k, v in flat.items() if k.endswith("_scale")}


def quantize_flat(flat: dict, cfg: ModelConfig, kv_repeat: int = 1, form: Form = CANONICAL) -> dict:
    """{path: float array} -> the quantized model's {path: values, path_scale: scale} (traceable: for init)."""
    scales = scale_shapes(cfg, kv_repeat, form)
    out = {}
    for name, a in flat.items():
        if name in scales:
            q = quant.quantize(a, cfg.quantize, scales[name])
            out[name], out[name + "_scale"] = q.values, q.scale
        else:
            out[name] = a
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize(a, fmt, shape_of_scale, values_sharding, scale_sharding, stacked: bool):
    q = (quant.quantize_layers if stacked else quant.quantize)(a, fmt, shape_of_scale)
    return (jax.lax.with_sharding_constraint(q.values, values_sharding),
            jax.lax.with_sharding_constraint(q.scale, scale_sharding))


class LeafQuantizer:
    """Quantizes parameters one at a time as loaders produce them, each into its sharding on `layout`."""

    def __init__(self, cfg: ModelConfig, layout: Layout, kv_repeat: int = 1, form: Form = CANONICAL,
                 replicate_kv: bool = False):
        self.fmt = cfg.quantize
        self.scales = scale_shapes(cfg, kv_repeat, form)
        self.shardings = P.flatten(P.shardings(cfg, layout, kv_repeat, replicate_kv, form)) if self.scales else {}
        names = P.flatten(P.logical_names(cfg, kv_repeat, form)) if self.scales else {}
        self.stacked = {k for k in self.scales if names[k][:1] == ("layers",)}  # quantized a layer at a time

    def __call__(self, name: str, a) -> dict:
        if name not in self.scales:
            return {name: a}
        values, scale = _quantize(a, self.fmt, self.scales[name], self.shardings[name],
                                  self.shardings[name + "_scale"], name in self.stacked)
        return {name: values, name + "_scale": scale}


def check_blocks(cfg: ModelConfig, layout: Layout, kv_repeat: int, form: Form, source: str) -> None:
    """Block scales split with their weights only in whole blocks: a layout that would cut a block between
    devices is refused, naming the weight (vLLM refuses the same)."""
    if cfg.quant_block is None:
        return
    names = P.flatten(P.logical_names(cfg, kv_repeat, form))
    shapes = P.flatten(P.shapes(cfg, kv_repeat, form))
    for path, sshape in scale_shapes(cfg, kv_repeat, form).items():
        for s, n, name in zip(sshape, shapes[path].shape, names[path + "_scale"]):
            split = layout.size(name) if name else 1
            if 1 < s < n and s % split:
                mesh = " x ".join(f"{a}={layout.axis_size(a)}" for a in layout.axes(name))
                raise CheckpointError(f"{source}: {path}: its scales hold {s} blocks of {cfg.quant_block} inputs "
                                      f"along its {name} axis (length {n}), which {mesh} cannot split into whole "
                                      f"blocks; choose a layout that splits {name} into a divisor of {s}")
