"""jaxpar's decoder against an independent float64 NumPy version of the Hugging Face Llama forward pass.

The reference below is written from the math (Hugging Face `modeling_llama` / `modeling_qwen3` conventions),
not from jaxpar's code: it converts jaxpar's stacked pure-dict weights into per-layer Hugging Face-shaped
`nn.Linear` weights ([out_features, in_features]) and runs the textbook forward pass on them. Weights are
re-randomised at a large scale (and biases / norm weights made non-trivial) so that no term can hide behind
the std-0.02 / zeros / ones initialisation. A second group of tests checks that deliberately wrong variants
of the reference disagree with jaxpar, so the comparison has teeth.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar
from jaxpar.config import ModelConfig

TOL = 1e-4          # float32 (jaxpar) vs float64 (reference)
TEETH = 1e-2        # a wrong reference must miss by at least this much

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# head_dim 16, theta 5e5, original context 64: wavelengths 6.3 (< 16: kept), 32.4 (16..64: smoothed) and
# >= 167 (> 64: divided by factor), so all three branches of the llama3 rule are exercised.
LLAMA3_ALL_BANDS = dict(LLAMA3, original_max_position_embeddings=64)

VARIANTS = {
    "gqa": dict(),
    "mqa": dict(num_key_value_heads=1),
    "mha": dict(num_key_value_heads=4),
    "head_dim": dict(head_dim=16),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True),
    "qk_norm": dict(qk_norm=True),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3),
    # all features at once, with the llama3 variant that hits all three frequency bands
    "everything": dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, attention_bias=True,
                       qk_norm=True, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ALL_BANDS),
}
SEQ = 40  # long enough that position-dependent terms (and rope scaling) matter


# ---------------------------------------------------------------------------------------------------------
# The reference: Hugging Face Llama forward pass in float64 NumPy.
# ---------------------------------------------------------------------------------------------------------

def ref_rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def ref_silu(x):
    return x / (1.0 + np.exp(-x))


def ref_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_inv_freq(head_dim, theta, scaling, use_scaling=True):
    """HF `_compute_default_rope_parameters` + `linear` / `llama3` scaling (the latter written as Meta's
    per-frequency `apply_scaling` loop, which HF's vectorised `_compute_llama3_parameters` reproduces)."""
    inv = np.array([1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)], np.float64)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if not use_scaling or kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    assert kind == "llama3", kind
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:          # high frequency: unchanged
            out.append(f)
        elif wavelen > low_wavelen:         # low frequency: interpolated by the full factor
            out.append(f / factor)
        else:                               # in between: smooth blend of the two
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out, np.float64)


def ref_rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def ref_rotate_interleaved(x):
    """GPT-J / Meta-complex convention (pairs (0,1), (2,3), ...): used only as a deliberately wrong variant."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def hf_weights(cfg, params):
    """jaxpar's stacked pure dict -> per-layer dicts of HF-shaped float64 weights ([out, in] for Linear)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    p = {**p, "layers": p["group0"]["block0"]}  # these models are one group of identical layers
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    layers = []
    for i in range(cfg.num_hidden_layers):
        a, m = p["layers"]["attn"], p["layers"]["mlp"]
        lw = {
            "input_layernorm": p["layers"]["attn_norm"]["weight"][i],
            "post_attention_layernorm": p["layers"]["mlp_norm"]["weight"][i],
            "q_proj": a["wq"][i].reshape(d, h * hd).T,
            "k_proj": a["wk"][i].reshape(d, kv * hd).T,
            "v_proj": a["wv"][i].reshape(d, kv * hd).T,
            "o_proj": a["wo"][i].reshape(h * hd, d).T,
            "gate_proj": m["w_gate"][i].T,
            "up_proj": m["w_up"][i].T,
            "down_proj": m["w_down"][i].T,
        }
        if cfg.attention_bias:
            lw.update(q_bias=a["bq"][i].reshape(h * hd), k_bias=a["bk"][i].reshape(kv * hd),
                      v_bias=a["bv"][i].reshape(kv * hd), o_bias=a["bo"][i])
        if cfg.qk_norm:
            lw.update(q_norm=a["q_norm"]["weight"][i], k_norm=a["k_norm"]["weight"][i])
        layers.append(lw)
    w = {"embed_tokens": p["embed"], "layers": layers, "norm": p["norm"]["weight"]}
    # HF lm_head.weight is [vocab, hidden]; tied means it *is* embed_tokens.weight
    w["lm_head"] = p["embed"] if cfg.tie_word_embeddings else p["lm_head"].T
    return w


