"""`python -m jaxpar.bench quant`: 8-bit weights and KV cache against float, per format and mesh.

- products: one weight product of a decode step (a matrix-vector product, and batch 16) in float32, and with
  int8 / fp8 weights dequantized before the dot (what jaxpar runs: model/quant.py) or scaled after it.
- meshes: per format and mesh, parameter bytes and KV cache bytes per token on one device, and whether the
  greedy tokens equal that format's single-device tokens.
- accuracy: tiny-add's exact match on the 1,000 held-out sums per format (and tiny-add-moe on ep8).
- speed: decode time per token at batch 1 on one device, a model big enough that its weights dominate.
- shapes: bytes of the shipped real-shape configs per format (the abstract model: nothing allocated)."""
from __future__ import annotations

import time

import numpy as np

FORMATS = {"float32": {}, "int8 weights": {"quantize": "int8"}, "int8 weights + int8 KV": {"quantize": "int8",
           "kv_dtype": "int8"}, "fp8 weights + fp8 KV": {"quantize": "fp8", "kv_dtype": "fp8"}}
# decode speed: matrices large enough that reading the weights is most of a step
SPEED_MODEL = dict(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, head_dim=128, rope_theta=10000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False)
PROMPTS = ["12+34=", "7+8=", "99+1=", "5+55=", "250+250="]


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def products(d_in: int, d_out: int, repeats: int) -> list:
    import jax
    import jax.numpy as jnp

    from jaxpar.model import quant
    w = jax.random.normal(jax.random.key(0), (d_in, d_out), jnp.float32) * 0.02
    plain = jax.jit(lambda x, w: x @ w)
    before = jax.jit(lambda x, q: x @ q.dequantize(x.dtype))  # jaxpar's order (quant.einsum)
    after = jax.jit(lambda x, q: (x @ q.values.astype(x.dtype)) * q.scale)
    rows = []
    for batch in (1, 16):
        x = jax.random.normal(jax.random.key(1), (batch, d_in), jnp.float32)
        base = _best(lambda: plain(x, w).block_until_ready(), repeats)
        rows.append({"batch": batch, "weights": "float32", "order": "", "ms": base * 1e3, "vs_float32": 1.0})
        for fmt in ("int8", "fp8"):
            q = quant.quantize(w, fmt, (1, d_out))
            for order, fn in (("dequantize, then dot", before), ("dot, then scale", after)):
                t = _best(lambda: fn(x, q).block_until_ready(), repeats)
                rows.append({"batch": batch, "weights": fmt, "order": order, "ms": t * 1e3, "vs_float32": t / base})
    return rows


def meshes(names: list) -> list:
    import jaxpar
    from jaxpar.engine.state import bytes_per_token
    rows = []
    for fmt, kw in FORMATS.items():
        ref = {}
        for mesh in names:
            eng = jaxpar.load(mesh=mesh, **kw)
            toks = eng.generate_tokens([eng.tokenizer.encode(p) for p in PROMPTS], max_new_tokens=8)
            model = "tiny-add-moe" if eng.config.num_local_experts else "tiny-add"  # the mesh's default model
            ref.setdefault(model, toks)
            rows.append({"format": fmt, "mesh": mesh, "model": model,
                         "params_bytes_per_device": eng.params_bytes_per_device(),
                         "kv_bytes_per_token_per_device": bytes_per_token(eng.config, eng.kv_repeat, eng.layout),
                         "same_tokens_as_single": toks == ref[model]})
            print(f"  {fmt}, {mesh}: {rows[-1]['params_bytes_per_device']:,} parameter bytes per device", flush=True)
    return rows


def accuracy() -> list:
    import jaxpar
    from jaxpar.train.add import accuracy as exact_match, heldout_problems
    rows = []
    for fmt, kw in FORMATS.items():
        for mesh in ("dp8", "ep8"):
            if mesh == "ep8" and fmt not in ("float32", "int8 weights + int8 KV"):
                continue
            rows.append({"format": fmt, "mesh": mesh, "model": "tiny-add-moe" if mesh == "ep8" else "tiny-add",
                         "exact_match": exact_match(jaxpar.load(mesh=mesh, **kw), heldout_problems())})
            print(f"  {fmt}, {mesh}: {rows[-1]['exact_match']:.3f}", flush=True)
    return rows


def speed(new_tokens: int, repeats: int) -> list:
    import jax

    import jaxpar
    from jaxpar.config import config_from_dict
    cfg = config_from_dict(SPEED_MODEL, "bench quant")
    rows = []
    for fmt, kw in FORMATS.items():
        eng = jaxpar.load(mesh="single", model=cfg, devices=jax.devices()[:1], **kw)
        t = _best(lambda: eng.generate_tokens([[1, 2, 3, 4]], max_new_tokens=new_tokens), repeats)
        rows.append({"format": fmt, "ms_per_token": t / new_tokens * 1e3,
                     "params_bytes": eng.params_bytes_per_device()})
        print(f"  {fmt}: {rows[-1]['ms_per_token']:.2f} ms a token", flush=True)
    base = rows[0]["ms_per_token"]
    for r in rows:
        r["vs_float32"] = r["ms_per_token"] / base
    return rows


