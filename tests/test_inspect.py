"""The compiled programs move exactly the bytes the textbook formula says (seed 001: TP does 2 all-reduces
per layer of B·S·hidden·bytes; here plus one for the vocab-parallel embedding)."""
import numpy as np
import pytest

from conftest import engine
from jaxpar.engine import params as P
from jaxpar.inspect import inspect_engine


def total_param_bytes(eng):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in
               __import__("jax").tree.leaves(P.shapes(eng.config, eng.kv_repeat)))


@pytest.mark.parametrize("mesh,tp,dp", [("tp2", 2, 1), ("tp4", 4, 1), ("tp8", 8, 1), ("dp2_tp4", 4, 2)])
@pytest.mark.parametrize("batch,prompt_len", [(2, 16), (4, 32)])
def test_tensor_parallel_collectives_match_formula(mesh, tp, dp, batch, prompt_len):
    eng = engine(mesh)
    r = inspect_engine(eng, batch=batch, prompt_len=prompt_len)
    cfg = eng.config
    layers, hidden, nbytes = cfg.num_hidden_layers, cfg.hidden_size, 4
    local_batch = r["batch"] // dp
    for step, seq in (("prefill", r["prompt_len"]), ("decode", 1)):
        c = r[step]["collectives"]
        ar = c["all-reduce"]
        # the decode loop's condition: whether any slot still runs, one boolean over the data split
        loop = int(step == "decode" and dp > 1)
        assert ar["count"] == 2 * layers + 1 + loop, (step, c)
        assert ar["bytes"] == (2 * layers + 1) * local_batch * seq * hidden * nbytes + loop, (step, c)
        # sampling gathers the vocab-sharded logits of the last position once; weights are never gathered
        assert c["all-gather"] == {"count": 1, "bytes": local_batch * cfg.vocab_size * 4}, (step, c)
        assert c["reduce-scatter"]["count"] == c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0


@pytest.mark.parametrize("mesh", ["single", "dp8"])
def test_data_parallel_moves_nothing(mesh):
    """Nothing but, on dp8, the decode loop's one-byte condition (whether any slot still runs)."""
    r = inspect_engine(engine(mesh), batch=8, prompt_len=16)
    assert all(v["count"] == 0 for v in r["prefill"]["collectives"].values()), r["prefill"]
    loop = {"count": 1, "bytes": 1} if mesh == "dp8" else {"count": 0, "bytes": 0}
    assert r["decode"]["collectives"]["all-reduce"] == loop
    assert all(v["count"] == 0 for op, v in r["decode"]["collectives"].items() if op != "all-reduce"), r["decode"]


@pytest.mark.parametrize("mesh,tp", [("single", 1), ("dp8", 1), ("tp2", 2), ("tp4", 4), ("tp8", 8), ("dp2_tp4", 4)])
def test_memory_per_device_is_total_over_shards(mesh, tp):
    eng = engine(mesh)
    cfg = eng.config
    r = inspect_engine(eng, batch=8, prompt_len=16)
    # params: everything but the norm weights is split over tensor; kv heads are replicated when tp > kv heads
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 4
    total = total_param_bytes(eng)
    assert eng.kv_repeat == max(1, tp // cfg.kv_heads)
    assert r["params_bytes_per_device"] == (total - norms) // tp + norms
    # KV cache: batch over data, (replicated) kv heads over tensor
    dp = eng.model_layout.mesh_cfg.size("data")
    kv_total = 2 * cfg.num_hidden_layers * r["batch"] * r["cache_len"] * cfg.kv_heads * cfg.head_size * 4
    # each device holds its batch slice of exactly max(1, kv_heads / tp) kv heads
    assert r["kv_cache_bytes_per_device"] == kv_total * eng.kv_repeat // (dp * tp)


@pytest.mark.parametrize("unroll", [False, True])
def test_inspect_counts_loop_trips(unroll):
    """Scanned layers compile to one while loop whose body's collectives count once per layer; unrolled
    layers (the CPU default) repeat them in the program: the same count either way."""
    from jaxpar.analysis.hlo import collectives
    eng = engine("tp2", unroll=unroll)
    text = eng.programs.logits.lower(eng.run_params, np.zeros((1, 16), np.int32), np.ones((1, 16), bool)).compile().as_text()
    assert ("known_trip_count" in text) == (not unroll)
    assert collectives(text)["all-reduce"]["count"] == 2 * eng.config.num_hidden_layers + 1


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ags = (f32[2,8]{1,0}, f32[4,8]{1,0}) all-gather-start(%y), dimensions={0}
  %agd = f32[4,8]{1,0} all-gather-done(%ags)
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %agd)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[16]) -> f32[4,8] {
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %cp = bf16[16]{0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
  %rs = (f32[2]{0}, bf16[4]{0}) reduce-scatter(%u, %v), dimensions={0}, to_apply=%add
  ROOT %r = f32[4,8] get-tuple-element(%w), index=1
}
"""


def test_hlo_parser_counts_trips_async_pairs_and_tuples():
    from jaxpar.analysis.hlo import collectives
    c = collectives(HLO)
    assert c["all-reduce"] == {"count": 6, "bytes": 6 * 4 * 8 * 4}
    assert c["all-gather"] == {"count": 6, "bytes": 6 * 4 * 8 * 4}  # the -done result, once per pair
    assert c["collective-permute"] == {"count": 1, "bytes": 32}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 8 + 8}
    assert c["all-to-all"] == {"count": 0, "bytes": 0}


def test_program_size_does_not_grow_with_depth():
    """Scanned (unroll=False, the default on GPU/TPU): 2 and 12 layers compile to the same number of HLO
    instructions."""
    import jaxpar
    from jaxpar.config import ModelConfig
    sizes = []
    for layers in (2, 12):
        cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        eng = jaxpar.load(mesh="tp2", model=cfg, unroll=False)
        text = eng.programs.logits.lower(eng.run_params, np.zeros((1, 8), np.int32), np.ones((1, 8), bool)).compile().as_text()
        sizes.append(sum(1 for line in text.splitlines() if " = " in line))
    assert sizes[0] == sizes[1], sizes
