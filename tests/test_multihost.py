"""Multi-host through JAX's distributed runtime, on one machine: two processes with 4 fake CPU devices each
join into one 8-device mesh (collectives over gloo) and generate the same tokens as one process with 8;
only process 0 prints. A process that cannot reach the coordinator fails with one clear line, in bounded
time."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

PROMPTS = ["--prompt", "123+456=", "--prompt", "12+34=", "--prompt", "999+1=", "--max-new-tokens", "5"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "jaxpar.generate", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("mesh", ["dp2_tp4", "tp8", "ep8", "pp2_tp4"])
def test_two_processes_generate_what_one_process_does(mesh):
    one = _generate("--fake-devices", "8", "--mesh", mesh, *PROMPTS)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxpar.generate", "--fake-devices", "4", "--mesh", mesh, *PROMPTS,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--distributed-timeout", "60"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert outs[0][0] == one.stdout and one.stdout.splitlines() == ["579", "46", "1000"]
    assert outs[1][0] == ""  # only process 0 prints


def test_unreachable_coordinator_fails_fast_with_a_clear_error():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    r = _generate("--fake-devices", "4", "--mesh", "tp8", *PROMPTS, "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: --coordinator 127.0.0.1:") and "cannot reach the coordinator" in r.stderr
    assert "Traceback" not in r.stderr and took < 30


@pytest.mark.parametrize("argv,needle", [
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234"], "--num-processes"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_multihost_option_errors(argv, needle):
    r = _generate("--mesh", "single", "--prompt", "1+1=", *argv, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr


def _worker(*args, timeout=300):
    return [sys.executable, os.path.join(ROOT, "tests", "serving_worker.py"), *args]


@pytest.mark.parametrize("mesh", ["dp2_tp4"])
def test_serving_loop_over_two_processes_follows_process_0(mesh):
    """Continuous batching over 2 processes x 4 devices: requests arrive at moments only process 0 knows; it
    broadcasts each iteration's plan, process 1 runs the same programs in the same order (no deadlock), and
    every request gets the tokens of 1 process x 8 devices."""
    one = subprocess.run(_worker(mesh, "8"), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen(_worker(mesh, "4", f"127.0.0.1:{port}", "2", str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    got = outs[0][0].splitlines()[-1]  # the collective library prints its progress before
    want = json.loads(one.stdout.splitlines()[-1])
    assert json.loads(got) == want and len(want) == 16 and sum(map(len, want)) > 16
    assert "[[" not in outs[1][0]  # the follower prints no completions
