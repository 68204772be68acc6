"""Mesh files: YAML that says how devices are arranged and how the model is laid out on them."""
from __future__ import annotations

import dataclasses
import math
import os

import yaml

from jaxpar.errors import MeshFileError

# what programs are built for: this machine's CPU devices, NVIDIA GPUs (lowered as "cuda") or TPUs
PLATFORMS = ("cpu", "cuda", "tpu")

AXES = ("data", "stage", "expert", "seq", "tensor")
KEYS = ("axes", "attention", "microbatches", "capacity_factor", "rules")
ATTENTION = ("dense", "ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    axes: dict  # mesh axis -> size (may hold one -1 until resolved), outermost first
    attention: str = "dense"
    microbatches: int = 1
    capacity_factor: float = 0.0
    rules: dict = dataclasses.field(default_factory=dict)  # logical axis -> mesh axis | [mesh axes] | None
    source: str = "<mesh>"

    @property
    def name(self) -> str:
        base = os.path.basename(self.source)
        return base[:-5] if base.endswith(".yaml") else base

    def size(self, axis: str) -> int:
        return self.axes.get(axis, 1)

    def resolved(self, n_devices: int, hint: str = "") -> "MeshConfig":
        """Replace a -1 axis by the remaining devices. Without -1 the sizes may multiply to fewer devices than
        there are (the mesh then runs on the first ones), never to more (an error that ends with `hint`: how to
        get more devices, where the devices are real ones rather than a count to plan for)."""
        axes = dict(self.axes)
        free = [a for a, s in axes.items() if s == -1]
        known = math.prod(s for s in axes.values() if s != -1)
        if free:
            if n_devices % known:
                raise MeshFileError(f"{self.source}: axes: the fixed axis sizes multiply to {known}, which does not "
                                    f"divide the {n_devices} devices, so axis {free[0]} = -1 cannot be resolved")
            axes[free[0]] = n_devices // known
        elif known > n_devices:
            raise MeshFileError(f"{self.source}: axes: sizes {_fmt(axes)} multiply to {known}, "
                                f"but there are only {n_devices} devices{hint}")
        return dataclasses.replace(self, axes=axes)

    @property
    def device_count(self) -> int:
        return math.prod(self.axes.values())


def _fmt(axes: dict) -> str:
    return " x ".join(f"{a}={s}" for a, s in axes.items()) or "(none)"


def parse_mesh(data, source: str = "<mesh>") -> MeshConfig:
    """Validate a mesh file's contents (already parsed YAML); `source` names it in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MeshFileError(f"{source}: expected a mapping with keys {', '.join(KEYS)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise MeshFileError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: {', '.join(KEYS)}")
    attention = data.get("attention", "dense")
    if attention not in ATTENTION:
        raise MeshFileError(f"{source}: attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    mb = data.get("microbatches", 1)
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
        raise MeshFileError(f"{source}: microbatches must be a positive integer, got {mb!r}")
    cf = data.get("capacity_factor")
    cf = 0.0 if cf is None else cf
    if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf < 0:
        raise MeshFileError(f"{source}: capacity_factor must be a number >= 0 (0 = dropless), got {cf!r}")
    return MeshConfig(axes=_parse_axes(_mapping(data, "axes"), source), attention=attention, microbatches=mb,
                      capacity_factor=float(cf), rules=_parse_rules(_mapping(data, "rules"), source),
                      source=source)


def _mapping(data: dict, key: str):
    v = data.get(key)
    return {} if v is None else v  # absent or empty; anything else must be a mapping (checked by the caller)


def _parse_axes(axes_in, source: str) -> dict:
    if not isinstance(axes_in, dict):
        raise MeshFileError(f"{source}: axes must be a mapping of axis name to size, got {axes_in!r}")
    axes = {}
    for a, s in axes_in.items():
        if a not in AXES:
            raise MeshFileError(f"{source}: axes: unknown axis {a!r}; axis names are {', '.join(AXES)}")
        if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1):
            raise MeshFileError(f"{source}: axes.{a} must be a positive integer or -1, got {s!r}")
        axes[a] = s
    minus = [a for a, s in axes.items() if s == -1]
    if len(minus) > 1:
        raise MeshFileError(f"{source}: axes: only one axis may be -1, got {len(minus)} ({', '.join(minus)})")
    return axes


def _parse_rules(rules_in, source: str) -> dict:
    from jaxpar.layout.rules import LOGICAL_AXES  # rules.py imports JAX; reading a mesh file should not
    if not isinstance(rules_in, dict):
        raise MeshFileError(f"{source}: rules must be a mapping of logical axis to mesh axis, got {rules_in!r}")
    rules = {}
    for k, v in rules_in.items():
        if k not in LOGICAL_AXES:
            raise MeshFileError(f"{source}: rules: unknown logical axis {k!r}; logical axes are {', '.join(LOGICAL_AXES)}")
        vals = [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])
        for m in vals:
            if m not in AXES:
                raise MeshFileError(f"{source}: rules.{k}: unknown mesh axis {m!r}; axis names are {', '.join(AXES)}")
        if len(set(vals)) != len(vals):
            raise MeshFileError(f"{source}: rules.{k}: mesh axis listed twice in {vals}")
        rules[k] = tuple(vals)
    return rules


MESHES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "meshes")  # shipped inside the package;
# the repository's top-level meshes/ is a link to it


def load_mesh_file(path: str) -> MeshConfig:
    """Read a mesh file; a bare name like `tp4` is looked up among the shipped meshes."""
    if not os.path.exists(path) and os.sep not in path and os.path.isfile(os.path.join(MESHES_DIR, path + ".yaml")):
        path = os.path.join(MESHES_DIR, path + ".yaml")
    if os.path.isdir(path):
        raise MeshFileError(f"{path}: is a directory, not a mesh file; {_shipped_list()}")
    if not os.path.isfile(path):
        raise MeshFileError(f"{path}: mesh file not found; {_shipped_list()}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise MeshFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise MeshFileError(f"{path}: cannot read mesh file: {e.strerror}") from None
    return parse_mesh(data, path)


def shipped_meshes() -> list[str]:
    """The names `load_mesh_file` accepts without a path: the YAML files in the package's meshes/."""
    return sorted(f[:-5] for f in os.listdir(MESHES_DIR) if f.endswith(".yaml"))


def _shipped_list() -> str:
    return f"the shipped meshes, usable by name from any directory, are {', '.join(shipped_meshes())}"
