"""The one table that decides layout: logical axis names -> mesh axes.

Model code names logical axes only (`constrain(x, ("batch", "seq", "embed"))`); this module turns them
into PartitionSpecs for the active mesh. A mesh file's `rules:` overrides entries of the default table.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxpar.layout.mesh_file import PLATFORMS, MeshConfig  # noqa: F401 (PLATFORMS: Layout.platform's values)

LOGICAL_AXES = ("batch", "seq", "residual_seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers", "experts", "cache_seq")

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),  # the expert axis also splits the batch (attention is data-parallel there)
    "seq": ("seq",),  # the sequence of prompt activations (prefill)
    "residual_seq": ("seq",),  # the residual stream's sequence (between blocks, norms); [seq, tensor] gives
    # NVIDIA-style sequence parallelism: reduce-scatter + all-gather in place of each tensor all-reduce
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor", "stage"),  # embedding and LM head split over pipeline stages too (BENCHMARKS.md)
    "layers": ("stage",),  # consecutive layers per pipeline stage
    "experts": ("expert",),
    "cache_seq": ("seq",),  # KV cache slots
}


DECODE_RULES = {"seq": (), "residual_seq": ()}  # decode: one token per row, no sequence of activations to split


class Resolved:
    """The logical->mesh table resolved against mesh-axis sizes: which mesh axes split a logical axis, into
    how many parts, and the padding that follows. Shared by Layout (a real mesh) and its mesh-free twin
    (Axes: the planner, and the checks of layout/plan.py), so they cannot disagree. Subclasses are frozen
    dataclasses with `rules` and `microbatches` fields and an `axis_size(mesh_axis)` method."""
    rules: dict
    microbatches: int

    def axis_size(self, mesh_axis: str) -> int:
        raise NotImplementedError

    def axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        if logical == "pages":  # KV cache pages: each batch shard owns its slots' pages, spread over seq
            return self.axes("batch") + self.axes("cache_seq")
        return tuple(a for a in self.rules.get(logical, ()) if self.axis_size(a) > 1)

    def size(self, logical: str | None) -> int:
        return math.prod(self.axis_size(a) for a in self.axes(logical))

    def for_decode(self):
        """Decode computes one token per row: its activations have no sequence to split (the KV cache keeps
        its `cache_seq` split)."""
        return dataclasses.replace(self, rules={**self.rules, **DECODE_RULES})

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this: the batch split, times the microbatches of a pipeline."""
        return self.size("batch") * (self.microbatches if self.size("layers") > 1 else 1)

    @property
    def seq_multiple(self) -> int:
        """Prompt and cache lengths are padded to a multiple of this: two zigzag chunks per `seq` device,
        and the residual stream's split."""
        n = self.size("seq")
        return math.lcm(2 * n if n > 1 else 1, self.size("residual_seq"))


@dataclasses.dataclass(frozen=True)
class Layout(Resolved):
    """A mesh plus the resolved logical->mesh table, and how attention runs over a `seq` axis. The mesh is a
    Mesh of devices, or an AbstractMesh of a platform's devices that need not be here (lowering only)."""
    mesh: Mesh
    rules: dict
    attention: str = "dense"
    capacity_factor: float = 0.0  # expert buffer capacity (0 = dropless)
    microbatches: int = 1  # pipeline microbatches (when layers are split over stages)
    platform: str = "cpu"  # what the programs are lowered for: cpu, cuda or tpu (PLATFORMS)
    expert_dispatch: str = "auto"  # "auto" (parallel/experts.dispatch chooses), or a forced dispatch (tests)

    def axis_size(self, mesh_axis: str) -> int:
        return self.mesh.shape.get(mesh_axis, 1)

    def spec(self, names) -> P:
        parts = []
        for n in names:
            ax = self.axes(n)
            parts.append(None if not ax else ax[0] if len(ax) == 1 else ax)
        return P(*parts)

    def sharding(self, names) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def shard_map(self, f, in_specs, out_specs, check_vma: bool = True):
        """jax.shard_map over this layout's mesh, manual over every axis not already manual: inside the
        pipeline (manual over `stage`) the kernels nest, over the remaining axes of the context mesh.
        check_vma=False for bodies whose outputs JAX cannot type by mesh axis (Pallas kernels)."""
        ctx = jax.sharding.get_abstract_mesh()
        manual = {a for a, t in zip(ctx.axis_names, ctx.axis_types) if t == AxisType.Manual}
        return jax.shard_map(f, mesh=ctx if manual else self.mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names=frozenset(a for a in self.mesh.axis_names if a not in manual),
                             check_vma=check_vma)


def platform_of(device) -> str:
    """The lowering platform of a JAX device (an NVIDIA GPU reports "gpu")."""
    return "cuda" if device.platform == "gpu" else device.platform


def make_rules(overrides: dict | None = None) -> dict:
    rules = dict(DEFAULT_RULES)
    rules.update(overrides or {})
    return rules


@dataclasses.dataclass(frozen=True)
class Axes(Resolved):
    """The logical-axis table resolved against a mesh file's sizes, without devices (Layout's rules, shared
    through layout/rules.Resolved). `decode=True` drops the sequence split of activations, as
    Layout.for_decode."""
    mesh_cfg: MeshConfig
    rules: dict
    microbatches: int

    def __init__(self, mesh_cfg: MeshConfig, decode: bool = False, rules: dict | None = None,
                 microbatches: int | None = None):  # rules, microbatches: for dataclasses.replace
        rules = make_rules(mesh_cfg.rules) if rules is None else rules
        if decode:
            rules = {**rules, **DECODE_RULES}
        object.__setattr__(self, "mesh_cfg", mesh_cfg)
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "microbatches", mesh_cfg.microbatches if microbatches is None else microbatches)

    def axis_size(self, mesh_axis: str) -> int:
        return self.mesh_cfg.size(mesh_axis)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jaxpar_layout", default=None)


@contextlib.contextmanager
def activate(layout: Layout):
    """Trace model code under this layout: `constrain` and the parallel kernels read it."""
    tok = _ACTIVE.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE.reset(tok)


def active() -> Layout | None:
    return _ACTIVE.get()


_RECORDING: contextvars.ContextVar[set | None] = contextvars.ContextVar("jaxpar_recording", default=None)


@contextlib.contextmanager
def recording_names():
    """Collect the logical names of every `constrain` call traced inside (layout/plan.activation_names)."""
    names: set = set()
    tok = _RECORDING.set(names)
    try:
        yield names
    finally:
        _RECORDING.reset(tok)


def constrain(x, names):
    """Pin an activation's layout by logical axis names; a no-op when no layout is active."""
    rec = _RECORDING.get()
    if rec is not None:
        rec.add(tuple(names))
    lay = _ACTIVE.get()
    if lay is None or lay.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, lay.sharding(names))
