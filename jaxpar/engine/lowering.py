"""Programs lowered for a platform that is not here: `python -m jaxpar.inspect --platform tpu|cuda`.

The layout holds an AbstractMesh of the mesh's size, the parameters and the decode state are abstract arrays,
and each program (the first prompt chunk, a later chunk over the paged cache, the decode loop) is traced and
lowered to StableHLO for that platform as the engine there would build it: scanned layer groups (padded for
pipeline stages) and bfloat16 unless another dtype is asked for. Lowering proves the program is well formed
for the platform (shardings, shard_map kernels, Pallas kernels' custom calls); it compiles nothing, so the
report lists what the lowered module holds: the attention implementation, custom calls (the kernels), and the
collectives the program writes itself (shard_map's; XLA adds the rest when it partitions, on the device)."""
from __future__ import annotations

import collections
import re

from jaxpar.engine import params as P
from jaxpar.engine.quantize import check_blocks
from jaxpar.engine.steps import step_shapes
from jaxpar.layout.plan import abstract_layout, cache_kv_heads
from jaxpar.model.groups import Form, layer_kinds
from jaxpar.model.layers import attention_spec
from jaxpar.parallel import decode_kernels, prefill_kernels
from jaxpar.parallel import experts
from jaxpar.parallel.attention import prefill_kernel
from jaxpar.parallel.paged import decode_kernel

# custom calls the SPMD partitioner reads (sharding annotations), not kernels
PARTITIONER_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost",
                               "MoveToDevice", "annotate_device_placement"})
COLLECTIVES = ("all_reduce", "all_gather", "all_to_all", "collective_permute", "reduce_scatter")


def custom_calls(text: str) -> dict:
    """Kernel custom calls in a StableHLO module's text: {target: count}."""
    found = re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text)
    found += re.findall(r'call_target_name = "([^"]+)"', text)
    return dict(collections.Counter(t for t in found if t not in PARTITIONER_CALLS))


def collectives(text: str) -> dict:
    """Collectives written in the module ({op: count}, the op names as the CLI reports them)."""
    counts = {op.replace("_", "-"): len(re.findall(rf'"?stablehlo\.{op}"?[ (]', text)) for op in COLLECTIVES}
    return {op: n for op, n in counts.items() if n}


def _per_layer_kind(cfg, label) -> str:
    """label(spec) of each kind of layer the model has (full, sliding), each named once: "splash + blockwise"."""
    out = []
    for sliding in sorted({k.sliding for k in layer_kinds(cfg)}):
        name = label(attention_spec(cfg, sliding))
        if name not in out:
            out.append(name)
    return " + ".join(out)


def prefill_attention_report(cfg, lay, s: int) -> str:
    """The prefill attention of each kind of layer the model has ("splash", "blockwise", ...), with the reason
    when a prefill without a seq axis cannot take the platform's kernel."""
    def label(spec):
        name, why = prefill_kernel(lay, s, cfg.head_size, spec, cfg.attention_sinks, cfg.dtype)
        fell_back = name in ("blockwise", "dense") and why
        return name + (f" (not {prefill_kernels.KERNELS[lay.platform]}: {why})" if fell_back else "")
    return _per_layer_kind(cfg, label)


def paged_attention_report(cfg, lay, kv_repeat: int) -> str:
    """The attention over the paged cache (decode, later chunks) of each kind of layer the model has, with the
    reason when pages whole on each device cannot take the platform's kernel."""
    heads = cfg.num_attention_heads // lay.size("heads")
    kv = 1 if cfg.mla else cache_kv_heads(cfg, kv_repeat, lay) // lay.size("kv_heads")

    def label(spec):
        name, why = decode_kernel(lay, spec, cfg.attention_sinks, heads, kv, cfg.head_size, cfg.dtype,
                                  cfg.kv_dtype is not None)
        return name + (f" (not {decode_kernels.KERNELS[lay.platform]}: {why})" if why else "")
    return _per_layer_kind(cfg, label)


def lower_for(platform: str, mesh_cfg, cfg, batch: int = 1, prompt_len: int = 16, max_new_tokens: int = 16,
              devices: int | None = None, serving=None) -> dict:
    """Lower the engine's programs for `platform` (tpu or cuda) on `mesh_cfg`; cfg computes in its own dtype
    (the caller picks it). Raises what lowering raises. -> the report."""
    from jaxpar.serving.scheduler import ServingConfig

    ml = abstract_layout(mesh_cfg, cfg, platform, devices)
    lay = ml.layout
    form = Form(stages=lay.size("layers"))
    check_blocks(cfg, lay, ml.kv_repeat, form, "--platform")
    params = P.abstract_params(cfg, lay, ml.kv_repeat, form=form)
    st = step_shapes(cfg, lay, ml.kv_repeat, form, serving or ServingConfig(), cfg.eos_ids, batch, prompt_len,
                     max_new_tokens)
    progs = st.programs
    dec = lay.for_decode()
    out = {"platform": platform, "devices": lay.mesh.size, "mesh": dict(ml.mesh_cfg.axes), "dtype": cfg.dtype,
           "weights": cfg.quantize or cfg.dtype, "kv_cache": cfg.kv_dtype or cfg.dtype,
           "layers": "scanned" + (f", {lay.size('layers')} pipeline stages" if lay.size("layers") > 1 else ""),
           "batch": st.batch, "prompt_len": st.prompt_len, "cache_len": st.cache_len, "programs": {}}
    for name, prog, args, attention in (
            ("prefill", progs.prefill_first, st.prefill(params), prefill_attention_report(cfg, lay, st.prompt_len)),
            ("chunked_prefill", progs.prefill_paged, st.chunk(params), paged_attention_report(cfg, dec, ml.kv_repeat)),
            ("decode", progs.generate, st.decode(params), paged_attention_report(cfg, dec, ml.kv_repeat))):
        text = prog.lower(*args, platform=platform).as_text()
        out["programs"][name] = {"attention": attention, "custom_calls": custom_calls(text),
                                 "collectives": collectives(text), "stablehlo_chars": len(text)}
        out["programs"][name]["experts"] = experts.report(cfg, lay)  # how MoE layers reach their experts
    return out
