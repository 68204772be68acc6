"""Command-line plumbing shared by every `python -m jaxpar.<tool>`: the common options, fake devices set
before JAX starts, and user errors printed as one `error: ...` line with exit status 2."""
from __future__ import annotations

import argparse
import os
import re
import sys

from jaxpar.config import QUANT_FORMATS


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other user error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def describe(doc: str) -> str:
    """A tool's --help description from its module docstring: the whole first paragraph (not its first line,
    which ends mid-sentence), without the leading `python -m jaxpar.<tool>: `."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    text = re.sub(r"^`?python -m jaxpar[.\w -]*`?: ", "", text)
    return text[:1].upper() + text[1:]


def parser(prog: str, description: str, devices: bool = True) -> Parser:
    """The tool's parser with the options every tool that runs on devices takes: --fake-devices and the
    multi-host group (devices=False: an analytic tool, which accepts --fake-devices like every tool but has
    nothing to run on them)."""
    p = Parser(prog=f"python -m jaxpar.{prog}", description=description)
    p.add_argument("--fake-devices", type=int, metavar="N",
                   help="run on N simulated CPU devices (set before JAX starts); with several processes, N each"
                   if devices else "accepted as by every jaxpar tool, and ignored: this tool runs nothing on "
                                   "devices (use --devices for the count to plan for)")
    if devices:
        g = p.add_argument_group("multi-host (one process per host, joined by JAX's distributed runtime)")
        g.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address, the same on every process; 'auto' lets JAX detect it (TPU pod "
                            "slices, SLURM, Open MPI). Absent: auto when the environment is such a cluster, "
                            "otherwise one process")
        g.add_argument("--num-processes", type=int, metavar="N", help="how many processes (hosts) in all")
        g.add_argument("--process-id", type=int, metavar="I", help="this process's rank, 0 to N-1 (0 prints)")
        g.add_argument("--distributed-timeout", type=int, default=120, metavar="S",
                       help="seconds to wait for the coordinator and the other processes (default 120)")
    return p


def start(args, fake_default: int | None = None) -> None:
    """Before anything touches JAX: fake devices, then the distributed runtime. Processes other than 0
    print nothing on stdout. fake_default applies only while JAX has no devices yet (a caller that already
    has them, a notebook or a test, keeps its own)."""
    if fake_default is not None and backend_started():
        fake_default = None
    setup_devices(args.fake_devices or fake_default)
    if setup_distributed(args):
        import jax
        if jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")


def backend_started() -> bool:
    """Whether JAX has started its backend (created its devices): from then on the device count is fixed."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def _stdout_for_python_only() -> None:
    """The collective libraries (gloo) print progress on file descriptor 1; send that to stderr and keep
    stdout for the tool's own output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(saved, "w", buffering=1)


def is_main() -> bool:
    """Process 0 (or the only process): the one that prints and writes result files."""
    if "jax" not in sys.modules:
        return True
    import jax
    return jax.process_index() == 0


CLUSTER_ENV = (("SLURM_NTASKS", "SLURM (srun)"), ("OMPI_COMM_WORLD_SIZE", "Open MPI (mpirun)"))


def _cluster_env() -> str | None:
    """The multi-process launcher this process runs under, if any (JAX detects its parameters itself)."""
    for var, what in CLUSTER_ENV:
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 1:
            return what
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "a multi-host TPU slice"
    return None


def setup_distributed(args) -> bool:
    """Join the processes into one runtime (jax.distributed.initialize); True if there is more than one
    process. A process that cannot reach the coordinator fails with one clear line within the timeout."""
    coord = getattr(args, "coordinator", None)
    n, rank, timeout = getattr(args, "num_processes", None), getattr(args, "process_id", None), \
        getattr(args, "distributed_timeout", 120)
    if timeout is not None and timeout < 1:
        fail(f"--distributed-timeout must be >= 1 second, got {timeout}")
    if coord is None and n is None and rank is None:
        if _cluster_env() is None:
            return False
        coord = "auto"
    import jax
    _stdout_for_python_only()
    if coord in (None, "auto"):
        try:
            jax.distributed.initialize(num_processes=n, process_id=rank, initialization_timeout=timeout)
        except (ValueError, RuntimeError) as e:
            fail(f"--coordinator auto: JAX could not detect the cluster ({' '.join(str(e).split())[:300]}); "
                 f"give --coordinator HOST:PORT --num-processes N --process-id I")
        return jax.process_count() > 1
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {coord!r}")
    if n is None or rank is None:
        fail("--coordinator needs --num-processes and --process-id")
    if n < 1 or not 0 <= rank < n:
        fail(f"--process-id must be in [0, --num-processes={n}), got {rank}")
    import time
    t0 = time.monotonic()
    if rank != 0:
        _wait_for(host.strip("[]"), int(port), timeout)
    left = max(1, int(timeout - (time.monotonic() - t0)))
    jax.distributed.initialize(coord, num_processes=n, process_id=rank, initialization_timeout=left)
    return n > 1


def _wait_for(host: str, port: int, timeout: float) -> None:
    """Process 0 runs the coordinator; the others wait for its port to open, up to `timeout` seconds
    (JAX's own wait ends by aborting the process with a stack trace)."""
    import socket
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                fail(f"--coordinator {host}:{port}: cannot reach the coordinator (process 0) within {timeout} s "
                     f"({e.strerror or e}); start process 0 first, and check the address and that the port is "
                     f"open between the hosts")
            time.sleep(0.5)


def add_model_args(p: Parser, mesh_required: bool = True) -> None:
    p.add_argument("--mesh", required=mesh_required, default=None if mesh_required else "single",
                   help="mesh file (YAML) or the name of a shipped mesh, e.g. meshes/tp4.yaml or tp4")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="model config file or shipped model name (default: the embedded tiny-add, "
                                   "or tiny-add-moe on a mesh with an expert axis); "
                                   "a config with no checkpoint runs with random weights")
    g.add_argument("--checkpoint", help="jaxpar (Orbax) checkpoint directory")
    g.add_argument("--hf", help="Hugging Face model directory (safetensors)")
    add_storage_args(p)


