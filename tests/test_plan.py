"""The planner (`python -m jaxpar.plan`): its communication model against the compiled programs, the
reference texts' sizing facts, and its recommendations."""
import json
import os

import pytest

from conftest import engine
from jaxpar import plan as plan_cli
from jaxpar.analysis import comm as C
from jaxpar.analysis import planner as PL
from jaxpar.analysis import sizing as S
from jaxpar.analysis.hardware import PRESETS, load_hardware
from jaxpar.bench import SHIPPED
from jaxpar.config import load_config
from jaxpar.inspect import inspect_engine
from jaxpar.layout.mesh_file import MeshConfig, parse_mesh
from jaxpar.layout.plan import check_layout

# layouts not shipped as files whose collectives differ in kind: a pipeline around expert dispatch
# (statistics gathered over stages), NVIDIA-style SP (reduce-scatters), capacity-limited EP with TP
EXTRA = {"pp2_ep4_m2": ({"axes": {"stage": 2, "expert": 4}, "microbatches": 2}, "tiny-add-moe"),
         "tp2_nvsp": ({"axes": {"tensor": 2}, "rules": {"residual_seq": "tensor"}}, "tiny-add"),
         "ep4_tp2_cf": ({"axes": {"expert": 4, "tensor": 2}, "capacity_factor": 1.25}, "tiny-add-moe")}


def predicted(eng, r):
    """The planner's collectives for the shapes inspect compiled."""
    mc = eng.model_layout.mesh_cfg
    out = {}
    for key, step in (("prefill", C.Step(r["batch"], r["prompt_len"], r["cache_len"], False)),
                      ("decode", C.Step(r["batch"], 1, r["cache_len"], True))):
        out[key] = C.summarise(C.step_collectives(eng.config, mc, eng.kv_repeat, step, 4))
    return out


def assert_close(pred, real, where):
    """The issue asks for 10%; the model is exact, so equality is asserted (counts and bytes)."""
    for step in ("prefill", "decode"):
        for op, v in real[step]["collectives"].items():
            assert pred[step][op] == v, (where, step, op, pred[step][op], v)


@pytest.mark.parametrize("mesh", SHIPPED)
def test_predicted_collectives_match_the_compiled_program(mesh):
    """Every shipped mesh, the default model (tiny-add-moe on expert meshes): every collective's count and
    bytes per step, padded batch and prompt included; params and KV cache bytes per device."""
    eng = engine(mesh)
    r = inspect_engine(eng, batch=3, prompt_len=37, max_new_tokens=16)
    assert_close(predicted(eng, r), r, mesh)
    mc = eng.model_layout.mesh_cfg
    assert S.params_per_device(eng.config, mc, eng.kv_repeat) * 4 == r["params_bytes_per_device"]
    assert S.kv_bytes_per_device(eng.config, mc, eng.kv_repeat, r["batch"], r["cache_len"], 4) == \
        r["kv_cache_bytes_per_device"]


