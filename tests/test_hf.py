"""Hugging Face import against transformers' own PyTorch implementation (the reference nobody here wrote)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import torch  # test dependencies (the `test` extra): a missing one fails, it does not skip
import transformers

import jaxpar
from conftest import mesh_path
from jaxpar.hf.config import SUPPORTED, read_hf_config
from jaxpar.tools import cli

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
VARIANTS = {  # name: (config class, model class, overrides)
    "llama_gqa_llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3, rope_theta=500000.0)),
    "llama_mqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_bias_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7)),  # shorter than TOKENS
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5,
                                                             max_window_layers=0)),  # every layer slides
    "qwen2_qkv_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mixtral_experts": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe_shared": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                         dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=32, head_dim=16,
                                                                 norm_topk_prob=True)),
    # layer groups: full then sliding layers; dense and MoE layers alternating; a dense first layer
    "qwen2_mixed_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=4, use_sliding_window=True,
                                                                   sliding_window=5, max_window_layers=2)),
    "qwen2_moe_sparse_step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                              dict(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, decoder_sparse_step=2)),
    "qwen3_moe_dense_first": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                              dict(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   head_dim=16, mlp_only_layers=[0])),
    # Gemma: sliding/full patterns with a window (7) shorter than TOKENS, a query scale other than head_dim's,
    # soft-capping small enough to bite (Gemma 2), and two rope bases with linear scaling on full layers (Gemma 3)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=4, head_dim=8, sliding_window=7, query_pre_attn_scalar=16,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # gpt-oss: sinks, biases, experts with a clamped SwiGLU (a limit low enough to clamp), YaRN, sliding/full layers
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_hidden_layers=4, head_dim=8, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=7, swiglu_limit=0.5,
                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 16,
                                      "rope_theta": 150000.0})),
    # DeepSeek-V3: MLA with q LoRA (rope dims interleaved in the checkpoint), YaRN with its softmax scale, a dense
    # first layer, shared experts, sigmoid routing with a correction bias within the best 2 of 4 expert groups
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, routed_scaling_factor=2.5,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                          "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 16})),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=6, head_dim=8, sliding_window=7, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
MOE_VARIANTS = ["mixtral_experts", "qwen2_moe_shared", "qwen3_moe"]  # the grouped variants' experts: below
GROUPED = {  # variants with several layer kinds: their groups, as model/groups.py forms them
    "qwen2_mixed_window": ["layers 0-1: (full/dense) x 2", "layers 2-3: (sliding/dense) x 2"],
    "qwen2_moe_sparse_step": ["layers 0-3: (full/dense + full/moe) x 2"],
    "qwen3_moe_dense_first": ["layers 0-0: (full/dense) x 1", "layers 1-3: (full/moe) x 3"],
    "gemma2": ["layers 0-3: (sliding/dense + full/dense) x 2"],
    "gemma3": ["layers 0-5: (sliding/dense + sliding/dense + full/dense) x 2"],
    "gpt_oss": ["layers 0-3: (sliding/moe + full/moe) x 2"],
    "deepseek_v3": ["layers 0-0: (full/dense) x 1", "layers 1-3: (full/moe) x 3"],
}
MESHES = ["single", "tp2", "dp2_tp4", "tp8"]  # tp8: kv heads replicated 4x (8x for MQA); tp4 as tp2 and tp8
TOKENS = np.random.RandomState(0).randint(3, 128, (3, 24))


def make_tokenizer(directory, extra: tuple = ()):
    """One word per character: <unk> <s> </s>, a-z, 0-9, then `extra`; a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + [str(i) for i in range(10)] + list(extra)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # Llama-style
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "chat_template": "{{ bos_token }}{% for m in messages %}u{{ m['content'] }}{% endfor %}"
                                    "{% if add_generation_prompt %}a{% endif %}"}, f)


