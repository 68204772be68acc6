"""`python -m jaxpar.bench continuous`: continuous batching against static batching on the same engine and the
same workload, per mesh: offline output tokens/s of both and their ratio, and the time of the prompts' prefill
alone, and the decode steps each mode needs for the workload's output lengths (their ratio is the most
continuous batching can gain on it, on any hardware); the decode rate with every slot busy
against `generate_tokens` of the same batch; the time to first token of a short request submitted while a
4096-token prompt is prefilled chunk by chunk; compilations after warm-up (there should be none); time to
first token and time per output token (p50/p99) against the admission interval n (decode steps between
admissions) under staggered arrivals. Once, on one device: decode attention over a paged cache against a
contiguous one, per token.

Workload: N requests of random token ids; prompt lengths uniform in [8, 512]; output lengths lognormal
(median 32 tokens, sigma 1: a long tail) rounded and clipped to [4, 256]; both cut so prompt + output fit the
context window. ignore_eos, so every request generates exactly its length. Static batching runs the requests
in arrival order in batches of max_num_seqs, each batch generating its longest request's length (a batch ends
when its longest request ends); only each request's own length counts as output. Staggered arrivals: a Poisson
process (exponential gaps) at --rate requests/s; a request is added at the first iteration boundary after its
arrival time, and its time to first token counts from that arrival time (so it includes the wait for the
iteration in flight)."""
from __future__ import annotations

import os
import time

import numpy as np

from jaxpar.tools.compiles import CompileCounter

PROMPT_LEN = (8, 512)  # uniform
OUTPUT_LEN = (4, 256)  # lognormal, clipped
OUTPUT_MEDIAN, OUTPUT_SIGMA = 32, 1.0
SATURATION = (16, 128)  # prompt and output lengths of the all-slots-busy decode measurement
SHORT = 16  # prompt and output length of the short request of the chunked-prefill measurement
ATTENTION_BATCH, PAGE = 16, 16


def model_config(name: str):
    """llama100m: the ~100M-parameter Llama of `bench --vs-transformers` (random weights); tiny: tiny-add's
    shape (random weights too: the config is given without its checkpoint)."""
    from jaxpar.config import ModelConfig, load_config, shipped_model_dir
    if name == "tiny":
        return load_config(os.path.join(shipped_model_dir("tiny-add"), "config.yaml"))
    from jaxpar.benchmarks.vs_transformers import SHAPE
    return ModelConfig(**SHAPE)


def workload(n: int, ctx: int, vocab: int, rng) -> list:
    """n (prompt ids, output length) pairs, as the module docstring says."""
    out = np.clip(np.round(rng.lognormal(np.log(OUTPUT_MEDIAN), OUTPUT_SIGMA, n)), *OUTPUT_LEN).astype(int)
    out = np.minimum(out, ctx // 2)  # a small context window (tiny: 64) keeps room for the prompt
    plen = np.minimum(rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1, n), ctx - out)
    return [(rng.integers(3, vocab, p).tolist(), int(o)) for p, o in zip(plen, out)]


def decode_steps_needed(outputs: list, slots: int, n: int) -> dict:
    """The decode steps each mode must run for these output lengths, counting nothing else (prefill and
    program launches free): static batches of `slots` run to their longest request; continuous batching refills
    freed slots in arrival order every n steps. Their ratio is what continuous batching can gain on this
    workload at best, on any hardware."""
    static = sum(max(outputs[i:i + slots]) for i in range(0, len(outputs), slots))
    queue, running, steps = list(outputs), [], 0
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0))
        running = [left - n for left in running if left > n]
        steps += n
    return {"static": static, "continuous": steps, "ratio": static / steps}


def _params(max_tokens: int):
    from jaxpar.serving.request import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _pct(xs) -> dict:
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


def offline_continuous(eng, work) -> dict:
    """Every request added at t=0, the loop driven until all end."""
    t0 = time.perf_counter()
    reqs = [eng.loop.add(p, _params(o)) for p, o in work]
    eng.loop.run_until(reqs)
    wall = time.perf_counter() - t0
    assert [len(r.output) for r in reqs] == [o for _, o in work], "a request ended before its length"
    tokens = sum(o for _, o in work)
    return {"seconds": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(work) / wall}


