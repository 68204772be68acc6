"""config.json (+ generation_config.json) -> ModelConfig, for the architectures jaxpar runs."""
from __future__ import annotations

import os

from jaxpar.config import ModelConfig, config_from_dict
from jaxpar.errors import ConfigError
from jaxpar.hf.files import json_object

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
             "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
             "GptOssForCausalLM": "gpt_oss",
             "DeepseekV3ForCausalLM": "deepseek_v3"}
# config.json fields read below (besides ModelConfig's own fields and aliases)
READ = {"architectures", "torch_dtype", "dtype", "rope_parameters", "rope_scaling", "rope_theta", "layer_types",
        "max_window_layers", "sliding_window", "use_sliding_window", "mlp_bias", "qkv_bias", "decoder_sparse_step",
        "mlp_only_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_activation",
        "hidden_act", "sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq",
        "swiglu_limit", "swiglu_alpha", "quantization_config", "n_routed_experts", "n_shared_experts",
        "first_k_dense_replace", "rope_interleave", "qk_head_dim", "scoring_func", "topk_method", "moe_layer_freq",
        "experts_per_token", "sliding_window_size", "use_bidirectional_attention"}
# fields deliberately ignored: they change nothing at inference. Any other field is refused by name, so a
# checkpoint whose config asks for something jaxpar does not do never runs silently as something else.
IGNORED = {
    "_name_or_path": "metadata", "transformers_version": "metadata", "id2label": "metadata", "label2id": "metadata",
    "model_type": "metadata (the architecture decides)", "problem_type": "classification heads only",
    "return_dict": "a transformers runtime switch", "output_attentions": "a transformers runtime switch",
    "output_hidden_states": "a transformers runtime switch", "use_cache": "a transformers runtime switch",
    "is_encoder_decoder": "false for every causal LM", "chunk_size_feed_forward": "a memory option, same result",
    "initializer_range": "training: initialisation", "attention_dropout": "training: dropout",
    "router_jitter_noise": "training: router noise", "output_router_logits": "training: the auxiliary loss",
    "router_aux_loss_coef": "training: the auxiliary loss",
    "pretraining_tp": "training: a split of the same matrices, same result",
    "use_qk_norm": "Qwen3's q/k norms are implied by the architecture",
    "_attn_implementation_autoset": "a transformers runtime switch",
    "_attn_implementation": "a transformers runtime switch (which attention code runs, same result)",
    "use_bfloat16": "metadata (dtype decides)", "num_nextn_predict_layers": "multi-token prediction heads (not used "
    "to generate)", "aux_loss_alpha": "training: the auxiliary loss", "seq_aux": "training: the auxiliary loss",
    "ep_size": "a deployment hint (the mesh file decides)", "auto_map": "remote-code metadata (the architecture "
    "decides)", "initial_context_length": "gpt-oss: the pre-YaRN context (rope_scaling's "
    "original_max_position_embeddings decides)", "cache_implementation": "a transformers runtime switch", "final_logit_softcapping": "read for Gemma 2 and 3 only",
    "attn_logit_softcapping": "read for Gemma 2 and 3 only", "query_pre_attn_scalar": "read for Gemma only"}
# fields that change the computation in ways jaxpar does not implement
REFUSED = {"partial_rotary_factor": "partial rotary embeddings"}
GEMMA = ("gemma2", "gemma3")


# transformers' defaults for the fields below when config.json leaves them out
DEFAULT_WINDOW = {"mistral": 4096, "mixtral": None, "qwen2": 4096, "qwen3": 4096, "qwen2_moe": 4096, "qwen3_moe": 4096,
                  "gemma2": 4096, "gemma3": 4096, "gpt_oss": 128}
DEFAULT_MAX_WINDOW_LAYERS = 28
GEMMA_DEFAULTS = {"gemma2": dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                 hidden_act="gelu_pytorch_tanh", rope_theta=10000.0),
                  "gemma3": dict(query_pre_attn_scalar=256, attn_logit_softcapping=None, final_logit_softcapping=None,
                                 hidden_act="gelu_pytorch_tanh", rope_theta=1_000_000.0, rope_local_base_freq=10000.0)}


