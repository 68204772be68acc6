"""config.json (+ generation_config.json) -> ModelConfig, for the architectures jaxpar runs."""
from __future__ import annotations

import os

from jaxpar.config import ModelConfig, config_from_dict
from jaxpar.errors import ConfigError
from jaxpar.hf.files import json_object

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
             "Qwen3MoeForCausalLM": "qwen3_moe"}
# config.json fields read below (besides ModelConfig's own fields and aliases)
READ = {"architectures", "torch_dtype", "dtype", "rope_parameters", "rope_scaling", "rope_theta", "layer_types",
        "max_window_layers", "sliding_window", "use_sliding_window", "mlp_bias", "qkv_bias", "decoder_sparse_step",
        "mlp_only_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
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
    "use_bfloat16": "metadata (dtype decides)"}
# fields that change the computation in ways jaxpar does not implement
REFUSED = {"quantization_config": "quantized checkpoints", "partial_rotary_factor": "partial rotary embeddings",
           "attn_logit_softcapping": "attention logit soft-capping",
           "final_logit_softcapping": "final logit soft-capping"}


# transformers' defaults for the fields below when config.json leaves them out
DEFAULT_WINDOW = {"mistral": 4096, "mixtral": None, "qwen2": 4096, "qwen3": 4096, "qwen2_moe": 4096, "qwen3_moe": 4096}
DEFAULT_MAX_WINDOW_LAYERS = 28


def _layer_types(raw: dict, kind: str, path: str) -> list[str]:
    """Which layers slide, as transformers decides for a Qwen model with use_sliding_window: `layer_types` when
    config.json gives it; otherwise Qwen2 and Qwen3 slide from layer max_window_layers on, Qwen2-MoE slides on
    the even layers below it, Qwen3-MoE on every layer."""
    n = raw.get("num_hidden_layers")
    n = n if isinstance(n, int) else 0
    if raw.get("layer_types") is not None:
        types = raw["layer_types"]
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError(f"{path}: layer_types must list one type per layer ({n}), got {types!r}")
        return types
    if kind == "qwen3_moe":
        return ["sliding_attention"] * n
    mwl = raw.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
    if isinstance(mwl, bool) or not isinstance(mwl, int):
        raise ConfigError(f"{path}: max_window_layers must be an integer, got {mwl!r}")
    if kind == "qwen2_moe":
        return ["sliding_attention" if i % 2 == 0 and i < mwl else "full_attention" for i in range(n)]
    return ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]


def _sliding_window(raw: dict, kind: str, path: str) -> int | None:
    """The window every layer attends within, or None, as transformers runs the architecture. Mistral and
    Mixtral slide on every layer when sliding_window is set; Qwen models only with use_sliding_window, on the
    layers `_layer_types` names. Models mixing sliding and full layers are refused."""
    if kind not in DEFAULT_WINDOW:
        return None
    window = raw.get("sliding_window", DEFAULT_WINDOW[kind])
    if kind not in ("mistral", "mixtral"):
        if not raw.get("use_sliding_window"):
            return None
        types = _layer_types(raw, kind, path)
        kinds = set(types)
        if kinds == {"full_attention"} or not kinds:
            return None
        if kinds != {"sliding_attention"}:
            sliding = sum(t == "sliding_attention" for t in types)
            raise ConfigError(f"{path}: use_sliding_window makes {sliding} of {len(types)} layers sliding "
                              f"(layer_types, max_window_layers={raw.get('max_window_layers')}): models mixing "
                              f"sliding and full attention layers are not supported yet; every layer or none must "
                              f"slide")
    if not window:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"{path}: sliding_window must be a positive integer, got {window!r}")
    return window


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
    if kind.endswith("_moe") and (raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers")):
        raise ConfigError(f"{path}: decoder_sparse_step={raw.get('decoder_sparse_step', 1)}, mlp_only_layers="
                          f"{raw.get('mlp_only_layers')}: models mixing dense and sparse layers are not supported "
                          f"(every layer must be a mixture of experts)")
    for k, what in REFUSED.items():
        if raw.get(k) not in (None, 1, 1.0):
            raise ConfigError(f"{path}: {k} is set: {what} are not supported")
    from jaxpar.config import FIELDS, ALIASES
    unknown = sorted(k for k in raw if k not in FIELDS and k not in ALIASES and k not in READ and k not in IGNORED
                     and k not in REFUSED)
    if unknown:
        raise ConfigError(f"{path}: field(s) {', '.join(unknown)} unknown to jaxpar for {arch}: they may change the "
                          f"computation, so the model is refused rather than run as something else (the README lists "
                          f"the fields jaxpar reads and those it deliberately ignores)")
    kw = {k: v for k, v in raw.items() if k not in READ and (k in FIELDS or k in ALIASES)}
    # rope: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
    rp = dict(raw.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{path}: rope_theta must be a number, got {theta!r}")
    scaling = raw.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    kw.update(rope_theta=float(theta), rope_scaling=scaling,
              tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    if kind == "qwen2" or (kind == "qwen2_moe" and raw.get("qkv_bias", True)):
        kw.update(attention_bias=True, attention_out_bias=False)  # q/k/v projections have biases, o_proj none
    if kind in ("qwen3", "qwen3_moe"):
        kw["qk_norm"] = True
    if kind in ("qwen2_moe", "qwen3_moe"):
        kw.setdefault("norm_topk_prob", False)  # the transformers default for these architectures
    window = _sliding_window(raw, kind, path)
    if window:
        kw["sliding_window"] = window
    eos = raw.get("eos_token_id")
    gen = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen):
        eos = json_object(gen).get("eos_token_id", eos)
    for name, value in (("eos_token_id", eos), ("bos_token_id", raw.get("bos_token_id")),
                        ("pad_token_id", raw.get("pad_token_id"))):
        if value is not None:
            kw[name] = value
    if kw.get("head_dim") is None:
        kw.pop("head_dim", None)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    kw["dtype"] = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    return config_from_dict(kw, path)