def add_storage_args(p: Parser) -> None:
    """--dtype, --quantize, --kv-dtype: how the weights and the KV cache are stored (jaxpar.load)."""
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "auto"),
                   help="parameter, activation and KV cache dtype; auto: the checkpoint's own "
                        "(default: float32 on CPU, where bfloat16 runs several times slower; auto on GPU/TPU)")
    p.add_argument("--quantize", default=None, choices=QUANT_FORMATS,
                   help="store the weights in 8 bits with float32 scales per output channel, quantized as they "
                        "load (default: as the checkpoint stores them; on XLA:CPU 8-bit weights save memory, "
                        "not time)")
    p.add_argument("--kv-dtype", default=None, choices=QUANT_FORMATS,
                   help="store the KV cache in 8 bits with a scale per token and head (default: --dtype)")


def storage(args) -> dict:
    return dict(dtype=args.dtype, quantize=args.quantize, kv_dtype=args.kv_dtype)


def setup_devices(n: int | None) -> None:
    """Must run before JAX initialises its backend."""
    if n is None:
        return
    if n < 1:
        fail(f"--fake-devices must be >= 1, got {n}")
    if backend_started():  # a caller in a process that has its devices already (a test, a notebook) keeps them
        return
    if "jax" in sys.modules:  # JAX read its environment when imported: set its config too
        import jax
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
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
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:  # a file or directory the user named cannot be read or written
        fail(f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        sys.exit(130)


def load_engine(args):
    import jaxpar
    return jaxpar.load(mesh=args.mesh, model=args.model, checkpoint=args.checkpoint, hf=args.hf, **storage(args))
