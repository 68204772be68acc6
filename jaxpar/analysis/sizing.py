"""Sizing from the model config and a mesh file alone: parameter and KV cache bytes per device, FLOPs and
HBM bytes of one step, and a workspace estimate. Parameter bytes come from the model code's own parameter
shapes and logical axes (the abstract model), so they are exactly what `jaxpar.load` would place."""
from __future__ import annotations

import math

from jaxpar.analysis.comm import Axes, Step, schedule
from jaxpar.config import QUANT_FORMATS, ModelConfig
from jaxpar.layout.mesh_file import MeshConfig
from jaxpar.layout.plan import cache_kv_heads
from jaxpar.model.groups import Form, context_layers, layer_kinds, ring_layers, ring_window, shared_window
from jaxpar.model.quant import float_config

DTYPE_BYTES = {"float32": 4, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
ALIASES = {"bfloat16": "bf16", "fp32": "float32", "f32": "float32"}
RUN = {"float32": "float32", "bf16": "bfloat16"}  # the planner's names of the engine's compute dtypes


def _leaves(cfg: ModelConfig, kv_repeat: int, within: str = "", stages: int = 1, itemsize: bool = False):
    """(shape, logical names[, bytes per value]) of every parameter (whose path contains `within`), from the
    abstract model (nothing allocated), its groups padded for `stages` pipeline stages."""
    from jaxpar.engine import params as P
    names = P.flatten(P.logical_names(cfg, kv_repeat, Form(stages=stages)))
    shapes = P.flatten(P.shapes(cfg, kv_repeat, Form(stages=stages)))
    return [(tuple(shapes[k].shape), names[k]) + ((shapes[k].dtype.itemsize,) if itemsize else ())
            for k in names if within in k]


def param_count(cfg: ModelConfig) -> int:
    leaves = _leaves(float_config(cfg), 1)  # parameters, not their scales
    return sum(math.prod(s) for s, _ in leaves)


def params_per_device(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int) -> int:
    """Parameters one device holds (the layout divides every split dimension evenly; a pipeline's padding
    slots count)."""
    ax = Axes(mesh_cfg)
    leaves = _leaves(float_config(cfg), kv_repeat, stages=ax.size("layers"))
    return sum(math.prod(s) // math.prod(ax.size(n) for n in names if n) for s, names in leaves)


def params_bytes_per_device(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, dtype: str, act: str) -> float:
    """Parameter bytes one device holds with weights in `dtype`: float formats (and int4, which the engine does
    not run) count every parameter at that width; int8 and fp8 count what the engine stores (model/quant.py):
    8-bit matrices, their float32 scales per output channel, and the rest (norms, biases, routers) in the
    compute dtype `act`."""
    if dtype not in QUANT_FORMATS:
        return params_per_device(cfg, mesh_cfg, kv_repeat) * DTYPE_BYTES[dtype]
    ax = Axes(mesh_cfg)
    # a checkpoint's own block-scaled format (an FP8 release) as it loads; otherwise scales per channel
    block = cfg.quant_block if cfg.quantize == dtype else None
    stored = cfg.replace(quantize=dtype, quant_block=block, dtype=RUN[act])
    return sum(math.prod(s) // math.prod(ax.size(n) for n in names if n) * size
               for s, names, size in _leaves(stored, kv_repeat, stages=ax.size("layers"), itemsize=True))


def kv_value_bytes(cfg: ModelConfig, kv_dtype: str, act: str) -> float:
    """Bytes per cached value: the KV dtype's, plus (int8, fp8) each vector's scale in the compute dtype spread
    over its head_size values (engine/state.cache_vector_bytes)."""
    scale = DTYPE_BYTES[act] / cfg.head_size if kv_dtype in QUANT_FORMATS else 0.0
    return DTYPE_BYTES[kv_dtype] + scale


def layer_params_per_device(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, within: str = "") -> float:
    """A layer's parameters on one device (those whose path contains `within`: ".attn." for its attention),
    averaged over the model's layers (what a layer execution reads)."""
    ax = Axes(mesh_cfg)
    total = sum(math.prod(s) // math.prod(ax.size(n) for n in names if n and n != "layers")
                for s, names in _leaves(cfg, kv_repeat, within) if "layers" in names)
    return total / cfg.num_hidden_layers


def kv_bytes_per_device(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, batch: int, cache: int,
                        kv_bytes: float, page_size: int = 16, ahead: int | None = None) -> float:
    """The paged KV cache's pools when every one of `batch` padded rows can hold `cache` tokens: each row's
    pages spread over the seq devices (page j on device j % n), so a device holds ceil(pages / n) of each of
    its batch shard's rows, in pools [layers, pages, page_size, kv_heads, head_dim], 2 (K, V) or 1 (MLA's
    latent) per layer (engine/state.py).
    With a sliding window on every layer a row holds only the pages of its window and of the next `ahead`
    tokens (engine/state.pages_held; `ahead` None: as many as the serving defaults compute in one iteration);
    a model mixing sliding and full layers holds that many in each sliding layer's ring, and `cache` tokens in
    each full layer."""
    ax = Axes(mesh_cfg)
    n = ax.size("cache_seq")
    rows = batch // ax.size("batch")
    heads = cache_kv_heads(cfg, kv_repeat, ax) // ax.size("kv_heads")
    per_token_layer = cfg.cache_tensors * heads * cfg.head_size * kv_bytes
    held = _pages_held(cfg, cache, page_size, ahead, shared_window(cfg))
    stages = ax.size("layers")
    total = context_layers(cfg, stages) * rows * -(-held // n) * page_size * per_token_layer
    ring = ring_window(cfg)
    if ring is not None:  # engine/state.cache_sizes: the ring's pages, a multiple of n
        from jaxpar.engine.state import ring_pages
        from jaxpar.serving.scheduler import ServingConfig
        pages = ring_pages(cache, page_size, ring, ServingConfig().ahead if ahead is None else ahead, n)
        total += ring_layers(cfg, stages) * rows * pages // n * page_size * per_token_layer
    return total


def tokens_held(cfg: ModelConfig, context: int, page_size: int = 16, ahead: int | None = None) -> int:
    """KV cache tokens one sequence of `context` tokens holds at once in a sliding layer (its pages' slots): the
    context, or its window and next chunk (engine/state.pages_held)."""
    window = shared_window(cfg) or ring_window(cfg)
    if window is None:
        return context
    return min(context, _pages_held(cfg, context, page_size, ahead, window) * page_size)


def _pages_held(cfg: ModelConfig, tokens: int, page_size: int, ahead: int | None, window: int | None) -> int:
    """engine/state.pages_held; `ahead` None: what the serving defaults compute in one iteration."""
    from jaxpar.engine.state import pages_held
    from jaxpar.serving.scheduler import ServingConfig
    return pages_held(tokens, page_size, window, ServingConfig().ahead if ahead is None else ahead)


def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: float) -> float:
    """2 (K and V; 1 for MLA's latent) x layers x kv heads x head_dim x bytes: the whole model, one token."""
    return cfg.cache_tensors * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_size * kv_bytes


def kv_bytes_per_sequence(cfg: ModelConfig, context: int, kv_bytes: float, page_size: int = 16) -> float:
    """KV cache bytes one sequence of `context` tokens holds: every layer's tokens held (sliding layers: their
    window and next chunk, `tokens_held`; full layers: the context)."""
    n = cfg.num_hidden_layers
    per_layer, held, full = kv_bytes_per_token(cfg, kv_bytes) / n, tokens_held(cfg, context, page_size), context_layers(cfg)
    if shared_window(cfg) is not None:
        return per_layer * n * held
    return per_layer * (full * context + (n - full) * held)


def step_work(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, step: Step, weight_bytes: float,
              kv_bytes: float) -> dict:
    """What one device does in one step, as jaxpar runs it: `layer_runs` executions of a layer (L/P per
    pipeline tick, M+P-1 ticks), each with `layer_flops` and `layer_bytes` of HBM traffic (its weights, and
    the KV cache it reads or writes) averaged over the model's layer kinds, plus the LM head once. MoE layers
    compute what the program computes: every expert on every token without an expert axis, full capacity
    buffers with one."""
    ax = Axes(mesh_cfg, decode=step.decode)
    _, runs, rows = schedule(cfg, ax, step)
    tokens = rows * step.tokens // ax.size("seq")
    hd, h = cfg.head_size, cfg.hidden_size
    heads = cfg.num_attention_heads // ax.size("heads")
    kv = cfg.kv_heads * kv_repeat // ax.size("kv_heads")
    attn_w = layer_params_per_device(cfg, mesh_cfg, kv_repeat, ".attn.")  # each weight: 2 FLOPs a token
    flops = io = 0.0
    kinds = layer_kinds(cfg)
    for kind in kinds:
        attn_flops, kv_io = _attention_work(cfg, mesh_cfg, ax, step, rows, tokens, heads, kv, kv_bytes,
                                            cfg.sliding_window if kind.sliding else None)
        flops += 2 * attn_w * tokens + attn_flops + _ffn_flops(cfg, mesh_cfg, ax, tokens, kind.moe)
        io += kv_io
    layer_w = layer_params_per_device(cfg, mesh_cfg, kv_repeat)
    b_loc = step.batch // ax.size("batch")
    head_flops = 2 * h * cfg.vocab_size // ax.size("vocab") * b_loc  # logits for each row's last position
    head_bytes = h * cfg.vocab_size // ax.size("vocab") * weight_bytes
    return {"layer_runs": runs, "layer_flops": flops / len(kinds),
            "layer_bytes": layer_w * weight_bytes + io / len(kinds), "head_flops": head_flops,
            "head_bytes": head_bytes, "tokens_per_layer_run": tokens}


def _ffn_flops(cfg: ModelConfig, mesh_cfg: MeshConfig, ax: Axes, tokens: int, moe: bool) -> float:
    h = cfg.hidden_size
    if not moe:
        return 2 * 3 * h * (cfg.intermediate_size // ax.size("mlp")) * tokens
    from jaxpar.parallel.experts import capacity
    f_loc = cfg.expert_ffn // ax.size("mlp")
    if ax.size("experts") > 1:
        slots = cfg.num_local_experts * capacity(tokens, cfg.num_experts_per_tok, cfg.num_local_experts,
                                                 mesh_cfg.capacity_factor)
    else:
        slots = tokens * cfg.num_local_experts
    out = 2 * 3 * h * f_loc * slots + 2 * h * cfg.num_local_experts * tokens
    if cfg.shared_expert_intermediate_size:
        out += 2 * 3 * h * cfg.shared_expert_intermediate_size // ax.size("mlp") * tokens
    return out


def _attention_work(cfg, mesh_cfg, ax, step: Step, rows, tokens, heads, kv, kv_bytes, window) -> tuple:
    """(attention FLOPs, KV cache bytes read or written) of one layer execution."""
    hd = cfg.head_size
    n_cache = Axes(mesh_cfg).size("cache_seq")
    cache_loc = step.cache // n_cache
    if step.decode:  # every cached slot is read, or those of the window (a device's share of them; the planner's
        # rows all have one length: a call reads from the window of its shortest row)
        ctx = cache_loc if window is None else min(cache_loc, -(-window // n_cache))
        kv_io = rows * ctx * kv * hd * cfg.cache_tensors * kv_bytes
    else:  # causal: on average half the prompt (zigzag keeps devices balanced); blockwise prefill (no seq axis)
        # skips the key blocks before a window, ring and Ulysses compute them masked
        from jaxpar.parallel.attention import block_size
        ctx = step.tokens / 2
        if window is not None and ax.size("seq") == 1 and block_size(step.tokens):
            ctx = min(ctx, window)
        kv_io = rows * (step.tokens // ax.size("seq")) * kv * hd * cfg.cache_tensors * kv_bytes
    return 4 * tokens * ctx * heads * hd, kv_io


def workspace_bytes(cfg: ModelConfig, mesh_cfg: MeshConfig, kv_repeat: int, step: Step, act_bytes: float) -> float:
    """Largest transient of a prefill step (an estimate, not the compiler's plan): one layer's activations
    and its attention score block (float32; blockwise prefill one [block, block] tile, a ring step one
    (S/N)^2 block, Ulysses and dense attention the whole sequence for their heads)."""
    ax = Axes(mesh_cfg, decode=step.decode)
    n_seq = ax.size("seq")
    _, _, rows = schedule(cfg, ax, step)
    s_loc = step.tokens // n_seq
    heads = cfg.num_attention_heads // ax.size("heads")
    kv = cfg.kv_heads * kv_repeat // ax.size("kv_heads")
    f_loc = max(cfg.expert_ffn * cfg.num_experts_per_tok if k.moe else cfg.intermediate_size
                for k in layer_kinds(cfg)) // ax.size("mlp")
    acts = rows * s_loc * (4 * cfg.hidden_size + 3 * f_loc + (heads + 2 * kv) * cfg.head_size) * act_bytes
    if step.decode:
        keys = step.cache // Axes(mesh_cfg).size("cache_seq")
        scores_heads, q = heads, 1
    elif n_seq > 1 and mesh_cfg.attention == "ring":
        keys, scores_heads, q = s_loc, heads, s_loc
    elif n_seq > 1 and mesh_cfg.attention == "ulysses":
        keys, scores_heads, q = step.tokens, heads // n_seq, step.tokens
    else:  # without a seq axis a long prompt runs blockwise: one [block, block] score tile at a time
        from jaxpar.parallel.attention import block_size
        block = block_size(step.tokens) if n_seq == 1 else None
        keys, scores_heads, q = (block, heads, block) if block else (step.tokens, heads, s_loc)
    scores = rows * scores_heads * q * keys * 4
    logits = step.batch // ax.size("batch") * cfg.vocab_size * 4
    return acts + scores + logits
