"""The planner: size a model on N devices of some hardware, estimate each layout's step times with a
roofline, and recommend one. Analytic throughout: nothing is compiled and no device is needed.

Time of one step on one device = its layer executions and the LM head, each max(FLOPs / peak, HBM bytes /
bandwidth), plus every collective at the bandwidth and latency of the link its devices span (ring
algorithms; no overlap of communication with compute assumed, so estimates err on the slow side)."""
from __future__ import annotations

import dataclasses
import math

from jaxpar.analysis import comm as C
from jaxpar.analysis import sizing as S
from jaxpar.analysis.hardware import Hardware
from jaxpar.config import ModelConfig
from jaxpar.engine.buckets import batch_bucket, seq_bucket
from jaxpar.errors import JaxparError
from jaxpar.layout.mesh_file import AXES, MeshConfig

ABBR = {"data": "dp", "stage": "pp", "expert": "ep", "seq": "sp", "tensor": "tp"}


@dataclasses.dataclass(frozen=True)
class Request:
    batch: int
    context: int  # prompt tokens prefilled, and KV cache slots decode attends over
    new_tokens: int  # decode steps counted in a request's time (the recommendation's objective)
    dtype: str  # weights: float32 | bf16 | fp8 | int8 | int4
    kv_dtype: str  # KV cache: float32 | bf16 | fp8 | int8
    headroom: float  # fraction of device memory kept free (runtime, fragmentation)
    # whose programs the collectives model: cpu (what the tests compile: expert capacity buffers), cuda or tpu
    # (a dropless expert layout sends only the routed rows: parallel/experts.dispatch)
    platform: str = "cpu"

    @property
    def act_dtype(self) -> str:
        """What the engine computes in (activations, collectives, norms): float32 when the weights or the cache
        are float32, else bf16."""
        return "float32" if "float32" in (self.dtype, self.kv_dtype) else "bf16"


def mesh_name(mesh_cfg: MeshConfig) -> str:
    parts = [f"{ABBR[a]}{s}" for a, s in mesh_cfg.axes.items() if s > 1]
    name = "_".join(parts) or "single"
    if mesh_cfg.size("seq") > 1 and mesh_cfg.attention != "ring":
        name += f"_{mesh_cfg.attention}"
    if mesh_cfg.size("stage") > 1:
        name += f"_m{mesh_cfg.microbatches}"
    return name


def mesh_dict(mesh_cfg: MeshConfig) -> dict:
    """The layout as mesh-file contents (what `--write-mesh` saves)."""
    d: dict = {"axes": {a: s for a, s in mesh_cfg.axes.items() if s > 1}}
    if mesh_cfg.size("seq") > 1:
        d["attention"] = mesh_cfg.attention
    if mesh_cfg.size("stage") > 1:
        d["microbatches"] = mesh_cfg.microbatches
    if mesh_cfg.size("expert") > 1:
        d["capacity_factor"] = mesh_cfg.capacity_factor
    if mesh_cfg.rules:
        d["rules"] = {k: (list(v) if len(v) != 1 else v[0]) if v else None for k, v in mesh_cfg.rules.items()}
    return d


def groups(mesh_cfg: MeshConfig, axes) -> list:
    """The device numbers of every group of a collective over `axes`. Devices are numbered row-major over
    the mesh axes, outermost first: the innermost axis gets consecutive devices, which on real systems are
    the closest ones (jax.make_mesh orders them so)."""
    import itertools
    names = list(mesh_cfg.axes)
    sizes = [mesh_cfg.axes[a] for a in names]
    out: dict = {}
    for idx, coord in enumerate(itertools.product(*[range(n) for n in sizes])):
        key = tuple(c for a, c in zip(names, coord) if a not in axes)
        out.setdefault(key, []).append(idx)
    return list(out.values())


def link_of(mesh_cfg: MeshConfig, axes, hw: Hardware):
    """The slowest link any group of a collective over `axes` crosses."""
    levels = [hw.link_for_ids(g) for g in groups(mesh_cfg, axes)]
    return max(levels, key=hw.links.index)


