"""Quantized weights (int8, fp8) and the 8-bit KV cache: what is stored, what it computes on every mesh kind,
checkpoints that keep it, FP8 checkpoints loaded as they are, and the planner's bytes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxpar
from conftest import mesh_path
from jaxpar.config import shipped_config_names
from jaxpar.model import quant

PROMPTS = ["12+34=", "7+8=", "99+1=", "5+55=", "250+250="]
_ENGINES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_engines():
    """This file's engines are its own (not conftest's session cache): they are freed when it ends."""
    yield
    _ENGINES.clear()
    import gc
    gc.collect()


def engine(mesh: str, **kw):
    key = (mesh, tuple(sorted(kw.items())))
    if key not in _ENGINES:
        _ENGINES[key] = jaxpar.load(mesh=mesh_path(mesh), **kw)
    return _ENGINES[key]


def tokens(eng, n=8):
    return eng.generate_tokens([eng.tokenizer.encode(p) for p in PROMPTS], max_new_tokens=n)


def test_scales_per_channel_and_per_block():
    # per output channel: one scale per column of a [in, out] matrix
    assert quant.scale_shape((64, 8, 16), (0,), None) == (1, 8, 16)
    # blocks of the flattened input (row-major), as Hugging Face's [out, in] blocks: heads of 8 values in
    # blocks of 32 share a scale four heads at a time; heads of 64 hold two blocks each
    assert quant.scale_shape((8, 8, 64), (0, 1), 32) == (2, 1, 64)
    assert quant.scale_shape((4, 64, 64), (0, 1), 32) == (4, 2, 64)
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.scale_shape((6, 12, 64), (0, 1), 32)
    w = jax.random.normal(jax.random.key(0), (96, 40)) * jnp.linspace(0.01, 3.0, 40)  # columns of other sizes
    for fmt, bound in (("int8", 0.5 / 127), ("fp8", 2.0 ** -4)):
        q = quant.quantize(w, fmt, (1, 40))
        assert q.values.dtype == quant.storage_dtype(fmt) and q.scale.shape == (1, 40)
        err = np.abs(np.asarray(q.dequantize(jnp.float32) - w)) / np.abs(np.asarray(w)).max(axis=0)
        assert err.max() <= bound * 1.01, fmt
    # int8 with one scale for the whole matrix loses the small columns: the per-channel scale is what bounds them
    whole, q = quant.quantize(w, "int8", (1, 1)), quant.quantize(w, "int8", (1, 40))
    assert np.abs(np.asarray(whole.dequantize(jnp.float32) - w))[:, 0].max() > 3 * np.abs(
        np.asarray(q.dequantize(jnp.float32) - w))[:, 0].max()
    blocks = quant.quantize(w, "fp8", (3, 40))  # three blocks of 32 rows
    assert np.array_equal(np.asarray(quant.expand(blocks.scale, w.shape))[:32], np.repeat(blocks.scale[:1], 32, 0))


def test_a_quantized_engine_stores_8_bit_weights_and_cache():
    eng = engine("single", quantize="int8", kv_dtype="int8")
    from jaxpar.engine.params import flatten
    flat = flatten(eng.params)
    assert flat["embed"].dtype == jnp.int8 and flat["embed_scale"].dtype == jnp.float32
    assert flat["embed_scale"].shape == (flat["embed"].shape[0], 1)  # a scale per vocabulary row
    assert flat["norm.weight"].dtype == jnp.float32  # norms stay in the compute dtype
    f32 = engine("single")
    assert eng.params_bytes_per_device() / f32.params_bytes_per_device() < 0.3
    head = eng.config.head_size
    assert eng.kv_cache_bytes_per_device() / f32.kv_cache_bytes_per_device() == (head + 4) / (4 * head)


@pytest.mark.parametrize("mesh", ["tp4", "sp4", "sp4_ulysses", "pp2_tp4", "dp2_sp2_tp2"])
def test_int8_weights_and_cache_give_the_single_device_answer_on_every_mesh_kind(mesh):
    """Scales shard with their weights (tensor: row- and column-parallel; stage; seq), and the 8-bit cache is
    read on every attention path (ring and Ulysses prefill, sequence-split decode, pipelines)."""
    one = engine("single", quantize="int8", kv_dtype="int8")
    other = engine(mesh, quantize="int8", kv_dtype="int8")
    t = np.array([one.tokenizer.encode("123+456=")])
    np.testing.assert_allclose(other.logits(t), one.logits(t), atol=2e-4)
    assert tokens(other) == tokens(one)


def test_fp8_experts_on_expert_meshes():
    one = engine("single", model="tiny-add-moe", quantize="fp8", kv_dtype="fp8")
    for mesh in ("ep8", "tp2_ep4"):
        other = engine(mesh, quantize="fp8", kv_dtype="fp8")
        t = np.array([one.tokenizer.encode("123+456=")])
        np.testing.assert_allclose(other.logits(t), one.logits(t), atol=2e-4)
        assert tokens(other) == tokens(one), mesh


def test_tiny_add_keeps_its_accuracy_with_int8_weights_and_cache():
    from jaxpar.train.add import accuracy, heldout_problems
    eng = engine("dp8", quantize="int8", kv_dtype="int8")
    assert accuracy(eng, heldout_problems()) >= 0.995


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunking_a_prompt_never_changes_what_the_8_bit_cache_gives(dtype):
    """Keys and values are quantized once, and attention reads them as the cache holds them on every path,
    so a prompt prefilled in one piece or in chunks (its later chunks attending over the cached pages) gives
    the same tokens, greedy or sampled, in bfloat16 as in float32."""
    whole = engine("single", quantize="int8", kv_dtype="int8", dtype=dtype)
    chunked = engine("single", quantize="int8", kv_dtype="int8", dtype=dtype, prefill_chunk=4,
                     max_num_batched_tokens=4)
    assert tokens(chunked, 4) == tokens(whole, 4)
    prompts = [whole.tokenizer.encode(p) for p in PROMPTS]
    sampled = [e.generate_tokens(prompts, max_new_tokens=4, temperature=1.0, seed=3) for e in (whole, chunked)]
    assert sampled[0] == sampled[1]


def test_quantized_checkpoint_loads_as_it_is_on_any_mesh(tmp_path):
    eng = engine("tp4", quantize="int8")
    eng.save(str(tmp_path / "ck"))
    cfg = yaml_config(tmp_path / "ck")
    assert cfg["quantize"] == "int8"
    again = jaxpar.load(mesh=mesh_path("pp2"), checkpoint=str(tmp_path / "ck"))
    assert again.config.quantize == "int8" and tokens(again) == tokens(eng)
    with pytest.raises(jaxpar.JaxparError, match="not requantized to fp8"):
        jaxpar.load(mesh=mesh_path("single"), checkpoint=str(tmp_path / "ck"), quantize="fp8")


def yaml_config(directory):
    import yaml
    with open(os.path.join(directory, "config.yaml")) as f:
        return yaml.safe_load(f)


def test_plan_predicts_the_bytes_inspect_measures(capsys):
    """plan --dtype int8 --kv-dtype int8 sizes weights (scales included) and the cache (a scale per token and
    head) as the engine stores them; the engine computes in bfloat16 as plan assumes."""
    from jaxpar import plan as plan_cli
    from jaxpar.inspect import inspect_engine
    for mesh, model in (("tp4", "tiny-add"), ("ep8", "tiny-add-moe")):
        eng = engine(mesh, dtype="bfloat16", quantize="int8", kv_dtype="int8")
        r = inspect_engine(eng, batch=3, prompt_len=20, max_new_tokens=24)
        plan_cli.main(["--model", model, "--devices", "8", "--mesh", mesh, "--batch", "3", "--context", "20",
                       "--new-tokens", "24", "--dtype", "int8", "--kv-dtype", "int8", "--platform", "cpu", "--json"])
        p = json.loads(capsys.readouterr().out)["layouts"][0]
        assert p["weights_bytes_per_device"] == r["params_bytes_per_device"], mesh
        assert p["kv_bytes_per_device"] == r["kv_cache_bytes_per_device"], mesh


@pytest.mark.parametrize("name", [n for n in shipped_config_names() if not n.startswith("tiny")])
def test_int8_weights_take_a_quarter_of_float32_on_real_shapes(name):
    """Scales, embedding and LM head included (the abstract model: nothing allocated)."""
    from jaxpar.analysis import sizing as S
    from jaxpar.config import load_config
    from jaxpar.layout.mesh_file import parse_mesh
    cfg, one = load_config(name), parse_mesh({}, "single")
    ratio = S.params_bytes_per_device(cfg, one, 1, "int8", "bf16") / S.params_bytes_per_device(cfg, one, 1,
                                                                                                "float32", "float32")
    assert 0.25 < ratio <= 0.26, ratio
    # the cache: half of bfloat16, plus a bfloat16 scale per head_dim values (head_dim 64: 0.516)
    head = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.mla else cfg.head_size
    assert S.kv_value_bytes(cfg, "int8", "bf16") / S.kv_value_bytes(cfg, "bf16", "bf16") == (head + 2) / (2 * head)


# ---- FP8 checkpoints, as DeepSeek-V3 and Qwen3 publish them ----

BLOCK = 32
FP8_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",  # heads of 8 values: one block of o_proj's input spans 4 heads
              dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=64)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",  # kv_a's 48 outputs: a ragged last block
                    dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                         first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=16, v_head_dim=32)),
}


def fp8_blocks(w: torch.Tensor):
    """A [out, in] float weight -> (e4m3 values, float32 scale_inv per BLOCK x BLOCK block, dequantized twin)."""
    out, inp = w.shape
    rows = -(-out // BLOCK) * BLOCK
    padded = torch.zeros(rows, inp)
    padded[:out] = w
    blocks = padded.reshape(rows // BLOCK, BLOCK, inp // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def write_fp8_checkpoint(name, directory):
    """The model as an FP8 checkpoint (every decoder Linear in e4m3 with its block scales; embedding, LM head,
    norms and router in float, as the published ones) and its dequantized float twin in transformers."""
    from safetensors.torch import save_file
    cfg_cls, model_cls, kw = FP8_MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    tensors = {}

    def fp8(name, w):  # -> the dequantized twin of w
        q, scale, twin = fp8_blocks(w.float())
        tensors[name], tensors[name + "_scale_inv"] = q, scale.contiguous()
        return twin
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.experts.gate_up_proj"):  # fused [E, 2F, D]: one tensor per expert, as published
                f = p.shape[1] // 2
                for e in range(p.shape[0]):
                    base = pname[:-len("gate_up_proj")] + f"{e}."
                    p[e, :f] = fp8(base + "gate_proj.weight", p[e, :f])
                    p[e, f:] = fp8(base + "up_proj.weight", p[e, f:])
            elif pname.endswith("mlp.experts.down_proj"):  # [E, D, F]
                for e in range(p.shape[0]):
                    p[e] = fp8(pname[:-len("down_proj")] + f"{e}.down_proj.weight", p[e])
            elif pname.startswith("model.layers.") and p.dim() == 2 and not pname.endswith("mlp.gate.weight"):
                p.copy_(fp8(pname, p.data))  # every decoder Linear but the router
            else:
                tensors[pname] = p.data.contiguous()
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                tensors[bname] = b.data.contiguous()
    os.makedirs(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    config = dict(model.config.to_dict(), architectures=[model_cls])
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return model


@pytest.mark.parametrize("name", list(FP8_MODELS))
def test_fp8_block_checkpoint_gives_its_float_twins_logits(name, tmp_path):
    twin = write_fp8_checkpoint(name, str(tmp_path / name))
    toks = np.random.RandomState(0).randint(3, 128, (2, 12))
    with torch.no_grad():
        ref = twin(torch.tensor(toks)).logits.numpy()
    from jaxpar.layout.mesh_file import parse_mesh
    meshes = ["single", "tp2", "sp4"] + (["ep4"] if name == "deepseek_v3" else ["pp2"])  # its 2 layers: 1 group
    for mesh in meshes:  # block scales split with their weights over tensor, stage, seq and expert axes
        where = parse_mesh({"axes": {"expert": 4}}, "ep4") if mesh == "ep4" else mesh_path(mesh)
        eng = jaxpar.load(mesh=where, hf=str(tmp_path / name), devices={"single": jax.devices()[:1],
                                                                         "ep4": jax.devices()[:4]}.get(mesh))
        assert eng.config.quantize == "fp8" and eng.config.quant_block == BLOCK
        from jaxpar.engine.params import flatten
        flat = flatten(eng.params)
        assert flat["embed"].dtype == eng.params["norm"]["weight"].dtype  # shipped in float: kept so
        assert any(v.dtype == jnp.float8_e4m3fn for v in flat.values())
        np.testing.assert_allclose(eng.logits(toks), ref, atol=2e-4, rtol=1e-4, err_msg=mesh)
    # a split that would cut a block between devices is refused by name (inputs of 64 = 2 blocks of 32)
    with pytest.raises(jaxpar.JaxparError, match="2 blocks of 32 inputs along its (heads|mlp) axis.*tensor=4"):
        jaxpar.load(mesh=mesh_path("tp4"), hf=str(tmp_path / name))


def test_hugging_face_weights_quantize_as_they_stream_and_convert_keeps_them(tmp_path, capsys):
    """Float safetensors -> int8 on the devices one tensor at a time; `convert --quantize int8` writes those
    8-bit weights and their scales, and `--checkpoint` loads them as they are on another mesh."""
    from jaxpar.convert import main as convert_main
    from jaxpar.engine.params import flatten
    cfg_cls, model_cls, kw = FP8_MODELS["llama"]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    model.save_pretrained(str(tmp_path / "hf"))
    toks = np.random.RandomState(1).randint(3, 128, (2, 10))
    with torch.no_grad():
        ref = model(torch.tensor(toks)).logits.numpy()
    streamed = jaxpar.load(mesh=mesh_path("tp2"), hf=str(tmp_path / "hf"), quantize="int8")
    assert flatten(streamed.params)["group0.block0.mlp.w_down"].dtype == jnp.int8
    got = streamed.logits(toks)
    assert 0 < np.abs(got - ref).max() < 0.02 * np.abs(ref).max()  # rounded, and close
    convert_main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"), "--quantize", "int8"])
    capsys.readouterr()
    assert yaml_config(tmp_path / "ck")["quantize"] == "int8"
    stored = jaxpar.load(mesh=mesh_path("single"), checkpoint=str(tmp_path / "ck"), devices=jax.devices()[:1])
    assert flatten(stored.params)["group0.block0.mlp.w_down"].dtype == jnp.int8
    np.testing.assert_allclose(stored.logits(toks), got, atol=1e-5)
