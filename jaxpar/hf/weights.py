"""Hugging Face safetensors -> jaxpar parameters, streamed straight into each device's shard.

Each parameter is built with `jax.make_array_from_callback`: for every device the callback reads only
that device's slice from the memory-mapped files, so host memory never holds the whole model. HF Linear
weights are [out, in]; jaxpar's are [in, out] with heads split out, e.g. q_proj [H*hd, D] -> wq [D, H, hd].
HF's q/k projections are already in the rotate-half RoPE convention jaxpar uses, except DeepSeek's MLA rope
dims, stored as interleaved pairs (rope_interleave) and de-interleaved as they are read (HeadRows)."""
from __future__ import annotations

import os
import sys

import jax
import ml_dtypes
import numpy as np

from jaxpar.config import ModelConfig
from jaxpar.errors import CheckpointError
from jaxpar.engine import params as P
from jaxpar.engine.quantize import LeafQuantizer, check_blocks
from jaxpar.model.quant import float_config
from jaxpar.hf.mxfp4 import MXFP4, HeadRows, Strided
from jaxpar.hf.safetensors import WeightFiles
from jaxpar.model.groups import CANONICAL, Form, layer_groups, moe_layers

L = "model.layers.{}."


def _heads(t, n, hd):  # [n*hd, ...] -> [n, hd, ...]
    return t.reshape((n, hd) + t.shape[1:])


def _deinterleave(r: int) -> np.ndarray:
    """The order that turns rope dims stored as interleaved pairs (x0, x1), (x2, x3), ... into the rotate-half
    layout jaxpar's rope uses: evens then odds (DeepSeek's rope_interleave)."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def _mla(cfg: ModelConfig, interleaved: bool) -> dict:
    """MLA's parameters (model/mla.py) from DeepSeek's q_a/q_b (or q), kv_a_proj_with_mqa and kv_b projections."""
    d, h, nope, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    lat, vd, attn = cfg.kv_lora_rank, cfg.v_head_dim, L + "self_attn."
    order = _deinterleave(rope) if interleaved else np.arange(rope)
    q_order = np.concatenate([np.arange(nope), nope + order])
    kv_order = np.concatenate([np.arange(lat), lat + order])
    p = {"attn.wkv_a": (attn + "kv_a_proj_with_mqa.weight", (lat + rope, d), lambda t: HeadRows(t, 1, kv_order), 1),
         "attn.kv_norm.weight": (attn + "kv_a_layernorm.weight", (lat,), lambda t: t, None),
         "attn.w_uk": (attn + "kv_b_proj.weight", (h * (nope + vd), lat),
                       lambda t: t.reshape(h, nope + vd, -1)[:, :nope, :], None),  # -1: lat (or its blocks)
         "attn.w_uv": (attn + "kv_b_proj.weight", (h * (nope + vd), lat),
                       lambda t: t.reshape(h, nope + vd, -1)[:, nope:, :].transpose(0, 2, 1), None),
         "attn.wo": (attn + "o_proj.weight", (d, h * vd), lambda t: t.reshape(d, h, vd).transpose(1, 2, 0), None)}
    if cfg.q_lora_rank is None:
        p["attn.wq"] = (attn + "q_proj.weight", (h * (nope + rope), d), lambda t: HeadRows(t, h, q_order), None)
    else:
        r = cfg.q_lora_rank
        p.update({"attn.wq_a": (attn + "q_a_proj.weight", (r, d), lambda t: t.T, None),
                  "attn.q_norm.weight": (attn + "q_a_layernorm.weight", (r,), lambda t: t, None),
                  "attn.wq_b": (attn + "q_b_proj.weight", (h * (nope + rope), r),
                                lambda t: HeadRows(t, h, q_order), None)})
    return p


def _block(cfg: ModelConfig, kind, experts: str, interleaved: bool = False) -> dict:
    """One layer's parameters (paths inside its block) -> (HF name template with {} for the layer index,
    expected HF shape, view: HF array -> jaxpar layout, axis of kv heads in the jaxpar layout or None)."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    attn = L + "self_attn."
    p = {"attn_norm.weight": (L + "input_layernorm.weight", (d,), lambda t: t, None),
         "mlp_norm.weight": (L + "post_attention_layernorm.weight", (d,), lambda t: t, None)}
    if cfg.mla:
        return _ffn(cfg, kind, experts, {**p, **_mla(cfg, interleaved)})
    p.update({
        "attn.wq": (attn + "q_proj.weight", (h * hd, d), lambda t: _heads(t, h, hd).transpose(2, 0, 1), None),
        "attn.wk": (attn + "k_proj.weight", (kv * hd, d), lambda t: _heads(t, kv, hd).transpose(2, 0, 1), 1),
        "attn.wv": (attn + "v_proj.weight", (kv * hd, d), lambda t: _heads(t, kv, hd).transpose(2, 0, 1), 1),
        "attn.wo": (attn + "o_proj.weight", (d, h * hd), lambda t: t.reshape(d, h, hd).transpose(1, 2, 0), None),
    })
    if cfg.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output, and the FFN has its own
        p["attn_post_norm.weight"] = (L + "post_attention_layernorm.weight", (d,), lambda t: t, None)
        p["mlp_norm.weight"] = (L + "pre_feedforward_layernorm.weight", (d,), lambda t: t, None)
        p["mlp_post_norm.weight"] = (L + "post_feedforward_layernorm.weight", (d,), lambda t: t, None)
    if cfg.attention_bias:
        p["attn.bq"] = (attn + "q_proj.bias", (h * hd,), lambda t: t.reshape(h, hd), None)
        p["attn.bk"] = (attn + "k_proj.bias", (kv * hd,), lambda t: t.reshape(kv, hd), 0)
        p["attn.bv"] = (attn + "v_proj.bias", (kv * hd,), lambda t: t.reshape(kv, hd), 0)
    if cfg.out_bias:
        p["attn.bo"] = (attn + "o_proj.bias", (d,), lambda t: t, None)
    if cfg.attention_sinks:
        p["attn.sinks"] = (attn + "sinks", (h,), lambda t: t, None)
    if cfg.qk_norm:
        p["attn.q_norm.weight"] = (attn + "q_norm.weight", (hd,), lambda t: t, None)
        p["attn.k_norm.weight"] = (attn + "k_norm.weight", (hd,), lambda t: t, None)
    return _ffn(cfg, kind, experts, p)


