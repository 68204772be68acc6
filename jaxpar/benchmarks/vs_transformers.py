"""`python -m jaxpar.bench --vs-transformers`: the speed of jaxpar against Hugging Face transformers
(PyTorch) on this CPU, side by side in one run, on the same weights loaded from the same safetensors
directory: a ~100M parameter Llama (float32, hidden 768, 12 layers, 12 heads, 4 kv heads, FFN 2048,
vocabulary 8192) with random weights. Measures greedy decode tokens/s at batch 1 and 16, prefill of 512
tokens, and the memory read bandwidth of the machine (what batch-1 decode is bound by: all weights are read
once per token)."""
from __future__ import annotations

import os
import time

import numpy as np

SHAPE = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)


def make_model(directory: str) -> str:
    """The benchmark's model: a random Llama saved by transformers as safetensors (made once)."""
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


_BUFFER: dict = {}  # the array read_bandwidth sums, allocated once


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> dict:
    """Bytes/s of reading a large float32 array once: numpy (one thread) and torch (all threads); the machine's
    figure is the faster."""
    import torch
    if _BUFFER.get(mib) is None:
        _BUFFER[mib] = np.ones(mib * 2 ** 20 // 4, np.float32)
    a = _BUFFER[mib]
    t = torch.from_numpy(a)
    out = {}
    for name, fn in (("numpy", lambda: a.sum()), ("torch", lambda: t.sum())):
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        out[name] = a.nbytes / best
    out["machine"] = max(out.values())
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemv_chain(repeats: int = 20) -> dict:
    """The ceiling XLA:CPU itself sets on batch-1 decode: the model's matrix-vector products alone (per layer
    q, k, v, o, gate, up, down, then the LM head; float32, the same shapes) in one jitted chain with nothing
    else, as bytes of weights read per second, with the machine's read bandwidth measured right after."""
    import jax
    import jax.numpy as jnp
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    hd = d // SHAPE["num_attention_heads"]
    kv = SHAPE["num_key_value_heads"] * hd
    r = np.random.RandomState(0)

    def w(*shape):
        return jnp.asarray(r.randn(*shape).astype(np.float32) * 0.02)
    layers = [[w(d, d), w(d, kv), w(d, kv), w(d, d), w(d, f), w(d, f), w(f, d)]
              for _ in range(SHAPE["num_hidden_layers"])]
    head = w(d, v)
    nbytes = sum(a.nbytes for layer in layers for a in layer) + head.nbytes

    @jax.jit
    def chain(x, layers, head):
        for q, k, vv, o, g, u, dn in layers:  # every product feeds the next, so none can be skipped
            x = x + (x @ q) @ o * 1e-3 + jnp.sum(x @ k) * 1e-9 + jnp.sum(x @ vv) * 1e-9
            x = x + (jax.nn.silu(x @ g) * (x @ u)) @ dn
        return x @ head
    x = jnp.ones((1, d), jnp.float32)
    chain(x, layers, head).block_until_ready()
    best = min(_timed(lambda: chain(x, layers, head).block_until_ready()) for _ in range(repeats))
    return {"read_bytes_per_s": nbytes / best, "bandwidth_after": read_bandwidth(repeats=3)["machine"]}


def time_transformers(directory: str, batch: int, prompt: int, new: int, repeats: int) -> dict:
    """transformers' generate, greedy, exactly `new` tokens; decode rate from generate(new) - generate(1)."""
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = torch.from_numpy(_prompts(batch, prompt))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
    gen(2)
    t1 = min(_timed(lambda: gen(1)) for _ in range(repeats))
    tn = min(_timed(lambda: gen(new)) for _ in range(repeats))
    tokens = gen(new)[:, prompt:].numpy()
    return {"prefill_s": t1, "decode_tokens_per_s": batch * (new - 1) / (tn - t1), "tokens": tokens}


def time_jaxpar(directory: str, batch: int, prompt: int, new: int, repeats: int, mesh: str = "single",
                paired_bandwidth: bool = True) -> dict:
    """paired_bandwidth: also measure the machine's read bandwidth next to each timed pair (generate(1),
    generate(new)), so the share of bandwidth is taken against the bandwidth of the same moment (it drifts on
    a shared machine)."""
    import jaxpar
    eng = jaxpar.load(mesh=mesh, hf=directory)
    prompts = [list(r) for r in _prompts(batch, prompt)]

    def gen(n):
        return eng.generate_tokens(prompts, max_new_tokens=n, stop_at_eos=False)
    gen(1), gen(new)  # compile both buckets
    t1, tn, bw = [], [], []
    for _ in range(repeats):
        before = read_bandwidth(repeats=3)["machine"] if paired_bandwidth else None
        t1.append(_timed(lambda: gen(1)))
        tn.append(_timed(lambda: gen(new)))
        if paired_bandwidth:
            bw.append((before + read_bandwidth(repeats=3)["machine"]) / 2)
    nbytes = eng.params_bytes_per_device()
    # one share per timed pair; a pair whose generate(new) was no slower than generate(1) is noise, not a rate
    shares = [nbytes * (new - 1) / (b - a) / w for a, b, w in zip(t1, tn, bw) if b > a] or [float("nan")]
    return {"prefill_s": min(t1), "decode_tokens_per_s": batch * (new - 1) / (min(tn) - min(t1)),
            "tokens": np.array(gen(new)), "params_bytes": nbytes, "bandwidth_share": sorted(shares),
            "bandwidth_during": bw}


def _prompts(batch: int, length: int) -> np.ndarray:
    return np.random.RandomState(0).randint(3, SHAPE["vocab_size"], (batch, length)).astype(np.int64)


def host_overhead(directory: str, mesh: str, new: int, repeats: int) -> dict:
    """Per-token cost of streaming on a mesh, batch 1: generate with on_token (each decode program's tokens
    handed to the host callback between programs) minus generate without it, per token. The two are timed
    in turn, repeats times; the best of each kept."""
    import jaxpar
    eng = jaxpar.load(mesh=mesh, hf=directory)
    prompt = [list(_prompts(1, 16)[0])]
    modes = {"plain": dict(), "streaming": dict(on_token=lambda r, t: None)}
    times: dict = {m: [] for m in modes}
    for kw in modes.values():  # compile
        eng.generate_tokens(prompt, max_new_tokens=new, stop_at_eos=False, **kw)
    for _ in range(repeats):
        for m, kw in modes.items():
            times[m].append(_timed(lambda: eng.generate_tokens(prompt, max_new_tokens=new, stop_at_eos=False, **kw)))
    best = {m: min(t) for m, t in times.items()}
    return {"mesh": mesh, "tokens": new, **{f"{m}_s": t for m, t in best.items()},
            "streaming_ms_per_token": (best["streaming"] - best["plain"]) / new * 1e3}


def run(args) -> dict:
    d = make_model(os.path.join(args.out, "llama-100m"))
    r = {"model": {**SHAPE, "params": None}, "bandwidth": read_bandwidth(), "decode": [], "prefill": None,
         "xla_gemv_chain": gemv_chain()}
    new = args.new_tokens
    for b in args.batches:
        j = time_jaxpar(d, b, 16, new, args.repeats)
        t = time_transformers(d, b, 16, new, args.repeats)
        r["model"]["params"] = j["params_bytes"] // 4
        same = bool((j["tokens"] == t["tokens"]).all())
        r["decode"].append({"batch": b, "jaxpar_tokens_per_s": j["decode_tokens_per_s"],
                            "transformers_tokens_per_s": t["decode_tokens_per_s"],
                            "speedup": j["decode_tokens_per_s"] / t["decode_tokens_per_s"], "same_tokens": same,
                            "jaxpar_read_bytes_per_s": j["params_bytes"] * j["decode_tokens_per_s"] / b,
                            "bandwidth_share_paired": j["bandwidth_share"],
                            "bandwidth_during": j["bandwidth_during"]})
        print(f"  decode batch {b}: jaxpar {j['decode_tokens_per_s']:.1f} tokens/s, transformers "
              f"{t['decode_tokens_per_s']:.1f}", flush=True)
    j = time_jaxpar(d, 1, args.prefill, 2, args.repeats, paired_bandwidth=False)
    t = time_transformers(d, 1, args.prefill, 2, args.repeats)
    r["prefill"] = {"tokens": args.prefill, "jaxpar_s": j["prefill_s"], "transformers_s": t["prefill_s"],
                    "speedup": t["prefill_s"] / j["prefill_s"]}
    r["host_overhead"] = [host_overhead(d, m, args.overhead_tokens, args.repeats) for m in args.overhead_meshes]
    return r


def markdown(r: dict) -> str:
    bw = r["bandwidth"]["machine"]
    out = [f"model: Llama, {r['model']['params'] / 1e6:.1f} M parameters, float32; machine read bandwidth "
           f"{bw / 1e9:.1f} GB/s (numpy {r['bandwidth']['numpy'] / 1e9:.1f}, torch {r['bandwidth']['torch'] / 1e9:.1f})",
           f"XLA's matrix-vector products alone (benchmarks/vs_transformers.gemv_chain): "
           f"{r['xla_gemv_chain']['read_bytes_per_s'] / 1e9:.1f} GB/s, against "
           f"{r['xla_gemv_chain']['bandwidth_after'] / 1e9:.1f} GB/s measured right after",
           "", "| decode | jaxpar tokens/s | transformers tokens/s | jaxpar / transformers | same tokens | "
               "weights read per step (GB/s, share of machine) | share of the bandwidth measured around each timing "
               "(median, range) |", "|---|---|---|---|---|---|---|"]
    for x in r["decode"]:
        paired = x["bandwidth_share_paired"]
        out.append(f"| batch {x['batch']} | {x['jaxpar_tokens_per_s']:.1f} | {x['transformers_tokens_per_s']:.1f} | "
                   f"{x['speedup']:.2f}x | {'yes' if x['same_tokens'] else 'no'} | "
                   f"{x['jaxpar_read_bytes_per_s'] / 1e9:.1f} ({x['jaxpar_read_bytes_per_s'] / bw * 100:.0f}%) | "
                   f"{np.median(paired) * 100:.0f}% ({min(paired) * 100:.0f}-{max(paired) * 100:.0f}) |")
    p = r["prefill"]
    out += ["", f"prefill of {p['tokens']} tokens (batch 1, to the first token): jaxpar {p['jaxpar_s'] * 1e3:.0f} ms, "
                f"transformers {p['transformers_s'] * 1e3:.0f} ms: {p['speedup']:.2f}x", "",
            "| mesh | generate (ms) | generate with on_token (ms) | streaming cost per token (ms) |",
            "|---|---|---|---|"]
    for x in r["host_overhead"]:
        out.append(f"| {x['mesh']} | {x['plain_s'] * 1e3:.1f} | {x['streaming_s'] * 1e3:.1f} | "
                   f"{x['streaming_ms_per_token']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    from jaxpar.tools import cli
    p = cli.parser("bench --vs-transformers", cli.describe(__doc__))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                   help="batch sizes of the decode measurement, each prompt 16 random tokens (default 1 16)")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens per decode measurement (default 33)")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs of each measurement, jaxpar and transformers alike, the fastest kept (default 5)")
    p.add_argument("--overhead-meshes", nargs="+", default=["single", "tp4"],
                   help="mesh files or shipped mesh names on which the cost of streaming is timed: jaxpar's "
                        "generate with a per-token callback against without, batch 1 (default single tp4)")
    p.add_argument("--overhead-tokens", type=int, default=48, help="tokens per streaming-overhead timing")
    p.add_argument("--out", default="bench_out",
                   help="output directory: vs_transformers.json, and the random model's safetensors in "
                        "llama-100m/ (made on the first run, reused after; default bench_out)")
    args = p.parse_args(argv)
    cli.start(args, fake_default=4)
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    from jaxpar.benchmarks.output import publish
    os.makedirs(args.out, exist_ok=True)
    r = run(args)
    publish(args.out, "vs_transformers.json", r, markdown(r))
