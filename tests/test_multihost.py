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

from conftest import CHILD_XLA_FLAGS, ROOT

PROMPTS = ["--prompt", "123+456=", "--prompt", "12+34=", "--prompt", "999+1=", "--max-new-tokens", "5"]


def _env():
    env = dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS)  # each command sets its own device count
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "jaxpar.generate", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


# expert all-to-alls and data splits across the two processes (pipeline stages across processes: the server
# test below, on pp2_tp4)
@pytest.mark.parametrize("mesh", ["ep8", "dp2_tp4"])
def test_two_processes_generate_what_one_process_does(mesh):
    """Two processes of 4 devices print what one process of 8 does: the sums, one a line (one process's answer
    on these meshes is the sums: test_experts.py for ep8, test_meshes.py for dp2_tp4; the CLI prints one answer
    a line: test_engine.py)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxpar.generate", "--fake-devices", "4", "--mesh", mesh, *PROMPTS,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--distributed-timeout", "60"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert outs[0][0] == "579\n46\n1000\n"
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


def test_server_over_two_processes_answers_as_one_process_does(tmp_path):
    """`python -m jaxpar.serve` on a pipeline mesh (pp2_tp4) over 2 processes x 4 devices behind one endpoint: 32
    requests (half of them streamed) arrive at moments only process 0 knows and queue for its 4 slots; it
    broadcasts each iteration's plan, process 1 runs the same programs in the same order (no deadlock), every
    completion equals `generate` on 1 process x 8 devices, and SIGTERM to process 0 ends both."""
    import random
    import threading

    import httpx

    from conftest import engine, mesh_path
    from jaxpar.server.process import ServerProcess, free_port

    coord, http = _free_port(), free_port()
    env = _env()
    procs = [ServerProcess("--fake-devices", "4", "--mesh", mesh_path("pp2_tp4"), "--coordinator", f"127.0.0.1:{coord}",
                           "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "120",
                           "--max-queue", "32", "--max-num-seqs", "4", port=http, log_path=str(tmp_path / f"p{i}.log"), extra_env=env)
             for i in range(2)]
    try:
        procs[0].wait_ready()
        rng = random.Random(5)
        work = [(f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=", rng.choice([0.0, 0.0, 0.8]), rng.randint(0, 99))
                for _ in range(32)]
        got, errors = {}, []

        def send(i, prompt, temperature, seed):
            time.sleep(rng.random() * 0.5)
            body = {"prompt": prompt, "max_tokens": 6, "temperature": temperature, "seed": seed}
            try:
                if i % 2:
                    with httpx.stream("POST", procs[0].url + "/v1/completions", json=dict(body, stream=True),
                                      headers=procs[0].headers, timeout=120) as r:
                        events = [json.loads(line[6:]) for line in r.iter_lines()
                                  if line.startswith("data: ") and line != "data: [DONE]"]
                    got[i] = "".join(e["choices"][0]["text"] for e in events if e["choices"])
                else:
                    r = procs[0].post("/v1/completions", body, timeout=120)
                    got[i] = r.json()["choices"][0]["text"]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=send, args=(i, *w)) for i, w in enumerate(work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        one = engine("pp2_tp4")  # one process, 8 devices
        want = {i: one.generate([p], max_new_tokens=6, temperature=t, seed=s)[0] for i, (p, t, s) in enumerate(work)}
        assert got == want
        assert sum(map(len, want.values())) > 32
        assert procs[0].terminate() == 0
        assert procs[1].proc.wait(60) == 0, procs[1].output()[-2000:]
    finally:
        for p in procs:
            p.kill()
