"""Nothing lost: the real server (``stablekit serve``) is killed with SIGKILL while one job runs and others wait,
then restarted on the same data folder: every job ends in a stated status and every finished image is intact."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as r:
        raw = r.read()
        return json.loads(raw) if r.headers.get_content_type() == "application/json" else raw


class Server:
    def __init__(self, data_dir: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
        args = [sys.executable, "-m", "stablekit.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(
            [*args, "--device", "cpu"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if _call(self.url + "/health")["status"] == "ok":
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        raise AssertionError("the server did not become ready: " + log.read_text()[-2000:])

    def job(self, job_id: str) -> dict:
        return _call(f"{self.url}/v1/jobs/{job_id}")

    def wait(self, job_id: str, done, timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id}: {job['status']}")

    def submit(self, params: dict) -> str:
        return _call(self.url + "/v1/jobs", {"task": "txt2img", "params": params})["id"]

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


FINAL = ("succeeded", "failed", "cancelled")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_server_loses_nothing(tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = Server(data, log)
    try:
        done = server.submit({"prompt": "a red star", "steps": 3, "seed": 1})
        finished = server.wait(done, lambda j: j["status"] in FINAL)
        assert finished["status"] == "succeeded"
        running = server.submit({"prompt": "a blue circle", "steps": 150, "width": 128, "height": 128})
        queued = [server.submit({"prompt": f"shape {i}", "steps": 2, "seed": i}) for i in range(3)]
        server.wait(running, lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
        server.stop(signal.SIGKILL)

        server = Server(data, log)
        for job_id in [done, running, *queued]:
            server.wait(job_id, lambda j: j["status"] in FINAL)
        lost = server.job(running)
        assert lost["status"] == "failed" and lost["error"] == "server stopped while running"
        assert [server.job(j)["status"] for j in queued] == ["succeeded"] * 3
        history = {j["id"]: j for j in _call(server.url + "/v1/jobs?limit=100")}
        assert set(history) == {done, running, *queued}
        for job_id in [done, *queued]:
            (image,) = server.job(job_id)["result"]["images"]
            png = _call(server.url + image["url"])
            assert hashlib.sha256(png).hexdigest() == image["sha256"]
            assert hashlib.sha256((data / "images" / f"{image['id']}.png").read_bytes()).hexdigest() == image["sha256"]
        assert server.job(done)["result"] == finished["result"]
        assert not list((data / "images").glob(".*.part"))
    finally:
        server.stop()