def comm_seconds(c: C.Comm, mesh_cfg: MeshConfig, hw: Hardware) -> float:
    n = math.prod(mesh_cfg.size(a) for a in c.axes)
    if n <= 1:
        return 0.0
    link = link_of(mesh_cfg, c.axes, hw)
    bw, lat = link.bytes_per_s, link.latency_s
    one = {"all-reduce": 2 * (n - 1) / n * c.bytes / bw + 2 * (n - 1) * lat,
           "all-gather": (n - 1) / n * c.bytes / bw + (n - 1) * lat,
           "reduce-scatter": (n - 1) * c.bytes / bw + (n - 1) * lat,
           "all-to-all": (n - 1) / n * c.bytes / bw + (n - 1) * lat,
           "collective-permute": c.bytes / bw + lat}[c.op]
    return c.count * one


def padded_steps(cfg: ModelConfig, mesh_cfg: MeshConfig, req: Request) -> tuple:
    """Prefill and decode Steps with the engine's padding (batch and lengths to its buckets)."""
    ax = C.Axes(mesh_cfg)  # the engine's own padding rules (layout/rules.Resolved), without devices
    b = batch_bucket(req.batch, ax.batch_multiple)
    ctx = cfg.max_position_embeddings
    s = seq_bucket(req.context, ctx, ax.seq_multiple)
    t = seq_bucket(req.context + req.new_tokens, ctx, ax.seq_multiple)  # the cache holds the new tokens too
    return C.Step(b, s, t, False), C.Step(b, 1, t, True)


def weight_bytes(cfg, mesh_cfg, kv_repeat, req: Request) -> float:
    """Bytes per parameter a step reads, scales included (8-bit weights: a little over 1)."""
    n = S.params_per_device(cfg, mesh_cfg, kv_repeat)
    return S.params_bytes_per_device(cfg, mesh_cfg, kv_repeat, req.dtype, req.act_dtype) / max(n, 1)


def step_seconds(cfg, mesh_cfg, kv_repeat, step: C.Step, hw: Hardware, req: Request, comms) -> dict:
    wb = weight_bytes(cfg, mesh_cfg, kv_repeat, req)
    w = S.step_work(cfg, mesh_cfg, kv_repeat, step, wb, S.kv_value_bytes(cfg, req.kv_dtype, req.act_dtype))
    # 8-bit and 4-bit weights are dequantized before the product (model/quant.py): the compute dtype's peak
    peak = hw.peak(req.act_dtype if req.dtype in ("int8", "fp8", "int4") else req.dtype)
    layer = max(w["layer_flops"] / peak, w["layer_bytes"] / hw.hbm_bytes_per_s)
    head = max(w["head_flops"] / peak, w["head_bytes"] / hw.hbm_bytes_per_s)
    compute = w["layer_runs"] * layer + head
    comm = sum(comm_seconds(c, mesh_cfg, hw) for c in comms)
    bound = "memory" if w["layer_bytes"] / hw.hbm_bytes_per_s >= w["layer_flops"] / peak else "compute"
    return {"compute_s": compute, "comm_s": comm, "total_s": compute + comm, "bound": bound}


