"""`python -m jaxpar.serve` as a user runs it: a subprocess on a free port, driven with the official `openai`
client and with raw HTTP. A small Llama from transformers (its tokenizer covers its whole vocabulary, so
every generated token is text) served on `tp4`; the completions are compared with `jaxpar.load(...).generate`
on one device."""
import json
import random
import signal
import threading
import time

import httpx
import jax
import openai
import pytest
import transformers

import jaxpar
from conftest import mesh_path
from jaxpar.server.process import ServerProcess
from test_hf import make_tokenizer

KEY = "test-key"
PROMPTS = ["abc", "hello", "x1y2z3", "the quick brown fox"]
MAX_LEN = 1024


def build_model(directory: str) -> None:
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    make_tokenizer(directory, extra=(".",))  # 40 words (divisible by tp4): <unk> <s> </s>, a-z, 0-9, "."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("served"))
    build_model(d)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("serverlog") / "server.log")
    srv = ServerProcess("--mesh", "tp4", "--fake-devices", "4", "--hf", model_dir, "--served-model-name", "tiny",
                        "--max-num-seqs", "4", "--max-queue", "32",
                        "--prefill-chunk", "16", "--max-num-batched-tokens", "32", "--decode-steps", "2",
                        "--max-body-bytes", "65536",
                        log_path=log, api_key=KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model in this process: what `generate` gives for each prompt alone."""
    return jaxpar.load(mesh=mesh_path("single"), hf=model_dir, devices=jax.devices()[:1], max_num_seqs=4)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def test_health_models_and_the_api_key(server, client):
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200  # 503 while loading and compiling
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # no key needed
    r = httpx.get(server.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    (m,) = client.models.list().data
    assert m.id == "tiny" and m.model_extra["max_model_len"] == MAX_LEN


def test_completions_and_usage_equal_generate_on_one_device(server, client, reference):
    want = [reference.generate([p], max_new_tokens=24)[0] for p in PROMPTS]
    assert any(want), want
    solo = [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0) for p in PROMPTS]
    assert [c.choices[0].text for c in solo] == want
    for p, c in zip(PROMPTS, solo):
        ids = reference.tokenizer.encode(p)
        assert c.usage.prompt_tokens == len(ids)
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        assert c.choices[0].finish_reason in ("stop", "length")


def test_32_concurrent_streams_each_equal_the_offline_answer(server, client, reference):
    """16 greedy and 16 seeded sampling streams at once on the server's tp4 (4 slots, so they queue, join and
    leave a running batch): each stream's text equals `generate` of that request alone on one device."""
    rng = random.Random(3)
    words = "abcdefghijklmnopqrstuvwxyz0123456789"
    prompts = PROMPTS + ["".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(12)]
    greedy = [reference.generate([p], max_new_tokens=24)[0] for p in prompts]
    lengths = [rng.randint(8, 40) for _ in prompts]
    seeded = [reference.generate([p], max_new_tokens=n, temperature=0.9, top_p=0.9, seed=7 + i, stop_at_eos=False)[0]
              for i, (p, n) in enumerate(zip(prompts, lengths))]
    jobs = [(("greedy", i), dict(prompt=p, max_tokens=24, temperature=0)) for i, p in enumerate(prompts)]
    jobs += [(("seeded", i), dict(prompt=p, max_tokens=n, temperature=0.9, top_p=0.9, seed=7 + i,
                                  extra_body={"ignore_eos": True}))
             for i, (p, n) in enumerate(zip(prompts, lengths))]
    results, errors = {}, []

    def run(key, **kw):
        try:
            chunks = list(client.completions.create(model="tiny", stream=True, **kw))
            results[key] = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), kwargs=kw) for k, kw in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(jobs) == 32 and len(results) == 32
    assert [results[("greedy", i)] for i in range(len(prompts))] == greedy
    assert [results[("seeded", i)] for i in range(len(prompts))] == seeded


def test_multi_turn_chat_through_the_template(server, client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "count 123"}]
    ids = reference.tokenizer.render_chat(messages)
    want = reference.tokenizer.decode(reference.generate_tokens([ids], max_new_tokens=20)[0])
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_stop_strings_and_finish_reasons(server, client):
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(text) >= 8
    stop = text[4:6]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, extra_body={"ignore_eos": True},
                                  stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0,
                                              extra_body={"ignore_eos": True}, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    def post(body, **kw):
        return server.post("/v1/completions", body, **kw)

    cases = [
        (post({"prompt": "abc", "max_tokens": 1030}), 400, "maximum context length is 1024"),
        (post({"prompt": "abc", "n": 3}), 400, "n=3"),
        (post({"prompt": [1, 2, 99]}), 400, "[0, 40)"),
        (post({"prompt": "abc", "model": "other"}), 404, "`other`"),
        (post({"prompt": "abc", "stop": 5}), 400, "stop"),
        (post({"prompt": "a" * 100_000}), 413, "65536"),
        (httpx.post(server.url + "/v1/completions", content=b"{not json", headers=server.headers, timeout=10), 400,
         "not valid JSON"),
        (server.post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}), 400, "robot"),
        (server.post("/v1/nothing", {}), 404, ""),
    ]
    for r, status, words in cases:
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    ok = post({"prompt": "abc", "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def _running(server) -> float:
    return server.metric("jaxpar:num_requests_running")


def test_disconnects_abort_their_requests_and_free_their_slots(server):
    aborted = server.metric("jaxpar:request_success_total", 'finished_reason="abort"')
    body = {"prompt": "abc", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}  # seconds of decoding
    for _ in range(3):  # streams closed after their first chunk
        with httpx.stream("POST", server.url + "/v1/completions", json=dict(body, stream=True), headers=server.headers,
                          timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    for _ in range(2):  # plain requests whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/completions", body, timeout=0.2)
    deadline = time.monotonic() + 30
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(server) == 0
    assert server.metric("jaxpar:request_success_total", 'finished_reason="abort"') - aborted == 5
    assert server.metric("jaxpar:kv_cache_usage_perc") == 0


def test_overload_gets_503_with_retry_after_and_nothing_is_lost(server):
    statuses, errors = [], []

    def one():
        try:
            r = server.post("/v1/completions", {"prompt": "abc", "max_tokens": 100, "temperature": 0,
                                                "ignore_eos": True}, timeout=120)
            statuses.append((r.status_code, r.headers.get("retry-after"),
                             r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(56)]  # 4 slots + a queue of 32 hold 36
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(statuses) == 56
    assert {s for s, _, _ in statuses} <= {200, 503}
    rejected = [s for s in statuses if s[0] == 503]
    assert rejected and all(ra == "1" for _, ra, _ in rejected)
    assert all(n == 100 for s, _, n in statuses if s == 200)  # every admitted request ran to its end
    assert _running(server) == 0


def test_sigterm_drains_then_exits_0(server):
    """Last: it stops the module's server. A running stream ends with its final chunk and [DONE]; new requests
    get 503 while draining; the process exits 0."""
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"prompt": "abc", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as r:
        it = r.iter_lines()
        lines.append(next(it))
        server.proc.send_signal(signal.SIGTERM)
        refused = server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        lines += [line for line in it if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"  # it finished within the drain timeout
    assert server.proc.wait(60) == 0