def shapes() -> list:
    from jaxpar.analysis import sizing as S
    from jaxpar.config import load_config, shipped_config_names
    from jaxpar.layout.mesh_file import parse_mesh
    one, rows = parse_mesh({}, "single"), []
    for name in (n for n in shipped_config_names() if not n.startswith("tiny")):
        cfg = load_config(name)
        f32 = S.params_bytes_per_device(cfg, one, 1, "float32", "float32")
        by = {d: S.params_bytes_per_device(cfg, one, 1, d, "bf16") for d in ("bf16", "int8", "fp8")}
        kv = S.kv_value_bytes(cfg, "int8", "bf16") / S.kv_value_bytes(cfg, "bf16", "bf16")
        rows.append({"model": name, "float32_bytes": f32, **{f"{d}_bytes": b for d, b in by.items()},
                     "int8_vs_float32": by["int8"] / f32, "kv_int8_vs_bf16": kv})
    return rows


def markdown(r: dict) -> str:
    out = [f"On {r['devices']}.", "", f"**Weight products** ([{r['d_in']}, {r['d_out']}] weight, best of "
           f"{r['repeats']}):", "", "| batch | weights | order | ms | vs float32 |", "|---|---|---|---|---|"]
    out += [f"| {x['batch']} | {x['weights']} | {x['order']} | {x['ms']:.3f} | {x['vs_float32']:.1f}x |"
            for x in r["products"]]
    out += ["", "**Decode at batch 1 on one device** (a 4-layer model, hidden 1024, FFN 4096, vocab 8192):", "",
            "| format | parameter bytes | ms a token | vs float32 |", "|---|---|---|---|"]
    out += [f"| {x['format']} | {x['params_bytes'] / 2 ** 20:.1f} MiB | {x['ms_per_token']:.2f} | "
            f"{x['vs_float32']:.2f}x |" for x in r["speed"]]
    out += ["", "**Per mesh** (greedy tokens of 5 prompts, 8 new tokens, against the same format on `single`):", "",
            "| format | mesh | model | parameter bytes / device | KV bytes / token / device | same tokens |",
            "|---|---|---|---|---|---|"]
    out += [f"| {x['format']} | {x['mesh']} | {x['model']} | {x['params_bytes_per_device']:,} | "
            f"{x['kv_bytes_per_token_per_device']:,} | {'yes' if x['same_tokens_as_single'] else 'NO'} |"
            for x in r["meshes"]]
    out += ["", "**Accuracy** (exact match on 1,000 held-out sums):", "", "| format | mesh | model | exact match |",
            "|---|---|---|---|"]
    out += [f"| {x['format']} | {x['mesh']} | {x['model']} | {x['exact_match']:.3f} |" for x in r["accuracy"]]
    out += ["", "**Real shapes** (weights of one copy of the model; scales, embedding and LM head included):", "",
            "| model | float32 | bf16 | int8 | fp8 | int8 / float32 | int8 KV / bf16 KV |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {x['model']} | {x['float32_bytes'] / 1e9:.2f} GB | {x['bf16_bytes'] / 1e9:.2f} GB | "
            f"{x['int8_bytes'] / 1e9:.2f} GB | {x['fp8_bytes'] / 1e9:.2f} GB | {x['int8_vs_float32']:.4f} | "
            f"{x['kv_int8_vs_bf16']:.4f} |" for x in r["shapes"]]
    return "\n".join(out)


def main(argv=None):
    from jaxpar.tools import cli
    p = cli.parser("bench quant", cli.describe(__doc__))
    p.add_argument("--mesh", nargs="+", default=["single", "tp4", "sp4", "sp4_ulysses", "pp2_tp4", "ep8"],
                   help="meshes of the per-mesh table (default single tp4 sp4 sp4_ulysses pp2_tp4 ep8)")
    p.add_argument("--d-in", type=int, default=2048, help="weight rows of the product table (default 2048)")
    p.add_argument("--d-out", type=int, default=8192, help="weight columns of the product table (default 8192)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timed run (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point, the fastest kept (default 5)")
    p.add_argument("--skip-accuracy", action="store_true", help="leave out the held-out accuracy (the slow part)")
    p.add_argument("--out", default="bench_out", help="output directory for quant.json (default bench_out)")
    args = p.parse_args(argv)
    if min(args.d_in, args.d_out, args.new_tokens, args.repeats) < 1:
        cli.fail("--d-in, --d-out, --new-tokens and --repeats must be >= 1")
    cli.start(args, fake_default=8)
    import jax
    from jaxpar.benchmarks.output import publish
    d = jax.devices()
    r = {"devices": f"{len(d)} x {d[0].device_kind} ({d[0].platform})", "d_in": args.d_in, "d_out": args.d_out,
         "repeats": args.repeats}
    print("weight products", flush=True)
    r["products"] = products(args.d_in, args.d_out, args.repeats)
    print("decode speed", flush=True)
    r["speed"] = speed(args.new_tokens, max(2, args.repeats // 2))
    print("meshes", flush=True)
    r["meshes"] = meshes(args.mesh)
    r["accuracy"] = [] if args.skip_accuracy else accuracy()
    r["shapes"] = shapes()
    publish(args.out, "quant.json", r, markdown(r))
