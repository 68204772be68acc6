"""python -m jaxpar.bench: measure layouts side by side. The default is the sweep (meshes x batch x context:
time to first token, time per output token, tokens/s, per-device memory, bytes moved, and the planner's
prediction of those bytes); `seq`, `moe`, `pp` and `collectives` are the focused benchmarks."""
from __future__ import annotations

from jaxpar.tools import cli

SHIPPED = ["single", "dp8", "tp2", "tp4", "tp8", "dp2_tp4", "sp4", "sp8", "sp4_ulysses", "dp2_sp2_tp2", "pp2", "pp4",
           "pp2_tp4", "ep8", "dp2_ep4", "tp2_ep4"]  # expert meshes run tiny-add-moe (their default model)
SUBCOMMANDS = {"seq": "sequence", "moe": "experts", "pp": "pipeline", "collectives": "collectives",
               "attention": "attention", "continuous": "continuous",
               "serve": "serve", "accelerator": "accelerator", "quant": "quant"}


def _device_summary() -> str:
    import jax
    d = jax.devices()
    return f"{len(d)} x {d[0].device_kind} ({d[0].platform})"


def main(argv=None):
    import importlib
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return importlib.import_module(f"jaxpar.benchmarks.{SUBCOMMANDS[argv[0]]}").main(argv[1:])
    if "--vs-transformers" in argv:
        from jaxpar.benchmarks import vs_transformers
        return vs_transformers.main([a for a in argv if a != "--vs-transformers"])
    p = cli.parser("bench", "Measure layouts side by side: meshes x batch x context, written as sweep.json, "
                   "sweep.csv, a Markdown table and PNG plots. Focused benchmarks (each with --help): "
                   "`bench seq` (sequence parallelism against N and context), `bench moe` (expert parallelism "
                   "against capacity factor, EP vs TP), `bench pp` (pipeline bubble, PP vs TP), "
                   "`bench collectives` (collective bandwidth against message size), `bench attention` (blockwise "
                   "against dense prefill attention), `bench continuous` (continuous against static batching: "
                   "throughput, latency against the admission interval, chunked prefill), `bench serve` (an "
                   "OpenAI-compatible server under Poisson arrivals: latency percentiles, throughput, goodput), "
                   "`bench accelerator` (the device check for a real GPU or TPU: decode bandwidth and prefill FLOP "
                   "utilisation, the shipped meshes, serving), `bench quant` (int8 and fp8 weights and KV cache "
                   "against float: products, decode speed, bytes and tokens per mesh, accuracy, real shapes); "
                   "`bench --vs-transformers` "
                   "(decode and prefill speed against Hugging Face transformers on this CPU).")
    p.add_argument("--mesh", nargs="+", default=SHIPPED, help="mesh files or shipped names (default: all shipped)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="model config or shipped name (default: tiny-add; tiny-add-moe on expert meshes)")
    g.add_argument("--checkpoint", help="jaxpar checkpoint directory")
    cli.add_storage_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 48], help="prompt lengths (default 16 48)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point, best kept (default 2)")
    p.add_argument("--accuracy", action="store_true",
                   help="also score the embedded models on 1,000 held-out sums (tiny-add on dp8, tiny-add-moe on ep8)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    p.add_argument("--vs-transformers", action="store_true", help="run the transformers comparison instead "
                                                                  "(its own options: bench --vs-transformers --help)")
    args = p.parse_args(argv)
    for name in ("batches", "contexts"):
        if any(v < 1 for v in getattr(args, name)):
            cli.fail(f"--{name} must be positive, got {getattr(args, name)}")
    if args.new_tokens < 1 or args.repeats < 1:
        cli.fail("--new-tokens and --repeats must be >= 1")
    cli.start(args)
    import os
    os.makedirs(args.out, exist_ok=True)  # before the sweep: an unwritable --out fails now, not after it
    import jaxpar
    from jaxpar.benchmarks import sweep
    from jaxpar.benchmarks.output import publish, write_csv

    def load(mesh):
        return jaxpar.load(mesh=mesh, model=args.model, checkpoint=args.checkpoint, **cli.storage(args))
    results = {"devices": _device_summary(), "sweep": sweep.sweep(args, load)}
    table = sweep.markdown(results["sweep"], results["devices"])
    if args.dtype == "bfloat16" and "(cpu)" in results["devices"]:
        table += ("\n\nbfloat16 on XLA:CPU: the compiled collectives move float32 (the CPU compiler widens "
                  "them), so measured bytes are twice the prediction, which is what GPUs and TPUs move.")
    if args.accuracy:
        from jaxpar.train.add import accuracy, heldout_problems
        results["accuracy"] = {"heldout_problems": 1000,
                               "exact_match": accuracy(jaxpar.load(mesh="dp8"), heldout_problems()),
                               "exact_match_moe_ep8": accuracy(jaxpar.load(mesh="ep8"), heldout_problems())}
        table += (f"\n\ntiny-add exact match on 1000 held-out problems: {results['accuracy']['exact_match'] * 100:.1f}%"
                  f" (dp8); tiny-add-moe: {results['accuracy']['exact_match_moe_ep8'] * 100:.1f}% (ep8)")
    if results["sweep"]:
        print(f"wrote {write_csv(args.out, 'sweep.csv', results['sweep'])}")
    publish(args.out, "sweep.json", results, table, lambda out: sweep.plot(results["sweep"], out))


if __name__ == "__main__":
    cli.run(main)