def offline_static(eng, work, batch: int) -> dict:
    """Batches of `batch` requests in arrival order, each run to its longest request's length."""
    t0, generated = time.perf_counter(), 0
    for i in range(0, len(work), batch):
        part = work[i:i + batch]
        eng.generate_tokens([p for p, _ in part], max_new_tokens=max(o for _, o in part), stop_at_eos=False)
        generated += eng.last_stats["new_tokens"]
    wall = time.perf_counter() - t0
    useful = sum(o for _, o in work)
    return {"seconds": wall, "output_tokens": useful, "generated_tokens": generated, "tokens_per_s": useful / wall}


def prefill_only(eng, work) -> dict:
    """Every request with one output token, all at once: the prefill every mode pays in full. Static batching's
    time over this is the most continuous batching could gain (if its decode steps cost nothing)."""
    t0 = time.perf_counter()
    eng.loop.run_until([eng.loop.add(p, _params(1)) for p, _ in work])
    return {"seconds": time.perf_counter() - t0, "prompt_tokens": sum(len(p) for p, _ in work)}


def saturation(eng, batch: int, rng, rounds: int = 3) -> dict:
    """Decode tokens/s with every slot busy: the serving loop's steps once all requests decode, against
    generate_tokens of the same batch (batch / its time per output token). The two alternate, `rounds` times
    each, best kept: which runs first must not favour either."""
    plen, out = SATURATION[0], min(SATURATION[1], eng.serving.max_model_len - SATURATION[0])
    prompts = [rng.integers(3, eng.config.vocab_size, plen).tolist() for _ in range(batch)]
    loop_rate = gen_rate = 0.0
    for _ in range(rounds):
        reqs = [eng.loop.add(p, _params(out)) for p in prompts]
        while not all(r.first_token_time for r in reqs):  # the prompts' iterations are not the steady part
            eng.loop.step()
        t0, before = time.perf_counter(), sum(len(r.output) for r in reqs)
        while not all(r.finished for r in reqs):
            eng.loop.step()
        rate = (sum(len(r.output) for r in reqs) - before) / (time.perf_counter() - t0)
        loop_rate = max(loop_rate, rate)
        eng.generate_tokens(prompts, max_new_tokens=out, stop_at_eos=False)
        gen_rate = max(gen_rate, batch / eng.last_stats["tpot_s"])
    return {"batch": batch, "prompt_len": plen, "output_len": out, "loop_tokens_per_s": loop_rate,
            "generate_tokens_per_s": gen_rate, "ratio": loop_rate / gen_rate}


def staggered(eng, work, rate: float, rng) -> dict:
    """Requests arriving at `rate` per second (Poisson); TTFT from each arrival time, TPOT per request."""
    gaps = rng.exponential(1.0 / rate, len(work))
    arrive = np.cumsum(gaps) - gaps[0]  # the first request at t=0
    reqs: list = []
    t0 = time.perf_counter()
    while len(reqs) < len(work) or not all(r.finished for r in reqs):
        now = time.perf_counter() - t0
        while len(reqs) < len(work) and arrive[len(reqs)] <= now:
            p, o = work[len(reqs)]
            reqs.append(eng.loop.add(p, _params(o)))
        if eng.scheduler.waiting or eng.scheduler.admitted:
            eng.loop.step()
        elif len(reqs) < len(work):  # idle until the next arrival
            time.sleep(max(0.0, arrive[len(reqs)] - now))
    end = max(r.finish_time for r in reqs)
    ttft = [r.first_token_time - (t0 + a) for r, a in zip(reqs, arrive)]
    tpot = [(r.finish_time - r.first_token_time) / (len(r.output) - 1) for r in reqs if len(r.output) > 1]
    return {"rate": rate, "ttft_s": _pct(ttft), "tpot_s": _pct(tpot),
            "tokens_per_s": sum(len(r.output) for r in reqs) / (end - t0)}


def chunked_prefill(mesh, cfg, args, counter, n: int, rng) -> dict:
    """A long prompt, then (right after the first iteration) a short request: both TTFTs. On its own engine
    (a context window of 8192); run twice, the first run compiling what the second, timed, one uses."""
    import jaxpar
    long_len = args.long_prompt
    cfg = cfg.replace(max_position_embeddings=max(8192, long_len + SHORT))
    eng = jaxpar.load(mesh=mesh, model=cfg, max_num_seqs=2, max_num_batched_tokens=args.max_num_batched_tokens,
                      prefill_chunk=args.prefill_chunk, decode_steps=n, page_size=PAGE,
                      max_model_len=long_len + SHORT)
    long_p = rng.integers(3, cfg.vocab_size, long_len).tolist()
    short_p = rng.integers(3, cfg.vocab_size, SHORT).tolist()
    for _ in range(2):
        c0 = counter.n
        long_r = eng.loop.add(long_p, _params(SHORT))
        eng.loop.step()
        short_r = eng.loop.add(short_p, _params(SHORT))
        eng.loop.run_until([long_r, short_r])
    ttft = lambda r: r.first_token_time - r.arrival  # noqa: E731
    return {"prompt": long_len, "chunk": args.prefill_chunk, "budget": args.max_num_batched_tokens,
            "long_ttft_s": ttft(long_r), "short_ttft_s": ttft(short_r), "compiles_timed_run": counter.n - c0}