def build(name, directory, **save_kw):
    cfg_cls, model_cls, over = VARIANTS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**dict(BASE, **over))
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # transformers starts some biases at zero: random ones, so their mapping is tested
        for pname, p in model.named_parameters():
            if pname.endswith(("_bias", ".bias", "sinks")):
                p.normal_(0.0, 0.3)
        for bname, b in model.named_buffers():  # DeepSeek's routing correction (zeros as transformers starts it)
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    model.save_pretrained(directory, **save_kw)
    make_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {n: (str(root / n), build(n, str(root / n))) for n in VARIANTS}


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


PROMPTS = [list(TOKENS[0, :5]), list(TOKENS[1, :11]), list(TOKENS[2, :3])]  # one batch, three lengths


def transformers_greedy(model, prompts, n: int = 8) -> list:
    """transformers' own `generate`, greedy, n tokens per prompt, never stopping at an end-of-sequence id."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        with torch.no_grad():
            out.append(model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist())
    return out


def load(mesh, **kw):
    return jaxpar.load(mesh=mesh_path(mesh), devices=jax.devices()[:1] if mesh == "single" else None, **kw)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in GROUPED])
def test_logits_match_transformers_on_every_mesh(hf_models, name):
    d, model = hf_models[name]
    ref = reference_logits(model, TOKENS)
    assert np.abs(ref).max() > 0.5  # the weights are not so small that everything is near zero
    for mesh in MESHES:
        diff = np.abs(load(mesh, hf=d).logits(TOKENS) - ref).max()
        assert diff <= 1e-4, f"{name} on {mesh}: {diff}"


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "llama_mqa_tied", "qwen2_qkv_bias", "qwen3_qk_norm",
                                  "mixtral_experts", "mistral_window"])
def test_greedy_continuations_equal_transformers_generate(hf_models, name):
    d, model = hf_models[name]
    want = transformers_greedy(model, PROMPTS)
    for mesh in ("single", "dp2_tp4"):
        got = load(mesh, hf=d).generate_tokens(PROMPTS, max_new_tokens=8, stop_at_eos=False)
        assert got == want, (name, mesh)


def test_sliding_window_matches_transformers_on_sequence_and_pipeline_meshes(hf_models):
    """A window (7) shorter than the prompt (24) and than prompt + generated tokens: ring prefill over `seq`
    (zigzag chunks of 3 tokens, so whole block pairs fall outside the window) and pipeline stages give
    transformers' logits and greedy tokens."""
    d, model = hf_models["mistral_window"]
    ref = reference_logits(model, TOKENS)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = model.generate(torch.tensor(TOKENS[:1]), max_new_tokens=10, do_sample=False)[0, 24:].tolist()
    for mesh in ("sp4", "sp8", "pp2"):
        eng = load(mesh, hf=d)
        assert np.abs(eng.logits(TOKENS) - ref).max() <= 1e-4, mesh
        assert eng.generate_tokens([list(TOKENS[0])], max_new_tokens=10, stop_at_eos=False) == [want], mesh


GROUPED_MOE = ("qwen2_moe_sparse_step", "qwen3_moe_dense_first", "gpt_oss", "deepseek_v3")


@pytest.mark.parametrize("name", GROUPED)
def test_new_families_match_transformers_on_every_mesh_kind(hf_models, name):
    """Models whose layers differ (Gemma 2 and 3, gpt-oss, DeepSeek-V3, mixed Qwen) form the groups
    model/groups.py promises, and give transformers' logits on one mesh of every kind they take, one load each:
    data x tensor (with greedy continuations equal to transformers' `generate`), ring and Ulysses prefill,
    pipeline stages (each group's repeats split over them; a group of one dense layer padded to two) and, with experts,
    expert parallelism. (BENCHMARKS.md has the same models on tp2, tp4 and tp8 too.)"""
    d, model = hf_models[name]
    from jaxpar.model.groups import layer_groups
    assert [g.describe() for g in layer_groups(read_hf_config(d))] == GROUPED[name]
    ref = reference_logits(model, TOKENS)
    assert np.abs(ref).max() > 0.5
    want = transformers_greedy(model, PROMPTS)
    for mesh in ("dp2_tp4", "sp4", "sp4_ulysses", "pp2") + (("tp2_ep4",) if name in GROUPED_MOE else ()):
        eng = load(mesh, hf=d)
        assert np.abs(eng.logits(TOKENS) - ref).max() <= 1e-4, (name, mesh)
        if mesh == "dp2_tp4":
            assert eng.generate_tokens(PROMPTS, max_new_tokens=8, stop_at_eos=False) == want, name
        if mesh == "sp4_ulysses" and name == "deepseek_v3":  # the latent, repeated 4x for the all-to-all, cached once
            assert eng.kv_repeat == 4 and eng.programs.state_struct().cache[0][0].shape[3] == 1
            assert eng.generate_tokens(PROMPTS, max_new_tokens=8, stop_at_eos=False) == want


