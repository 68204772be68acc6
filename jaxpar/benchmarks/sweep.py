"""`python -m jaxpar.bench` (the default sweep): meshes x batch x context. For each point: time to first
token, time per output token and tokens/s of a real generate call, per-device memory and bytes moved
from the compiled programs, and the planner's predicted bytes for the same shapes. Writes sweep.json,
sweep.csv, a Markdown table and PNG plots. On fake CPU devices the bytes and memory are exact; times say
little about scaling (every fake device shares the same cores)."""
from __future__ import annotations

import time

import numpy as np


def run_point(eng, batch: int, context: int, new_tokens: int, repeats: int) -> dict:
    from jaxpar.analysis import comm as C
    from jaxpar.inspect import inspect_engine
    r = inspect_engine(eng, batch, context, new_tokens)
    mc = eng.model_layout.mesh_cfg
    pred = {}
    for key, step in (("prefill", C.Step(r["batch"], r["prompt_len"], r["cache_len"], False)),
                      ("decode", C.Step(r["batch"], 1, r["cache_len"], True))):
        nbytes = 4 if eng.config.dtype == "float32" else 2
        pred[key] = sum(c.total for c in C.step_collectives(eng.config, mc, eng.kv_repeat, step, nbytes))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, min(eng.config.vocab_size, 256), context)) for _ in range(batch)]
    kw = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    eng.generate_tokens(prompts, **kw)  # compile and warm up
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.generate_tokens(prompts, **kw)
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, dict(eng.last_stats))
    wall, s = best
    moved = {k: sum(v["bytes"] for v in r[k]["collectives"].values()) for k in ("prefill", "decode")}
    return {"mesh": None, "batch": batch, "context": context, "new_tokens": new_tokens,
            "ttft_ms": s["ttft_s"] * 1e3, "tpot_ms": s["tpot_s"] * 1e3, "tokens_per_s": batch * new_tokens / wall,
            "params_bytes_per_device": r["params_bytes_per_device"],
            "kv_cache_bytes_per_device": r["kv_cache_bytes_per_device"],
            "prefill_peak_bytes": r["prefill"]["memory"]["peak_bytes"],
            "decode_peak_bytes": r["decode"]["memory"]["peak_bytes"],
            "prefill_bytes_moved": moved["prefill"], "decode_bytes_moved": moved["decode"],
            "prefill_bytes_predicted": pred["prefill"], "decode_bytes_predicted": pred["decode"]}


def sweep(args, load) -> list[dict]:
    import jax
    from jaxpar.benchmarks.output import progress
    from jaxpar.layout.mesh_file import load_mesh_file
    meshes = [m for m in args.mesh if load_mesh_file(m).device_count <= len(jax.devices())]
    for m in set(args.mesh) - set(meshes):
        print(f"  {m}: skipped, needs more than {len(jax.devices())} devices", flush=True)
    total = len(meshes) * len(args.batches) * len(args.contexts)
    rows, done = [], 0
    progress(0, total, "")
    for mesh in meshes:
        eng = load(mesh)
        for b in args.batches:
            for ctx in args.contexts:
                row = run_point(eng, b, ctx, args.new_tokens, args.repeats)
                row["mesh"] = mesh
                rows.append(row)
                done += 1
                progress(done, total, f"{mesh} batch {b} context {ctx}")
    return rows


def markdown(rows: list, devices: str) -> str:
    out = [f"devices: {devices}", "",
           "| mesh | batch | context | TTFT (ms) | TPOT (ms) | tokens/s | params/device (KiB) | KV/device (KiB) | "
           "prefill peak (KiB) | prefill bytes moved (predicted) | decode bytes moved (predicted) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['mesh']} | {x['batch']} | {x['context']} | {x['ttft_ms']:.1f} | {x['tpot_ms']:.2f} | "
                   f"{x['tokens_per_s']:.0f} | {x['params_bytes_per_device'] / 1024:.0f} | "
                   f"{x['kv_cache_bytes_per_device'] / 1024:.0f} | {x['prefill_peak_bytes'] / 1024:.0f} | "
                   f"{x['prefill_bytes_moved']:,} ({x['prefill_bytes_predicted']:,}) | "
                   f"{x['decode_bytes_moved']:,} ({x['decode_bytes_predicted']:,}) |")
    return "\n".join(out)


def plot(rows: list, out_dir: str) -> list[str]:
    """Per mesh: bytes moved per decode step and per prefill (measured bars, predicted dots), memory per
    device, and TPOT / TTFT; one group of bars per (batch, context)."""
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None or not rows:
        return []
    meshes = list(dict.fromkeys(r["mesh"] for r in rows))
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    at = {(r["mesh"], r["batch"], r["context"]): r for r in rows}
    w = 0.8 / len(points)
    paths = []
    panels = [("sweep_bytes.png", [("prefill_bytes_moved", "prefill_bytes_predicted", "prefill: collective bytes "
                                    "per device (KiB)"),
                                   ("decode_bytes_moved", "decode_bytes_predicted", "decode step: collective bytes "
                                    "per device (KiB)")], 1024),
              ("sweep_memory.png", [("params_bytes_per_device", None, "parameters per device (KiB)"),
                                    ("kv_cache_bytes_per_device", None, "KV cache per device (KiB)")], 1024),
              ("sweep_latency.png", [("ttft_ms", None, "time to first token (ms)"),
                                     ("tpot_ms", None, "time per output token (ms)")], 1)]
    for fname, series, scale in panels:
        fig, axs = plt.subplots(len(series), 1, figsize=(10, 3.2 * len(series)))
        for ax, (key, pkey, title) in zip(axs, series):
            for i, (b, c) in enumerate(points):
                xs = [j + i * w for j in range(len(meshes))]
                vals = [at[(m, b, c)][key] / scale if (m, b, c) in at else 0 for m in meshes]
                ax.bar(xs, vals, w, label=f"batch {b}, context {c}")
                if pkey:
                    ax.plot(xs, [at[(m, b, c)][pkey] / scale if (m, b, c) in at else 0 for m in meshes], "k.",
                            markersize=4, label="predicted (jaxpar.plan)" if i == 0 else None)
            ax.set_xticks([j + w * (len(points) - 1) / 2 for j in range(len(meshes))], meshes, rotation=45,
                          ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
        axs[0].legend(fontsize=7, ncol=3)
        if fname == "sweep_latency.png":
            axs[0].text(0.99, 0.95, "fake CPU devices share 2 cores: times do not show scaling",
                        transform=axs[0].transAxes, ha="right", va="top", fontsize=7)
        paths.append(save(plt, fig, out_dir, fname))
    return paths
