"""Engine behaviour: one compilation per shape bucket, donated decode state, streaming, stopping."""
import jax
import pytest

from conftest import engine

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)


def compiles_during(fn):
    n = len(COMPILES)
    out = fn()
    return len(COMPILES) - n, out


@pytest.mark.parametrize("mesh", ["single", "dp2_tp4"])
def test_decode_compiles_once_per_bucket(mesh):
    eng = engine(mesh)
    ids = [[256, 49, 43, 50, 61]]
    run = lambda n, **kw: eng.generate_tokens(ids, max_new_tokens=n, stop_at_eos=False, **kw)  # noqa: E731
    run(2)  # prefill and decode for this bucket (compiled here or by an earlier test)
    few, _ = compiles_during(lambda: run(2))
    many, out = compiles_during(lambda: run(11))  # same buckets, five times the decode steps
    assert len(out[0]) == 11
    assert few == many == 0
    # sampling parameters are per-row data of the same programs: nothing compiles for them
    n1, _ = compiles_during(lambda: run(8, temperature=0.7, seed=1))
    n2, _ = compiles_during(lambda: run(8, temperature=0.9, seed=2, top_k=5, top_p=0.9))
    assert n1 == n2 == 0


def test_new_bucket_compiles_and_then_is_reused():
    eng = engine("tp2")
    ids = [[256] + [49] * 20]  # prompt bucket 32: not used elsewhere in this file
    n1, _ = compiles_during(lambda: eng.generate_tokens(ids, max_new_tokens=3, stop_at_eos=False))
    n2, _ = compiles_during(lambda: eng.generate_tokens(ids, max_new_tokens=9, stop_at_eos=False))
    assert n1 >= 1 and n2 == 0


def test_decode_state_is_donated():
    """Every program takes the decode state donated and returns it updated in place: no copy of the KV pools."""
    eng = engine("tp4")
    ids = [[256, 49, 43, 49, 61]]
    eng.generate_tokens(ids, max_new_tokens=2)
    old = jax.tree.leaves(eng.runner.state)
    pools = jax.tree.leaves(eng.runner.state.cache)
    eng.generate_tokens(ids, max_new_tokens=2)
    assert all(x.is_deleted() for x in old)
    assert len(pools) == (2 * eng.config.num_hidden_layers if eng.unrolled else 2)
    assert [x.shape for x in jax.tree.leaves(eng.runner.state)] == [x.shape for x in old]


def test_streaming_matches_returned_tokens_and_stops_at_eos():
    eng = engine("single")
    seen = []
    out = eng.generate_tokens([[256] + list(b"12+30=")], max_new_tokens=10, on_token=lambda r, t: seen.append(t))
    assert seen == out[0]
    assert eng.tokenizer.decode(out[0]) == "42"  # and the end-of-sequence token was not returned
    assert len(out[0]) < 10


def test_max_new_tokens_and_context_window_bound_the_output():
    eng = engine("single")
    ids = [[256] + list(b"1+1=")]
    assert len(eng.generate_tokens(ids, max_new_tokens=1)[0]) == 1
    ctx = eng.config.max_position_embeddings
    for prompt_len, room in ((ctx - 3, 3), (ctx - 1, 1), (ctx, 0)):
        out = eng.generate_tokens([[256] + [49] * (prompt_len - 1)], max_new_tokens=50, stop_at_eos=False)
        assert len(out[0]) == room, (prompt_len, len(out[0]))  # prompt + new tokens fill the window exactly


def test_config_end_of_sequence_ids_stop_generation():
    """The model config's eos_token_id decides when generation stops."""
    import jaxpar
    eng = engine("single")
    first = eng.generate_tokens([[256] + list(b"12+30=")], max_new_tokens=4)[0]
    other = jaxpar.load(mesh="single", model=eng.config.replace(eos_token_id=[first[1], 257]),
                        devices=jax.devices()[:1])
    other.params = eng.params
    assert other.generate_tokens([[256] + list(b"12+30=")], max_new_tokens=4)[0] == first[:1]