def _ffn(cfg: ModelConfig, kind, experts: str, p: dict) -> dict:
    d, f = cfg.hidden_size, cfg.intermediate_size
    if not kind.moe:
        p.update({"mlp.w_gate": (L + "mlp.gate_proj.weight", (f, d), lambda t: t.T, None),
                  "mlp.w_up": (L + "mlp.up_proj.weight", (f, d), lambda t: t.T, None),
                  "mlp.w_down": (L + "mlp.down_proj.weight", (d, f), lambda t: t.T, None)})
        return p
    p.update(_experts(cfg, experts))
    if cfg.router_score_bias:
        p["mlp.score_bias"] = (L + "mlp.gate.e_score_correction_bias", (cfg.num_local_experts,), lambda t: t, None)
    if cfg.shared_expert_intermediate_size:  # Qwen2-MoE's shared_expert (gated), DeepSeek's shared_experts
        fs = cfg.shared_expert_intermediate_size
        m = L + ("mlp.shared_expert." if cfg.shared_expert_gated else "mlp.shared_experts.")
        p.update({"mlp.shared.w_gate": (m + "gate_proj.weight", (fs, d), lambda t: t.T, None),
                  "mlp.shared.w_up": (m + "up_proj.weight", (fs, d), lambda t: t.T, None),
                  "mlp.shared.w_down": (m + "down_proj.weight", (d, fs), lambda t: t.T, None)})
        if cfg.shared_expert_gated:
            p["mlp.shared_gate"] = (L + "mlp.shared_expert_gate.weight", (1, d), lambda t: t.T, None)
    return p


