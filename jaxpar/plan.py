"""python -m jaxpar.plan: size a model on N devices of some hardware, estimate every layout (or the given mesh
files) with the communication model and a roofline, and recommend one. Analytic: nothing is compiled."""
from __future__ import annotations

import json
import math
import os
import re

from jaxpar.tools import cli

DTYPES = ("float32", "bf16", "fp8", "int8", "int4")


def _dtype(name: str) -> str:
    from jaxpar.analysis.sizing import ALIASES
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        cli.fail(f"--dtype must be one of {', '.join(DTYPES)} (or bfloat16), got {name!r}")
    return name


def _params(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT])\s*", text)
        n = float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()] if m else -1
    if not (n >= 1 and math.isfinite(n)):
        cli.fail(f"--params must be a parameter count like 671B, 70e9 or 8000M, got {text!r}")
    return n


def load_model(spec: str):
    """A config file, a shipped model or config name, or a Hugging Face directory (its config.json)."""
    from jaxpar.config import load_config
    if os.path.isdir(spec):
        from jaxpar.hf.config import read_hf_config
        return read_hf_config(spec)
    return load_config(spec)


def hardware(args):
    from jaxpar.analysis.hardware import load_hardware, network
    hw = load_hardware(args.hardware)
    nodes = args.nodes
    if nodes < 1:
        cli.fail(f"--nodes must be >= 1, got {nodes}")
    if args.devices % nodes:
        cli.fail(f"--devices {args.devices} must divide into --nodes {nodes} equal nodes")
    per_node = args.devices // nodes
    if per_node > hw.devices_per_node:
        cli.fail(f"--devices {args.devices} over {nodes} node(s) is {per_node} per node, but a {hw.name} node holds "
                 f"{hw.devices_per_node}; give --nodes K (and --network) to span nodes")
    if nodes > 1 and not args.network:
        cli.fail(f"--nodes {nodes} needs --network (one of ib-ndr, ib-hdr, roce)")
    if nodes == 1 and args.network:
        cli.fail(f"--network {args.network} connects nodes: give --nodes K (K > 1) too")
    return hw.with_nodes(nodes, per_node, network(args.network) if nodes > 1 else None)


def size_by_params(args, hw) -> dict:  # hw: the preset (whole nodes), not the devices asked for
    """Sizing from a parameter count alone (architectures jaxpar does not run): weights in each dtype and the
    rule-of-thumb minimum instance, weights x KV allowance rounded up to 1, 2, 4, 8 devices or whole nodes."""
    from jaxpar.analysis.planner import min_devices
    from jaxpar.analysis.sizing import DTYPE_BYTES
    n = _params(args.params)
    w = {d: n * b for d, b in DTYPE_BYTES.items()}
    need = w[args.dtype] * args.kv_allowance
    return {"params": n, "weights_bytes": w, "dtype": args.dtype, "kv_allowance": args.kv_allowance,
            "required_bytes": need, "min_devices": min_devices(need, hw),
            "hardware": hw.name, "device_memory_bytes": hw.memory_bytes}


