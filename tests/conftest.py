"""Every test runs on 8 fake CPU devices, set before JAX starts."""
import os
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
if not any("backend_optimization_level" in f for f in _flags):
    # the suite is compile-bound: LLVM at -O0 compiles about 20% faster (test_meshes 74 -> 60 s); what
    # `inspect` reports of the compiled programs (collectives, memory) is identical either way
    _flags.append("--xla_backend_optimization_level=0")
# what a process the tests start gets: the suite's flags without the device count (it sets its own)
CHILD_XLA_FLAGS = " ".join(_flags)
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # one persistent compilation cache for this run, shared with the processes the tests start (CLI, servers,
    # notebooks, multi-host): they compile many of the programs this process compiles. Compiled programs are
    # the same either way; a cache hit still counts as a compilation (JAX's backend-compile event fires), so
    # "nothing compiles after warm-up" stays a real check. Fresh per run, removed at exit.
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="jaxpar-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MESHES = ["single", "dp8", "tp2", "tp4", "tp8", "dp2_tp4", "sp4", "sp8", "sp4_ulysses", "dp2_sp2_tp2", "pp2", "pp4",
          "pp2_tp4"]


def mesh_path(name: str) -> str:
    return os.path.join(ROOT, "meshes", name + ".yaml")


_ENGINES: dict = {}


def engine(mesh: str, inline: dict | None = None, **kw):
    """One engine per (mesh, options) for the whole session: compiling is the slow part. mesh names a shipped
    mesh, or, with `inline` (a mesh file's contents), a layout not shipped as a file (names are unique)."""
    import jaxpar
    from jaxpar.layout.mesh_file import parse_mesh
    key = (mesh, tuple(sorted(kw.items())))
    if key not in _ENGINES:
        _ENGINES[key] = jaxpar.load(mesh=parse_mesh(inline, mesh) if inline else mesh_path(mesh), **kw)
    return _ENGINES[key]


@pytest.fixture
def get_engine():
    return engine


# the slowest files first: the two xdist workers take whole files in this order, so a long file started last
# would leave one worker idle at the end
_FIRST = ["test_notebooks.py", "test_multihost.py", "test_serving.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)
    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
