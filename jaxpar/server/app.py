"""The HTTP layer: a FastAPI app, thin over the engine's serving loop (`ServingLoop.open` queues a request and
streams its tokens to asyncio). It checks requests at the edge (server/protocol.py), turns tokens into text
(server/text.py), streams Server-Sent Events, aborts the requests of clients that go away, and counts what
Prometheus scrapes (server/metrics.py)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpar.errors import JaxparError
from jaxpar.server import protocol
from jaxpar.server.metrics import Metrics
from jaxpar.server.protocol import APIError
from jaxpar.server.text import TextStream
from jaxpar.serving.scheduler import QueueFull

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


class ServerState:
    """What the app serves and how it stands: status is "loading", "compiling", "ready", "draining" or
    "failed" (`detail` says why); `engine` is set once loaded."""

    def __init__(self, name: str, api_key: str | None = None, max_body_bytes: int = 8 << 20):
        self.name, self.api_key, self.max_body_bytes = name, api_key, max_body_bytes
        self.status, self.detail = "loading", ""
        self.engine = None
        self.served: protocol.ServedModel | None = None
        self.metrics = Metrics(name)
        self.streams: set = set()  # open RequestStreams (drain aborts what is left)
        self.created = int(time.time())

    def attach(self, engine) -> None:
        self.engine = engine
        self.served = protocol.ServedModel(self.name, engine.tokenizer, engine.config.vocab_size,
                                           engine.serving.max_model_len)

    @property
    def healthy(self) -> bool:
        return self.status == "ready" and self.engine is not None and self.engine.loop.error is None

    def note_failure(self) -> None:
        """The serving loop records an engine failure; from then on the server is "failed"."""
        if self.engine is not None and self.engine.loop.error is not None:
            self.status, self.detail = "failed", f"the engine failed: {self.engine.loop.error!r}"

    def check_serving(self) -> None:
        self.note_failure()
        if self.status != "ready":
            why = {"loading": "the model is loading", "compiling": "the programs are compiling",
                   "draining": "the server is shutting down", "failed": self.detail}.get(self.status, self.status)
            raise APIError(503, f"not serving: {why}", code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    def authorize(self, request: Request) -> None:
        """/v1 with --api-key: `Authorization: Bearer KEY` (checked in each handler: a Starlette HTTP middleware
        would wrap `receive` and hide client disconnects from the handlers)."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "a valid API key is required (header `Authorization: Bearer KEY`)",
                           code="invalid_api_key")


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxpar", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        if state.healthy:
            return Response(status_code=200)
        state.note_failure()
        return JSONResponse({"status": state.status, "detail": state.detail}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.engine is not None:
            with state.engine.loop.lock:
                state.metrics.sample(state.engine.scheduler)
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        state.authorize(request)
        if state.served is None:
            state.check_serving()
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "jaxpar", "root": state.name,
                                            "max_model_len": state.served.max_model_len,
                                            "vocab_size": state.served.vocab_size}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(state, request, chat=True)

    return app


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes, more than this server's limit of {limit} "
                            f"(--max-body-bytes)", code="body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body is more than this server's limit of {limit} bytes "
                                f"(--max-body-bytes)", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def _serve(state: ServerState, request: Request, chat: bool):
    state.authorize(request)
    state.check_serving()
    body = await _read_json(request, state.max_body_bytes)
    creq = protocol.parse(body, state.served, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        stream = state.engine.loop.open(creq.prompt, creq.params, rid)
    except QueueFull as e:
        raise APIError(503, str(e), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except JaxparError as e:  # e.g. more KV cache pages than a batch shard holds
        raise protocol.bad(str(e)) from None
    state.streams.add(stream)
    state.metrics.prompt_tokens.inc(len(creq.prompt))
    reply = Reply(state, stream, creq, rid)
    if creq.stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await reply.whole(request)


class Reply:
    """One request's answer: the whole response, or its stream of SSE events."""

    def __init__(self, state: ServerState, stream, creq: protocol.CompletionRequest, rid: str):
        self.state, self.stream, self.creq, self.rid = state, stream, creq, rid
        self.req = stream.request
        self.text = TextStream(state.engine.tokenizer.decode, creq.params.stop)
        self.created = int(time.time())
        self.last: float | None = None

    def _observe(self, toks: list[int]) -> None:
        m, now = self.state.metrics, time.perf_counter()
        if self.last is None:
            m.ttft.observe(now - self.req.arrival)
        else:
            m.itl.observe(now - self.last)
        self.last = now
        m.generation_tokens.inc(len(toks))

    def _done(self) -> None:
        self.stream.close()
        if self.stream in self.state.streams:
            self.state.streams.discard(self.stream)
            self.state.metrics.request_done(self.req)

    def usage(self) -> dict:
        p, c = len(self.creq.prompt), len(self.req.output)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def whole(self, request: Request):
        async def consume():
            async for toks in self.stream:
                self._observe(toks)

        task = asyncio.ensure_future(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)  # nobody reads it: the request is aborted below
            task.result()
        except RuntimeError as e:  # the engine failed
            raise APIError(500, f"the engine failed: {e.__cause__!r}", code="engine_failed") from None
        finally:
            if not task.done():
                task.cancel()
            self._done()
        text = self.text.finish(self.req)
        if self.creq.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.req.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.req.finish_reason}
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.state.name,
                "choices": [choice], "usage": self.usage()}

    def _chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> str:
        if self.creq.chat:
            delta = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        chunk = {"id": self.rid, "object": obj, "created": self.created, "model": self.state.name,
                 "choices": [choice]}
        if self.creq.include_usage:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events(self):
        """SSE: a chunk per delivery of tokens (the text that is safe to send), a final chunk with the
        finish_reason, the usage chunk if asked, then [DONE]. Leaving early (the client went away) aborts."""
        try:
            first = True
            if self.creq.chat:
                yield self._chunk("", first=True)
                first = False
            async for toks in self.stream:  # a chunk per delivery, even when its text must wait (a split
                self._observe(toks)          # character, a stop string in the making): clients see progress
                yield self._chunk(self.text.push(toks))
            yield self._chunk(self.text.finish(self.req), self.req.finish_reason, first=first)
            if self.creq.include_usage:
                usage = {"id": self.rid, "object": "chat.completion.chunk" if self.creq.chat else "text_completion",
                         "created": self.created, "model": self.state.name, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except RuntimeError as e:  # the engine failed mid-stream
            err = APIError(500, f"the engine failed: {e.__cause__!r}", code="engine_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._done()
