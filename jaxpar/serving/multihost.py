"""Several processes, one serving loop: process 0 owns the queue and the scheduler, decides each iteration's
plan and broadcasts it; every process executes the same programs in the same order (multi-controller JAX
deadlocks otherwise), so a follower never needs to know about requests.

The plan travels as a pickled message (its arrays are plain numpy) in two broadcasts from process 0: its
length, then its bytes padded to a power of two (so the broadcast's shapes, hence its programs, stay few)."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np


@dataclasses.dataclass
class WirePlan:
    """What a follower needs of a Plan: the programs' inputs, no requests. stop: the leader is done."""
    prefills: list  # (paged, any_sampling, PrefillBatch)
    decode_steps: int
    table: np.ndarray | None
    release: np.ndarray | None
    any_sampling: bool
    stop: bool = False


@dataclasses.dataclass
class _Call:
    paged: bool
    any_sampling: bool
    batch: object


def to_wire(plan) -> WirePlan:
    return WirePlan([(c.paged, c.any_sampling, c.batch) for c in plan.prefills], plan.decode_steps, plan.table,
                    plan.release, plan.any_sampling)


def executable(wire: WirePlan):
    """A WirePlan in the form Runner.execute takes."""
    calls = [_Call(paged, any_sampling, batch) for paged, any_sampling, batch in wire.prefills]
    return dataclasses.replace(wire, prefills=calls)


def broadcast(wire: WirePlan | None) -> WirePlan:
    """Process 0's plan to every process (wire is ignored elsewhere)."""
    from jax.experimental import multihost_utils
    import jax
    payload = pickle.dumps(wire) if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    size = 1 << max(n - 1, 0).bit_length()
    buf = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buf[:n] = np.frombuffer(payload, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return pickle.loads(buf[:n].tobytes())
