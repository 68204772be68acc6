"""python -m jaxpar.serve: an OpenAI-compatible HTTP server over continuous batching, on any mesh file.

The HTTP server starts at once (`/health` answers 503 while the model loads and its programs compile); the
model loads in a thread. SIGTERM (or Ctrl-C) drains: no new requests (503), running ones finish within
--drain-timeout seconds or end with finish_reason "abort", then the process exits 0. With several processes,
process 0 serves HTTP and broadcasts each iteration's plan; the others run the same programs (`follow`)."""
from __future__ import annotations

import os
import sys
import threading
import time

import uvicorn

from jaxpar.tools import cli

SERVING_OPTIONS = (  # CLI option -> ServingConfig field
    ("--max-num-seqs", "max_num_seqs", "requests decoding at once (default 16)"),
    ("--max-model-len", "max_model_len", "prompt + completion tokens at most (default: the model's context)"),
    ("--max-queue", "max_queue", "waiting requests at most; more get 503 (default 4096)"),
    ("--page-size", "page_size", "tokens per KV cache page (default 16)"),
    ("--num-pages", "num_pages", "KV cache pages per batch shard and seq device (default: every slot can reach "
                                 "--max-model-len)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", "prompt tokens prefilled per iteration (default 512)"),
    ("--prefill-chunk", "prefill_chunk", "prompt tokens one request adds per iteration (default 256)"),
    ("--decode-steps", "decode_steps", "decode steps between admissions (default 8): fewer, lower time to first "
                                       "token; more, higher throughput"),
)


def add_serving_args(p) -> None:
    g = p.add_argument_group("continuous batching and the paged KV cache")
    for flag, _, text in SERVING_OPTIONS:
        g.add_argument(flag, type=int, metavar="N", help=text)


def serving_options(args) -> dict:
    return {field: getattr(args, field) for _, field, _ in SERVING_OPTIONS if getattr(args, field) is not None}


def model_name(args) -> str:
    """The served model's name: --served-model-name, else the last part of the model's path or name."""
    if args.served_model_name:
        return args.served_model_name
    src = args.hf or args.checkpoint or args.model
    if src:
        base = os.path.basename(os.path.normpath(str(src)))
        return base[:-5] if base.endswith(".yaml") else base
    from jaxpar.api import DEFAULT_MODEL, DEFAULT_MOE_MODEL
    from jaxpar.layout.mesh_file import load_mesh_file
    try:
        return DEFAULT_MOE_MODEL if load_mesh_file(args.mesh).size("expert") > 1 else DEFAULT_MODEL
    except Exception:  # noqa: BLE001 - a bad mesh file is reported by the loader, with its own message
        return DEFAULT_MODEL


def load(args):
    import jaxpar
    eng = jaxpar.load(mesh=args.mesh, model=args.model, checkpoint=args.checkpoint, hf=args.hf,
                      **cli.storage(args), **serving_options(args))
    from jaxpar.hf.tokenizer import NoTokenizer
    if isinstance(eng.tokenizer, NoTokenizer):
        from jaxpar.errors import JaxparError
        raise JaxparError(f"{eng.tokenizer.directory}: no tokenizer.json; the server needs a tokenizer to answer "
                          f"with text")
    eng.check_tokenizer()
    return eng


def main(argv=None):
    p = cli.parser("serve", "Serve a model over HTTP with an OpenAI-compatible API (/v1/completions, "
                            "/v1/chat/completions, /v1/models, /health, /metrics).")
    cli.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the API (default: the model's directory or config name)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("JAXPAR_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $JAXPAR_API_KEY; unset: no key)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N",
                   help="largest request body accepted; larger ones get 413 (default 8 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish before they are ended (default 30)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="the HTTP server's log level (default warning)")
    add_serving_args(p)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        cli.fail(f"--port must be in 1-65535, got {args.port}")
    if args.max_body_bytes < 1024:
        cli.fail(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    cli.start(args)
    import jax
    if jax.process_index() != 0:  # a follower: same programs, same order, no HTTP
        eng = load(args)
        eng.warmup()
        eng.loop.follow()
        return
    sys.exit(serve(args, multihost=jax.process_count() > 1))


def serve(args, multihost: bool = False) -> int:
    from jaxpar.server.app import ServerState, build_app
    state = ServerState(model_name(args), args.api_key, args.max_body_bytes)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, state, args.drain_timeout)
    failure: list = []

    def start_engine():
        try:
            eng = load(args)
            state.attach(eng)
            state.status = "compiling"
            info = eng.warmup()
            if multihost:
                eng.loop.lead()
            eng.loop.start()
            state.status = "ready"
            print(f"jaxpar.serve: {state.name} on {eng.mesh.size} device(s), {info['programs']} programs compiled "
                  f"in {info['seconds']:.1f} s; serving on http://{args.host}:{args.port}/v1", file=sys.stderr,
                  flush=True)
        except BaseException as e:  # noqa: BLE001 - reported, and the server exits
            state.status, state.detail = "failed", str(e)
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=start_engine, name="jaxpar-load", daemon=True)
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.loop.stop()
        if multihost and state.engine.loop.leading:
            state.engine.loop.release_followers()
    if failure:
        from jaxpar.errors import JaxparError
        e = failure[0]
        if isinstance(e, JaxparError):
            cli.fail(str(e))
        raise e
    if not server.started:
        return 1  # e.g. the port was taken (uvicorn said so)
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT draining the engine's requests before the HTTP server stops (a
    second signal stops at once)."""

    def __init__(self, config, state, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout, self.draining = state, drain_timeout, False

    def handle_exit(self, sig, frame):
        # not uvicorn's own: it re-raises the signal after shutting down, which would end the process by it
        if self.draining:
            self.force_exit = self.should_exit = True
            return
        self.draining = True
        threading.Thread(target=self._drain, name="jaxpar-drain", daemon=True).start()

    def _drain(self):
        state = self.state
        state.status = "draining"
        deadline = time.monotonic() + self.drain_timeout
        while state.streams and time.monotonic() < deadline:
            time.sleep(0.05)
        if state.engine is not None:
            for stream in list(state.streams):  # past the deadline: end them (a final chunk says "abort")
                state.engine.loop.abort(stream.request)
        deadline = time.monotonic() + 5
        while state.streams and time.monotonic() < deadline:  # their last chunks go out
            time.sleep(0.05)
        self.should_exit = True


if __name__ == "__main__":
    cli.run(main)
