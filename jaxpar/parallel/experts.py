"""The experts of a mixture-of-experts layer, computed two ways, chosen by the active layout.

- No `expert` axis: every expert on every token, masked by the router's combine weights (exact; the
  reference the dispatch is tested against). Expert FFNs split over `tensor` like the dense MLP.
- `expert` axis (expert parallelism): whole experts live on devices, and so do tokens (the expert axis
  also splits the batch, so no device repeats another's attention). Each device sorts its tokens' top-k
  choices into fixed-capacity per-expert buffers, one all-to-all sends every buffer to the device holding
  its expert, the local experts run as one batched matmul, the inverse all-to-all brings the results back,
  and they are summed with the router weights. An assignment past its expert's capacity is dropped: the
  token keeps only its residual (and its other choices) and the drop is counted.

Each expert is a gated FFN: SwiGLU, or gpt-oss's clamped variant with biases (`Gate`).

Capacity per (device, expert) is ceil(capacity_factor * tokens * k / experts), or the worst case (all the
device's tokens) when capacity_factor is 0 (dropless). Padding tokens (`valid` False) are never routed.
Both paths also return load statistics: assignments per expert and dropped assignments (over all devices).

On TPU and GPU a dropless layout takes a third path instead of the capacity buffers (`dispatch`):
ragged_experts.py sends only the routed rows with ragged_all_to_all and runs the experts with ragged_dot.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxpar.layout.rules import active, constrain
from jaxpar.model import quant
from jaxpar.parallel import ragged_experts
from jaxpar.parallel.seq_parallel import row_parallel


def top_k_per_token(probs, k: int):
    """jax.lax.top_k over the last axis of [B,S,E], run on each device's own tokens (XLA would otherwise
    gather the batch to sort it)."""
    lay = active()
    if lay is None or lay.mesh.size == 1:
        return jax.lax.top_k(probs, k)
    spec = lay.spec(("batch", "seq", None))
    return lay.shard_map(lambda p: tuple(jax.lax.top_k(p, k)), in_specs=spec, out_specs=(spec, spec))(probs)


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
    """Buffer slots per expert for `tokens` tokens of one device."""
    if factor <= 0:
        return tokens
    return max(1, min(tokens, math.ceil(round(factor * tokens * k / experts, 6))))  # no float-noise extra slot


@dataclasses.dataclass(frozen=True)
class Gate:
    """How an expert combines its gate and up projections. limit None: SwiGLU, silu(gate) * up. limit set
    (gpt-oss): gate clamped above at limit, up to [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1)."""
    limit: float | None = None
    alpha: float = 1.702

    def __call__(self, g, u):
        if self.limit is None:
            return jax.nn.silu(g) * u
        g = jnp.minimum(g, self.limit)
        u = jnp.clip(u, -self.limit, self.limit)
        return g * jax.nn.sigmoid(g * self.alpha) * (u + 1)


SWIGLU = Gate()
# logical axes of the expert weights (`w`: w_gate, w_up, w_down and, with biases, b_gate, b_up, b_down)
NAMES = {"w_gate": ("experts", "embed", "mlp"), "w_up": ("experts", "embed", "mlp"),
         "w_down": ("experts", "mlp", "embed"), "b_gate": ("experts", "mlp"), "b_up": ("experts", "mlp"),
         "b_down": ("experts", "embed")}


DISPATCHES = ("dense", "all-to-all", "ragged")
RAGGED_PLATFORMS = ("tpu", "cuda")  # XLA:CPU does not compile ragged_all_to_all


def dispatch(lay) -> str:
    """How a layout's MoE layers reach their experts (the one place this is decided; the planner and
    `inspect` report it too): "dense" without an expert axis; "ragged" (ragged_experts.py: only the routed
    rows on the wire) when dropless on a platform that compiles ragged_all_to_all; else "all-to-all" (the
    capacity buffers). `lay.expert_dispatch` other than "auto" forces one (tests run "ragged" on CPU devices,
    through an emulated exchange); ragged is dropless only, so a capacity factor refuses it."""
    if lay is None:
        return "dense"
    return choose(lay.size("experts"), lay.capacity_factor, lay.platform, lay.expert_dispatch)


def choose(experts: int, capacity_factor: float, platform: str, forced: str = "auto") -> str:
    """`dispatch` from the numbers alone (the planner has a mesh file, not a layout)."""
    if experts == 1:
        return "dense"
    if forced == "auto":
        return "ragged" if capacity_factor == 0 and platform in RAGGED_PLATFORMS else "all-to-all"
    if forced not in DISPATCHES[1:] or (forced == "ragged" and capacity_factor > 0):
        raise ValueError(f"expert_dispatch {forced!r}: one of auto, all-to-all, ragged (ragged needs "
                         f"capacity_factor 0, got {capacity_factor})")
    return forced


REPORT = {"dense": "dense", "all-to-all": "all-to-all", "ragged": "ragged-all-to-all"}


def report(cfg, lay) -> str:
    """The `experts` field of inspect's reports: "none" for a model without MoE layers, else the dispatch."""
    return REPORT[dispatch(lay)] if cfg.num_local_experts else "none"