def plan(args, hw, cfg, preset) -> dict:
    from jaxpar.analysis import planner as PL
    from jaxpar.analysis import sizing as S
    from jaxpar.layout.mesh_file import load_mesh_file, parse_mesh
    from jaxpar.layout.plan import check_layout
    req = PL.Request(args.batch, args.context, args.new_tokens, args.dtype, args.kv_dtype, args.headroom,
                     args.platform or hw.platform)
    if args.mesh:
        pairs = []
        for m in args.mesh:
            mc = load_mesh_file(m).resolved(args.devices)
            pairs.append((mc, check_layout(mc, cfg)))
    else:
        pairs = list(PL.candidates(cfg, args.devices, args.batch, args.capacity_factor))
    if not pairs:
        cli.fail(f"no layout of {args.devices} devices can take this model (heads, kv heads, layers or experts "
                 f"do not divide)")
    layouts = [PL.evaluate(cfg, mc, rep, hw, req) for mc, rep in pairs]
    layouts.sort(key=lambda x: (not x["fits"], x["est_request_ms"]))
    n_params = S.param_count(cfg)
    whole = parse_mesh({}, "single")
    weights = {d: S.params_bytes_per_device(cfg, whole, 1, d, req.act_dtype) for d in S.DTYPE_BYTES}
    kv_value = S.kv_value_bytes(cfg, args.kv_dtype, req.act_dtype)
    kv_tok = S.kv_bytes_per_token(cfg, kv_value)
    held = S.tokens_held(cfg, args.context)
    sizing = {"params": n_params, "weights_bytes": weights, "kv_bytes_per_token": kv_tok,
              "kv_tokens_held": held,
              "kv_bytes": args.batch * S.kv_bytes_per_sequence(cfg, args.context, kv_value),
              "kv_allowance": args.kv_allowance,
              "min_devices_by_allowance": PL.min_devices(weights[args.dtype] * args.kv_allowance, preset)}
    return {"model": cfg_summary(cfg), "hardware": hw_summary(hw), "devices": args.devices,
            "request": {"batch": args.batch, "context": args.context, "new_tokens": args.new_tokens,
                        "dtype": args.dtype, "kv_dtype": args.kv_dtype, "headroom": args.headroom},
            "sizing": sizing, "layouts": layouts, "recommended": PL.recommend(layouts)}


def cfg_summary(cfg) -> dict:
    from jaxpar.model.groups import layer_groups
    return {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.kv_heads, "head_dim": cfg.head_size, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "experts": cfg.num_local_experts, "experts_per_token": cfg.num_experts_per_tok,
            "sliding_window": cfg.sliding_window, "layer_groups": [g.describe() for g in layer_groups(cfg)]}


def hw_summary(hw) -> dict:
    return {"name": hw.name, "memory_bytes": hw.memory_bytes, "hbm_bytes_per_s": hw.hbm_bytes_per_s,
            "flops": hw.flops, "links": [{"name": ln.name, "group": ln.group, "bytes_per_s": ln.bytes_per_s,
                                          "latency_s": ln.latency_s} for ln in hw.links], "source": hw.source}


def _gb(n):
    return f"{n / 1e9:.2f} GB"


