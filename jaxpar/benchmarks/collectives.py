"""`python -m jaxpar.bench collectives`: bandwidth of all-reduce, all-gather, all-to-all and
collective-permute against message size on the current devices (the measurement NVIDIA's nccl-tests make
with all_reduce_perf, the usual check of a GPU machine's interconnect). Reports algorithm bandwidth
(message bytes / time) and bus bandwidth (NCCL's convention: what each device's link carried, e.g.
x 2(n-1)/n for all-reduce), compares it with a hardware preset's link, and plots both."""
from __future__ import annotations

import time

OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute")


def bus_factor(op: str, n: int) -> float:
    return {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
            "collective-permute": 1.0}[op]


def program(op: str, mesh, n: int):
    import jax
    from jax.sharding import PartitionSpec as P
    body = {"all-reduce": lambda x: jax.lax.psum(x, "x"),
            "all-gather": lambda x: jax.lax.all_gather(x, "x", tiled=True),
            "all-to-all": lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True),
            "collective-permute": lambda x: jax.lax.ppermute(x, "x", [(i, (i + 1) % n) for i in range(n)])}[op]
    out = P(None) if op == "all-reduce" else P("x")
    if op == "all-gather":
        out = P(None)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=out, check_vma=False))


def measure(op: str, nbytes: int, mesh, n: int, repeats: int) -> tuple:
    """(seconds per call, best of `repeats`; the op's result bytes on one device, the convention of
    `inspect`) for a message of about nbytes per device (rounded to whole float32 elements per device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    per_device = nbytes // 4 // (n if op == "all-gather" else 1)
    per_device = max(per_device - per_device % n, n)
    x = jax.device_put(jnp.ones((n * per_device,), jnp.float32), NamedSharding(mesh, P("x")))
    f = program(op, mesh, n)
    y = f(x).block_until_ready()
    result_bytes = y.addressable_shards[0].data.nbytes
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best, result_bytes


def run(args) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jaxpar.benchmarks.output import progress
    devs = jax.devices()[:args.devices] if args.devices else jax.devices()
    n = len(devs)
    mesh = Mesh(np.array(devs), ("x",))
    sizes = [2 ** k for k in range(args.min_log2, args.max_log2 + 1)]
    rows, done = [], 0
    for op in OPS:
        for s in sizes:
            t, nbytes = measure(op, s, mesh, n, args.repeats)
            rows.append({"op": op, "bytes": nbytes, "seconds": t, "algbw_gb_s": nbytes / t / 1e9,
                         "busbw_gb_s": nbytes / t / 1e9 * bus_factor(op, n)})
            done += 1
            progress(done, len(OPS) * len(sizes), f"{op} {s:,} bytes")
    return {"devices": f"{n} x {devs[0].device_kind} ({devs[0].platform})", "n": n, "rows": rows,
            "fit": fit_link([x for x in rows if x["op"] == "all-reduce"], n)}


def fit_link(rows: list, n: int) -> dict:
    """Least squares of the planner's ring all-reduce model, t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth,
    over the measured sizes: the figures a hardware file's `links` entry takes for these devices."""
    import numpy as np
    s = np.array([x["bytes"] for x in rows], float)
    t = np.array([x["seconds"] for x in rows], float)
    if n < 2 or len(set(s)) < 2:
        return None  # nothing to fit: one device, or one message size
    slope, icpt = np.polyfit(s, t, 1)
    bw = 2 * (n - 1) / n / slope if slope > 0 and n > 1 else float("inf")
    lat = max(icpt, 0.0) / (2 * (n - 1)) if n > 1 else 0.0
    return {"gb_per_s": bw / 1e9, "latency_us": lat * 1e6}


