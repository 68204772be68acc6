"""Command-line plumbing shared by every `python -m jaxpar.<tool>`: the common options, fake devices set
before JAX starts, and user errors printed as one `error: ...` line with exit status 2."""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other user error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parser(prog: str, description: str) -> Parser:
    p = Parser(prog=f"python -m jaxpar.{prog}", description=description)
    p.add_argument("--fake-devices", type=int, metavar="N",
                   help="run on N simulated CPU devices (set before JAX starts)")
    return p


def add_model_args(p: Parser, mesh_required: bool = True) -> None:
    p.add_argument("--mesh", required=mesh_required, default=None if mesh_required else "single",
                   help="mesh file (YAML) or the name of a shipped mesh, e.g. meshes/tp4.yaml or tp4")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="model config file or shipped model name (default: the embedded tiny-add, "
                                   "or tiny-add-moe on a mesh with an expert axis); "
                                   "a config with no checkpoint runs with random weights")
    g.add_argument("--checkpoint", help="jaxpar (Orbax) checkpoint directory")
    g.add_argument("--hf", help="Hugging Face model directory (safetensors)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter and activation dtype (default float32)")


def setup_devices(n: int | None) -> None:
    """Must run before JAX initialises its backend."""
    if n is None:
        return
    if n < 1:
        fail(f"--fake-devices must be >= 1, got {n}")
    if "jax" in sys.modules:
        import jax
        jax.config.update("jax_num_cpu_devices", n)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main, argv=None) -> None:
    """Call main(argv); a JaxparError (any user error) becomes `error: ...` and exit status 2."""
    from jaxpar.errors import JaxparError
    try:
        main(argv)
    except JaxparError as e:
        fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)


def load_engine(args):
    import jaxpar
    return jaxpar.load(mesh=args.mesh, model=args.model, checkpoint=args.checkpoint, hf=args.hf, dtype=args.dtype)
