"""The communication model: which collectives jaxpar's prefill and decode programs run on a layout, how often,
and how many bytes each moves per device, computed from the model config and the mesh file alone.

It mirrors the kernels in jaxpar/parallel and the model's sharding constraints, and it is tested against
the compiled programs (`jaxpar.inspect`) on every shipped mesh. Sizes use the engine's padded shapes
(`Step`). Each collective is a `Comm`: its op, the mesh axes it runs over (which sets the link it uses on
real hardware), how many times it runs in one step, and the bytes one run leaves on each device (the op's
result, the convention of `inspect`)."""
from __future__ import annotations

import dataclasses
import math

from jaxpar.analysis.hlo import COLLECTIVES
from jaxpar.config import ModelConfig
from jaxpar.layout.mesh_file import MeshConfig
from jaxpar.layout.plan import cache_kv_heads
from jaxpar.layout.rules import Axes
from jaxpar.model.groups import Form, layer_groups, moe_layers

F32 = 4


@dataclasses.dataclass(frozen=True)
class Comm:
    op: str  # one of hlo.COLLECTIVES
    axes: tuple  # mesh axes the collective runs over
    count: int  # runs per step
    bytes: int  # per device, per run (the result's size on one device)
    what: str = ""

    @property
    def total(self) -> int:
        return self.count * self.bytes


@dataclasses.dataclass(frozen=True)
class Step:
    """One compiled step's padded shapes: batch rows, tokens per row in this step, KV cache slots."""
    batch: int
    tokens: int
    cache: int
    decode: bool


def schedule(cfg: ModelConfig, ax: Axes, step: Step, moe_only: bool = False) -> tuple:
    """(pipeline ticks, layer executions per device, rows one layer execution works on) of one step: L/P
    layers per tick for M+P-1 ticks under a pipeline (each group goes through the stages in turn, padded to a
    multiple of them: a padding slot runs too, its result discarded), each on one microbatch's rows.
    moe_only: count only the mixture-of-experts layers."""
    stages = ax.size("layers")
    micro = ax.microbatches if stages > 1 else 1
    ticks = micro + stages - 1 if stages > 1 else 1
    n = sum(g.slots * sum(k.moe or not moe_only for k in g.unit) for g in layer_groups(cfg, Form(stages=stages)))
    return ticks, n // stages * ticks, step.batch // ax.size("batch") // micro


def step_collectives(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, step: Step, dtype_bytes: int,
                     platform: str = "cpu") -> list:
    """The collectives of one prefill (step.decode False) or decode step on `platform` (cpu, cuda, tpu: a
    dropless expert layout dispatches with ragged all-to-alls on cuda and tpu, parallel/experts.dispatch)."""
    ax = Axes(mesh_cfg, decode=step.decode)
    e, h = dtype_bytes, cfg.hidden_size
    b_loc = step.batch // ax.size("batch")
    s_loc = step.tokens // ax.size("seq")
    ticks, runs, rows = schedule(cfg, ax, step)
    stages = ax.size("layers")
    out: list = []

    def add(op, axes, count, nbytes, what):
        if axes and count and nbytes:
            out.append(Comm(op, tuple(axes), int(count), int(nbytes), what))

    act = rows * s_loc * h * e  # one layer's activations on one device
    add("all-reduce", ax.axes("vocab"), 1, b_loc * s_loc * h * e, "vocab-parallel embedding")
    out += _attention(cfg, ax, kv_repeat, step, rows, s_loc, runs, e)
    res_extra = ax.axes("residual_seq")[len(ax.axes("seq")):]  # NVIDIA-style SP: the row-parallel sums
    n_moe = len(moe_layers(cfg))
    _, moe_runs, _ = schedule(cfg, ax, step, moe_only=True)
    ffn_split = ax.axes("mlp")  # dense FFNs; MoE FFNs under an expert axis sum inside the expert kernel instead
    moe_split = () if ax.size("experts") > 1 else ffn_split
    for name, split, count in (("attention output", ax.axes("heads"), runs),
                               ("MLP down", ffn_split, runs - moe_runs), ("MoE down", moe_split, moe_runs)):
        if not split or not count:
            continue
        if res_extra:
            add("reduce-scatter", split, count, act // math.prod(mesh_cfg.size(a) for a in split),
                f"{name} (sequence-parallel)")
            add("all-gather", split, count, act, f"{name}: sequence gathered for the next matmul")
        else:
            add("all-reduce", split, count, act, f"{name} (tensor parallel)")
    if n_moe:
        out += _experts(cfg, ax, mesh_cfg, rows, s_loc, moe_runs, e, platform)
    if stages > 1:  # each layer group runs its own pipeline through the stages
        groups = len(layer_groups(cfg))
        add("collective-permute", ax.axes("layers"), ticks * groups, act, "pipeline: activations to the next stage")
        add("all-reduce", ax.axes("layers"), groups, b_loc * s_loc * h * F32, "pipeline: last stage's output")
    if not step.decode:
        add("all-reduce", ax.axes("residual_seq"), 1, b_loc * h * e, "last prompt token (masked sum over the "
                                                                     "sequence split)")
    else:  # the decode loop's condition: whether any slot of the batch is still running (one boolean)
        add("all-reduce", ax.axes("batch"), 1, 1, "decode loop: any slot still running")
    add("all-gather", ax.axes("vocab"), 1, b_loc * cfg.vocab_size * F32, "logits gathered for sampling")
    return out