def _layer_types(raw: dict, kind: str, path: str) -> list[str]:
    """Which layers slide, as transformers decides: `layer_types` when config.json gives it; otherwise Gemma 2
    slides on even layers, Gemma 3 on all but every sliding_window_pattern-th (default 6), Mistral and Mixtral
    on every layer, and Qwen models only with use_sliding_window: Qwen2 and Qwen3 from layer max_window_layers
    on, Qwen2-MoE on the even layers below it, Qwen3-MoE on every layer."""
    n = raw.get("num_hidden_layers")
    n = n if isinstance(n, int) else 0
    if kind.startswith("qwen") and not raw.get("use_sliding_window"):  # transformers then drops the window
        return ["full_attention"] * n
    if raw.get("layer_types") is not None:
        types = raw["layer_types"]
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError(f"{path}: layer_types must list one type per layer ({n}), got {types!r}")
        return types
    if kind in ("gemma2", "gpt_oss"):
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if kind == "gemma3":
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ConfigError(f"{path}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if kind in ("mistral", "mixtral"):
        return ["sliding_attention"] * n
    if kind not in DEFAULT_WINDOW:
        return ["full_attention"] * n
    if kind == "qwen3_moe":
        return ["sliding_attention"] * n
    mwl = raw.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
    if isinstance(mwl, bool) or not isinstance(mwl, int):
        raise ConfigError(f"{path}: max_window_layers must be an integer, got {mwl!r}")
    if kind == "qwen2_moe":
        return ["sliding_attention" if i % 2 == 0 and i < mwl else "full_attention" for i in range(n)]
    return ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]


def _windows(raw: dict, kind: str, path: str) -> dict:
    """sliding_window and layer_types as jaxpar takes them: no window when no layer slides, and layer_types
    only when some layers slide and others do not (without it, a window means every layer slides)."""
    if raw.get("use_bidirectional_attention"):
        raise ConfigError(f"{path}: use_bidirectional_attention is set: bidirectional attention is not supported")
    types = _layer_types(raw, kind, path)
    window = raw.get("sliding_window", DEFAULT_WINDOW.get(kind))
    if "sliding_attention" not in types or not window:
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"{path}: sliding_window must be a positive integer, got {window!r}")
    return {"sliding_window": window, **({} if set(types) == {"sliding_attention"} else {"layer_types": types})}


def _dense_layers(raw: dict, kind: str, path: str) -> list[int]:
    """The dense layers of a Qwen mixture-of-experts model, as transformers builds it: layer i has experts when
    it is not in mlp_only_layers and (i + 1) is a multiple of decoder_sparse_step."""
    n = raw.get("num_hidden_layers") if isinstance(raw.get("num_hidden_layers"), int) else 0
    step = raw.get("decoder_sparse_step", 1)
    only = raw.get("mlp_only_layers") or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"{path}: decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ConfigError(f"{path}: mlp_only_layers must list layer indices, got {only!r}")
    return [i for i in range(n) if i in only or (i + 1) % step]


def _rope(raw: dict, kind: str, path: str) -> dict:
    """rope_theta, rope_scaling (and Gemma 3's rope_local_base_freq). transformers 5 writes rope_parameters
    {rope_type, rope_theta, ...} (Gemma 3: one such dict per layer type); older files rope_theta +
    rope_scaling (+ rope_local_base_freq)."""
    rp = dict(raw.get("rope_parameters") or {})
    out = {}
    if kind == "gemma3" and ("full_attention" in rp or "sliding_attention" in rp):
        local = dict(rp.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"{path}: rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not "
                              f"supported (sliding layers take plain rope)")
        if local.get("rope_theta") is not None:
            out["rope_local_base_freq"] = local["rope_theta"]
        rp = dict(rp.get("full_attention") or {})
    elif kind == "gemma3" and raw.get("rope_local_base_freq") is not None:
        out["rope_local_base_freq"] = raw["rope_local_base_freq"]
    theta = rp.pop("rope_theta", None) or raw.get("rope_theta") or GEMMA_DEFAULTS.get(kind, {}).get(
        "rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{path}: rope_theta must be a number, got {theta!r}")
    scaling = raw.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    return {**out, "rope_theta": float(theta), "rope_scaling": scaling}