def plan(cfg: ModelConfig, experts: str = "mixtral", interleaved: bool = False, form: Form = CANONICAL) -> dict:
    """jaxpar parameter path -> (HF name template, expected HF shape, view, kv axis, layers): templates with {}
    are per layer, read for `layers` (the layer index of each slot of the parameter's layers axis in `form`,
    None for a padding slot, which holds zeros; None for a parameter that is not per layer)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    p = {"embed": ("model.embed_tokens.weight", (v, d), lambda t: t, None, None),
         "norm.weight": ("model.norm.weight", (d,), lambda t: t, None, None)}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = ("lm_head.weight", (v, d), lambda t: t.T, None, None)
    for g, group in enumerate(layer_groups(cfg, form)):
        for u, kind in enumerate(group.unit):
            layers = tuple(group.layer_index(j, u) for j in range(group.repeats)) + (None,) * group.padding
            for name, entry in _block(cfg, kind, experts, interleaved).items():
                p[f"group{g}.block{u}.{name}"] = entry + (layers,)
    return p


def _experts(cfg: ModelConfig, style: str) -> dict:
    """Experts in one of three forms: one tensor per expert as Mixtral ships them
    (block_sparse_moe.experts.{e}.w1/w2/w3), one per expert as Qwen-MoE ships them
    (mlp.experts.{e}.gate_proj/up_proj/down_proj), or fused per layer (mlp.experts.gate_up_proj [E, 2F, D]
    with gate first, mlp.experts.down_proj [E, D, F])."""
    d, f, e = cfg.hidden_size, cfg.expert_ffn, cfg.num_local_experts
    if style in ("gpt_oss", "gpt_oss_mxfp4"):  # fused, [E, in, out], gate and up interleaved; biases
        m, q = L + "mlp.", "_blocks" if style == "gpt_oss_mxfp4" else ""
        gu = (m + "experts.gate_up_proj" + q, (e, 2 * f, d // 32, 16) if q else (e, d, 2 * f))
        down = (m + "experts.down_proj" + q, (e, d, f // 32, 16) if q else (e, f, d))
        return {"mlp.router": (m + "router.weight", (e, d), lambda t: t.T, None),
                "mlp.router_bias": (m + "router.bias", (e,), lambda t: t, None),
                "mlp.w_gate": gu + (lambda t: Strided(t, 2, 0, 2), None),
                "mlp.w_up": gu + (lambda t: Strided(t, 2, 1, 2), None),
                "mlp.w_down": down + (lambda t: t, None),
                "mlp.b_gate": (m + "experts.gate_up_proj_bias", (e, 2 * f), lambda t: t[:, 0::2], None),
                "mlp.b_up": (m + "experts.gate_up_proj_bias", (e, 2 * f), lambda t: t[:, 1::2], None),
                "mlp.b_down": (m + "experts.down_proj_bias", (e, d), lambda t: t, None)}
    if style == "qwen":
        m = L + "mlp."
        return {"mlp.router": (m + "gate.weight", (e, d), lambda t: t.T, None),
                "mlp.w_gate": (m + "experts.{e}.gate_proj.weight", (f, d), lambda t: t.T, None),
                "mlp.w_up": (m + "experts.{e}.up_proj.weight", (f, d), lambda t: t.T, None),
                "mlp.w_down": (m + "experts.{e}.down_proj.weight", (d, f), lambda t: t.T, None)}
    if style == "fused":
        m = L + "mlp."
        return {"mlp.router": (m + "gate.weight", (e, d), lambda t: t.T, None),
                "mlp.w_gate": (m + "experts.gate_up_proj", (e, 2 * f, d), lambda t: t[:, :f].transpose(0, 2, 1), None),
                "mlp.w_up": (m + "experts.gate_up_proj", (e, 2 * f, d), lambda t: t[:, f:].transpose(0, 2, 1), None),
                "mlp.w_down": (m + "experts.down_proj", (e, d, f), lambda t: t.transpose(0, 2, 1), None)}
    m = L + "block_sparse_moe."
    return {"mlp.router": (m + "gate.weight", (e, d), lambda t: t.T, None),
            "mlp.w_gate": (m + "experts.{e}.w1.weight", (f, d), lambda t: t.T, None),
            "mlp.w_up": (m + "experts.{e}.w3.weight", (f, d), lambda t: t.T, None),
            "mlp.w_down": (m + "experts.{e}.w2.weight", (d, f), lambda t: t.T, None)}


class Experts:
    """Per-expert views stacked lazily on a leading experts axis: only the sliced experts are read."""

    def __init__(self, views):
        self.views = views
        self.shape = (len(views),) + views[0].shape

    def __getitem__(self, idx):
        return np.stack([np.asarray(self.views[i][idx[1:]]) for i in range(*idx[0].indices(len(self.views)))])


def _names(template: str, layers, experts: int = 0) -> list:
    """Tensor names: one, one per layer of `layers` (None for a padding slot), or (for per-expert tensors) a
    list of expert names per layer."""
    if "{e}" in template:
        return [None if i is None else [template.format(i, e=e) for e in range(experts)] for i in layers]
    return [None if i is None else template.format(i) for i in layers] if "{}" in template else [template]


def _flat(names) -> list[str]:
    return [n for x in names if x is not None for n in (x if isinstance(x, list) else [x])]


def expert_style(files: WeightFiles, cfg: ModelConfig) -> str:
    first = next((f"model.layers.{i}.mlp." for i in moe_layers(cfg)), "model.layers.0.mlp.")
    if cfg.expert_bias:  # gpt-oss, its experts in MXFP4 as released or dequantized
        return "gpt_oss_mxfp4" if first + "experts.gate_up_proj_blocks" in files else "gpt_oss"
    if first + "experts.gate_up_proj" in files:
        return "fused"
    return "qwen" if first + "experts.0.gate_proj.weight" in files else "mixtral"


def check(files: WeightFiles, cfg: ModelConfig, source: str) -> None:
    """Every tensor the config implies is present with the implied shape; else one clear line."""
    for template, shape, _, _, layers in plan(cfg, expert_style(files, cfg)).values():
        for name in _flat(_names(template, layers, cfg.num_local_experts)):
            for need in (name, name[:-len("_blocks")] + "_scales") if name.endswith("_blocks") else (name,):
                if need not in files:
                    raise CheckpointError(f"{source}: weight {need} is missing from the safetensors files")
            if tuple(files.shape(name)) != shape:
                raise CheckpointError(f"{source}: weight {name} has shape {list(files.shape(name))} but config.json "
                                      f"implies {list(shape)}")


class Progress:
    def __init__(self, total: int, label: str = "loading weights"):
        self.total, self.done, self.label = total, 0, label
        self.show = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.show:
            bar = "#" * (30 * self.done // self.total)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _shard_reader(views, stacked: bool, kv_axis, kv_repeat: int, dtype, shape: tuple):
    """The make_array_from_callback callback: a device's index -> that slice of the parameter (global `shape`),
    read from the memory maps."""
    def one(v, idx):
        if kv_axis is not None and kv_repeat > 1:  # expanded kv head j is original head j // kv_repeat
            heads = np.arange(*idx[kv_axis].indices(v.shape[kv_axis] * kv_repeat)) // kv_repeat
            lo, hi = int(heads.min()), int(heads.max()) + 1  # read only the needed heads, then repeat them
            block = np.asarray(v[idx[:kv_axis] + (slice(lo, hi),) + idx[kv_axis + 1:]])
            return np.asarray(np.take(block, heads - lo, axis=kv_axis), dtype=dtype)
        return np.asarray(v[idx], dtype=dtype)

    def read(index):
        if not stacked:
            return one(views[0], index)
        layers = range(*index[0].indices(len(views)))
        shard = np.zeros(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype)
        for j, i in enumerate(layers):  # filled layer by layer: no stacked temporaries; padding slots stay zero
            if views[i] is not None:
                shard[j] = one(views[i], index[1:])
        return shard
    return read


def rope_interleaved(directory: str, cfg: ModelConfig) -> bool:
    """Whether the checkpoint stores MLA's rope dims as interleaved pairs (DeepSeek's rope_interleave, true
    unless config.json says otherwise)."""
    if not cfg.mla:
        return False
    from jaxpar.hf.files import json_object
    return bool(json_object(os.path.join(directory, "config.json")).get("rope_interleave", True))


def _array(files: WeightFiles, name: str):
    """A tensor of the checkpoint, lazily: MXFP4 blocks come with their scales, dequantized as they are read."""
    if name.endswith("_blocks"):
        return MXFP4(files.array(name), files.array(name[:-len("_blocks")] + "_scales"))
    return files.array(name)


def load(directory: str, cfg: ModelConfig, layout, kv_repeat: int, form: Form = CANONICAL) -> dict:
    """Stream a Hugging Face checkpoint into sharded parameters (pure dict, the Engine's layout) in `form`
    (model/groups.Form: split, or padded for pipeline stages): read straight into the form the programs run."""
    files = WeightFiles(directory)
    check(files, cfg, directory)
    check_blocks(cfg, layout, kv_repeat, form, directory)
    source = float_config(cfg)  # read in float, each weight quantized on the devices as soon as it is read
    shardings = P.flatten(P.shardings(source, layout, kv_repeat, form=form))
    shapes = P.flatten(P.shapes(source, kv_repeat, form))
    quantizer = LeafQuantizer(cfg, layout, kv_repeat, form)
    todo = plan(cfg, expert_style(files, cfg), rope_interleaved(directory, cfg), form)
    stored = P.flatten(P.shapes(cfg, kv_repeat, form))
    stored_sh = P.flatten(P.shardings(cfg, layout, kv_repeat, form=form)) if cfg.quant_block else {}
    progress = Progress(len(todo))
    out: dict = {}
    for path, (template, _, view, kv_axis, layers) in todo.items():
        names = _names(template, layers, cfg.num_local_experts)

        def make(array, view, struct, sharding):
            views = [None if n is None else Experts([view(array(x)) for x in n]) if isinstance(n, list)
                     else view(array(n)) for n in names]
            read = _shard_reader(views, "{}" in template, kv_axis, kv_repeat, np.dtype(struct.dtype), struct.shape)
            return jax.make_array_from_callback(struct.shape, sharding, read)
        fp8 = _is_fp8(files, names)
        if fp8 and path + "_scale" in stored:  # an FP8 checkpoint's weight: read as it is
            scale = stored[path + "_scale"]
            out[path] = make(lambda n: _array(files, n), view, stored[path], stored_sh[path])
            out[path + "_scale"] = make(lambda n: _block_scales(files, n, cfg.quant_block, directory),
                                        _scale_view(path, view, scale.shape[-3:-1]), scale,
                                        stored_sh[path + "_scale"])
        elif fp8:
            raise CheckpointError(f"{directory}: {_flat(names)[0]} is float8 but jaxpar reads {path} unquantized "
                                  f"(config.json names no FP8 quantization_config for it); its scales would be lost")
        else:
            out.update(quantizer(path, make(lambda n: _array(files, n), view, shapes[path], shardings[path])))
        progress.step()
    return P.unflatten(out)


def _is_fp8(files: WeightFiles, names) -> bool:
    return any(files.array(n).dtype == ml_dtypes.float8_e4m3fn for n in _flat(names))


def _block_scales(files: WeightFiles, name: str, block: int, source: str) -> np.ndarray:
    """An FP8 weight's `weight_scale_inv` [ceil(out / B), in / B] with each row repeated for the B outputs it
    covers: [out, in / B], which the weight's own view turns into jaxpar's layout of the scale (a scale per
    output channel and input block: model/quant.py)."""
    if len(files.shape(name)) != 2:
        raise CheckpointError(f"{source}: FP8 weight {name} has shape {list(files.shape(name))}; jaxpar reads FP8 "
                              f"weights as [out, in] matrices with block scales (one tensor per expert)")
    out_dim, in_dim = files.shape(name)
    want = (-(-out_dim // block), in_dim // block)
    if name + "_scale_inv" not in files:
        raise CheckpointError(f"{source}: FP8 weight {name} has no {name}_scale_inv")
    if in_dim % block or tuple(files.shape(name + "_scale_inv")) != want:
        raise CheckpointError(f"{source}: {name}_scale_inv has shape {list(files.shape(name + '_scale_inv'))}; "
                              f"a [{out_dim}, {in_dim}] weight in blocks of {block} needs {list(want)} (and an "
                              f"input dimension that is a multiple of {block})")
    return np.repeat(np.asarray(files.array(name + "_scale_inv"), np.float32), block, axis=0)[:out_dim]


def _scale_view(path: str, view, blocks: tuple):
    """The view of a weight's block scales: the weight's own, except for the output projection, whose view
    splits the input dimension into heads (`blocks`: the scale's shape on those two axes)."""
    if path.endswith("attn.wo"):
        return lambda t: t.reshape((t.shape[0],) + tuple(blocks)).transpose(1, 2, 0)
    return view
