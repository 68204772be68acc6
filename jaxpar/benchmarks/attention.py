"""`python -m jaxpar.bench attention`: causal prefill attention of one layer, dense (the whole [S, S] score
matrix) against blockwise (model/attend.causal_blockwise) at several block sizes, on one device: time, the
largest score array each holds, and the largest difference from dense. The block sizes jaxpar picks
(parallel/attention.block_size) come from this table. With --window W both attend within a sliding window of
W positions (blockwise skips the key blocks before it)."""
from __future__ import annotations

import time

import numpy as np


def _best(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(lengths, blocks, heads: int, kv_heads: int, head_dim: int, batch: int, repeats: int,
            window: int | None = None) -> list:
    import jax
    import jax.numpy as jnp

    from jaxpar.model.attend import AttentionSpec, attend, causal_blockwise
    from jaxpar.parallel.attention import block_size
    spec = AttentionSpec(window=window)
    rows = []
    for s in lengths:
        r = np.random.RandomState(s)
        q = jnp.asarray(r.randn(batch, s, heads, head_dim), jnp.float32)
        k, v = (jnp.asarray(r.randn(batch, s, kv_heads, head_dim), jnp.float32) for _ in range(2))
        pos = jnp.arange(s)
        mask = jnp.broadcast_to(spec.visible(pos[:, None], pos[None, :]), (batch, s, s))
        dense = jax.jit(lambda q, k, v, mask: attend(q, k, v, mask, spec))
        want = dense(q, k, v, mask)
        rows.append({"tokens": s, "kind": "dense", "block": None, "ms": _best(dense, (q, k, v, mask), repeats) * 1e3,
                     "score_bytes": batch * heads * s * s * 4, "max_diff": 0.0, "chosen": block_size(s) is None})
        print(f"  {s} tokens, dense: {rows[-1]['ms']:.2f} ms", flush=True)
        for blk in blocks:
            if s % blk or blk > s:
                continue
            fn = jax.jit(lambda q, k, v, blk=blk: causal_blockwise(q, k, v, blk, spec))
            diff = float(jnp.abs(fn(q, k, v) - want).max())
            rows.append({"tokens": s, "kind": "blockwise", "block": blk, "ms": _best(fn, (q, k, v), repeats) * 1e3,
                         "score_bytes": batch * heads * blk * blk * 4, "max_diff": diff,
                         "chosen": block_size(s) == blk})
            print(f"  {s} tokens, block {blk}: {rows[-1]['ms']:.2f} ms", flush=True)
    return rows


def markdown(r: dict) -> str:
    window = f", sliding window {r['window']}" if r.get("window") else ""
    out = [f"one layer, batch {r['batch']}, {r['heads']} heads, {r['kv_heads']} kv heads, head_dim {r['head_dim']}, "
           f"float32{window}, {r['devices']}", "",
           "| tokens | attention | ms | largest score array | max difference from dense | jaxpar's choice |",
           "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        kind = "dense" if x["kind"] == "dense" else f"blockwise, block {x['block']}"
        out.append(f"| {x['tokens']} | {kind} | {x['ms']:.2f} | {x['score_bytes'] / 2 ** 20:.2f} MiB | "
                   f"{x['max_diff']:.1e} | {'yes' if x['chosen'] else ''} |")
    return "\n".join(out)


def main(argv=None):
    from jaxpar.tools import cli
    p = cli.parser("bench attention", cli.describe(__doc__))
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                   help="prompt lengths S to time (default 256 512 1024 2048 4096)")
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 512],
                   help="block sizes of the blockwise kernel, each timed against dense; one that does not divide a "
                        "length is skipped there (default 64 128 256 512)")
    p.add_argument("--heads", type=int, default=12, help="query heads of the layer (default 12)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads of the layer (default 4)")
    p.add_argument("--head-dim", type=int, default=64, help="size of each head (default 64)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point, the fastest kept (default 5)")
    p.add_argument("--window", type=int, default=None,
                   help="attend within a sliding window of this many positions (default: full causal attention)")
    p.add_argument("--out", default="bench_out", help="output directory for attention.json (default bench_out)")
    args = p.parse_args(argv)
    if min(args.lengths + args.blocks) < 1 or args.heads % args.kv_heads or (args.window or 1) < 1:
        cli.fail("--lengths, --blocks and --window must be positive and --heads a multiple of --kv-heads")
    cli.start(args)  # one device is all it uses
    import jax
    from jaxpar.benchmarks.output import publish
    d = jax.devices()[0]
    r = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
         "window": args.window, "devices": f"{d.device_kind} ({d.platform})",
         "rows": measure(args.lengths, args.blocks, args.heads, args.kv_heads, args.head_dim, args.batch,
                         args.repeats, args.window)}
    publish(args.out, "attention.json", r, markdown(r))
