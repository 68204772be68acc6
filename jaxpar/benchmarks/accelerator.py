"""`python -m jaxpar.bench accelerator`: the device check, ready for the first GPU or TPU this project gets.

In a few minutes on one real device (more where there are more) it measures:
- batch-1 decode memory-bandwidth utilisation (MBU) of a Llama-3-8B-shaped model with random bfloat16 weights:
  the bytes a decode step must read (the weights and the KV cache written so far) over the measured time per
  output token, against the device's HBM bandwidth (hardware presets, `--hardware`). The goal is >= 85%
  (gpt-fast reaches 69% on an A100);
- prefill model FLOP utilisation (MFU): 2 FLOPs per weight per token plus causal attention, over the time to
  the first token, against the device's dense bfloat16 peak;
- the sweep's points (time, memory, bytes moved against the planner's prediction) on every shipped mesh the
  device count allows, with the default tiny models;
- the serving benchmark (an OpenAI-compatible server under a burst of requests) on `single`.
It writes accelerator.json and accelerator.md (a table for BENCHMARKS.md) under --out. Decode runs
`--decode-steps` steps per program, so the host's admission work between programs is amortised.

On CPU it refuses unless --allow-cpu (the tests run it that way, with a tiny model, to keep it working)."""
from __future__ import annotations

import json
import os
import time

from jaxpar.tools import cli

# device_kind substrings -> hardware presets (analysis/hardware.yaml)
KINDS = (("H200", "h200-nvlink"), ("H100", "h100-nvlink"), ("B200", "b200-nvlink"), ("A100", "a100-nvlink"),
         ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v6", "tpu-v6e"))


def preset_for(device_kind: str) -> str | None:
    return next((p for k, p in KINDS if k.lower() in device_kind.lower()), None)


def decode_mbu(eng, hw, prompt_len: int, new_tokens: int) -> dict:
    """Batch 1: the bytes one decode step reads (every weight once, the KV cache written so far, on average
    half way through the generation) / time per output token / HBM bandwidth."""
    from jaxpar.engine.state import bytes_per_token

    prompt = list(range(3, 3 + prompt_len))
    kw = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    eng.generate_tokens([prompt], **kw)  # compile, warm up
    best = min((_timed(eng, [prompt], kw) for _ in range(3)), key=lambda s: s["tpot_s"])
    weights = eng.params_bytes_per_device()
    kv = bytes_per_token(eng.config, eng.kv_repeat, eng.layout) * (prompt_len + new_tokens / 2)
    per_s = (weights + kv) / best["tpot_s"]
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "tpot_ms": best["tpot_s"] * 1e3,
            "weights_bytes": weights, "kv_bytes_read": kv, "achieved_gb_per_s": per_s / 1e9,
            "hbm_gb_per_s": hw.hbm_bytes_per_s / 1e9, "mbu": per_s / hw.hbm_bytes_per_s}


def prefill_mfu(eng, hw, prompt_len: int) -> dict:
    """One prompt: (2 x weights used per token + causal attention) FLOPs / time to first token / peak."""
    from jaxpar.analysis.sizing import param_count

    cfg = eng.config
    prompt = [list(range(3, 3 + prompt_len))]
    kw = dict(max_new_tokens=1, stop_at_eos=False)
    eng.generate_tokens(prompt, **kw)
    best = min((_timed(eng, prompt, kw) for _ in range(3)), key=lambda s: s["ttft_s"])
    # every weight is used once per token in a matmul (a dense model), except an untied embedding's lookup
    matmul = param_count(cfg) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * prompt_len ** 2
    flops = 2 * matmul * prompt_len + attention  # the lookup is no matmul; the LM head is
    peak = hw.peak("bf16" if cfg.dtype == "bfloat16" else "float32") * eng.mesh.size
    return {"prompt_len": prompt_len, "ttft_ms": best["ttft_s"] * 1e3, "flops": flops,
            "achieved_tflops": flops / best["ttft_s"] / 1e12, "peak_tflops": peak / 1e12,
            "mfu": flops / best["ttft_s"] / peak}


def _timed(eng, prompts, kw) -> dict:
    eng.generate_tokens(prompts, **kw)
    return dict(eng.last_stats)


