"""Turn a mesh file into a Layout for a given model, refusing what the model cannot take before compiling."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh

from jaxpar.config import ModelConfig
from jaxpar.errors import LayoutError
from jaxpar.layout.mesh_file import MeshConfig
from jaxpar.layout.rules import Axes, Layout, make_rules, platform_of, recording_names
from jaxpar.model.groups import Form, layer_groups, layer_kinds


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    layout: Layout
    mesh_cfg: MeshConfig  # resolved (no -1)
    kv_repeat: int  # each kv head stored this many times so kv heads split over the tensor axes

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh


def _axes_desc(ax: Axes, logical: str) -> str:
    """The mesh axes (of size > 1) that split a logical axis, with their sizes: "tensor=4 x seq=2"."""
    return " x ".join(f"{a}={ax.axis_size(a)}" for a in ax.axes(logical))


@functools.lru_cache(maxsize=64)
def activation_names(cfg: ModelConfig) -> tuple:
    """The logical names of every activation the model pins (its `constrain` calls), recorded while a forward
    pass is traced abstractly (nothing computed or allocated), plus the KV pools' (their `pages` axis is split
    over the batch axes and then `cache_seq`: named as the two, so a rule giving both one mesh axis is caught)."""
    import jax.numpy as jnp

    from jaxpar.engine import params as P

    def forward(params, tokens):
        model = P.bind(cfg, 1, params)
        h, _, _ = model(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
        return model.logits(h)
    with recording_names() as names:
        jax.eval_shape(forward, P.shapes(cfg), jax.ShapeDtypeStruct((1, 2), jnp.int32))
    pools = ("layers", "batch", "cache_seq", None, "kv_heads", "head_dim")
    return tuple(sorted(names | {pools}, key=str))


def _check_axis_reuse(cfg: ModelConfig, ax: Axes) -> None:
    """A mesh axis may split only one dimension of any one tensor (a rules override could ask for two)."""
    from jaxpar.engine.params import logical_names  # the parameters' names, from the abstract model
    params = jax.tree.leaves(logical_names(cfg), is_leaf=lambda x: isinstance(x, tuple))
    for names in list(activation_names(cfg)) + params:
        seen: dict = {}
        for lg in names:
            for a in ax.axes(lg):
                if seen.setdefault(a, lg) != lg:
                    raise LayoutError(f"{ax.mesh_cfg.source}: rules: mesh axis {a} would split both {seen[a]} and "
                                      f"{lg}, two dimensions of one tensor {names}")


def check_layout(mesh_cfg: MeshConfig, cfg: ModelConfig) -> int:
    """Refuse a layout the model cannot take (mesh_cfg resolved, no -1); returns kv_repeat. Needs no devices,
    so the planner checks layouts for hardware it does not have."""
    ax = Axes(mesh_cfg)
    src = mesh_cfg.source
    size = ax.size

    _check_axis_reuse(cfg, ax)
    if size("experts") > 1 and not cfg.num_local_experts:
        raise LayoutError(f"{src}: axes {_axes_desc(ax, 'experts')}: expert parallelism needs a "
                          f"mixture-of-experts model, and this model is dense (num_local_experts=0)")
    kinds = layer_kinds(cfg)
    ffn = []  # the FFN widths the model's layers use
    if any(k.moe for k in kinds):
        ffn.append(("mlp", cfg.expert_ffn, "moe_intermediate_size" if cfg.moe_intermediate_size
                    else "intermediate_size"))
    if not all(k.moe for k in kinds):
        ffn.append(("mlp", cfg.intermediate_size, "intermediate_size"))
    checks = [("heads", cfg.num_attention_heads, "num_attention_heads"), *ffn,
              ("experts", max(cfg.num_local_experts, 1), "num_local_experts"),
              ("vocab", cfg.vocab_size, "vocab_size"),
              ("embed", cfg.hidden_size, "hidden_size"),
              ("head_dim", cfg.head_size, "head_dim")]
    for logical, n, field in checks:
        s = size(logical)
        if n % s:
            raise LayoutError(f"{src}: axes {_axes_desc(ax, logical)}: model {field}={n} "
                              f"(logical axis {logical}) is not divisible by {s}")
    stages = size("layers")
    groups = layer_groups(cfg, Form(stages=stages))
    if stages > 1 and all((stages - 1) * (g.slots // stages) >= g.repeats for g in groups):
        most = max(p for p in range(1, stages + 1)
                   if any((p - 1) * -(-g.repeats // p) < g.repeats for g in layer_groups(cfg)))
        raise LayoutError(f"{src}: axes {_axes_desc(ax, 'layers')}: the last pipeline stage would hold no layer of "
                          f"the model ({cfg.num_hidden_layers} layers: "
                          f"{'; '.join(g.describe() for g in layer_groups(cfg))}); use at most {most} stages")
    _check_residual(ax, cfg)
    n_seq = mesh_cfg.size("seq")
    if n_seq > 1:
        _check_seq(ax, cfg)
    ulysses = n_seq > 1 and mesh_cfg.attention == "ulysses"
    kv, s = cfg.kv_heads, size("kv_heads") * (size("seq") if ulysses else 1)
    if kv % s == 0:
        return 1
    if s % kv == 0:
        return s // kv  # replicate kv heads: each device holds one copy of the kv head its query heads use
    how = _axes_desc(ax, "kv_heads") + (" (kv heads per device) x seq=" + str(n_seq) +
                                                     " (ulysses)" if ulysses else "")
    raise LayoutError(f"{src}: axes {how}: model num_key_value_heads={kv} "
                      f"neither divides by {s} nor divides {s}, so kv heads cannot be split or replicated "
                      f"evenly")


def cache_kv_heads(cfg: ModelConfig, kv_repeat: int, layout) -> int:
    """The kv heads of a layer's pool: the model's, each repeated only as often as the tensor split needs. Ulysses
    repeats them further (kv_repeat) so that they also split over `seq` for its all-to-all; the cache, whose
    pages split over `seq` instead, keeps one copy per device (MLA's one latent: one, not seq copies). The
    repeats are consecutive, so every kv_repeat / r-th head is one copy of each (parallel/paged.py). layout: a Layout or the planner's Axes."""
    kv, t = cfg.kv_heads, layout.size("kv_heads")
    r = 1 if kv % t == 0 else t // kv if t % kv == 0 else kv_repeat
    return kv * (r if kv_repeat % r == 0 else kv_repeat)


def plan_layout(mesh_cfg: MeshConfig, cfg: ModelConfig, devices=None) -> ModelLayout:
    devices = list(devices if devices is not None else jax.devices())
    mesh_cfg = mesh_cfg.resolved(len(devices))
    names, shape = _mesh_shape(mesh_cfg)
    mesh = Mesh(np.array(devices[:mesh_cfg.device_count]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))
    return _model_layout(mesh, mesh_cfg, cfg, platform_of(devices[0]))


def abstract_layout(mesh_cfg: MeshConfig, cfg: ModelConfig, platform: str, devices: int | None = None) -> ModelLayout:
    """The layout on `platform` over devices that need not exist (an AbstractMesh of the mesh's size, or of
    `devices` for a mesh with a -1 axis): programs built on it lower for that platform, never run here."""
    if devices is None and -1 in mesh_cfg.axes.values():
        raise LayoutError(f"{mesh_cfg.source}: axes: a -1 axis needs a device count to lower for {platform} "
                          f"(--devices N)")
    mesh_cfg = mesh_cfg.resolved(mesh_cfg.device_count if devices is None else devices)
    names, shape = _mesh_shape(mesh_cfg)
    mesh = AbstractMesh(tuple(shape), names, axis_types=(AxisType.Auto,) * len(names),
                        abstract_device=ABSTRACT_DEVICES.get(platform))
    return _model_layout(mesh, mesh_cfg, cfg, platform)


# The device kind Pallas TPU kernels are lowered for when no TPU is here (their lowering rules ask the chip
# generation); the programs do not otherwise depend on it.
ABSTRACT_DEVICES = {"tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")}