DEEPSEEK_V3_DEFAULTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                            v_head_dim=128, n_routed_experts=256, moe_intermediate_size=2048, n_shared_experts=1,
                            n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
                            norm_topk_prob=True)  # transformers' DeepseekV3Config defaults, for fields left out


def _deepseek(raw: dict, path: str) -> dict:
    """DeepSeek-V3: MLA, sigmoid group-limited routing with a correction bias, routed_scaling_factor, shared
    experts without a gate, and dense first layers (first_k_dense_replace); transformers' defaults for fields
    config.json leaves out."""
    def get(name):
        return raw[name] if name in raw else DEEPSEEK_V3_DEFAULTS[name]
    for name, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if raw.get(name, want) != want:
            raise ConfigError(f"{path}: {name}={raw[name]!r} is not supported for DeepseekV3ForCausalLM (only {want!r})")
    if raw.get("attention_bias"):
        raise ConfigError(f"{path}: attention_bias=true is not supported for DeepseekV3ForCausalLM (MLA without "
                          f"projection biases only)")
    nope, rope = get("qk_nope_head_dim"), get("qk_rope_head_dim")
    if raw.get("qk_head_dim") not in (None, nope + rope) or raw.get("head_dim") not in (None, rope):
        raise ConfigError(f"{path}: qk_head_dim={raw.get('qk_head_dim')}, head_dim={raw.get('head_dim')} disagree "
                          f"with qk_nope_head_dim={nope} + qk_rope_head_dim={rope}")
    moe_ffn, shared = get("moe_intermediate_size"), get("n_shared_experts") or 0
    first = get("first_k_dense_replace")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ConfigError(f"{path}: first_k_dense_replace must be a non-negative integer, got {first!r}")
    out = dict(head_dim=None, num_key_value_heads=None, kv_lora_rank=get("kv_lora_rank"),
               q_lora_rank=get("q_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
               v_head_dim=get("v_head_dim"), num_local_experts=get("n_routed_experts"), moe_intermediate_size=moe_ffn,
               scoring_func="sigmoid", router_score_bias=True, n_group=get("n_group"), topk_group=get("topk_group"),
               routed_scaling_factor=float(get("routed_scaling_factor")), norm_topk_prob=get("norm_topk_prob"),
               shared_expert_gated=False)
    if shared:
        out["shared_expert_intermediate_size"] = moe_ffn * shared
    if first:
        out["mlp_only_layers"] = list(range(min(first, raw.get("num_hidden_layers", 0))))
    return out


def _quantization(quant, kind: str, path: str) -> dict:
    """quantization_config -> the config's quantize and quant_block: FP8 checkpoints (quant_method fp8, e4m3
    weights with a float32 `weight_scale_inv` per square block of weight_block_size) load as they are;
    gpt-oss's MXFP4 experts are dequantized while loading (hf/mxfp4.py); anything else is refused."""
    if quant is None:
        return {}
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if kind == "gpt_oss" and method == "mxfp4":
        return {}
    if method != "fp8" or not isinstance(quant, dict):
        raise ConfigError(f"{path}: quantization_config {method!r}: quantized checkpoints are not supported (FP8 "
                          f"block-scaled ones are, and gpt-oss's MXFP4 experts, dequantized while loading)")
    block = quant.get("weight_block_size")
    if quant.get("fmt", "e4m3") != "e4m3" or quant.get("activation_scheme", "dynamic") != "dynamic" or not (
            isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)
            and block[0] > 0):
        raise ConfigError(f"{path}: quantization_config: FP8 checkpoints load with fmt e4m3, activation_scheme "
                          f"dynamic and a square weight_block_size [B, B]; got fmt={quant.get('fmt')!r}, "
                          f"activation_scheme={quant.get('activation_scheme')!r}, weight_block_size={block!r}")
    return {"quantize": "fp8", "quant_block": block[0]}


