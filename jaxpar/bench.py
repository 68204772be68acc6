"""python -m jaxpar.bench: measure layouts side by side (compile time, per-device memory, bytes moved,
decode throughput) and the default model's accuracy. Writes a Markdown table and JSON."""
from __future__ import annotations

import time

from jaxpar.tools import cli

SHIPPED = ["single", "dp8", "tp2", "tp4", "tp8", "dp2_tp4", "sp4", "sp8", "sp4_ulysses", "dp2_sp2_tp2", "pp2", "pp4",
           "pp2_tp4", "ep8", "dp2_ep4", "tp2_ep4"]  # expert meshes run tiny-add-moe (their default model)


def _engine(mesh, args):
    import jaxpar
    return jaxpar.load(mesh=mesh, model=args.model, checkpoint=args.checkpoint, dtype=args.dtype)


def _device_summary() -> str:
    import jax
    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def bench_layouts(meshes, args) -> list[dict]:
    from jaxpar.inspect import inspect_engine
    import jax
    from jaxpar.layout.mesh_file import load_mesh_file
    rows = []
    for mesh in meshes:
        if load_mesh_file(mesh).device_count > len(jax.devices()):
            print(f"  {mesh}: skipped, needs more than {len(jax.devices())} devices", flush=True)
            continue
        eng = _engine(mesh, args)
        r = inspect_engine(eng, args.batch, args.prompt_len, args.max_new_tokens)
        moved = {s: sum(v["bytes"] for v in r[s]["collectives"].values()) for s in ("prefill", "decode")}
        rows.append({"mesh": mesh, "axes": r["mesh"], "compile_prefill_s": r["compile_seconds"]["prefill"],
                     "compile_decode_s": r["compile_seconds"]["decode"],
                     "params_bytes_per_device": r["params_bytes_per_device"],
                     "kv_cache_bytes_per_device": r["kv_cache_bytes_per_device"],
                     "prefill_bytes_moved_per_device": moved["prefill"],
                     "decode_bytes_moved_per_device": moved["decode"],
                     "prefill_peak_bytes": r["prefill"]["memory"]["peak_bytes"],
                     "decode_peak_bytes": r["decode"]["memory"]["peak_bytes"]})
        print(f"  {mesh}: compile prefill {rows[-1]['compile_prefill_s']:.2f}s decode "
              f"{rows[-1]['compile_decode_s']:.2f}s", flush=True)
    return rows