def print_human(r: dict, top: int) -> None:
    m, s, hw, q = r["model"], r["sizing"], r["hardware"], r["request"]
    print(f"model: {s['params'] / 1e9:.2f} B parameters ({m['layers']} layers, hidden {m['hidden_size']}, "
          f"{m['heads']}/{m['kv_heads']} heads" + (f", {m['experts']} experts top-{m['experts_per_token']}"
                                                    if m["experts"] else "") + ")")
    if len(m["layer_groups"]) > 1 or "+" in m["layer_groups"][0]:
        print("layer groups: " + "; ".join(m["layer_groups"]))
    print("weights: " + ", ".join(f"{d} {_gb(b)}" for d, b in s["weights_bytes"].items()))
    held = "" if s["kv_tokens_held"] == q["context"] else (
        f" (sliding window {m['sliding_window']}: {s['kv_tokens_held']} tokens held per sequence"
        f"{' in the sliding layers' if len(m['layer_groups']) > 1 or '+' in m['layer_groups'][0] else ''})")
    print(f"KV cache: {s['kv_bytes_per_token']:,.0f} bytes/token ({q['kv_dtype']}); batch {q['batch']} x context "
          f"{q['context']}{held}: {_gb(s['kv_bytes'])}")
    links = ", ".join(f"{ln['name']} {ln['bytes_per_s'] / 1e9:.0f} GB/s {ln['latency_s'] * 1e6:g} us (groups of "
                      f"{ln['group']})" for ln in hw["links"])
    print(f"hardware: {hw['name']}: {_gb(hw['memory_bytes'])}, {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"{hw['flops']['bf16'] / 1e12:.0f} TFLOP/s bf16; {links}")
    mdev = s["min_devices_by_allowance"]
    need = s["weights_bytes"][q["dtype"]] * s["kv_allowance"]
    print(f"minimum devices (a rule of thumb, not from --batch or --context): {mdev if mdev else 'more than 64 nodes'}"
          f" = {q['dtype']} weights x --kv-allowance {s['kv_allowance']:g} (the extra is room for the KV cache) = "
          f"{_gb(need)}, rounded up to 1, 2, 4, 8 devices or whole nodes of {_gb(hw['memory_bytes'])} devices")
    lay = r["layouts"]
    print(f"\n{r['devices']} devices, {q['dtype']} weights, batch {q['batch']}, context {q['context']}, "
          f"{q['new_tokens']} new tokens: {sum(x['fits'] for x in lay)} of {len(lay)} layouts fit"
          + (f" (showing {top})" if len(lay) > top else ""))
    hdr = f"  {'layout':<22}{'weights/dev':>12}{'KV/dev':>11}{'fits':>6}{'prefill ms':>12}{'decode ms':>11}" \
          f"{'comm %':>8}{'request s':>11}  links"
    print(hdr)
    rec = r["recommended"]
    for x in lay[:top]:
        comm = x["prefill"]["comm_ms"] + x["decode"]["comm_ms"] * q["new_tokens"]
        share = 100 * comm / max(x["est_request_ms"], 1e-12)
        mark = "*" if rec and x["name"] == rec["name"] else " "
        print(f"{mark} {x['name']:<22}{_gb(x['weights_bytes_per_device']):>12}{_gb(x['kv_bytes_per_device']):>11}"
              f"{'yes' if x['fits'] else 'no':>6}{x['est_prefill_ms']:>12.2f}{x['est_decode_ms']:>11.3f}"
              f"{share:>8.1f}{x['est_request_ms'] / 1e3:>11.3f}  {', '.join(x['decode']['links'] or ['-'])}")
    if rec:
        print(f"\nrecommended: {rec['name']} on {rec['devices']} devices: {json.dumps(rec['mesh'])}")
        print(f"  the fastest of the layouts above that fit, for this batch {q['batch']} and context "
              f"{q['context']}: weights, KV cache and workspace take {_gb(rec['memory_bytes_per_device'])} of the "
              f"{_gb(rec['memory_budget_bytes'])} per device left after --headroom {q['headroom']:g}")
        if mdev and rec["devices"] < mdev:
            print(f"  (fewer than the rule-of-thumb minimum of {mdev}: that rule sets aside "
                  f"{s['kv_allowance']} x the weights for any batch and context; this layout is sized for the "
                  f"batch and context given, so a larger batch or context may need more devices)")
        print("  weights per device: " + ", ".join(f"{d} {_gb(b)}" for d, b in
                                                   rec["weights_bytes_per_device_by_dtype"].items()))
    else:
        print("\nnothing fits: more devices, a smaller dtype, a smaller batch or context")


def main(argv=None):
    from jaxpar.analysis.hardware import network_names, preset_names
    from jaxpar.layout.mesh_file import PLATFORMS
    p = cli.parser("plan", cli.describe(__doc__), devices=False)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model config file, shipped name (tiny-add, llama3-70b, ...) or Hugging Face "
                                   "directory")
    g.add_argument("--params", help="size by parameter count only (e.g. 671B), for architectures jaxpar does "
                                    "not run: the weights in each dtype and the rule-of-thumb minimum devices "
                                    "(see --kv-allowance); no layouts")
    p.add_argument("--devices", type=int, default=8, help="total devices (default 8)")
    p.add_argument("--hardware", default="h100-nvlink",
                   help=f"preset ({', '.join(preset_names())}) or a hardware YAML file (default h100-nvlink)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the devices are spread over (default 1)")
    p.add_argument("--network", choices=network_names(), help="network between nodes (with --nodes > 1)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    p.add_argument("--context", type=int, help="prompt length prefilled and KV slots per sequence (default 4096, "
                                              "or the model's context window if smaller)")
    p.add_argument("--new-tokens", type=int, default=256, help="decode steps in one request, for the "
                                                               "recommendation's objective (default 256)")
    p.add_argument("--dtype", default="bf16", help=f"weight dtype: {', '.join(DTYPES)} (default bf16); int8 and "
                                                   f"fp8 count their float32 scales, as jaxpar.load(quantize=...) "
                                                   f"stores them")
    p.add_argument("--kv-dtype", help="KV cache dtype (default bf16; float32 with float32 weights); int8 and fp8 "
                                      "count a scale per token and head; activations are float32 when the weights "
                                      "or cache are, else bf16")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free (default 0.1)")
    p.add_argument("--kv-allowance", type=float, default=1.8,
                   help="the minimum-devices rule of thumb: memory needed = weights x this, the extra for the "
                        "KV cache (default 1.8: 80%% of the weights again), rounded up to 1, 2, 4, 8 devices or "
                        "whole nodes; the layouts use the exact KV cache of --batch and --context instead")
    p.add_argument("--capacity-factor", type=float, default=0.0, help="expert capacity of enumerated EP layouts "
                                                                      "(default 0 = dropless)")
    p.add_argument("--platform", choices=PLATFORMS,
                   help="whose programs the collectives model (default: the hardware's, cuda for GPUs, tpu for "
                        "TPUs): on cuda and tpu dropless expert layouts send only the routed tokens (ragged "
                        "all-to-all); cpu: the expert capacity buffers the CPU programs (jaxpar.inspect here) use")
    p.add_argument("--mesh", nargs="+", help="evaluate these mesh files instead of enumerating layouts")
    p.add_argument("--top", type=int, default=12, help="layouts shown in the table (default 12; --json has all)")
    p.add_argument("--write-mesh", metavar="FILE", help="write the recommended layout as a mesh file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    args.dtype = _dtype(args.dtype)
    args.kv_dtype = _dtype(args.kv_dtype) if args.kv_dtype else ("float32" if args.dtype == "float32" else "bf16")
    for name in ("devices", "batch", "context", "new_tokens", "top"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            cli.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.headroom < 1:
        cli.fail(f"--headroom must be in [0, 1), got {args.headroom}")
    if not (args.kv_allowance >= 1 and math.isfinite(args.kv_allowance)):
        cli.fail(f"--kv-allowance must be >= 1, got {args.kv_allowance}")
    if args.capacity_factor < 0:
        cli.fail(f"--capacity-factor must be >= 0, got {args.capacity_factor}")
    from jaxpar.analysis.hardware import load_hardware
    if args.write_mesh:
        _check_writable(args.write_mesh)
    if args.params:
        hw = load_hardware(args.hardware)
        r = size_by_params(args, hw)
        if args.json:
            print(json.dumps(r, indent=1))
        else:
            print(f"{r['params'] / 1e9:.0f} B parameters: " + ", ".join(f"{d} {_gb(b)}" for d, b in
                                                                         r["weights_bytes"].items()))
            print(f"{args.dtype} weights x {args.kv_allowance} KV allowance = {_gb(r['required_bytes'])}: minimum "
                  f"{r['min_devices']} x {hw.name} ({_gb(hw.memory_bytes)} each; the rule of thumb: weights x "
                  f"--kv-allowance, rounded up to 1, 2, 4, 8 devices or whole nodes)")
        return
    preset, hw = load_hardware(args.hardware), hardware(args)
    cfg = load_model(args.model)
    if args.context is None:
        args.context = min(4096, cfg.max_position_embeddings)
    if args.context > cfg.max_position_embeddings:
        cli.fail(f"--context {args.context} exceeds the model's context window of {cfg.max_position_embeddings}")
    r = plan(args, hw, cfg, preset)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print_human(r, args.top)
    if args.write_mesh:
        if not r["recommended"]:
            cli.fail(f"--write-mesh {args.write_mesh}: no layout fits, so no mesh file was written")
        import yaml
        with open(args.write_mesh, "w") as f:
            yaml.safe_dump(r["recommended"]["mesh"], f, sort_keys=False)


def _check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK) or os.path.isdir(path):
        cli.fail(f"--write-mesh {path}: cannot write there (directory {d} missing or not writable)")


if __name__ == "__main__":
    cli.run(main)
