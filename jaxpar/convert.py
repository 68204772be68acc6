"""python -m jaxpar.convert: Hugging Face directory -> jaxpar Orbax checkpoint (+ config + tokenizer).

Weights stream from the memory-mapped safetensors into the shards of the chosen mesh; the checkpoint is
written one parameter at a time, so neither step holds the whole model in host memory. The result loads
onto any mesh with `--checkpoint DIR`."""
from __future__ import annotations

import os
import shutil

from jaxpar.tools import cli

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def convert(hf: str, out: str, mesh: str = "single", dtype: str | None = None, quantize: str | None = None,
            kv_dtype: str | None = None) -> str:
    """quantize: the checkpoint stores 8-bit weights and their scales (each weight quantized as it streams in),
    and loads as it is; kv_dtype: recorded in its config as the KV cache's default."""
    import jaxpar
    from jaxpar.errors import JaxparError
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise JaxparError(f"--out {out}: exists and is not an empty directory")
    # stacked groups (the form checkpoints store): saving then writes the loaded arrays without regrouping
    eng = jaxpar.load(mesh=mesh, hf=hf, dtype=dtype, quantize=quantize, kv_dtype=kv_dtype, unroll=False)
    eng.save(out)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf, name)) and cli.is_main():
            shutil.copy(os.path.join(hf, name), os.path.join(out, name))
    return out


def main(argv=None):
    p = cli.parser("convert", "Convert a Hugging Face model directory to a jaxpar (Orbax) checkpoint.")
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (must be new or empty)")
    p.add_argument("--mesh", default="single", help="mesh to stream the weights through (default single)")
    cli.add_storage_args(p)
    args = p.parse_args(argv)
    cli.start(args)
    print(f"wrote {convert(args.hf, args.out, args.mesh, **cli.storage(args))}")


if __name__ == "__main__":
    cli.run(main)