def test_gemma_features_change_the_answer(hf_models, tmp_path):
    """Each Gemma feature the parity tests rely on really changes the logits, so those tests can fail: the
    soft-caps, the query scale, the (1 + w) norms' offset and the local rope base."""
    d, model = hf_models["gemma2"]
    ref = reference_logits(model, TOKENS)
    for field, value in (("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                         ("query_pre_attn_scalar", 8)):
        alt = tmp_path / f"gemma2_{field}"
        shutil.copytree(d, alt)
        _edit_config(str(alt), **{field: value})
        assert np.abs(load("single", hf=str(alt)).logits(TOKENS) - ref).max() > 1e-2, field
    d3, model3 = hf_models["gemma3"]
    alt = tmp_path / "gemma3_one_base"
    shutil.copytree(d3, alt)
    rp = json.load(open(alt / "config.json"))["rope_parameters"]
    rp["sliding_attention"]["rope_theta"] = rp["full_attention"]["rope_theta"]
    _edit_config(str(alt), rope_parameters=rp)
    assert np.abs(load("single", hf=str(alt)).logits(TOKENS) - reference_logits(model3, TOKENS)).max() > 1e-2


def mxfp4_quantize(w):
    """[E, rows, n] float -> MXFP4 blocks [E, rows, n/32, 16] and scales [E, rows, n/32] (uint8): each group of
    32 values scaled by a power of two so its largest fits FP4's 6, then rounded to the nearest FP4 value."""
    from jaxpar.hf.mxfp4 import FP4
    g = w.reshape(w.shape[:-1] + (-1, 32)).astype(np.float64)
    amax = np.abs(g).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
    scaled = g / np.exp2(exp)[..., None]
    idx = np.abs(scaled[..., None] - FP4.astype(np.float64)).argmin(axis=-1).astype(np.uint8)
    return (np.ascontiguousarray(idx[..., 0::2] | (idx[..., 1::2] << 4)),  # safetensors writes C order
            np.ascontiguousarray((exp + 127).astype(np.uint8)))


def test_gpt_oss_mxfp4_experts_dequantize_as_transformers_does(hf_models, tmp_path):
    """gpt-oss as released: expert weights in MXFP4 (blocks + scales, quantization_config mxfp4). Dequantized
    while loading, shard by shard, they give the logits of transformers' model holding transformers' own
    dequantization of the same blocks, on one device and under expert and tensor parallelism."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    d, model = hf_models["gpt_oss"]
    q = tmp_path / "gpt_oss_mxfp4"
    shutil.copytree(d, q)
    tensors = load_file(str(q / "model.safetensors"))
    ref = transformers.GptOssForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    for i in range(model.config.num_hidden_layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = mxfp4_quantize(np.swapaxes(tensors.pop(name), 1, 2))  # stored [E, out, in]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            deq = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            getattr(ref.model.layers[i].mlp.experts, proj).data.copy_(deq)
    save_file(tensors, str(q / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(str(q), quantization_config={"quant_method": "mxfp4"})
    want = reference_logits(ref, TOKENS)
    assert np.abs(want - reference_logits(model, TOKENS)).max() > 1e-3  # quantization changed the model
    for mesh in ("single", "dp2_ep4"):
        assert np.abs(load(mesh, hf=str(q)).logits(TOKENS) - want).max() <= 1e-4, mesh


def test_window_changes_the_answer(hf_models, tmp_path):
    """The windowed variants really differ from full attention past the window, so the tests above can fail:
    transformers' Mistral with and without the window (the same weights: same seed and shapes) agree on the
    first 7 positions only; the Qwen2 directory without use_sliding_window differs from its windowed logits."""
    full, windowed = (reference_logits(hf_models[n][1], TOKENS) for n in ("mistral", "mistral_window"))
    assert np.abs(full[:, :7] - windowed[:, :7]).max() <= 1e-5
    assert np.abs(full[:, 8:] - windowed[:, 8:]).max() > 1e-2
    d, model = hf_models["qwen2_window"]
    alt = tmp_path / "qwen2_full"
    shutil.copytree(d, alt)
    _edit_config(str(alt), use_sliding_window=False)
    assert np.abs(load("single", hf=str(alt)).logits(TOKENS) - reference_logits(model, TOKENS))[:, 6:].max() > 1e-2


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_moe_logits_match_transformers_under_expert_parallelism(hf_models, name):
    d, model = hf_models[name]
    ref = reference_logits(model, TOKENS)
    for mesh in ("dp2_ep4", "tp2_ep4"):
        diff = np.abs(load(mesh, hf=d).logits(TOKENS) - ref).max()
        assert diff <= 1e-4, f"{name} on {mesh}: {diff}"


def test_mixtral_fused_expert_weights_load_the_same(hf_models, tmp_path):
    """transformers keeps Mixtral's experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D], down_proj
    [E, D, F]); checkpoints written from that state dict load like the per-expert w1/w2/w3 form."""
    from safetensors.torch import save_file
    d, model = hf_models["mixtral_experts"]
    fused = tmp_path / "fused"
    fused.mkdir()
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    shutil.copy(os.path.join(d, "config.json"), fused)
    ref = reference_logits(model, TOKENS)
    for mesh in ("single", "tp4"):
        assert np.abs(load(mesh, hf=str(fused)).logits(TOKENS) - ref).max() <= 1e-4


def test_sharded_index_loads_the_same(hf_models, tmp_path):
    d, model = hf_models["llama_gqa_llama3"]
    sharded = str(tmp_path / "sharded")
    build("llama_gqa_llama3", sharded, max_shard_size="40KB")
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert np.abs(load("tp4", hf=sharded).logits(TOKENS) - reference_logits(model, TOKENS)).max() <= 1e-4


def test_tokenizer_text_and_chat(hf_models, tmp_path):
    d, _ = hf_models["llama_gqa_llama3"]
    eng = load("tp2", hf=d)
    ids = eng.tokenizer.encode("abc12")
    assert ids[0] == 1 and eng.tokenizer.encode("abc12", add_bos=False) == ids[1:]  # BOS from the post-processor
    assert eng.tokenizer.decode(ids).replace(" ", "") == "abc12"  # special tokens skipped
    assert eng.tokenizer.chat("hi") == eng.tokenizer.encode("<s>uhia", add_bos=False)
    out = eng.generate_tokens([ids], max_new_tokens=3, stop_at_eos=False)
    assert eng.generate(["abc12"], max_new_tokens=3, stop_at_eos=False) == [eng.tokenizer.decode(out[0])]
    # templates as transformers renders them: chat_template.jinja, loop controls, raise_exception, named lists
    alt = tmp_path / "alt"
    shutil.copytree(d, alt)
    (alt / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] != 'user' %}{{ raise_exception('users only') }}{% endif %}"
        "{{ m['content'] | upper }}{% break %}{% endfor %}")
    assert load("tp2", hf=str(alt)).tokenizer.chat("ab") == eng.tokenizer.encode("AB", add_bos=False)
    os.remove(alt / "chat_template.jinja")
    cfg = json.load(open(alt / "tokenizer_config.json"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d{{ bos_token }}"}]
    json.dump(cfg, open(alt / "tokenizer_config.json", "w"))
    assert load("tp2", hf=str(alt)).tokenizer.chat("zz") == eng.tokenizer.encode("d<s>", add_bos=False)
    cfg["chat_template"] = "{{ raise_exception('no chat here') }}"
    json.dump(cfg, open(alt / "tokenizer_config.json", "w"))
    with pytest.raises(jaxpar.JaxparError, match="no chat here"):
        load("tp2", hf=str(alt)).tokenizer.chat("zz")


def test_end_of_sequence_ids_come_from_generation_config(hf_models, tmp_path):
    d, _ = hf_models["mistral"]
    alt = tmp_path / "alt"
    shutil.copytree(d, alt)
    gen = json.load(open(alt / "generation_config.json"))
    gen["eos_token_id"] = [2, 5]
    json.dump(gen, open(alt / "generation_config.json", "w"))
    assert load("tp2", hf=str(alt)).eos_ids == (2, 5)  # config.json and the tokenizer both say 2 alone


def test_legacy_config_and_bfloat16_checkpoint(hf_models, tmp_path):
    """config.json as transformers 4 wrote it (top-level rope_theta, rope_scaling with `type`, no head_dim),
    and weights stored in bfloat16."""
    d, model = hf_models["llama_gqa_llama3"]
    alt = tmp_path / "legacy"
    shutil.copytree(d, alt)
    cfg = json.load(open(alt / "config.json"))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg.update(rope_scaling=rp, torch_dtype="float32")
    cfg.pop("head_dim")
    json.dump(cfg, open(alt / "config.json", "w"))
    assert np.abs(load("tp4", hf=str(alt)).logits(TOKENS) - reference_logits(model, TOKENS)).max() <= 1e-4
    bf = tmp_path / "bf16"
    build("qwen3_qk_norm", str(bf))
    m16 = transformers.AutoModelForCausalLM.from_pretrained(str(bf), dtype=torch.bfloat16)
    m16.save_pretrained(str(bf))
    want = reference_logits(m16.float(), TOKENS)  # the bf16 weights, computed in float32
    on_cpu = load("tp8", hf=str(bf))  # the default on CPU devices: float32, whatever the checkpoint holds
    assert on_cpu.config.dtype == "float32" and np.abs(on_cpu.logits(TOKENS) - want).max() <= 1e-4
    auto = load("tp4", hf=str(bf), dtype="auto")  # the checkpoint's own dtype
    assert auto.config.dtype == "bfloat16" and auto.run_params["embed"].dtype == jax.numpy.bfloat16
    got16 = auto.logits(TOKENS)
    assert np.abs(got16 - want).max() <= 0.1 * np.abs(want).max()  # bfloat16 compute: close, not exact
    assert np.array_equal(got16, load("tp4", hf=str(bf), dtype="bfloat16").logits(TOKENS))


def test_convert_then_load_on_any_mesh(hf_models, tmp_path, capsys):
    from jaxpar.convert import main
    d, model = hf_models["qwen3_qk_norm"]
    out = str(tmp_path / "converted")
    cli.run(main, ["--hf", d, "--out", out, "--mesh", mesh_path("tp4")])
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    ref = reference_logits(model, TOKENS)
    for mesh in ("single", "dp2_tp4"):
        eng = load(mesh, checkpoint=out)
        assert np.abs(eng.logits(TOKENS) - ref).max() <= 1e-4
        assert eng.tokenizer.encode("ab") == load("tp2", hf=d).tokenizer.encode("ab")


def run_cli(argv, capsys):
    from jaxpar.generate import main
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def bad_dir(hf_models, tmp_path, mutate):
    d, _ = hf_models["mistral"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    mutate(str(bad))
    return str(bad)


def _truncate(d):
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)


def _garbage_header(d):
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:8] + b"{not json" + data[17:])


def _pickle_only(d):
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))


def _config_disagrees(d):
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    c["intermediate_size"] = 128
    json.dump(c, open(p, "w"))


def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    c.update(kw)
    json.dump(c, open(p, "w"))


def _arch(name):
    def f(d):
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        c["architectures"] = [name]
        json.dump(c, open(p, "w"))
    return f


def _json_list(name):
    return lambda d: json.dump([1, 2], open(os.path.join(d, name), "w"))


BAD = {
    "truncated": (_truncate, ["model.safetensors", "truncated"]),
    "corrupted_header": (_garbage_header, ["model.safetensors", "corrupted safetensors header"]),
    "pickle_only": (_pickle_only, ["pytorch_model.bin", "never unpickles"]),
    "shape_vs_config": (_config_disagrees, ["model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]"]),
    "missing_config": (lambda d: os.remove(os.path.join(d, "config.json")), ["no config.json"]),
    "unknown_arch": (_arch("GPT2LMHeadModel"), ["GPT2LMHeadModel", "not supported"]),
    "bad_sparse_step": (lambda d: _edit_config(d, architectures=["Qwen2MoeForCausalLM"], decoder_sparse_step=0,
                                               num_experts=4, num_experts_per_tok=2),
                        ["decoder_sparse_step must be a positive integer"]),
    "softcap_on_mistral": (lambda d: _edit_config(d, attn_logit_softcapping=50.0),
                           ["attn_logit_softcapping is set", "Gemma only"]),
    "missing_dir": (lambda d: shutil.rmtree(d), ["not found"]),
    "config_is_a_list": (_json_list("config.json"), ["config.json", "expected a JSON object"]),
    "generation_config_is_a_list": (_json_list("generation_config.json"), ["generation_config.json", "JSON object"]),
    "tokenizer_config_broken": (lambda d: open(os.path.join(d, "tokenizer_config.json"), "w").write("{"),
                                ["tokenizer_config.json", "not valid JSON"]),
    "layer_types_too_short": (lambda d: _edit_config(d, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                                     sliding_window=5, layer_types=["full_attention"]),
                              ["layer_types must list one type per layer (2)"]),
    "unknown_field": (lambda d: _edit_config(d, attention_temperature=0.5),
                      ["attention_temperature", "unknown to jaxpar for MistralForCausalLM"]),
    "quantized": (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq"}),
                  ["quantization_config", "not supported"]),
}


@pytest.mark.parametrize("arch", sorted(SUPPORTED))
def test_every_field_transformers_writes_is_read_or_deliberately_ignored(arch, tmp_path):
    """The whole config transformers holds for each supported architecture (every default written, not only
    what differs) is accepted: no field a real checkpoint carries is refused as unknown."""
    cls = {"Gemma3ForCausalLM": "Gemma3TextConfig"}.get(arch, arch.replace("ForCausalLM", "Config"))
    cfg = getattr(transformers, cls)().to_dict()
    cfg["architectures"] = [arch]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert read_hf_config(str(tmp_path)).num_hidden_layers == cfg["num_hidden_layers"]


MOE = {"num_experts": 4, "num_experts_per_tok": 2}
S, F = "sliding_attention", "full_attention"
WINDOW_RULES = [  # (architecture, config.json fields beyond the sizes, the window jaxpar runs (with the layer types
    # when only some layers slide), or the refusal)
    ("MistralForCausalLM", {}, 4096),  # transformers' default when the field is left out
    ("MistralForCausalLM", {"sliding_window": None}, None),
    ("MixtralForCausalLM", {}, None),
    ("Qwen2ForCausalLM", {"sliding_window": 5}, None),  # no use_sliding_window: full attention
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5}, None),  # max_window_layers 28 > 4
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}, 5),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}, (5, [F, F, S, S])),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": None}, "max_window_layers must be"),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}, 5),
    ("Qwen3MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 4, **MOE}, 5),
    ("Qwen2MoeForCausalLM", {"use_sliding_window": True, "sliding_window": 5, **MOE}, (5, [S, F, S, F])),  # even
    ("Gemma2ForCausalLM", {}, (4096, [S, F, S, F])),
    ("Gemma3ForCausalLM", {"num_hidden_layers": 7}, (4096, [S, S, S, S, S, F, S])),  # every 6th layer is full
    ("Gemma3ForCausalLM", {"sliding_window_pattern": 2}, (4096, [S, F, S, F])),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "bidirectional attention is not supported"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5,
                          "layer_types": ["sliding_attention"] * 4}, 5),
]


@pytest.mark.parametrize("arch,fields,want", WINDOW_RULES)
def test_sliding_window_rules_follow_transformers(arch, fields, want, tmp_path):
    """Which layers slide is decided per architecture as transformers decides it (its defaults for fields left
    out, Qwen2-MoE's even layers, Qwen3-MoE's every layer, Gemma's patterns)."""
    cfg = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2)
    json.dump({**cfg, **fields}, open(tmp_path / "config.json", "w"))
    if isinstance(want, str):
        with pytest.raises(jaxpar.JaxparError, match=want):
            read_hf_config(str(tmp_path))
    elif isinstance(want, tuple):
        got = read_hf_config(str(tmp_path))
        assert (got.sliding_window, list(got.layer_types)) == want
    else:
        got = read_hf_config(str(tmp_path))
        assert got.sliding_window == want and got.layer_types is None


@pytest.mark.parametrize("arch,fields,dense", [
    ("Qwen2MoeForCausalLM", {"decoder_sparse_step": 2}, [0, 2]),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": [1]}, [1]),
    ("Qwen3MoeForCausalLM", {"decoder_sparse_step": 2, "mlp_only_layers": [3]}, [0, 2, 3]),
    ("Qwen3MoeForCausalLM", {}, None)])
def test_dense_layers_of_moe_models_follow_transformers(arch, fields, dense, tmp_path):
    """Layer i has experts unless it is in mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step;
    checked against the modules transformers builds from the same config."""
    cfg = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16, **MOE, **fields)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert read_hf_config(str(tmp_path)).mlp_only_layers == dense
    model = getattr(transformers, arch)(getattr(transformers, arch.replace("ForCausalLM", "Config"))(**cfg))
    theirs = [i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")]
    assert theirs == (dense or [])


def test_index_listing_a_missing_shard(tmp_path, capsys):
    d = str(tmp_path / "sharded")
    build("mistral", d, max_shard_size="40KB")
    capsys.readouterr()  # transformers' own progress output
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(d, gone))
    with pytest.raises(jaxpar.JaxparError, match=f"missing weight file.*{gone}"):
        load("tp2", hf=d)
    assert gone in run_cli(["--mesh", mesh_path("tp2"), "--hf", d, "--prompt", "ab"], capsys)