def markdown(r: dict) -> str:
    d, p = r["decode"], r["prefill"]
    lines = [f"Device: {r['devices']} x {r['device_kind']} ({r['platform']}), preset {r['hardware']}; model "
             f"{r['model']} ({r['dtype']}, random weights); jax {r['jax']}.", "",
             "| measure | value | against |", "|---|---|---|",
             f"| decode, batch 1: time per output token | {d['tpot_ms']:.2f} ms | |",
             f"| decode MBU | {100 * d['mbu']:.1f}% | {d['achieved_gb_per_s']:.0f} of {d['hbm_gb_per_s']:.0f} GB/s |",
             f"| prefill {p['prompt_len']} tokens: time to first token | {p['ttft_ms']:.1f} ms | |",
             f"| prefill MFU | {100 * p['mfu']:.1f}% | {p['achieved_tflops']:.0f} of {p['peak_tflops']:.0f} "
             f"TFLOP/s |"]
    if r.get("meshes"):
        lines += ["", "| mesh | batch | context | TTFT (ms) | TPOT (ms) | prefill bytes moved (predicted) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['mesh']} | {m['batch']} | {m['context']} | {m['ttft_ms']:.2f} | {m['tpot_ms']:.2f} | "
                  f"{m['prefill_bytes_moved']:,} ({m['prefill_bytes_predicted']:,}) |" for m in r["meshes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = cli.parser("bench accelerator", cli.describe(__doc__))
    p.add_argument("--model", default="llama3-8b", help="model config or shipped name (default llama3-8b, "
                                                        "random weights)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="default bfloat16")
    p.add_argument("--hardware", help="hardware preset or file for the peaks (default: from the device kind)")
    p.add_argument("--prompt-len", type=int, default=2048, help="prefill prompt length (default 2048)")
    p.add_argument("--decode-prompt", type=int, default=128, help="decode's prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded for the MBU (default 256)")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps per program (default 64)")
    p.add_argument("--mesh", nargs="+", default=None,
                   help="meshes for the sweep points (default: every shipped mesh the devices allow)")
    p.add_argument("--skip-meshes", action="store_true", help="skip the meshes' sweep points")
    p.add_argument("--skip-serving", action="store_true", help="skip the serving benchmark")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU devices too (to test this script)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    args = p.parse_args(argv)
    cli.start(args)
    import jax

    import jaxpar
    from jaxpar.analysis.hardware import load_hardware
    from jaxpar.layout.rules import platform_of

    devs = jax.devices()
    platform = platform_of(devs[0])
    if platform == "cpu" and not args.allow_cpu:
        cli.fail("no GPU or TPU here (JAX sees CPU devices only): this check measures an accelerator; "
                 "`python -m jaxpar.inspect --platform tpu|cuda` checks that the programs lower for one")
    hw_name = args.hardware or preset_for(devs[0].device_kind) or ("h100-nvlink" if platform == "cpu" else None)
    if hw_name is None:
        cli.fail(f"no hardware preset for device kind {devs[0].device_kind!r}: give --hardware NAME|FILE")
    hw = load_hardware(hw_name)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    serving = {"decode_steps": args.decode_steps, "max_num_seqs": 1,
               "max_model_len": max(args.prompt_len + 1, args.decode_prompt + args.new_tokens)}
    eng = jaxpar.load(mesh="single", model=args.model, dtype=args.dtype, devices=devs[:1], **serving)
    r = {"platform": platform, "device_kind": devs[0].device_kind, "devices": len(devs), "hardware": hw_name,
         "model": args.model, "dtype": eng.config.dtype, "jax": jax.__version__,
         "decode": decode_mbu(eng, hw, args.decode_prompt, args.new_tokens),
         "prefill": prefill_mfu(eng, hw, args.prompt_len)}
    del eng
    if not args.skip_meshes:
        from jaxpar.bench import SHIPPED
        from jaxpar.benchmarks.sweep import run_point
        from jaxpar.layout.mesh_file import load_mesh_file
        r["meshes"] = []
        for mesh in (m for m in args.mesh or SHIPPED if load_mesh_file(m).device_count <= len(devs)):
            row = run_point(jaxpar.load(mesh=mesh), 8, 48, 16, 2)
            row["mesh"] = mesh
            r["meshes"].append(row)
    if not args.skip_serving:
        from jaxpar.benchmarks import serve
        serve.main(["--mesh", "single", "--requests", "32", "--out", args.out])
        with open(os.path.join(args.out, "serve.json")) as f:
            r["serving"] = json.load(f)
    r["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
        json.dump(r, f, indent=1)
    table = markdown(r)
    with open(os.path.join(args.out, "accelerator.md"), "w") as f:
        f.write(table)
    print(table + f"wrote {args.out}/accelerator.json and accelerator.md in {r['seconds']:.0f} s")


if __name__ == "__main__":
    cli.run(main)
