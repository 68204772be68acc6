"""A serving loop in one of several processes (tests/test_multihost.py): process 0 takes requests at moments
only it knows and broadcasts each iteration's plan; the others follow. Prints the completions (process 0).

usage: python tests/serving_worker.py MESH DEVICES_PER_PROCESS [COORDINATOR NUM_PROCESSES PROCESS_ID]"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_serving import SERVING, workload  # noqa: E402  (first: conftest sets the device count, replaced below)
from jaxpar.tools import cli  # noqa: E402

mesh, devices = sys.argv[1], int(sys.argv[2])
cli.setup_devices(devices)
import jax  # noqa: E402

if len(sys.argv) > 3:
    jax.distributed.initialize(sys.argv[3], num_processes=int(sys.argv[4]), process_id=int(sys.argv[5]),
                               initialization_timeout=60)
import jaxpar  # noqa: E402

eng = jaxpar.load(mesh=mesh, **SERVING)
if jax.process_index() != 0:
    eng.loop.follow()
    sys.exit(0)
if jax.process_count() > 1:
    eng.loop.lead()
rng = random.Random(11)
pending, reqs = workload(16, seed=9), []
while pending or eng.loop.scheduler.has_work:
    for _ in range(rng.choice([0, 1, 2])):  # arrivals only process 0 sees
        if pending:
            reqs.append(eng.loop.add(*pending.pop(0)))
    if eng.loop.scheduler.has_work:
        eng.loop.step()
if jax.process_count() > 1:
    eng.loop.release_followers()
print(json.dumps([r.output for r in reqs]))
