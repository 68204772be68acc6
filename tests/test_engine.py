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
    assert len(pools) == (eng.config.num_hidden_layers if eng.unrolled else 1)
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


# ---- python -m jaxpar.generate, in-process on the session's engines ---------------------------------------------
def run_generate(argv, capsys, monkeypatch, eng=None):
    from jaxpar import generate
    from jaxpar.tools import cli
    monkeypatch.setattr(cli, "load_engine", lambda args: eng or engine("single"))
    generate.main(["--mesh", "single"] + argv)
    return capsys.readouterr()


def test_prompts_file_plain_text_and_stdin(tmp_path, capsys, monkeypatch):
    import io
    f = tmp_path / "prompts.txt"
    f.write_text("123+456=\n\n12+30=\n")  # the blank line is skipped
    out = run_generate(["--prompts-file", str(f)], capsys, monkeypatch)
    assert out.out == "579\n42\n" and out.err == ""
    monkeypatch.setattr("sys.stdin", io.StringIO("12+30=\n"))
    assert run_generate(["--prompts-file", "-"], capsys, monkeypatch).out == "42\n"


def test_prompts_file_jsonl(tmp_path, capsys, monkeypatch):
    import json
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "12+30="}\n{"prompt": "1+2=", "max_tokens": 1}\n')
    out = run_generate(["--prompts-file", str(f)], capsys, monkeypatch)
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert rows == [{"prompt": "12+30=", "completion": "42", "finish_reason": "stop", "prompt_tokens": 7,
                     "completion_tokens": 2},
                    {"prompt": "1+2=", "completion": "3", "finish_reason": "length", "prompt_tokens": 5,
                     "completion_tokens": 1}]
    assert out.err == ""  # max_tokens 1 asked, 1 given: nothing to explain


def test_short_and_empty_completions_say_why(capsys, monkeypatch):
    ctx = engine("single").serving.max_model_len  # 64: the BOS and 63 bytes fill it
    out = run_generate(["--prompt", "1" * 63], capsys, monkeypatch)
    assert out.out == "\n"
    assert out.err == f"note: prompt 0: nothing generated: its 64 tokens fill the context window (max_model_len " \
                      f"{ctx})\n"
    out = run_generate(["--prompt", "1+1=", "--prompt", "1" * 61], capsys, monkeypatch)
    got = len(engine("single").generate_tokens([[256] + [49] * 61])[0])
    assert out.err == f"note: prompt 1: stopped after {got} of 32 new tokens: the context window (max_model_len " \
                      f"{ctx}) is full\n" and got == 2
    # random weights: ids past the byte range, which the byte tokenizer has no text for (README's tiny-moe)
    from jaxpar.config import config_from_dict
    rnd = engine("single", model=config_from_dict(dict(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       max_position_embeddings=64)))
    out = run_generate(["--prompt", "hi", "--max-new-tokens", "4"], capsys, monkeypatch, rnd)
    assert out.out == "\n"
    assert out.err == "note: prompt 0: the 4 generated ids decode to no text (the model emits ids the tokenizer " \
                      "has no text for: a model with random weights?)\n"


def test_stats_untimed_first_run_then_steady_state(capsys, monkeypatch):
    """--stats runs the prompts once untimed (compiling; no output, no notes), then the timed run, which
    compiles nothing. A model of its own, so that the first run has programs to compile."""
    from jaxpar.config import config_from_dict
    eng = engine("single", model=config_from_dict(dict(vocab_size=272, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       max_position_embeddings=32)))
    runs = []
    gen = eng.generate_tokens
    monkeypatch.setattr(eng, "generate_tokens", lambda *a, **kw: runs.append(kw.get("on_token")) or gen(*a, **kw))
    n = len(COMPILES)
    out = run_generate(["--prompt", "12+30=", "--max-new-tokens", "3", "--stats"], capsys, monkeypatch, eng)
    assert len(runs) == 2 and runs[0] is None and runs[1] is not None  # only the timed run streams
    text = eng.tokenizer.decode(gen([eng.tokenizer.encode("12+30=")], max_new_tokens=3)[0])
    assert out.out == text + "\n"  # one completion: the first run's was discarded
    err = [line for line in out.err.splitlines() if not line.startswith("note: ")]
    assert len(out.err.splitlines()) - len(err) <= 1  # a note (random weights) only for the timed run
    first = int(err[0].split("compile: ")[1].split()[0])
    assert first == len(COMPILES) - n >= 1  # every compilation was in the first run
    assert err[0].startswith("stats: compile: ") and err[0].endswith(" s (an untimed first run)")
    assert err[1].startswith("stats: time to first token: ") and err[1].endswith(" ms")
    assert err[2].startswith("stats: time per output token: ") and err[2].endswith(" ms")
    assert err[3].startswith("stats: tokens/s: ") and "3 new tokens, 1 prompts" in err[3]
    assert err[4] == "stats: compiled during the timed run: 0 programs"
    assert err[5].startswith("stats: memory per device: params ")
