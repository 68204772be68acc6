"""Model configuration, with Hugging Face `config.json` field names so a HF config maps one-to-one."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import yaml

from jaxpar.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
QUANT_FORMATS = ("int8", "fp8")  # model/quant.py
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # sliding layers attend to their last sliding_window positions
    layer_types: list | None = None  # per layer "sliding_attention" or "full_attention"; None: every layer
    # slides when sliding_window is set (Mistral), none otherwise
    mlp_only_layers: list | None = None  # the dense layers of a mixture-of-experts model (model/groups.py)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool | None = None  # o_proj bias; None = same as attention_bias (Llama). Qwen2: False
    qk_norm: bool = False  # Qwen3-style RMSNorm on q and k per head (not a HF field: implied by architecture)
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE: an always-on expert, sigmoid-gated
    hidden_act: str = "silu"  # the gated FFN's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    query_pre_attn_scalar: float | None = None  # scores scale by query_pre_attn_scalar ** -0.5 (Gemma); None:
    # head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    rope_local_base_freq: float | None = None  # sliding layers' rope base, without scaling (Gemma 3)
    # Gemma's normalisation, not Hugging Face fields (implied by the architecture): RMSNorm weights are offsets
    # from 1 (scale by 1 + w), attention and FFN outputs are normalised again before the residual add
    # (sandwich norms), and embeddings are scaled by sqrt(hidden_size)
    norm_offset: float = 0.0
    norm_scale_float32: bool = False  # RMSNorm scales in float32 before the cast back (gpt-oss; Gemma always)
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    # gpt-oss, implied by the architecture: a learned attention sink per head, biases on the router and the
    # experts, and experts whose SwiGLU is clamped at swiglu_limit (a HF field, with swiglu_alpha)
    attention_sinks: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # DeepSeek V2/V3 multi-head latent attention (MLA), on when kv_lora_rank is set: keys and values come from
    # one compressed latent per token (kv_lora_rank values, normalised) plus a shared rope key (qk_rope_head_dim);
    # queries through a q_lora_rank bottleneck when set
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # DeepSeek V3 routing: sigmoid scores plus a per-expert correction bias choose the experts (the bias only
    # chooses), within the topk_group best of n_group expert groups; weights scaled by routed_scaling_factor
    scoring_func: str = "softmax"
    router_score_bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True  # Qwen2-MoE's shared expert has a sigmoid gate; DeepSeek's none
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    # how weights and the KV cache are stored (model/quant.py): None keeps dtype; "int8" | "fp8" weights with
    # float32 scales per output channel, or per block of quant_block inputs (FP8 checkpoints' 128x128 blocks);
    # kv_dtype "int8" | "fp8": the KV cache with a scale per token and head
    quantize: str | None = None
    quant_block: int | None = None
    kv_dtype: str | None = None

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        """Heads of the KV cache (MLA: one latent, shared by every query head)."""
        return 1 if self.mla else self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """The attention kernels' head dimension: of queries, keys and values (MLA's absorbed form: the latent
        plus the rope key, kv_lora_rank + qk_rope_head_dim)."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.mla else self.head_size

    @property
    def cache_tensors(self) -> int:
        """Tensors the KV cache keeps per layer: K and V, or MLA's one latent (its values are its keys)."""
        return 1 if self.mla else 2

    @property
    def expert_ffn(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (e,)

    def __hash__(self) -> int:  # rope_scaling is a dict and eos_token_id may be a list
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
ALIASES = {"num_experts": "num_local_experts", "torch_dtype": "dtype"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _alias_of(field: str) -> str:
    return next(a for a, f in ALIASES.items() if f == field)


def config_from_dict(d: dict, source: str = "<config>", ignore: tuple = ()) -> ModelConfig:
    """Build and validate a ModelConfig. `ignore` lists extra field names the caller tolerates."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
    kw: dict[str, Any] = {}
    unknown = []
    for k, v in d.items():
        k2 = ALIASES.get(k, k)
        if k2 in FIELDS:
            if k2 in kw and kw[k2] != v:
                raise ConfigError(f"{source}: fields {k} and {k2 if k2 != k else _alias_of(k2)} disagree "
                                  f"({v!r} vs {kw[k2]!r})")
            kw[k2] = v
        elif k not in ignore:
            unknown.append(k)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"known fields: {', '.join(sorted(FIELDS | set(ALIASES)))}")
    missing = [k for k in REQUIRED if k not in kw]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
    cfg = ModelConfig(**kw)
    validate_config(cfg, source)
    return cfg


def _int(cfg, name, source, lo=1, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{source}: field {name} must be an integer >= {lo}, got {v!r}")


def validate_config(cfg: ModelConfig, source: str) -> None:
    for name in REQUIRED:
        _int(cfg, name, source)
    _int(cfg, "num_key_value_heads", source, allow_none=True)
    _int(cfg, "head_dim", source, allow_none=True)
    _int(cfg, "max_position_embeddings", source)
    _int(cfg, "sliding_window", source, allow_none=True)
    _int(cfg, "num_local_experts", source, lo=0)
    _int(cfg, "num_experts_per_tok", source, lo=0)
    for name in ("tie_word_embeddings", "attention_bias", "qk_norm", "attention_out_bias"):
        if name == "attention_out_bias" and cfg.attention_out_bias is None:
            continue
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{source}: field {name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("rope_theta", "rms_norm_eps"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{source}: field {name} must be a positive number, got {v!r}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"{source}: field dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    for name in ("quantize", "kv_dtype"):
        if getattr(cfg, name) not in (None,) + QUANT_FORMATS:
            raise ConfigError(f"{source}: field {name} must be one of {', '.join(QUANT_FORMATS)} (or absent), got "
                              f"{getattr(cfg, name)!r}")
    if cfg.quant_block is not None and (cfg.quantize is None or isinstance(cfg.quant_block, bool)
                                        or not isinstance(cfg.quant_block, int) or cfg.quant_block < 1):
        raise ConfigError(f"{source}: field quant_block must be a positive integer with quantize set, got "
                          f"quant_block={cfg.quant_block!r}, quantize={cfg.quantize!r}")
    _validate_mla(cfg, source)
    if cfg.scoring_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"{source}: field scoring_func {cfg.scoring_func!r} is not supported (softmax, sigmoid)")
    if (cfg.n_group is None) != (cfg.topk_group is None) or (
            cfg.n_group and (not cfg.num_local_experts or cfg.num_local_experts % cfg.n_group
                             or not 1 <= cfg.topk_group <= cfg.n_group)):
        raise ConfigError(f"{source}: fields n_group={cfg.n_group}, topk_group={cfg.topk_group} must both be set, "
                          f"n_group dividing num_local_experts={cfg.num_local_experts} and 1 <= topk_group <= "
                          f"n_group")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{source}: field hidden_act {cfg.hidden_act!r} is not supported "
                          f"({', '.join(ACTIVATIONS)})")
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                 "rope_local_base_freq", "swiglu_limit", "swiglu_alpha", "routed_scaling_factor"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise ConfigError(f"{source}: field {name} must be a positive number, got {v!r}")
    if cfg.norm_offset not in (0, 1, 0.0, 1.0):
        raise ConfigError(f"{source}: field norm_offset must be 0 or 1, got {cfg.norm_offset!r}")
    for name in ("sandwich_norms", "scale_embeddings", "norm_scale_float32", "attention_sinks", "router_bias", "expert_bias",
                 "router_score_bias", "shared_expert_gated"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{source}: field {name} must be true or false, got {getattr(cfg, name)!r}")
    h, kv = cfg.num_attention_heads, cfg.kv_heads
    if h % kv:
        raise ConfigError(f"{source}: num_attention_heads={h} is not a multiple of num_key_value_heads={kv}")
    if cfg.head_dim is None and cfg.hidden_size % h:
        raise ConfigError(f"{source}: hidden_size={cfg.hidden_size} is not divisible by num_attention_heads={h} "
                          f"and no head_dim is given")
    if not cfg.mla and cfg.head_size % 2:
        raise ConfigError(f"{source}: head_dim={cfg.head_size} must be even for rotary embeddings")
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or not 0 <= v < cfg.vocab_size):
            raise ConfigError(f"{source}: field {name}={v!r} is outside the vocabulary [0, {cfg.vocab_size})")
    for e in cfg.eos_ids:
        if not isinstance(e, int) or not 0 <= e < cfg.vocab_size:
            raise ConfigError(f"{source}: field eos_token_id={e!r} is outside the vocabulary [0, {cfg.vocab_size})")
    _validate_rope_scaling(cfg, source)
    _validate_layers(cfg, source)
    _int(cfg, "moe_intermediate_size", source, allow_none=True)
    _int(cfg, "shared_expert_intermediate_size", source, allow_none=True)
    if not isinstance(cfg.norm_topk_prob, bool):
        raise ConfigError(f"{source}: field norm_topk_prob must be true or false, got {cfg.norm_topk_prob!r}")
    if cfg.num_local_experts and not 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={cfg.num_experts_per_tok} must be between 1 and "
                          f"num_local_experts={cfg.num_local_experts}")
    if not cfg.num_local_experts:
        for name, value, default in (("num_experts_per_tok", cfg.num_experts_per_tok, 0),
                                     ("moe_intermediate_size", cfg.moe_intermediate_size, None),
                                     ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, None),
                                     ("norm_topk_prob", cfg.norm_topk_prob, True)):
            if value != default:
                raise ConfigError(f"{source}: {name}={value} is set but num_local_experts is 0 (a dense model)")


LAYER_TYPES = ("full_attention", "sliding_attention")
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _validate_mla(cfg: ModelConfig, source: str) -> None:
    given = [f for f in MLA_FIELDS if getattr(cfg, f) is not None]
    if given and len(given) != len(MLA_FIELDS):
        raise ConfigError(f"{source}: multi-head latent attention needs all of {', '.join(MLA_FIELDS)}; missing "
                          f"{', '.join(f for f in MLA_FIELDS if f not in given)}")
    for f in MLA_FIELDS + ("q_lora_rank",):
        _int(cfg, f, source, allow_none=True)
    if cfg.mla and cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"{source}: qk_rope_head_dim={cfg.qk_rope_head_dim} must be even for rotary embeddings")


def _validate_layers(cfg: ModelConfig, source: str) -> None:
    n = cfg.num_hidden_layers
    if cfg.layer_types is not None:
        types = cfg.layer_types
        if not isinstance(types, (list, tuple)) or len(types) != n or any(t not in LAYER_TYPES for t in types):
            raise ConfigError(f"{source}: field layer_types must list one of {', '.join(LAYER_TYPES)} per layer "
                              f"({n} layers), got {types!r}")
        if "sliding_attention" in types and cfg.sliding_window is None:
            raise ConfigError(f"{source}: field layer_types names sliding_attention layers but sliding_window is "
                              f"not set")
    dense = cfg.mlp_only_layers
    if dense is not None:
        if not isinstance(dense, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int)
                                                       or not 0 <= i < n for i in dense):
            raise ConfigError(f"{source}: field mlp_only_layers must list layer indices in [0, {n}), got {dense!r}")
        if dense and not cfg.num_local_experts:
            raise ConfigError(f"{source}: field mlp_only_layers={list(dense)} is set but num_local_experts is 0 "
                              f"(every layer is already dense)")


def _validate_rope_scaling(cfg: ModelConfig, source: str) -> None:
    rs = cfg.rope_scaling
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: field rope_scaling must be a mapping, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings")}.get(kind, ())
    for k in need:
        v = rs.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{source}: rope_scaling.{k} must be a positive number for rope_type {kind}, got {v!r}")
    if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ConfigError(f"{source}: rope_scaling.high_freq_factor={rs['high_freq_factor']} must exceed "
                          f"low_freq_factor={rs['low_freq_factor']}")


PACKAGE_MODELS = os.path.join(os.path.dirname(__file__), "models")


def shipped_model_dir(name: str) -> str | None:
    d = os.path.join(PACKAGE_MODELS, name.replace("-", "_"))
    return d if os.path.isfile(os.path.join(d, "config.yaml")) else None


PACKAGE_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")  # real model shapes (the repository's
# top-level configs/ links here)


def shipped_config_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PACKAGE_CONFIGS) if f.endswith(".yaml"))


def load_config(path_or_name: str) -> ModelConfig:
    """A config YAML/JSON path, the name of a shipped model (e.g. `tiny-add`) or of a shipped config
    (`llama3-70b`: configs/)."""
    path = path_or_name
    if not os.path.exists(path):
        d = shipped_model_dir(path_or_name)
        if d:
            path = os.path.join(d, "config.yaml")
        elif os.sep not in path and os.path.isfile(os.path.join(PACKAGE_CONFIGS, path + ".yaml")):
            path = os.path.join(PACKAGE_CONFIGS, path + ".yaml")
        else:
            raise ConfigError(f"{path_or_name}: no such model config file, shipped model or shipped config "
                              f"({', '.join(shipped_config_names())})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read model config: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, path)
