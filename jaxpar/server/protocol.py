"""The OpenAI request bodies, checked at the edge: every refusal is an `APIError` whose message names the field
and the numbers, with the OpenAI error body. Fields this server does not know are ignored (as vLLM does);
fields it knows but does not implement are refused unless they hold their no-op value."""
from __future__ import annotations

import dataclasses
import math
import numbers
import secrets

from jaxpar.errors import JaxparError
from jaxpar.serving.request import SamplingParams

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's API (chat: the rest of the context)

# known but not implemented: refused unless the value is one of these (the field's no-op)
UNSUPPORTED = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"), "min_tokens": (None, 0),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "prompt_logprobs": (None, 0),
}


class APIError(Exception):
    """An HTTP error with the OpenAI error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code or self.status}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else "invalid_request")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What request checking needs to know of the model."""
    name: str
    tokenizer: object
    vocab_size: int
    max_model_len: int


@dataclasses.dataclass
class CompletionRequest:
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    chat: bool


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {v!r}", name)
    return v


def parse(body, served: ServedModel, chat: bool) -> CompletionRequest:
    """A /v1/completions (chat=False) or /v1/chat/completions body -> the prompt's ids and sampling parameters."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != served.name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{served.name}`.", "model",
                       "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        v = body.get(name)
        if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
            raise bad(f"{name}={_short(v)} is not supported by this server (leave it out)", name)
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n={_short(n)} is not supported: one completion per request (send n requests, each with its own "
                  f"seed)", "n")
    prompt = _chat_prompt(body, served) if chat else _prompt(body, served)
    params = _sampling(body, served, len(prompt), chat)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad(f"stream_options must be an object, got {_short(options)}", "stream_options")
        include_usage = _flag(options, "include_usage")
    return CompletionRequest(prompt, params, stream, include_usage, chat)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _ids(ids: list, served: ServedModel) -> list[int]:
    for i, t in enumerate(ids):
        if not _is_int(t) or not 0 <= t < served.vocab_size:
            raise bad(f"prompt token {i} is {_short(t)}; token ids must be integers in [0, {served.vocab_size}) "
                      f"(the model's vocab_size)", "prompt")
    return [int(t) for t in ids]


def _encode(text: str, served: ServedModel, param: str) -> list[int]:
    try:
        ids = served.tokenizer.encode(text)
    except JaxparError as e:
        raise bad(str(e), param) from None
    too_big = [t for t in ids if t >= served.vocab_size]
    if too_big:
        raise bad(f"the tokenizer gives id {too_big[0]}, outside the model's vocab_size {served.vocab_size}", param)
    return ids


def _prompt(body: dict, served: ServedModel) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise bad("prompt is required (a string or a list of token ids)", "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        ids = _encode(p, served, "prompt")
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        raise bad(f"prompt holds {len(p)} prompts; this server takes one prompt per request (send {len(p)} "
                  f"requests)", "prompt")
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        raise bad(f"prompt holds {len(p)} token lists; this server takes one prompt per request", "prompt")
    elif isinstance(p, list):
        ids = _ids(p, served)
    else:
        raise bad(f"prompt must be a string or a list of token ids, got {type(p).__name__}", "prompt")
    if not ids:
        raise bad("prompt is empty (0 tokens)", "prompt")
    return ids


def _chat_prompt(body: dict, served: ServedModel) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages is required: a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content, got {_short(m)}", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_short(role)}", "messages")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}] must be a text part {{type: text, text: ...}} (this "
                              f"server takes text only), got {_short(part)}", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts, got {_short(content)}",
                      "messages")
        turns.append({"role": "system" if role == "developer" else role, "content": content})
    render = getattr(served.tokenizer, "render_chat", None)
    if render is None:
        raise bad(f"the model `{served.name}` has no chat template (use /v1/completions)", "messages")
    try:
        ids = render(turns, "messages")
    except JaxparError as e:
        raise bad(str(e), "messages") from None
    too_big = [t for t in ids if t >= served.vocab_size]
    if too_big:
        raise bad(f"the chat template's tokens include id {too_big[0]}, outside the model's vocab_size "
                  f"{served.vocab_size}", "messages")
    return ids


def _sampling(body: dict, served: ServedModel, prompt_len: int, chat: bool) -> SamplingParams:
    limit = served.max_model_len
    if prompt_len >= limit:
        raise bad(f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                  f"tokens, which leaves no room for a completion. Please shorten the prompt.",
                  "messages" if chat else "prompt")
    name = "max_tokens"
    max_tokens = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        name, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
    if max_tokens is None:
        max_tokens = limit - prompt_len if chat else min(DEFAULT_MAX_TOKENS, limit - prompt_len)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad(f"{name} must be an integer >= 1, got {_short(max_tokens)}", name)
    elif prompt_len + max_tokens > limit:
        raise bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                  f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                  f"Please reduce the length of the prompt or {name}.", name)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise bad(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise bad(f"top_k must be an integer >= 0 (0 or -1 = off), got {_short(top_k)}", "top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)
    elif not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 64:
        raise bad(f"seed must be a 64-bit integer, got {_short(seed)}", "seed")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of them, got {_short(body.get('stop'))}", "stop")
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), seed=int(seed) % 2 ** 63, stop=tuple(stop),
                          ignore_eos=_flag(body, "ignore_eos"))


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or not math.isfinite(v):
        raise bad(f"{name} must be a finite number, got {_short(v)}", name)
    return float(v)
