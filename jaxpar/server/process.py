"""A `python -m jaxpar.serve` subprocess (tests and `bench serve`): bound to 127.0.0.1 on a free port, started
and stopped through its own process handle, every call with a timeout."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args, log_path: str, api_key: str | None = None, port: int | None = None,
                 extra_env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.health_seen: list = []  # /health's answers while waiting for the server to be ready
        cmd = [sys.executable, "-m", "jaxpar.serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(extra_env or {})})

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                code = httpx.get(self.url + "/health", timeout=2).status_code
                self.health_seen.append(code)
                if code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.output()}")

    def post(self, path: str, body: dict, timeout: float = 60, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=timeout)

    def metric(self, name: str, labels: str = "") -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + "{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM, then wait for the exit status (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