def evaluate(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, hw: Hardware, req: Request) -> dict:
    """One layout: memory per device, fits, collectives and estimated step times."""
    pre, dec = padded_steps(cfg, mesh_cfg, req)
    ab, kb = S.DTYPE_BYTES[req.act_dtype], S.kv_value_bytes(cfg, req.kv_dtype, req.act_dtype)
    weights = S.params_bytes_per_device(cfg, mesh_cfg, kv_repeat, req.dtype, req.act_dtype)
    kv = S.kv_bytes_per_device(cfg, mesh_cfg, kv_repeat, pre.batch, pre.cache, kb)
    work = max(S.workspace_bytes(cfg, mesh_cfg, kv_repeat, pre, ab), S.workspace_bytes(cfg, mesh_cfg, kv_repeat,
                                                                                        dec, ab))
    need = weights + kv + work
    budget = hw.memory_bytes * (1 - req.headroom)
    out = {"name": mesh_name(mesh_cfg), "mesh": mesh_dict(mesh_cfg), "devices": mesh_cfg.device_count,
           "kv_repeat": kv_repeat, "batch_padded": pre.batch, "context_padded": pre.tokens,
           "weights_bytes_per_device": int(weights), "kv_bytes_per_device": int(kv),
           "weights_bytes_per_device_by_dtype": {
               d: int(S.params_bytes_per_device(cfg, mesh_cfg, kv_repeat, d, req.act_dtype)) for d in S.DTYPE_BYTES},
           "workspace_bytes_per_device": int(work), "memory_bytes_per_device": int(need),
           "memory_budget_bytes": int(budget), "fits": need <= budget}
    for key, step in (("prefill", pre), ("decode", dec)):
        comms = C.step_collectives(cfg, mesh_cfg, kv_repeat, step, ab, req.platform)
        t = step_seconds(cfg, mesh_cfg, kv_repeat, step, hw, req, comms)
        out[key] = {"collectives": C.summarise(comms), "compute_ms": t["compute_s"] * 1e3,
                    "comm_ms": t["comm_s"] * 1e3, "bound": t["bound"],
                    "links": sorted({link_of(mesh_cfg, c.axes, hw).name for c in comms})}
        out[f"est_{key}_ms"] = t["total_s"] * 1e3
    out["est_request_ms"] = out["est_prefill_ms"] + req.new_tokens * out["est_decode_ms"]
    out["tokens_per_s"] = req.batch * 1e3 / out["est_decode_ms"]
    return out


def _factorisations(n: int, k: int):
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, k - 1):
                yield (d,) + rest


def candidates(cfg: ModelConfig, devices: int, batch: int, capacity_factor: float = 0.0):
    """Every mesh of `devices` devices, or of a divisor of them (the first ones), the model can take:
    data x stage x expert x seq x tensor (outermost first, so tensor is the innermost, closest devices);
    ring and Ulysses attention for a seq axis; microbatches 1, P and 2P (as the batch allows) for a
    pipeline."""
    for n in range(1, devices + 1):
        if devices % n == 0:
            yield from _candidates(cfg, n, batch, capacity_factor)


def _candidates(cfg: ModelConfig, devices: int, batch: int, capacity_factor: float):
    from jaxpar.layout.plan import check_layout
    for sizes in _factorisations(devices, len(AXES)):
        axes = dict(zip(AXES, sizes))
        if axes["expert"] > 1 and not cfg.num_local_experts:
            continue
        attn = ["ring", "ulysses"] if axes["seq"] > 1 else ["dense"]
        p = axes["stage"]
        micro = sorted({m for m in (1, p, 2 * p) if m <= max(batch // axes["data"] // axes["expert"], 1)}) \
            if p > 1 else [1]
        for a in attn:
            for m in micro:
                mc = MeshConfig(axes={k: v for k, v in axes.items() if v > 1}, attention=a, microbatches=m,
                                capacity_factor=capacity_factor, source="planner")
                try:
                    rep = check_layout(mc, cfg)
                except JaxparError:
                    continue
                yield mc, rep


def recommend(layouts: list) -> dict | None:
    """The fastest layout that fits: least time for one request (prefill + new tokens of decode); ties
    (within 0.1%) go to fewer devices, then to less communication time, then to more free memory."""
    fit = [x for x in layouts if x["fits"]]
    if not fit:
        return None
    best = min(x["est_request_ms"] for x in fit)
    near = [x for x in fit if x["est_request_ms"] <= best * 1.001]
    return min(near, key=lambda x: (x["devices"], x["prefill"]["comm_ms"] + x["decode"]["comm_ms"],
                                    x["memory_bytes_per_device"]))


def min_devices(total_bytes: float, hw: Hardware, options=None) -> int | None:
    """Smallest instance (1, 2, 4, ... devices: powers of two within a node, then whole nodes) whose memory
    holds `total_bytes`: the rule of thumb of weights x KV allowance (1.8: the weights plus ~80% for the KV
    cache), rounded up to an instance, as published for sizing DeepSeek-V3 in fp8 on B200s."""
    node = hw.devices_per_node
    options = options or [2 ** i for i in range(int(math.log2(node)) + 1)] + [node * k for k in (2, 4, 8, 16, 32, 64)]
    for n in options:
        if n * hw.memory_bytes >= total_bytes:
            return n
    return None
