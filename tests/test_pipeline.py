"""Pipeline parallelism: the same answers as `single`; each stage holds its layers and KV cache only; the
compiled step moves activations between neighbouring stages, (M+P-1) ticks of them, never weights."""
import jax
import numpy as np
import pytest

import jaxpar
from conftest import engine, mesh_path
from jaxpar.engine import params as P
from jaxpar.errors import LayoutError
from jaxpar.inspect import inspect_engine
from jaxpar.layout.mesh_file import parse_mesh
from test_meshes import PROMPTS, token_batch

INLINE = {"pp2_dp2_tp2": {"axes": {"stage": 2, "data": 2, "tensor": 2}, "microbatches": 2},
          "pp4_m1": {"axes": {"stage": 4}, "microbatches": 1},
          "pp2_m8": {"axes": {"stage": 2}, "microbatches": 8},
          "pp2_sp2_tp2": {"axes": {"stage": 2, "seq": 2, "tensor": 2}, "attention": "ring", "microbatches": 2}}
def pp_engine(name):
    return engine(name, INLINE.get(name))


@pytest.mark.parametrize("name", list(INLINE))
def test_pipelined_layouts_match_single(name):
    ref, eng = engine("single"), pp_engine(name)
    tokens, real = token_batch(ref)
    assert np.abs(eng.logits(tokens) - ref.logits(tokens))[real].max() <= 1e-4
    assert eng.generate(PROMPTS, max_new_tokens=6) == [str(eval(p[:-1])) for p in PROMPTS]


def test_pipeline_with_experts_matches_single():
    import os
    from conftest import ROOT
    moe = os.path.join(ROOT, "configs", "tiny-moe.yaml")
    ref = jaxpar.load(mesh=mesh_path("single"), model=moe, devices=jax.devices()[:1])
    eng = jaxpar.load(mesh=parse_mesh({"axes": {"stage": 2, "expert": 4}, "microbatches": 2}, "pp2_ep4"), model=moe)
    tokens = np.random.RandomState(0).randint(0, 512, (5, 13))
    assert np.abs(eng.logits(tokens) - ref.logits(tokens)).max() <= 1e-4
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(max_new_tokens=5, stop_at_eos=False)
    assert eng.generate_tokens(prompts, **kw) == ref.generate_tokens(prompts, **kw)
    assert eng.last_stats["experts"]["tokens_per_expert"] == ref.last_stats["experts"]["tokens_per_expert"]


@pytest.mark.parametrize("mesh,p,m", [("pp2", 2, 4), ("pp4", 4, 4), ("pp2_tp4", 2, 4), ("pp2_m8", 2, 8),
                                      ("pp4_m1", 4, 1)])
def test_stages_pass_activations_only(mesh, p, m):
    eng = pp_engine(mesh)
    r = inspect_engine(eng, batch=8, prompt_len=16)
    cfg = eng.config
    d, tp = cfg.hidden_size, eng.layout.size("heads")
    for step, seq in (("prefill", r["prompt_len"]), ("decode", 1)):
        c = r[step]["collectives"]
        act = r["batch"] // m * seq * d * 4  # one microbatch's activations
        assert c["collective-permute"] == {"count": m + p - 1, "bytes": (m + p - 1) * act}, (step, c)
        # the last stage's output reaches every stage once, the vocab-parallel embedding (vocab split over
        # stage x tensor) sums once; with tensor, TP's 2 all-reduces per layer and tick come on top
        tp_reduces = 2 * cfg.num_hidden_layers // p * (m + p - 1) if tp > 1 else 0
        assert c["all-reduce"]["count"] == 2 + tp_reduces, (step, c)
        assert c["all-gather"] == {"count": 1, "bytes": r["batch"] * cfg.vocab_size * 4}  # sampling's logits
        # gather; never weights


@pytest.mark.parametrize("mesh,p", [("pp2", 2), ("pp4", 4), ("pp2_tp4", 2)])
def test_each_stage_holds_its_layers_and_their_cache(mesh, p):
    eng = engine(mesh)
    ref = engine("single")
    layers = {k: v for k, v in ref.params.items() if k == "layers"}
    rest = {k: v for k, v in ref.params.items() if k != "layers"}
    tp = eng.layout.size("heads")
    r, r1 = inspect_engine(eng, batch=8, prompt_len=16), inspect_engine(ref, batch=8, prompt_len=16)
    if tp == 1:  # the layers and the vocabulary (embedding, LM head) split over stages; the final norm is not
        norm = P.bytes_per_device(rest["norm"])
        assert r["params_bytes_per_device"] == (P.bytes_per_device(layers) + P.bytes_per_device(rest) - norm) // p + norm
    else:
        assert r["params_bytes_per_device"] < P.bytes_per_device(ref.params) / p
    assert r["kv_cache_bytes_per_device"] * p * tp == r1["kv_cache_bytes_per_device"] * eng.kv_repeat


def test_every_stage_holds_a_layer():
    """Groups the stages do not divide are padded (tests/test_plan.py), but a stage holding nothing but padding
    is refused, with the most stages the model takes."""
    with pytest.raises(LayoutError, match=r"pp8: axes stage=8: the last pipeline stage would hold no layer of the "
                                          r"model \(4 layers: layers 0-3: \(full/dense\) x 4\); use at most 4 stages"):
        jaxpar.load(mesh=parse_mesh({"axes": {"stage": 8}}, "pp8"))


def test_batch_pads_to_whole_microbatches():
    eng = engine("pp2")
    assert eng.batch_multiple == 4
    assert eng.generate(["1+1="], max_new_tokens=3) == ["2"]
    assert eng.scheduler.rows_bucket(1) == 4 and eng.sizes.slots % 4 == 0  # one prompt fills 4 microbatch rows


@pytest.mark.parametrize("axes", [{"stage": 2, "tensor": 4}, {"stage": 2, "expert": 4}])
def test_bfloat16_pipelines_combined_with_other_axes(axes):
    """bf16 reductions inside the pipeline's shard_map run in float32 (XLA:CPU aborts otherwise)."""
    mesh = parse_mesh({"axes": axes, "microbatches": 2}, "bf16")
    model = "tiny-add-moe" if "expert" in axes else None
    want = jaxpar.load(mesh=mesh_path("single"), model=model, dtype="bfloat16", devices=jax.devices()[:1])
    eng = jaxpar.load(mesh=mesh, model=model, dtype="bfloat16")
    assert eng.generate(PROMPTS[:3], max_new_tokens=6) == want.generate(PROMPTS[:3], max_new_tokens=6)
