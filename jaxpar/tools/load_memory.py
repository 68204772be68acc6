"""python -m jaxpar.tools.load_memory: peak host memory while streaming a Hugging Face checkpoint onto a mesh.

    python -m jaxpar.tools.load_memory --fake-devices 8 --mesh tp8 --hf DIR [--make-llama 400]

Samples the process's anonymous resident memory (RssAnon: heap and device buffers; memory-mapped file
pages are the OS page cache and are not counted) every 5 ms during `jaxpar.load`. On fake CPU devices the
device buffers are host memory too, so the figure that shows streaming is the transient overhead:
peak minus what the loaded parameters occupy."""
from __future__ import annotations

import json
import threading
import time

from jaxpar.tools import cli


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def make_llama(directory: str, size_mb: int) -> None:
    """A random float32 Llama of about size_mb MB, written by transformers (safetensors)."""
    import torch
    import transformers
    layers = max(1, int((size_mb * 2 ** 20 / 4 - 32000 * 1024) / (1024 * 1024 * 2.5 + 3 * 1024 * 2816)))
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(directory, max_shard_size="200MB")


def _tiny():
    from jaxpar.config import ModelConfig
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=16)


def main(argv=None):
    p = cli.parser("tools.load_memory", "Peak host memory while loading a Hugging Face checkpoint onto a mesh.")
    p.add_argument("--hf", required=True, help="Hugging Face model directory to load (with --make-llama: to create)")
    p.add_argument("--mesh", default="tp8", help="mesh file or shipped mesh name to load onto (default tp8)")
    p.add_argument("--make-llama", type=int, metavar="MB", help="first write a random Llama of about MB to --hf")
    p.add_argument("--convert", metavar="OUT", help="measure `jaxpar.convert` to OUT (load + Orbax save) instead")
    args = p.parse_args(argv)
    cli.start(args)
    if args.make_llama:
        make_llama(args.hf, args.make_llama)
    import os

    import jax
    import jaxpar
    from jaxpar.engine import params as P
    jaxpar.load(mesh=args.mesh, model=_tiny(), seed=0)  # start the runtime (thread pools, allocators) first
    size = sum(os.path.getsize(os.path.join(args.hf, f)) for f in os.listdir(args.hf) if f.endswith(".safetensors"))
    base = rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)
    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    # `jaxpar.convert` loads the model's own (stacked) groups, then saves; generation loads the form it runs
    eng = jaxpar.load(mesh=args.mesh, hf=args.hf, unroll=False if args.convert else None)
    jax.block_until_ready(eng.run_params)
    if args.convert:
        eng.save(args.convert)
    secs = time.perf_counter() - t0
    stop.set()
    t.join()
    after = rss_anon()
    params_total = sum(s.data.nbytes for x in jax.tree.leaves(eng.run_params) for s in x.addressable_shards)
    mib = 2 ** 20
    r = {"step": "convert" if args.convert else "load", "checkpoint_mb": size / mib, "mesh": args.mesh, "devices": eng.mesh.size, "load_seconds": secs,
         "params_bytes_per_device_mb": P.bytes_per_device(eng.run_params) / mib,
         "params_all_devices_mb": params_total / mib,
         "peak_rss_anon_increase_mb": (peak[0] - base) / mib, "rss_anon_increase_after_mb": (after - base) / mib,
         "peak_beyond_loaded_params_mb": (peak[0] - base - params_total) / mib,
         "transient_overhead_mb": (peak[0] - after) / mib}
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    cli.run(main)