def expert_ffn(x, idx, weights, valid, w: dict, gate: Gate = SWIGLU):
    """x [B,S,D]; idx [B,S,k] chosen experts; weights [B,S,k] float32; valid [B,S] bool; w: the experts'
    weights [E,D,F], [E,D,F], [E,F,D] (and biases [E,F], [E,F], [E,D]). -> (out [B,S,D], load [E] float32,
    dropped float32)."""
    lay = active()
    how = dispatch(lay)
    if how == "dense":
        return _dense(x, idx, weights, valid, w, gate)
    tokens_axes = lay.axes("batch") + lay.axes("seq")
    tensor_axes = lay.axes("mlp")
    b, s = x.shape[0] // lay.size("batch"), x.shape[1] // lay.size("seq")
    common = dict(axis=lay.axes("experts"), ep=lay.size("experts"), tensor_axes=tensor_axes,
                  token_axes=tokens_axes, gate=gate)
    if how == "ragged":
        exchange = (jax.lax.ragged_all_to_all if lay.platform in RAGGED_PLATFORMS
                    else ragged_experts.emulated_ragged_all_to_all)
        body = functools.partial(ragged_experts.ragged_local, exchange=exchange, **common)
    else:
        cap = capacity(b * s, idx.shape[-1], w["w_gate"].shape[0], lay.capacity_factor)
        body = functools.partial(_dispatch_local, cap=cap, **common)
    tok = lay.spec(("batch", "seq", "embed"))
    choice = lay.spec(("batch", "seq", None))
    out, stats = lay.shard_map(
        body, in_specs=(tok, choice, choice, lay.spec(("batch", "seq")),
                        {k: quant.spec(lay, w[k], NAMES[k]) for k in w}),
        out_specs=(tok, lay.spec(())))(x, idx, weights, valid, w)
    return out, stats[:-1], stats[-1]


def _dense(x, idx, weights, valid, w, gate: Gate):
    e = w["w_gate"].shape[0]
    onehot = jax.nn.one_hot(idx, e, dtype=jnp.float32) * valid[..., None, None]  # [B,S,k,E]
    combine = jnp.sum(onehot * weights[..., None], axis=-2)  # [B,S,E]
    g = quant.einsum("bsd,edf->bsef", x, w["w_gate"])
    u = quant.einsum("bsd,edf->bsef", x, w["w_up"])
    if "b_gate" in w:
        g, u = g + w["b_gate"], u + w["b_up"]
    h = constrain(gate(g, u) * combine[..., None].astype(x.dtype), ("batch", "seq", None, "mlp"))
    out = row_parallel("bsef,efd->bsd", h, w["w_down"], ("batch", "seq", None, "mlp"), ("experts", "mlp", "embed"))
    if "b_down" in w:  # each chosen expert's output bias, weighted as its output is
        out = out + jnp.einsum("bse,ed->bsd", combine.astype(x.dtype), w["b_down"])
    return out, onehot.sum(axis=(0, 1, 2)), jnp.zeros((), jnp.float32)


def _dispatch_local(x, idx, weights, valid, w, *, axis, ep, tensor_axes, token_axes, cap, gate: Gate):
    """Per device: x [b,s,D] its tokens; w its E_l experts ([E_l,D,F_l] ...), F_l = F / tensor."""
    b, s, d = x.shape
    k = idx.shape[-1]
    e_local = w["w_gate"].shape[0]
    e = e_local * ep
    t = b * s
    xt = x.reshape(t, d)
    expert = idx.reshape(t * k)
    ok = jnp.repeat(valid.reshape(t), k)
    onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32) * ok[:, None]  # [t*k, E], token-major priority
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # place in its expert's buffer
    keep = ok & (slot < cap)
    src = jnp.repeat(jnp.arange(t), k)
    send = jnp.zeros((e, cap, d), x.dtype).at[jnp.where(keep, expert, e), jnp.where(keep, slot, 0)].set(
        xt[src], mode="drop")
    # to the experts' devices: [ep (source device), E_l, cap, D]
    recv = jax.lax.all_to_all(send.reshape(ep, e_local, cap, d), axis, 0, 0, tiled=True)
    xin = recv.transpose(1, 0, 2, 3).reshape(e_local, ep * cap, d)
    g, u = quant.einsum("ecd,edf->ecf", xin, w["w_gate"]), quant.einsum("ecd,edf->ecf", xin, w["w_up"])
    if "b_gate" in w:
        g, u = g + w["b_gate"][:, None], u + w["b_up"][:, None]
    y = quant.einsum("ecf,efd->ecd", gate(g, u), w["w_down"])
    if tensor_axes:  # in float32: XLA:CPU cannot promote a bf16 all-reduce inside the pipeline's shard_map
        y = jax.lax.psum(y.astype(jnp.float32), tensor_axes).astype(x.dtype)
    if "b_down" in w:  # after the sum over the tensor split: added once
        y = y + w["b_down"][:, None]
    back = jax.lax.all_to_all(y.reshape(e_local, ep, cap, d).transpose(1, 0, 2, 3), axis, 0, 0, tiled=True)
    got = back.reshape(e, cap, d)[jnp.where(keep, expert, 0), jnp.where(keep, slot, 0)]
    scale = (weights.reshape(t * k) * keep).astype(x.dtype)
    out = (got * scale[:, None]).reshape(t, k, d).sum(axis=1).reshape(b, s, d)
    stats = jnp.concatenate([onehot.sum(axis=0), (ok & ~keep).sum()[None]]).astype(jnp.float32)
    return out, jax.lax.psum(stats, token_axes)