def _attention(cfg, ax: Axes, kv_repeat, step: Step, rows, s_loc, runs, e) -> list:
    hd = cfg.head_size
    heads = cfg.num_attention_heads // ax.size("heads")
    kv = cfg.kv_heads * kv_repeat // ax.size("kv_heads")
    out = []
    if step.decode:
        seq = ax.axes("cache_seq")
        if seq:  # FlashDecoding across devices: one max and one (packed) sum per layer, float32
            out.append(Comm("all-reduce", seq, runs, rows * heads * F32, "decode attention: max over seq"))
            out.append(Comm("all-reduce", seq, runs, rows * heads * (hd + 1) * F32, "decode attention: sum over seq"))
        return out
    seq = ax.axes("seq")
    n = ax.size("seq")
    if not seq:
        return out
    # the paged KV cache: each seq device writes the pages it owns, so the chunk's entries (K and V
    # interleaved, or MLA's one latent) are gathered in one piece
    t = cfg.cache_tensors
    cached = cache_kv_heads(cfg, kv_repeat, ax) // ax.size("kv_heads")  # one copy of each kv head (Ulysses)
    out.append(Comm("all-gather", seq, runs, rows * s_loc * n * t * cached * hd * e,
                    "paged KV cache: the chunk's K and V gathered for the page writes"))
    kind = ax.mesh_cfg.attention
    if kind == "ring":
        out.append(Comm("collective-permute", seq, runs * t * (n - 1), rows * s_loc * kv * hd * e,
                        "ring attention: K and V blocks around the ring"))
    elif kind == "ulysses":
        out.append(Comm("all-to-all", seq, runs, rows * s_loc * (heads + t * kv) * hd * e,
                        "Ulysses: Q/K/V sequence-split to head-split"))
        out.append(Comm("all-to-all", seq, runs, rows * s_loc * heads * hd * e, "Ulysses: output back"))
    else:  # dense: XLA gathers K and V over the sequence (and, once, the positions for the mask)
        out.append(Comm("all-gather", seq, runs * t, rows * s_loc * n * kv * hd * e, "dense attention: K, V gathered"))
        out.append(Comm("all-gather", seq, 1, step.batch // ax.size("batch") * step.tokens * 4,
                        "dense attention: positions gathered for the mask"))
    return out


def _experts(cfg, ax: Axes, mesh_cfg: MeshConfig, rows, s_loc, runs, e, platform: str = "cpu") -> list:
    """The expert kernel's collectives. all-to-all (capacity buffers): each all-to-all's result is the whole
    [E, cap, D] buffer, padding included. ragged (dropless on cuda/tpu): a device sends its t*k routed rows
    and, assuming balanced routing (every device receives as many rows as it sends), receives t*k rows, so a
    run's bytes are t*k*D (of which (ep-1)/ep cross the link: comm_seconds' all-to-all term); skewed routing
    sends more to the hot experts' devices (up to the receive buffer, ep*t*min(k, E_l) rows). Before the
    exchange the [E] int32 counts of every device are all-gathered."""
    from jaxpar.parallel.experts import capacity, choose
    n_exp, h = cfg.num_local_experts, cfg.hidden_size
    stats = (n_exp + 1) * F32  # tokens per expert + dropped, summed over the devices holding tokens
    token_axes = ax.axes("batch") + ax.axes("seq")
    stages = ax.axes("layers")
    # under a pipeline each stage's statistics [S/P slots] of each MoE block of a group are gathered over the
    # stages: load, then dropped (a group padded for the stages gathers its padding's zeros too)
    gather = []
    for group in (layer_groups(cfg, Form(stages=ax.size("layers"))) if stages else ()):
        for kind in group.unit:
            if kind.moe:
                gather += [Comm("all-gather", stages, 1, group.slots * n_exp * F32, "expert load per layer"),
                           Comm("all-gather", stages, 1, group.slots * F32, "dropped assignments per layer")]
    if ax.size("experts") == 1:  # every expert on every token: nothing is dropped, only the load is summed
        return ([Comm("all-reduce", token_axes, runs, n_exp * F32, "expert load statistics")] if token_axes
                else []) + gather
    t, k, ep = rows * s_loc, cfg.num_experts_per_tok, ax.size("experts")
    if choose(ep, mesh_cfg.capacity_factor, platform) == "ragged":
        out = [Comm("all-gather", ax.axes("experts"), runs, ep * n_exp * 4, "expert counts of every device"),
               Comm("all-to-all", ax.axes("experts"), 2 * runs, t * k * h * e,
                    "expert dispatch and return (ragged: the routed rows, balanced routing)")]
        buf = ep * t * min(k, n_exp // ep) * h  # the static receive buffer the tensor split sums over
    else:
        cap = capacity(t, k, n_exp, mesh_cfg.capacity_factor)
        buf = n_exp * cap * h
        out = [Comm("all-to-all", ax.axes("experts"), 2 * runs, buf * e, "expert dispatch and return")]
    if ax.axes("mlp"):
        out.append(Comm("all-reduce", ax.axes("mlp"), runs, buf * F32, "expert FFN (tensor parallel, float32)"))
    out.append(Comm("all-reduce", token_axes, runs, stats, "expert load statistics"))
    return out + gather


def summarise(comms: list) -> dict:
    """The `inspect` schema: op -> {count, bytes} (bytes summed over runs)."""
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    for c in comms:
        out[c.op]["count"] += c.count
        out[c.op]["bytes"] += c.total
    return out
