"""python -m jaxpar.bench seq: what happens to memory and communication when a long prompt is split over N
devices (the "adding devices" benchmark).

For N = 1, 2, 4, 8 (ring and Ulysses) and prompt lengths from 1k to 32k tokens it compiles prefill and
decode and reads, from the compiled programs, per-device peak memory and bytes moved; it times prefill up
to --time-up-to tokens. Then it asks how far adding devices pays for ring prefill: a split over N devices is
over-parallelised once its communication time per layer (the ring's K/V transfers at the link's bandwidth,
plus its latency per step) exceeds its compute time per layer (the layer's FLOPs at the peak rate), as then
the transfers can no longer hide behind the computation. It works this out with this machine's measured
bandwidth and FLOP rate and with the h100-nvlink and tpu-v5e figures, for this model and for a
Llama-3-8B-shaped one."""
from __future__ import annotations

import time

from jaxpar.benchmarks.output import publish
from jaxpar.tools import cli

CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
DEVICES = [1, 2, 4, 8]
ANALYTIC_N = [2, 4, 8, 16, 32, 64]  # the crossover table goes past the 8 devices measured here
LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, bytes=2)


def layer_flops(shape: dict, s: int, n: int) -> float:
    """Prefill FLOPs per layer per device with the prompt split over n devices by ring attention: the
    projections and FFN on s/n tokens, plus the attention blocks the zigzag ring computes ((n+1)/(2n) of the
    s x s score matrix per device, diagonal blocks in full; all of it when n = 1)."""
    d, h, kv, hd, f = (shape[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn"))
    dense = 2 * (s / n) * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f)
    pairs = s * s if n == 1 else 2 * (s / (2 * n)) ** 2 * (n + 1)  # query x key pairs computed per device
    return dense + 4 * pairs * h * hd


def ring_layer_bytes(shape: dict, s: int, n: int) -> float:
    """K and V blocks sent per layer per device: (n-1) ring steps of 2 x (s/n) x kv_heads x head_dim."""
    return (n - 1) * 2 * (s / n) * shape["kv_heads"] * shape["head_dim"] * shape["bytes"]


def comm_over_compute(hw, shape: dict, s: int, n: int) -> float:
    """Ring communication time per layer / compute time per layer (> 1: communication is exposed)."""
    if n == 1:
        return 0.0
    comm = ring_layer_bytes(shape, s, n) / hw.link_bytes_per_s + (n - 1) * hw.link_latency_s
    return comm / (layer_flops(shape, s, n) / hw.peak_flops)


def measure_machine() -> dict:
    """This machine as 'hardware': FLOP/s of an f32 matmul and bytes/s of a collective-permute between fake
    devices (both on the same cores: an upper bound on what a real interconnect between them would do)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        mm(a).block_until_ready()
    flops = 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    devs = jax.devices()
    n = min(len(devs), 2)
    bw = float("nan")
    if n == 2:
        mesh = Mesh(np.array(devs[:2]), ("x",))
        x = jax.device_put(jnp.ones((2, 4 * 2 ** 20), jnp.float32), NamedSharding(mesh, P("x")))
        perm = jax.jit(jax.shard_map(lambda b: jax.lax.ppermute(b, "x", [(0, 1), (1, 0)]), mesh=mesh,
                                     in_specs=P("x"), out_specs=P("x")))
        perm(x).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(10):
            perm(x).block_until_ready()
        bw = 10 * 16 * 2 ** 20 / (time.perf_counter() - t0)
    from jaxpar.analysis.hardware import Hardware, Link
    return Hardware("this-cpu", float("nan"), float("nan"), {"bf16": flops, "float32": flops},
                    (Link("fake-devices", len(devs), bw, 0.0),), "measured: f32 1024^3 matmul; 16 MiB ppermute")


def sweep(args) -> list[dict]:
    import jaxpar
    import jax
    from jaxpar.analysis.hlo import report
    from jaxpar.engine.engine import compile_steps
    from jaxpar.layout.mesh_file import parse_mesh
    rows = []
    for n in args.devices:
        if n > len(jax.devices()):
            print(f"  N={n}: skipped, only {len(jax.devices())} devices", flush=True)
            continue
        for attention in (["dense"] if n == 1 else args.attention):
            mesh = parse_mesh({"axes": {"seq": n} if n > 1 else {}, "attention": attention}, f"seq{n}_{attention}")
            eng = jaxpar.load(mesh=mesh, model=args.model, dtype=args.dtype)
            for s in args.contexts:
                c = compile_steps(eng, 1, s, 16)
                pre, dec = report(c["prefill"]), report(c["decode"])
                row = {"n": n, "attention": attention, "context": s, "cache_len": c["cache_len"],
                       "prefill_peak_bytes": pre["memory"]["peak_bytes"],
                       "prefill_temp_bytes": pre["memory"]["temp_bytes"],
                       "prefill_bytes_moved": sum(v["bytes"] for v in pre["collectives"].values()),
                       "decode_bytes_moved": sum(v["bytes"] for v in dec["collectives"].values()),
                       "kv_cache_bytes_per_device": c["kv_cache_bytes_per_device"],
                       "prefill_s": None}
                if s <= args.time_up_to:
                    row["prefill_s"] = _time_prefill(eng, s)
                rows.append(row)
                print(f"  N={n} {attention:<8} S={s:>6}: peak {row['prefill_peak_bytes'] / 2**20:9.1f} MiB, "
                      f"moved {row['prefill_bytes_moved'] / 2**20:8.2f} MiB"
                      + (f", prefill {row['prefill_s']:.3f}s" if row["prefill_s"] else ""), flush=True)
    return rows


def _time_prefill(eng, s: int, repeats: int = 3) -> float:
    import numpy as np
    prompt = [list(np.random.RandomState(0).randint(0, eng.config.vocab_size, s))]
    eng.generate_tokens(prompt, max_new_tokens=1)  # compile + warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.generate_tokens(prompt, max_new_tokens=1)
        best = min(best, time.perf_counter() - t0)
    return best


def min_tokens_per_device(hw, shape: dict) -> float:
    """Ring overlap, step by step. With t tokens per device, a ring step sends one K/V block
    (2 t kv_heads head_dim bytes) and computes t^2/2 query-key pairs (2 t^2 heads head_dim FLOPs); the
    transfer hides behind the computation once t >= kv_heads bytes peak / (heads bandwidth)."""
    return shape["kv_heads"] * shape["bytes"] * hw.peak_flops / (shape["heads"] * hw.link_bytes_per_s)


def crossover(cfg, machine) -> list[dict]:
    """For each hardware and model shape: comm/compute per layer of ring prefill, by context and N."""
    from jaxpar.analysis.hardware import PRESETS
    import numpy as np
    tiny = dict(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.kv_heads,
                head_dim=cfg.head_size, ffn=cfg.intermediate_size, bytes=np.dtype(cfg.dtype).itemsize)
    out = []
    for hw in [machine, PRESETS["h100-nvlink"], PRESETS["tpu-v5e"]]:
        for model, shape in (("this model", tiny), ("llama3-8b shape", LLAMA3_8B)):
            if hw.name == "this-cpu" and model != "this model":
                continue
            for s in CONTEXTS:
                ratios = {n: comm_over_compute(hw, shape, s, n) for n in ANALYTIC_N}
                ok = [n for n in ANALYTIC_N if ratios[n] <= 1.0]
                out.append({"hardware": hw.name, "model": model, "context": s,
                            "comm_over_compute": ratios, "max_n_hidden": max(ok) if ok else 1,
                            "min_tokens_per_device_overlap": min_tokens_per_device(hw, shape)})
    return out


def main(argv=None):
    p = cli.parser("bench seq", "Memory and communication of sequence parallelism against N and context.")
    p.add_argument("--model", default="tiny-long", help="model config or shipped name (default tiny-long)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the weights, activations and KV cache (default float32)")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS,
                   help="prompt lengths in tokens, each at most the model's context window (default "
                        + " ".join(map(str, CONTEXTS)) + ")")
    p.add_argument("--devices", type=int, nargs="+", default=DEVICES, help="sizes of the seq axis")
    p.add_argument("--attention", nargs="+", default=["ring", "ulysses"], choices=("ring", "ulysses", "dense"),
                   help="how attention runs over the split prompt for N > 1: ring (K/V blocks passed round the "
                        "devices), ulysses (all-to-all to a split over heads), dense (XLA's own attention on the split "
                        "tensors, which gathers K and V: the baseline); N = 1 always runs dense (default ring "
                        "ulysses)")
    p.add_argument("--time-up-to", type=int, default=4096, help="time prefill for contexts up to this (default 4096)")
    p.add_argument("--out", default="bench_out",
                   help="output directory: seq.json and, with matplotlib, seq_memory.png and seq_bytes_moved.png "
                        "(default bench_out); the tables go to stdout")
    args = p.parse_args(argv)
    cli.start(args, fake_default=8)
    from jaxpar.config import load_config
    from jaxpar.errors import JaxparError
    cfg = load_config(args.model).replace(dtype=args.dtype)
    for s in args.contexts:
        if s > cfg.max_position_embeddings:
            raise JaxparError(f"--contexts: {s} is longer than the model's context window "
                                 f"{cfg.max_position_embeddings}")
    print("sweep:", flush=True)
    rows = sweep(args)
    machine = measure_machine()
    result = {"model": args.model, "dtype": args.dtype, "rows": rows,
              "machine": {"flops": machine.peak_flops, "permute_bytes_per_s": machine.link_bytes_per_s},
              "crossover": crossover(cfg, machine)}
    publish(args.out, "seq.json", result, markdown(result), lambda out: plot(rows, out))


def markdown(r) -> str:
    mib = 2 ** 20
    out = [f"model {r['model']} ({r['dtype']}), batch 1; this machine: {r['machine']['flops'] / 1e9:.0f} GFLOP/s "
           f"(f32 matmul), {r['machine']['permute_bytes_per_s'] / 1e9:.1f} GB/s (ppermute between fake devices)", "",
           "| N | attention | context | prefill peak/device (MiB) | prefill temp (MiB) | prefill moved/device (MiB) | "
           "decode moved/device (KiB) | KV/device (MiB) | prefill time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        t = f"{x['prefill_s']:.3f}" if x["prefill_s"] else "-"
        out.append(f"| {x['n']} | {x['attention']} | {x['context']} | {x['prefill_peak_bytes'] / mib:.1f} | "
                   f"{x['prefill_temp_bytes'] / mib:.1f} | {x['prefill_bytes_moved'] / mib:.2f} | "
                   f"{x['decode_bytes_moved'] / 1024:.1f} | {x['kv_cache_bytes_per_device'] / mib:.2f} | {t} |")
    out += ["", "Ring prefill, communication time / compute time per layer (> 1: the transfers take longer than "
            "the computation they should hide behind, so the split is over-parallelised); largest N at or under 1; "
            "tokens per device needed for each ring step's transfer "
            "to hide behind that step's attention:", "",
            "| hardware | model | context | " + " | ".join(f"N={n}" for n in ANALYTIC_N) +
            " | largest N | min tokens/device |", "|---|---|---|" + "---|" * (len(ANALYTIC_N) + 2)]
    for x in r["crossover"]:
        c = {int(k): v for k, v in x["comm_over_compute"].items()}
        out.append(f"| {x['hardware']} | {x['model']} | {x['context']} | " +
                   " | ".join(f"{c[n]:.2f}" for n in ANALYTIC_N) +
                   f" | {x['max_n_hidden']} | {x['min_tokens_per_device_overlap']:.0f} |")
    return "\n".join(out)


def plot(rows, out_dir) -> list[str]:
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    contexts = sorted({r["context"] for r in rows})
    for key, fname, title in (("prefill_peak_bytes", "seq_memory.png", "prefill peak memory per device (MiB)"),
                              ("prefill_bytes_moved", "seq_bytes_moved.png", "prefill bytes moved per device (MiB)")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, att in zip(axes, ("ring", "ulysses")):
            for s in contexts:
                pts = sorted((r["n"], r[key] / 2 ** 20) for r in rows
                             if r["context"] == s and (r["attention"] == att or r["n"] == 1))
                if key == "prefill_bytes_moved":
                    pts = [p for p in pts if p[0] > 1]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{s // 1024}k")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("devices on the seq axis (N)")
            ax.set_title(f"{att}")
            ax.legend(title="context", fontsize=7)
        fig.suptitle(title)
        paths.append(save(plt, fig, out_dir, fname))
    return paths
