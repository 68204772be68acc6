"""Streaming: on_token gets every token, in order, while generation is still running (between the bounded
decode programs, on the host), the same tokens as without streaming; what on_token raises reaches the caller
as itself and frees the request's pages, on multi-device meshes too; the CLI stops cleanly when its reader
goes away."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, engine, mesh_path

PROMPTS = ["123+456=", "7+8=", "999+1=", "40+305=", "5+5="]


@pytest.mark.parametrize("mesh", ["single", "pp2", "ep8"])  # seq meshes: tests/test_serving.py
def test_streaming_gives_the_tokens_and_statistics_of_a_plain_call(mesh):
    eng = engine(mesh)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    for kw in (dict(max_new_tokens=6),  # greedy, stops at end-of-sequence
               dict(max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.95, seed=3),  # sampled
               dict(max_new_tokens=6, stop_at_eos=False)):  # past end-of-sequence
        plain = eng.generate_tokens(ids, **kw)
        experts = eng.last_stats.get("experts")
        seen = {}
        streamed = eng.generate_tokens(ids, on_token=lambda r, t: seen.setdefault(r, []).append(t), **kw)
        assert plain == streamed == [seen.get(i, []) for i in range(len(ids))], (mesh, kw)
        assert experts == eng.last_stats.get("experts"), (mesh, kw)
        if kw == dict(max_new_tokens=6):
            assert eng.tokenizer.decode(plain[0]) == "579"
    assert ("experts" in eng.last_stats) == ("ep" in mesh)


def test_tokens_arrive_while_generation_runs():
    """Each token reaches on_token right after the decode program that made it: the first tokens arrive
    before the last program has run (not all at the end)."""
    eng = engine("dp2_tp4")
    at = []
    out = eng.generate_tokens([eng.tokenizer.encode("1+1=")], max_new_tokens=30, stop_at_eos=False,
                              on_token=lambda r, t: at.append(eng.runner.programs_run))
    assert len(out[0]) == 30 and len(at) == 30
    steps = eng.serving.decode_steps
    assert at[0] < at[-1] and len(set(at)) >= 30 // steps  # one batch of tokens per decode program
    assert at == sorted(at)


def test_generation_stops_at_the_context_window():
    eng = engine("single")
    ctx = eng.config.max_position_embeddings
    ids = [[eng.tokenizer.bos_id] + [49] * (ctx - 4), eng.tokenizer.encode("1+1=")]
    out = eng.generate_tokens(ids, max_new_tokens=10, stop_at_eos=False)
    assert len(out[0]) == 3 and len(out[1]) == 10
    assert eng.last_stats["finish_reasons"] == ["length", "length"]


class Stop(Exception):
    pass


@pytest.mark.parametrize("mesh", ["single", "tp2", "dp2_tp4"])
def test_on_token_exceptions_reach_the_caller_and_calls_do_not_mix(mesh):
    """What on_token raises (an exception, KeyboardInterrupt) comes back as itself at once, the request's pages
    are freed and the engine keeps working; a call made from inside another's on_token gets its own tokens."""
    eng = engine(mesh)
    ids = [eng.tokenizer.encode("123+456="), eng.tokenizer.encode("1+1=")]
    want = eng.generate_tokens(ids, max_new_tokens=6)
    for exc in (Stop("from on_token"), KeyboardInterrupt()):
        def fail(row, tok, exc=exc):
            raise exc
        with pytest.raises(type(exc)):
            eng.generate_tokens(ids, max_new_tokens=6, on_token=fail)
        assert eng.scheduler.pool.in_use() == 0 and not eng.scheduler.has_work
    outer, inner = [], []

    def nested(row, tok):
        outer.append((row, tok))
        if len(outer) == 1:
            assert eng.generate_tokens(ids, max_new_tokens=6, on_token=lambda r, t: inner.append((r, t))) == want
    assert eng.generate_tokens(ids, max_new_tokens=6, on_token=nested) == want
    for got in (outer, inner):
        assert [[t for r, t in got if r == i] for i in range(len(ids))] == want


def test_cli_stops_cleanly_when_its_reader_goes_away():
    """`generate ... | head -c 1` on a multi-device mesh: the command ends promptly (no collective left
    waiting, no abort), whether its last writes found the pipe open or closed."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "jaxpar.generate", "--fake-devices", "8", "--mesh", mesh_path("tp2"),
                          "--prompt", "123+456=", "--max-new-tokens", "8"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert p.stdout.read(1) == b"5"
        p.stdout.close()
        err = p.stderr.read().decode()
        code = p.wait(timeout=120)
    finally:
        p.kill()
    assert code in (0, 141), (code, err[-2000:])
    assert "Traceback" not in err
