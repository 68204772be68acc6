"""Accelerator and interconnect figures used to turn bytes and FLOPs into time (a roofline).

Figures are vendor datasheet values or the reference texts'; `link_bytes_per_s` is one direction of the
link a device uses to reach a neighbour."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # per device, one direction, to a neighbour
    link_latency_s: float
    source: str


PRESETS = {
    "h100-nvlink": Hardware("h100-nvlink", 989e12, 3.35e12, 450e9, 100e-9,
                            "H100 SXM datasheet (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3); NVLink 900 GB/s "
                            "bidirectional per GPU, ~100 ns (reference 001)"),
    "tpu-v5e": Hardware("tpu-v5e", 197e12, 819e9, 50e9, 1e-6,
                        "Cloud TPU v5e docs (197 TFLOP/s bf16, 819 GB/s HBM, ICI 1,600 Gbps per chip = 4 links "
                        "of 400 Gbps); latency ~1 us assumed"),
}