def run_mesh(mesh: str, cfg, args, work, counter) -> dict:
    import jaxpar
    main_n = max(args.decode_steps)  # the throughput end of the knob; the sweep below shows its latency cost
    max_len = min(cfg.max_position_embeddings, PROMPT_LEN[1] + OUTPUT_LEN[1])  # what the workload can reach
    eng = jaxpar.load(mesh=mesh, model=cfg, max_num_seqs=args.max_num_seqs, page_size=PAGE,
                      max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                      decode_steps=main_n, max_model_len=max_len)
    c0 = counter.n
    r = {"mesh": mesh, "warmup": eng.warmup()}
    r["warmup"]["compiles"] = counter.n - c0
    print(f"  {mesh}: warm-up compiled {r['warmup']['programs']} programs in {r['warmup']['seconds']:.0f} s",
          flush=True)
    c0, rng = counter.n, np.random.default_rng(args.seed + 1)
    r["continuous"] = offline_continuous(eng, work)
    r["static"] = offline_static(eng, work, args.max_num_seqs)
    r["speedup"] = r["continuous"]["tokens_per_s"] / r["static"]["tokens_per_s"]
    r["steps_needed"] = decode_steps_needed([o for _, o in work], args.max_num_seqs, main_n)
    r["prefill_only"] = prefill_only(eng, work)
    r["speedup_bound"] = r["static"]["seconds"] / r["prefill_only"]["seconds"]
    print(f"  {mesh}: continuous {r['continuous']['tokens_per_s']:.1f} tokens/s, static "
          f"{r['static']['tokens_per_s']:.1f}; prefill alone {r['prefill_only']['seconds']:.1f} s (static / "
          f"prefill {r['speedup_bound']:.2f}x)", flush=True)
    r["saturation"] = saturation(eng, args.max_num_seqs, rng)
    r["compiles_after_warmup"] = counter.n - c0
    # default rate: 70% of what the engine just sustained offline: busy, yet able to keep up
    rate = args.rate or 0.7 * r["continuous"]["requests_per_s"]
    r["sweep"] = []
    for n in sorted(set(args.decode_steps), reverse=True):
        row = {"decode_steps": n}
        if n != eng.scheduler.config.decode_steps:
            row["rewarm"] = eng.set_decode_steps(n)
        c0 = counter.n
        row.update(staggered(eng, work, rate, np.random.default_rng(args.seed + 2)))
        row["compiles"] = counter.n - c0
        r["compiles_after_warmup"] += row["compiles"]
        r["sweep"].append(row)
        print(f"  {mesh}: n={n}: TTFT p50 {row['ttft_s']['p50'] * 1e3:.0f} ms, TPOT p50 "
              f"{row['tpot_s']['p50'] * 1e3:.1f} ms", flush=True)
    del eng
    c = r["chunked_prefill"] = chunked_prefill(mesh, cfg, args, counter, main_n, rng)
    print(f"  {mesh}: {c['prompt']}-token prompt: TTFT {c['long_ttft_s']:.2f} s; short request's "
          f"{c['short_ttft_s']:.2f} s", flush=True)
    return r


