"""`python -m jaxpar.bench serve`: a serving benchmark in the manner of `vllm bench serve`, against a running
server (--url) or one it starts (`python -m jaxpar.serve` with the model and mesh options given here).

Requests arrive as a Poisson process at each --rates value (requests/s; `inf`: all at once) and stream their
completions; per request it records the time to first token (TTFT), the time per output token after the
first (TPOT = (latency - TTFT) / (output tokens - 1)), the gaps between streamed chunks (ITL) and the
end-to-end latency, and reports p50/p90/p99, request and output-token throughput and goodput (requests/s that
met --slo-ttft-ms and --slo-tpot-ms). The workload is the continuous-batching benchmark's (random token ids,
prompts of 8-512 tokens, long-tailed outputs of 4-256, end of sequence ignored) or a JSONL --dataset of
{"prompt": text or ids, "output_len": n}.

Side by side, in this process, on the same mesh and model (when it started the server itself):
--vs-engine runs the workload through the engine's own Python API (every request at once) for the server's
overhead; --static runs it in fixed batches of max_num_seqs through `generate`. --load-seconds S sends
--load-factor x the saturation rate for S seconds (every request must end 200 or 503); --soak N sends N short
requests and reports the server's resident memory before and after."""
from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time

import numpy as np

from jaxpar.tools import cli

PCTS = (50, 90, 99)


def _pcts(xs) -> dict:
    xs = [x for x in xs if x is not None]
    return {f"p{p}": float(np.percentile(xs, p)) * 1e3 if xs else None for p in PCTS}  # milliseconds


async def _one(client, url: str, headers: dict, prompt, max_tokens: int, t_sched: float) -> dict:
    """One streamed completion; times from its scheduled arrival."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    rec = {"status": None, "ttft": None, "itl": [], "e2e": None, "tokens": 0, "prompt_tokens": 0}
    t0 = t_sched
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                return rec
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
                    rec["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    rec["ttft"] = now - t0
                else:
                    rec["itl"].append(now - last)
                last = now
            rec["e2e"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a lost request is a result: counted, and named
        rec["status"] = f"{type(e).__name__}: {e}"
    return rec


async def _run(url: str, headers: dict, work: list, rate: float, seed: int, label: str,
               duration: float | None = None, concurrency: int | None = None) -> tuple[list, float]:
    """Send `work` (cycled for `duration` seconds if given) at `rate`/s (Poisson), at most `concurrency` at a
    time if given; -> (records, seconds)."""
    import httpx

    from jaxpar.benchmarks.output import progress
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks, t0, i = [], time.perf_counter(), 0
        done = [0]
        total = len(work) if duration is None else max(1, int(rate * duration))

        gate = asyncio.Semaphore(concurrency or 1 << 30)

        async def tracked(*a):
            async with gate:
                rec = await _one(client, url, headers, *a)
            done[0] += 1
            progress(done[0], total, label)
            return rec

        t_next = t0
        while (i < len(work)) if duration is None else (t_next - t0 < duration):
            if math.isfinite(rate):
                t_next += rng.exponential(1.0 / rate)
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            prompt, out = work[i % len(work)]
            tasks.append(asyncio.ensure_future(tracked(prompt, out, max(t_next, t0) if math.isfinite(rate) else t0)))
            i += 1
        recs = await asyncio.gather(*tasks)
        if done[0] < total:
            progress(total, total, label)
    return recs, time.perf_counter() - t0


def summarize(recs: list, seconds: float, rate: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in recs if r["status"] == 200 and r["e2e"] is not None]
    for r in ok:  # time per output token after the first (None for a single token)
        r["tpot"] = (r["e2e"] - r["ttft"]) / (r["tokens"] - 1) if r["tokens"] > 1 and r["ttft"] is not None else None
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    good = [r for r in ok if r["ttft"] is not None and r["ttft"] * 1e3 <= slo_ttft and
            (r["tpot"] is None or r["tpot"] * 1e3 <= slo_tpot)]
    statuses: dict = {}
    for r in recs:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    out_tokens = sum(r["tokens"] for r in ok)
    return {"rate": rate if math.isfinite(rate) else "inf", "requests": len(recs), "statuses": statuses,
            "seconds": seconds, "requests_per_s": len(ok) / seconds, "output_tokens_per_s": out_tokens / seconds,
            "output_tokens": out_tokens, "goodput_requests_per_s": len(good) / seconds,
            "ttft_ms": _pcts([r["ttft"] for r in ok]), "tpot_ms": _pcts(tpot),
            "itl_ms": _pcts([x for r in ok for x in r["itl"]]), "e2e_ms": _pcts([r["e2e"] for r in ok])}


def engine_side(eng, work: list) -> dict:
    """The same workload through the engine's own Python API, every request at once (the server's rate `inf`):
    output tokens/s and the gaps between deliveries of a request's tokens."""
    from jaxpar.serving.request import SamplingParams
    t0 = time.perf_counter()
    reqs = [eng.loop.add(p, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)) for p, o in work]
    last, itl, first = {}, [], {}

    def deliver(r, toks):
        now = time.perf_counter()
        if r in last:
            itl.append(now - last[r])
        else:
            first[r] = now - t0
        last[r] = now

    eng.loop.run_until(reqs, deliver)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output) for r in reqs)
    return {"seconds": wall, "output_tokens_per_s": tokens / wall, "itl_ms": _pcts(itl),
            "ttft_ms": _pcts(list(first.values()))}