@pytest.mark.parametrize("case", BAD)
def test_bad_hf_directories(hf_models, tmp_path, capsys, case):
    mutate, frags = BAD[case]
    d = bad_dir(hf_models, tmp_path, mutate)
    with pytest.raises(jaxpar.JaxparError) as e:
        load("tp2", hf=d)
    for f in frags + [d]:
        assert f in str(e.value), (f, str(e.value))
    msg = run_cli(["--mesh", mesh_path("tp2"), "--hf", d, "--prompt", "ab"], capsys)
    for f in frags:
        assert f in msg


def test_mixtral_under_tensor_parallelism_keeps_two_all_reduces_per_layer(hf_models):
    """Each expert's FFN is split like the dense MLP (column-parallel gate/up, row-parallel down)."""
    from jaxpar.inspect import inspect_engine
    d, _ = hf_models["mixtral_experts"]
    eng = load("tp4", hf=d)
    r = inspect_engine(eng, batch=2, prompt_len=16)
    layers, hidden = eng.config.num_hidden_layers, eng.config.hidden_size
    for step, seq in (("prefill", r["prompt_len"]), ("decode", 1)):
        ar = r[step]["collectives"]["all-reduce"]
        assert ar == {"count": 2 * layers + 1, "bytes": (2 * layers + 1) * r["batch"] * seq * hidden * 4}, ar
        assert r[step]["collectives"]["all-gather"]["count"] == 1  # the logits, never expert weights