@pytest.mark.parametrize("mesh", ["tp4", "sp4"])
def test_a_sliding_window_bounds_the_kv_cache_the_engine_and_the_planner_size(mesh):
    """Every layer attends within 64 positions of a 256-token context: the engine's default pool holds each
    slot's window and its next 16-token chunk (6 pages of 16, not 16), and the planner's KV bytes per device
    equal the compiled program's."""
    cfg = load_config("tiny-llama")
    opts = dict(prefill_chunk=16, max_num_batched_tokens=32, decode_steps=4)
    full, windowed = engine(mesh, model=cfg, **opts), engine(mesh, model=cfg.replace(sliding_window=64), **opts)
    assert windowed.scheduler.pages_needed(256) == 6 and full.scheduler.pages_needed(256) == 16
    n = full.layout.size("cache_seq")
    assert windowed.kv_cache_bytes_per_device() * -(-16 // n) == full.kv_cache_bytes_per_device() * -(-6 // n)
    r = inspect_engine(windowed, batch=3, prompt_len=200, max_new_tokens=56)
    assert S.kv_bytes_per_device(windowed.config, windowed.model_layout.mesh_cfg, windowed.kv_repeat, r["batch"],
                                 r["cache_len"], 4, ahead=16) == r["kv_cache_bytes_per_device"]


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_predicted_collectives_on_other_layouts(name):
    inline, model = EXTRA[name]
    eng = engine(name, inline, model=model)
    r = inspect_engine(eng, batch=8, prompt_len=16, max_new_tokens=16)
    assert_close(predicted(eng, r), r, name)


@pytest.mark.parametrize("mesh", ["tp4", "sp4", "pp2_tp4", "ep8"])
def test_planner_pads_as_the_engine_does(mesh, capsys):
    """jaxpar.plan's own shapes (batch, prompt and KV cache buckets) and memory per device are the
    compiled program's: the full path from the command line, not only the communication function. The
    programs here are CPU programs (`--platform cpu`; the default is the hardware's, h100-nvlink's cuda, whose
    dropless expert dispatch is ragged)."""
    eng = engine(mesh)
    r = inspect_engine(eng, batch=3, prompt_len=20, max_new_tokens=24)
    model = "tiny-add-moe" if "ep" in mesh else "tiny-add"
    p = run_plan(capsys, "--model", model, "--devices", "8", "--mesh", mesh, "--batch", "3", "--context", "20",
                 "--new-tokens", "24", "--dtype", "float32", "--platform", "cpu")["layouts"][0]
    assert (p["batch_padded"], p["context_padded"]) == (r["batch"], r["prompt_len"])
    assert p["weights_bytes_per_device"] == r["params_bytes_per_device"]
    assert p["kv_bytes_per_device"] == r["kv_cache_bytes_per_device"]
    for step in ("prefill", "decode"):
        assert p[step]["collectives"] == r[step]["collectives"], step


def test_a_wrong_prediction_is_caught():
    """The comparison above can fail: one layer fewer in the model changes the counts."""
    eng = engine("tp2")
    r = inspect_engine(eng, batch=3, prompt_len=37, max_new_tokens=16)
    wrong = eng.config.replace(num_hidden_layers=eng.config.num_hidden_layers - 1)
    mc = eng.model_layout.mesh_cfg
    pred = {k: C.summarise(C.step_collectives(wrong, mc, 1, C.Step(r["batch"], s, r["cache_len"], k == "decode"),
                                              4)) for k, s in (("prefill", r["prompt_len"]), ("decode", 1))}
    with pytest.raises(AssertionError):
        assert_close(pred, r, "tp2 with a layer missing")


def run_plan(capsys, *argv):
    plan_cli.main(list(argv) + ["--json"])
    return json.loads(capsys.readouterr().out)


def test_llama3_70b_weights_per_gpu_and_kv_per_token(capsys):
    """Seed 002: about 141/70.5/35.3/17.6 GB of bf16 weights per GPU at TP 1/2/4/8 (it rounds to
    140/70/35/17.5), and 70B bf16 does not fit one 80 GB GPU; KV bytes per token = 2 x layers x kv heads x
    head_dim x 2 (327,680 for Llama-3-70B)."""
    r = run_plan(capsys, "--model", "llama3-70b", "--devices", "8", "--mesh", "single", "tp2", "tp4", "tp8")
    by = {x["name"]: x for x in r["layouts"]}
    for name, want in (("single", 141.1), ("tp2", 70.5), ("tp4", 35.3), ("tp8", 17.6)):
        assert abs(by[name]["weights_bytes_per_device"] / 1e9 - want) / want < 0.005, name
    assert not by["single"]["fits"] and by["tp8"]["fits"]
    d = by["tp8"]["weights_bytes_per_device_by_dtype"]
    assert d["bf16"] == 4 * d["int4"] == by["tp8"]["weights_bytes_per_device"]
    # 8-bit weights as the engine stores them: a float32 scale per output channel, bf16 norms
    assert d["int8"] == d["fp8"] and d["bf16"] / 2 < d["int8"] < 1.01 * d["bf16"] / 2
    assert r["sizing"]["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327680
    one = run_plan(capsys, "--model", "llama3-70b", "--devices", "1")
    assert one["layouts"][0]["weights_bytes_per_device"] > 80e9 and not one["layouts"][0]["fits"]
    assert one["recommended"] is None


def test_params_accepts_the_forms_it_offers(capsys):
    for text in ("671B", "671e9", "671000M", "6.71e11"):
        assert run_plan(capsys, "--params", text, "--dtype", "fp8", "--hardware", "b200-nvlink")["params"] == 671e9


def test_mixture_of_experts_and_odd_device_counts(capsys):
    """MoE models plan with expert layouts; device counts that are not powers of two and multi-node
    networks enumerate every divisor's layouts without error."""
    r = run_plan(capsys, "--model", "mixtral-8x7b", "--devices", "8", "--batch", "64", "--context", "2048",
                 "--capacity-factor", "1.25")
    assert any("expert" in x["mesh"]["axes"] for x in r["layouts"]) and r["recommended"]["fits"]
    assert run_plan(capsys, "--model", "qwen3-30b-a3b", "--devices", "8")["recommended"]["fits"]
    r = run_plan(capsys, "--model", "llama3-8b", "--devices", "12", "--nodes", "2", "--network", "roce")
    assert {x["devices"] for x in r["layouts"]} <= {1, 2, 3, 4, 6, 12} and r["recommended"]["fits"]
    assert run_plan(capsys, "--model", "llama3-70b", "--devices", "3")["sizing"]["min_devices_by_allowance"] == 4


def test_deepseek_v3_fp8_needs_a_full_node_of_b200(capsys):
    """Seed 003: 671B parameters in FP8 = 671 GB; x 1.8 for KV cache = ~1,208 GB; rounded up over B200
    instances of 180/360/720/1,440 GB: 8 B200, although 4 (720 GB) would hold the weights alone."""
    r = run_plan(capsys, "--params", "671B", "--dtype", "fp8", "--hardware", "b200-nvlink")
    assert r["weights_bytes"]["fp8"] == 671e9
    assert abs(r["required_bytes"] - 1207.8e9) < 1e9
    assert r["min_devices"] == 8
    assert PL.min_devices(671e9, PRESETS["b200-nvlink"]) == 4


def test_deepseek_v3_sized_from_the_model_code_needs_a_full_node_of_b200(capsys):
    """Seed 003 again, from the shipped deepseek-v3 config rather than a parameter count: the model code's
    671.03B parameters in FP8 x 1.8 need 8 B200s; its MLA cache is 70,272 bytes a token in bf16."""
    r = run_plan(capsys, "--model", "deepseek-v3", "--dtype", "fp8", "--hardware", "b200-nvlink")
    assert abs(r["sizing"]["params"] / 671e9 - 1) < 0.005
    assert r["sizing"]["min_devices_by_allowance"] == 8
    assert r["sizing"]["kv_bytes_per_token"] == 70272
    assert r["model"]["layer_groups"] == ["layers 0-2: (full/dense) x 3", "layers 3-60: (full/moe) x 58"]


def test_recommendation_is_topology_aware(capsys):
    """Seed 002: Llama-3-70B at batch 1 on 8 H100 over NVLink: TP over all 8, inside the node. On a
    two-socket PCIe Gen4 server a smaller TP degree that stays inside one socket. Seed 003: a dense model
    too big for one node: TP8 inside each node, PP2 across the InfiniBand link."""
    nv = run_plan(capsys, "--model", "llama3-70b", "--devices", "8", "--hardware", "h100-nvlink")["recommended"]
    assert nv["fits"] and nv["mesh"]["axes"] == {"tensor": 8}
    pcie = run_plan(capsys, "--model", "llama3-70b", "--devices", "8", "--hardware", "pcie4-cross-socket")
    rec = pcie["recommended"]
    assert rec["fits"] and rec["mesh"]["axes"]["tensor"] < 8
    assert "qpi-upi" not in rec["decode"]["links"]  # the per-layer all-reduces stay inside a socket
    tp8 = next(x for x in pcie["layouts"] if x["mesh"]["axes"] == {"tensor": 8})
    assert tp8["est_decode_ms"] > rec["est_decode_ms"]
    two = run_plan(capsys, "--model", "llama3.1-405b", "--devices", "16", "--nodes", "2", "--network", "ib-ndr")
    assert two["recommended"]["mesh"]["axes"] == {"stage": 2, "tensor": 8}
    assert two["recommended"]["weights_bytes_per_device"] < 80e9 < 2 * two["recommended"]["weights_bytes_per_device"]


def test_roofline_step_time_by_hand():
    """Llama-3-70B tp8 decode at batch 1 on H100 is memory-bound: each GPU reads its 17.64 GB of weights
    and its KV cache at 3.35 TB/s, plus 2 x 80 + 1 all-reduces of 16 KiB (bf16 hidden 8192) at 450 GB/s
    with 2 x 7 hops of 0.1 us, the logits gather, and the LM head."""
    cfg = load_config("llama3-70b")
    mc = MeshConfig(axes={"tensor": 8})
    req = PL.Request(1, 4096, 256, "bf16", "bf16", 0.1)
    x = PL.evaluate(cfg, mc, check_layout(mc, cfg), PRESETS["h100-nvlink"], req)
    kv = 2 * 80 * 8192 * 1 * 128 * 2 / 8  # 8192 slots (4096 + 256 new, bucketed), one kv head per GPU
    weights = x["weights_bytes_per_device"]
    mem_ms = (weights + kv) / 3.35e12 * 1e3
    ar_ms = 161 * (2 * 7 / 8 * 8192 * 2 / 450e9 + 14 * 0.1e-6) * 1e3
    gather_ms = (7 / 8 * 128256 * 4 / 450e9 + 7 * 0.1e-6) * 1e3
    assert x["decode"]["bound"] == "memory"
    assert abs(x["decode"]["comm_ms"] - ar_ms - gather_ms) < 1e-9
    assert abs(x["est_decode_ms"] - (mem_ms + ar_ms + gather_ms)) / x["est_decode_ms"] < 0.01


def test_layout_time_grows_with_slower_links():
    """The roofline's communication term: the same layout is slower over PCIe than over NVLink, and a
    group that crosses a socket or node boundary pays that link, wherever the group starts."""
    cfg = load_config("llama3-70b")
    mc = MeshConfig(axes={"tensor": 8})
    req = PL.Request(1, 4096, 256, "bf16", "bf16", 0.1)
    rep = check_layout(mc, cfg)
    fast = PL.evaluate(cfg, mc, rep, PRESETS["a100-nvlink"], req)
    slow = PL.evaluate(cfg, mc, rep, PRESETS["pcie4-cross-socket"], req)
    assert slow["decode"]["comm_ms"] > 10 * fast["decode"]["comm_ms"]
    sock = PRESETS["pcie4-cross-socket"]
    dp_tp = MeshConfig(axes={"data": 2, "tensor": 4})
    assert PL.link_of(dp_tp, ("tensor",), sock).name == "pcie4"
    assert PL.link_of(dp_tp, ("data",), sock).name == "qpi-upi"
    from jaxpar.analysis.hardware import network
    two_nodes = PRESETS["h100-nvlink"].with_nodes(2, 3, network("roce"))  # 3 devices per node
    dp3_tp2 = MeshConfig(axes={"data": 3, "tensor": 2})  # tensor pairs {0,1} {2,3} {4,5}: {2,3} spans nodes
    assert PL.link_of(dp3_tp2, ("tensor",), two_nodes).name == "roce"
    assert PL.link_of(MeshConfig(axes={"data": 2, "tensor": 3}), ("tensor",), two_nodes).name == "nvlink4"


def test_every_preset_loads_and_a_user_file_works(tmp_path, capsys):
    figures = {"h100-nvlink": (80, 3350, 989, 450), "h200-nvlink": (141, 4800, 989, 450),
               "b200-nvlink": (180, 8000, 2250, 900), "a100-nvlink": (80, 2039, 312, 300),
               "a100-pcie": (80, 1935, 312, 32), "h100-pcie": (80, 2000, 756, 64),
               "pcie4-cross-socket": (80, 1935, 312, 32), "pcie5-cross-socket": (80, 2000, 756, 64),
               "tpu-v5e": (16, 819, 197, 50), "tpu-v5p": (95, 2765, 459, 100), "tpu-v6e": (32, 1640, 918, 112)}
    for name, (mem, hbm, tf, link) in figures.items():
        hw = load_hardware(name)
        got = (hw.memory_bytes / 1e9, hw.hbm_bytes_per_s / 1e9, hw.peak("bf16") / 1e12, hw.link_bytes_per_s / 1e9)
        assert got == (mem, hbm, tf, link), name
    assert [ln.name for ln in PRESETS["pcie4-cross-socket"].links] == ["pcie4", "qpi-upi"]
    f = tmp_path / "mine.yaml"
    f.write_text("memory_gb: 24\nhbm_gb_per_s: 1000\ntflops: {bf16: 165}\n"
                 "links:\n  - {name: pcie4, group: 2, gb_per_s: 32, latency_us: 1}\n")
    r = run_plan(capsys, "--model", "tiny-add", "--devices", "2", "--hardware", str(f), "--dtype", "float32")
    assert r["hardware"]["memory_bytes"] == 24e9 and r["recommended"]["fits"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny-add", "--hardware", "nope"], "neither a preset"),
    (["--model", "tiny-add", "--devices", "16"], "holds 8"),
    (["--model", "tiny-add", "--devices", "16", "--nodes", "2"], "--network"),
    (["--model", "tiny-add", "--devices", "12", "--nodes", "5", "--network", "roce"], "equal nodes"),
    (["--model", "tiny-add", "--context", "100000"], "context window"),
    (["--model", "tiny-add", "--dtype", "fp9"], "--dtype"),
    (["--params", "lots"], "--params"),
    (["--model", "tiny-add", "--network", "roce"], "--nodes"),
    (["--model", "tiny-add", "--write-mesh", "/nonexistent-dir/x.yaml"], "cannot write"),
    (["--model", "llama3-70b", "--devices", "1", "--write-mesh", "/tmp/jaxpar-never.yaml"], "no layout fits"),
    (["--model", "tiny-add", "--mesh", "tp8", "--devices", "4"], "only 4 devices"),
])
def test_plan_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        from jaxpar.tools import cli
        cli.run(plan_cli.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_bad_hardware_file_names_file_and_field(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("memory_gb: 24\nhbm_gb_per_s: -1\ntflops: {bf16: 1}\nlinks: [{group: 2, gb_per_s: 1}]\n")
    with pytest.raises(SystemExit) as e:
        from jaxpar.tools import cli
        cli.run(plan_cli.main, ["--model", "tiny-add", "--devices", "2", "--hardware", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert str(f) in err and "hbm_gb_per_s" in err


def test_json_schema_and_write_mesh(tmp_path, capsys):
    """SPEC's schema; the recommended layout saved with --write-mesh is a mesh file jaxpar loads."""
    out = tmp_path / "best.yaml"
    r = run_plan(capsys, "--model", "tiny-add", "--devices", "8", "--dtype", "float32", "--batch", "8",
                 "--context", "32", "--write-mesh", str(out))
    x = r["layouts"][0]
    for key in ("mesh", "weights_bytes_per_device", "kv_bytes_per_device", "fits", "est_prefill_ms",
                "est_decode_ms"):
        assert key in x
    assert set(x["prefill"]["collectives"]) == set(x["decode"]["collectives"]) == {
        "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"}
    import yaml
    from jaxpar.layout.mesh_file import load_mesh_file
    saved = load_mesh_file(str(out))
    assert saved.axes == r["recommended"]["mesh"]["axes"]
    import math
    assert parse_mesh(yaml.safe_load(out.read_text()), "x").device_count == \
        math.prod(r["recommended"]["mesh"]["axes"].values())
    assert os.path.getsize(out) > 0


def test_plan_reads_a_hugging_face_directory(tmp_path, capsys):
    """--model takes a Hugging Face directory: only its config.json is read (no weights needed)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_plan(capsys, "--model", str(tmp_path), "--devices", "8", "--mesh", "tp8")
    assert abs(r["sizing"]["params"] / 1e9 - 8.03) < 0.01  # Llama-3-8B
    assert r["layouts"][0]["weights_bytes_per_device"] * 8 > r["sizing"]["weights_bytes"]["bf16"]


def test_human_output_says_what_minimum_and_recommended_mean(capsys):
    """The rule-of-thumb minimum (weights x --kv-allowance, whatever the batch and context) and the
    recommended layout (fits this batch and context exactly) can disagree: 32 devices against a 16-device
    layout for Llama-3.1-405B in bf16 on two H100 nodes. The output says which number is which."""
    plan_cli.main(["--model", "llama3.1-405b", "--devices", "16", "--nodes", "2", "--network", "ib-ndr"])
    out = capsys.readouterr().out
    assert "reference 00" not in out
    assert ("minimum devices (a rule of thumb, not from --batch or --context): 32 = bf16 weights x --kv-allowance "
            "1.8 (the extra is room for the KV cache) = 1461.07 GB, rounded up to 1, 2, 4, 8 devices or whole "
            "nodes of 80.00 GB devices") in out
    assert "recommended: pp2_tp8_m1 on 16 devices:" in out
    assert "the fastest of the layouts above that fit, for this batch 1 and context 4096:" in out
    assert "(fewer than the rule-of-thumb minimum of 32: that rule sets aside 1.8 x the weights" in out
    plan_cli.main(["--params", "671B", "--dtype", "fp8", "--hardware", "b200-nvlink"])
    assert "rule of thumb: weights x --kv-allowance" in capsys.readouterr().out


def mixed_model():
    """Dense and MoE layers alternating, sliding and full attention alternating: one group of a two-layer unit
    repeated twice (model/groups.py)."""
    s, f = "sliding_attention", "full_attention"
    return load_config("tiny-add-moe").replace(num_hidden_layers=4, mlp_only_layers=[0, 2], sliding_window=8,
                                               layer_types=[s, f, s, f])


@pytest.mark.parametrize("mesh,unroll", [("dp2_ep4", False), ("tp2_ep4", True), ("pp2", False), ("sp4", True)])
def test_predicted_collectives_with_mixed_layer_kinds(mesh, unroll):
    """The communication model counts each layer kind's collectives (dense FFN all-reduces, expert dispatch and
    statistics on MoE layers only, statistics gathered per group under a pipeline): equal to the compiled
    program's, in the split form (every layer its own group) and the stacked one."""
    eng = engine(mesh, model=mixed_model(), unroll=unroll)
    assert eng.unrolled == unroll
    r = inspect_engine(eng, batch=4, prompt_len=16, max_new_tokens=16)
    assert_close(predicted(eng, r), r, (mesh, unroll))
    # the sliding layers' window rings and the full layers' pages, as the planner sizes them
    assert S.kv_bytes_per_device(eng.config, eng.model_layout.mesh_cfg, eng.kv_repeat, r["batch"], r["cache_len"],
                                 4) == r["kv_cache_bytes_per_device"]


def test_pipeline_pads_groups_the_stages_do_not_divide(tmp_path):
    """A group whose repeats do not divide by the stages (a dense first layer, then 2 MoE layers, on 2 stages)
    is padded with a repeat the pipeline skips: the single-device logits, whatever the padding holds; expert
    statistics only for the real layers; the planner's collectives, parameter and KV bytes equal the compiled
    program's (padding included); a checkpoint saved from it is in the model's own groups and loads anywhere."""
    import jax
    import numpy as np

    import jaxpar
    from conftest import mesh_path
    model = load_config("tiny-add-moe").replace(num_hidden_layers=3, mlp_only_layers=[0])
    tokens = [[3, 9, 27, 81, 243 % 256, 5, 7, 11]]
    want = engine("single", model=model).logits(tokens)
    eng = jaxpar.load(mesh=mesh_path("pp2"), model=model)  # its own: the test writes into its parameters
    assert [(g.repeats, g.slots) for g in eng.programs.groups] == [(1, 2), (2, 2)]
    assert np.abs(eng.logits(tokens) - want).max() <= 1e-5
    noisy = jax.tree.map(lambda a: a, eng.run_params)  # the padding slot (group 0, repeat 1) made nonzero
    noisy["group0"] = jax.tree.map(lambda a: a.at[1].set(0.5), noisy["group0"])
    eng.run_params = noisy
    assert np.abs(eng.logits(tokens) - want).max() <= 1e-5
    r = inspect_engine(eng, batch=4, prompt_len=16, max_new_tokens=16)
    assert_close(predicted(eng, r), r, "pp2 padded")
    mc = eng.model_layout.mesh_cfg
    assert S.params_per_device(eng.config, mc, eng.kv_repeat) * 4 == r["params_bytes_per_device"]
    assert S.kv_bytes_per_device(eng.config, mc, eng.kv_repeat, r["batch"], r["cache_len"], 4) == \
        r["kv_cache_bytes_per_device"]
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    ref = engine("single", model=model)
    kw = dict(max_new_tokens=4, stop_at_eos=False)
    assert eng.generate_tokens(prompts, **kw) == ref.generate_tokens(prompts, **kw)
    ex = eng.last_stats["experts"]  # the two MoE layers' statistics, the padding slot's left out
    assert ex["tokens_per_expert"] == ref.last_stats["experts"]["tokens_per_expert"]
    assert ex["assignments"] == (8 + 2 * 3) * model.num_experts_per_tok * 2  # prompts, then 3 decoded per row
    eng.save(str(tmp_path / "ckpt"))
    back = jaxpar.load(mesh=mesh_path("single"), checkpoint=str(tmp_path / "ckpt"))
    assert back.params["group0"]["block0"]["attn"]["wq"].shape[0] == 1
    assert np.abs(back.logits(tokens) - want).max() <= 1e-5
