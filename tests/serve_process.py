"""The real service as a subprocess (``python -m stablekit.cli serve`` on 127.0.0.1, embedded model, CPU), for the
tests that need a socket: the browser test and the load and soak tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``stablekit serve`` on a free port with its data in `data_dir`; `options` are more command-line options."""

    def __init__(self, data_dir: Path, log: Path, *options: str, token: str | None = None, ready_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
        args = [sys.executable, "-m", "stablekit.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.log = log
        self.proc = subprocess.Popen(
            [*args, "--device", "cpu", *options], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)
        self._wait_ready(ready_s)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.client.get("/health").json()["status"] == "ok":
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            time.sleep(0.2)
        raise AssertionError("the server did not become ready: " + self.log.read_text()[-2000:])

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, done=lambda job: job["status"] in FINAL, timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id}: {job['status']}")

    def submit(self, params: dict, task: str = "txt2img", plugins=()) -> str:
        r = self.client.post("/v1/jobs", json={"task": task, "params": params, "plugins": list(plugins)})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def stop(self, sig=signal.SIGTERM) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
