"""Mixture of experts under expert parallelism: the all-to-all dispatch gives the single-device answer
(dropless or with ample capacity), moves the bytes the formula predicts and never gathers weights; a small
capacity drops assignments and the statistics report them."""
import os

import jax
import numpy as np
import pytest

import jaxpar
from conftest import ROOT, engine, mesh_path
from jaxpar.engine import params as P
from jaxpar.errors import JaxparError, LayoutError
from jaxpar.inspect import inspect_engine
from jaxpar.layout.mesh_file import parse_mesh
from jaxpar.parallel.experts import capacity

MOE = os.path.join(ROOT, "configs", "tiny-moe.yaml")
EP_MESHES = ["ep8", "dp2_ep4", "tp2_ep4"]
INLINE = {"dp2_ep2_tp2": {"axes": {"data": 2, "expert": 2, "tensor": 2}},
          "ep4_ample": {"axes": {"expert": 4}, "capacity_factor": 4.0},  # E/k: capacity = all tokens
          "ep2_sp2": {"axes": {"expert": 2, "seq": 2}, "attention": "ring"}}
TOKENS = np.random.RandomState(3).randint(0, 512, (5, 13))
def moe_engine(name, model=MOE):
    return engine(name, INLINE.get(name), model=model)


@pytest.mark.parametrize("name", EP_MESHES + list(INLINE))
def test_expert_parallel_logits_match_single(name):
    want, got = moe_engine("single").logits(TOKENS), moe_engine(name).logits(TOKENS)
    assert np.abs(got - want).max() <= 1e-4, name


@pytest.mark.parametrize("name", EP_MESHES + ["ep4_ample"])
def test_expert_parallel_generation_matches_single_and_drops_nothing(name):
    prompts = [list(np.random.RandomState(i).randint(0, 512, n)) for i, n in enumerate((5, 11, 3))]
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    ref = moe_engine("single")
    want = ref.generate_tokens(prompts, **kw)
    eng = moe_engine(name)
    assert eng.generate_tokens(prompts, **kw) == want
    ex = eng.last_stats["experts"]
    assert ex["dropped_total"] == 0
    assert ex["tokens_per_expert"] == ref.last_stats["experts"]["tokens_per_expert"]
    # every real token (prompt + 5 decoded per row) is routed to k experts in each layer; padding never is
    cfg = eng.config
    routed = sum(map(len, prompts)) + 5 * len(prompts)
    assert ex["assignments"] == routed * cfg.num_experts_per_tok * cfg.num_hidden_layers


@pytest.mark.parametrize("mesh,ep,dp", [("ep8", 8, 1), ("dp2_ep4", 4, 2), ("tp2_ep4", 4, 1)])
@pytest.mark.parametrize("cf", [0.0, 1.25])
def test_two_all_to_alls_per_layer_of_the_capacity_buffers(mesh, ep, dp, cf):
    base = parse_mesh({**__import__("yaml").safe_load(open(mesh_path(mesh))), "capacity_factor": cf}, mesh)
    eng = jaxpar.load(mesh=base, model=MOE)
    r = inspect_engine(eng, batch=16, prompt_len=16)
    cfg = eng.config
    e, k, d, layers = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.num_hidden_layers
    for step, seq in (("prefill", r["prompt_len"]), ("decode", 1)):
        tokens = r["batch"] // (dp * ep) * seq  # per device
        c = r[step]["collectives"]
        buffer = e * capacity(tokens, k, e, cf) * d * 4  # [experts, capacity, hidden] float32
        assert c["all-to-all"] == {"count": 2 * layers, "bytes": 2 * layers * buffer}, (step, c)
        # about tokens * k * hidden * bytes each, plus the capacity slack
        assert buffer >= tokens * k * d * 4 and (cf == 0 or buffer <= 1.25 * tokens * k * d * 4 + e * d * 4)
        # no weights are gathered: with tensor, the only all-gather is sampling's gather of the vocab shards
        assert c["all-gather"]["count"] == (1 if eng.layout.size("vocab") > 1 else 0), c


@pytest.mark.parametrize("name,ep", [("ep8", 8), ("dp2_ep4", 4), ("tp2_ep4", 4)])
def test_expert_weights_per_device_are_total_over_expert_axis(name, ep):
    eng = moe_engine(name)
    experts = {k: v for k, v in eng.params["group0"]["block0"]["mlp"].items() if k.startswith("w_")}
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in experts.values())
    tp = eng.layout.size("mlp")
    assert P.bytes_per_device(experts) * ep * tp == total


