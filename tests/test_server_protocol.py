"""The server's edge without a server: request bodies refused with messages that name the field and the
numbers, and streamed text that never splits a character or leaks part of a stop string."""
import pytest

from jaxpar.server import protocol
from jaxpar.server.protocol import APIError
from jaxpar.server.text import TextStream
from jaxpar.serving.request import Request, SamplingParams
from jaxpar.tokenizer import ByteTokenizer

SERVED = protocol.ServedModel("tiny-add", ByteTokenizer(), 259, 64)

BAD = [  # (body, chat, status, the field named, words the message must hold)
    ([1, 2], False, 400, None, ["JSON object"]),
    ({}, False, 400, "prompt", ["prompt is required"]),
    ({"prompt": 5}, False, 400, "prompt", ["string or a list of token ids", "int"]),
    ({"prompt": ["a", "b"]}, False, 400, "prompt", ["2 prompts", "one prompt per request"]),
    ({"prompt": [1, 2, 999]}, False, 400, "prompt", ["token 2 is 999", "[0, 259)"]),
    ({"prompt": [1, -1]}, False, 400, "prompt", ["token 1 is -1"]),
    ({"prompt": []}, False, 400, "prompt", ["0 tokens"]),
    ({"prompt": "x" * 70}, False, 400, "prompt", ["maximum context length is 64", "71 tokens"]),
    ({"prompt": "12+34=", "max_tokens": 60}, False, 400, "max_tokens",
     ["maximum context length is 64", "67 tokens (7 in the prompt, 60 for the completion)"]),
    ({"prompt": "a", "max_tokens": 0}, False, 400, "max_tokens", [">= 1", "0"]),
    ({"prompt": "a", "max_tokens": "3"}, False, 400, "max_tokens", ["'3'"]),
    ({"prompt": "a", "n": 2}, False, 400, "n", ["n=2", "one completion per request"]),
    ({"prompt": "a", "temperature": -0.5}, False, 400, "temperature", [">= 0", "-0.5"]),
    ({"prompt": "a", "temperature": "hot"}, False, 400, "temperature", ["finite number", "'hot'"]),
    ({"prompt": "a", "top_p": 0}, False, 400, "top_p", ["(0, 1]", "0"]),
    ({"prompt": "a", "top_p": 1.5}, False, 400, "top_p", ["1.5"]),
    ({"prompt": "a", "top_k": -3}, False, 400, "top_k", ["-3"]),
    ({"prompt": "a", "seed": 1.5}, False, 400, "seed", ["1.5"]),
    ({"prompt": "a", "stop": ""}, False, 400, "stop", ["non-empty"]),
    ({"prompt": "a", "stop": ["x", 3]}, False, 400, "stop", ["non-empty string"]),
    ({"prompt": "a", "stream": "yes"}, False, 400, "stream", ["true or false"]),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, False, 400, "stream_options", ["stream is true"]),
    ({"prompt": "a", "logprobs": 2}, False, 400, "logprobs", ["not supported"]),
    ({"prompt": "a", "echo": True}, False, 400, "echo", ["not supported"]),
    ({"prompt": "a", "presence_penalty": 0.5}, False, 400, "presence_penalty", ["not supported"]),
    ({"prompt": "a", "model": "gpt-4"}, False, 404, "model", ["gpt-4", "tiny-add"]),
    ({"messages": []}, True, 400, "messages", ["non-empty list"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, True, 400, "messages", ["messages[0].role", "wizard"]),
    ({"messages": [{"role": "user", "content": 3}]}, True, 400, "messages", ["messages[0].content"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, True, 400, "messages",
     ["content[0]", "text only"]),
    ({"messages": [{"role": "user", "content": "hi"}]}, True, 400, "messages", ["no chat template"]),
]


@pytest.mark.parametrize("body,chat,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_name_the_field_and_numbers(body, chat, status, param, words):
    with pytest.raises(APIError) as e:
        protocol.parse(body, SERVED, chat)
    err = e.value.body()["error"]
    assert e.value.status == status and err["param"] == param
    assert err["type"] and err["message"]
    for w in words:
        assert w in err["message"], (w, err["message"])


def test_good_requests():
    r = protocol.parse({"prompt": "12+34=", "max_tokens": 5, "temperature": 0, "seed": 3, "stop": "\n",
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                        "user": "unknown fields are ignored", "n": 1, "logprobs": None}, SERVED, False)
    assert r.prompt == ByteTokenizer().encode("12+34=")
    assert r.params == SamplingParams(max_tokens=5, temperature=0.0, seed=3, stop=("\n",), ignore_eos=True)
    assert r.stream and r.include_usage and not r.chat
    assert protocol.parse({"prompt": [[256, 49]]}, SERVED, False).prompt == [256, 49]  # a batch of one
    # defaults: OpenAI's (temperature 1, max_tokens 16 bounded by the context); without a seed, a random one
    r = protocol.parse({"prompt": "x" * 55}, SERVED, False)
    assert r.params.temperature == 1.0 and r.params.max_tokens == 64 - 56
    seeds = {protocol.parse({"prompt": "a"}, SERVED, False).params.seed for _ in range(4)}
    assert len(seeds) > 1
    assert protocol.parse({"prompt": "a", "top_k": -1}, SERVED, False).params.top_k == 0  # vLLM's "off"


def test_streamed_text_never_splits_a_character():
    tok = ByteTokenizer()
    text = "a\u00e9\u20ac\U0001F600b"  # 1, 2, 3 and 4 bytes
    ids = tok.encode(text, add_bos=False)
    s = TextStream(tok.decode)
    pieces = [s.push([t]) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "\u00e9"  # the first byte of a two-byte character waits


def test_streamed_text_holds_back_a_stop_string_in_the_making():
    tok = ByteTokenizer()
    s = TextStream(tok.decode, stop=("STOP",))
    out = "".join(s.push([t]) for t in tok.encode("hello ST", add_bos=False))
    assert out == "hello"  # " ST" may become " STOP": three characters wait
    req = Request([1], SamplingParams(stop=("STOP",)), 8, ())
    req.output, req.text = tok.encode("hello STOP", add_bos=False), "hello "
    assert out + s.finish(req) == "hello "
    s = TextStream(tok.decode, stop=("STOP",))  # the tokens that complete it come in one delivery
    assert s.push(tok.encode("ab STOP cd", add_bos=False)) == "ab "


def test_health_and_requests_answer_503_while_loading_and_after_an_engine_failure():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from jaxpar.server.app import ServerState, build_app
    state = ServerState("tiny-add")
    client = TestClient(build_app(state))
    assert client.get("/health").status_code == 503 and client.get("/health").json()["status"] == "loading"
    r = client.post("/v1/completions", json={"prompt": "1+1="})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "loading" in r.json()["error"]["message"]
    loop = SimpleNamespace(error=None)
    state.attach(SimpleNamespace(loop=loop, tokenizer=ByteTokenizer(), config=SimpleNamespace(vocab_size=259),
                                 serving=SimpleNamespace(max_model_len=64)))
    state.status = "ready"
    assert client.get("/health").status_code == 200
    loop.error = RuntimeError("device lost")  # what the serving loop records when a program fails
    assert client.get("/health").status_code == 503 and client.get("/health").json()["status"] == "failed"
    r = client.post("/v1/completions", json={"prompt": "1+1="})
    assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