def ref_logits(cfg, params, tokens, *, rope=True, causal=True, gqa="hf", rope_style="half",
               use_scaling=True, use_bias=True, use_qk_norm=True):
    """tokens [B, S] -> logits [B, S, vocab], float64. Keyword switches produce deliberately wrong variants."""
    w = hf_weights(cfg, params)
    b, s = tokens.shape
    h, kv, hd, eps = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size, cfg.rms_norm_eps
    n_rep = h // kv

    inv = ref_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling, use_scaling)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv[None, :]          # [S, hd/2]
    if rope_style == "half":
        emb = np.concatenate([freqs, freqs], axis=-1)                         # HF: cat((freqs, freqs))
        rotate = ref_rotate_half
    else:
        emb = np.repeat(freqs, 2, axis=-1)
        rotate = ref_rotate_interleaved
    cos, sin = np.cos(emb), np.sin(emb)                                       # [S, hd]

    def apply_rope(x):                                                        # x [B, heads, S, hd]
        return x * cos + rotate(x) * sin if rope else x

    if gqa == "hf":       # repeat_kv: kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1
        kv_of_head = np.arange(h) // n_rep
    else:                 # wrong variant: round-robin assignment
        kv_of_head = np.arange(h) % kv

    mask = np.tril(np.ones((s, s), bool)) if causal else np.ones((s, s), bool)

    x = w["embed_tokens"][tokens]                                             # [B, S, d]
    for lw in w["layers"]:
        hn = ref_rms_norm(x, lw["input_layernorm"], eps)
        q = hn @ lw["q_proj"].T
        k = hn @ lw["k_proj"].T
        v = hn @ lw["v_proj"].T
        if cfg.attention_bias and use_bias:
            q, k, v = q + lw["q_bias"], k + lw["k_bias"], v + lw["v_bias"]
        q = q.reshape(b, s, h, hd).transpose(0, 2, 1, 3)                      # [B, h, S, hd]
        k = k.reshape(b, s, kv, hd).transpose(0, 2, 1, 3)
        v = v.reshape(b, s, kv, hd).transpose(0, 2, 1, 3)
        if cfg.qk_norm and use_qk_norm:                                       # Qwen3: per head, before RoPE
            q = ref_rms_norm(q, lw["q_norm"], eps)
            k = ref_rms_norm(k, lw["k_norm"], eps)
        q, k = apply_rope(q), apply_rope(k)
        k, v = k[:, kv_of_head], v[:, kv_of_head]                             # [B, h, S, hd]
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        scores = np.where(mask, scores, -np.inf)
        attn = ref_softmax(scores) @ v                                        # [B, h, S, hd]
        attn = attn.transpose(0, 2, 1, 3).reshape(b, s, h * hd) @ lw["o_proj"].T
        if cfg.attention_bias and use_bias:
            attn = attn + lw["o_bias"]
        x = x + attn
        hn = ref_rms_norm(x, lw["post_attention_layernorm"], eps)
        mlp = (ref_silu(hn @ lw["gate_proj"].T) * (hn @ lw["up_proj"].T)) @ lw["down_proj"].T
        x = x + mlp
    x = ref_rms_norm(x, w["norm"], eps)
    return x @ w["lm_head"].T


# ---------------------------------------------------------------------------------------------------------
# jaxpar side
# ---------------------------------------------------------------------------------------------------------

def config(name):
    return ModelConfig(**dict(BASE, **VARIANTS[name]))


def _value(path, shape, rng):
    keys = [getattr(k, "key", None) for k in path]
    if keys[-1] == "weight":                          # every RMSNorm (block, final, q/k) weight
        return 1.0 + 0.3 * rng.standard_normal(shape)
    return 0.3 * rng.standard_normal(shape)           # projection matrices, embedding, lm_head, biases