def _server_rss(url: str, headers: dict) -> float | None:
    import httpx
    for line in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def model_arg(name: str | None, tmp: str) -> str | None:
    """`llama100m`: the ~100M Llama of `bench --vs-transformers` (random weights), written as a config file so
    the server process and this one build the same model (same seed, same weights)."""
    if name != "llama100m":
        return name
    import yaml

    from jaxpar.benchmarks.continuous import model_config
    path = os.path.join(tmp, "llama100m.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(model_config("llama100m").to_dict(), f)
    return path


def main(argv=None):
    from jaxpar import serve
    p = cli.parser("bench serve", "Benchmark an OpenAI-compatible server with Poisson arrivals: latency "
                   "percentiles, throughput and goodput against request rate; optionally against the engine's "
                   "own Python API (--vs-engine), static batching (--static), overload (--load-seconds) and a "
                   "soak (--soak).")
    p.add_argument("--url", help="a running server (default: start `python -m jaxpar.serve` with the options below)")
    p.add_argument("--api-key", default=os.environ.get("JAXPAR_API_KEY"), help="the server's API key, if any")
    cli.add_model_args(p, mesh_required=False)
    serve.add_serving_args(p)
    p.add_argument("--rates", nargs="+", default=["inf"], help="request rates per second, `inf` = all at once "
                                                               "(default inf)")
    p.add_argument("--requests", type=int, default=64, help="requests per rate (default 64)")
    p.add_argument("--dataset", help="JSONL of {\"prompt\": text or token ids, \"output_len\": n} (default: the "
                                     "synthetic long-tailed workload)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput's time-to-first-token SLO (default 2000)")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput's time-per-output-token SLO (default 200)")
    p.add_argument("--vs-engine", action="store_true", help="also run the workload through the engine's Python API")
    p.add_argument("--static", action="store_true", help="also run it in fixed batches through generate")
    p.add_argument("--load-seconds", type=float, default=0, help="overload for this many seconds (default 0: off)")
    p.add_argument("--load-factor", type=float, default=3.0, help="overload rate / measured saturation (default 3)")
    p.add_argument("--soak", type=int, default=0, help="send this many short requests and report memory growth")
    p.add_argument("--soak-concurrency", type=int, default=4, help="soak requests in flight at once (default 4)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    args = p.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates]
    except ValueError:
        cli.fail(f"--rates must be numbers or inf, got {args.rates}")
    if any(r <= 0 for r in rates) or args.requests < 1:
        cli.fail("--rates must be > 0 and --requests >= 1")
    if args.url and (args.vs_engine or args.static):
        cli.fail("--vs-engine and --static build the same model in this process: give --mesh/--model, not --url")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.model = model_arg(args.model, tmp)
        run(args, rates, tmp)


def _workload(args, vocab: int, ctx: int, tokenizer=None) -> list:
    if args.dataset:
        work = []
        with open(args.dataset) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        d = json.loads(line)
                        work.append((d["prompt"], int(d["output_len"])))
                    except (ValueError, KeyError, TypeError) as e:
                        cli.fail(f"{args.dataset}:{n}: expected {{\"prompt\": ..., \"output_len\": n}}: {e}")
        if not work:
            cli.fail(f"{args.dataset}: no requests")
        return work
    from jaxpar.benchmarks.continuous import workload
    return workload(args.requests, ctx, vocab, np.random.default_rng(args.seed))


def run(args, rates: list, tmp: str) -> None:
    import httpx

    from jaxpar.benchmarks.output import publish
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    url = args.url
    if url is None:
        server = _start_server(args, tmp)
        url = server.url
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]
        ctx = models["max_model_len"]
        work = _workload(args, models["vocab_size"], ctx)
        result = {"url": url if args.url else "started", "model": models["id"], "max_model_len": ctx,
                  "requests": len(work), "output_tokens": sum(o for _, o in work), "rates": []}
        # untimed: the client's connections and the server's first requests (not its programs: warmed up)
        asyncio.run(_run(url, headers, work[:4], float("inf"), args.seed, "warm-up"))
        for rate in rates:
            recs, secs = asyncio.run(_run(url, headers, work, rate, args.seed, f"rate {rate:g}/s"))
            result["rates"].append(summarize(recs, secs, rate, args.slo_ttft_ms, args.slo_tpot_ms))
        if args.load_seconds > 0:
            sat = max(r["requests_per_s"] for r in result["rates"])
            rate = args.load_factor * sat
            recs, secs = asyncio.run(_run(url, headers, work, rate, args.seed + 1, f"overload {rate:.2f}/s",
                                          duration=args.load_seconds))
            s = summarize(recs, secs, rate, args.slo_ttft_ms, args.slo_tpot_ms)
            s["lost"] = sum(1 for r in recs if r["status"] not in (200, 503))
            result["load"] = s
        if args.soak > 0:
            short = [(w[0][:16] if isinstance(w[0], list) else w[0], 4) for w in work]
            before = _server_rss(url, headers)
            recs, secs = asyncio.run(_run(url, headers, (short * (args.soak // len(short) + 1))[:args.soak],
                                          float("inf"), args.seed + 2, "soak", concurrency=args.soak_concurrency))
            after = _server_rss(url, headers)
            result["soak"] = {"requests": args.soak, "ok": sum(r["status"] == 200 for r in recs), "seconds": secs,
                              "rss_before_mib": before / 2 ** 20 if before else None,
                              "rss_after_mib": after / 2 ** 20 if after else None}
    finally:
        if server is not None:
            status = server.terminate()
    if server is not None:
        result["server_exit_status"] = status  # 0: it drained and exited cleanly
    if args.vs_engine or args.static:
        _in_process(args, work, result)
    publish(args.out, "serve.json", result, markdown(result), lambda out: plot(result, out))


def _start_server(args, tmp: str):
    from jaxpar.server.process import ServerProcess
    from jaxpar.serve import SERVING_OPTIONS
    opts = ["--mesh", args.mesh]
    for flag, value in (("--dtype", args.dtype), ("--model", args.model), ("--checkpoint", args.checkpoint),
                        ("--hf", args.hf), ("--fake-devices", args.fake_devices), ("--api-key", args.api_key)):
        if value is not None:
            opts += [flag, str(value)]
    for flag, field, _ in SERVING_OPTIONS:
        if getattr(args, field) is not None:
            opts += [flag, str(getattr(args, field))]
    srv = ServerProcess(*opts, log_path=os.path.join(tmp, "server.log"))
    print(f"starting the server: python -m jaxpar.serve {' '.join(opts)}", flush=True)
    srv.wait_ready(timeout=3600)
    return srv


def _in_process(args, work: list, result: dict) -> None:
    from jaxpar import serve
    from jaxpar.benchmarks.continuous import offline_static
    cli.start(args)
    import jaxpar
    opts = dict(serve.serving_options(args), max_queue=max(len(work), 4096))  # every request queued at once
    eng = jaxpar.load(mesh=args.mesh, model=args.model, checkpoint=args.checkpoint, hf=args.hf,
                      **cli.storage(args), **opts)
    eng.warmup()
    ids = [(p if isinstance(p, list) else eng.tokenizer.encode(p), o) for p, o in work]
    if args.vs_engine:
        e = engine_side(eng, ids)
        result["engine"] = e
        inf = [r for r in result["rates"] if r["rate"] == "inf"]
        if inf:
            result["http_over_engine"] = inf[0]["output_tokens_per_s"] / e["output_tokens_per_s"]
    if args.static:
        s = offline_static(eng, ids, eng.serving.max_num_seqs)
        result["static"] = {"output_tokens_per_s": s["tokens_per_s"], "seconds": s["seconds"]}
        best = max(r["output_tokens_per_s"] for r in result["rates"])
        result["server_over_static"] = best / s["tokens_per_s"]


def markdown(res: dict) -> str:
    def f(d, k):
        v = d[k]
        return "/".join("-" if v[f"p{p}"] is None else f"{v[f'p{p}']:.0f}" for p in PCTS)
    lines = [f"model {res['model']}, {res['requests']} requests, {res['output_tokens']} output tokens; latencies in "
             f"ms as p50/p90/p99", "",
             "| rate (req/s) | answered | req/s | output tokens/s | goodput (req/s) | TTFT | TPOT | ITL | E2E |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rates"]:
        lines.append(f"| {r['rate']} | {r['statuses']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['goodput_requests_per_s']:.2f} | {f(r, 'ttft_ms')} | {f(r, 'tpot_ms')} | {f(r, 'itl_ms')} | "
                     f"{f(r, 'e2e_ms')} |")
    if "engine" in res:
        e = res["engine"]
        lines.append(f"\nengine Python API, same workload at once: {e['output_tokens_per_s']:.1f} output tokens/s, "
                     f"ITL {f(e, 'itl_ms')} ms; HTTP / engine = {res.get('http_over_engine', float('nan')):.2f}")
    if "static" in res:
        lines.append(f"\nstatic batches through generate: {res['static']['output_tokens_per_s']:.1f} output tokens/s;"
                     f" server (best rate) / static = {res['server_over_static']:.2f}x")
    if "load" in res:
        ld = res["load"]
        lines.append(f"\noverload at {ld['rate']:.2f} req/s for {ld['seconds']:.0f} s: {ld['statuses']}, lost "
                     f"{ld['lost']}; p99 TTFT of admitted requests {ld['ttft_ms']['p99']} ms")
    if "soak" in res:
        s = res["soak"]
        lines.append(f"\nsoak: {s['ok']}/{s['requests']} ok in {s['seconds']:.0f} s; server memory "
                     f"{s['rss_before_mib']:.0f} -> {s['rss_after_mib']:.0f} MiB")
    return "\n".join(lines)


def plot(res: dict, out_dir: str) -> list:
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None or not res["rates"]:
        return []
    rates = res["rates"]
    xs = [r["requests_per_s"] for r in rates]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("ttft_ms", "o-"), ("tpot_ms", "s-"), ("e2e_ms", "^-")):
        for p, alpha in zip(PCTS, (1.0, 0.6, 0.3)):
            a.plot(xs, [r[key][f"p{p}"] for r in rates], style, alpha=alpha, label=f"{key[:-3]} p{p}")
    a.set_xlabel("achieved requests/s")
    a.set_ylabel("ms")
    a.set_yscale("log")
    a.legend(fontsize=6)
    b.plot(xs, [r["output_tokens_per_s"] for r in rates], "o-", label="output tokens/s")
    b.plot(xs, [r["goodput_requests_per_s"] * res["output_tokens"] / res["requests"] for r in rates], "s--",
           label="goodput x mean output")
    b.set_xlabel("achieved requests/s")
    b.legend(fontsize=7)
    return [save(plt, fig, out_dir, "serve.png")]