def attention_cost(cfg, contexts, repeats: int = 20) -> list:
    """One layer's decode attention per token at batch ATTENTION_BATCH, on one device with no mesh active:
    paged_attention over a pool (each row's pages scattered, as after churn) against attend on a contiguous
    [B, T, KV, D] cache. Both write the new token's K/V first; caches donated, so writes are in place."""
    import jax
    import jax.numpy as jnp

    from jaxpar.model.attend import CAUSAL, attend
    from jaxpar.parallel.paged import paged_attention
    b, h, kv, d = ATTENTION_BATCH, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    rng = np.random.default_rng(0)
    rows = []

    def paged(pool, q, k, v, table, pos, valid):
        return paged_attention(q, k, v, pool, table, pos, valid, CAUSAL)

    def contiguous(cache, q, k, v, table, pos, valid):
        rows_ = jnp.arange(b)
        ck, cv = (c.at[rows_, pos[:, 0]].set(x[:, 0]) for c, x in zip(cache, (k, v)))
        mask = jnp.arange(ck.shape[1])[None, None, :] <= pos[:, :, None]
        return attend(q, ck, cv, mask), (ck, cv)

    for t in contexts:
        nb = -(-t // PAGE)
        x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
        q, k, v = x(b, 1, h, d), x(b, 1, kv, d), x(b, 1, kv, d)
        pool = x(b * nb, PAGE, 2 * kv, d)  # keys and values interleaved by head
        table = jnp.asarray(rng.permutation(b * nb).reshape(b, nb), jnp.int32)
        rows_kv = pool[table].reshape(b, nb * PAGE, 2 * kv, d)
        cache = (rows_kv[:, :, 0::2], rows_kv[:, :, 1::2])  # the same keys and values, laid out in a row
        pos, valid = jnp.full((b, 1), t - 1, jnp.int32), jnp.ones((b, 1), bool)
        row, outs = {"context": t, "batch": b}, []
        for name, fn, state in (("paged", paged, pool), ("contiguous", contiguous, cache)):
            f = jax.jit(fn, donate_argnums=0)
            out, state = f(state, q, k, v, table, pos, valid)
            outs.append(out)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                out, state = f(state, q, k, v, table, pos, valid)
                out.block_until_ready()
                best = min(best, time.perf_counter() - t0)
            row[f"{name}_us_per_token"] = best / b * 1e6
        row["ratio"] = row["paged_us_per_token"] / row["contiguous_us_per_token"]
        row["max_diff"] = float(jnp.abs(outs[0] - outs[1]).max())
        rows.append(row)
    return rows


def _steps(x: dict) -> str:
    return f"{x['static']} / {x['continuous']} = {x['ratio']:.2f}x"


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.1f}"