def randomize(params, seed):
    """Same pytree, dtypes and shardings, non-trivial values: matrices and biases N(0, 0.3), norm weights
    1 + N(0, 0.3). Works on arrays and on ShapeDtypeStructs with a sharding."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(jnp.asarray(_value(path, x.shape, rng), x.dtype), x.sharding), params)


# jaxpar's own random init compiles an RNG-heavy XLA program (seconds per config on CPU), only for the test to
# overwrite every value. Except for REAL_INIT, configs are loaded with an init that puts the test's random
# values straight into the shardings jaxpar's abstract params prescribe (same structure, dtypes, shardings).
REAL_INIT = ("everything",)


@functools.lru_cache(maxsize=None)
def setup(name):
    """(cfg, engine with randomised weights, host params, tokens [2, SEQ], jaxpar logits)."""
    from jaxpar.engine import params as P

    cfg = config(name)
    seed = sum(map(ord, name))
    if name in REAL_INIT:
        eng = jaxpar.load(mesh="single", model=cfg, devices=jax.devices()[:1], seed=0)
        old = eng.params
        eng.params = randomize(old, seed)
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(eng.params)):
            assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding
    else:
        def fast_init(cfg_, layout, kv_repeat=1, *args, **kw):
            return randomize(P.abstract_params(cfg_, layout, kv_repeat), seed)
        with mock.patch.object(P, "init_params", fast_init):
            eng = jaxpar.load(mesh="single", model=cfg, devices=jax.devices()[:1], seed=0)
        old = P.abstract_params(cfg, eng.layout, eng.kv_repeat)
    assert eng.kv_repeat == 1  # so eng.params holds the canonical (HF-shaped) set of kv heads
    assert jax.tree.structure(eng.params) == jax.tree.structure(old)
    params = jax.tree.map(np.asarray, eng.params)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, SEQ)).astype(np.int32)
    logits = eng.logits(tokens)
    assert logits.shape == (2, SEQ, cfg.vocab_size) and logits.dtype == np.float32
    return cfg, eng, params, tokens, logits


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_reference(name):
    cfg, _, params, tokens, logits = setup(name)
    ref = ref_logits(cfg, params, tokens)
    # logits of moderate magnitude, so an absolute tolerance of 1e-4 is a tight float32 bound
    assert 1.0 < np.abs(ref).max() < 100.0, np.abs(ref).max()
    d = max_diff(logits, ref)
    assert d <= TOL, f"{name}: max |jaxpar - reference| = {d:.3e}"


def test_parameter_layout_matches_config():
    cfg, _, params, _, _ = setup("everything")
    L, d, h, kv, hd, f, v = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads,
                             cfg.head_size, cfg.intermediate_size, cfg.vocab_size)
    assert [k for k in params if k.startswith("group")] == ["group0"]  # one group of one layer, repeated
    a = params["group0"]["block0"]["attn"]
    assert params["embed"].shape == (v, d)
    assert "lm_head" not in params  # tied
    assert a["wq"].shape == (L, d, h, hd) and a["wk"].shape == (L, d, kv, hd)
    assert a["wv"].shape == (L, d, kv, hd) and a["wo"].shape == (L, h, hd, d)
    assert a["bq"].shape == (L, h, hd) and a["bo"].shape == (L, d)
    assert a["q_norm"]["weight"].shape == (L, hd)
    assert params["group0"]["block0"]["mlp"]["w_gate"].shape == (L, d, f)
    assert params["group0"]["block0"]["mlp"]["w_down"].shape == (L, f, d)


def test_llama3_reference_covers_all_bands():
    """The `everything` variant's llama3 scaling exercises the kept, smoothed and fully scaled branches, and
    the reference's values agree with the closed form. (`llama3`, head_dim 8 and original context 16, hits
    only the smoothed and fully scaled ones.)"""
    cfg = config("everything")
    base = ref_inv_freq(cfg.head_size, cfg.rope_theta, None)
    scaled = ref_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
    ratio = scaled / base
    assert ratio[0] == 1.0                                   # high frequency kept
    assert np.all(np.isclose(ratio[2:], 1 / 8))              # low frequencies / factor
    assert 1 / 8 < ratio[1] < 1                              # one smoothed in between
    s = (64 / (2 * math.pi / base[1]) - 1.0) / (4.0 - 1.0)
    assert math.isclose(ratio[1], (1 - s) / 8 + s)
    # linear scaling is a plain division
    assert np.allclose(ref_inv_freq(8, 10000.0, {"rope_type": "linear", "factor": 2.0}),
                       ref_inv_freq(8, 10000.0, None) / 2)


WRONG = [
    ("gqa", dict(rope=False)),
    ("gqa", dict(causal=False)),
    ("gqa", dict(gqa="round_robin")),
    ("gqa", dict(rope_style="interleaved")),
    ("linear", dict(use_scaling=False)),
    ("llama3", dict(use_scaling=False)),
    ("everything", dict(use_scaling=False)),
    ("everything", dict(rope=False)),
    ("everything", dict(use_qk_norm=False)),
    ("bias", dict(use_bias=False)),
    ("qk_norm", dict(use_qk_norm=False)),
]


@pytest.mark.parametrize("name,wrong", WRONG, ids=[f"{n}-{next(iter(w))}" for n, w in WRONG])
def test_wrong_reference_is_caught(name, wrong):
    cfg, _, params, tokens, logits = setup(name)
    d = max_diff(logits, ref_logits(cfg, params, tokens, **wrong))
    assert d > TEETH, f"{name} with {wrong}: reference variant should disagree, max diff only {d:.3e}"


def test_tied_uses_embedding_as_lm_head():
    """In the tied reference the LM head is the embedding: changing the embedding row of a token that is not
    in the prompt moves that token's logit only, and the unchanged logits still match jaxpar."""
    cfg, _, params, tokens, logits = setup("tied")
    unused = sorted(set(range(cfg.vocab_size)) - set(tokens.ravel().tolist()))
    assert unused, "every token id occurs in the prompt"
    t = unused[0]
    p2 = jax.tree.map(np.copy, params)
    p2["embed"][t] += 1.0
    ref2 = ref_logits(cfg, p2, tokens)
    assert max_diff(ref2[..., t], logits[..., t]) > TEETH
    assert max_diff(np.delete(ref2, t, -1), np.delete(logits, t, -1)) <= TOL


def test_load_accepts_plain_dict_rope_scaling():
    """A config exactly as a Hugging Face config.json / YAML gives it (rope_scaling a plain dict) loads."""
    cfg = config("llama3")
    assert type(cfg.rope_scaling) is dict
    eng = jaxpar.load(mesh="single", model=cfg, devices=jax.devices()[:1], seed=0)
    assert eng.logits(np.zeros((1, 4), np.int32)).shape == (1, 4, cfg.vocab_size)