def markdown(r: dict, hw) -> str:
    sizes = sorted({x["bytes"] for x in r["rows"]})
    out = [f"devices: {r['devices']}; bus bandwidth (GB/s) by message size per device", "",
           "| op | " + " | ".join(_size(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for op in OPS:
        by = {x["bytes"]: x for x in r["rows"] if x["op"] == op}
        out.append(f"| {op} | " + " | ".join(f"{by[s]['busbw_gb_s']:.2f}" if s in by else "-" for s in sizes) + " |")
    f = r["fit"] or {"gb_per_s": float("nan"), "latency_us": float("nan")}
    out += ["", f"fitted to the all-reduce times (the planner's ring model), for a hardware file: "
                f"`links: [{{name: measured, group: {r['n']}, gb_per_s: {f['gb_per_s']:.3g}, "
                f"latency_us: {f['latency_us']:.3g}}}]`"]
    if hw is not None:
        ln = hw.links[0]
        out += ["", f"{hw.name} ({ln.name}) for comparison: {ln.bytes_per_s / 1e9:.0f} GB/s per direction, "
                    f"{ln.latency_s * 1e6:g} us per hop; the planner's time for an all-reduce of each size there: "
                    + ", ".join(f"{_size(s)} {_ring_ms(s, r['n'], ln) * 1e3:.1f} us" for s in sizes[::4])]
    return "\n".join(out)


def _ring_ms(s, n, ln):
    return (2 * (n - 1) / n * s / ln.bytes_per_s + 2 * (n - 1) * ln.latency_s) * 1e3


def _size(s: int) -> str:
    for unit, k in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if s >= k:
            return f"{s // k} {unit}"
    return f"{s} B"


def plot(r: dict, out_dir: str) -> list[str]:
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None:
        return []
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
    for op in OPS:
        xs = [x for x in r["rows"] if x["op"] == op]
        axs[0].loglog([x["bytes"] for x in xs], [x["busbw_gb_s"] for x in xs], "o-", markersize=3, label=op)
        axs[1].loglog([x["bytes"] for x in xs], [x["seconds"] * 1e6 for x in xs], "o-", markersize=3, label=op)
    axs[0].set_xlabel("bytes per device")
    axs[0].set_ylabel("bus bandwidth (GB/s)")
    axs[1].set_xlabel("bytes per device")
    axs[1].set_ylabel("time per call (us)")
    axs[0].legend(fontsize=8)
    fig.suptitle(r["devices"], fontsize=9)
    return [save(plt, fig, out_dir, "collectives.png")]


def main(argv=None):
    from jaxpar.tools import cli
    p = cli.parser("bench collectives", cli.describe(__doc__))
    p.add_argument("--devices", type=int, help="use the first N devices (default all)")
    p.add_argument("--min-log2", type=int, default=10, help="smallest message, log2 bytes (default 10 = 1 KiB)")
    p.add_argument("--max-log2", type=int, default=26, help="largest message, log2 bytes (default 26 = 64 MiB)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls per operation and message size, the fastest kept (default 5; one more "
                        "untimed call compiles first)")
    p.add_argument("--compare", default="h100-nvlink", help="hardware preset shown for comparison")
    p.add_argument("--out", default="bench_out",
                   help="output directory: collectives.json and, with matplotlib, collectives.png (default "
                        "bench_out); the table goes to stdout")
    args = p.parse_args(argv)
    if args.min_log2 < 4 or args.max_log2 < args.min_log2 or args.max_log2 > 34:
        cli.fail(f"--min-log2/--max-log2 must satisfy 4 <= min <= max <= 34, got {args.min_log2}, {args.max_log2}")
    from jaxpar.analysis.hardware import load_hardware
    from jaxpar.errors import HardwareError
    try:
        hw = load_hardware(args.compare)
    except HardwareError as e:
        cli.fail(str(e).replace("--hardware", "--compare"))
    cli.start(args)
    from jaxpar.benchmarks.output import publish
    r = run(args)
    publish(args.out, "collectives.json", r, markdown(r, hw), lambda out: plot(r, out))


