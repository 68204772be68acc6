"""python -m jaxpar.inspect: compile prefill and decode for a layout and report what the compiled programs
do: collectives (count per step, loop trips included; per-device bytes) and per-device memory. With
--platform tpu|cuda: lower the programs that platform would run, on devices that need not be here, and
report each one's attention implementation, kernels (custom calls) and the collectives it writes."""
from __future__ import annotations

import json

from jaxpar.tools import cli


def inspect_engine(engine, batch: int = 1, prompt_len: int = 16, max_new_tokens: int = 16) -> dict:
    from jaxpar.analysis.hlo import report
    from jaxpar.engine.engine import compile_steps
    from jaxpar.engine.state import bytes_per_token

    c = compile_steps(engine, batch, prompt_len, max_new_tokens)
    return {"devices": engine.mesh.size, "mesh": dict(engine.model_layout.mesh_cfg.axes),
            "batch": c["batch"], "prompt_len": c["prompt_len"], "cache_len": c["cache_len"], "page_size": c["page_size"],
            "kv_repeat": engine.kv_repeat,
            "params_bytes_per_device": engine.params_bytes_per_device(),
            "kv_cache_bytes_per_device": c["kv_cache_bytes_per_device"],
            "kv_bytes_per_token_per_device": bytes_per_token(engine.config, engine.kv_repeat, engine.layout),
            "prefill": report(c["prefill"]), "decode": report(c["decode"]),
            "compile_seconds": c["compile_s"]}


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def print_human(r: dict) -> None:
    mesh = " x ".join(f"{a}={s}" for a, s in r["mesh"].items()) or "single device"
    print(f"mesh: {mesh} ({r['devices']} devices); batch {r['batch']}, prompt {r['prompt_len']}, "
          f"cache {r['cache_len']} tokens")
    print(f"params per device: {_mib(r['params_bytes_per_device'])}   "
          f"KV cache per device: {_mib(r['kv_cache_bytes_per_device'])} "
          f"({r['kv_bytes_per_token_per_device']:,} bytes a token)")
    for step in ("prefill", "decode"):
        m = r[step]["memory"]
        print(f"\n{step}: peak {_mib(m['peak_bytes'])} per device (args {_mib(m['argument_bytes'])}, "
              f"out {_mib(m['output_bytes'])}, temp {_mib(m['temp_bytes'])}); "
              f"compiled in {r['compile_seconds'][step]:.2f}s")
        print(f"  {'collective':<20}{'count':>8}{'bytes/device':>16}")
        for op, v in r[step]["collectives"].items():
            print(f"  {op:<20}{v['count']:>8}{v['bytes']:>16,}")


def inspect_platform(args) -> dict:
    """`--platform`: the model's config only (no weights are read), in bfloat16 unless --dtype says otherwise."""
    from jaxpar.api import model_config, with_storage
    from jaxpar.engine.engine import check_sampling
    from jaxpar.engine.lowering import lower_for
    from jaxpar.errors import JaxparError
    from jaxpar.layout.mesh_file import load_mesh_file

    mesh_cfg = load_mesh_file(args.mesh)
    if args.devices is not None:
        mesh_cfg = mesh_cfg.resolved(args.devices)
    if args.hf is not None:
        from jaxpar.hf.config import read_hf_config
        cfg = read_hf_config(args.hf)
    else:
        cfg, _ = model_config(mesh_cfg, args.model, args.checkpoint)
    check_sampling(args.max_new_tokens)
    if not 1 <= args.prompt_len <= cfg.max_position_embeddings or args.batch < 1:
        raise JaxparError(f"--prompt-len must be between 1 and the context window of {cfg.max_position_embeddings} "
                          f"and --batch >= 1, got {args.prompt_len} and {args.batch}")
    cfg = with_storage(cfg, args.dtype or "bfloat16", args.quantize, args.kv_dtype, args.checkpoint or args.hf)
    return lower_for(args.platform, mesh_cfg, cfg, args.batch, args.prompt_len, args.max_new_tokens, args.devices)


def print_platform(r: dict) -> None:
    mesh = " x ".join(f"{a}={s}" for a, s in r["mesh"].items()) or "single device"
    print(f"lowered for {r['platform']}: mesh {mesh} ({r['devices']} devices), {r['dtype']} (weights "
          f"{r['weights']}, KV cache {r['kv_cache']}), layers {r['layers']}; "
          f"batch {r['batch']}, prompt {r['prompt_len']}, cache {r['cache_len']} tokens")
    for name, p in r["programs"].items():
        calls = ", ".join(f"{t} x{n}" for t, n in p["custom_calls"].items()) or "none"
        ops = ", ".join(f"{op} x{n}" for op, n in p["collectives"].items()) or "none"
        print(f"  {name:<16} attention: {p['attention']:<24} kernels (custom calls): {calls}; collectives in the "
              f"module: {ops}")
        if p.get("experts", "none") != "none":  # how the MoE layers reach their experts (parallel/experts.py)
            print(f"  {'':<16} experts: {p['experts']}")


def main(argv=None):
    p = cli.parser("inspect", cli.describe(__doc__))
    cli.add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="sets the KV cache length (default 16)")
    p.add_argument("--platform", choices=("tpu", "cuda"), default=None,
                   help="lower for this platform instead of compiling here: no such device is needed, and no "
                        "weights are read (the model's config only); exits 0 when every program lowers")
    p.add_argument("--devices", type=int, default=None,
                   help="with --platform: devices to lower for (default: the mesh's size; needed for a -1 axis)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.devices is not None and (args.platform is None or args.devices < 1):
        cli.fail("--devices N (N >= 1) goes with --platform; without it the devices are this machine's "
                 "(--fake-devices N on a CPU)")
    cli.start(args)
    if args.platform is not None:
        r = inspect_platform(args)
        print(json.dumps(r, indent=1)) if args.json else print_platform(r)
        return
    r = inspect_engine(cli.load_engine(args), args.batch, args.prompt_len, args.max_new_tokens)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print_human(r)


if __name__ == "__main__":
    cli.run(main)