def bench_throughput(mesh, batch, new_tokens, args, repeats=3) -> dict:
    eng = _engine(mesh, args)
    prompts = [[eng.tokenizer.bos_id] + list(f"{(i * 37) % 1000}+{(i * 91) % 1000}=".encode())
               for i in range(batch)]
    kw = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    eng.generate_tokens(prompts, **kw)  # warm-up: compiles
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.generate_tokens(prompts, **kw)
        dt = time.perf_counter() - t0
        s = dict(eng.last_stats)
        if best is None or dt < best["wall_s"]:
            best = {"mesh": mesh, "batch": batch, "new_tokens": new_tokens, "wall_s": dt,
                    "tokens_per_s": batch * new_tokens / dt, "ttft_ms": s["ttft_s"] * 1e3,
                    "tpot_ms": s["tpot_s"] * 1e3}
    return best


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seq"]:
        from jaxpar.benchmarks import sequence
        return sequence.main(argv[1:])
    if argv[:1] == ["moe"]:
        from jaxpar.benchmarks import experts
        return experts.main(argv[1:])
    if argv[:1] == ["pp"]:
        from jaxpar.benchmarks import pipeline
        return pipeline.main(argv[1:])
    p = cli.parser("bench", "Measure layouts side by side and write a table. `python -m jaxpar.bench seq "
                   "--help`: the sequence-parallelism sweep (memory and communication against N and context); "
                   "`python -m jaxpar.bench moe --help`: expert parallelism against capacity factor, EP vs TP; "
                   "`python -m jaxpar.bench pp --help`: pipeline bubble against microbatches, PP vs TP latency.")
    p.add_argument("--mesh", nargs="+", default=SHIPPED, help="mesh files or shipped names (default: all shipped)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="model config or shipped name (default: the embedded tiny-add)")
    g.add_argument("--checkpoint", help="jaxpar checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=8, help="batch for the layout table (default 8)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--throughput-batches", type=int, nargs="*", default=[1, 16],
                   help="batch sizes for decode tokens/s on --throughput-mesh (default 1 16)")
    p.add_argument("--throughput-mesh", default="single")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt in throughput runs")
    p.add_argument("--accuracy", action="store_true",
                   help="also score the embedded models on 1,000 held-out sums (tiny-add on dp8, tiny-add-moe on ep8)")
    p.add_argument("--out", default="bench_out", help="directory for results.json (default bench_out)")
    args = p.parse_args(argv)
    cli.setup_devices(args.fake_devices)
    results = {"devices": _device_summary()}
    print("layouts:", flush=True)
    results["layouts"] = bench_layouts(args.mesh, args)
    results["throughput"] = [bench_throughput(args.throughput_mesh, b, args.new_tokens, args)
                             for b in args.throughput_batches]
    if args.accuracy:
        from jaxpar.train.add import accuracy, heldout_problems
        import jaxpar
        results["accuracy"] = {"heldout_problems": 1000,
                               "exact_match": accuracy(_engine("dp8", args), heldout_problems()),
                               "exact_match_moe_ep8": accuracy(jaxpar.load(mesh="ep8", model="tiny-add-moe"),
                                                               heldout_problems())}
    from jaxpar.benchmarks.output import publish
    publish(args.out, "results.json", results, markdown(results), lambda out: plot_layouts(results["layouts"], out))


def plot_layouts(rows, out_dir) -> list[str]:
    """Two PNGs: memory per device and bytes moved per device per step, one bar group per layout."""
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None:
        return []
    names = [r["mesh"] for r in rows]
    x = range(len(rows))
    paths = []
    for fname, title, series in (
            ("memory_per_device.png", "memory per device (KiB)",
             [("params", "params_bytes_per_device"), ("KV cache", "kv_cache_bytes_per_device")]),
            ("bytes_moved_per_device.png", "collective bytes per device per step (KiB)",
             [("prefill", "prefill_bytes_moved_per_device"), ("decode", "decode_bytes_moved_per_device")])):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / len(series)
        for i, (label, key) in enumerate(series):
            ax.bar([j + i * w for j in x], [r[key] / 1024 for r in rows], w, label=label)
        ax.set_xticks([j + w * (len(series) - 1) / 2 for j in x], names)
        ax.set_title(title)
        ax.legend()
        paths.append(save(plt, fig, out_dir, fname))
    return paths


def markdown(r) -> str:
    kib = 1024
    out = [f"devices: {r['devices']}", "","| mesh | compile prefill (s) | compile decode (s) | params/device (KiB) | KV/device (KiB) | "
           "prefill bytes moved/device | decode bytes moved/device |", "|---|---|---|---|---|---|---|"]
    for x in r["layouts"]:
        out.append(f"| {x['mesh']} | {x['compile_prefill_s']:.2f} | {x['compile_decode_s']:.2f} | "
                   f"{x['params_bytes_per_device'] / kib:.1f} | {x['kv_cache_bytes_per_device'] / kib:.1f} | "
                   f"{x['prefill_bytes_moved_per_device']:,} | {x['decode_bytes_moved_per_device']:,} |")
    out += ["", "| mesh | batch | new tokens | tokens/s | time per output token (ms) | time to first token (ms) |",
            "|---|---|---|---|---|---|"]
    for x in r["throughput"]:
        out.append(f"| {x['mesh']} | {x['batch']} | {x['new_tokens']} | {x['tokens_per_s']:.1f} | "
                   f"{x['tpot_ms']:.2f} | {x['ttft_ms']:.1f} |")
    if "accuracy" in r:
        out += ["", f"tiny-add exact match on {r['accuracy']['heldout_problems']} held-out problems: "
                    f"{r['accuracy']['exact_match'] * 100:.1f}% (dp8); tiny-add-moe: "
                    f"{r['accuracy']['exact_match_moe_ep8'] * 100:.1f}% (ep8)"]
    return "\n".join(out)


if __name__ == "__main__":
    cli.run(main)