def _mesh_shape(mesh_cfg: MeshConfig) -> tuple:
    return tuple(mesh_cfg.axes) or ("data",), [mesh_cfg.axes[a] for a in mesh_cfg.axes] or [1]


def _model_layout(mesh, mesh_cfg: MeshConfig, cfg: ModelConfig, platform: str) -> ModelLayout:
    rep = check_layout(mesh_cfg, cfg)
    return ModelLayout(Layout(mesh, make_rules(mesh_cfg.rules), mesh_cfg.attention, mesh_cfg.capacity_factor,
                              mesh_cfg.microbatches, platform), mesh_cfg, rep)


def _check_residual(ax: Axes, cfg: ModelConfig) -> None:
    """`residual_seq` is the sequence's axes, optionally followed by the axes the row-parallel projections
    contract over (NVIDIA-style sequence parallelism: their sums become reduce-scatters)."""
    mesh_cfg = ax.mesh_cfg

    def live(lg):
        return list(ax.axes(lg))
    res, seq = live("residual_seq"), live("seq")
    extra = res[len(seq):]
    if res[:len(seq)] != seq or not extra:
        if res != seq:
            raise LayoutError(f"{mesh_cfg.source}: rules: residual_seq -> {res} must start with the seq axes {seq} "
                              f"(then, optionally, the tensor axes for NVIDIA-style sequence parallelism)")
        return
    contracted = {"heads": live("heads"), "mlp": live("experts") + live("mlp") if cfg.num_local_experts
                  else live("mlp")}
    for lg, axes in contracted.items():
        if axes != extra:
            raise LayoutError(f"{mesh_cfg.source}: rules: residual_seq adds {extra} to the sequence split, so the "
                              f"row-parallel projections must contract over exactly those axes, but {lg} is split "
                              f"over {axes}")


def _check_seq(ax: Axes, cfg: ModelConfig) -> None:
    """A `seq` axis: the prompt's sequence and the cache slots must split over the same mesh axes (the
    kernels hand one to the other); Ulysses also splits heads over seq x tensor."""
    mesh_cfg = ax.mesh_cfg
    src = mesh_cfg.source
    seq, cache_seq = list(ax.axes("seq")), list(ax.axes("cache_seq"))
    if seq != cache_seq:
        raise LayoutError(f"{src}: rules: seq -> {seq} and cache_seq -> {cache_seq} "
                          f"must name the same mesh axes (prefill hands its sequence shards to the KV cache)")
    if mesh_cfg.attention == "ulysses":
        n = ax.size("heads") * ax.size("seq")
        if cfg.num_attention_heads % n:
            heads = _axes_desc(ax, "heads")
            raise LayoutError(f"{src}: attention: ulysses splits heads over {heads}{' x ' if heads else ''}"
                              f"{_axes_desc(ax, 'seq')} = {n} devices, but model "
                              f"num_attention_heads={cfg.num_attention_heads} is not divisible by {n}")
