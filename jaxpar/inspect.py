"""python -m jaxpar.inspect: compile prefill and decode for a layout and report what the compiled programs
do: collectives (count per step, loop trips included; per-device bytes) and per-device memory."""
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


def main(argv=None):
    p = cli.parser("inspect", cli.describe(__doc__))
    cli.add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="sets the KV cache length (default 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    cli.start(args)
    r = inspect_engine(cli.load_engine(args), args.batch, args.prompt_len, args.max_new_tokens)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print_human(r)


if __name__ == "__main__":
    cli.run(main)