def markdown(r: dict) -> str:
    a = r["args"]
    out = [f"model {r['model']} ({r['devices']}); {a['requests']} requests, max_num_seqs {a['max_num_seqs']}, "
           f"prefill_chunk {a['prefill_chunk']}, max_num_batched_tokens {a['max_num_batched_tokens']}; "
           f"output tokens {r['output_tokens']} (prompts {r['prompt_tokens']} tokens)", "",
           "| mesh | warm-up (programs, s) | continuous tokens/s | static tokens/s | continuous / static | "
           "decode steps needed, static / continuous | prefill alone (s) | static / prefill alone | "
           "all slots busy: loop tokens/s | generate_tokens tokens/s | loop / generate_tokens | compiles after "
           "warm-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in r["meshes"]:
        s, w = m["saturation"], m["warmup"]
        out.append(f"| {m['mesh']} | {w['programs']}, {w['seconds']:.0f} | {m['continuous']['tokens_per_s']:.1f} | "
                   f"{m['static']['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {_steps(m['steps_needed'])} | "
                   f"{m['prefill_only']['seconds']:.1f} | "
                   f"{m['speedup_bound']:.2f}x | {s['loop_tokens_per_s']:.1f} | "
                   f"{s['generate_tokens_per_s']:.1f} | {s['ratio']:.2f} | {m['compiles_after_warmup']} |")
    out += ["", "| mesh | prompt | chunk | token budget | long prompt TTFT (ms) | short request TTFT (ms) | "
                "compiles |", "|---|---|---|---|---|---|---|"]
    for m in r["meshes"]:
        c = m["chunked_prefill"]
        out.append(f"| {m['mesh']} | {c['prompt']} | {c['chunk']} | {c['budget']} | {_ms(c['long_ttft_s'])} | "
                   f"{_ms(c['short_ttft_s'])} | {c['compiles_timed_run']} |")
    out += ["", "| mesh | n (decode steps between admissions) | arrivals/s | output tokens/s | TTFT p50 (ms) | "
                "TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | compiles |", "|---|---|---|---|---|---|---|---|---|"]
    for m in r["meshes"]:
        for x in sorted(m["sweep"], key=lambda x: x["decode_steps"]):
            out.append(f"| {m['mesh']} | {x['decode_steps']} | {x['rate']:.2f} | {x['tokens_per_s']:.1f} | "
                       f"{_ms(x['ttft_s']['p50'])} | {_ms(x['ttft_s']['p99'])} | {_ms(x['tpot_s']['p50'])} | "
                       f"{_ms(x['tpot_s']['p99'])} | {x['compiles']} |")
    out += ["", f"decode attention, one layer, batch {ATTENTION_BATCH}, one device:", "",
            "| context | paged (us/token) | contiguous (us/token) | paged / contiguous | max difference |",
            "|---|---|---|---|---|"]
    for x in r["attention"]:
        out.append(f"| {x['context']} | {x['paged_us_per_token']:.2f} | {x['contiguous_us_per_token']:.2f} | "
                   f"{x['ratio']:.2f} | {x['max_diff']:.1e} |")
    return "\n".join(out)


def main(argv=None):
    from jaxpar.tools import cli
    p = cli.parser("bench continuous", cli.describe(__doc__))
    p.add_argument("--meshes", nargs="+", default=["single", "tp4"],
                   help="mesh files or shipped mesh names to run on, one after another (default: single tp4)")
    p.add_argument("--model", choices=("llama100m", "tiny"), default="llama100m",
                   help="llama100m: the ~100M-parameter Llama of bench --vs-transformers; tiny: the tiny-add shape, "
                        "a quick run of every measurement whose timings are mostly per-program overhead (both with "
                        "random weights; default llama100m)")
    p.add_argument("--requests", type=int, default=64, help="requests in the workload (default 64)")
    p.add_argument("--max-num-seqs", type=int,
                   help="slots of continuous batching, and the batch size of static batching (default 16; 4 with "
                        "--model tiny, so that its short workload still makes several static batches)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens one request adds per iteration (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="prompt tokens prefilled per iteration, all requests together (default 512)")
    p.add_argument("--decode-steps", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="admission intervals n (decode steps between admissions) of the staggered-arrival sweep; "
                        "the offline and chunked-prefill measurements use the largest (default 1 4 8 16)")
    p.add_argument("--rate", type=float, help="arrivals per second of the sweep (default: 70%% of the requests/s "
                                              "continuous batching sustained offline on the same mesh)")
    p.add_argument("--long-prompt", type=int, default=4096,
                   help="prompt length of the chunked-prefill measurement (default 4096)")
    p.add_argument("--attention-contexts", type=int, nargs="+", default=[256, 1024, 2048],
                   help="context lengths of the paged against contiguous decode attention timing (default "
                        "256 1024 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrival times (default 0)")
    p.add_argument("--out", default="bench_out",
                   help="output directory: continuous.json and continuous.md (default bench_out)")
    args = p.parse_args(argv)
    if args.max_num_seqs is None:
        args.max_num_seqs = 4 if args.model == "tiny" else 16
    for name in ("requests", "max_num_seqs", "prefill_chunk", "max_num_batched_tokens", "long_prompt"):
        if getattr(args, name) < 1:
            cli.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.decode_steps + args.attention_contexts) < 1 or (args.rate is not None and args.rate <= 0):
        cli.fail("--decode-steps, --attention-contexts and --rate must be positive")
    if args.prefill_chunk > args.max_num_batched_tokens:
        cli.fail("--prefill-chunk must be <= --max-num-batched-tokens")
    cli.start(args, fake_default=4)  # tp4 on a CPU machine, as bench --vs-transformers
    os.makedirs(args.out, exist_ok=True)  # an unwritable --out fails now, not after the run
    import jax
    from jaxpar.benchmarks.output import publish
    counter = CompileCounter()
    cfg = model_config(args.model)
    ctx = min(cfg.max_position_embeddings, PROMPT_LEN[1] + OUTPUT_LEN[1])
    work = workload(args.requests, ctx, cfg.vocab_size, np.random.default_rng(args.seed))
    d = jax.devices()
    r = {"model": args.model, "devices": f"{len(d)} x {d[0].device_kind} ({d[0].platform})", "args": vars(args),
         "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(o for _, o in work), "meshes": []}
    for mesh in args.meshes:
        r["meshes"].append(run_mesh(mesh, cfg, args, work, counter))
    r["attention"] = attention_cost(cfg, args.attention_contexts)
    table = markdown(r)
    from jaxpar.tools.cli import is_main
    if is_main():
        with open(os.path.join(args.out, "continuous.md"), "w") as f:
            f.write(table + "\n")
    publish(args.out, "continuous.json", r, table)