def read_hf_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if os.path.isfile(directory):
        raise ConfigError(f"{directory}: is a file, not a Hugging Face model directory (give the directory that "
                          f"holds config.json and the *.safetensors files)")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: Hugging Face model directory not found")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory}: no config.json (not a Hugging Face model directory)")
    raw = json_object(path)
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else f"(none; model_type {raw.get('model_type')!r})"
    if arch not in SUPPORTED:
        raise ConfigError(f"{path}: architecture {arch} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{path}: mlp_bias=true is not supported")
    kind = SUPPORTED[arch]
    for k, what in REFUSED.items():
        if raw.get(k) not in (None, 1, 1.0):
            raise ConfigError(f"{path}: {k} is set: {what} are not supported")
    for dup, field in (("experts_per_token", "num_experts_per_tok"), ("sliding_window_size", "sliding_window")):
        if raw.get(dup) is not None and raw.get(field) is not None and raw[dup] != raw[field]:
            raise ConfigError(f"{path}: {dup}={raw[dup]} disagrees with {field}={raw[field]}")
        if raw.get(dup) is not None and raw.get(field) is None:
            raw = {**raw, field: raw[dup]}
    quantized = _quantization(raw.get("quantization_config"), kind, path)
    from jaxpar.config import FIELDS, ALIASES
    unknown = sorted(k for k in raw if k not in FIELDS and k not in ALIASES and k not in READ and k not in IGNORED
                     and k not in REFUSED)
    if unknown:
        raise ConfigError(f"{path}: field(s) {', '.join(unknown)} unknown to jaxpar for {arch}: they may change the "
                          f"computation, so the model is refused rather than run as something else (the README lists "
                          f"the fields jaxpar reads and those it deliberately ignores)")
    gemma = kind in GEMMA
    skip = READ | ({"final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"} if not gemma
                   else set())
    kw = {k: v for k, v in raw.items() if k not in skip and (k in FIELDS or k in ALIASES)}
    if not gemma:
        kw["hidden_act"] = raw.get("hidden_act", "silu")
        for k in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
            if raw.get(k) is not None:
                raise ConfigError(f"{path}: {k} is set, but {arch} does not use it (jaxpar reads it for Gemma only)")
    else:  # transformers' Gemma defaults, then the file's own values
        kw = {**{k: v for k, v in GEMMA_DEFAULTS[kind].items() if k != "rope_theta"}, **kw}
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        kw.update(hidden_act=act, norm_offset=1.0, sandwich_norms=True, scale_embeddings=True,
                  qk_norm=kind == "gemma3")
        if kw.get("head_dim") is None:
            kw["head_dim"] = 256  # transformers' Gemma default
    kw.update(_rope(raw, kind, path), tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)))
    if kind == "qwen2" or (kind == "qwen2_moe" and raw.get("qkv_bias", True)):
        kw.update(attention_bias=True, attention_out_bias=False)  # q/k/v projections have biases, o_proj none
    if kind in ("qwen3", "qwen3_moe"):
        kw["qk_norm"] = True
    if kind in ("qwen2_moe", "qwen3_moe"):
        kw.setdefault("norm_topk_prob", False)  # the transformers default for these architectures
    kw.update(_windows(raw, kind, path))
    if kind == "gpt_oss":  # sinks, biases everywhere, clamped SwiGLU experts routed by a softmax over the top k
        kw.update(attention_bias=True, attention_sinks=True, router_bias=True, expert_bias=True, norm_topk_prob=True,
                  norm_scale_float32=True,
                  hidden_act="silu", swiglu_limit=raw.get("swiglu_limit", 7.0), swiglu_alpha=raw.get("swiglu_alpha", 1.702))
    if kind == "deepseek_v3":
        kw.update(_deepseek(raw, path))
    if kind.endswith("_moe"):
        dense = _dense_layers(raw, kind, path)
        if dense:
            kw["mlp_only_layers"] = dense
    eos = raw.get("eos_token_id")
    gen = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen):
        eos = json_object(gen).get("eos_token_id", eos)
    for name, value in (("eos_token_id", eos), ("bos_token_id", raw.get("bos_token_id")),
                        ("pad_token_id", raw.get("pad_token_id"))):
        if value is not None:
            kw[name] = value
    for name in ("head_dim", "num_key_value_heads"):
        if kw.get(name) is None:
            kw.pop(name, None)
    kw.update(quantized)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    kw["dtype"] = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    return config_from_dict(kw, path)
