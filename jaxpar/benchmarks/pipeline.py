"""python -m jaxpar.bench pp: the pipeline bubble against microbatches, and pipeline against tensor
parallelism on time per output token.

Bubble: on P stages with M microbatches every device is busy M of the M+P-1 ticks, so (P-1)/(M+P-1) of
the step is bubble. Measured: t_ideal / t_step, where t_ideal is one stage's share of the work done with no
bubble (the same model cut to L/P layers, the whole batch, on one device) and t_step the pipelined step;
bubble = 1 - t_ideal / t_step. This needs the stages to really run at once, so it is measured with P no
larger than the machine's cores, each fake device computing on one thread. Latency: time per output token of
ppN against tpN on the same model."""
from __future__ import annotations

import os

from jaxpar.benchmarks.output import publish
from jaxpar.tools import cli

MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def _time(eng, batch, prompt_len, new_tokens, repeats) -> dict:
    import numpy as np
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(0, eng.config.vocab_size, prompt_len)) for _ in range(batch)]
    kw = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    eng.generate_tokens(prompts, **kw)  # compile
    best = None
    for _ in range(repeats):
        eng.generate_tokens(prompts, **kw)
        s = eng.last_stats
        if best is None or s["tpot_s"] < best["tpot_s"]:
            best = {"tpot_s": s["tpot_s"], "ttft_s": s["ttft_s"]}
    return best


def main(argv=None):
    p = cli.parser("bench pp", "Pipeline bubble against microbatches; pipeline vs tensor parallelism latency.")
    p.add_argument("--stages", type=int, default=2, help="P for the bubble sweep (at most the CPU cores; default 2)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="microbatch counts M of the bubble sweep, one P-stage mesh each (default 1 2 4 8)")
    p.add_argument("--compare", type=int, nargs="+", default=[2, 4], help="ppN vs tpN for these N (default 2 4)")
    p.add_argument("--batch", type=int, default=16,
                   help="prompts per run of the bubble sweep; the ppN vs tpN comparison runs batch 1 (default 16)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt, random ids (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt in each run (default 32)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per point, the one with the least time per output token kept (default 3; an "
                        "untimed run compiles first)")
    p.add_argument("--multi-thread", action="store_true",
                   help="let each fake device compute on several threads (default: one thread each, so that P stages "
                        "on P cores really run at once and the one-device baseline does not borrow the other cores)")
    p.add_argument("--out", default="bench_out",
                   help="output directory: pp.json and, with matplotlib, pp_bubble.png (default bench_out); the "
                        "tables go to stdout")
    args = p.parse_args(argv)
    if not args.multi_thread:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    cli.start(args, fake_default=8)
    import jax
    import jaxpar
    from jaxpar.config import config_from_dict
    from jaxpar.layout.mesh_file import parse_mesh
    cfg = config_from_dict(MODEL, "bench-pp model")
    timing = (args.batch, args.prompt_len, args.new_tokens, args.repeats)
    n = args.stages
    one = jax.devices()[:1]
    part = jaxpar.load(mesh=parse_mesh({}, "single"), model=cfg.replace(num_hidden_layers=cfg.num_hidden_layers // n),
                       devices=one)
    ideal = _time(part, *timing)
    print(f"one stage's work on one device ({cfg.num_hidden_layers // n} layers): decode {ideal['tpot_s'] * 1e3:.2f} "
          f"ms/token, prefill {ideal['ttft_s'] * 1e3:.1f} ms", flush=True)
    bubble = []
    for m in args.microbatches:
        eng = jaxpar.load(mesh=parse_mesh({"axes": {"stage": n}, "microbatches": m}, f"pp{n}_m{m}"), model=cfg)
        t = _time(eng, *timing)
        row = {"stages": n, "microbatches": m, "formula": (n - 1) / (m + n - 1),
               "decode_ms": t["tpot_s"] * 1e3, "prefill_ms": t["ttft_s"] * 1e3,
               "decode_bubble": 1 - ideal["tpot_s"] / t["tpot_s"], "prefill_bubble": 1 - ideal["ttft_s"] / t["ttft_s"]}
        bubble.append(row)
        print(f"  pp{n} M={m}: bubble formula {row['formula']:.2f}, measured decode {row['decode_bubble']:.2f}, "
              f"prefill {row['prefill_bubble']:.2f}", flush=True)
    latency = []
    for k in args.compare:
        for name, axes, extra in ((f"pp{k}", {"stage": k}, {"microbatches": 1}), (f"tp{k}", {"tensor": k}, {})):
            eng = jaxpar.load(mesh=parse_mesh({"axes": axes, **extra}, name), model=cfg)
            t = _time(eng, 1, args.prompt_len, args.new_tokens, args.repeats)
            latency.append({"mesh": name, "decode_ms": t["tpot_s"] * 1e3, "prefill_ms": t["ttft_s"] * 1e3})
            print(f"  {name} batch 1: {latency[-1]['decode_ms']:.2f} ms/token, prefill {latency[-1]['prefill_ms']:.1f} ms",
                  flush=True)
    single = _time(jaxpar.load(mesh=parse_mesh({}, "single"), model=cfg, devices=one), 1, args.prompt_len,
                   args.new_tokens, args.repeats)
    latency.insert(0, {"mesh": "single", "decode_ms": single["tpot_s"] * 1e3, "prefill_ms": single["ttft_s"] * 1e3})
    result = {"model": MODEL, "batch": args.batch, "ideal_stage": ideal, "bubble": bubble, "latency": latency}
    publish(args.out, "pp.json", result, markdown(result), lambda out: plot(bubble, out))


def markdown(r) -> str:
    out = ["| stages | microbatches | bubble (P-1)/(M+P-1) | measured, decode | measured, prefill | decode ms/step | "
           "prefill ms |", "|---|---|---|---|---|---|---|"]
    for x in r["bubble"]:
        out.append(f"| {x['stages']} | {x['microbatches']} | {x['formula']:.2f} | {x['decode_bubble']:.2f} | "
                   f"{x['prefill_bubble']:.2f} | {x['decode_ms']:.2f} | {x['prefill_ms']:.1f} |")
    out += ["", "| mesh (batch 1) | time per output token (ms) | prefill (ms) |", "|---|---|---|"]
    for x in r["latency"]:
        out.append(f"| {x['mesh']} | {x['decode_ms']:.2f} | {x['prefill_ms']:.1f} |")
    return "\n".join(out)


def plot(rows, out_dir) -> list[str]:
    from jaxpar.benchmarks.output import pyplot, save
    plt = pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ms = [r["microbatches"] for r in rows]
    ax.plot(ms, [r["formula"] for r in rows], "k--", label="(P-1)/(M+P-1)")
    ax.plot(ms, [r["decode_bubble"] for r in rows], "o-", label="measured, decode")
    ax.plot(ms, [r["prefill_bubble"] for r in rows], "s-", label="measured, prefill")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches (M)")
    ax.set_ylabel("bubble fraction")
    ax.set_title(f"pipeline bubble, P = {rows[0]['stages']}")
    ax.legend()
    return [save(plt, fig, out_dir, "pp_bubble.png")]
