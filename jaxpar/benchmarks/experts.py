"""python -m jaxpar.bench moe: expert parallelism against capacity factor, and EP against TP on the bytes
each moves.

For each capacity factor (0 = dropless) on an expert-parallel mesh: decode tokens/s, expert load
imbalance (max / mean tokens per expert, averaged over layers), the share of token-expert assignments
dropped, and whether the answers stay right. Then bytes moved per token by prefill and decode on the EP
mesh and on a tensor-parallel mesh of the same size, read from the compiled programs."""
from __future__ import annotations

import time

from jaxpar.benchmarks.output import publish
from jaxpar.tools import cli

FACTORS = [0.5, 1.0, 1.25, 2.0, 0.0]


def _mesh(axes: dict, cf: float, name: str):
    from jaxpar.layout.mesh_file import parse_mesh
    return parse_mesh({"axes": axes, "capacity_factor": cf}, name)


def sweep_capacity(args) -> list[dict]:
    import jaxpar
    from jaxpar.train.add import heldout_problems
    problems = heldout_problems(args.batch)
    prompts = [f"{a}+{b}=" for a, b in problems]
    rows = []
    for cf in args.capacity_factors:
        eng = jaxpar.load(mesh=_mesh({"expert": args.experts}, cf, f"ep{args.experts}"), model=args.model)
        ids = [eng.tokenizer.encode(p) for p in prompts]
        eng.generate_tokens(ids, max_new_tokens=args.new_tokens, stop_at_eos=False)  # compile
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            eng.generate_tokens(ids, max_new_tokens=args.new_tokens, stop_at_eos=False)
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, eng.last_stats)
        ex = best[1]["experts"]
        answers = eng.generate(prompts, max_new_tokens=6)
        right = sum(o == str(a + b) for o, (a, b) in zip(answers, problems)) / len(problems)
        rows.append({"capacity_factor": cf, "tokens_per_s": args.batch * args.new_tokens / best[0],
                     "imbalance_mean_over_layers": sum(ex["imbalance"]) / len(ex["imbalance"]),
                     "imbalance_per_layer": ex["imbalance"], "dropped_fraction": ex["dropped_total"] / ex["assignments"],
                     "exact_match": right})
        r = rows[-1]
        print(f"  capacity {cf:>4}: {r['tokens_per_s']:7.1f} tokens/s, imbalance {r['imbalance_mean_over_layers']:.2f}, "
              f"dropped {r['dropped_fraction'] * 100:5.1f}%, exact {right * 100:.1f}%", flush=True)
    return rows


def bytes_per_token(args) -> list[dict]:
    import jaxpar
    from jaxpar.inspect import inspect_engine
    rows = []
    n = args.experts
    for name, axes in ((f"ep{n}", {"expert": n}), (f"tp{n}", {"tensor": n})):
        eng = jaxpar.load(mesh=_mesh(axes, 0.0, name), model=args.model)
        for cf in ([0.0, 1.25] if "expert" in axes else [0.0]):
            if cf:
                eng = jaxpar.load(mesh=_mesh(axes, cf, name), model=args.model)
            r = inspect_engine(eng, batch=args.batch, prompt_len=args.prompt_len)
            row = {"mesh": name, "capacity_factor": cf if "expert" in axes else None,
                   "params_bytes_per_device": r["params_bytes_per_device"]}
            for step, tokens in (("prefill", r["batch"] * r["prompt_len"]), ("decode", r["batch"])):
                c = r[step]["collectives"]
                row[f"{step}_bytes_per_token"] = sum(v["bytes"] for v in c.values()) / tokens * eng.mesh.size
                row[f"{step}_by_op"] = {k: v["bytes"] for k, v in c.items() if v["count"]}
            rows.append(row)
            print(f"  {name} cf={cf}: prefill {row['prefill_bytes_per_token']:,.0f} B/token, decode "
                  f"{row['decode_bytes_per_token']:,.0f} B/token (all devices)", flush=True)
    return rows


def main(argv=None):
    p = cli.parser("bench moe", "Expert parallelism: capacity factor sweep and EP vs TP bytes per token.")
    p.add_argument("--model", default="tiny-add-moe", help="MoE model config or shipped name (default tiny-add-moe)")
    p.add_argument("--experts", type=int, default=8, help="size of the expert axis (and of the TP mesh compared)")
    p.add_argument("--capacity-factors", type=float, nargs="+", default=FACTORS,
                   help="capacity factors of the sweep, 0 = dropless: no assignment is ever dropped (default "
                        + " ".join(map(str, FACTORS)) + ")")
    p.add_argument("--batch", type=int, default=64,
                   help="prompts per run of the sweep (held-out addition problems, whose answers are checked), "
                        "and the batch of the programs whose bytes are counted (default 64)")
    p.add_argument("--prompt-len", type=int, default=16,
                   help="prompt length of the programs whose bytes per token are counted (default 16; the "
                        "sweep's prompts are the addition problems as they are)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="tokens generated per prompt in each timed run of the sweep (default 16)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per capacity factor, the fastest kept (default 3; an untimed run compiles "
                        "first)")
    p.add_argument("--out", default="bench_out",
                   help="output directory: moe.json (default bench_out); the tables go to stdout")
    args = p.parse_args(argv)
    cli.start(args, fake_default=8)
    print(f"capacity factor on ep{args.experts} (batch {args.batch}, {args.new_tokens} new tokens):", flush=True)
    result = {"model": args.model, "batch": args.batch, "capacity": sweep_capacity(args)}
    print("bytes moved per token:", flush=True)
    result["bytes_per_token"] = bytes_per_token(args)
    publish(args.out, "moe.json", result, markdown(result))


def markdown(r) -> str:
    out = [f"model {r['model']}, batch {r['batch']}", "",
           "| capacity factor | tokens/s | load imbalance (max/mean) | dropped | exact match |", "|---|---|---|---|---|"]
    for x in r["capacity"]:
        cf = "dropless (0)" if x["capacity_factor"] == 0 else x["capacity_factor"]
        out.append(f"| {cf} | {x['tokens_per_s']:.1f} | {x['imbalance_mean_over_layers']:.2f} | "
                   f"{x['dropped_fraction'] * 100:.1f}% | {x['exact_match'] * 100:.1f}% |")
    out += ["", "| mesh | capacity | params/device (KiB) | prefill bytes/token | decode bytes/token |", "|---|---|---|---|---|"]
    for x in r["bytes_per_token"]:
        cf = "-" if x["capacity_factor"] is None else ("dropless" if x["capacity_factor"] == 0 else x["capacity_factor"])
        out.append(f"| {x['mesh']} | {cf} | {x['params_bytes_per_device'] / 1024:.1f} | "
                   f"{x['prefill_bytes_per_token']:,.0f} | {x['decode_bytes_per_token']:,.0f} |")
    return "\n".join(out)
