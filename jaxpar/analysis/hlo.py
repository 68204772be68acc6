"""Count the collectives of a compiled (SPMD-partitioned) HLO module.

`count` is how often each collective runs in one execution: an op inside a while body counts once per trip
(XLA's `known_trip_count`). `bytes` is the per-device payload: the op's result size on one device, summed
over the runs. Async pairs (`-start`/`-done`) are counted once, at the `-done`. Every branch of a
conditional is counted (an upper bound; jaxpar's programs have no conditionals around collectives)."""
from __future__ import annotations

import json
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "token": 0}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(type_str: str) -> int:
    """Bytes of an HLO type string: an array `f32[2,3]{1,0}` or a tuple of arrays."""
    total = 0.0
    for dt, dims in _ARRAY.findall(type_str):
        if dt not in DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dt]
    return int(total)


def _parse(text: str):
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if line.startswith("}"):
            cur = None
            continue
        if cur is not None:
            im = _INSTR.match(line)
            if im:
                comps[cur].append((im.group(2), im.group(1), line))
    return comps, entry


def collectives(hlo_text: str) -> dict:
    comps, entry = _parse(hlo_text)
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}

    def visit(name, mult, stack):
        if name not in comps or name in stack:
            return
        for op, type_str, line in comps[name]:
            base = op[:-5] if op.endswith("-done") else op
            if base in COLLECTIVES and not op.endswith("-start"):
                out[base]["count"] += mult
                out[base]["bytes"] += mult * shape_bytes(type_str)
            trips = _TRIP.search(line)
            for kind, callee in _CALLS.findall(line):
                if kind == "to_apply" and base in COLLECTIVES:
                    continue  # the reduction function of an all-reduce, not work of its own
                m = mult
                if kind == "body":
                    m = mult * (int(trips.group(1)) if trips else 1)
                visit(callee, m, stack | {name})
            b = _BRANCHES.search(line)
            if b:
                for callee in re.findall(r"%?([\w.\-]+)", b.group(1)):
                    visit(callee, mult, stack | {name})

    if entry:
        visit(entry, 1, frozenset())
    return out


def memory(compiled) -> dict:
    """Per-device memory of a compiled program. peak = arguments + outputs + temporaries - aliased
    (donated buffers reused for outputs are counted once). XLA:CPU's own `peak_memory_in_bytes` leaves out
    temporaries (it reports less than temp_size_in_bytes), so it is not used."""
    m = compiled.memory_analysis()
    if m is None:
        return {"argument_bytes": 0, "output_bytes": 0, "temp_bytes": 0, "peak_bytes": 0}
    arg, outb, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    peak = arg + outb + tmp - alias
    return {"argument_bytes": int(arg), "output_bytes": int(outb), "temp_bytes": int(tmp), "peak_bytes": int(peak)}


def report(compiled) -> dict:
    return {"collectives": collectives(compiled.as_text()), "memory": memory(compiled)}


if __name__ == "__main__":  # python -m jaxpar.analysis.hlo FILE.hlo
    import sys
    print(json.dumps(collectives(open(sys.argv[1]).read()), indent=1))
