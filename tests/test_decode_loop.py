"""Whole-loop decoding (every decode step in one compiled while loop, on-device sampling and stopping) gives
exactly the tokens of the streaming path (one program per token, each token to the host as it comes)."""
import pytest

import jaxpar
from conftest import engine, mesh_path

PROMPTS = ["123+456=", "7+8=", "999+1=", "40+305=", "5+5="]


@pytest.mark.parametrize("mesh", ["single", "sp4", "pp2", "ep8"])
def test_whole_loop_and_streaming_give_the_same_tokens(mesh):
    eng = engine(mesh)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    for kw in (dict(max_new_tokens=6),  # greedy, stops at end-of-sequence
               dict(max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.95, seed=3),  # sampled (same buckets)
               dict(max_new_tokens=6, stop_at_eos=False)):  # past end-of-sequence
        whole = eng.generate_tokens(ids, **kw)
        assert eng.last_stats["whole_loop"]
        experts = eng.last_stats.get("experts")
        streamed = eng.generate_tokens(ids, whole_loop=False, **kw)
        assert not eng.last_stats["whole_loop"]
        assert whole == streamed, (mesh, kw)
        assert experts == eng.last_stats.get("experts"), (mesh, kw)
    assert eng.tokenizer.decode(whole[0])  # sanity: real tokens came back


def test_whole_loop_stops_at_the_context_window():
    """A prompt near the end of the context window: both paths stop when the window is full."""
    eng = engine("single")
    ctx = eng.config.max_position_embeddings
    ids = [[eng.tokenizer.bos_id] + [49] * (ctx - 4), eng.tokenizer.encode("1+1=")]
    whole = eng.generate_tokens(ids, max_new_tokens=10, stop_at_eos=False)
    streamed = eng.generate_tokens(ids, max_new_tokens=10, stop_at_eos=False, whole_loop=False)
    assert whole == streamed and len(whole[0]) == 3 and len(whole[1]) == 10


@pytest.mark.parametrize("mesh", ["single", "dp2_tp4"])
def test_streaming_callback_runs_inside_the_whole_loop(mesh):
    """on_token gets every token of every row, in order, while the compiled loop is still running (all but
    the last step's tokens arrive through the loop's host callback); the host-loop path gives the same."""
    eng = engine(mesh)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    seen, in_loop = {}, []

    def on_token(row, tok):
        seen.setdefault(row, []).append(tok)
        in_loop.append(bool(eng.steps.sinks))  # a loop's host callback is registered: inside the loop
    out = eng.generate_tokens(ids, max_new_tokens=6, on_token=on_token)
    assert eng.last_stats["whole_loop"]
    assert [seen.get(i, []) for i in range(len(ids))] == out
    assert sum(in_loop) >= len(in_loop) - len(ids) > 0  # at most one column delivered after the loop
    host_seen = {}
    assert eng.generate_tokens(ids, max_new_tokens=6, whole_loop=False,
                               on_token=lambda r, t: host_seen.setdefault(r, []).append(t)) == out
    assert not eng.last_stats["whole_loop"] and host_seen == seen


class Stop(Exception):
    pass


def test_on_token_exceptions_reach_the_caller_and_calls_do_not_mix():
    """What on_token raises comes back as itself (not as XLA's callback error) and leaves the engine usable;
    a streaming call made from inside another's on_token gets its own tokens."""
    eng = jaxpar.load(mesh=mesh_path("single"))  # its own engine: the failed call gives its cache away
    ids = [eng.tokenizer.encode("123+456=")]
    want = eng.generate_tokens(ids, max_new_tokens=6)

    def fail(row, tok):
        raise Stop("from on_token")
    with pytest.raises(Stop, match="from on_token"):
        eng.generate_tokens(ids, max_new_tokens=6, on_token=fail)
    assert not eng.steps.sinks
    outer, inner = [], []

    def nested(row, tok):
        outer.append(tok)
        if len(outer) == 1:
            assert eng.generate_tokens(ids, max_new_tokens=6, on_token=lambda r, t: inner.append(t)) == want
    assert eng.generate_tokens(ids, max_new_tokens=6, on_token=nested) == want
    assert outer == want[0] and inner == want[0]
