"""Accelerators and interconnects, as figures that turn bytes and FLOPs into time (a roofline).

Presets live in `hardware.yaml` next to this file (vendor datasheets and the reference texts); a user's
own hardware is a YAML file with the same keys. Inside a node, devices reach each other over `links`,
innermost first: a collective over devices that span a level runs at that level's bandwidth and latency.
`with_network` adds the level between nodes."""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import yaml

from jaxpar.errors import HardwareError
from jaxpar.layout.mesh_file import PLATFORMS  # whose programs run there (the collectives differ: experts.dispatch)

PRESETS_FILE = os.path.join(os.path.dirname(__file__), "hardware.yaml")
DEVICE_KEYS = ("name", "memory_gb", "hbm_gb_per_s", "tflops", "links", "platform", "source")
LINK_KEYS = ("name", "group", "gb_per_s", "latency_us")


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    group: int  # how many consecutive devices this level connects (the last level: the whole system)
    bytes_per_s: float  # per device, one direction
    latency_s: float  # one hop


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    flops: dict  # dtype -> dense FLOP/s per device
    links: tuple  # Link, innermost first
    source: str = ""
    platform: str = "cuda"

    def peak(self, dtype: str = "bf16") -> float:
        if dtype in self.flops:
            return self.flops[dtype]
        return self.flops["bf16"] / 2 if dtype == "float32" else self.flops["bf16"]

    @property
    def peak_flops(self) -> float:
        return self.peak("bf16")

    @property
    def link_bytes_per_s(self) -> float:
        return self.links[0].bytes_per_s

    @property
    def link_latency_s(self) -> float:
        return self.links[0].latency_s

    @property
    def devices_per_node(self) -> int:
        return self.links[-1].group

    def with_nodes(self, nodes: int, per_node: int, network: Link | None) -> "Hardware":
        """`nodes` nodes of `per_node` devices each (at most a full node), joined by `network`: the levels
        inside a node stop at `per_node`, and the network is one more, outermost level."""
        inner = [ln for ln in self.links if ln.group < per_node]
        outer = next(ln for ln in self.links if ln.group >= per_node)
        links = tuple(inner) + (dataclasses.replace(outer, group=per_node),)
        name = self.name
        if nodes > 1:
            links += (dataclasses.replace(network, group=per_node * nodes),)
            name = f"{nodes} x {per_node} {self.name} over {network.name}"
        return dataclasses.replace(self, name=name, links=links)

    def link_for_ids(self, ids) -> Link:
        """The level that connects these device numbers: the innermost whose blocks of `group` consecutive
        devices hold them all."""
        for link in self.links:
            if len({i // link.group for i in ids}) == 1:
                return link
        return self.links[-1]


def _num(v, where: str, positive=True) -> float:
    if isinstance(v, str):  # YAML reads 1e3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
            (positive and v == 0):
        raise HardwareError(f"{where} must be a {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


def _link(d, where: str, name=None, group=None) -> Link:
    if not isinstance(d, dict):
        raise HardwareError(f"{where} must be a mapping with keys {', '.join(LINK_KEYS)}, got {d!r}")
    unknown = [k for k in d if k not in LINK_KEYS + ("source",)]
    if unknown:
        raise HardwareError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(LINK_KEYS)}")
    g = group if group is not None else d.get("group")
    if group is None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise HardwareError(f"{where}.group must be a positive integer (devices on this level), got {g!r}")
    lat = _num(d.get("latency_us", 0.0), f"{where}.latency_us", positive=False)
    return Link(str(name or d.get("name", "link")), int(g), _num(d.get("gb_per_s"), f"{where}.gb_per_s") * 1e9,
                lat * 1e-6)


def parse_hardware(d, source: str, name: str | None = None) -> Hardware:
    """Validate one device entry (a preset, or a user's file); `source` names it in every error."""
    if not isinstance(d, dict):
        raise HardwareError(f"{source}: expected a mapping with keys {', '.join(DEVICE_KEYS)}, got {type(d).__name__}")
    unknown = [k for k in d if k not in DEVICE_KEYS]
    if unknown:
        raise HardwareError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: "
                            f"{', '.join(DEVICE_KEYS)}")
    for k in ("memory_gb", "hbm_gb_per_s", "tflops", "links"):
        if k not in d:
            raise HardwareError(f"{source}: missing key {k}")
    tf = d["tflops"]
    if not isinstance(tf, dict) or "bf16" not in tf:
        raise HardwareError(f"{source}: tflops must be a mapping of dtype to dense TFLOP/s with at least bf16, "
                            f"got {tf!r}")
    flops = {str(k): _num(v, f"{source}: tflops.{k}") * 1e12 for k, v in tf.items()}
    links = d["links"]
    if not isinstance(links, list) or not links:
        raise HardwareError(f"{source}: links must be a non-empty list (innermost level first), got {links!r}")
    parsed = tuple(_link(x, f"{source}: links[{i}]") for i, x in enumerate(links))
    for i in range(1, len(parsed)):
        if parsed[i].group <= parsed[i - 1].group or parsed[i].group % parsed[i - 1].group:
            raise HardwareError(f"{source}: links[{i}].group={parsed[i].group} must be a larger multiple of "
                                f"links[{i - 1}].group={parsed[i - 1].group} (levels go from innermost outwards)")
    platform = d.get("platform", "cuda")
    if platform not in PLATFORMS:
        raise HardwareError(f"{source}: platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    return Hardware(str(name or d.get("name") or os.path.basename(source)),
                    _num(d["memory_gb"], f"{source}: memory_gb") * 1e9,
                    _num(d["hbm_gb_per_s"], f"{source}: hbm_gb_per_s") * 1e9, flops, parsed, str(d.get("source", "")),
                    platform)


@functools.lru_cache(maxsize=1)
def _presets_file() -> dict:
    with open(PRESETS_FILE) as f:
        return yaml.safe_load(f)


def preset_names() -> list[str]:
    return list(_presets_file()["devices"])


def network_names() -> list[str]:
    return list(_presets_file()["networks"])


def network(name: str) -> Link:
    nets = _presets_file()["networks"]
    if name not in nets:
        raise HardwareError(f"--network: unknown network {name!r}; known: {', '.join(nets)}")
    return _link(nets[name], f"{PRESETS_FILE}: networks.{name}", name=name, group=1)


def load_hardware(name_or_file: str) -> Hardware:
    """A preset name (see hardware.yaml) or the path of a YAML file describing one device type."""
    devices = _presets_file()["devices"]
    if name_or_file in devices:
        return parse_hardware(devices[name_or_file], f"{PRESETS_FILE}: devices.{name_or_file}", name_or_file)
    if not os.path.isfile(name_or_file):
        raise HardwareError(f"--hardware: {name_or_file!r} is neither a preset ({', '.join(devices)}) "
                            f"nor a hardware file")
    try:
        with open(name_or_file) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise HardwareError(f"{name_or_file}: not valid YAML: {' '.join(str(e).split())}") from None
    return parse_hardware(data, name_or_file)


PRESETS = {n: load_hardware(n) for n in preset_names()}
