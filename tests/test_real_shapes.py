"""Real model shapes (configs/), sized without allocating anything: the parameter shapes come from the model
code and their per-device bytes from the layout, so these check the layout against seed 002's figures."""
import os

import jax
import numpy as np
import pytest

from conftest import ROOT
from jaxpar.config import load_config
from jaxpar.engine import params as P
from jaxpar.engine.state import bytes_per_token
from jaxpar.layout.mesh_file import parse_mesh
from jaxpar.layout.plan import plan_layout

REAL = ["llama3-8b", "llama3-70b", "llama3.1-405b", "mistral-7b", "mistral-7b-v0.1", "mixtral-8x7b",
        "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "gpt-oss-20b", "gemma3-27b"]
PARAMS_B = {"llama3-8b": 8.03, "llama3-70b": 70.55, "llama3.1-405b": 405.85, "mistral-7b": 7.25,
            "mistral-7b-v0.1": 7.24, "mixtral-8x7b": 46.70, "qwen3-30b-a3b": 30.53,  # published, billions
            "deepseek-v3": 671.0,  # the DeepSeek-V3 report (685B on the hub includes the 14B MTP module)
            "gpt-oss-120b": 116.83, "gpt-oss-20b": 20.91,  # the gpt-oss model card
            "gemma3-27b": 27.016}  # the Gemma 3 report: 1,416M embedding + 25,600M other (text decoder)


def cfg_of(name):
    return load_config(os.path.join(ROOT, "configs", name + ".yaml"))


def per_device_gb(cfg, axes):
    ml = plan_layout(parse_mesh({"axes": axes}, "m"), cfg, jax.devices())
    return P.bytes_per_device(P.abstract_params(cfg, ml.layout, ml.kv_repeat)) / 1e9, ml


@pytest.mark.parametrize("name", REAL)
def test_parameter_count_matches_the_published_one(name):
    cfg = cfg_of(name)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(P.shapes(cfg)))
    assert abs(n / 1e9 - PARAMS_B[name]) / PARAMS_B[name] < 0.005, n


def test_llama3_70b_weights_per_gpu_by_tensor_parallel_degree():
    """Seed 002: bf16 weights per GPU of about 140 / 70 / 35 / 17.5 GB for TP 1 / 2 / 4 / 8 (141.1 / 70.5 /
    35.3 / 17.6 from the real shapes); one 80 GB GPU cannot hold the model."""
    cfg = cfg_of("llama3-70b")
    for tp, want in ((1, 141.1), (2, 70.5), (4, 35.3), (8, 17.6)):
        got, _ = per_device_gb(cfg, {"tensor": tp} if tp > 1 else {})
        assert abs(got - want) / want < 0.005, (tp, got)
        assert (got < 80) == (tp > 1)


def test_a_sliding_window_bounds_the_planned_kv_cache():
    """Mistral-7B-v0.1 attends within 4096 positions on every layer: at its 32k context a sequence holds 4368
    tokens of KV cache (the window and the next 256-token chunk, in 16-token pages), v0.3 (no window) all 32768;
    131,072 bytes a token in bf16 either way."""
    from jaxpar.analysis import sizing as S
    v1, v3 = cfg_of("mistral-7b-v0.1"), cfg_of("mistral-7b")
    assert S.tokens_held(v1, 32768) == 4368 and S.tokens_held(v3, 32768) == 32768
    single = parse_mesh({"axes": {}}, "single")
    assert S.kv_bytes_per_device(v1, single, 1, 8, 32768, 2) == 8 * 4368 * 131072
    assert S.kv_bytes_per_device(v3, single, 1, 8, 32768, 2) == 8 * 32768 * 131072


@pytest.mark.parametrize("name", REAL)
def test_kv_cache_bytes_per_token(name):
    """KV bytes per token = 2 (K and V; MLA: 1 latent) x layers x kv heads x head_dim x bytes; per device /
    tensor (MLA's latent, one "kv head", is replicated). The layers are those whose cache grows with the
    context: a model mixing sliding and full layers keeps its sliding layers' tokens in fixed window rings."""
    from jaxpar.model.groups import context_layers
    cfg = cfg_of(name)
    want = cfg.cache_tensors * context_layers(cfg) * cfg.kv_heads * cfg.head_size * 2
    for tp in (1, 8):
        _, ml = per_device_gb(cfg, {"tensor": tp} if tp > 1 else {})
        per_device = bytes_per_token(cfg.replace(dtype="bfloat16"), ml.kv_repeat, ml.layout)
        assert per_device * tp == want * ml.kv_repeat, (tp, per_device)  # kv heads replicated when tp > kv


def test_mla_caches_one_latent_per_token_replicated_under_tensor_parallelism():
    """DeepSeek-V3: 61 layers x (512 + 64) latent values x 2 bytes = 70,272 bytes a token in bf16 (GQA
    Llama-3-70B: 327,680), and every device of a tensor split holds all of it (the latent has no head axis),
    where Llama-3-70B's 8 kv heads split 8 ways."""
    ds, llama = cfg_of("deepseek-v3"), cfg_of("llama3-70b")
    for tp in (1, 8):
        axes = {"tensor": tp} if tp > 1 else {}
        _, ml = per_device_gb(ds, axes)
        assert bytes_per_token(ds, ml.kv_repeat, ml.layout) == 61 * 576 * 2 == 70272
        _, ml = per_device_gb(llama, axes)
        assert bytes_per_token(llama, ml.kv_repeat, ml.layout) == 327680 // tp