def test_small_capacity_drops_and_is_reported(capsys):
    from jaxpar import generate
    mesh = os.path.join(ROOT, "tests", "data", "ep8_tight.yaml")
    generate.main(["--mesh", mesh, "--model", MOE, "--prompt", "a longer prompt so experts overflow",
                   "--prompt", "hi", "--max-new-tokens", "4", "--stats"])
    err = capsys.readouterr().err
    assert "expert load:" in err and "layer 3: tokens per expert" in err
    dropped = int(err.split("assignments, ")[1].split(" dropped")[0])
    assert dropped > 0, err
    eng = jaxpar.load(mesh=mesh, model=MOE)
    eng.generate_tokens([[1] * 30, [2]], max_new_tokens=2)
    ex = eng.last_stats["experts"]
    assert ex["dropped_total"] == sum(ex["dropped"]) > 0
    assert ex["assignments"] == sum(map(sum, ex["tokens_per_expert"]))


def test_capacity_rule():
    assert capacity(16, 2, 8, 0.0) == 16  # dropless: worst case, every token to one expert
    assert capacity(16, 2, 8, 1.0) == 4 and capacity(16, 2, 8, 1.25) == 5
    assert capacity(1, 2, 8, 1.0) == 1 and capacity(16, 2, 8, 100.0) == 16
    assert capacity(200, 2, 8, 1.1) == 55  # 1.1 * 200 * 2 / 8 is 55.000000000000007 in floating point


def test_layouts_the_model_cannot_take_are_refused():
    with pytest.raises(LayoutError, match=r"m3: axes expert=3: model num_local_experts=8 .* not divisible by 3"):
        jaxpar.load(mesh=parse_mesh({"axes": {"expert": 3}}, "m3"), model=MOE)
    with pytest.raises(LayoutError, match=r"ep8.yaml: axes expert=8: expert parallelism needs a mixture-of-experts"):
        jaxpar.load(mesh=mesh_path("ep8"), model="tiny-add")
    with pytest.raises(JaxparError, match=r"capacity_factor must be a number >= 0"):
        parse_mesh({"axes": {"expert": 8}, "capacity_factor": -1}, "neg")
    cfg = moe_engine("single").config
    with pytest.raises(JaxparError, match=r"num_experts_per_tok=9 must be between 1 and num_local_experts=8"):
        from jaxpar.config import config_from_dict
        config_from_dict({**cfg.to_dict(), "num_experts_per_tok": 9}, "cfg")


# ---- the embedded mixture-of-experts model ---------------------------------------------------------------
PROBLEMS = ["123+456=", "7+8=", "999+1=", "40+305=", "5+5="]


@pytest.mark.parametrize("mesh", ["single", "ep8", "dp2_ep4", "tp2_ep4", "tp4"])
def test_tiny_add_moe_adds_on_every_mesh(mesh):
    eng = moe_engine(mesh, model="tiny-add-moe")
    out = eng.generate(PROBLEMS, max_new_tokens=6)
    assert out == [str(eval(p[:-1])) for p in PROBLEMS]
    assert eng.last_stats["experts"]["dropped_total"] == 0


def test_expert_meshes_default_to_the_moe_model():
    eng = jaxpar.load(mesh=mesh_path("ep8"))
    assert eng.config.num_local_experts == 8 and eng.config.num_experts_per_tok == 2
    assert jaxpar.load(mesh=mesh_path("tp2")).config.num_local_experts == 0


def test_trained_moe_spreads_load_over_experts():
    """Trained with the load-balancing loss: every expert gets work, no expert takes over half of it."""
    eng = moe_engine("ep8", model="tiny-add-moe")
    eng.generate([f"{a}+{b}=" for a, b in zip(range(100, 164), range(300, 364))], max_new_tokens=6)
    load = np.array(eng.last_stats["experts"]["tokens_per_expert"])
    assert (load > 0).all() and (load.max(axis=1) < 0.5 * load.sum(axis=1)).all(), load


def test_upcycling_starts_from_the_dense_function():
    """Sparse upcycling with no noise: each expert is the dense MLP and the top-k weights sum to 1, so the
    mixture computes exactly the dense model; with noise it does not."""
    from jaxpar.config import load_config
    from jaxpar.train.add import upcycle
    one = jax.devices()[:1]
    dense = jaxpar.load(mesh=mesh_path("single"), devices=one)
    moe = jaxpar.load(mesh=mesh_path("single"), model=load_config("tiny-add-moe"), devices=one)
    tokens = np.array([dense.tokenizer.encode("123+456=579")])
    want = dense.logits(tokens)
    for noise, close in ((0.0, True), (0.05, False)):
        moe.params = jax.device_put(upcycle(dense.params, moe.params, noise, 0), one[0])
        diff = np.abs(moe.logits(tokens) - want).max()
        assert (diff <= 1e-5) == close, (noise, diff)
